//! `perch bench`: per-stage latency percentiles and the per-node profile.

use super::*;

#[derive(Args, Debug)]
pub(super) struct BenchArgs {
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

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

pub(super) fn bench(a: BenchArgs) -> anyhow::Result<u8> {
    let mut load = BuildTimings::default();
    let image = a.image.as_deref().map(load_rgb).transpose()?;
    let rect_for = image
        .as_ref()
        .filter(|_| a.rect)
        .map(|f| (f.width(), f.height()));
    let (mut det, adapters) = build_detector(&a.model.settings(PREDICT_CONF), &mut load, rect_for)?;
    let scale = a.model.source.adapter_scale;
    let frame = match image {
        Some(f) => f,
        None => {
            let (h, w) = det.input_hw();
            RgbFrame::filled(w, h, [114, 114, 114])
        }
    };
    // Every task's detections are decoded and checked, as a service frame would be.
    for _ in 0..a.warmup {
        det.detect_all(&frame)?;
    }
    let mut stages: [Vec<f64>; 4] = Default::default();
    let started = Instant::now();
    for _ in 0..a.iterations {
        let (_, t) = det.detect_all(&frame)?;
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
        insert_adapters(&mut obj, &adapters, scale);
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
            match adapters.as_slice() {
                [] => String::new(),
                [x] => format!("  adapter {}", x.id()),
                many => format!(
                    "  {} tasks: {}",
                    many.len(),
                    many.iter().map(|x| x.id()).collect::<Vec<_>>().join(", ")
                ),
            }
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
pub(super) fn print_profile(
    nodes: &[perch::model::NodeTime],
    runs: usize,
) -> Result<(), StdoutError> {
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
