//! A ready-to-run detector: a prepared model, its output layout, labels and thresholds, and the
//! per-frame pipeline letterbox -> inference -> decode -> NMS -> frame coordinates.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::frame::RgbFrame;
use crate::model::{ModelError, OnnxModel, PreparedModel, Session};
use crate::postprocess::{self, Detection, Layout, OutputSpec, PostprocessParams};
use crate::preprocess::{InputFormat, Letterbox, letterbox_into};
use crate::report::{AdapterRef, DetectionRecord, StageTimings, TaskDetections};

/// Input size used for dynamic models without `imgsz` metadata (Ultralytics' default).
pub const DEFAULT_IMGSZ: usize = 640;

/// Why a detector could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model is valid ONNX but not a detector perch understands.
    #[error("{}: not a supported detector: {reason}", path.display())]
    NotDetector { path: PathBuf, reason: String },
    /// A labels file could not be used.
    #[error("{}: bad labels file: {reason}", path.display())]
    Labels { path: PathBuf, reason: String },
    /// The class filter names a class the model does not have.
    #[error("{}: bad class filter: {reason}", path.display())]
    Classes { path: PathBuf, reason: String },
    /// The model produced NaN or infinite values (e.g. a broken adapter); the frame's
    /// detections would be meaningless.
    #[error("{}: output has a non-finite value ({value}) at index {index}", path.display())]
    NonFinite {
        path: PathBuf,
        index: usize,
        value: f32,
    },
}

/// How to build a [`Detector`]; `Default` follows the model's metadata and Ultralytics predict.
#[derive(Debug, Clone, Default)]
pub struct DetectorOptions {
    /// Input (height, width); default: the static input size, else metadata `imgsz`, else 640.
    pub imgsz: Option<(usize, usize)>,
    /// Force an output layout instead of inferring it.
    pub layout: Option<Layout>,
    /// Class names overriding the metadata.
    pub labels: Option<Vec<String>>,
    /// Thresholds, class filter, NMS mode.
    pub params: PostprocessParams,
    /// Precision, threads and int8 calibration of the prepared model.
    pub prepare: crate::model::PrepareOptions,
    /// Frame size (width, height) to fit: a dynamic model then runs at the smallest
    /// stride-aligned input holding the frame letterboxed at `imgsz` (see
    /// [`crate::preprocess::rect_input`]) instead of a square. Ignored by static models.
    pub rect_for: Option<(usize, usize)>,
}

/// Reads class names from a text file, one per line; blank lines are ignored.
pub fn read_labels(path: &Path) -> Result<Vec<String>, DetectorError> {
    let fail = |reason: String| DetectorError::Labels {
        path: path.to_path_buf(),
        reason,
    };
    let text = crate::fsutil::read_text(path).map_err(|e| fail(e.to_string()))?;
    let labels: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if labels.is_empty() {
        return Err(fail("no labels in file".into()));
    }
    Ok(labels)
}

/// One task of a detector: its name (none for a single-task model), class names and outputs.
#[derive(Debug, Clone)]
struct Task {
    name: Option<String>,
    labels: Vec<String>,
    /// Index of the task's first output (the one decoded) among the model's outputs.
    output: usize,
}

/// A detector bound to one model and input size. Owns its inference state: use one per thread.
///
/// A shared-trunk model ([`OnnxModel::shared_trunk`]) is one detector with several tasks, all
/// decoded from one run; every other model has one task.
pub struct Detector {
    path: PathBuf,
    prepared: PreparedModel,
    session: Session,
    spec: OutputSpec,
    format: InputFormat,
    tasks: Vec<Task>,
    input_hw: (usize, usize),
    input: Vec<f32>,
    params: PostprocessParams,
}

