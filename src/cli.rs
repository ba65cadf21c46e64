//! Subcommands of the `perch` binary. Each returns a `perch::exit` code; errors are printed as
//! one line `perch: error: <file>: <reason>` on stderr.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use perch::adapter::{self, Adapter, StoredDtype, peft::ImportOptions};
use perch::config::ModelSettings;
use perch::detector::read_labels;
use perch::engine::{BuildTimings, CalibrationRole, EngineBuilder};
use perch::exit;
use perch::image_io::{IMAGE_EXTENSIONS, list_images, load_rgb, save_rgb};
use perch::model::{OnnxModel, Precision};
use perch::overlay::{RgbCanvas, draw_detections};
use perch::report::{AdapterRef, ImageRecord};
use perch::{Detector, Layout, PostprocessParams, RgbFrame};

#[derive(Parser, Debug)]
#[command(
    name = "perch",
    version,
    about = "Frozen ONNX object detectors with swappable adapters, on CPU"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Detect objects in still images; prints one JSON line per image on stdout.
    Detect(DetectArgs),
    /// Measure per-stage latency percentiles on one image.
    Bench(BenchArgs),
    /// Accuracy (mAP50, mAP50-95, precision, recall per class) on a YOLO-format dataset, as
    /// Ultralytics `val` computes it; prints one JSON object.
    #[command(mut_arg("conf", |a| a.help(
        "Confidence threshold (0..1): keep boxes scoring strictly above it [default: 0.001, as Ultralytics val]"
    )))]
    Eval(EvalArgs),
    /// Run as a service: frames from a camera or replay source to detections, until stopped.
    Run(RunArgs),
    /// Talk to a running service over its control socket; prints the JSON reply.
    Ctl(CtlArgs),
    /// Create, inspect and merge adapters.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Measure activation ranges on sample images for `--precision int8`; writes a small JSON
    /// calibration file for the model (with its adapter merged, if one is given).
    Calibrate(CalibrateArgs),
}

#[derive(Args, Debug)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelSource,
    /// Images or directories of images like the ones the model will see.
    #[arg(long, required = true, num_args = 1.., value_name = "IMAGE_OR_DIR")]
    images: Vec<PathBuf>,
    /// Use at most this many images.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    max_images: u32,
    /// Where to write the calibration (JSON).
    #[arg(short, long, value_name = "FILE.json")]
    output: PathBuf,
    /// Also write a copy of --adapter that carries this calibration, so that int8 uses it
    /// whenever that adapter is active.
    #[arg(long, value_name = "X.safetensors", requires = "adapter")]
    into_adapter: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AdapterCommand {
    /// Print a JSON summary of an adapter file (validates it; no base needed).
    Inspect {
        /// Adapter file (.safetensors).
        #[arg(value_name = "X.safetensors")]
        adapter: PathBuf,
        /// Also check it against this base model.
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: Option<PathBuf>,
    },
    /// Merge an adapter into a base model and write the merged ONNX (for QA or other runtimes).
    Merge {
        /// Base model (ONNX).
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: PathBuf,
        /// Adapter file, or a PEFT directory imported on the fly.
        #[arg(long, value_name = "X")]
        adapter: PathBuf,
        /// Multiplier of the adapter's LoRA deltas (-10..=10).
        #[arg(long = "adapter-scale", alias = "scale", default_value_t = 1.0,
              value_parser = parse_scale, allow_negative_numbers = true)]
        scale: f32,
        /// Where to write the merged model (ONNX).
        #[arg(short, long, value_name = "OUT.onnx")]
        output: PathBuf,
    },
    /// Convert a Hugging Face PEFT LoRA directory into a perch adapter for a base model.
    Import {
        /// Directory with adapter_config.json and adapter_model.safetensors.
        #[arg(long, value_name = "DIR")]
        peft: PathBuf,
        /// Base model the LoRA was trained on (ONNX export).
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: PathBuf,
        /// Where to write the perch adapter.
        #[arg(short, long, value_name = "X.safetensors")]
        output: PathBuf,
        /// Adapter name (default: the PEFT directory name).
        #[arg(long)]
        name: Option<String>,
        /// JSON object mapping PEFT module (or module.param) names to ONNX initializer names.
        #[arg(long, value_name = "FILE.json")]
        name_map: Option<PathBuf>,
        /// safetensors of per-output-channel scales keyed by PEFT module name (BatchNorm
        /// gamma / sqrt(var + eps) of convs whose LoRA was trained before BN folding).
        #[arg(long, value_name = "FILE.safetensors")]
        channel_scales: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make an adapter from a base export and the same model after fine-tuning.
    Diff(DiffArgs),
}

#[derive(Args, Debug)]
struct StoreArgs {
    /// Class names of the adapted model, one per line (same count as the base).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Store tensors as f32 instead of f16.
    #[arg(long)]
    f32: bool,
}

