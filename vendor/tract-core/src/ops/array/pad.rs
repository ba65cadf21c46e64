use crate::internal::*;

/// How a padded region is filled. A `Constant` value carries a single element
/// in the datum type the model builder gave it, f32 for a float graph, and no
/// pass retypes it: a consumer casts it to the datum type of the tensor it pads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PadMode {
    Constant(Arc<Tensor>),
    Reflect,
    Edge,
}

impl Default for PadMode {
    fn default() -> PadMode {
        PadMode::Constant(Arc::new(0.0f32.into()))
    }
}

#[derive(Debug, Clone, new, Default, Hash, PartialEq, Eq)]
pub struct Pad {
    pub pads: Vec<(usize, usize)>,
    pub mode: PadMode,
}

impl Pad {
    fn eval_t<T>(&self, input_tensor: TValue) -> TractResult<TValue>
    where
        T: Copy + Datum,
    {
        use tract_ndarray::*;
        let input = input_tensor.to_plain_array_view::<T>()?;
        let output_shape: Vec<usize> =
            input.shape().iter().zip(self.pads.iter()).map(|(&d, &(a, b))| d + a + b).collect();
        let element = match &self.mode {
            PadMode::Constant(f) => f.cast_to_scalar::<T>()?,
            _ => T::default(),
        };
        if let (PadMode::Constant(_), Some(data)) = (&self.mode, input.as_slice())
            && input.ndim() > 0
        {
            let mut output = unsafe { Tensor::uninitialized::<T>(&output_shape)? };
            let out = unsafe { output.as_slice_mut_unchecked::<T>() };
            // Leading axes without padding (batch, channels) split the copy into independent
            // blocks, shared over the installed executor; the innermost axis stays whole.
            let lead = self.pads[..input.ndim() - 1].iter().take_while(|p| **p == (0, 0)).count();
            let block_in: usize = input.shape()[lead..].iter().product();
            let block_out: usize = output_shape[lead..].iter().product();
            if block_out > 0 {
                tract_linalg::multithread::par_chunks_mut(
                    out,
                    block_out,
                    out.len(),
                    |first, mut chunk| {
                        let blocks = chunk.len() / block_out;
                        for b in first..first + blocks {
                            let src = &data[b * block_in..(b + 1) * block_in];
                            let shape = &input.shape()[lead..];
                            pad_constant_rows(&mut chunk, src, shape, &self.pads[lead..], element);
                        }
                        debug_assert!(chunk.is_empty());
                        Ok(())
                    },
                )?;
            }
            unsafe { output.set_datum_type(input_tensor.datum_type()) }
            return Ok(output.into_tvalue());
        }
        let mut output = ArrayD::<T>::from_elem(output_shape, element);
        let slice_spec: Vec<SliceInfoElem> = self
            .pads
            .iter()
            .map(|&(a, b)| SliceInfoElem::Slice {
                start: a as isize,
                end: if b != 0 { Some(-(b as isize)) } else { None },
                step: 1,
            })
            .collect();
        let slice_info = SliceInfo::<_, IxDyn, IxDyn>::try_from(slice_spec).unwrap();
        output.slice_mut(slice_info.as_ref()).assign(&input);
        if self.mode == PadMode::Reflect || self.mode == PadMode::Edge {
            for (ax, &(bef, aft)) in self.pads.iter().enumerate() {
                let axis = Axis(ax);
                let dim = output.shape()[ax];
                {
                    let (mut pad, data) = output.view_mut().split_at(axis, bef);
                    for i in 0..bef {
                        let mut target = pad.slice_axis_mut(axis, Slice::from(i..i + 1));
                        let source_slice = match self.mode {
                            PadMode::Edge => 0,
                            PadMode::Reflect => bef - i,
                            _ => panic!(),
                        };
                        let source =
                            data.slice_axis(axis, Slice::from(source_slice..source_slice + 1));
                        target.assign(&source);
                    }
                }
                {
                    let (data, mut pad) = output.view_mut().split_at(axis, dim - aft);
                    for i in 0..aft {
                        let mut target = pad.slice_axis_mut(axis, Slice::from(i..i + 1));
                        let source_slice = match self.mode {
                            PadMode::Edge => dim - aft - 1,
                            PadMode::Reflect => dim - aft - 2 - i,
                            _ => panic!(),
                        };
                        let source =
                            data.slice_axis(axis, Slice::from(source_slice..source_slice + 1));
                        target.assign(&source);
                    }
                }
            }
        }
        let mut output = output.into_tensor();
        unsafe { output.set_datum_type(input_tensor.datum_type()) }
        Ok(output.into_tvalue())
    }
}