/// The input (height, width) a [`Detector`] built with these options runs at: a static model's
/// own size; for a dynamic one `imgsz`, else its `imgsz` metadata, else [`DEFAULT_IMGSZ`], and
/// with `rect_for = Some((frame_width, frame_height))` the smallest stride-aligned input that
/// holds that frame letterboxed at that size (Ultralytics' `LetterBox(auto=True)`).
pub fn input_size(
    model: &OnnxModel,
    imgsz: Option<(usize, usize)>,
    rect_for: Option<(usize, usize)>,
) -> (usize, usize) {
    let meta = model.metadata();
    let shape = model.input_shape();
    let input_hw = match (imgsz, shape.height, shape.width) {
        (Some(hw), _, _) => hw,
        (None, Some(h), Some(w)) => (h, w),
        (None, _, _) => meta.imgsz.unwrap_or((DEFAULT_IMGSZ, DEFAULT_IMGSZ)),
    };
    match rect_for {
        Some((fw, fh)) if fw > 0 && fh > 0 && shape.is_dynamic() => {
            let stride = meta.stride.filter(|s| *s > 0).unwrap_or(32);
            crate::preprocess::rect_input(fw, fh, input_hw.1, input_hw.0, stride)
        }
        _ => input_hw,
    }
}

impl Detector {
    /// Prepares `model` for inference and resolves its layout and labels.
    ///
    /// Fails with [`DetectorError::NotDetector`] for non-detection tasks (per metadata) or
    /// output shapes that match no supported layout, with [`DetectorError::Labels`] when given
    /// labels are not one per class of the model, and with [`DetectorError::Classes`] when the
    /// class filter names a class id the model does not have (where the class count is known).
    pub fn new(model: &OnnxModel, opts: DetectorOptions) -> Result<Self, DetectorError> {
        let path = model.path().to_path_buf();
        let not_detector = |reason: String| DetectorError::NotDetector {
            path: path.clone(),
            reason,
        };
        let meta = model.metadata();
        if let Some(task) = meta.task.as_deref()
            && task != "detect"
        {
            return Err(not_detector(format!(
                "metadata task is '{task}'; perch runs 'detect' models"
            )));
        }
        let input_hw = input_size(model, opts.imgsz, opts.rect_for);
        if opts.rect_for.is_some() && !model.input_shape().is_dynamic() {
            log::warn!(
                "{}: rectangular input needs a dynamic export; running at {}x{}",
                path.display(),
                input_hw.0,
                input_hw.1
            );
        }
        if let Some(stride) = meta.stride
            && stride > 0
            && (!input_hw.0.is_multiple_of(stride) || !input_hw.1.is_multiple_of(stride))
        {
            log::warn!(
                "{}: input {}x{} is not a multiple of the model stride {stride}",
                path.display(),
                input_hw.0,
                input_hw.1
            );
        }
        let prepared = model.prepare_with(input_hw.0, input_hw.1, &opts.prepare)?;
        let all_outputs = prepared.output_shapes();
        let outputs = match model.tasks().first() {
            Some(t) => all_outputs.get(t.outputs.clone()).unwrap_or(all_outputs),
            None => all_outputs,
        };
        if outputs.len() > 1 {
            log::warn!(
                "{}: model has {} outputs; using the first",
                path.display(),
                outputs.len()
            );
        }
        let meta_classes = meta.names.as_ref().map(Vec::len);
        let spec =
            postprocess::infer_layout(outputs, input_hw, meta_classes, meta.end2end, opts.layout)
                .map_err(not_detector)?;
        let num_classes = spec.num_classes.max(meta_classes.unwrap_or(0));
        let labels = match opts.labels.clone() {
            Some(l) if num_classes > 0 && l.len() != num_classes => {
                return Err(DetectorError::Labels {
                    path: path.clone(),
                    reason: format!(
                        "{} labels given for a model with {num_classes} classes",
                        l.len()
                    ),
                });
            }
            Some(l) => l,
            None => meta.names.clone().unwrap_or_default(),
        };
        if let Some(bad) = opts.params.classes.as_ref().and_then(|cs| {
            cs.iter()
                .find(|c| num_classes > 0 && **c >= num_classes)
                .copied()
        }) {
            return Err(DetectorError::Classes {
                path: path.clone(),
                reason: format!(
                    "class {bad} requested, but the model has {num_classes} classes (0..={})",
                    num_classes - 1
                ),
            });
        }
        let tasks = if model.tasks().is_empty() {
            vec![Task {
                name: None,
                labels,
                output: 0,
            }]
        } else {
            model
                .tasks()
                .iter()
                .map(|t| Task {
                    name: Some(t.name.clone()),
                    labels: match (&opts.labels, &t.names) {
                        (Some(_), _) | (None, None) => labels.clone(),
                        (None, Some(names)) => names.clone(),
                    },
                    output: t.outputs.start,
                })
                .collect()
        };
        let format = match spec.layout {
            Layout::Yolox => InputFormat::YOLOX,
            _ => InputFormat::ULTRALYTICS,
        };
        log::info!(
            "{}: layout {} with {} classes at input {}x{}",
            path.display(),
            spec.layout,
            spec.num_classes,
            input_hw.0,
            input_hw.1
        );
        let session = prepared.session()?;
        let input = vec![0.0; 3 * input_hw.0 * input_hw.1];
        Ok(Detector {
            path,
            prepared,
            session,
            spec,
            format,
            tasks,
            input_hw,
            input,
            params: opts.params,
        })
    }