#[derive(Args, Debug)]
struct DiffArgs {
    /// Base model (ONNX export before fine-tuning).
    #[arg(long = "model", alias = "base", value_name = "M.onnx")]
    base: PathBuf,
    /// The fine-tuned export of the same architecture.
    #[arg(long, value_name = "T.onnx")]
    tuned: PathBuf,
    /// Where to write the adapter.
    #[arg(short, long, value_name = "X.safetensors")]
    output: PathBuf,
    /// Layers 0..N-1 were frozen (Ultralytics freeze=N): refuse if any of them changed.
    #[arg(long)]
    freeze: Option<usize>,
    /// Approximate changed conv/linear weights with a LoRA of this rank (truncated SVD).
    #[arg(long, conflicts_with = "energy")]
    rank: Option<usize>,
    /// Approximate with the smallest rank keeping this fraction of each delta's energy (0..1].
    #[arg(long)]
    energy: Option<f32>,
    /// Adapter name (default: the output file stem).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

/// The model to load: a base export, its input size, and an adapter merged into it.
#[derive(Args, Debug)]
struct ModelSource {
    /// ONNX detector (Ultralytics YOLOv5/v8/v10/11/26 or YOLOX export).
    #[arg(long, value_name = "M.onnx")]
    model: PathBuf,
    /// Input size: N for NxN or H,W (dynamic models only; static models use their own size).
    #[arg(long, value_name = "N|H,W", value_parser = parse_imgsz)]
    imgsz: Option<(usize, usize)>,
    /// Force the output layout instead of inferring it.
    #[arg(long, value_parser = |s: &str| s.parse::<Layout>())]
    layout: Option<Layout>,
    /// Adapter merged into the model at load (a perch .safetensors adapter or a PEFT directory).
    #[arg(long, value_name = "X")]
    adapter: Option<PathBuf>,
    /// Multiplier of the adapter's LoRA deltas (-10..=10).
    #[arg(long, default_value_t = 1.0, requires = "adapter", value_parser = parse_scale,
          allow_negative_numbers = true)]
    adapter_scale: f32,
    /// Threads that split each matrix product of one frame.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
}

/// A model to run: what to load, how to post-process, at which precision.
#[derive(Args, Debug)]
struct ModelArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Class names, one per line, overriding the model metadata.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Confidence threshold (0..1): keep boxes scoring strictly above it [default: 0.25].
    #[arg(long, value_parser = parse_unit, allow_negative_numbers = true)]
    conf: Option<f32>,
    /// NMS IoU threshold (0..1).
    #[arg(long, default_value_t = 0.7, value_parser = parse_unit, allow_negative_numbers = true)]
    iou: f32,
    /// Maximum detections per image.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    max_det: u32,
    /// Keep only these class ids (comma separated).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<usize>>,
    /// Class-agnostic NMS.
    #[arg(long)]
    agnostic_nms: bool,
    /// Numeric precision: f32, f16 (CPUs with native half arithmetic; f32 elsewhere) or int8
    /// (activation ranges from --calibration, the adapter's own, or M.calibration.json beside
    /// the model).
    #[arg(long, default_value = "f32", value_parser = |s: &str| s.parse::<Precision>())]
    precision: Precision,
    /// Activation ranges for int8, from `perch calibrate` (overrides the adapter's own).
    #[arg(long, value_name = "FILE.json")]
    calibration: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DetectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write annotated images into this directory (created if missing).
    #[arg(long = "output-dir", alias = "out", value_name = "DIR")]
    out: Option<PathBuf>,
    /// Dynamic models: letterbox every image into a square imgsz x imgsz input instead of the
    /// smallest stride-aligned rectangle that holds it (Ultralytics' predictor default).
    #[arg(long)]
    square: bool,
    /// Images, or directories of .jpg/.jpeg/.png images.
    #[arg(required = true, value_name = "IMAGE_OR_DIR")]
    inputs: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Dataset YAML in Ultralytics format (path, train/val/test, names).
    #[arg(long, value_name = "data.yaml")]
    data: PathBuf,
    /// Which split to evaluate.
    #[arg(long, default_value = "val")]
    split: String,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image to run on (default: a mid-grey frame of the model's input size).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time every node of the optimised graph over the timed runs and print the costliest
    /// operator kinds and nodes.
    #[arg(long)]
    profile: bool,
    /// Dynamic models: run at the smallest stride-aligned input that holds --image (Ultralytics
    /// rectangular inference) instead of a square.
    #[arg(long, requires = "image")]
    rect: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Service configuration (TOML); see deploy/perch.toml. Without it, --model and --source
    /// run with the defaults of an empty configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, load the model and open the source, then exit.
    #[arg(long)]
    check_config: bool,
    /// Model to run (overrides the configuration; enough with --source for a quick start).
    #[arg(long, value_name = "M.onnx")]
    model: Option<PathBuf>,
    /// Frame source URI: v4l2:/dev/videoN, y4m:FILE, images:DIR_OR_GLOB, synthetic, or
    /// nokhwa:N (camera index; builds with the `nokhwa` feature only).
    #[arg(long, value_name = "URI")]
    source: Option<String>,
    /// Stop after this many frames have been processed (records written).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    frames: Option<u64>,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// Control socket of the service.
    #[arg(long, default_value = "/run/perch/control.sock", global = true)]
    socket: PathBuf,
    /// Seconds to wait for the reply (an activation builds a model first).
    #[arg(long, default_value_t = 120.0, global = true)]
    timeout: f64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Counters, latencies, model and adapter state.
    Status,
    /// Checks that the service answers.
    Ping,
    /// Re-reads the configuration file (like SIGHUP).
    Reload,
    /// Installed adapters, the active one and the last known good one.
    List,
    /// Copies an adapter file into the service's store after checking it against the running
    /// base model.
    Install {
        /// Adapter file to upload (.safetensors).
        #[arg(value_name = "X.safetensors")]
        file: PathBuf,
        /// Store name [default: the file name without extension].
        #[arg(long)]
        name: Option<String>,
    },
    /// Builds and health-checks an installed adapter ahead of time, so that activating it
    /// later only waits for the next frame.
    Stage {
        /// Store name of an installed adapter.
        name: String,
        /// Multiplier of the adapter's LoRA deltas (-10..=10).
        #[arg(long = "adapter-scale", alias = "scale", default_value_t = 1.0,
              value_parser = parse_scale, allow_negative_numbers = true)]
        scale: f32,
    },
    /// Builds, health-checks and swaps in an installed adapter while frames keep flowing.
    Activate {
        /// Store name of an installed adapter.
        name: String,
        /// Multiplier of the adapter's LoRA deltas (-10..=10).
        #[arg(long = "adapter-scale", alias = "scale", default_value_t = 1.0,
              value_parser = parse_scale, allow_negative_numbers = true)]
        scale: f32,
    },
    /// Runs the base model alone.
    Deactivate,
    /// Returns to the last known good adapter (or the one before the current one).
    Rollback,
    /// Deletes an installed adapter that is neither active nor the rollback target.
    Remove {
        /// Store name of an installed adapter.
        name: String,
    },
}

