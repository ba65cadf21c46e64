//! Subcommands of the `perch` binary. Each returns a `perch::exit` code; errors are printed as
//! one line `perch: error: <file>: <reason>` on stderr. This file holds the argument types
//! several subcommands share, the engine loading they all go through (`perch::engine`) and the
//! output helpers; each subcommand lives in its own file.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use perch::adapter::{self, Adapter, StoredDtype, peft::ImportOptions};
use perch::config::ModelSettings;
use perch::detector::read_labels;
use perch::engine::{BuildTimings, CalibrationRole, EngineBuilder, InputSize};
use perch::exit;
use perch::image_io::{IMAGE_EXTENSIONS, list_images, load_rgb, save_rgb};
use perch::model::{OnnxModel, Precision};
use perch::overlay::{RgbCanvas, draw_detections};
use perch::report::{AdapterRef, ImageRecord};
use perch::{Detector, Layout, PostprocessParams, RgbFrame};

mod adapters;
mod bench;
mod calibrate;
mod detect;
mod eval;
mod serve;

use adapters::{AdapterCommand, adapter_cmd};
use bench::{BenchArgs, bench};
use calibrate::{CalibrateArgs, calibrate};
use detect::{DetectArgs, detect};
use eval::{EvalArgs, eval};
use serve::{CtlArgs, RunArgs, ctl, run_service};

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
    /// Repeat it to run several task adapters at once on the layers they share (`detect`,
    /// `eval`, `bench`): each adapter is one task, with its own detections.
    #[arg(long, value_name = "X")]
    adapter: Vec<PathBuf>,
    /// Multiplier of the adapters' LoRA deltas (-10..=10).
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
            imgsz: self.imgsz,
            layout: self.layout,
            adapters: self.adapter.clone(),
            adapter_scale: self.adapter_scale,
            threads: self.threads as usize,
            calibration_role: CalibrationRole::Override,
            ..ModelSettings::new(self.model.clone())
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

/// The builder over the base model `settings` names, and the adapters they name (read and
/// checked against the base; `BuildTimings::read_ms` covers both). The same adapter file twice,
/// or two adapters with the same name, is refused: their tasks could not be told apart.
fn load_engine(
    settings: &ModelSettings,
    times: &mut BuildTimings,
) -> anyhow::Result<(EngineBuilder, Vec<Adapter>)> {
    let t = Instant::now();
    let builder = EngineBuilder::load(settings)?;
    let mut adapters: Vec<Adapter> = Vec::with_capacity(settings.adapters.len());
    for p in &settings.adapters {
        let x = builder.load_adapter(p)?;
        if let Some(same) = adapters
            .iter()
            .find(|y| y.sha256() == x.sha256() || y.header.name == x.header.name)
        {
            anyhow::bail!(
                "{}: adapter '{}' is given twice (also as {}); each task needs its own adapter",
                p.display(),
                x.header.name,
                same.path().display()
            );
        }
        adapters.push(x);
    }
    times.read_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((builder, adapters))
}

/// The adapters with the scale they are merged at.
fn scaled(adapters: &[Adapter], scale: f32) -> Vec<(&Adapter, f32)> {
    adapters.iter().map(|x| (x, scale)).collect()
}

/// A detector as `settings` ask, built in one go (the input size fitted to `rect_for`, a frame's
/// width and height, where given and the model is dynamic); several adapters make one
/// detector with one task each.
fn build_detector(
    settings: &ModelSettings,
    times: &mut BuildTimings,
    rect_for: Option<(usize, usize)>,
) -> anyhow::Result<(Detector, Vec<Adapter>)> {
    let (builder, adapters) = load_engine(settings, times)?;
    let model = builder.merged_tasks(&scaled(&adapters, settings.adapter_scale), Some(times))?;
    let size = rect_for.map_or(InputSize::Configured, |(w, h)| InputSize::FitFrame(w, h));
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let det = builder.tasks_detector(&model, &refs, size, Some(times))?;
    Ok((det, adapters))
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

fn print_json(v: &serde_json::Value) -> Result<(), StdoutError> {
    out_line(serde_json::to_string_pretty(v).unwrap_or_default())
}

/// An adapter's identity as every record and report prints it: `{"name","sha256","scale"}`,
/// or null for the base alone.
fn adapter_json(adapter: Option<&Adapter>, scale: f32) -> serde_json::Value {
    adapter.map_or(serde_json::Value::Null, |x| {
        serde_json::to_value(x.reference(scale)).unwrap_or_default()
    })
}

/// Adds to a report object the adapters it ran with: `"adapter"` (one, or null) as before, and
/// with several, `"adapter": null` and `"tasks"`, one adapter identity per task.
fn insert_adapters(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    adapters: &[Adapter],
    scale: f32,
) {
    match adapters {
        [] | [_] => {
            obj.insert("adapter".into(), adapter_json(adapters.first(), scale));
        }
        many => {
            obj.insert("adapter".into(), serde_json::Value::Null);
            obj.insert(
                "tasks".into(),
                many.iter().map(|x| adapter_json(Some(x), scale)).collect(),
            );
        }
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
