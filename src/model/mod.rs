//! The ONNX model: loading, metadata, preparation for inference, and running it.
//!
//! This is the only module that names tract or ONNX protobuf types; everything it hands out is
//! plain Rust data ([`ModelMetadata`], [`Output`], shapes as `usize`). tract is pinned to an exact
//! version in `Cargo.toml` because its internal APIs change between patch releases.

mod metadata;
mod rewrite;
mod weights;

pub use metadata::{ModelMetadata, parse_imgsz, parse_names};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Why a model could not be loaded, prepared or run. Every variant names the model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read.
    #[error("{}: cannot read model: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes are not an ONNX protobuf with a graph.
    #[error("{}: not an ONNX model: {reason}", path.display())]
    NotOnnx { path: PathBuf, reason: String },
    /// A valid ONNX model that is not a single-image detector perch can run.
    #[error("{}: unsupported model: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    /// tract rejected the graph while typing or optimising it.
    #[error("{}: cannot prepare model for inference: {reason}", path.display())]
    Prepare { path: PathBuf, reason: String },
    /// Inference failed (wrong input size, numerical kernel error).
    #[error("{}: inference failed: {reason}", path.display())]
    Run { path: PathBuf, reason: String },
}

/// Shape of the model's image input as declared in the ONNX graph: `None` for a symbolic
/// (dynamic) dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    pub batch: Option<usize>,
    pub channels: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl InputShape {
    /// True when height or width is symbolic, i.e. the model accepts any input size.
    pub fn is_dynamic(&self) -> bool {
        self.height.is_none() || self.width.is_none()
    }
}

/// A parsed ONNX model that has not been handed to tract's optimiser yet.
///
/// Keeping the protobuf lets adapters edit initializers by their stable ONNX names before tract
/// parses (and deduplicates) them.
#[derive(Clone)]
pub struct OnnxModel {
    path: PathBuf,
    proto: pb::ModelProto,
    metadata: ModelMetadata,
    input_name: String,
    input_shape: InputShape,
    output_names: Vec<String>,
    /// Weight fingerprint, computed on first use (hashing all weights is not free).
    fingerprint: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.path)
            .field("input", &(&self.input_name, &self.input_shape))
            .field("outputs", &self.output_names)
            .finish()
    }
}