fn parse_imgsz(s: &str) -> Result<(usize, usize), String> {
    let hw = perch::model::parse_imgsz(s).ok_or_else(|| format!("'{s}' is not N or H,W"))?;
    if hw.0 == 0 || hw.1 == 0 || hw.0 > 8192 || hw.1 > 8192 {
        return Err(format!("'{s}': sizes must be 1..=8192"));
    }
    Ok(hw)
}

fn parse_scale(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    let max = perch::adapter::merge::MAX_STRENGTH;
    if !(v.is_finite() && v.abs() <= max) {
        return Err(format!("{v} is outside -{max}..={max}"));
    }
    Ok(v)
}

fn parse_unit(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is outside 0..1"));
    }
    Ok(v)
}

/// Runs a parsed command line and returns the exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Detect(a) => detect(a),
        Command::Bench(a) => bench(a).unwrap_or_else(|e| report_command_error(&e, exit::BAD_INPUT)),
        Command::Eval(a) => eval(a).unwrap_or_else(|e| report_command_error(&e, exit::BAD_INPUT)),
        Command::Run(a) => run_service(a),
        Command::Ctl(a) => ctl(a),
        Command::Adapter(c) => {
            adapter_cmd(c).unwrap_or_else(|e| report_command_error(&e, exit::BAD_INPUT))
        }
        Command::Calibrate(a) => {
            calibrate(a).unwrap_or_else(|e| report_command_error(&e, exit::BAD_INPUT))
        }
    }
}

/// Prints `e` and its causes on one line, skipping causes its message already includes
/// (library errors embed their source's text), and returns `code`.
fn report_error(e: &anyhow::Error, code: u8) -> u8 {
    eprintln!("perch: error: {}", exit::one_line(&**e));
    code
}

/// Writing to stdout failed (a closed pipe, a full disk, a closed descriptor): exit code
/// FAILURE, whatever the command.
#[derive(Debug, thiserror::Error)]
#[error("stdout: cannot write results: {0}")]
struct StdoutError(std::io::Error);

/// Writes one line to stdout and flushes it; the error names stdout instead of panicking as
/// `println!` does.
fn out_line(line: impl std::fmt::Display) -> Result<(), StdoutError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(StdoutError)
}

/// Fails when perch was started with file descriptor 1 closed. Rust's runtime then opens
/// `/dev/null` read-write on it before `main`, and every record would vanish without a word; a
/// shell's `>/dev/null` opens it write-only, so an intended discard still runs.
fn check_stdout_open() -> Result<(), StdoutError> {
    let closed = || StdoutError(std::io::Error::from_raw_os_error(libc::EBADF));
    // SAFETY: fcntl(F_GETFL) and fstat only query the descriptor.
    let flags = unsafe { libc::fcntl(1, libc::F_GETFL) };
    if flags == -1 {
        return Err(closed());
    }
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let null = std::fs::metadata("/dev/null").map(|m| std::os::unix::fs::MetadataExt::rdev(&m));
    if flags & libc::O_ACCMODE == libc::O_RDWR
        && unsafe { libc::fstat(1, &mut st) } == 0
        && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
        && null.is_ok_and(|r| r == st.st_rdev as u64)
    {
        return Err(closed());
    }
    Ok(())
}

/// The exit code for a failed command: FAILURE when stdout could not be written, else `code`.
fn report_command_error(e: &anyhow::Error, code: u8) -> u8 {
    let code = if e.downcast_ref::<StdoutError>().is_some() {
        exit::FAILURE
    } else {
        code
    };
    report_error(e, code)
}

impl ModelSource {
    /// The engine settings for this model at f32 with Ultralytics' predict thresholds.
    fn settings(&self) -> ModelSettings {
        ModelSettings {
            path: self.model.clone(),
            imgsz: self.imgsz,
            layout: self.layout,
            labels: None,
            adapter: self.adapter.clone(),
            adapter_scale: self.adapter_scale,
            params: PostprocessParams {
                conf: PREDICT_CONF,
                ..Default::default()
            },
            precision: Precision::F32,
            threads: self.threads as usize,
            calibration: None,
            calibration_role: CalibrationRole::Override,
            rect: None,
        }
    }
}

