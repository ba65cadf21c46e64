//! int8 quantization of an ONNX detector on its protobuf, before tract parses it.
//!
//! Each quantizable `Conv` (float weights in an initializer, one group, output consumed by an
//! activation) becomes
//! `QuantizeLinear(x, s_x, 0) -> ConvInteger(x_q, w_q) -> Cast(f32) -> Mul(s_x * s_w[c]) -> Add(b)`
//! with symmetric int8 weights, one scale per output channel, and a symmetric int8 activation
//! scale `s_x = absmax(x) / 127` taken from a [`Calibration`]. tract runs `ConvInteger` with its
//! integer matrix kernels and fuses the dequantizing `Mul`/`Add`. Convs whose output is not
//! activated (the detection head's final box/class convs and the DFL projection) stay float:
//! their outputs are the raw scores and box distances, which are the most sensitive to
//! rounding.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::path::Path;

use tract_onnx::pb;

use super::ModelError;
use super::weights::{FLOAT, f32_values};

const INT8: i32 = 3;

/// Activation ranges measured on calibration images, by ONNX tensor name.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    /// Format version (1).
    pub version: u32,
    /// Weight fingerprint of the (merged) model the ranges were measured on.
    pub model_fingerprint: String,
    /// How many images were run.
    pub images: usize,
    /// Largest absolute value seen per Conv input tensor.
    pub absmax: BTreeMap<String, f32>,
}

impl Calibration {
    /// Reads a calibration file written by [`Calibration::save`].
    ///
    /// Fails with [`ModelError::Io`] when it cannot be read and [`ModelError::Unsupported`]
    /// (naming the file) when it is not a valid version-1 calibration.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes =
            crate::fsutil::read_limited(path, crate::fsutil::MAX_TEXT_BYTES).map_err(|source| {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let bad = |reason: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("not a perch calibration: {reason}"),
        };
        let cal: Calibration = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        cal.validate().map_err(bad)?;
        Ok(cal)
    }

    /// Checks the version and that every range is finite and non-negative; the error says
    /// which tensor is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!("version {} (this perch reads 1)", self.version));
        }
        if let Some((name, v)) = self
            .absmax
            .iter()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(format!("range of '{name}' is {v}"));
        }
        Ok(())
    }

    /// Writes the calibration as JSON (atomically: temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| io(e.into()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// Activation ops that mark a Conv as an inner (quantizable) layer.
const ACTIVATIONS: [&str; 7] = [
    "Sigmoid",
    "Relu",
    "LeakyRelu",
    "HardSwish",
    "HardSigmoid",
    "Clip",
    "Silu",
];

fn is_default_domain(n: &pb::NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The Conv nodes int8 applies to, as indices into `graph.node`.
pub(super) fn quantizable_convs(graph: &pb::GraphProto) -> Vec<usize> {
    let inits: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let consumers = super::consumer_ops(graph);
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type == "Conv"
                && is_default_domain(n)
                && (2..=3).contains(&n.input.len())
                && n.output.len() == 1
                && n.attribute.iter().all(|a| a.name != "group" || a.i == 1)
                && inits
                    .get(n.input[1].as_str())
                    .is_some_and(|w| w.data_type == FLOAT && w.dims.len() == 4)
                && n.input
                    .get(2)
                    .is_none_or(|b| inits.get(b.as_str()).is_some_and(|b| b.data_type == FLOAT))
                && consumers
                    .get(n.output[0].as_str())
                    .is_some_and(|c| c.iter().any(|op| ACTIVATIONS.contains(op)))
        })
        .map(|(ix, _)| ix)
        .collect()
}

/// Names of the tensors a calibration must measure: the inputs of the quantizable Convs.
pub(super) fn calibration_tensors(graph: &pb::GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    quantizable_convs(graph)
        .into_iter()
        .map(|ix| graph.node[ix].input[0].clone())
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

fn tensor(name: String, dims: Vec<i64>, data_type: i32, raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name,
        dims,
        data_type,
        raw_data: raw,
        ..Default::default()
    }
}