impl OnnxModel {
    /// Reads and validates an ONNX file: it must decode as a `ModelProto` with a graph, exactly one
    /// graph input of rank 4, and at least one output.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Like [`OnnxModel::load`] from bytes already in memory; `path` is used in error messages
    /// and to resolve external tensor data.
    pub fn from_bytes(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let path = path.into();
        let not_onnx = |reason: String| ModelError::NotOnnx {
            path: path.clone(),
            reason,
        };
        if bytes.is_empty() {
            return Err(not_onnx("file is empty".into()));
        }
        let proto = onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| not_onnx(format!("protobuf decode failed ({e:#})")))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| not_onnx("no graph".into()))?;
        if graph.node.is_empty() {
            return Err(not_onnx("graph has no nodes".into()));
        }
        let unsupported = |reason: String| ModelError::Unsupported {
            path: path.clone(),
            reason,
        };
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&pb::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(unsupported(format!(
                "expected one image input, found {} ({})",
                inputs.len(),
                inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let dims = input_dims(input)
            .ok_or_else(|| unsupported(format!("input '{}' has no tensor shape", input.name)))?;
        let [batch, channels, height, width] = dims[..] else {
            return Err(unsupported(format!(
                "input '{}' has rank {}, expected an NCHW image (rank 4)",
                input.name,
                dims.len()
            )));
        };
        let input_shape = InputShape {
            batch,
            channels,
            height,
            width,
        };
        if channels.is_some_and(|c| c != 3) {
            return Err(unsupported(format!(
                "input '{}' has {} channels, expected 3 (RGB/BGR)",
                input.name,
                channels.unwrap_or_default()
            )));
        }
        if batch.is_some_and(|b| b != 1) {
            log::warn!(
                "{}: model batch is {}; perch runs one image at a time",
                path.display(),
                batch.unwrap_or_default()
            );
        }
        if graph.output.is_empty() {
            return Err(unsupported("graph has no outputs".into()));
        }
        let metadata = ModelMetadata::from_pairs(
            proto
                .metadata_props
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str())),
        );
        let input_name = input.name.clone();
        let output_names = graph.output.iter().map(|o| o.name.clone()).collect();
        Ok(OnnxModel {
            path,
            proto,
            metadata,
            input_name,
            input_shape,
            output_names,
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// The file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Exporter metadata (class names, image size, task).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// The declared image input shape.
    pub fn input_shape(&self) -> InputShape {
        self.input_shape
    }

    /// Names of the graph outputs in declaration order.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// Types, concretises and optimises the model for an input of `height` x `width` pixels.
    ///
    /// Symbolic batch/height/width dimensions of dynamic exports are substituted with 1, `height`
    /// and `width` across the whole graph. A static model must be asked for its own size.
    pub fn prepare(&self, height: usize, width: usize) -> Result<PreparedModel, ModelError> {
        let prep = |reason: String| ModelError::Prepare {
            path: self.path.clone(),
            reason,
        };
        if let (Some(h), Some(w)) = (self.input_shape.height, self.input_shape.width)
            && (h, w) != (height, width)
        {
            return Err(ModelError::Unsupported {
                path: self.path.clone(),
                reason: format!(
                    "static input is {h}x{w} (HxW); it cannot run at {height}x{width}, re-export with dynamic=True or use its own size"
                ),
            });
        }
        let model_dir = self.path.parent().and_then(|p| p.to_str());
        // tract cannot unify the symbolic expressions of dynamic exports (e.g. a Concat of
        // 2*((height+31)/32) with another form of the same size), so concrete sizes are written
        // into the protobuf input before tract analyses the graph; declared output and
        // intermediate shapes then carry stale symbols and are ignored.
        let t0 = std::time::Instant::now();
        let mut proto = self.proto.clone();
        // PERCH_NO_REWRITES=1 runs the graph as exported (for A/B measurements and bug reports).
        let rewritten = if std::env::var_os("PERCH_NO_REWRITES").is_some_and(|v| v == "1") {
            0
        } else {
            rewrite::decompose_softmax(&mut proto)
        };
        log::debug!(
            "{}: decomposed {rewritten} Softmax nodes",
            self.path.display()
        );
        let parsed = if self.input_shape.is_dynamic() || self.input_shape.batch.is_none() {
            set_input_dims(&mut proto, &self.input_name, [1, 3, height, width]);
            onnx()
                .with_ignore_output_shapes(true)
                .with_ignore_value_info(true)
                .parse(&proto, model_dir)
        } else {
            onnx().parse(&proto, model_dir)
        }
        .map_err(|e| prep(format!("{e:#}")))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(prep(format!(
                "unresolved graph inputs {:?}",
                parsed.unresolved_inputs
            )));
        }
        let t_parse = t0.elapsed();
        let typed = parsed
            .model
            .into_typed()
            .map_err(|e| prep(format!("typing: {e:#}")))?;
        let typed =
            concretize_input(typed, [1, 3, height, width]).map_err(|e| prep(format!("{e:#}")))?;
        let t_typed = t0.elapsed();
        let decluttered = typed
            .into_decluttered()
            .map_err(|e| prep(format!("decluttering: {e:#}")))?;
        let t_declutter = t0.elapsed();
        let optimized = decluttered
            .into_optimized()
            .map_err(|e| prep(format!("optimising: {e:#}")))?;
        log::debug!(
            "{}: prepare timings: parse {:.0} ms, typing {:.0} ms, declutter {:.0} ms, optimise {:.0} ms",
            self.path.display(),
            t_parse.as_secs_f64() * 1e3,
            (t_typed - t_parse).as_secs_f64() * 1e3,
            (t_declutter - t_typed).as_secs_f64() * 1e3,
            (t0.elapsed() - t_declutter).as_secs_f64() * 1e3,
        );
        let mut output_shapes = Vec::new();
        for (ix, outlet) in optimized
            .output_outlets()
            .map_err(|e| prep(format!("{e:#}")))?
            .iter()
            .enumerate()
        {
            let fact = optimized
                .outlet_fact(*outlet)
                .map_err(|e| prep(format!("{e:#}")))?;
            let shape = fact.shape.as_concrete().ok_or_else(|| {
                prep(format!(
                    "output {ix} has a non-concrete shape {:?} after concretising the input",
                    fact.shape
                ))
            })?;
            if fact.datum_type != f32::datum_type() {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    reason: format!("output {ix} is {:?}, expected f32", fact.datum_type),
                });
            }
            output_shapes.push(shape.to_vec());
        }
        let runnable = optimized
            .into_runnable()
            .map_err(|e| prep(format!("{e:#}")))?;
        Ok(PreparedModel {
            path: self.path.clone(),
            runnable,
            input_dims: [1, 3, height, width],
            output_shapes,
        })
    }
}