impl ModelArgs {
    /// The engine settings these arguments describe; `default_conf` applies without `--conf`.
    /// `--calibration` overrides the calibration an adapter carries.
    fn settings(&self, default_conf: f32) -> ModelSettings {
        ModelSettings {
            labels: self.labels.clone(),
            params: PostprocessParams {
                conf: self.conf.unwrap_or(default_conf),
                iou: self.iou,
                max_det: self.max_det as usize,
                classes: self.classes.clone(),
                agnostic: self.agnostic_nms,
            },
            precision: self.precision,
            calibration: self.calibration.clone(),
            ..self.source.settings()
        }
    }
}

/// Default confidence of `detect` and `bench` (Ultralytics predict).
const PREDICT_CONF: f32 = 0.25;
/// Default confidence of `eval` (Ultralytics val).
const VAL_CONF: f32 = 0.001;

/// The builder over the base model `settings` names, and the adapter they name (read and checked
/// against the base; `BuildTimings::read_ms` covers both).
fn load_engine(
    settings: &ModelSettings,
    times: &mut BuildTimings,
) -> anyhow::Result<(EngineBuilder, Option<Adapter>)> {
    let t = Instant::now();
    let builder = EngineBuilder::load(settings)?;
    let adapter = settings
        .adapter
        .as_deref()
        .map(|p| builder.load_adapter(p))
        .transpose()?;
    times.read_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((builder, adapter))
}

/// A detector as `settings` ask, built in one go (the input size fitted to `rect_for`, a frame's
/// width and height, where given and the model is dynamic).
fn build_detector(
    settings: &ModelSettings,
    times: &mut BuildTimings,
    rect_for: Option<(usize, usize)>,
) -> anyhow::Result<(Detector, Option<Adapter>)> {
    let (builder, adapter) = load_engine(settings, times)?;
    let scaled = adapter.as_ref().map(|x| (x, settings.adapter_scale));
    let model = builder.merged(scaled, Some(times))?;
    let det = builder.detector(&model, adapter.as_ref(), rect_for, Some(times))?;
    Ok((det, adapter))
}

/// Expands directories into their image files (sorted, non-recursive).
fn expand_inputs(inputs: &[PathBuf]) -> Vec<Result<PathBuf, anyhow::Error>> {
    let mut out = Vec::new();
    for p in inputs {
        if !p.is_dir() {
            out.push(Ok(p.clone()));
            continue;
        }
        match list_images(p) {
            Ok(files) => {
                if files.is_empty() {
                    out.push(Err(anyhow::anyhow!(
                        "{}: directory has no .jpg/.jpeg/.png images",
                        p.display()
                    )));
                }
                out.extend(files.into_iter().map(Ok));
            }
            Err(e) => out.push(Err(anyhow::anyhow!(
                "{}: cannot list directory: {e}",
                p.display()
            ))),
        }
    }
    out
}

/// Chooses `dir/<file name>`, adding `_N` before the extension if this run already wrote it.
fn annotated_path(
    dir: &Path,
    src: &Path,
    used: &mut std::collections::HashSet<PathBuf>,
) -> PathBuf {
    let stem = src
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().into_owned());
    let ext = src
        .extension()
        .map_or("png".into(), |e| e.to_string_lossy().to_ascii_lowercase());
    let ext = if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        ext
    } else {
        "png".into()
    };
    let mut candidate = dir.join(format!("{stem}.{ext}"));
    let mut n = 1;
    while used.contains(&candidate) {
        candidate = dir.join(format!("{stem}_{n}.{ext}"));
        n += 1;
    }
    used.insert(candidate.clone());
    candidate
}

/// Why one image of a `detect` run failed.
enum Failure {
    /// The image (or directory) is unusable: exit code BAD_INPUT.
    Input(anyhow::Error),
    /// Writing the annotated image failed: exit code FAILURE.
    Output(anyhow::Error),
    /// Nobody reads stdout any more (or it is full): stop.
    StdoutClosed(StdoutError),
    /// The model (with its options) cannot become a detector: exit code BAD_INPUT, stop.
    Model(anyhow::Error),
}

/// `detect`'s detectors, one per input size: a dynamic model letterboxed as Ultralytics'
/// predictor does it (`LetterBox(auto=True)`) runs at a size that depends on each image.
struct DetectorCache {
    builder: EngineBuilder,
    /// The base with the adapter merged (`None`: the base alone).
    merged: Option<OnnxModel>,
    adapter: Option<Adapter>,
    /// Fit each image (dynamic models without `--square`).
    rect: bool,
    built: Vec<((usize, usize), Detector)>,
}

impl DetectorCache {
    /// Prepared sizes kept at once; the oldest is dropped beyond this.
    const MAX: usize = 4;

    /// The model every detector of the cache runs.
    fn model(&self) -> &OnnxModel {
        self.merged.as_ref().unwrap_or(self.builder.base())
    }

    /// The detector for a `width` x `height` image, built on first use of its input size.
    fn for_image(&mut self, width: usize, height: usize) -> anyhow::Result<&mut Detector> {
        let rect_for = self.rect.then_some((width, height));
        let imgsz = self.builder.settings().imgsz;
        let hw = perch::detector::input_size(self.model(), imgsz, rect_for);
        let i = match self.built.iter().position(|(k, _)| *k == hw) {
            Some(i) => i,
            None => {
                if self.built.len() >= Self::MAX {
                    self.built.remove(0);
                }
                let det =
                    self.builder
                        .detector(self.model(), self.adapter.as_ref(), rect_for, None)?;
                self.built.push((hw, det));
                self.built.len() - 1
            }
        };
        Ok(&mut self.built[i].1)
    }
}