fn f32_tensor(name: String, dims: Vec<i64>, v: &[f32]) -> pb::TensorProto {
    tensor(
        name,
        dims,
        FLOAT,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: vec![output],
        ..Default::default()
    }
}

/// Symmetric per-output-channel int8 weights: `(w_q, scales)` with `w ≈ w_q * scale[c]`.
/// An all-zero channel gets scale 1 (its quantized weights are all zero anyway).
pub(super) fn quantize_weights(w: &[f32], out_channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per = w.len() / out_channels.max(1);
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(out_channels);
    for c in w.chunks(per.max(1)) {
        let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if max > 0.0 { max / 127.0 } else { 1.0 };
        q.extend(
            c.iter()
                .map(|v| (v / s).round_ties_even().clamp(-127.0, 127.0) as i8),
        );
        scales.push(s);
    }
    (q, scales)
}

/// Rewrites every quantizable Conv whose input has a calibrated range into the integer form
/// described in the module documentation. Returns how many Convs were rewritten; Convs without
/// a range, or with a zero or non-finite one, stay float.
pub(super) fn quantize(proto: &mut pb::ModelProto, cal: &Calibration) -> usize {
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    let targets: HashSet<usize> = quantizable_convs(graph).into_iter().collect();
    let inits: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(ix, t)| (t.name.clone(), ix))
        .collect();
    let mut new_inits = Vec::new();
    let mut quantized_inputs: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(graph.node.len());
    let mut count = 0;
    for (ix, n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        let x = n.input.first().cloned().unwrap_or_default();
        let range = cal.absmax.get(&x).copied();
        let (Some(range), true) = (range, targets.contains(&ix)) else {
            out.push(n);
            continue;
        };
        if !(range.is_finite() && range > 0.0) {
            out.push(n);
            continue;
        }
        let w_init = &graph.initializer[inits[&n.input[1]]];
        let Some(w) = f32_values(w_init) else {
            out.push(n);
            continue;
        };
        let bias = match n.input.get(2) {
            Some(b) => match f32_values(&graph.initializer[inits[b]]) {
                Some(v) => Some(v),
                None => {
                    out.push(n);
                    continue;
                }
            },
            None => None,
        };
        let out_channels = w_init.dims[0].max(1) as usize;
        if w.is_empty() || !w.len().is_multiple_of(out_channels) {
            out.push(n);
            continue;
        }
        let s_x = range / 127.0;
        let (w_q, s_w) = quantize_weights(&w, out_channels);
        let base = if n.name.is_empty() {
            format!("perch_q{ix}")
        } else {
            n.name.clone()
        };
        let t = |s: &str| format!("{base}/perch_{s}");
        // One QuantizeLinear per distinct input tensor (C2f/C3k2 splits feed several Convs).
        let x_q = match quantized_inputs.get(&x) {
            Some(q) => q.clone(),
            None => {
                let q = format!("{x}/perch_q");
                new_inits.push(f32_tensor(format!("{q}_scale"), vec![], &[s_x]));
                new_inits.push(tensor(format!("{q}_zero"), vec![], INT8, vec![0]));
                out.push(node(
                    "QuantizeLinear",
                    q.clone(),
                    vec![x.clone(), format!("{q}_scale"), format!("{q}_zero")],
                    q.clone(),
                ));
                quantized_inputs.insert(x.clone(), q.clone());
                q
            }
        };
        new_inits.push(tensor(
            t("w_q"),
            w_init.dims.clone(),
            INT8,
            w_q.iter().map(|v| *v as u8).collect(),
        ));
        let mut conv = node("ConvInteger", t("conv"), vec![x_q, t("w_q")], t("acc"));
        conv.attribute = n.attribute.clone();
        out.push(conv);
        let mut cast = node("Cast", t("cast"), vec![t("acc")], t("acc_f"));
        cast.attribute.push(pb::AttributeProto {
            name: "to".into(),
            r#type: 2,
            i: FLOAT as i64,
            ..Default::default()
        });
        out.push(cast);
        let oc = out_channels as i64;
        let scales: Vec<f32> = s_w.iter().map(|s| s * s_x).collect();
        new_inits.push(f32_tensor(t("scale"), vec![1, oc, 1, 1], &scales));
        let y = n.output[0].clone();
        match bias {
            Some(b) => {
                out.push(node(
                    "Mul",
                    t("dequant"),
                    vec![t("acc_f"), t("scale")],
                    t("deq"),
                ));
                new_inits.push(f32_tensor(t("bias"), vec![1, oc, 1, 1], &b));
                out.push(node("Add", t("bias_add"), vec![t("deq"), t("bias")], y));
            }
            None => out.push(node("Mul", t("dequant"), vec![t("acc_f"), t("scale")], y)),
        }
        count += 1;
    }
    graph.node = out;
    graph.initializer.extend(new_inits);
    count
}

