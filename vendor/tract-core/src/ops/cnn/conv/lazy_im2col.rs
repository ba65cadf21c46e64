use crate::internal::*;
use crate::ops::matmul::pack::DynPackedExoticFact;
use std::fmt::{Debug, Display};
use std::ops::Range;
use tract_linalg::WeightType;
use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedMatrixStorage};
use tract_linalg::pack::{PackedFormat, PackedI8K4, PackingWriter};

/// The packing a lazy im2col panel is written in: the one the selected kernel reads its
/// activations in.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum LazyPacker {
    /// K-major panels of `r` columns (float kernels, the plain integer kernels).
    Plain(PackedFormat),
    /// K=4-inner byte panels (`PackedI8K4`): 4 consecutive k of one column are contiguous.
    I8K4(PackedI8K4),
}

impl LazyPacker {
    pub fn r(&self) -> usize {
        match self {
            LazyPacker::Plain(p) => p.r,
            LazyPacker::I8K4(p) => p.r,
        }
    }

    pub fn as_format(&self) -> &dyn MMMInputFormat {
        match self {
            LazyPacker::Plain(p) => p,
            LazyPacker::I8K4(p) => p,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LazyIm2colParams {
    pub packer: LazyPacker,
    pub n_byte_offsets: Vec<isize>,
    pub k_byte_offsets: Vec<isize>,
}

impl MMMInputFormat for LazyIm2colParams {
    fn r(&self) -> usize {
        self.packer.r()
    }

    fn precursor(&self) -> WeightType {
        self.packer.as_format().precursor()
    }

    fn prepare_tensor(&self, _t: &Tensor, _k_axis: usize, _mn_axis: usize) -> TractResult<Tensor> {
        bail!("Unexpected call to prepare_tensor on LazyIm2Col")
    }

    fn k_alignment(&self) -> usize {
        1
    }

    fn mem_size(&self, k: TDim, mn: TDim) -> TDim {
        match &self.packer {
            LazyPacker::Plain(p) => k * mn * p.dt.size_of(),
            LazyPacker::I8K4(p) => p.mem_size(k, mn),
        }
    }

    fn extract_at_mn_f16(
        &self,
        _data: &tract_linalg::mmm::EagerPackedInput,
        _mn: usize,
        _slice: &mut [f16],
    ) -> TractResult<()> {
        unimplemented!()
    }
    fn extract_at_mn_f32(
        &self,
        _data: &tract_linalg::mmm::EagerPackedInput,
        _mn: usize,
        _slice: &mut [f32],
    ) -> TractResult<()> {
        unimplemented!()
    }

    fn prepare_one_view(
        &self,
        _t: &TensorView,
        _k_axis: usize,
        _mn_axis: usize,
    ) -> TractResult<Box<dyn MMMInputValue>> {
        bail!("Unexpected call to prepare_one_view on LazyIm2Col")
    }

    fn prepare_one(
        &self,
        _t: &Tensor,
        _k_axis: usize,
        _mn_axis: usize,
    ) -> TractResult<Box<dyn MMMInputValue>> {
        bail!("Unexpected call to prepare_one on LazyIm2Col")
    }
}

impl Display for LazyIm2colParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyIm2Col")
    }
}

impl ExoticFact for LazyIm2colParams {
    fn buffer_sizes(&self) -> TVec<TDim> {
        tvec!(MMMInputFormat::mem_size(
            self,
            self.k_byte_offsets.len().to_dim(),
            self.n_byte_offsets.len().to_dim(),
        ))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LazyIm2Col {
    pub params: Arc<LazyIm2colParams>,
    /// Number of groups for grouped convolution (1 if ungrouped). The output is then a
    /// `[1, group]`-batched packed tensor; each group reads from a different slice of the
    /// input via a per-group offset of `g * ci_per_group * c_stride * size_of`.
    pub group: usize,
    /// Byte stride between consecutive groups in the input tensor's flat byte buffer.
    /// Equal to `ci_per_group * c_stride * size_of(input)`. Unused (0) when `group == 1`.
    pub group_stride_bytes: isize,
}

impl Op for LazyIm2Col {
    fn name(&self) -> StaticName {
        "LazyIm2col".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LazyIm2Col {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let tensor = args_1!(inputs);
        let dt = tensor.datum_type();
        let mut values: TVec<Box<dyn MMMInputValue>> = TVec::with_capacity(self.group);
        for g in 0..self.group {
            let group_offset_bytes = g as isize * self.group_stride_bytes;
            values.push(Box::new(LazyIm2colInput::new(
                tensor.clone(),
                self.params.clone(),
                group_offset_bytes,
            )));
        }
        let output = PackedMatrixStorage::new_batched(&[1, self.group], values).into_tensor(dt);
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for LazyIm2Col {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let exotic_fact = DynPackedExoticFact {
            k: self.params.k_byte_offsets.len().to_dim(),
            mn: self.params.n_byte_offsets.len().to_dim(),
            packers: vec![dyn_clone::clone_box(self.params.packer.as_format())],
        };
        Ok(tvec!(inputs[0].datum_type.fact([1, self.group]).with_exotic_fact(exotic_fact)))
    }

    as_op!();
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LazyIm2colInput {
    tensor: TValue,
    im2col: Arc<LazyIm2colParams>,
    /// Per-group base byte offset added to every gather. For group g this is
    /// `g * ci_per_group * c_stride * size_of(input)`. Zero for ungrouped convs.
    group_offset_bytes: isize,
    /// The smallest and largest of `im2col.k_byte_offsets`.
    k_byte_range: (isize, isize),
}

impl Display for LazyIm2colInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Hash for LazyIm2colInput {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.tensor.as_bytes(), &self.im2col, self.group_offset_bytes).hash(state);
    }
}

unsafe impl Send for LazyIm2colInput {}
unsafe impl Sync for LazyIm2colInput {}

impl LazyIm2colInput {
    fn new(tensor: TValue, im2col: Arc<LazyIm2colParams>, group_offset_bytes: isize) -> Self {
        let k = &im2col.k_byte_offsets;
        let k_byte_range = (
            k.iter().copied().min().unwrap_or(0),
            k.iter().copied().max().unwrap_or(0),
        );
        LazyIm2colInput { tensor, im2col, group_offset_bytes, k_byte_range }
    }

    fn input_8n<T: Datum + Copy>(
        &self,
        writer: &mut impl PackingWriter<T>,
        k_range: Range<isize>,
        n: isize,
    ) {
        let k_byte_offsets = self.im2col.k_byte_offsets.as_ptr();
        let n_byte_offsets = self.im2col.n_byte_offsets.as_ptr();
        unsafe {
            let ptr = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let o1 = *n_byte_offsets.offset(n);
            let o2 = *n_byte_offsets.offset(n + 1);
            let o3 = *n_byte_offsets.offset(n + 2);
            let o4 = *n_byte_offsets.offset(n + 3);
            let o5 = *n_byte_offsets.offset(n + 4);
            let o6 = *n_byte_offsets.offset(n + 5);
            let o7 = *n_byte_offsets.offset(n + 6);
            let o8 = *n_byte_offsets.offset(n + 7);
            for k in k_range.start..k_range.end {
                let ptr = ptr.offset(*k_byte_offsets.offset(k));
                let v1 = *(ptr.offset(o1) as *const T);
                let v2 = *(ptr.offset(o2) as *const T);
                let v3 = *(ptr.offset(o3) as *const T);
                let v4 = *(ptr.offset(o4) as *const T);
                let v5 = *(ptr.offset(o5) as *const T);
                let v6 = *(ptr.offset(o6) as *const T);
                let v7 = *(ptr.offset(o7) as *const T);
                let v8 = *(ptr.offset(o8) as *const T);
                writer.write(v1);
                writer.write(v2);
                writer.write(v3);
                writer.write(v4);
                writer.write(v5);
                writer.write(v6);
                writer.write(v7);
                writer.write(v8);
            }
        }
    }

    fn input_6n<T: Datum + Copy>(
        &self,
        writer: &mut impl PackingWriter<T>,
        k_range: Range<isize>,
        n: isize,
    ) {
        unsafe {
            let ptr = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let k_byte_offsets = self.im2col.k_byte_offsets.as_ptr();
            let n_byte_offsets = self.im2col.n_byte_offsets.as_ptr();
            let o1 = *n_byte_offsets.offset(n);
            let o2 = *n_byte_offsets.offset(n + 1);
            let o3 = *n_byte_offsets.offset(n + 2);
            let o4 = *n_byte_offsets.offset(n + 3);
            let o5 = *n_byte_offsets.offset(n + 4);
            let o6 = *n_byte_offsets.offset(n + 5);
            for k in k_range.start..k_range.end {
                let ptr = ptr.offset(*k_byte_offsets.offset(k));
                let v1 = *(ptr.offset(o1) as *const T);
                let v2 = *(ptr.offset(o2) as *const T);
                let v3 = *(ptr.offset(o3) as *const T);
                let v4 = *(ptr.offset(o4) as *const T);
                let v5 = *(ptr.offset(o5) as *const T);
                let v6 = *(ptr.offset(o6) as *const T);
                writer.write(v1);
                writer.write(v2);
                writer.write(v3);
                writer.write(v4);
                writer.write(v5);
                writer.write(v6);
            }
        }
    }

    fn input_4n<T: Datum + Copy>(
        &self,
        writer: &mut impl PackingWriter<T>,
        k_range: Range<isize>,
        n: isize,
    ) {
        unsafe {
            let ptr = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let k_byte_offsets = self.im2col.k_byte_offsets.as_ptr();
            let n_byte_offsets = self.im2col.n_byte_offsets.as_ptr();
            let o1 = *n_byte_offsets.offset(n);
            let o2 = *n_byte_offsets.offset(n + 1);
            let o3 = *n_byte_offsets.offset(n + 2);
            let o4 = *n_byte_offsets.offset(n + 3);
            for k in k_range.start..k_range.end {
                let ptr = ptr.offset(*k_byte_offsets.offset(k));
                let v1 = *(ptr.offset(o1) as *const T);
                let v2 = *(ptr.offset(o2) as *const T);
                let v3 = *(ptr.offset(o3) as *const T);
                let v4 = *(ptr.offset(o4) as *const T);
                writer.write(v1);
                writer.write(v2);
                writer.write(v3);
                writer.write(v4);
            }
        }
    }

    fn input_2n<T: Datum + Copy>(
        &self,
        writer: &mut impl PackingWriter<T>,
        k_range: Range<isize>,
        n: isize,
    ) {
        unsafe {
            let ptr = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let k_byte_offsets = self.im2col.k_byte_offsets.as_ptr();
            let n_byte_offsets = self.im2col.n_byte_offsets.as_ptr();
            let o1 = *n_byte_offsets.offset(n);
            let o2 = *n_byte_offsets.offset(n + 1);
            for k in k_range.start..k_range.end {
                let ptr = ptr.offset(*k_byte_offsets.offset(k));
                let v1 = *(ptr.offset(o1) as *const T);
                let v2 = *(ptr.offset(o2) as *const T);
                writer.write(v1);
                writer.write(v2);
            }
        }
    }

    fn write<T: Datum + Copy>(
        &self,
        writer: &mut impl PackingWriter<T>,
        k_range: std::ops::Range<isize>,
        mn_range: std::ops::Range<isize>,
    ) {
        let mn_end = mn_range.end.min(self.im2col.n_byte_offsets.len() as isize);
        let n_range = mn_range.start..mn_end;
        match n_range.len() {
            8 => return self.input_8n(writer, k_range, n_range.start),
            6 => return self.input_6n(writer, k_range, n_range.start),
            4 => return self.input_4n(writer, k_range, n_range.start),
            2 => return self.input_2n(writer, k_range, n_range.start),
            _ => (),
        }
        unsafe {
            let ptr = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let k_byte_offsets = self.im2col.k_byte_offsets.as_ptr();
            let n_byte_offsets = self.im2col.n_byte_offsets.as_ptr();
            for k in k_range.start..k_range.end {
                let ptr = ptr.offset(*k_byte_offsets.offset(k));
                let mut n = n_range.start;
                while n + 8 <= n_range.end {
                    let o1 = *n_byte_offsets.offset(n);
                    let o2 = *n_byte_offsets.offset(n + 1);
                    let o3 = *n_byte_offsets.offset(n + 2);
                    let o4 = *n_byte_offsets.offset(n + 3);
                    let o5 = *n_byte_offsets.offset(n + 4);
                    let o6 = *n_byte_offsets.offset(n + 5);
                    let o7 = *n_byte_offsets.offset(n + 6);
                    let o8 = *n_byte_offsets.offset(n + 7);
                    let v1 = *(ptr.offset(o1) as *const T);
                    let v2 = *(ptr.offset(o2) as *const T);
                    let v3 = *(ptr.offset(o3) as *const T);
                    let v4 = *(ptr.offset(o4) as *const T);
                    let v5 = *(ptr.offset(o5) as *const T);
                    let v6 = *(ptr.offset(o6) as *const T);
                    let v7 = *(ptr.offset(o7) as *const T);
                    let v8 = *(ptr.offset(o8) as *const T);
                    writer.write(v1);
                    writer.write(v2);
                    writer.write(v3);
                    writer.write(v4);
                    writer.write(v5);
                    writer.write(v6);
                    writer.write(v7);
                    writer.write(v8);
                    n += 8;
                }
                while n + 6 <= n_range.end {
                    let o1 = *n_byte_offsets.offset(n);
                    let o2 = *n_byte_offsets.offset(n + 1);
                    let o3 = *n_byte_offsets.offset(n + 2);
                    let o4 = *n_byte_offsets.offset(n + 3);
                    let o5 = *n_byte_offsets.offset(n + 4);
                    let o6 = *n_byte_offsets.offset(n + 5);
                    let v1 = *(ptr.offset(o1) as *const T);
                    let v2 = *(ptr.offset(o2) as *const T);
                    let v3 = *(ptr.offset(o3) as *const T);
                    let v4 = *(ptr.offset(o4) as *const T);
                    let v5 = *(ptr.offset(o5) as *const T);
                    let v6 = *(ptr.offset(o6) as *const T);
                    writer.write(v1);
                    writer.write(v2);
                    writer.write(v3);
                    writer.write(v4);
                    writer.write(v5);
                    writer.write(v6);
                    n += 6;
                }
                while n + 4 <= n_range.end {
                    let o1 = *n_byte_offsets.offset(n);
                    let o2 = *n_byte_offsets.offset(n + 1);
                    let o3 = *n_byte_offsets.offset(n + 2);
                    let o4 = *n_byte_offsets.offset(n + 3);
                    let v1 = *(ptr.offset(o1) as *const T);
                    let v2 = *(ptr.offset(o2) as *const T);
                    let v3 = *(ptr.offset(o3) as *const T);
                    let v4 = *(ptr.offset(o4) as *const T);
                    writer.write(v1);
                    writer.write(v2);
                    writer.write(v3);
                    writer.write(v4);
                    n += 4;
                }
                while n < n_range.end {
                    let o1 = *n_byte_offsets.offset(n);
                    let v1 = *(ptr.offset(o1) as *const T);
                    writer.write(v1);
                    n += 1;
                }
            }
        }
    }
}

impl MMMInputValue for LazyIm2colInput {
    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        let k = self.im2col.k_byte_offsets.len();
        match &self.im2col.packer {
            LazyPacker::Plain(p) => {
                Some(p.single_panel_layout(k, self.tensor.datum_type().size_of()))
            }
            LazyPacker::I8K4(p) => {
                std::alloc::Layout::from_size_align(p.single_panel_len(k), p.alignment()).ok()
            }
        }
    }

    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let buffer = buffer.context("LazyIm2col panel needs a scratch buffer")?;
        match &self.im2col.packer {
            LazyPacker::Plain(p) => Ok(dispatch_copy!(Self::do_panel(self.tensor.datum_type())(
                self,
                p,
                i,
                Some(buffer)
            ))),
            LazyPacker::I8K4(p) => {
                ensure!(
                    self.tensor.datum_type().size_of() == 1,
                    "I8K4 lazy im2col needs a one-byte input, got {:?}",
                    self.tensor.datum_type()
                );
                if p.r == 8 {
                    unsafe { self.do_panel_k4::<8>(i, buffer) };
                } else if p.r == 16 {
                    unsafe { self.do_panel_k4::<16>(i, buffer) };
                } else {
                    unsafe { self.do_panel_k4_any(p.r, i, buffer) };
                }
                Ok(buffer)
            }
        }
    }

    fn k(&self) -> usize {
        self.im2col.k_byte_offsets.len()
    }

    fn mn(&self) -> usize {
        self.im2col.n_byte_offsets.len()
    }

    fn format(&self) -> &dyn MMMInputFormat {
        &*self.im2col
    }

    fn exotic_fact(&self) -> &dyn ExoticFact {
        &*self.im2col
    }
    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        unimplemented!()
    }
    fn extract_at_mn_f32(&self, _mn: usize, _slice: &mut [f32]) -> TractResult<()> {
        unimplemented!()
    }
}

impl LazyIm2colInput {
    fn do_panel<T: Datum + Copy>(
        &self,
        packer: &PackedFormat,
        i: usize,
        buffer: Option<*mut u8>,
    ) -> *const u8 {
        let r = packer.r;
        let mn_start = i * r;
        let mn_end = (mn_start + r).min(self.im2col.n_byte_offsets.len());
        let k = self.im2col.k_byte_offsets.len();
        let mn_range = mn_start as isize..mn_end as isize;
        let k_range = 0..k as isize;
        let packed = buffer.unwrap();
        if mn_range.len() == r && mn_start.is_multiple_of(r) {
            let n_off = &self.im2col.n_byte_offsets[mn_start..mn_end];
            if unsafe { self.strided_panel::<T>(n_off, packed as *mut T) } {
                return packed;
            }
            let mut writer = packer.write_single_panel_with_k_outer(packed as *mut T);
            self.write(&mut writer, k_range, mn_range);
        } else {
            let mut writer =
                packer.write_with_k_outer(packed as *mut T, k_range.len(), mn_range.len());
            self.write(&mut writer, k_range, mn_range);
        }
        packed
    }

