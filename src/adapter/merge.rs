//! Merging an adapter into a base model's initializers (the math is plain `f32` loops).

use super::{Adapter, AdapterError, TargetKind};
use crate::model::OnnxModel;
use crate::tensor::{NamedTensor, WeightUse};

/// Where the rows (`out`) and columns (`in * kh * kw`) of `B @ A` land in a weight used as
/// `use_`: returns `(out, cols, transposed)`, or why a low-rank delta cannot apply.
pub fn lora_layout(shape: &[usize], use_: WeightUse) -> Result<(usize, usize, bool), String> {
    match (use_, shape) {
        (WeightUse::Conv { .. }, [out, rest @ ..]) if !rest.is_empty() => {
            Ok((*out, rest.iter().product(), false))
        }
        (WeightUse::Gemm { trans_b: true }, [out, cols]) => Ok((*out, *cols, false)),
        (WeightUse::Gemm { trans_b: false } | WeightUse::MatMul, [cols, out]) => {
            Ok((*out, *cols, true))
        }
        (WeightUse::Other, _) => {
            Err("is not the weight of a Conv, Gemm or MatMul (LoRA needs one)".into())
        }
        (_, s) => Err(format!(
            "has shape {s:?}, which does not fit its {use_:?} use"
        )),
    }
}

/// Adds `scale * channel_scale[o] * (B @ A)` to `w` in place.
///
/// `a` is `[r, cols]`, `b` is `[out, r]`; `w` must hold `out * cols` values laid out as
/// [`lora_layout`] says. For a grouped convolution the columns are the `in / group * kh * kw`
/// inputs of each output channel's own group, so a delta trained on that shape is exact; one of
/// another width is refused by the shape check.
pub fn add_lora(
    w: &mut NamedTensor,
    use_: WeightUse,
    a: &NamedTensor,
    b: &NamedTensor,
    scale: f32,
    channel_scale: Option<&[f32]>,
) -> Result<(), String> {
    let (out, cols, transposed) = lora_layout(&w.shape, use_)?;
    let r = a.shape[0];
    if r > out.max(cols) {
        // Bounds the merge cost (out * in * r) by the weight's own size; PEFT ranks above
        // min(out, in) occur (e.g. r = 8 on a 1-class conv) and are accepted.
        return Err(format!(
            "LoRA rank {r} exceeds max(out, in) = {} of weight {:?}",
            out.max(cols),
            w.shape
        ));
    }
    if a.shape != [r, cols] || b.shape != [out, r] {
        return Err(format!(
            "LoRA A {:?} / B {:?} do not fit weight {:?} used as {use_:?} (expected A [r, {cols}], B [{out}, r])",
            a.shape, b.shape, w.shape
        ));
    }
    for o in 0..out {
        let s = scale * channel_scale.map_or(1.0, |c| c[o]);
        let brow = &b.data[o * r..(o + 1) * r];
        for c in 0..cols {
            let mut acc = 0.0f32;
            for (k, bv) in brow.iter().enumerate() {
                acc += bv * a.data[k * cols + c];
            }
            let idx = if transposed {
                c * out + o
            } else {
                o * cols + c
            };
            w.data[idx] += s * acc;
        }
    }
    Ok(())
}

/// Number of classes a base model declares (from its `names` metadata), if known.
fn base_classes(base: &OnnxModel) -> Option<usize> {
    base.metadata().names.as_ref().map(Vec::len)
}

/// Largest adapter scale (strength) the command line, the configuration and the control socket
/// accept, in absolute value.
pub const MAX_STRENGTH: f32 = 10.0;