/// Adds `names` as extra float graph outputs (shapes left to inference), for calibration.
pub(super) fn expose(proto: &mut pb::ModelProto, names: &[String]) {
    use pb::type_proto::{Tensor, Value};
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    for name in names {
        graph.output.push(pb::ValueInfoProto {
            name: name.clone(),
            r#type: Some(pb::TypeProto {
                value: Some(Value::TensorType(Tensor {
                    elem_type: FLOAT,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_outputs_stay_float_and_every_calibrated_conv_becomes_integer() {
        use tract_onnx::prelude::*;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut proto = onnx()
            .proto_model_for_path(root.join("models/tree-yolo11n-320.onnx"))
            .unwrap();
        let graph = proto.graph.as_ref().unwrap();
        let convs = graph.node.iter().filter(|n| n.op_type == "Conv").count();
        let picked: Vec<String> = quantizable_convs(graph)
            .into_iter()
            .map(|ix| graph.node[ix].name.clone())
            .collect();
        // YOLO11n: 88 Convs. Left float: the grouped (depthwise) ones and those without an
        // activation (attention projections, the 6 final box/class convs, the DFL projection).
        assert_eq!((convs, picked.len()), (88, 71), "{picked:?}");
        for p in &picked {
            assert!(
                !p.contains("dfl") && !p.contains("cv2.0.2") && !p.contains("cv3.2.2"),
                "{p}"
            );
        }
        let inputs = calibration_tensors(graph);
        let cal = Calibration {
            version: 1,
            model_fingerprint: String::new(),
            images: 1,
            absmax: inputs.iter().map(|n| (n.clone(), 4.0)).collect(),
        };
        assert_eq!(quantize(&mut proto, &cal), 71);
        let graph = proto.graph.as_ref().unwrap();
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("ConvInteger"), 71);
        assert_eq!(count("Conv"), 17);
        // One QuantizeLinear per distinct input, shared by the Convs reading it.
        assert_eq!(count("QuantizeLinear"), inputs.len());
        // Without a range a Conv stays float.
        let mut proto = onnx()
            .proto_model_for_path(root.join("models/tree-yolo11n-320.onnx"))
            .unwrap();
        let empty = Calibration {
            absmax: Default::default(),
            ..cal
        };
        assert_eq!(quantize(&mut proto, &empty), 0);
    }

    #[test]
    fn per_channel_weights_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..2 * 9)
            .map(|i| {
                if i < 9 {
                    i as f32 * 0.1 - 0.4
                } else {
                    (i as f32).sin() * 3.0
                }
            })
            .collect();
        let (q, s) = quantize_weights(&w, 2);
        assert_eq!(s.len(), 2);
        assert!((s[0] - 0.4 / 127.0).abs() < 1e-9, "{s:?}");
        for (i, (v, q)) in w.iter().zip(&q).enumerate() {
            let sc = s[i / 9];
            assert!(
                (v - *q as f32 * sc).abs() <= sc / 2.0 + 1e-7,
                "{i}: {v} vs {q}*{sc}"
            );
        }
        assert!(q.iter().all(|v| (-127..=127).contains(v)));
        // A channel's extreme maps to ±127 exactly.
        assert!(q[..9].contains(&127) || q[..9].contains(&-127));
        let (q, s) = quantize_weights(&[0.0; 4], 1);
        assert_eq!((q, s), (vec![0; 4], vec![1.0]));
    }
}