/// Writes the constant-padded copy of the standard-layout `data` of shape `shape` at the front
/// of `out` and advances `out` past it: one pass over the output, rows of the innermost axis
/// copied whole, padding written once (instead of filling the whole output, then assigning the
/// input through a strided view), straight into the output tensor.
fn pad_constant_rows<T: Copy>(
    out: &mut &mut [T],
    data: &[T],
    shape: &[usize],
    pads: &[(usize, usize)],
    element: T,
) {
    fn take<'a, T>(out: &mut &'a mut [T], n: usize) -> &'a mut [T] {
        let (head, tail) = std::mem::take(out).split_at_mut(n);
        *out = tail;
        head
    }
    let (before, after) = pads[0];
    if shape.len() == 1 {
        take(out, before).fill(element);
        take(out, data.len()).copy_from_slice(data);
        take(out, after).fill(element);
        return;
    }
    let inner_in: usize = shape[1..].iter().product();
    let inner_out: usize = shape[1..].iter().zip(&pads[1..]).map(|(d, (a, b))| d + a + b).product();
    take(out, before * inner_out).fill(element);
    for i in 0..shape[0] {
        let sub = &data[i * inner_in..(i + 1) * inner_in];
        pad_constant_rows(out, sub, &shape[1..], &pads[1..], element);
    }
    take(out, after * inner_out).fill(element);
}

impl Op for Pad {
    fn name(&self) -> StaticName {
        "Pad".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("Mode: {:?}, pads: {:?})", self.mode, self.pads,)])
    }

    op_as_typed_op!();
}

impl EvalOp for Pad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        Ok(tvec!(dispatch_numbers!(Self::eval_t(input.datum_type())(self, input))?))
    }
}