    /// The model file this detector runs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolved output layout and class count.
    pub fn spec(&self) -> OutputSpec {
        self.spec
    }

    /// Class names of the first task (may be shorter than the class count when the model
    /// carries none).
    pub fn labels(&self) -> &[String] {
        &self.tasks[0].labels
    }

    /// Class names of task `task` (see [`Detector::task_names`]); empty for an unknown task.
    pub fn task_labels(&self, task: usize) -> &[String] {
        self.tasks.get(task).map_or(&[], |t| &t.labels)
    }

    /// The tasks' names, in output order: `[None]` for a single-task model.
    pub fn task_names(&self) -> Vec<Option<&str>> {
        self.tasks.iter().map(|t| t.name.as_deref()).collect()
    }

    /// The detections a record carries for `found` ([`Detector::detect_tasks`]'s results), as
    /// `(detections, tasks)`: with at most one adapter, the first result's records as
    /// `detections` (none if it failed); with several task adapters (`adapters`, in task order,
    /// each naming its task), one [`TaskDetections`] per task as `tasks`, a failed task with
    /// no detections and its error.
    pub fn record_detections(
        &self,
        adapters: &[AdapterRef],
        found: &[TaskResult],
    ) -> (Option<Vec<DetectionRecord>>, Option<Vec<TaskDetections>>) {
        if adapters.len() <= 1 {
            let first = found.first().and_then(|r| r.as_ref().ok());
            return (Some(self.records(first.map_or(&[], Vec::as_slice))), None);
        }
        let tasks = adapters
            .iter()
            .zip(found)
            .enumerate()
            .map(|(k, (a, f))| TaskDetections {
                task: a.name.clone(),
                adapter: a.clone(),
                detections: f.as_ref().map_or(Vec::new(), |f| self.task_records(k, f)),
                error: f.as_ref().err().map(|e| e.to_string()),
            })
            .collect();
        (None, Some(tasks))
    }

    /// Class names for drawing [`Detector::overlay_detections`]: the first task's labels for a
    /// single-task model; with several tasks, `task:label` for every class of every task.
    pub fn overlay_labels(&self) -> Vec<String> {
        if self.tasks.len() == 1 {
            return self.labels().to_vec();
        }
        let classes = self.overlay_classes();
        self.tasks
            .iter()
            .flat_map(|t| {
                let task = t.name.as_deref().unwrap_or("task");
                (0..classes).map(move |c| format!("{task}:{}", label_of(&t.labels, c)))
            })
            .collect()
    }

    /// Every task's detections (as [`Detector::detect_tasks`] returns them) as one list to draw
    /// with [`Detector::overlay_labels`]: task `k`'s class `c` becomes `k * classes + c`, so
    /// that each task's boxes get their own colours and names.
    /// Failed tasks draw nothing.
    pub fn overlay_detections(&self, found: &[TaskResult]) -> Vec<Detection> {
        fn ok(r: &TaskResult) -> &[Detection] {
            r.as_ref().map_or(&[], Vec::as_slice)
        }
        if self.tasks.len() == 1 {
            return found.first().map(ok).unwrap_or_default().to_vec();
        }
        let classes = self.overlay_classes();
        found
            .iter()
            .enumerate()
            .flat_map(|(k, dets)| {
                ok(dets).iter().map(move |d| Detection {
                    class_id: k * classes + d.class_id.min(classes - 1),
                    ..d.clone()
                })
            })
            .collect()
    }

