//! The ONNX model: loading, metadata, preparation for inference, and running it.
//!
//! This is the only module that names tract or ONNX protobuf types; everything it hands out is
//! plain Rust data ([`ModelMetadata`], [`Output`], shapes as `usize`). tract is pinned to an exact
//! version in `Cargo.toml` because its internal APIs change between patch releases.

mod guard;
mod metadata;
mod multitask;
mod quant;
mod reuse;
mod rewrite;
mod weights;

pub use metadata::{ModelMetadata, parse_imgsz, parse_names};
pub use multitask::{TaskInfo, TrunkSplit};
pub use quant::Calibration;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::tract_linalg::multithread::Executor;

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
    /// tract panicked on this model (an attribute or shape it does not validate); `reason` is
    /// the panic message and its source location. The process and other engines are unharmed.
    #[error("{}: tract failed on this model (internal error: {reason})", path.display())]
    Internal { path: PathBuf, reason: String },
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
    /// Decluttered graphs kept by prepares that asked for [`PrepareOptions::reuse_graph`],
    /// shared with the copies [`OnnxModel::with_weights`] makes.
    graphs: Arc<reuse::GraphCache>,
    /// The tasks of a shared-trunk model ([`OnnxModel::shared_trunk`]); empty otherwise.
    tasks: Vec<TaskInfo>,
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
        let bytes = crate::fsutil::read_limited(&path, crate::fsutil::MAX_MODEL_BYTES).map_err(
            |source| ModelError::Io {
                path: path.clone(),
                source,
            },
        )?;
        Self::from_bytes(&bytes, path)
    }

    /// Like [`OnnxModel::load`] from bytes already in memory; `path` is used in error messages
    /// and to resolve external tensor data.
    pub fn from_bytes(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let path = path.into();
        guard::guard(&path.clone(), || Self::from_bytes_unguarded(bytes, path))
    }

    fn from_bytes_unguarded(bytes: &[u8], path: PathBuf) -> Result<Self, ModelError> {
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
            graphs: Arc::default(),
            tasks: Vec::new(),
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

    /// Types, concretises and optimises the model for an input of `height` x `width` pixels, in
    /// f32 on the calling thread. See [`OnnxModel::prepare_with`].
    pub fn prepare(&self, height: usize, width: usize) -> Result<PreparedModel, ModelError> {
        self.prepare_with(height, width, &PrepareOptions::default())
    }

    /// Types, concretises and optimises the model for an input of `height` x `width` pixels.
    ///
    /// Symbolic batch/height/width dimensions of dynamic exports are substituted with 1, `height`
    /// and `width` across the whole graph. A static model must be asked for its own size.
    /// `Precision::F16` falls back to f32 (with a warning) on CPUs without native half
    /// arithmetic; `Precision::Int8` needs `opts.calibration` and fails with
    /// [`ModelError::Unsupported`] without one. [`PreparedModel::precision`] tells what was
    /// built.
    pub fn prepare_with(
        &self,
        height: usize,
        width: usize,
        opts: &PrepareOptions,
    ) -> Result<PreparedModel, ModelError> {
        guard::guard(&self.path, || self.prepare_unguarded(height, width, opts))
    }

    fn prepare_unguarded(
        &self,
        height: usize,
        width: usize,
        opts: &PrepareOptions,
    ) -> Result<PreparedModel, ModelError> {
        let prep = |reason: String| ModelError::Prepare {
            path: self.path.clone(),
            reason,
        };
        let t0 = std::time::Instant::now();
        let mut proto = self.proto.clone();
        let mut precision = opts.precision;
        if precision == Precision::F16 && !f16_native() {
            log::warn!(
                "{}: this CPU has no native f16 arithmetic (needs ARMv8.2-A FP16, e.g. Cortex-A55/A76); running f32",
                self.path.display()
            );
            precision = Precision::F32;
        }
        if precision == Precision::Int8 {
            let cal = opts
                .calibration
                .as_deref()
                .ok_or_else(|| ModelError::Unsupported {
                    path: self.path.clone(),
                    reason: "int8 needs a calibration (perch calibrate)".into(),
                })?;
            let n = quant::quantize(&mut proto, cal);
            if n == 0 {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    reason: "int8: the calibration covers none of this model's Conv layers".into(),
                });
            }
            log::info!("{}: {n} Conv layers quantized to int8", self.path.display());
        }
        let (decluttered, graph_reused) =
            self.decluttered(proto, height, width, opts.reuse_graph)?;
        let decluttered = if precision == Precision::F16 {
            let t = tract_onnx::tract_core::transform::get_transform("f32_to_f16")
                .map_err(|e| prep(format!("{e:#}")))?
                .ok_or_else(|| prep("tract has no f32_to_f16 transform".into()))?;
            t.transform_into(decluttered)
                .map_err(|e| prep(format!("f16: {e:#}")))?
        } else {
            decluttered
        };
        let t_optimise = t0.elapsed();
        let optimized = decluttered
            .into_optimized()
            .map_err(|e| prep(format!("optimising: {e:#}")))?;
        log::debug!(
            "{}: prepared in {:.0} ms (optimise {:.0} ms)",
            self.path.display(),
            t0.elapsed().as_secs_f64() * 1e3,
            (t0.elapsed() - t_optimise).as_secs_f64() * 1e3,
        );
        if log::log_enabled!(target: "perch::model::plan", log::Level::Trace) {
            for node in optimized.nodes() {
                log::trace!(target: "perch::model::plan", "{} {} {:?}", node.name, node.op().name(), node.op().info());
            }
        }
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
            let expected = if precision == Precision::F16 {
                f16::datum_type()
            } else {
                f32::datum_type()
            };
            if fact.datum_type != expected {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    reason: format!("output {ix} is {:?}, expected f32", fact.datum_type),
                });
            }
            output_shapes.push(shape.to_vec());
        }
        let threads = opts.threads.max(1);
        let run_opts = RunOptions {
            executor: executor(threads),
            ..Default::default()
        };
        let runnable = optimized
            .into_runnable_with_options(&run_opts)
            .map_err(|e| prep(format!("{e:#}")))?;
        Ok(PreparedModel {
            path: self.path.clone(),
            runnable,
            input_dims: [1, 3, height, width],
            output_shapes,
            precision,
            threads: if run_opts.executor.is_some() {
                threads
            } else {
                1
            },
            executor: run_opts.executor,
            graph_reused,
        })
    }

    /// Parses (after perch's graph rewrites), types, concretises and declutters `proto`; with
    /// `reuse`, starts from a kept graph when one differs only in weight values, and keeps the
    /// result otherwise.
    fn decluttered(
        &self,
        mut proto: pb::ModelProto,
        height: usize,
        width: usize,
        reuse: bool,
    ) -> Result<(TypedModel, bool), ModelError> {
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
        let t0 = std::time::Instant::now();
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
        // tract cannot unify the symbolic expressions of dynamic exports (e.g. a Concat of
        // 2*((height+31)/32) with another form of the same size), so concrete sizes are written
        // into the protobuf input before tract analyses the graph; declared output and
        // intermediate shapes then carry stale symbols and are ignored.
        let dynamic = self.input_shape.is_dynamic() || self.input_shape.batch.is_none();
        // Which weights a task set changes decides its graph's shape, and tract's declutter
        // does not keep every per-task weight identifiable: shared-trunk graphs are not kept.
        let reuse = reuse && self.tasks.is_empty();
        if dynamic {
            set_input_dims(&mut proto, &self.input_name, [1, 3, height, width]);
        }
        if reuse && let Some((model, replaced)) = self.graphs.lookup(&proto, model_dir) {
            log::debug!(
                "{}: reused a decluttered graph, {replaced} weights replaced, in {:.0} ms",
                self.path.display(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            return Ok((model, true));
        }
        let parsed = if dynamic {
            onnx()
                .with_ignore_output_shapes(true)
                .with_ignore_value_info(true)
                .parse(&proto, model_dir)
        } else {
            onnx()
                .with_ignore_output_shapes(true)
                .parse(&proto, model_dir)
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
        log::debug!(
            "{}: prepare timings: parse {:.0} ms, typing {:.0} ms, declutter {:.0} ms",
            self.path.display(),
            t_parse.as_secs_f64() * 1e3,
            (t_typed - t_parse).as_secs_f64() * 1e3,
            (t0.elapsed() - t_typed).as_secs_f64() * 1e3,
        );
        if reuse {
            self.graphs.insert(proto, &decluttered, model_dir);
        }
        Ok((decluttered, false))
    }

    /// A calibration run for int8: feed it letterboxed inputs of `height` x `width` with
    /// [`Calibrator::observe`], then take the [`Calibration`] with [`Calibrator::finish`].
    ///
    /// Fails with [`ModelError::Unsupported`] when the model has no Conv layer int8 applies to.
    pub fn calibrator(&self, height: usize, width: usize) -> Result<Calibrator, ModelError> {
        guard::guard(&self.path, || self.calibrator_unguarded(height, width))
    }

    fn calibrator_unguarded(&self, height: usize, width: usize) -> Result<Calibrator, ModelError> {
        let graph = self.proto.graph.as_ref();
        let names = graph.map(quant::calibration_tensors).unwrap_or_default();
        if names.is_empty() {
            return Err(ModelError::Unsupported {
                path: self.path.clone(),
                reason: "no Conv layer that int8 applies to".into(),
            });
        }
        let mut proto = self.proto.clone();
        // The image input itself is read from the input buffer, not exposed as an output.
        let exposed: Vec<String> = names
            .iter()
            .filter(|n| **n != self.input_name)
            .cloned()
            .collect();
        quant::expose(&mut proto, &exposed);
        let model = self
            .decluttered(proto, height, width, false)?
            .0
            .into_optimized()
            .map_err(|e| ModelError::Prepare {
                path: self.path.clone(),
                reason: format!("optimising: {e:#}"),
            })?
            .into_runnable()
            .map_err(|e| ModelError::Prepare {
                path: self.path.clone(),
                reason: format!("{e:#}"),
            })?;
        let first = self.output_names.len();
        Ok(Calibrator {
            session: PreparedModel {
                path: self.path.clone(),
                runnable: model,
                input_dims: [1, 3, height, width],
                output_shapes: Vec::new(),
                precision: Precision::F32,
                threads: 1,
                executor: None,
                graph_reused: false,
            }
            .session()?,
            names,
            exposed,
            input_name: self.input_name.clone(),
            first,
            absmax: Vec::new(),
            images: 0,
            fingerprint: self.fingerprint(),
        })
    }
}

/// Collects activation ranges for int8; see [`OnnxModel::calibrator`].
pub struct Calibrator {
    session: Session,
    names: Vec<String>,
    exposed: Vec<String>,
    input_name: String,
    first: usize,
    absmax: Vec<f32>,
    images: usize,
    fingerprint: String,
}

impl Calibrator {
    /// Runs the float model on one letterboxed NCHW input and widens the recorded ranges.
    ///
    /// Fails like [`Session::run`], and when an observed activation is NaN or infinite.
    pub fn observe(&mut self, input: &[f32]) -> Result<(), ModelError> {
        let outs = self.session.run(input)?;
        if self.absmax.is_empty() {
            self.absmax = vec![0.0; self.names.len()];
        }
        let absmax = |v: &[f32]| v.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut seen: HashMap<&str, f32> = self
            .exposed
            .iter()
            .map(String::as_str)
            .zip(outs.iter().skip(self.first).map(|o| absmax(&o.data)))
            .collect();
        seen.insert(self.input_name.as_str(), absmax(input));
        for (name, range) in self.names.iter().zip(self.absmax.iter_mut()) {
            let m = seen.get(name.as_str()).copied().unwrap_or(0.0);
            if !m.is_finite() {
                return Err(ModelError::Run {
                    path: self.session.path.clone(),
                    reason: format!("calibration: tensor '{name}' is not finite"),
                });
            }
            *range = range.max(m);
        }
        self.images += 1;
        Ok(())
    }

    /// The ranges seen so far.
    pub fn finish(self) -> Calibration {
        Calibration {
            version: 1,
            model_fingerprint: self.fingerprint,
            images: self.images,
            absmax: self.names.into_iter().zip(self.absmax).collect(),
        }
    }
}

/// Numeric precision of a prepared model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float everywhere (the reference).
    #[default]
    F32,
    /// Half precision weights and activations, where the CPU computes in f16 natively.
    F16,
    /// int8 convolutions with calibrated activation scales; head outputs stay float.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("'{s}' is not a precision (f32, f16, int8)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        })
    }
}