/// Checks that `adapter` was made for `base` and computes the merged weights: the base's
/// fingerprint must match, every target must exist with compatible shapes, class names must
/// keep the class count. `strength` multiplies every LoRA delta (1 = as trained; replace
/// targets ignore it) and must be finite ([`AdapterError::Invalid`] naming the adapter
/// otherwise). The base is not modified.
pub fn merged_weights(
    base: &OnnxModel,
    adapter: &Adapter,
    strength: f32,
) -> Result<Vec<NamedTensor>, AdapterError> {
    let mismatch = |reason: String| AdapterError::Mismatch {
        path: adapter.path().to_path_buf(),
        base: base.path().to_path_buf(),
        reason,
    };
    if !strength.is_finite() {
        return Err(AdapterError::Invalid {
            path: adapter.path().to_path_buf(),
            reason: format!("scale {strength} is not a finite number"),
        });
    }
    let fp = base.fingerprint();
    if adapter.header.base_fingerprint != fp {
        return Err(mismatch(format!(
            "made for base weights {} but this base is {fp}",
            adapter.header.base_fingerprint
        )));
    }
    if let (Some(names), Some(n)) = (&adapter.header.class_names, base_classes(base))
        && names.len() != n
    {
        return Err(mismatch(format!(
            "adapter names {} classes, the base has {n}",
            names.len()
        )));
    }
    let mut out = Vec::with_capacity(adapter.header.targets.len());
    for t in &adapter.header.targets {
        let consumers = base.weight_consumers(&t.name);
        if consumers > 1 {
            return Err(mismatch(format!(
                "'{}' is shared by {consumers} nodes (the exporter deduplicated equal constants); changing it would change all of them",
                t.name
            )));
        }
        let mut w = base.weight(&t.name).map_err(|e| match e {
            crate::model::ModelError::Unsupported { reason, .. } => mismatch(reason),
            other => mismatch(other.to_string()),
        })?;
        match t.kind {
            TargetKind::Replace => {
                let r = adapter.tensor(&t.name, "replace").expect("validated");
                if r.shape != w.shape {
                    return Err(mismatch(format!(
                        "'{}' is {:?} in the base, {:?} in the adapter",
                        t.name, w.shape, r.shape
                    )));
                }
                w.data.clone_from(&r.data);
            }
            TargetKind::Lora => {
                let a = adapter.tensor(&t.name, "lora_A").expect("validated");
                let b = adapter.tensor(&t.name, "lora_B").expect("validated");
                let cs = adapter
                    .tensor(&t.name, "channel_scale")
                    .map(|c| c.data.as_slice());
                let scale = t.scale.expect("validated") * strength;
                add_lora(&mut w, base.weight_use(&t.name), a, b, scale, cs)
                    .map_err(|e| mismatch(format!("'{}' {e}", t.name)))?;
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// The base with `adapter` merged in (see [`merged_weights`]); the adapter's class names, if
/// any, replace the base's `names` metadata.
pub fn apply(
    base: &OnnxModel,
    adapter: &Adapter,
    strength: f32,
) -> Result<OnnxModel, AdapterError> {
    let weights = merged_weights(base, adapter, strength)?;
    Ok(base.with_weights(&weights, adapter.header.class_names.as_deref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize], data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn conv_delta_is_b_times_a_reshaped() {
        // W [2 out, 1 in, 1, 2], r = 1.
        let mut w = t("w", &[2, 1, 1, 2], vec![0.0; 4]);
        let a = t("a", &[1, 2], vec![1.0, 2.0]);
        let b = t("b", &[2, 1], vec![10.0, -1.0]);
        add_lora(
            &mut w,
            WeightUse::Conv { group: 1 },
            &a,
            &b,
            0.5,
            Some(&[1.0, 2.0]),
        )
        .unwrap();
        assert_eq!(w.data, vec![5.0, 10.0, -1.0, -2.0]);
    }

    #[test]
    fn matmul_and_gemm_orientation() {
        let a = t("a", &[1, 3], vec![1.0, 2.0, 3.0]);
        let b = t("b", &[2, 1], vec![1.0, 10.0]);
        // MatMul weight is [in, out]: W[c][o] += B[o] A[c].
        let mut w = t("w", &[3, 2], vec![0.0; 6]);
        add_lora(&mut w, WeightUse::MatMul, &a, &b, 1.0, None).unwrap();
        assert_eq!(w.data, vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        let mut g = t("w", &[2, 3], vec![0.0; 6]);
        add_lora(&mut g, WeightUse::Gemm { trans_b: true }, &a, &b, 1.0, None).unwrap();
        assert_eq!(g.data, vec![1.0, 2.0, 3.0, 10.0, 20.0, 30.0]);
    }

    #[test]
    fn grouped_conv_needs_per_group_width() {
        // Depthwise 4 channels, 3x3: W [4, 1, 3, 3] -> A must have 9 columns, not 36.
        let mut w = t("w", &[4, 1, 3, 3], vec![0.0; 36]);
        let b = t("b", &[4, 2], vec![1.0; 8]);
        let ok = t("a", &[2, 9], vec![1.0; 18]);
        add_lora(&mut w, WeightUse::Conv { group: 4 }, &ok, &b, 1.0, None).unwrap();
        assert!(w.data.iter().all(|v| *v == 2.0));
        let dense = t("a", &[2, 36], vec![1.0; 72]);
        let e = add_lora(&mut w, WeightUse::Conv { group: 4 }, &dense, &b, 1.0, None).unwrap_err();
        assert!(e.contains("expected A [r, 9]"), "{e}");
    }

    #[test]
    fn absurd_ranks_are_refused() {
        let mut w = t("w", &[2, 3], vec![0.0; 6]);
        let b3 = t("b", &[2, 3], vec![1.0; 6]);
        add_lora(
            &mut w,
            WeightUse::Gemm { trans_b: true },
            &t("a", &[3, 3], vec![1.0; 9]),
            &b3,
            1.0,
            None,
        )
        .unwrap();
        let b4 = t("b", &[2, 4], vec![1.0; 8]);
        let e = add_lora(
            &mut w,
            WeightUse::Gemm { trans_b: true },
            &t("a", &[4, 3], vec![1.0; 12]),
            &b4,
            1.0,
            None,
        )
        .unwrap_err();
        assert!(e.contains("rank 4 exceeds max(out, in) = 3"), "{e}");
    }

    #[test]
    fn bias_is_not_a_lora_target() {
        let mut w = t("bias", &[4], vec![0.0; 4]);
        let e = add_lora(
            &mut w,
            WeightUse::Other,
            &t("a", &[1, 1], vec![1.0]),
            &t("b", &[4, 1], vec![1.0; 4]),
            1.0,
            None,
        );
        assert!(e.unwrap_err().contains("not the weight"));
    }
}