    /// A full K-outer panel (`out[k * r + j] = x[k_off[k] + n_off[j]]`, `r = n_off.len()`) whose
    /// columns are 1 or 2 items apart in the input (one output row of a stride-1 or stride-2
    /// conv), written as fixed-size row copies the compiler vectorises instead of one load per
    /// item. A panel of 4-byte items that crosses into the next output row (columns evenly
    /// spaced on either side of one jump) is written as two such row reads blended at the
    /// jump. Returns false, having written nothing, for any other panel (other strides or
    /// widths, a panel over three output rows, rows whose full-width reads would leave the
    /// tensor).
    ///
    /// # Safety
    /// `out` holds `k * r` items; the offsets address items of the tensor.
    unsafe fn strided_panel<T: Datum + Copy>(&self, n_off: &[isize], out: *mut T) -> bool {
        let sz = std::mem::size_of::<T>() as isize;
        let Some(step) = n_off.get(1).map(|o| o - n_off[0]) else { return false };
        if !(step == sz || step == 2 * sz) {
            return false;
        }
        let unit = step == sz;
        let split = n_off.windows(2).position(|w| w[1] - w[0] != step).map_or(n_off.len(), |p| p + 1);
        if split == n_off.len() {
            unsafe {
                match n_off.len() {
                    4 => self.strided_rows::<T, 4>(n_off[0], unit, out),
                    6 => self.strided_rows::<T, 6>(n_off[0], unit, out),
                    8 => self.strided_rows::<T, 8>(n_off[0], unit, out),
                    12 => self.strided_rows::<T, 12>(n_off[0], unit, out),
                    16 => self.strided_rows::<T, 16>(n_off[0], unit, out),
                    _ => return false,
                }
            }
            return true;
        }
        if sz != 4 || n_off[split..].windows(2).any(|w| w[1] - w[0] != step) {
            return false;
        }
        // The columns after the jump, read as a whole row that starts `split` columns early.
        let o0 = n_off[0];
        let o1 = n_off[split] - split as isize * step;
        let span = (n_off.len() as isize - 1) * step + sz;
        let (k_min, k_max) = self.k_byte_range;
        let lo = self.group_offset_bytes + k_min + o0.min(o1);
        let hi = self.group_offset_bytes + k_max + o0.max(o1) + span;
        if lo < 0 || hi as usize > self.tensor.len() * sz as usize {
            return false;
        }
        unsafe {
            match n_off.len() {
                8 => self.split_rows::<8>(o0, o1, split, unit, out as *mut u32),
                12 => self.split_rows::<12>(o0, o1, split, unit, out as *mut u32),
                16 => self.split_rows::<16>(o0, o1, split, unit, out as *mut u32),
                _ => return false,
            }
        }
        true
    }