/// How to prepare a model: precision, threads per run, int8 calibration.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    pub precision: Precision,
    /// Threads that split each matrix product of one run (0 or 1: the calling thread only).
    pub threads: usize,
    /// Activation ranges; required by [`Precision::Int8`].
    pub calibration: Option<Arc<Calibration>>,
    /// Keep the decluttered graph with the model (and the copies adapters are merged into), and
    /// start from a kept one when it differs only in the values of Conv/Gemm/MatMul weights:
    /// such a prepare skips parsing, typing and decluttering. Costs one more copy of the weights
    /// in memory per input size kept (at most two); for processes that swap adapters.
    pub reuse_graph: bool,
}

/// True when this CPU computes f16 natively (tract's check; ARMv8.2-A FP16), or when
/// `PERCH_FORCE_F16=1` asks for tract's f16 graph anyway (for accuracy checks on other CPUs).
pub fn f16_native() -> bool {
    tract_onnx::tract_core::tract_linalg::has_fp16()
        || std::env::var_os("PERCH_FORCE_F16").is_some_and(|v| v == "1")
}

/// The most threads a run can use in this build (1 without the `multithread` feature).
pub fn max_threads() -> usize {
    if cfg!(feature = "multithread") {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        1
    }
}

/// A shared pool per thread count, so that rebuilding a model (adapter swaps) reuses threads.
#[cfg(feature = "multithread")]
fn executor(threads: usize) -> Option<Executor> {
    static POOLS: std::sync::Mutex<Vec<(usize, Executor)>> = std::sync::Mutex::new(Vec::new());
    if threads <= 1 {
        return None;
    }
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, e)) = pools.iter().find(|(n, _)| *n == threads) {
        return Some(e.clone());
    }
    let e = Executor::multithread_with_name(threads, "perch-mm");
    pools.push((threads, e.clone()));
    Some(e)
}