fn detect_one(
    dets: &mut DetectorCache,
    adapter: Option<&AdapterRef>,
    path: &Path,
    out_dir: Option<&Path>,
    used: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), Failure> {
    let mut frame = load_rgb(path).map_err(|e| Failure::Input(e.into()))?;
    let det = dets
        .for_image(frame.width(), frame.height())
        .map_err(Failure::Model)?;
    let (found, timings) = det.detect(&frame).map_err(|e| Failure::Input(e.into()))?;
    let mut record = ImageRecord {
        source: path.display().to_string(),
        width: frame.width(),
        height: frame.height(),
        detections: det.records(&found),
        timings_ms: timings.into(),
        adapter: adapter.cloned(),
        output: None,
    };
    // The annotated image is written first, so that the record names only a file that exists;
    // the record is printed either way.
    let mut saved = Ok(());
    if let Some(dir) = out_dir {
        let _ = draw_detections(&mut RgbCanvas::new(&mut frame), &found, det.labels());
        let dst = annotated_path(dir, path, used);
        saved = save_rgb(&frame, &dst);
        if saved.is_ok() {
            record.output = Some(dst.display().to_string());
        }
    }
    let line = serde_json::to_string(&record).map_err(|e| Failure::Output(e.into()))?;
    out_line(line).map_err(Failure::StdoutClosed)?;
    saved.map_err(|e| Failure::Output(e.into()))
}

fn detect(a: DetectArgs) -> u8 {
    if let Err(e) = check_stdout_open() {
        return report_error(&e.into(), exit::FAILURE);
    }
    let settings = a.model.settings(PREDICT_CONF);
    let (builder, adapter) = match load_engine(&settings, &mut Default::default()) {
        Ok(m) => m,
        Err(e) => return report_error(&e, exit::BAD_INPUT),
    };
    let merged = match builder.merged(adapter.as_ref().map(|x| (x, settings.adapter_scale)), None) {
        Ok(Cow::Owned(m)) => Some(m),
        Ok(Cow::Borrowed(_)) => None,
        Err(e) => return report_error(&e.into(), exit::BAD_INPUT),
    };
    let adapter_ref = adapter
        .as_ref()
        .map(|x| x.reference(settings.adapter_scale));
    let mut dets = DetectorCache {
        builder,
        merged,
        adapter,
        rect: false,
        built: Vec::new(),
    };
    dets.rect = !a.square && dets.model().input_shape().is_dynamic();
    let rect = dets.rect;
    // A model that cannot become a detector is one error before any image (with rect, the
    // first image's size is built then instead).
    if !rect && let Err(e) = dets.for_image(0, 0) {
        return report_error(&e, exit::BAD_INPUT);
    }
    if let Some(dir) = &a.out
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        let e = anyhow::anyhow!("{}: cannot create output directory: {e}", dir.display());
        return report_error(&e, exit::FAILURE);
    }
    let mut code = exit::OK;
    let mut used = std::collections::HashSet::new();
    for input in expand_inputs(&a.inputs) {
        let result = input.map_err(Failure::Input).and_then(|path| {
            detect_one(
                &mut dets,
                adapter_ref.as_ref(),
                &path,
                a.out.as_deref(),
                &mut used,
            )
        });
        match result {
            Ok(()) => {}
            Err(Failure::StdoutClosed(e)) => return report_error(&e.into(), exit::FAILURE),
            Err(Failure::Model(e)) => return report_error(&e, exit::BAD_INPUT),
            Err(Failure::Input(e)) => code = code.max(report_error(&e, exit::BAD_INPUT)),
            Err(Failure::Output(e)) => code = code.max(report_error(&e, exit::FAILURE)),
        }
    }
    code
}

