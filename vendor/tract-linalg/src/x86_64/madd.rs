// A-side packing for `avx2madd_mmm_i32_8x8`, the AVX2 int8 kernel built on VPMADDWD.
//
// VPMADDWD multiplies i16 pairs and adds each pair into an i32 lane, so it is exact for any
// i8 operands (|a*b + c*d| <= 2^15). The kernel broadcasts one pair of A per row and
// sign-extends the B block (PackedI8K4, K=4 inner) in place, which yields, per B lane n, the
// pairs (B[n,k0], B[n,k2]) and (B[n,k1], B[n,k3]). A is therefore stored widened to i16, per
// K=4 block and row m, as [A[m,k0], A[m,k2], A[m,k1], A[m,k3]] (8 bytes a row, 8r bytes a
// block). A is the weight side of a convolution, packed once, so the widening costs nothing
// per inference. K is zero-padded to a multiple of 4, M to a multiple of r.

use tract_data::internal::*;

use crate::WeightType;
use crate::frame::mmm::{
    EagerPackedInput, MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};

/// i8 matrix packed K=4-inner and widened to i16, in the (k0, k2, k1, k3) order that
/// `avx2madd_mmm_i32_8x8` consumes. See the module comment.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PackedI8K4Wide {
    pub r: usize,
    pub align: usize,
}

/// Position of k % 4 within a row's four i16 of one K=4 block.
const SLOT: [usize; 4] = [0, 2, 1, 3];

impl PackedI8K4Wide {
    pub fn new(r: usize) -> Self {
        PackedI8K4Wide { r, align: 32 }
    }
    /// Bytes of one panel of `r` rows.
    fn panel(&self, k: usize) -> usize {
        k.div_ceil(4) * 4 * self.r * 2
    }
    pub fn single_panel_len(&self, k: usize) -> usize {
        self.panel(k)
    }
    pub fn alignment(&self) -> usize {
        self.align
    }

    pub fn pack_view(
        &self,
        t: &TensorView,
        k_axis: usize,
        mn_axis: usize,
    ) -> TractResult<Box<dyn MMMInputValue>> {
        ensure!(k_axis != mn_axis, "k_axis and mn_axis must differ (both are {k_axis})");
        ensure!(t.datum_type().size_of() == 1, "{self} packs 8-bit integers, got {:?}", t.datum_type());
        let k = t.shape()[k_axis];
        let mn = t.shape()[mn_axis];
        let pl = self.panel(k);
        let panels = mn.div_ceil(self.r);
        let st = t.strides();
        let (ks, ms) = (st[k_axis], st[mn_axis]);
        let mut blob = unsafe { Blob::new_for_size_and_align(panels * pl, self.align) };
        blob.as_bytes_mut().fill(0);
        unsafe {
            let src = t.as_ptr_unchecked::<i8>();
            let dst = blob.as_mut_ptr() as *mut i16;
            for p in 0..panels {
                let pw = self.r.min(mn - p * self.r);
                let panel = dst.add(p * pl / 2);
                let mn0 = (p * self.r) as isize;
                for kk in 0..k {
                    let block = panel.add((kk / 4) * self.r * 4 + SLOT[kk % 4]);
                    let srow = src.offset(kk as isize * ks + mn0 * ms);
                    for lm in 0..pw {
                        *block.add(lm * 4) = *srow.offset(lm as isize * ms) as i16;
                    }
                }
            }
        }
        Ok(Box::new(EagerPackedInput {
            fact: PackedExoticFact { format: Box::new(self.clone()), mn: mn.to_dim(), k },
            packed: blob.into(),
            panel_bytes: pl,
            mn,
        }))
    }
}

impl std::fmt::Display for PackedI8K4Wide {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "I8K4Wide[{}]", self.r)
    }
}

impl MMMInputFormat for PackedI8K4Wide {
    fn prepare_tensor(&self, t: &Tensor, k_axis: usize, mn_axis: usize) -> TractResult<Tensor> {
        Ok(PackedMatrixStorage::new(self.prepare_one(t, k_axis, mn_axis)?)
            .into_tensor(t.datum_type()))
    }
    fn prepare_one_view(
        &self,
        t: &TensorView,
        k_axis: usize,
        mn_axis: usize,
    ) -> TractResult<Box<dyn MMMInputValue>> {
        self.pack_view(t, k_axis, mn_axis)
    }
    fn precursor(&self) -> WeightType {
        WeightType::Plain(i8::datum_type())
    }
    fn r(&self) -> usize {
        self.r
    }
    fn k_alignment(&self) -> usize {
        4
    }
    fn merge_with<'o, 'a: 'o, 'b: 'o>(
        &'a self,
        o: &'b dyn MMMInputFormat,
    ) -> Option<&'o dyn MMMInputFormat> {
        o.downcast_ref::<PackedI8K4Wide>().filter(|x| x.r == self.r).map(|_| self as _)
    }
    fn mem_size(&self, k: TDim, mn: TDim) -> TDim {
        mn.divceil(self.r) * self.panel(k.to_usize().unwrap_or(0))
    }
    fn extract_at_mn_f16(&self, _: &EagerPackedInput, _: usize, _: &mut [f16]) -> TractResult<()> {
        bail!("no f16 extract")
    }
    fn extract_at_mn_f32(&self, _: &EagerPackedInput, _: usize, _: &mut [f32]) -> TractResult<()> {
        bail!("no f32 extract")
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::frame::mmm::input_store::view_check::view_matches_tensor;

    #[test]
    fn packed_i8k4_wide_view() -> TractResult<()> {
        view_matches_tensor(&PackedI8K4Wide::new(8), 64, 48)?;
        view_matches_tensor(&PackedI8K4Wide::new(8), 5, 7)
    }

    #[test]
    fn packed_i8k4_wide_layout() -> TractResult<()> {
        // 2 rows x 5 k, r = 8: one panel, two K=4 blocks (the second padded with zeros).
        let a = tensor2(&[[1i8, 2, 3, 4, 5], [-1, -2, -3, -4, -128]]);
        let packed = PackedI8K4Wide::new(8).prepare_one(&a, 1, 0)?;
        let packed = packed.downcast_ref::<EagerPackedInput>().unwrap();
        let v: &[i16] = unsafe {
            std::slice::from_raw_parts(packed.packed.as_ptr() as *const i16, packed.packed.len() / 2)
        };
        assert_eq!(v.len(), 2 * 8 * 4);
        assert_eq!(&v[0..8], &[1, 3, 2, 4, -1, -3, -2, -4]);
        assert!(v[8..32].iter().all(|x| *x == 0));
        assert_eq!(&v[32..40], &[5, 0, 0, 0, -128, 0, 0, 0]);
        assert!(v[40..].iter().all(|x| *x == 0));
        Ok(())
    }
}