#[cfg(not(feature = "multithread"))]
fn executor(threads: usize) -> Option<Executor> {
    if threads > 1 {
        log::warn!("built without the multithread feature; running on one thread");
    }
    None
}

/// The op types of the nodes reading each tensor of `graph`, by tensor name (a node reading a
/// tensor twice counts twice).
fn consumer_ops(graph: &pb::GraphProto) -> HashMap<&str, Vec<&str>> {
    let mut consumers: HashMap<&str, Vec<&str>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            consumers
                .entry(i.as_str())
                .or_default()
                .push(n.op_type.as_str());
        }
    }
    consumers
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
    precision: Precision,
    threads: usize,
    executor: Option<Executor>,
    graph_reused: bool,
}

impl PreparedModel {
    /// The precision actually built (f16 requests fall back to f32 without native f16).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// True when this prepare started from a kept decluttered graph
    /// ([`PrepareOptions::reuse_graph`]) instead of parsing the model.
    pub fn graph_reused(&self) -> bool {
        self.graph_reused
    }

    /// Threads each run splits its matrix products over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Input tensor dimensions `[1, 3, height, width]`.
    pub fn input_dims(&self) -> [usize; 4] {
        self.input_dims
    }

    /// Concrete output shapes, in graph output order.
    pub fn output_shapes(&self) -> &[Vec<usize>] {
        &self.output_shapes
    }