    /// Classes per task in the overlay numbering: the model's class count, or the labels' when
    /// the model does not say (end-to-end exports without `names`), at least 1.
    fn overlay_classes(&self) -> usize {
        self.tasks
            .iter()
            .map(|t| t.labels.len())
            .fold(self.spec.num_classes, usize::max)
            .max(1)
    }

    /// Label of a class id of the first task, or `class<N>`.
    pub fn label(&self, class_id: usize) -> String {
        label_of(self.labels(), class_id)
    }

    /// Detections of the first task as printed in records, with their labels.
    pub fn records(&self, dets: &[Detection]) -> Vec<DetectionRecord> {
        self.task_records(0, dets)
    }

    /// Detections of task `task` as printed in records, with that task's labels.
    pub fn task_records(&self, task: usize, dets: &[Detection]) -> Vec<DetectionRecord> {
        let labels = self.task_labels(task);
        dets.iter()
            .map(|d| DetectionRecord {
                class_id: d.class_id,
                label: label_of(labels, d.class_id),
                score: d.score,
                bbox: d.bbox,
            })
            .collect()
    }

    /// Model input (height, width) in pixels.
    pub fn input_hw(&self) -> (usize, usize) {
        self.input_hw
    }

    /// Preprocessing convention in use.
    pub fn input_format(&self) -> InputFormat {
        self.format
    }

    /// The thresholds in use.
    pub fn params(&self) -> &PostprocessParams {
        &self.params
    }

    /// Runs the model on an already letterboxed NCHW input and returns the raw first output
    /// (shape, values). For tests and tools that compare raw tensors.
    pub fn run_raw(&mut self, input: &[f32]) -> Result<(Vec<usize>, Vec<f32>), DetectorError> {
        let mut outs = self.session.run(input)?;
        let o = outs.swap_remove(0);
        Ok((o.shape, o.data))
    }

