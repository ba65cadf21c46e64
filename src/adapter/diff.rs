//! Producing an adapter from two ONNX exports of the same architecture: the frozen base and the
//! model after fine-tuning some layers (Ultralytics `freeze=N`).
//!
//! Changed initializers become replace targets, or, on request, truncated-SVD LoRA
//! approximations of their deltas (with the reconstruction error reported per tensor). With
//! `freeze`, any change in layers `0..N` (and in the DFL, which Ultralytics always freezes) is
//! refused: it means the frozen part drifted (e.g. BatchNorm statistics updated while frozen).

use nalgebra::DMatrix;
use serde::Serialize;

use super::{
    Adapter, AdapterError, AdapterHeader, StoredDtype, Target, TargetKind, merge::lora_layout,
};
use crate::model::OnnxModel;
use crate::tensor::NamedTensor;

/// How changed weights are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Approx {
    /// The full tuned tensors.
    Replace,
    /// LoRA of this rank for every conv/linear weight (capped by its size).
    Rank(usize),
    /// The smallest rank keeping this fraction of each delta's squared singular values.
    Energy(f32),
}

/// Options of [`diff`].
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub freeze: Option<usize>,
    pub approx: Approx,
    pub name: String,
    /// Class names for the adapter; default: the tuned model's names if they differ.
    pub class_names: Option<Vec<String>>,
}

/// One changed tensor in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Changed {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TargetKind,
    pub max_abs_delta: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// `||D - B A||_F / ||D||_F` for LoRA targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_error: Option<f32>,
}

/// What [`diff`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiffReport {
    pub changed: Vec<Changed>,
    pub unchanged: usize,
}

/// Ultralytics layer index of an initializer name (`model.<i>.`), if any.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.")?.split('.').next()?.parse().ok()
}