    /// The matrix-product kernels tract picked for this model, by accumulator type: `(f32
    /// kernels, i32 kernels)`, each a sorted list of distinct kernel names (for example
    /// `fma_mmm_f32_16x6` or `avx2madd_mmm_i32_8x8`). The i32 list is what int8 convolutions
    /// run on; it is empty for a float model.
    pub fn matrix_kernels(&self) -> (Vec<String>, Vec<String>) {
        use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;
        let (mut float, mut int) = (Vec::new(), Vec::new());
        for node in &self.runnable.model().nodes {
            let Some(op) = node.op_as::<OptMatMul>() else {
                continue;
            };
            for mmm in &op.mmm {
                let list = if mmm.internal_type() == i32::datum_type() {
                    &mut int
                } else {
                    &mut float
                };
                list.push(mmm.name().to_string());
            }
        }
        for list in [&mut float, &mut int] {
            list.sort();
            list.dedup();
        }
        (float, int)
    }

    /// A run state for one thread; reuse it for every frame.
    pub fn session(&self) -> Result<Session, ModelError> {
        let state = guard::guard(&self.path, || {
            self.runnable.spawn().map_err(|e| ModelError::Run {
                path: self.path.clone(),
                reason: format!("{e:#}"),
            })
        })?;
        Ok(Session {
            path: self.path.clone(),
            input_dims: self.input_dims,
            f16: self.precision == Precision::F16,
            state,
            executor: self.executor.clone(),
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
    /// The graph takes and returns f16 tensors (`f32_to_f16` changes its interface too).
    f16: bool,
    state: TypedSimpleState,
    executor: Option<Executor>,
}

/// Runs `f` on a thread of the run's pool, when it has one. The thread that walks the graph
/// then takes its share of every parallel matrix product itself, instead of handing each one
/// to the pool and sleeping until the pool wakes it (one wake-up per product, and a pool of
/// `threads` workers plus a waiting caller on `threads` cores). The pool's other threads stay
/// awake for the whole run (see [`KeepAwake`]).
fn on_pool<R: Send>(executor: &Option<Executor>, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        #[cfg(feature = "multithread")]
        Some(Executor::MultiThread(pool)) => pool.install(|| {
            let _awake = KeepAwake::start(pool);
            f()
        }),
        _ => f(),
    }
}

/// Keeps every other thread of a pool looking for work, instead of sleeping, until dropped.
///
/// Between two parallel products a frame runs serial operators (activations, pads, pools) for
/// tens of microseconds, long enough for an idle rayon worker to go to sleep; waking it for the
/// next product is a futex wake and, in a virtual machine, an inter-processor interrupt. Each of
/// the other workers instead runs one task that steals and runs the pool's pending jobs
/// (`rayon::yield_now`) and offers its core to the OS scheduler between them
/// (`std::thread::yield_now`, which returns at once when nothing else is runnable), until the
/// run that started it ends. The cores the pool was given are thus busy for the whole frame, as
/// onnxruntime's spinning threads are. A `PAUSE` spin gave frames a long tail in a virtual
/// machine, where the hypervisor may deschedule a vCPU that loops on `PAUSE` (pause-loop
/// exiting) while it holds a share of a product.
///
/// The task returns at once on a thread that is inside a run itself (the starting thread, which
/// rayon may hand its own copy while it waits inside the frame, or a thread running another
/// session's frame on the same pool): a spinning task there would sit on top of that run and
/// wait for another, and two such threads would wait for each other. A run may still start
/// inside a spinning task (rayon hands it over as pending work); it then completes on top of
/// it. A task that starts after its run ended returns at once.
#[cfg(feature = "multithread")]
struct KeepAwake(std::sync::Arc<std::sync::atomic::AtomicBool>);

#[cfg(feature = "multithread")]
thread_local! {
    /// How many runs this thread is inside (runs nest when rayon hands one to a waiting thread).
    static RUNS_ON_THIS_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(feature = "multithread")]
impl KeepAwake {
    fn start(pool: &rayon::ThreadPool) -> KeepAwake {
        use std::sync::atomic::Ordering;
        RUNS_ON_THIS_THREAD.with(|n| n.set(n.get() + 1));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        pool.spawn_broadcast(move |_| {
            if RUNS_ON_THIS_THREAD.with(|n| n.get()) > 0 {
                return;
            }
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        });
        KeepAwake(done)
    }
}

#[cfg(feature = "multithread")]
impl Drop for KeepAwake {
    fn drop(&mut self) {
        RUNS_ON_THIS_THREAD.with(|n| n.set(n.get() - 1));
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Session {
    fn input_tensor(&self, input: &[f32]) -> TractResult<Tensor> {
        let t = Tensor::from_shape(&self.input_dims, input)?;
        if self.f16 {
            t.cast_to::<f16>().map(|t| t.into_owned())
        } else {
            Ok(t)
        }
    }

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
        let tensor = self
            .input_tensor(input)
            .map_err(|e| err(format!("{e:#}")))?;
        let state = &mut self.state;
        let executor = &self.executor;
        let outputs = guard::guard(&self.path, || {
            on_pool(executor, || state.run(tvec!(tensor.into_tvalue())))
                .map_err(|e| err(format!("{e:#}")))
        })?;
        outputs
            .iter()
            .map(|t| {
                let t = t.cast_to::<f32>().map_err(|e| err(format!("{e:#}")))?;
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

/// Time spent in one node of the optimised graph, summed over the profiled runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// Node name in tract's optimised graph (ONNX names with tract's suffixes).
    pub name: String,
    /// Operator kind after optimisation (e.g. `OptMatMul`, `ReduceMax`).
    pub op: String,
    /// Total wall time of this node over all runs, in seconds.
    pub seconds: f64,
}

impl Session {
    /// Runs the model `runs` times on `input` and returns the wall time of every node, in plan
    /// order (timing each node adds a little overhead compared to [`Session::run`]).
    ///
    /// Fails like [`Session::run`].
    pub fn profile(&mut self, input: &[f32], runs: usize) -> Result<Vec<NodeTime>, ModelError> {
        let err = |reason: String| ModelError::Run {
            path: self.path.clone(),
            reason,
        };
        let tensor = self
            .input_tensor(input)
            .map_err(|e| err(format!("{e:#}")))?;
        // Nodes are evaluated in plan order, so first sight gives the order of the result.
        let mut slot: HashMap<usize, usize> = HashMap::new();
        let mut times: Vec<NodeTime> = Vec::new();
        let state = &mut self.state;
        let executor = &self.executor;
        for _ in 0..runs {
            guard::guard(&self.path, || {
                on_pool(executor, || {
                    state.run_plan_with_eval(
                        tvec!(tensor.clone().into_tvalue()),
                        |ctx, state, node, inputs| {
                            let t = std::time::Instant::now();
                            let out = tract_onnx::tract_core::plan::eval(ctx, state, node, inputs);
                            let elapsed = t.elapsed().as_secs_f64();
                            let ix = *slot.entry(node.id).or_insert_with(|| {
                                times.push(NodeTime {
                                    name: node.name.clone(),
                                    op: node.op().name().to_string(),
                                    seconds: 0.0,
                                });
                                times.len() - 1
                            });
                            times[ix].seconds += elapsed;
                            out
                        },
                    )
                })
                .map_err(|e| err(format!("{e:#}")))
            })?;
        }
        Ok(times)
    }
}

#[cfg(all(test, feature = "multithread"))]
mod pool_tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Two sessions of one model running frames at once on the same two-thread pool (a service
    /// frame next to an adapter's health check) neither deadlock, although each keeps the other
    /// worker spinning in its own task, nor fail, although rayon runs one session's frame on a
    /// thread that is waiting inside the other's matrix product, nor change results: both give
    /// the one-thread outputs.
    #[test]
    fn concurrent_runs_on_one_pool_finish_with_one_thread_results() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tree-yolo11n-320.onnx");
        let model = OnnxModel::load(path).unwrap();
        let prepare = |threads| {
            let opts = PrepareOptions {
                threads,
                ..Default::default()
            };
            Arc::new(model.prepare_with(320, 320, &opts).unwrap())
        };
        let input: Vec<f32> = (0..3 * 320 * 320)
            .map(|i| (i % 251) as f32 / 250.0)
            .collect();
        let want = prepare(1).session().unwrap().run(&input).unwrap();
        let two = prepare(2);
        let (tx, rx) = mpsc::channel();
        for _ in 0..2 {
            let (two, input, tx) = (two.clone(), input.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut session = two.session().unwrap();
                for _ in 0..4 {
                    tx.send(session.run(&input).unwrap()).unwrap();
                }
            });
        }
        for _ in 0..8 {
            let got = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("a run hung");
            assert_eq!(got, want);
        }
    }
}