    /// Rows of 4-byte items whose first `split` columns read from `o0` on and the others from
    /// `o1` on (each a whole row read, 1 (`unit`) or 2 items per column), blended.
    ///
    /// # Safety
    /// As [`Self::strided_panel`]; both whole-row reads stay in the tensor for every k.
    #[inline(always)]
    unsafe fn split_rows<const R: usize>(
        &self,
        o0: isize,
        o1: isize,
        split: usize,
        unit: bool,
        out: *mut u32,
    ) {
        let mask: [u32; R] = std::array::from_fn(|j| if j < split { !0 } else { 0 });
        unsafe {
            let base = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            for (kk, &ko) in self.im2col.k_byte_offsets.iter().enumerate() {
                let read = |o: isize| -> [u32; R] {
                    let src = base.offset(ko + o) as *const u32;
                    if unit {
                        src.cast::<[u32; R]>().read_unaligned()
                    } else {
                        let mut row = [0u32; R];
                        if !deinterleave_4byte::<R>(src, row.as_mut_ptr()) {
                            row = std::array::from_fn(|j| src.add(2 * j).read_unaligned());
                        }
                        row
                    }
                };
                let (a, b) = (read(o0), read(o1));
                let row: [u32; R] = std::array::from_fn(|j| (a[j] & mask[j]) | (b[j] & !mask[j]));
                out.add(kk * R).cast::<[u32; R]>().write_unaligned(row);
            }
        }
    }

