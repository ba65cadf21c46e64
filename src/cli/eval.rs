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
    let (builder, adapter) = load_engine(&settings, &mut Default::default())?;
    let model = builder.merged(adapter.as_ref().map(|x| (x, settings.adapter_scale)), None)?;
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
    let mut build = |h: usize, w: usize| {
        let det = builder.detector(&model, adapter.as_ref(), InputSize::Exact(h, w), None)?;
        precision.get_or_insert(det.prepared().precision().to_string());
        Ok(det)
    };
    let report = perch::eval::evaluate(&mut build, &data, &a.split, geometry)?;
    let mut v = serde_json::to_value(&report)?;
    v["model"] = a.model.source.model.display().to_string().into();
    v["adapter"] = adapter_json(adapter.as_ref(), a.model.source.adapter_scale);
    v["imgsz"] = serde_json::json!([h, w]);
    v["rect_batch"] = match geometry {
        ValGeometry::Rect { batch, .. } => batch.into(),
        ValGeometry::Square(_) => serde_json::Value::Null,
    };
    // "precision" is the detection metric; this is the arithmetic the model ran in.
    v["inference_precision"] = precision.unwrap_or_default().into();
    if let Some(classes) = v["per_class"].as_array_mut() {
        for c in classes {
            let id = c["class_id"].as_u64().unwrap_or(0) as usize;
            c["label"] = data
                .names
                .get(id)
                .cloned()
                .or_else(|| model.metadata().names.as_ref()?.get(id).cloned())
                .unwrap_or_else(|| id.to_string())
                .into();
        }
    }
    out_line(format_args!("{v}"))?;
    Ok(exit::OK)
}