/// Truncated SVD of the `[out, cols]` delta: returns (A `[r, cols]`, B `[out, r]`, relative
/// Frobenius error).
fn low_rank(delta: &DMatrix<f32>, approx: Approx) -> (NamedTensor, NamedTensor, f32) {
    let (out, cols) = delta.shape();
    let svd = delta.clone().svd(true, true);
    let (u, vt) = (svd.u.expect("requested"), svd.v_t.expect("requested"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|a, b| svd.singular_values[*b].total_cmp(&svd.singular_values[*a]));
    let energy: Vec<f32> = order
        .iter()
        .map(|i| svd.singular_values[*i].powi(2))
        .collect();
    let total: f32 = energy.iter().sum();
    let max_r = order.len();
    let r = match approx {
        Approx::Rank(r) => r.clamp(1, max_r),
        Approx::Energy(e) => {
            let mut acc = 0.0;
            let mut r = max_r;
            for (i, v) in energy.iter().enumerate() {
                acc += v;
                if acc >= e * total {
                    r = i + 1;
                    break;
                }
            }
            r
        }
        Approx::Replace => max_r,
    };
    let kept: f32 = energy[..r].iter().sum();
    let rel = if total > 0.0 {
        ((total - kept).max(0.0) / total).sqrt()
    } else {
        0.0
    };
    let mut a = vec![0.0; r * cols];
    let mut b = vec![0.0; out * r];
    for (k, &i) in order[..r].iter().enumerate() {
        let s = svd.singular_values[i];
        for c in 0..cols {
            a[k * cols + c] = vt[(i, c)];
        }
        for o in 0..out {
            b[o * r + k] = u[(o, i)] * s;
        }
    }
    (
        NamedTensor {
            name: String::new(),
            shape: vec![r, cols],
            data: a,
        },
        NamedTensor {
            name: String::new(),
            shape: vec![out, r],
            data: b,
        },
        rel,
    )
}

/// Compares `base` and `tuned` initializer by initializer and builds the adapter.
///
/// Fails with [`AdapterError::Mismatch`] when the two are not the same architecture (different
/// initializer names or shapes), when nothing changed, or when a frozen layer changed.
pub fn diff(
    base: &OnnxModel,
    tuned: &OnnxModel,
    opts: &DiffOptions,
) -> Result<(Adapter, DiffReport), AdapterError> {
    let mismatch = |reason: String| AdapterError::Mismatch {
        path: tuned.path().to_path_buf(),
        base: base.path().to_path_buf(),
        reason,
    };
    // Exporters may emit initializers in another order: compare by name.
    let base_shapes: std::collections::BTreeMap<String, Vec<usize>> =
        base.weight_shapes().into_iter().collect();
    let tuned_shapes: std::collections::BTreeMap<String, Vec<usize>> =
        tuned.weight_shapes().into_iter().collect();
    let bs: Vec<(String, Vec<usize>)> = base_shapes
        .iter()
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    for (name, shape) in &bs {
        match tuned_shapes.get(name) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(mismatch(format!(
                    "not the same architecture: '{name}' is {shape:?} in the base, {s:?} tuned"
                )));
            }
            None => {
                return Err(mismatch(format!(
                    "not the same architecture: the tuned model has no '{name}'"
                )));
            }
        }
    }
    let only_tuned: Vec<&String> = tuned_shapes
        .keys()
        .filter(|n| !base_shapes.contains_key(*n))
        .collect();
    let mut targets = Vec::new();
    let mut tensors = Vec::new();
    let mut report = DiffReport {
        changed: Vec::new(),
        unchanged: 0,
    };
    let mut frozen_changed = Vec::new();
    for (name, shape) in &bs {
        let (w0, w1) = (base.weight(name)?, tuned.weight(name)?);
        if w0
            .data
            .iter()
            .zip(&w1.data)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            report.unchanged += 1;
            continue;
        }
        let frozen = name.contains(".dfl.")
            || opts
                .freeze
                .zip(layer_index(name))
                .is_some_and(|(n, i)| i < n);
        if frozen {
            frozen_changed.push(name.clone());
            continue;
        }
        let delta: Vec<f32> = w1.data.iter().zip(&w0.data).map(|(t, b)| t - b).collect();
        let max_abs_delta = delta.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let layout = lora_layout(shape, base.weight_use(name)).ok();
        let lora = match (opts.approx, layout) {
            (Approx::Replace, _) | (_, None) => None,
            (approx, Some((out, cols, transposed))) => {
                let d = if transposed {
                    DMatrix::from_fn(out, cols, |o, c| delta[c * out + o])
                } else {
                    DMatrix::from_row_slice(out, cols, &delta)
                };
                let (a, b, rel) = low_rank(&d, approx);
                let r = a.shape[0];
                // Only worth it when the factors are smaller than the tensor.
                (r * (out + cols) < out * cols).then_some((a, b, rel, r))
            }
        };
        match lora {
            Some((a, b, rel, r)) => {
                tensors.push(NamedTensor {
                    name: format!("{name}.lora_A"),
                    ..a
                });
                tensors.push(NamedTensor {
                    name: format!("{name}.lora_B"),
                    ..b
                });
                targets.push(Target {
                    name: name.clone(),
                    kind: TargetKind::Lora,
                    rank: Some(r),
                    alpha: None,
                    scale: Some(1.0),
                    channel_scale: false,
                });
                report.changed.push(Changed {
                    name: name.clone(),
                    shape: shape.clone(),
                    kind: TargetKind::Lora,
                    max_abs_delta,
                    rank: Some(r),
                    relative_error: Some(rel),
                });
            }
            None => {
                tensors.push(NamedTensor {
                    name: format!("{name}.replace"),
                    shape: shape.clone(),
                    data: w1.data,
                });
                targets.push(Target {
                    name: name.clone(),
                    kind: TargetKind::Replace,
                    rank: None,
                    alpha: None,
                    scale: None,
                    channel_scale: false,
                });
                report.changed.push(Changed {
                    name: name.clone(),
                    shape: shape.clone(),
                    kind: TargetKind::Replace,
                    max_abs_delta,
                    rank: None,
                    relative_error: None,
                });
            }
        }
    }
    if !frozen_changed.is_empty() {
        frozen_changed.sort();
        let n = frozen_changed.len();
        frozen_changed.truncate(3);
        return Err(mismatch(format!(
            "{n} tensors of frozen layers changed (e.g. {}): BatchNorm statistics drifted during training, or base and tuned were exported from different precisions (Ultralytics checkpoints are float16: export both from .pt files)",
            frozen_changed.join(", ")
        )));
    }
    if !only_tuned.is_empty() {
        let names: Vec<&str> = only_tuned.iter().take(3).map(|s| s.as_str()).collect();
        return Err(mismatch(format!(
            "the tuned model has initializers the base lacks ({}): the base export shares one constant between layers that training made different; export the base with simplify=False",
            names.join(", ")
        )));
    }
    if targets.is_empty() {
        return Err(mismatch(
            "no initializer differs: nothing to put in an adapter".into(),
        ));
    }
    let class_names = opts.class_names.clone().or_else(|| {
        let (b, t) = (&base.metadata().names, &tuned.metadata().names);
        (t.is_some() && t != b).then(|| t.clone()).flatten()
    });
    let header = AdapterHeader {
        format: super::FORMAT.into(),
        version: super::VERSION,
        kind: super::kind_of(&targets),
        name: opts.name.clone(),
        base_fingerprint: base.fingerprint(),
        targets,
        class_names,
        producer: format!(
            "perch {} adapter diff ({:?})",
            env!("CARGO_PKG_VERSION"),
            opts.approx
        ),
        created: super::now_rfc3339(),
        dtype: StoredDtype::F32,
        calibration: None,
    };
    let adapter = Adapter::new(header, tensors, tuned.path())?;
    Ok((adapter, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.23.cv2.0.2.weight"), Some(23));
        assert_eq!(layer_index("model.0.conv.weight"), Some(0));
        assert_eq!(layer_index("onnx::Split_186"), None);
    }

    #[test]
    fn svd_recovers_an_exact_low_rank_delta() {
        // Rank-2 6x5 matrix.
        let u = DMatrix::from_fn(6, 2, |i, j| {
            (i as f32 + 1.0) * if j == 0 { 1.0 } else { -0.5 } + j as f32
        });
        let v = DMatrix::from_fn(2, 5, |i, j| ((i * 5 + j) as f32).sin());
        let d = &u * &v;
        let (a, b, rel) = low_rank(&d, Approx::Energy(0.999_999));
        assert_eq!(a.shape[0], 2, "energy picks the true rank");
        assert!(rel < 1e-3, "{rel}");
        let rebuilt =
            DMatrix::from_row_slice(6, 2, &b.data) * DMatrix::from_row_slice(2, 5, &a.data);
        assert!((rebuilt - &d).abs().max() < 1e-4);
        let (a1, _, rel1) = low_rank(&d, Approx::Rank(1));
        assert_eq!(a1.shape[0], 1);
        assert!(
            rel1 > 0.01,
            "a rank-1 cut of a rank-2 matrix loses energy: {rel1}"
        );
    }
}
