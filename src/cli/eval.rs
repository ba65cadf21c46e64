//! `perch eval`: accuracy on a YOLO-format dataset, as Ultralytics `val` computes it.

use super::*;

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
}

pub(super) fn eval(a: EvalArgs) -> anyhow::Result<u8> {
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