fn input_dims(input: &pb::ValueInfoProto) -> Option<Vec<Option<usize>>> {
    use pb::tensor_shape_proto::dimension::Value;
    use pb::type_proto::Value as TypeValue;
    let TypeValue::TensorType(t) = input.r#type.as_ref()?.value.as_ref()?;
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
            .collect(),
    )
}

/// Writes concrete dimensions into the declared shape of graph input `name`.
fn set_input_dims(proto: &mut pb::ModelProto, name: &str, dims: [usize; 4]) {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    use pb::type_proto::Value as TypeValue;
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    for input in graph.input.iter_mut().filter(|i| i.name == name) {
        if let Some(TypeValue::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            let shape = t.shape.get_or_insert_with(Default::default);
            shape.dim = dims
                .iter()
                .map(|d| Dimension {
                    value: Some(Value::DimValue(*d as i64)),
                    ..Default::default()
                })
                .collect();
        }
    }
}

/// Replaces every symbol left in the input fact by the concrete size of its axis.
fn concretize_input(model: TypedModel, dims: [usize; 4]) -> TractResult<TypedModel> {
    let input = model.input_outlets()?[0];
    let fact = model.outlet_fact(input)?.clone();
    if fact.rank() != 4 {
        anyhow::bail!("input has rank {} after typing, expected 4", fact.rank());
    }
    let mut subs: HashMap<Symbol, TDim> = HashMap::new();
    for (axis, dim) in fact.shape.iter().enumerate() {
        match dim.to_i64() {
            Ok(v) if v as usize == dims[axis] => {}
            Ok(v) => anyhow::bail!("input axis {axis} is {v}, expected {}", dims[axis]),
            Err(_) => match dim {
                TDim::Sym(s) => {
                    subs.insert(s.clone(), (dims[axis] as i64).into());
                }
                other => anyhow::bail!(
                    "input axis {axis} is an expression ({other}); only plain symbols can be concretised"
                ),
            },
        }
    }
    let model = if subs.is_empty() {
        model
    } else {
        model.set_symbols(&subs)?
    };
    let fact = model.outlet_fact(model.input_outlets()?[0])?;
    if fact.shape.as_concrete().is_none() {
        anyhow::bail!("input shape {:?} is still symbolic", fact.shape);
    }
    Ok(model)
}

/// A model typed, concretised and optimised for one input size; cheap to share between threads.
#[derive(Clone)]
pub struct PreparedModel {
    path: PathBuf,
    runnable: Arc<TypedRunnableModel>,
    input_dims: [usize; 4],
    output_shapes: Vec<Vec<usize>>,
}

impl PreparedModel {
    /// Input tensor dimensions `[1, 3, height, width]`.
    pub fn input_dims(&self) -> [usize; 4] {
        self.input_dims
    }

    /// Concrete output shapes, in graph output order.
    pub fn output_shapes(&self) -> &[Vec<usize>] {
        &self.output_shapes
    }

    /// A run state for one thread; reuse it for every frame.
    pub fn session(&self) -> Result<Session, ModelError> {
        let state = self.runnable.spawn().map_err(|e| ModelError::Run {
            path: self.path.clone(),
            reason: format!("{e:#}"),
        })?;
        Ok(Session {
            path: self.path.clone(),
            input_dims: self.input_dims,
            state,
        })
    }
}

/// One output tensor as plain data: row-major `f32` values of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A per-thread inference state over a [`PreparedModel`].
pub struct Session {
    path: PathBuf,
    input_dims: [usize; 4],
    state: TypedSimpleState,
}

impl Session {
    /// Runs the model on an NCHW `f32` input of exactly `input_dims()` elements and returns
    /// all outputs.
    pub fn run(&mut self, input: &[f32]) -> Result<Vec<Output>, ModelError> {
        let err = |reason: String| ModelError::Run {
            path: self.path.clone(),
            reason,
        };
        let expected: usize = self.input_dims.iter().product();
        if input.len() != expected {
            return Err(err(format!(
                "input has {} values, expected {expected} for {:?}",
                input.len(),
                self.input_dims
            )));
        }
        let tensor =
            Tensor::from_shape(&self.input_dims, input).map_err(|e| err(format!("{e:#}")))?;
        let outputs = self
            .state
            .run(tvec!(tensor.into_tvalue()))
            .map_err(|e| err(format!("{e:#}")))?;
        outputs
            .iter()
            .map(|t| {
                let view = t
                    .to_plain_array_view::<f32>()
                    .map_err(|e| err(format!("{e:#}")))?;
                Ok(Output {
                    shape: view.shape().to_vec(),
                    data: view.iter().copied().collect(),
                })
            })
            .collect()
    }
}