    /// # Safety
    /// As [`Self::strided_panel`], with every column 1 (`unit`) or 2 items after the previous
    /// one.
    #[inline(always)]
    unsafe fn strided_rows<T: Datum + Copy, const R: usize>(
        &self,
        o0: isize,
        unit: bool,
        out: *mut T,
    ) {
        unsafe {
            let base = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes + o0);
            for (kk, &ko) in self.im2col.k_byte_offsets.iter().enumerate() {
                let src = base.offset(ko) as *const T;
                let dst = out.add(kk * R);
                if unit {
                    std::ptr::copy_nonoverlapping(src, dst, R);
                } else if !(std::mem::size_of::<T>() == 4 && deinterleave_4byte::<R>(src, dst)) {
                    let row: [T; R] = std::array::from_fn(|j| src.add(2 * j).read_unaligned());
                    dst.cast::<[T; R]>().write_unaligned(row);
                }
            }
        }
    }

    /// Panel `i` in the K=4-inner layout, `R` columns wide:
    /// `out[(k/4)*R*4 + j*4 + k%4] = x[k_off[k] + n_off[i*R + j]]`. The k tail up to a multiple
    /// of 4 and the columns past `mn` are zero, so the panel is deterministic.
    ///
    /// # Safety
    /// `buffer` holds `single_panel_len(k)` bytes; the offsets address bytes of the tensor.
    unsafe fn do_panel_k4<const R: usize>(&self, i: usize, buffer: *mut u8) {
        unsafe {
            let n_offsets = &self.im2col.n_byte_offsets;
            let mn_start = i * R;
            let width = R.min(n_offsets.len().saturating_sub(mn_start));
            if width < R || !R.is_multiple_of(8) {
                return self.do_panel_k4_any(R, i, buffer);
            }
            // Each run of 8 columns is one 32-byte slice of every R*4-byte K=4 block. Eight
            // output positions on one output row sit 1 or 2 bytes apart (stride 1 or 2 along
            // W): each k row of the run is then one short load; a run that crosses an output
            // row is gathered byte by byte.
            for h in 0..R / 8 {
                let no = &n_offsets[mn_start + h * 8..mn_start + h * 8 + 8];
                let step = no[1] - no[0];
                let out = buffer.add(h * 32);
                if no.windows(2).all(|w| w[1] - w[0] == step) && step == 1 {
                    self.do_run8_k4_strided::<1>(no[0], out, R * 4);
                } else if no.windows(2).all(|w| w[1] - w[0] == step) && step == 2 {
                    self.do_run8_k4_strided::<2>(no[0], out, R * 4);
                } else {
                    self.do_run8_k4_gather(no, out, R * 4);
                }
            }
        }
    }

