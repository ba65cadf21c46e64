//! Subcommands of the `perch` binary. Each returns a `perch::exit` code; errors are printed as
//! one line `perch: error: <file>: <reason>` on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use perch::detector::{DetectorOptions, read_labels};
use perch::exit;
use perch::image_io::{IMAGE_EXTENSIONS, load_rgb, save_rgb};
use perch::model::OnnxModel;
use perch::overlay::{RgbCanvas, draw_detections};
use perch::report::{DetectionRecord, ImageRecord};
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
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// ONNX detector (Ultralytics YOLOv5/v8/v10/11/26 or YOLOX export).
    #[arg(long, value_name = "M.onnx")]
    model: PathBuf,
    /// Input size: N for NxN or H,W (dynamic models only; static models use their own size).
    #[arg(long, value_name = "N|H,W", value_parser = parse_imgsz)]
    imgsz: Option<(usize, usize)>,
    /// Force the output layout instead of inferring it.
    #[arg(long, value_parser = |s: &str| s.parse::<Layout>())]
    layout: Option<Layout>,
    /// Class names, one per line, overriding the model metadata.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Confidence threshold (0..1): keep boxes scoring strictly above it.
    #[arg(long, default_value_t = 0.25, value_parser = parse_unit)]
    conf: f32,
    /// NMS IoU threshold (0..1).
    #[arg(long, default_value_t = 0.7, value_parser = parse_unit)]
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
}

#[derive(Args, Debug)]
struct DetectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write annotated images into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Images, or directories of .jpg/.jpeg/.png images.
    #[arg(required = true, value_name = "IMAGE_OR_DIR")]
    inputs: Vec<PathBuf>,
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
}

fn parse_imgsz(s: &str) -> Result<(usize, usize), String> {
    let hw = perch::model::parse_imgsz(s).ok_or_else(|| format!("'{s}' is not N or H,W"))?;
    if hw.0 == 0 || hw.1 == 0 || hw.0 > 8192 || hw.1 > 8192 {
        return Err(format!("'{s}': sizes must be 1..=8192"));
    }
    Ok(hw)
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
        Command::Bench(a) => bench(a).unwrap_or_else(|e| report_error(&e, exit::BAD_INPUT)),
    }
}

/// Prints `e` and its causes on one line, skipping causes its message already includes
/// (library errors embed their source's text), and returns `code`.
fn report_error(e: &anyhow::Error, code: u8) -> u8 {
    let mut line = String::new();
    for cause in e.chain() {
        // Third-party messages may span lines; the contract is one line per error.
        let text = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    eprintln!("perch: error: {line}");
    code
}

fn build_detector(a: &ModelArgs) -> anyhow::Result<Detector> {
    let model = OnnxModel::load(&a.model)?;
    let labels = a.labels.as_deref().map(read_labels).transpose()?;
    let params = PostprocessParams {
        conf: a.conf,
        iou: a.iou,
        max_det: a.max_det as usize,
        classes: a.classes.clone(),
        agnostic: a.agnostic_nms,
    };
    Ok(Detector::new(
        &model,
        DetectorOptions {
            imgsz: a.imgsz,
            layout: a.layout,
            labels,
            params,
        },
    )?)
}

/// Expands directories into their image files (sorted, non-recursive).
fn expand_inputs(inputs: &[PathBuf]) -> Vec<Result<PathBuf, anyhow::Error>> {
    let mut out = Vec::new();
    for p in inputs {
        if !p.is_dir() {
            out.push(Ok(p.clone()));
            continue;
        }
        match std::fs::read_dir(p) {
            Ok(entries) => {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.is_file()
                            && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                                IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                            })
                    })
                    .collect();
                files.sort();
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
    /// Nobody reads stdout any more: stop.
    StdoutClosed,
}

fn detect_one(
    det: &mut Detector,
    path: &Path,
    out_dir: Option<&Path>,
    used: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), Failure> {
    let mut frame = load_rgb(path).map_err(|e| Failure::Input(e.into()))?;
    let (dets, timings) = det.detect(&frame).map_err(|e| Failure::Input(e.into()))?;
    let record = ImageRecord {
        source: path.display().to_string(),
        width: frame.width(),
        height: frame.height(),
        detections: dets
            .iter()
            .map(|d| DetectionRecord {
                class_id: d.class_id,
                label: det.label(d.class_id),
                score: d.score,
                bbox: d.bbox,
            })
            .collect(),
        timings_ms: timings.into(),
    };
    let line = serde_json::to_string(&record).map_err(|e| Failure::Output(e.into()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|_| Failure::StdoutClosed)?;
    if let Some(dir) = out_dir {
        let _ = draw_detections(&mut RgbCanvas::new(&mut frame), &dets, det.labels());
        let dst = annotated_path(dir, path, used);
        save_rgb(&frame, &dst).map_err(|e| Failure::Output(e.into()))?;
    }
    Ok(())
}

fn detect(a: DetectArgs) -> u8 {
    let mut det = match build_detector(&a.model) {
        Ok(d) => d,
        Err(e) => return report_error(&e, exit::BAD_INPUT),
    };
    if let Some(dir) = &a.out
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        let e = anyhow::anyhow!("{}: cannot create output directory: {e}", dir.display());
        return report_error(&e, exit::FAILURE);
    }
    let mut code = exit::OK;
    let mut used = std::collections::HashSet::new();
    for input in expand_inputs(&a.inputs) {
        let result = input
            .map_err(Failure::Input)
            .and_then(|path| detect_one(&mut det, &path, a.out.as_deref(), &mut used));
        match result {
            Ok(()) => {}
            Err(Failure::StdoutClosed) => return exit::FAILURE,
            Err(Failure::Input(e)) => code = code.max(report_error(&e, exit::BAD_INPUT)),
            Err(Failure::Output(e)) => code = code.max(report_error(&e, exit::FAILURE)),
        }
    }
    code
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn bench(a: BenchArgs) -> anyhow::Result<u8> {
    let mut det = build_detector(&a.model)?;
    let frame = match &a.image {
        Some(p) => load_rgb(p)?,
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
    for s in &mut stages {
        s.sort_by(f64::total_cmp);
    }
    let names = ["preprocess", "inference", "postprocess", "total"];
    let (h, w) = det.input_hw();
    if a.json {
        let mut obj = serde_json::Map::new();
        obj.insert("model".into(), a.model.model.display().to_string().into());
        obj.insert("input".into(), serde_json::json!([h, w]));
        obj.insert("iterations".into(), a.iterations.into());
        obj.insert("threads".into(), 1.into());
        for (n, s) in names.iter().zip(&stages) {
            obj.insert(
                format!("{n}_ms"),
                serde_json::json!({"p50": percentile(s, 0.5), "p90": percentile(s, 0.9), "p99": percentile(s, 0.99), "min": s[0]}),
            );
        }
        obj.insert("fps".into(), (a.iterations as f64 / wall).into());
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "model {}  input {h}x{w}  iterations {}  threads 1",
            a.model.model.display(),
            a.iterations
        );
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>9}",
            "stage (ms)", "p50", "p90", "p99", "min"
        );
        for (n, s) in names.iter().zip(&stages) {
            println!(
                "{n:<12} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                percentile(s, 0.5),
                percentile(s, 0.9),
                percentile(s, 0.99),
                s[0]
            );
        }
        println!("throughput {:.1} frames/s", a.iterations as f64 / wall);
    }
    Ok(exit::OK)
}
