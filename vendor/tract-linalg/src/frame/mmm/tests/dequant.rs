//! `FusedSpec::Dequant`: every runnable i32 kernel, every packing of i8 operands, full and
//! border tiles, per-row and per-column vectors, row- and column-major destinations, checked
//! bit for bit against the i32 store converted as `Dequant` specifies.
use crate::WeightType;
use crate::frame::mmm::*;
use crate::mmm::MmmDispatch;
use tract_data::internal::*;

fn inputs(m: usize, k: usize, n: usize) -> (Tensor, Tensor) {
    let a: Vec<i8> = (0..m * k).map(|i| ((i * 37 + 11) % 255) as u8 as i8).collect();
    let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 + 5) % 251) as u8 as i8).collect();
    (tensor1(&a).into_shape(&[m, k]).unwrap(), tensor1(&b).into_shape(&[k, n]).unwrap())
}

fn check(mmm: &dyn MatMatMul, packing: usize, m: usize, k: usize, n: usize) -> TractResult<()> {
    let (pack_a, pack_b) = &mmm.packings()[packing];
    let (a, b) = inputs(m, k, n);
    let pa = pack_a.prepare_one(&a, 1, 0)?;
    let pb = pack_b.prepare_one(&b, 0, 1)?;
    let mut acc = Tensor::zero::<i32>(&[m, n])?;
    let matmul = || FusedSpec::AddMatMul {
        a: AsInputValue::Borrowed(&*pa),
        b: AsInputValue::Borrowed(&*pb),
        packing,
    };
    unsafe {
        let c = mmm.c_view(Some(0), Some(1)).wrap(&acc.view_mut());
        mmm.run(m, n, &[matmul(), FusedSpec::Store(c)])?;
    }
    let acc = acc.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
    for per_col in [false, true] {
        let len = if per_col { n } else { m };
        let scale: Vec<f32> = (0..len).map(|i| 1e-3 * (i as f32 + 0.37)).collect();
        let bias: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
        let (scale_t, bias_t) = (tensor1(&scale), tensor1(&bias));
        // Destination row-major ([m, n]) and column-major ([n, m], contiguous along M).
        for transposed in [false, true] {
            let shape = if transposed { [n, m] } else { [m, n] };
            let mut deq = Tensor::zero::<f32>(&shape)?;
            let (m_axis, n_axis) = if transposed { (1, 0) } else { (0, 1) };
            unsafe {
                let c = mmm.c_view(Some(m_axis), Some(n_axis)).wrap(&deq.view_mut());
                let dequant = FusedSpec::Dequant { scale: &scale_t, bias: &bias_t, per_col };
                mmm.run(m, n, &[matmul(), dequant, FusedSpec::Store(c)])?;
            }
            let found = deq.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            for row in 0..m {
                for col in 0..n {
                    let i = if per_col { col } else { row };
                    let want = acc[row * n + col] as f32 * scale[i] + bias[i];
                    let got = found[if transposed { col * m + row } else { row * n + col }];
                    ensure!(
                        want.to_bits() == got.to_bits(),
                        "{} packing {packing} m={m} k={k} n={n} per_col={per_col} \
                         transposed={transposed} at ({row},{col}): {got} != {want}",
                        mmm.name()
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn dequant_store_matches_converted_i32_store() -> TractResult<()> {
    let mut checked = 0;
    for mmm in MmmDispatch::native().runnable() {
        if mmm.internal_type() != i32::datum_type() {
            continue;
        }
        for packing in 0..mmm.packings().len() {
            let (pa, pb) = &mmm.packings()[packing];
            let i8_input = |p: &dyn MMMInputFormat| matches!(p.precursor(), WeightType::Plain(dt) if dt.unquantized() == i8::datum_type());
            if !i8_input(&**pa) || !i8_input(&**pb) {
                continue;
            }
            let (mr, nr) = (mmm.mr(), mmm.nr());
            for (m, k, n) in
                [(mr, 8, nr), (3 * mr, 13, 2 * nr), (2 * mr + 1, 64, nr + 3), (1, 4, 1)]
            {
                check(&**mmm, packing, m, k, n)?;
            }
            checked += 1;
        }
    }
    ensure!(checked > 0, "no i32 kernel with i8 packings is runnable here");
    Ok(())
}

#[test]
fn dequant_needs_a_final_f32_store() -> TractResult<()> {
    let Some(mmm) =
        MmmDispatch::native().runnable().iter().find(|m| m.internal_type() == i32::datum_type())
    else {
        return Ok(());
    };
    let scale = tensor1(&[1f32]);
    let mut c = Tensor::zero::<f32>(&[1, 1])?;
    unsafe {
        let store = mmm.c_view(Some(0), Some(1)).wrap(&c.view_mut());
        let dequant = FusedSpec::Dequant { scale: &scale, bias: &scale, per_col: false };
        let specs = [dequant, FusedSpec::ShiftLeft(1), FusedSpec::Store(store)];
        ensure!(mmm.run(1, 1, &specs).is_err());
    }
    Ok(())
}