    /// Eight columns at byte offsets `no` of a K=4 panel whose blocks are `block` bytes apart:
    /// `out[kb * block + j * 4 + kr] = x[k_off[kb * 4 + kr] + no[j]]`, zero past `k`.
    ///
    /// # Safety
    /// As for [`Self::do_panel_k4`]; `out` addresses the run's first block.
    unsafe fn do_run8_k4_gather(&self, no: &[isize], out: *mut u8, block: usize) {
        unsafe {
            let k_offsets = &self.im2col.k_byte_offsets;
            let base = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            let k = k_offsets.len();
            for kb in 0..k.div_ceil(4) {
                let mut rows = [None; 4];
                for (kr, row) in rows.iter_mut().enumerate() {
                    if kb * 4 + kr < k {
                        *row = Some(base.offset(*k_offsets.get_unchecked(kb * 4 + kr)));
                    }
                }
                let dst = out.add(kb * block) as *mut u32;
                for (j, &o) in no.iter().enumerate() {
                    let b = rows.map(|r| r.map_or(0, |r| *r.offset(o)));
                    dst.add(j).write_unaligned(u32::from_le_bytes(b));
                }
            }
        }
    }

    /// [`Self::do_run8_k4_gather`] for eight columns `S` bytes apart from `o0` on: the 8 bytes
    /// of one k row come from short loads, and four rows interleave into the run's 32 bytes
    /// of one K=4 block.
    ///
    /// # Safety
    /// As for [`Self::do_run8_k4_gather`].
    unsafe fn do_run8_k4_strided<const S: usize>(&self, o0: isize, out: *mut u8, block: usize) {
        static ZEROS: [u8; 16] = [0; 16];
        unsafe {
            let k_offsets = &self.im2col.k_byte_offsets;
            let base =
                self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes).offset(o0);
            let row = |kk: usize| base.offset(*k_offsets.get_unchecked(kk));
            let k = k_offsets.len();
            for kb in 0..k / 4 {
                let rows = [row(kb * 4), row(kb * 4 + 1), row(kb * 4 + 2), row(kb * 4 + 3)];
                k4_block8::<S>(rows, out.add(kb * block));
            }
            let tail = k % 4;
            if tail != 0 {
                let mut rows = [ZEROS.as_ptr(); 4];
                for (kr, r) in rows.iter_mut().enumerate().take(tail) {
                    *r = row(k / 4 * 4 + kr);
                }
                k4_block8::<S>(rows, out.add(k / 4 * block));
            }
        }
    }

    /// [`Self::do_panel_k4`] for any panel width and for the last, partial panel.
    ///
    /// # Safety
    /// As for [`Self::do_panel_k4`].
    unsafe fn do_panel_k4_any(&self, r: usize, i: usize, buffer: *mut u8) {
        unsafe {
            let n_offsets = &self.im2col.n_byte_offsets;
            let k_offsets = &self.im2col.k_byte_offsets;
            let k = k_offsets.len();
            let kp = k.div_ceil(4) * 4;
            std::ptr::write_bytes(buffer, 0, kp * r);
            let mn_start = i * r;
            let width = r.min(n_offsets.len().saturating_sub(mn_start));
            let base = self.tensor.as_ptr_unchecked::<u8>().offset(self.group_offset_bytes);
            for (kk, &ko) in k_offsets.iter().enumerate() {
                let row = base.offset(ko);
                let dst = buffer.add((kk / 4) * r * 4 + kk % 4);
                for j in 0..width {
                    *dst.add(j * 4) = *row.offset(n_offsets[mn_start + j]);
                }
            }
        }
    }
}

