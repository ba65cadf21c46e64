//! `perch detect`: still images to JSON records and annotated copies.

use super::*;
use perch::engine::DetectorsBySize;

#[derive(Args, Debug)]
pub(super) struct DetectArgs {
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

/// Chooses `dir/<file name>`, adding `_N` before the extension if this run already wrote it.
pub(super) fn annotated_path(
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
pub(super) enum Failure {
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
pub(super) struct DetectorCache {
    builder: EngineBuilder,
    /// The base with the adapters merged (`None`: the base alone).
    merged: Option<OnnxModel>,
    /// One adapter per task (none: the base alone).
    adapters: Vec<Adapter>,
    /// Fit each image (dynamic models without `--square`).
    rect: bool,
    built: DetectorsBySize,
}

impl DetectorCache {
    /// The model every detector of the cache runs.
    fn model(&self) -> &OnnxModel {
        self.merged.as_ref().unwrap_or(self.builder.base())
    }

    /// The detector for a `width` x `height` image, built on first use of its input size.
    fn for_image(&mut self, width: usize, height: usize) -> anyhow::Result<&mut Detector> {
        let rect_for = self.rect.then_some((width, height));
        let builder = &self.builder;
        let adapters: Vec<&Adapter> = self.adapters.iter().collect();
        let model = self.merged.as_ref().unwrap_or(builder.base());
        let hw = perch::detector::input_size(model, builder.settings().imgsz, rect_for);
        let size = rect_for.map_or(InputSize::Configured, |(w, h)| InputSize::FitFrame(w, h));
        let det = self
            .built
            .get_or_build(hw, || builder.tasks_detector(model, &adapters, size, None))?;
        Ok(det)
    }
}

pub(super) fn detect_one(
    dets: &mut DetectorCache,
    adapters: &[AdapterRef],
    path: &Path,
    out_dir: Option<&Path>,
    used: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), Failure> {
    let mut frame = load_rgb(path).map_err(|e| Failure::Input(e.into()))?;
    let det = dets
        .for_image(frame.width(), frame.height())
        .map_err(Failure::Model)?;
    let (mut found, timings) = det
        .detect_tasks(&frame)
        .map_err(|e| Failure::Input(e.into()))?;
    // One task: its failure is the image's. Several: the record says which task failed and
    // the others' detections stand; the image still ends in an error line (exit 2).
    if adapters.len() <= 1 && found.first().is_some_and(Result::is_err) {
        let e = found.swap_remove(0).err().map(anyhow::Error::from);
        return Err(Failure::Input(
            e.unwrap_or_else(|| anyhow::anyhow!("no output")),
        ));
    }
    let task_error = perch::detector::task_failure(adapters, &found)
        .map(|e| anyhow::anyhow!("{}: {e}", path.display()));
    let (detections, tasks) = det.record_detections(adapters, &found);
    let mut record = ImageRecord {
        source: path.display().to_string(),
        width: frame.width(),
        height: frame.height(),
        detections,
        tasks,
        timings_ms: timings.into(),
        adapter: adapters.first().cloned().filter(|_| adapters.len() == 1),
        output: None,
    };
    // The annotated image is written first, so that the record names only a file that exists;
    // the record is printed either way.
    let mut saved = Ok(());
    if let Some(dir) = out_dir {
        let _ = draw_detections(
            &mut RgbCanvas::new(&mut frame),
            &det.overlay_detections(&found),
            &det.overlay_labels(),
        );
        let dst = annotated_path(dir, path, used);
        saved = save_rgb(&frame, &dst);
        if saved.is_ok() {
            record.output = Some(dst.display().to_string());
        }
    }
    let line = serde_json::to_string(&record).map_err(|e| Failure::Output(e.into()))?;
    out_line(line).map_err(Failure::StdoutClosed)?;
    if let Some(e) = task_error {
        return Err(Failure::Input(e));
    }
    saved.map_err(|e| Failure::Output(e.into()))
}

pub(super) fn detect(a: DetectArgs) -> u8 {
    if let Err(e) = check_stdout_open() {
        return report_error(&e.into(), exit::FAILURE);
    }
    let settings = a.model.settings(PREDICT_CONF);
    let (builder, adapters) = match load_engine(&settings, &mut Default::default()) {
        Ok(m) => m,
        Err(e) => return report_error(&e, exit::BAD_INPUT),
    };
    let merged = match builder.merged_tasks(&scaled(&adapters, settings.adapter_scale), None) {
        Ok(Cow::Owned(m)) => Some(m),
        Ok(Cow::Borrowed(_)) => None,
        Err(e) => return report_error(&e.into(), exit::BAD_INPUT),
    };
    let adapter_refs: Vec<AdapterRef> = adapters
        .iter()
        .map(|x| x.reference(settings.adapter_scale))
        .collect();
    let mut dets = DetectorCache {
        builder,
        merged,
        adapters,
        rect: false,
        built: DetectorsBySize::default(),
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
            detect_one(&mut dets, &adapter_refs, &path, a.out.as_deref(), &mut used)
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
