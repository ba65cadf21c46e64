//! `perch eval`: accuracy on a YOLO-format dataset, as Ultralytics `val` computes it.

use super::*;
use perch::eval::ValGeometry;

#[derive(Args, Debug)]
pub(super) struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Dataset YAML in Ultralytics format (path, train/val/test, names).
    #[arg(long, value_name = "data.yaml")]
    data: PathBuf,
    /// Which split to evaluate.
    #[arg(long, default_value = "val")]
    split: String,
    /// Dynamic models: images per batch of Ultralytics' rectangular validation, which groups
    /// images by aspect ratio and gives each batch one input shape (`yolo val`'s `batch`).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Dynamic models: evaluate every image at imgsz x imgsz instead (`yolo val rect=False`).
    #[arg(long)]
    square: bool,
}

pub(super) fn eval(a: EvalArgs) -> anyhow::Result<u8> {
    let data = perch::eval::Dataset::load(&a.data, &a.split)?;
    let settings = a.model.settings(VAL_CONF);
    let (builder, adapters) = load_engine(&settings, &mut Default::default())?;
    let model = builder.merged_tasks(&scaled(&adapters, settings.adapter_scale), None)?;
    let refs: Vec<&Adapter> = adapters.iter().collect();
    // A static export runs at its own (square) size; a dynamic one as `yolo val` shapes it.
    let (h, w) = perch::detector::input_size(&model, settings.imgsz, None);
    let geometry = match model.input_shape().is_dynamic() && !a.square {
        true => ValGeometry::Rect {
            imgsz: h.max(w),
            stride: model.metadata().stride.filter(|s| *s > 0).unwrap_or(32),
            batch: a.batch as usize,
        },
        false => ValGeometry::Square(h.max(w)),
    };
    let mut precision = None;
    let mut task_labels: Vec<Vec<String>> = Vec::new();
    let mut build = |h: usize, w: usize| {
        let det = builder.tasks_detector(&model, &refs, InputSize::Exact(h, w), None)?;
        precision.get_or_insert(det.prepared().precision().to_string());
        if task_labels.is_empty() {
            task_labels = (0..refs.len().max(1))
                .map(|k| det.task_labels(k).to_vec())
                .collect();
        }
        Ok(det)
    };
    let reports = perch::eval::evaluate_tasks(&mut build, &data, &a.split, geometry)?;
    let mut task_values = Vec::with_capacity(reports.len());
    for (k, report) in reports.iter().enumerate() {
        let mut v = serde_json::to_value(report)?;
        if let Some(classes) = v["per_class"].as_array_mut() {
            for c in classes {
                let id = c["class_id"].as_u64().unwrap_or(0) as usize;
                // One task: the model's own names, as before task sets; several: each task's.
                let fallback = match adapters.len() {
                    0 | 1 => model.metadata().names.as_deref(),
                    _ => task_labels.get(k).map(Vec::as_slice),
                };
                c["label"] = data
                    .names
                    .get(id)
                    .or_else(|| fallback?.get(id))
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
                    .into();
            }
        }
        task_values.push(v);
    }
    let scale = a.model.source.adapter_scale;
    let mut v = if adapters.len() > 1 {
        let tasks: Vec<serde_json::Value> = task_values
            .into_iter()
            .zip(&adapters)
            .map(|(mut t, x)| {
                t["task"] = x.header.name.clone().into();
                t["adapter"] = adapter_json(Some(x), scale);
                t
            })
            .collect();
        serde_json::json!({ "tasks": tasks })
    } else {
        task_values.swap_remove(0)
    };
    v["model"] = a.model.source.model.display().to_string().into();
    if adapters.len() <= 1 {
        v["adapter"] = adapter_json(adapters.first(), scale);
    }
    v["imgsz"] = serde_json::json!([h, w]);
    v["rect_batch"] = match geometry {
        ValGeometry::Rect { batch, .. } => batch.into(),
        ValGeometry::Square(_) => serde_json::Value::Null,
    };
    // "precision" is the detection metric; this is the arithmetic the model ran in.
    v["inference_precision"] = precision.unwrap_or_default().into();
    out_line(format_args!("{v}"))?;
    Ok(exit::OK)
}
