//! `perch calibrate`: int8 activation ranges measured on sample images.

use super::*;

#[derive(Args, Debug)]
pub(super) struct CalibrateArgs {
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

pub(super) fn calibrate(a: CalibrateArgs) -> anyhow::Result<u8> {
    let settings = a.model.settings();
    if settings.adapters.len() > 1 {
        anyhow::bail!(
            "calibrate: one adapter at a time (got {}); each task's calibration is measured with that adapter alone and combined when the tasks run together",
            settings.adapters.len()
        );
    }
    let (builder, adapters) = load_engine(&settings, &mut Default::default())?;
    let adapter = adapters.into_iter().next();
    let model = builder.merged(adapter.as_ref().map(|x| (x, settings.adapter_scale)), None)?;
    let mut det = builder.detector(&model, adapter.as_ref(), InputSize::Configured, None)?;
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