impl TypedOp for Pad {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut fact = inputs[0].without_value();
        if self.pads.len() != fact.rank() {
            bail!("Inconsistent pad: input of rank {}, pads are: {:?}", fact.rank(), self.pads);
        }
        for (ix, (b, e)) in self.pads.iter().enumerate() {
            fact.shape.set(ix, fact.shape[ix].clone() + *b + *e);
        }
        Ok(tvec!(fact))
    }

    fn input_roi(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TVec<Option<TDim>>>> {
        let output_fact = model.outlet_fact(OutletId::new(node.id, 0))?;
        rule_if_some!(roi = &output_fact.region_of_interest);
        // For each padded axis, substitute 🎯axis → 🎯axis - before
        let mut input_roi = roi.clone();
        for (axis, &(before, _)) in self.pads.iter().enumerate() {
            if before == 0 {
                continue;
            }
            if let Some(sym) = input_roi
                .symbols()
                .into_iter()
                .find(|s| crate::ops::logic::sym_to_coord_axis(s) == Some(axis))
            {
                let shifted = TDim::Sym(sym.clone()) - TDim::Val(before as i64);
                input_roi = input_roi.substitute(&sym, &shifted).unwrap_or(input_roi);
            }
        }
        Ok(Some(tvec![Some(input_roi)]))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        let mut result = AxesMapping::disconnected(inputs, outputs)?;
        for (ix, pads) in self.pads.iter().enumerate() {
            if pads == &(0, 0) {
                result = result.linking((InOut::In(0), ix), (InOut::Out(0), ix))?;
            }
        }
        Ok(result)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        let mut new_op = self.clone();
        if let (InOut::In(0), AxisOp::Rm(ix)) = (io, change)
            && new_op.pads.remove(*ix) == (0, 0)
        {
            return Ok(Some(AxisChangeConsequence::new(
                model,
                node,
                Some(Box::new(new_op)),
                change,
            )));
        }
        if let (InOut::In(0), AxisOp::Add(ix)) = (io, change) {
            new_op.pads.insert(*ix, (0, 0));
            return Ok(Some(AxisChangeConsequence::new(
                model,
                node,
                Some(Box::new(new_op)),
                change,
            )));
        }
        Ok(None)
    }

    fn declutter(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        if self.pads.iter().all(|p| p.0 == 0 && p.1 == 0) {
            TypedModelPatch::shunt_one_op(model, node)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod constant_rows_test {
    use super::*;

    /// The row path against the definition of a constant pad, on standard-layout inputs of
    /// rank 1 to 4 (zero-sized axes, no padding on some axes, padding on all), for f32 and a
    /// quantized u8 whose datum type must survive.
    #[test]
    fn constant_pad_rows_match_definition() {
        let cases: &[(&[usize], &[(usize, usize)])] = &[
            (&[5], &[(2, 3)]),
            (&[3, 4], &[(0, 0), (1, 1)]),
            (&[1, 16, 7, 9], &[(0, 0), (0, 0), (1, 1), (1, 1)]),
            (&[2, 3, 4, 5], &[(1, 0), (0, 2), (3, 1), (0, 1)]),
            (&[2, 0, 3], &[(1, 1), (1, 1), (1, 1)]),
            (&[0, 3], &[(2, 0), (0, 0)]),
            // Over the threading threshold: split by channel on a pool below.
            (&[1, 24, 40, 41], &[(0, 0), (0, 0), (1, 1), (1, 1)]),
            (&[3, 5, 40, 40], &[(0, 0), (1, 0), (2, 1), (0, 1)]),
        ];
        for (shape, pads) in cases {
            let len: usize = shape.iter().product();
            let x: Vec<f32> = (0..len).map(|i| i as f32 - 7.5).collect();
            let t = Tensor::from_shape(shape, &x).unwrap();
            let pad = Pad::new(pads.to_vec(), PadMode::Constant(Arc::new(0.25f32.into())));
            let got = pad.eval_t::<f32>(t.clone().into_tvalue()).unwrap();
            // By definition: the input's item where the output index minus the leading pads
            // falls inside the input, the constant elsewhere.
            let xv = t.to_plain_array_view::<f32>().unwrap();
            let out_shape: Vec<usize> =
                shape.iter().zip(pads.iter()).map(|(d, (a, b))| d + a + b).collect();
            let want = tract_ndarray::ArrayD::<f32>::from_shape_fn(out_shape, |idx| {
                let src: Option<Vec<usize>> = (0..shape.len())
                    .map(|ax| idx[ax].checked_sub(pads[ax].0).filter(|&i| i < shape[ax]))
                    .collect();
                src.map_or(0.25, |src| xv[tract_ndarray::IxDyn(&src)])
            });
            let want = want.into_tensor();
            assert_eq!(*got, want, "{shape:?} {pads:?}");
            let pool = tract_linalg::multithread::Executor::multithread(3);
            let split = tract_linalg::multithread::multithread_tract_scope(pool, || {
                pad.eval_t::<f32>(t.into_tvalue()).unwrap()
            });
            assert_eq!(*split, want, "{shape:?} {pads:?} split");
        }
        let dt = u8::datum_type().quantize(QParams::ZpScale { zero_point: 3, scale: 0.5 });
        let mut t = Tensor::from_shape(&[2, 3], &[1u8, 2, 3, 4, 5, 6]).unwrap();
        unsafe { t.set_datum_type(dt) };
        let pad = Pad::new(vec![(1, 0), (0, 1)], PadMode::Constant(Arc::new(3u8.into())));
        let got = pad.eval_t::<u8>(t.into_tvalue()).unwrap();
        assert_eq!(got.datum_type(), dt);
        assert_eq!(
            got.to_plain_array_view::<u8>().unwrap().iter().copied().collect::<Vec<_>>(),
            vec![3, 3, 3, 3, 1, 2, 3, 3, 4, 5, 6, 3]
        );
    }
}