/// One K=4 block of an 8-wide panel: `out[j * 4 + kr] = rows[kr][j * S]` for `j < 8`,
/// `kr < 4`. Reads bytes `0..=7 * S` of each row and nothing past them.
///
/// # Safety
/// Each row pointer addresses `7 * S + 1` readable bytes; `out` has 32 writable bytes.
#[inline(always)]
unsafe fn k4_block8<const S: usize>(rows: [*const u8; 4], out: *mut u8) {
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // SSE2 is part of x86_64.
            let load = |p: *const u8| -> __m128i {
                if S == 1 {
                    _mm_loadl_epi64(p as *const __m128i)
                } else {
                    // Bytes 0,2,4,6 from p[0..8] and 8,10,12,14 from p[7..15] (their odd
                    // bytes), narrowed to 8 bytes.
                    let lo =
                        _mm_and_si128(_mm_loadl_epi64(p as *const __m128i), _mm_set1_epi16(0xff));
                    let hi = _mm_srli_epi16::<8>(_mm_loadl_epi64(p.add(7) as *const __m128i));
                    let v = _mm_unpacklo_epi64(lo, hi);
                    _mm_packus_epi16(v, v)
                }
            };
            let ab = _mm_unpacklo_epi8(load(rows[0]), load(rows[1]));
            let cd = _mm_unpacklo_epi8(load(rows[2]), load(rows[3]));
            _mm_storeu_si128(out as *mut __m128i, _mm_unpacklo_epi16(ab, cd));
            _mm_storeu_si128(out.add(16) as *mut __m128i, _mm_unpackhi_epi16(ab, cd));
        }
        #[cfg(target_arch = "aarch64")]
        {
            use std::arch::aarch64::*;
            let load = |p: *const u8| -> uint8x8_t {
                if S == 1 {
                    vld1_u8(p)
                } else {
                    // Even bytes of p[0..8], then the odd bytes of p[7..15].
                    let hi = vld1_u8(p.add(7));
                    vuzp1_u8(vld1_u8(p), vext_u8::<1>(hi, hi))
                }
            };
            vst4_u8(out, uint8x8x4_t(load(rows[0]), load(rows[1]), load(rows[2]), load(rows[3])));
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            for j in 0..8 {
                for kr in 0..4 {
                    *out.add(j * 4 + kr) = *rows[kr].add(j * S);
                }
            }
        }
    }
}

