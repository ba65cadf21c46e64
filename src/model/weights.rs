//! Reading, fingerprinting and replacing the float initializers of an [`OnnxModel`], on the
//! protobuf, before tract parses it (tract would deduplicate equal constants and rename them).

use std::path::Path;

use prost::Message;
use sha2::{Digest, Sha256};
use tract_onnx::pb;

use super::{ModelError, OnnxModel};
use crate::tensor::{NamedTensor, WeightUse};

/// ONNX `TensorProto.DataType` of f32.
pub(super) const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

/// A tensor's dimensions (negative ones read as 0).
pub(super) fn dims(t: &pb::TensorProto) -> Vec<usize> {
    t.dims.iter().map(|d| (*d).max(0) as usize).collect()
}

pub(super) fn f32_values(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != FLOAT || t.data_location == Some(1) {
        return None;
    }
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return None;
        }
        Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    } else {
        Some(t.float_data.clone())
    }
}

impl OnnxModel {
    fn initializers(&self) -> &[pb::TensorProto] {
        self.proto.graph.as_ref().map_or(&[], |g| &g.initializer)
    }

    fn initializer(&self, name: &str) -> Option<&pb::TensorProto> {
        self.initializers().iter().find(|t| t.name == name)
    }

    /// Names and shapes of all `f32` initializers, in graph order.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.initializers()
            .iter()
            .filter(|t| t.data_type == FLOAT)
            .map(|t| (t.name.clone(), dims(t)))
            .collect()
    }

    /// The `f32` initializer `name` as a plain tensor.
    ///
    /// Fails with [`ModelError::Unsupported`] when it does not exist or is not stored inline as
    /// `f32` (half-precision or external-data exports cannot take adapters).
    pub fn weight(&self, name: &str) -> Result<NamedTensor, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            path: self.path.clone(),
            reason,
        };
        let t = self
            .initializer(name)
            .ok_or_else(|| unsupported(format!("no initializer named '{name}'")))?;
        let data = f32_values(t).ok_or_else(|| {
            let kind = if t.data_type == FLOAT16 {
                "float16"
            } else {
                "not inline float32"
            };
            unsupported(format!(
                "initializer '{name}' is {kind}; adapters need float32 weights"
            ))
        })?;
        let shape = dims(t);
        if data.len() != shape.iter().product::<usize>() {
            return Err(unsupported(format!(
                "initializer '{name}' holds {} values for shape {shape:?}",
                data.len()
            )));
        }
        Ok(NamedTensor {
            name: name.to_string(),
            shape,
            data,
        })
    }

    /// Number of graph nodes that read initializer `name` (exporters deduplicate equal constants,
    /// so one initializer can feed several layers).
    pub fn weight_consumers(&self, name: &str) -> usize {
        self.proto.graph.as_ref().map_or(0, |g| {
            g.node
                .iter()
                .filter(|n| n.input.iter().any(|i| i == name))
                .count()
        })
    }

    /// How the graph uses initializer `name` (the first consumer decides).
    pub fn weight_use(&self, name: &str) -> WeightUse {
        let Some(graph) = self.proto.graph.as_ref() else {
            return WeightUse::Other;
        };
        for node in &graph.node {
            if node.input.get(1).map(String::as_str) != Some(name) {
                continue;
            }
            let int_attr = |a: &str, default: i64| {
                node.attribute
                    .iter()
                    .find(|x| x.name == a)
                    .map_or(default, |x| x.i)
            };
            return match node.op_type.as_str() {
                "Conv" => WeightUse::Conv {
                    group: int_attr("group", 1).max(1) as usize,
                },
                "Gemm" => WeightUse::Gemm {
                    trans_b: int_attr("transB", 0) != 0,
                },
                "MatMul" => WeightUse::MatMul,
                _ => WeightUse::Other,
            };
        }
        WeightUse::Other
    }

    /// `sha256:<hex>` over every initializer's name, type, shape and bytes, sorted by name.
    /// Metadata, graph structure and producer strings do not change it.
    pub fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| self.compute_fingerprint())
            .clone()
    }

    fn compute_fingerprint(&self) -> String {
        let mut inits: Vec<&pb::TensorProto> = self.initializers().iter().collect();
        inits.sort_by(|a, b| a.name.cmp(&b.name));
        let mut h = Sha256::new();
        for t in inits {
            h.update(t.name.as_bytes());
            h.update([0]);
            h.update(t.data_type.to_le_bytes());
            for d in &t.dims {
                h.update(d.to_le_bytes());
            }
            if !t.raw_data.is_empty() {
                h.update(&t.raw_data);
            } else {
                for v in &t.float_data {
                    h.update(v.to_le_bytes());
                }
                for v in &t.int64_data {
                    h.update(v.to_le_bytes());
                }
                for v in &t.int32_data {
                    h.update(v.to_le_bytes());
                }
                for v in &t.double_data {
                    h.update(v.to_le_bytes());
                }
            }
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// A copy of this model with the given `f32` initializers replaced (same names and shapes)
    /// and, if given, the `names` metadata rewritten. The original is untouched.
    pub fn with_weights(
        &self,
        tensors: &[NamedTensor],
        names: Option<&[String]>,
    ) -> Result<OnnxModel, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            path: self.path.clone(),
            reason,
        };
        let mut proto = self.proto.clone();
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| unsupported("no graph".into()))?;
        for t in tensors {
            let init = graph
                .initializer
                .iter_mut()
                .find(|i| i.name == t.name)
                .ok_or_else(|| unsupported(format!("no initializer named '{}'", t.name)))?;
            if init.data_type != FLOAT || dims(init) != t.shape || t.data.len() != t.numel() {
                return Err(unsupported(format!(
                    "initializer '{}' is {:?} of type {}, cannot take a float32 tensor of shape {:?}",
                    t.name,
                    dims(init),
                    init.data_type,
                    t.shape
                )));
            }
            init.float_data.clear();
            init.raw_data = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        if let Some(names) = names {
            let repr = python_dict_repr(names);
            match proto.metadata_props.iter_mut().find(|e| e.key == "names") {
                Some(e) => e.value = repr,
                None => proto.metadata_props.push(pb::StringStringEntryProto {
                    key: "names".into(),
                    value: repr,
                }),
            }
        }
        let metadata = super::ModelMetadata::from_pairs(
            proto
                .metadata_props
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str())),
        );
        Ok(OnnxModel {
            proto,
            metadata,
            fingerprint: std::sync::OnceLock::new(),
            ..self.clone()
        })
    }

    /// The model as ONNX protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    /// Writes the model to `path` through a temporary file and a rename.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        crate::fsutil::write_atomic(path, &self.to_bytes()).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Class names as the Python dict repr Ultralytics writes (`{0: 'a', 1: 'b'}`).
fn python_dict_repr(names: &[String]) -> String {
    let items: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}: '{}'", n.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    format!("{{{}}}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_repr_round_trips_through_the_parser() {
        let names = vec!["Tree".to_string(), "it's".into(), "a\\b".into()];
        assert_eq!(
            super::super::parse_names(&python_dict_repr(&names)).unwrap(),
            names
        );
    }
}