    /// Letterboxes `frame` as `lb` says, runs the model and postprocesses: each task's
    /// detections in model-input pixels, best first, with the time of each stage. A task whose
    /// output is not finite fails alone.
    fn infer(
        &mut self,
        frame: &RgbFrame,
        lb: &Letterbox,
    ) -> Result<(Vec<TaskResult>, StageTimings), DetectorError> {
        let t0 = Instant::now();
        letterbox_into(frame, lb, &self.format, &mut self.input);
        let t1 = Instant::now();
        let outs = self.session.run(&self.input)?;
        let t2 = Instant::now();
        let mut dets = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            let out = outs.get(task.output).ok_or_else(|| {
                DetectorError::Model(ModelError::Run {
                    path: self.path.clone(),
                    reason: format!("no output {} for task {:?}", task.output, task.name),
                })
            })?;
            if let Some(index) = out.data.iter().position(|v| !v.is_finite()) {
                dets.push(Err(DetectorError::NonFinite {
                    path: self.path.clone(),
                    index,
                    value: out.data[index],
                }));
                continue;
            }
            dets.push(Ok(postprocess::postprocess(
                self.spec,
                &out.shape,
                &out.data,
                self.input_hw,
                &self.params,
            )));
        }
        let timings = StageTimings {
            preprocess: t1 - t0,
            inference: t2 - t1,
            postprocess: t2.elapsed(),
        };
        Ok((dets, timings))
    }

    /// The model input for `frame`: letterboxed NCHW values as the model expects them.
    pub fn letterboxed(&mut self, frame: &RgbFrame) -> &[f32] {
        let (h, w) = self.input_hw;
        let lb = Letterbox::new(frame.width(), frame.height(), w, h, self.format.placement);
        letterbox_into(frame, &lb, &self.format, &mut self.input);
        &self.input
    }

    /// Letterboxes `frame` and runs the model `runs` times, timing every node of the optimised
    /// graph (seconds summed over the runs, in plan order). For `perch bench --profile`.
    pub fn profile(
        &mut self,
        frame: &RgbFrame,
        runs: usize,
    ) -> Result<Vec<crate::model::NodeTime>, DetectorError> {
        let (h, w) = self.input_hw;
        let lb = Letterbox::new(frame.width(), frame.height(), w, h, self.format.placement);
        letterbox_into(frame, &lb, &self.format, &mut self.input);
        Ok(self.session.profile(&self.input, runs)?)
    }

    /// Detects objects in `frame` (the first task's, for a multi-task model): boxes in frame
    /// pixels, clipped, best first.
    ///
    /// Fails with [`DetectorError::NonFinite`] when the model output holds NaN or infinity.
    pub fn detect(
        &mut self,
        frame: &RgbFrame,
    ) -> Result<(Vec<Detection>, StageTimings), DetectorError> {
        let (mut dets, timings) = self.detect_tasks(frame)?;
        Ok((dets.swap_remove(0)?, timings))
    }

    /// Like [`Detector::detect`], for every task: one result per task, in
    /// [`Detector::task_names`] order, all from one run of the model. The outer error is the
    /// run's; a task whose output is not finite ([`DetectorError::NonFinite`]) fails alone, and
    /// the other tasks' detections stand.
    pub fn detect_tasks(
        &mut self,
        frame: &RgbFrame,
    ) -> Result<(Vec<TaskResult>, StageTimings), DetectorError> {
        let (h, w) = self.input_hw;
        let lb = Letterbox::new(frame.width(), frame.height(), w, h, self.format.placement);
        let (mut dets, timings) = self.infer(frame, &lb)?;
        for d in dets.iter_mut().flatten().flatten() {
            d.bbox = lb.box_to_source(d.bbox);
        }
        Ok((dets, timings))
    }

    /// Like [`Detector::detect_tasks`], but fails when any task does: every task's detections
    /// in frame pixels, in task order.
    pub fn detect_all(
        &mut self,
        frame: &RgbFrame,
    ) -> Result<(Vec<Vec<Detection>>, StageTimings), DetectorError> {
        let (found, timings) = self.detect_tasks(frame)?;
        Ok((found.into_iter().collect::<Result<_, _>>()?, timings))
    }

    /// Runs the model on `frame` letterboxed as `lb` says and returns the first task's
    /// detections in model-input pixels (no mapping back), best first. For evaluation, which
    /// matches there.
    pub fn detect_in_input_space(
        &mut self,
        frame: &RgbFrame,
        lb: &Letterbox,
    ) -> Result<Vec<Detection>, DetectorError> {
        self.infer(frame, lb)?.0.swap_remove(0)
    }

    /// Like [`Detector::detect_in_input_space`], for every task; fails when any task does.
    pub fn detect_tasks_in_input_space(
        &mut self,
        frame: &RgbFrame,
        lb: &Letterbox,
    ) -> Result<Vec<Vec<Detection>>, DetectorError> {
        self.infer(frame, lb)?.0.into_iter().collect()
    }

    /// Replaces the inference state with a fresh one, so that its buffers are allocated by the
    /// next thread that runs it (a state warmed on a build thread and then used and freed on the
    /// inference thread fragments glibc's heap across swaps).
    pub fn reset_session(&mut self) -> Result<(), DetectorError> {
        self.session = self.prepared.session()?;
        Ok(())
    }

    /// The prepared model, to spawn more sessions (e.g. one per worker thread).
    pub fn prepared(&self) -> &PreparedModel {
        &self.prepared
    }
}

/// One task's detections, or why that task failed on the frame.
pub type TaskResult = Result<Vec<Detection>, DetectorError>;

/// The first task of `found` that failed, as `task 'NAME': REASON` (task `k` is `adapters[k]`).
pub fn task_failure(adapters: &[AdapterRef], found: &[TaskResult]) -> Option<String> {
    adapters
        .iter()
        .zip(found)
        .find_map(|(a, r)| r.as_ref().err().map(|e| format!("task '{}': {e}", a.name)))
}

/// Label of `class_id` in `labels`, or `class<N>`.
fn label_of(labels: &[String], class_id: usize) -> String {
    labels
        .get(class_id)
        .cloned()
        .unwrap_or_else(|| format!("class{class_id}"))
}