/// `dst[j] = src[2 * j]` for `j < R`, items of 4 bytes, with vector loads and shuffles: four
/// items come from two overlapping loads (items `8g..8g+3` and `8g+3..8g+6`), so nothing past
/// item `2 * (R - 1)` is read. Bits are moved, not converted. Returns false, having written
/// nothing, where no such path exists (`R` not a multiple of 4, other architectures).
///
/// # Safety
/// `src` addresses `2 * R - 1` readable items, `dst` `R` writable ones.
#[inline(always)]
unsafe fn deinterleave_4byte<const R: usize>(src: *const impl Copy, dst: *mut impl Copy) -> bool {
    if !R.is_multiple_of(4) {
        return false;
    }
    let (s, d) = (src as *const f32, dst as *mut f32);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::*;
        for g in 0..R / 4 {
            let lo = _mm_loadu_ps(s.add(8 * g));
            let hi = _mm_loadu_ps(s.add(8 * g + 3));
            _mm_storeu_ps(d.add(4 * g), _mm_shuffle_ps::<0b11_01_10_00>(lo, hi));
        }
        true
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        use std::arch::aarch64::*;
        for g in 0..R / 4 {
            let lo = vld1q_f32(s.add(8 * g));
            let hi = vld1q_f32(s.add(8 * g + 3));
            let even = vget_low_f32(vuzp1q_f32(lo, lo));
            let odd = vget_low_f32(vuzp2q_f32(hi, hi));
            vst1q_f32(d.add(4 * g), vcombine_f32(even, odd));
        }
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (s, d);
        false
    }
}

#[cfg(test)]
mod test {
    use super::k4_block8;

    fn scalar<const S: usize>(rows: &[Vec<u8>; 4]) -> [u8; 32] {
        let mut out = [0u8; 32];
        for j in 0..8 {
            for kr in 0..4 {
                out[j * 4 + kr] = rows[kr][j * S];
            }
        }
        out
    }

    fn check<const S: usize>() {
        // Rows exactly 7 * S + 1 bytes long, so a read past the documented span would
        // leave the allocation (caught under Miri/ASan) or pick up the wrong bytes.
        let len = 7 * S + 1;
        let rows: [Vec<u8>; 4] =
            std::array::from_fn(|kr| (0..len).map(|i| (kr * 64 + i * 3 + 1) as u8).collect());
        let mut out = [0u8; 32];
        unsafe { k4_block8::<S>(std::array::from_fn(|kr| rows[kr].as_ptr()), out.as_mut_ptr()) };
        assert_eq!(out, scalar::<S>(&rows), "stride {S}");
    }

    #[test]
    fn k4_block8_matches_scalar() {
        check::<1>();
        check::<2>();
    }

