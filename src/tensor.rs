//! Plain named tensors: the only data type the model and adapter modules exchange.

/// A dense row-major `f32` tensor with the name of the ONNX initializer (or adapter entry) it
/// belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// Number of elements implied by the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How the graph consumes a weight initializer, which decides how a low-rank delta
/// `B @ A` (`[out, in]`) is laid onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightUse {
    /// Input 1 of a `Conv` with this `group` attribute: `[out, in / group, kh, kw]`.
    Conv { group: usize },
    /// Input 1 of a `Gemm`: `[out, in]` when `trans_b`, else `[in, out]`.
    Gemm { trans_b: bool },
    /// Input 1 of a `MatMul`: `[in, out]`.
    MatMul,
    /// A bias or any other use: only replaced, never low-rank merged.
    Other,
}