fn calibrate(a: CalibrateArgs) -> anyhow::Result<u8> {
    let settings = a.model.settings();
    let (builder, adapter) = load_engine(&settings, &mut Default::default())?;
    let model = builder.merged(adapter.as_ref().map(|x| (x, settings.adapter_scale)), None)?;
    let mut det = builder.detector(&model, adapter.as_ref(), None, None)?;
    let (h, w) = det.input_hw();
    let mut cal = model.calibrator(h, w)?;
    let mut used = 0usize;
    for input in expand_inputs(&a.images) {
        if used >= a.max_images as usize {
            break;
        }
        let frame = match input.and_then(|p| load_rgb(&p).map_err(anyhow::Error::from)) {
            Ok(f) => f,
            Err(e) => {
                report_error(&e, exit::BAD_INPUT);
                continue;
            }
        };
        cal.observe(det.letterboxed(&frame))?;
        used += 1;
    }
    if used == 0 {
        anyhow::bail!("calibrate: no readable image among the inputs");
    }
    let cal = cal.finish();
    cal.save(&a.output)?;
    if let (Some(dst), Some(x)) = (&a.into_adapter, &adapter) {
        let mut x = x.clone();
        x.header.calibration = Some(cal.clone());
        let dtype = x.header.dtype;
        x.save(dst, dtype)?;
    }
    print_json(&serde_json::json!({
        "output": a.output.display().to_string(),
        "images": cal.images,
        "tensors": cal.absmax.len(),
        "model_fingerprint": cal.model_fingerprint,
    }))?;
    Ok(exit::OK)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn bench(a: BenchArgs) -> anyhow::Result<u8> {
    let mut load = BuildTimings::default();
    let image = a.image.as_deref().map(load_rgb).transpose()?;
    let rect_for = image
        .as_ref()
        .filter(|_| a.rect)
        .map(|f| (f.width(), f.height()));
    let (mut det, adapter) = build_detector(&a.model.settings(PREDICT_CONF), &mut load, rect_for)?;
    let scale = a.model.source.adapter_scale;
    let frame = match image {
        Some(f) => f,
        None => {
            let (h, w) = det.input_hw();
            RgbFrame::filled(w, h, [114, 114, 114])
        }
    };
    for _ in 0..a.warmup {
        det.detect(&frame)?;
    }
    let mut stages: [Vec<f64>; 4] = Default::default();
    let started = Instant::now();
    for _ in 0..a.iterations {
        let (_, t) = det.detect(&frame)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let v = [
            ms(t.preprocess),
            ms(t.inference),
            ms(t.postprocess),
            ms(t.preprocess + t.inference + t.postprocess),
        ];
        for (s, v) in stages.iter_mut().zip(v) {
            s.push(v);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let profile = if a.profile {
        Some(det.profile(&frame, a.iterations as usize)?)
    } else {
        None
    };
    for s in &mut stages {
        s.sort_by(f64::total_cmp);
    }
    let names = ["preprocess", "inference", "postprocess", "total"];
    let (h, w) = det.input_hw();
    let (float_kernels, int_kernels) = det.prepared().matrix_kernels();
    if a.json {
        let mut obj = serde_json::Map::new();
        obj.insert(
            "model".into(),
            a.model.source.model.display().to_string().into(),
        );
        obj.insert("imgsz".into(), serde_json::json!([h, w]));
        obj.insert("iterations".into(), a.iterations.into());
        obj.insert("threads".into(), det.prepared().threads().into());
        obj.insert(
            "inference_precision".into(),
            det.prepared().precision().to_string().into(),
        );
        obj.insert("adapter".into(), adapter_json(adapter.as_ref(), scale));
        obj.insert("f32_kernels".into(), float_kernels.into());
        obj.insert("int8_kernels".into(), int_kernels.into());
        obj.insert("read_ms".into(), load.read_ms.into());
        obj.insert("merge_ms".into(), load.merge_ms.into());
        obj.insert("prepare_ms".into(), load.prepare_ms.into());
        for (n, s) in names.iter().zip(&stages) {
            obj.insert(
                format!("{n}_ms"),
                serde_json::json!({"p50": percentile(s, 0.5), "p90": percentile(s, 0.9), "p99": percentile(s, 0.99), "min": s[0]}),
            );
        }
        obj.insert("fps".into(), (a.iterations as f64 / wall).into());
        if let Some(p) = &profile {
            let per_run = |s: f64| s * 1e3 / a.iterations as f64;
            obj.insert(
                "profile_ms".into(),
                p.iter()
                    .map(|n| serde_json::json!({"node": n.name, "op": n.op, "ms": per_run(n.seconds)}))
                    .collect(),
            );
        }
        out_line(format_args!("{}", serde_json::Value::Object(obj)))?;
    } else {
        out_line(format_args!(
            "model {}  input {h}x{w}  iterations {}  threads {}  precision {}",
            a.model.source.model.display(),
            a.iterations,
            det.prepared().threads(),
            det.prepared().precision()
        ))?;
        out_line(format_args!(
            "load: read {:.1} ms, adapter merge {:.1} ms, prepare (type + optimise) {:.1} ms{}",
            load.read_ms,
            load.merge_ms,
            load.prepare_ms,
            adapter
                .as_ref()
                .map_or(String::new(), |x| format!("  adapter {}", x.id()))
        ))?;
        out_line(format_args!(
            "matrix kernels: f32 {}; int8 {}",
            list_or_none(&float_kernels),
            list_or_none(&int_kernels)
        ))?;
        out_line(format_args!(
            "{:<12} {:>9} {:>9} {:>9} {:>9}",
            "stage (ms)", "p50", "p90", "p99", "min"
        ))?;
        for (n, s) in names.iter().zip(&stages) {
            out_line(format_args!(
                "{n:<12} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                percentile(s, 0.5),
                percentile(s, 0.9),
                percentile(s, 0.99),
                s[0]
            ))?;
        }
        out_line(format_args!(
            "throughput {:.1} frames/s",
            a.iterations as f64 / wall
        ))?;
        if let Some(p) = &profile {
            print_profile(p, a.iterations as usize)?;
        }
    }
    Ok(exit::OK)
}

/// Prints the per-node profile as two tables: time per operator kind, then the costliest nodes;
/// milliseconds per run.
fn print_profile(nodes: &[perch::model::NodeTime], runs: usize) -> Result<(), StdoutError> {
    let total: f64 = nodes.iter().map(|n| n.seconds).sum();
    let per_run = |s: f64| s * 1e3 / runs as f64;
    let share = |s: f64| if total > 0.0 { 100.0 * s / total } else { 0.0 };
    let mut kinds: Vec<(String, f64, usize)> = Vec::new();
    for n in nodes {
        match kinds.iter_mut().find(|k| k.0 == n.op) {
            Some(k) => {
                k.1 += n.seconds;
                k.2 += 1;
            }
            None => kinds.push((n.op.clone(), n.seconds, 1)),
        }
    }
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    out_line(format_args!(
        "profile: {:.3} ms per run in {} nodes",
        per_run(total),
        nodes.len()
    ))?;
    out_line(format_args!(
        "{:<28} {:>6} {:>10} {:>7}",
        "operator", "nodes", "ms/run", "%"
    ))?;
    for (op, s, count) in &kinds {
        out_line(format_args!(
            "{op:<28} {count:>6} {:>10.3} {:>6.1}%",
            per_run(*s),
            share(*s)
        ))?;
    }
    let mut top: Vec<&perch::model::NodeTime> = nodes.iter().collect();
    top.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out_line(format_args!(
        "{:<60} {:<20} {:>10} {:>7}",
        "node", "operator", "ms/run", "%"
    ))?;
    for n in top.iter().take(15) {
        out_line(format_args!(
            "{:<60} {:<20} {:>10.3} {:>6.1}%",
            n.name,
            n.op,
            per_run(n.seconds),
            share(n.seconds)
        ))?;
    }
    Ok(())
}

fn store_dtype(s: &StoreArgs) -> StoredDtype {
    if s.f32 {
        StoredDtype::F32
    } else {
        StoredDtype::F16
    }
}

fn print_json(v: &serde_json::Value) -> Result<(), StdoutError> {
    out_line(serde_json::to_string_pretty(v).unwrap_or_default())
}

fn adapter_cmd(c: AdapterCommand) -> anyhow::Result<u8> {
    match c {
        AdapterCommand::Inspect { adapter, base } => {
            let x = Adapter::load(&adapter)?;
            let mut summary = x.summary();
            if let Some(b) = base {
                let base = OnnxModel::load(&b)?;
                adapter::merge::merged_weights(&base, &x, 1.0)?;
                summary["fits"] = serde_json::json!({
                    "model": b.display().to_string(),
                    "fingerprint": base.fingerprint(),
                });
            }
            print_json(&summary)?;
        }
        AdapterCommand::Merge {
            base,
            adapter,
            scale,
            output,
        } => {
            let base = OnnxModel::load(&base)?;
            let x = Adapter::load_any(&adapter, &base)?;
            let t = Instant::now();
            let merged = adapter::merge::apply(&base, &x, scale)?;
            let merge_ms = t.elapsed().as_secs_f64() * 1e3;
            merged.save(&output)?;
            print_json(&serde_json::json!({
                "output": output.display().to_string(),
                "adapter": adapter_json(Some(&x), scale),
                "merge_ms": merge_ms,
            }))?;
        }
        AdapterCommand::Import {
            peft,
            base,
            output,
            name,
            name_map,
            channel_scales,
            store,
        } => {
            let base = OnnxModel::load(&base)?;
            // Scales named on the command line, else the directory's channel_scales.safetensors.
            let mut opts = match &channel_scales {
                Some(_) => ImportOptions::default(),
                None => ImportOptions::for_dir(&peft)?,
            };
            opts.name = name;
            if let Some(p) = name_map {
                let text = perch::fsutil::read_text(&p)
                    .with_context(|| format!("{}: cannot read name map", p.display()))?;
                opts.name_map = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a JSON object of strings", p.display()))?;
            }
            if let Some(p) = channel_scales {
                opts.channel_scales = adapter::peft::read_channel_scales(&p)?;
            }
            opts.class_names = store.labels.as_deref().map(read_labels).transpose()?;
            let x = adapter::peft::import(&peft, &base, &opts)?;
            let saved = x.save(&output, store_dtype(&store))?;
            print_json(&saved.summary())?;
        }
        AdapterCommand::Diff(d) => {
            let base = OnnxModel::load(&d.base)?;
            let tuned = OnnxModel::load(&d.tuned)?;
            let approx = match (d.rank, d.energy) {
                (Some(r), _) => adapter::diff::Approx::Rank(r),
                (None, Some(e)) if e > 0.0 && e <= 1.0 => adapter::diff::Approx::Energy(e),
                (None, Some(e)) => anyhow::bail!("--energy {e} is outside (0, 1]"),
                (None, None) => adapter::diff::Approx::Replace,
            };
            let name = d.name.clone().unwrap_or_else(|| {
                d.output
                    .file_stem()
                    .map_or("adapter".into(), |s| s.to_string_lossy().into_owned())
            });
            let labels = d.store.labels.as_deref().map(read_labels).transpose()?;
            let opts = adapter::diff::DiffOptions {
                freeze: d.freeze,
                approx,
                name,
                class_names: labels,
            };
            let (x, report) = adapter::diff::diff(&base, &tuned, &opts)?;
            let saved = x.save(&d.output, store_dtype(&d.store))?;
            let mut summary = saved.summary();
            summary["diff"] = serde_json::to_value(&report)?;
            print_json(&summary)?;
        }
    }
    Ok(exit::OK)
}

fn eval(a: EvalArgs) -> anyhow::Result<u8> {
    let data = perch::eval::Dataset::load(&a.data, &a.split)?;
    let (mut det, adapter) =
        build_detector(&a.model.settings(VAL_CONF), &mut Default::default(), None)?;
    let report = perch::eval::evaluate(&mut det, &data, &a.split)?;
    let mut v = serde_json::to_value(&report)?;
    v["model"] = a.model.source.model.display().to_string().into();
    v["adapter"] = adapter_json(adapter.as_ref(), a.model.source.adapter_scale);
    let (h, w) = det.input_hw();
    v["imgsz"] = serde_json::json!([h, w]);
    // "precision" is the detection metric; this is the arithmetic the model ran in.
    v["inference_precision"] = det.prepared().precision().to_string().into();
    if let Some(classes) = v["per_class"].as_array_mut() {
        for c in classes {
            let id = c["class_id"].as_u64().unwrap_or(0) as usize;
            c["label"] = data
                .names
                .get(id)
                .cloned()
                .unwrap_or_else(|| det.label(id))
                .into();
        }
    }
    out_line(format_args!("{v}"))?;
    Ok(exit::OK)
}

fn run_service(a: RunArgs) -> u8 {
    use perch::service::{self, Invocation, ServiceError};
    let source = match a
        .source
        .as_deref()
        .map(perch::camera::parse_uri)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return report_error(&anyhow::anyhow!("--source {e}"), exit::CONFIG),
    };
    let (model, frames) = (a.model.clone(), a.frames);
    let overrides = move |s: &mut perch::config::Settings| {
        if let Some(m) = &model {
            s.model.path = m.clone();
        }
        if let Some(k) = &source {
            s.source.kind = k.clone();
        }
        if frames.is_some() {
            s.source.max_frames = frames;
        }
    };
    let settings = match &a.config {
        Some(p) => service::load_settings(p),
        None if a.model.is_none() || a.source.is_none() => {
            let e = anyhow::anyhow!(
                "run needs --config FILE, or both --model and --source (see 'perch run --help')"
            );
            return report_error(&e, exit::BAD_INPUT);
        }
        None => {
            // --model and --source given: the defaults of an empty configuration.
            let text = "[model]\npath = \"-\"\n[source]\nuri = \"synthetic\"\n";
            perch::config::parse(text, Path::new("perch.toml"))
                .map_err(|e| ServiceError::Config(e.to_string()))
        }
    };
    let result = settings.and_then(|mut s| {
        overrides(&mut s);
        if a.check_config {
            let line = service::check(&s)?;
            return out_line(format_args!("{line}"))
                .map_err(|e| ServiceError::Runtime(e.to_string()));
        }
        service::run(
            s,
            Invocation {
                config_path: a.config.clone(),
                overrides: Box::new(overrides),
            },
        )
    });
    match result {
        Ok(()) => exit::OK,
        Err(ServiceError::Config(e)) => report_error(&anyhow::anyhow!(e), exit::CONFIG),
        Err(ServiceError::Runtime(e)) => report_error(&anyhow::anyhow!(e), exit::FAILURE),
    }
}

fn ctl(a: CtlArgs) -> u8 {
    use serde_json::json;
    let timeout = Duration::from_secs_f64(a.timeout.clamp(0.1, 3600.0));
    let mut payload = Vec::new();
    let req = match a.command {
        CtlCommand::Status => json!({"cmd": "status"}),
        CtlCommand::Ping => json!({"cmd": "ping"}),
        CtlCommand::Reload => json!({"cmd": "reload"}),
        CtlCommand::List => json!({"cmd": "list"}),
        CtlCommand::Deactivate => json!({"cmd": "deactivate"}),
        CtlCommand::Rollback => json!({"cmd": "rollback"}),
        CtlCommand::Remove { name } => json!({"cmd": "remove", "name": name}),
        CtlCommand::Stage { name, scale } => {
            json!({"cmd": "stage", "name": name, "scale": scale})
        }
        CtlCommand::Activate { name, scale } => {
            json!({"cmd": "activate", "name": name, "scale": scale})
        }
        CtlCommand::Install { file, name } => {
            let name = name.unwrap_or_else(|| {
                file.file_stem()
                    .map_or(String::new(), |s| s.to_string_lossy().into_owned())
            });
            payload = match perch::fsutil::read_limited(&file, perch::fsutil::MAX_ADAPTER_BYTES) {
                Ok(b) if b.is_empty() => {
                    let e = anyhow::anyhow!("{}: file is empty", file.display());
                    return report_error(&e, exit::BAD_INPUT);
                }
                Ok(b) => b,
                Err(e) => {
                    let e = anyhow::anyhow!("{}: cannot read: {e}", file.display());
                    return report_error(&e, exit::BAD_INPUT);
                }
            };
            json!({"cmd": "install", "name": name})
        }
    };
    match perch::service::control::request_with_payload(&a.socket, &req, &payload, timeout) {
        Ok(reply) => {
            use std::io::IsTerminal;
            let text = match std::io::stdout().is_terminal() {
                true => serde_json::to_string_pretty(&reply).unwrap_or_default(),
                false => reply.to_string(),
            };
            if let Err(e) = out_line(text) {
                return report_error(&e.into(), exit::FAILURE);
            }
            if reply["ok"] == true {
                exit::OK
            } else {
                exit::FAILURE
            }
        }
        Err(e) => report_error(
            &anyhow::anyhow!("{}: {e}", a.socket.display()),
            exit::FAILURE,
        ),
    }
}

/// An adapter's identity as every record and report prints it: `{"name","sha256","scale"}`,
/// or null for the base alone.
fn adapter_json(adapter: Option<&Adapter>, scale: f32) -> serde_json::Value {
    adapter.map_or(serde_json::Value::Null, |x| {
        serde_json::to_value(x.reference(scale)).unwrap_or_default()
    })
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