    /// Whole K=4 panels of 8 and 16 columns for a 3x3 conv over a `c x h x w` byte image
    /// (offsets as `LazyIm2colParams` holds them), against the layout's definition: output
    /// rows narrower than a panel (runs that cross rows), strides 1 and 2, k tails, the
    /// partial last panel, and a group offset.
    #[test]
    fn k4_panels_match_definition() {
        use super::*;
        for (c, h, w, stride, r) in [
            (3, 12, 12, 1, 8),
            (3, 12, 12, 1, 16),
            (5, 9, 23, 2, 16),
            (2, 7, 41, 1, 16),
            (4, 11, 10, 2, 8),
            (1, 5, 5, 1, 16),
        ] {
            let (oh, ow) = ((h - 3) / stride + 1, (w - 3) / stride + 1);
            let group_offset = 7isize;
            let len = c * h * w + group_offset as usize;
            let x: Vec<u8> = (0..len).map(|i| (i * 89 % 253) as u8).collect();
            let n_byte_offsets: Vec<isize> = (0..oh * ow)
                .map(|n| ((n / ow * stride) * w + (n % ow) * stride) as isize)
                .collect();
            let k_byte_offsets: Vec<isize> = (0..c * 9)
                .map(|kk| ((kk / 9) * h * w + (kk % 9 / 3) * w + kk % 3) as isize)
                .collect();
            let packer = PackedI8K4::new(r);
            let input = LazyIm2colInput::new(
                Tensor::from_shape(&[len], &x).unwrap().into_tvalue(),
                Arc::new(LazyIm2colParams {
                    packer: LazyPacker::I8K4(packer.clone()),
                    n_byte_offsets: n_byte_offsets.clone(),
                    k_byte_offsets: k_byte_offsets.clone(),
                }),
                group_offset,
            );
            let k = k_byte_offsets.len();
            let panel_len = packer.single_panel_len(k);
            for i in 0..(oh * ow).div_ceil(r) {
                let mut want = vec![0u8; panel_len];
                for kk in 0..k {
                    for j in 0..r.min(oh * ow - i * r) {
                        let src = group_offset + k_byte_offsets[kk] + n_byte_offsets[i * r + j];
                        want[kk / 4 * r * 4 + j * 4 + kk % 4] = x[src as usize];
                    }
                }
                let mut got = vec![0xAAu8; panel_len];
                let ptr = input.panel_bytes(i, Some(got.as_mut_ptr())).unwrap();
                assert_eq!(ptr, got.as_ptr());
                assert_eq!(got, want, "c{c} {h}x{w} s{stride} r{r} panel {i}");
            }
        }
    }

    /// Whole f32 K-outer panels (the float kernels' packing) for a 3x3 conv over a
    /// `c x h x w` image, against `out[k * r + j] = x[k_off[k] + n_off[i * r + j]]`: panel
    /// widths with and without a row-copy path, strides 1, 2 and 3, output rows wider and
    /// narrower than a panel (panels that cross one row blend two row reads, wider ones take
    /// the per-item path, as do rows whose whole-row reads would leave the tensor at its end),
    /// the partial last panel, and a group offset.
    #[test]
    fn f32_panels_match_definition() {
        use super::*;
        for (c, h, w, stride, r) in [
            (3, 12, 30, 1, 12),
            (2, 9, 27, 2, 12),
            (3, 12, 12, 1, 8),
            (2, 11, 37, 2, 8),
            (2, 8, 40, 1, 16),
            (2, 9, 41, 2, 16),
            (1, 7, 20, 1, 6),
            (1, 7, 21, 2, 4),
            (2, 10, 30, 3, 12),
            (1, 6, 14, 1, 10),
            (2, 9, 11, 1, 16),
            (2, 9, 23, 2, 8),
            (3, 5, 42, 1, 12),
        ] {
            let (oh, ow) = ((h - 3) / stride + 1, (w - 3) / stride + 1);
            let group_offset = 5usize;
            let len = c * h * w + group_offset;
            let x: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let sz = 4isize;
            let n_byte_offsets: Vec<isize> = (0..oh * ow)
                .map(|n| ((n / ow * stride) * w + (n % ow) * stride) as isize * sz)
                .collect();
            let k_byte_offsets: Vec<isize> = (0..c * 9)
                .map(|kk| ((kk / 9) * h * w + (kk % 9 / 3) * w + kk % 3) as isize * sz)
                .collect();
            let packer = PackedFormat::new(f32::datum_type(), r, 16);
            let input = LazyIm2colInput::new(
                Tensor::from_shape(&[len], &x).unwrap().into_tvalue(),
                Arc::new(LazyIm2colParams {
                    packer: LazyPacker::Plain(packer.clone()),
                    n_byte_offsets: n_byte_offsets.clone(),
                    k_byte_offsets: k_byte_offsets.clone(),
                }),
                group_offset as isize * sz,
            );
            let k = k_byte_offsets.len();
            let panel_len = packer.single_panel_len(k);
            for i in 0..(oh * ow).div_ceil(r) {
                let cols = r.min(oh * ow - i * r);
                let mut got = vec![f32::NAN; panel_len];
                let ptr = input.panel_bytes(i, Some(got.as_mut_ptr() as *mut u8)).unwrap();
                assert_eq!(ptr, got.as_ptr() as *const u8);
                for kk in 0..k {
                    for j in 0..cols {
                        let src = (group_offset as isize * sz
                            + k_byte_offsets[kk]
                            + n_byte_offsets[i * r + j])
                            / sz;
                        assert_eq!(
                            got[kk * r + j].to_bits(),
                            x[src as usize].to_bits(),
                            "c{c} {h}x{w} s{stride} r{r} panel {i} k{kk} col {j}"
                        );
                    }
                }
            }
        }
    }
}
