//! The one way to get a runnable detector: a pristine base model, kept in memory, -> merge an
//! adapter into a copy -> quantize (int8) -> prepare (tract) -> [`Detector`].
//!
//! `detect`, `eval`, `bench`, `calibrate` and the service's swap thread all build through
//! [`EngineBuilder`]; they differ only in the [`ModelSettings`] they pass and in whether they
//! ask for [`BuildTimings`].
//!
//! int8 needs activation ranges. The ones a build uses, by precedence:
//! 1. a calibration file chosen for this run (`--calibration`: [`CalibrationRole::Override`]);
//! 2. the one the merged adapter carries (`perch calibrate --into-adapter`);
//! 3. the base model's: `model.calibration` in the service ([`CalibrationRole::Base`]), else
//!    `M.calibration.json` beside `M.onnx` ([`calibration_beside`]).
//!
//! Without any, an int8 build fails with [`EngineError::NoCalibration`], which names the flag,
//! the file it looked for and `perch calibrate`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::adapter::{self, Adapter, AdapterError};
use crate::config::ModelSettings;
use crate::detector::{Detector, DetectorError, DetectorOptions, read_labels};
use crate::model::{Calibration, ModelError, OnnxModel, Precision, PrepareOptions};
use crate::report::{ModelRef, ms};

/// Why an engine could not be built. Every message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The base model or a calibration file is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter is unreadable or does not fit the base.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The (merged) model is not a detector perch can run with these options, or the labels
    /// file is unusable.
    #[error(transparent)]
    Detector(#[from] DetectorError),
    /// int8 was asked for and no calibration applies.
    #[error(
        "{}: int8 needs a calibration: pass --calibration FILE (service: model.calibration), \
         or put {} beside the model; `perch calibrate` makes one",
        model.display(),
        beside.display()
    )]
    NoCalibration { model: PathBuf, beside: PathBuf },
}

/// Where a calibration file named in [`ModelSettings::calibration`] stands in the precedence
/// (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CalibrationRole {
    /// Chosen for this run (`--calibration`): used whatever adapter is merged.
    Override,
    /// The base model's (`model.calibration`): used unless the merged adapter carries its own.
    #[default]
    Base,
}

/// The calibration file perch looks for beside a model: `M.calibration.json` for `M.onnx`.
pub fn calibration_beside(model: &Path) -> PathBuf {
    model.with_extension("calibration.json")
}

/// Wall-clock milliseconds of the stages of one build.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct BuildTimings {
    /// Reading and parsing the base model and the adapter file.
    pub read_ms: f64,
    /// Merging the adapter into a copy of the base (0 without an adapter).
    pub merge_ms: f64,
    /// Quantizing (int8), typing, optimising and making the model runnable.
    pub prepare_ms: f64,
}

/// The input size of a detector an [`EngineBuilder`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSize {
    /// The settings' `imgsz` (dynamic models), else the model's own size or metadata.
    Configured,
    /// Dynamic models: the smallest stride-aligned input holding a frame of this (width,
    /// height) letterboxed at the configured size (see [`crate::detector::input_size`]).
    FitFrame(usize, usize),
    /// Dynamic models: exactly this (height, width).
    Exact(usize, usize),
}

/// Prepared detectors keyed by input (height, width), for inputs whose size depends on the
/// image (Ultralytics' rectangular letterboxes): at most [`DetectorsBySize::KEEP`], the oldest
/// dropped first.
#[derive(Default)]
pub struct DetectorsBySize {
    built: Vec<((usize, usize), Detector)>,
}

impl DetectorsBySize {
    /// Prepared sizes kept at once.
    pub const KEEP: usize = 4;

    /// The detector for input `hw`, made by `build` on first use of that size.
    pub fn get_or_build<E>(
        &mut self,
        hw: (usize, usize),
        build: impl FnOnce() -> Result<Detector, E>,
    ) -> Result<&mut Detector, E> {
        let i = match self.built.iter().position(|(k, _)| *k == hw) {
            Some(i) => i,
            None => {
                if self.built.len() >= Self::KEEP {
                    self.built.remove(0);
                }
                self.built.push((hw, build()?));
                self.built.len() - 1
            }
        };
        Ok(&mut self.built[i].1)
    }
}

/// A pristine base model and the settings every engine built from it shares.
pub struct EngineBuilder {
    base: OnnxModel,
    settings: ModelSettings,
    labels: Option<Vec<String>>,
    /// The settings' calibration file, or the one beside the model for int8, and its path.
    calibration: Option<(PathBuf, Arc<Calibration>)>,
    frame_size: Option<(usize, usize)>,
    reuse_graph: bool,
}

impl EngineBuilder {
    /// Reads the base model, the labels file and, for int8, the calibration the settings name
    /// (else the one beside the model, if present). `settings.adapter` is not read here: see
    /// [`EngineBuilder::load_adapter`].
    pub fn load(settings: &ModelSettings) -> Result<Self, EngineError> {
        let base = OnnxModel::load(&settings.path)?;
        let labels = settings.labels.as_deref().map(read_labels).transpose()?;
        let file = match &settings.calibration {
            Some(p) => Some(p.clone()),
            None if settings.precision == Precision::Int8 => {
                Some(calibration_beside(&settings.path)).filter(|p| p.exists())
            }
            None => None,
        };
        let calibration = match file {
            Some(p) => {
                let cal = Arc::new(Calibration::load(&p)?);
                Some((p, cal))
            }
            None => None,
        };
        Ok(EngineBuilder {
            base,
            settings: settings.clone(),
            labels,
            calibration,
            frame_size: None,
            reuse_graph: false,
        })
    }

    /// The camera frame size (width, height), used by builds when the settings ask for a
    /// rectangular input (`rect`).
    pub fn with_frame_size(mut self, size: Option<(usize, usize)>) -> Self {
        self.frame_size = size;
        self
    }

    /// With `on`, builds keep tract's decluttered graph and later builds that differ only in
    /// merged weight values start from it ([`PrepareOptions::reuse_graph`]): an adapter swap
    /// then costs the merge and tract's optimisation, not a full prepare. For the service,
    /// which swaps adapters; it costs one more copy of the weights in memory.
    pub fn with_graph_reuse(mut self, on: bool) -> Self {
        self.reuse_graph = on;
        self
    }

    /// The pristine base model (never changed by a build).
    pub fn base(&self) -> &OnnxModel {
        &self.base
    }

    /// The settings this builder was loaded with.
    pub fn settings(&self) -> &ModelSettings {
        &self.settings
    }

    /// The identity stamped on records: the base model's path and weight fingerprint (hashed
    /// on first use, then cached with the model).
    pub fn model_ref(&self) -> ModelRef {
        ModelRef {
            path: self.settings.path.display().to_string(),
            fingerprint: self.base.fingerprint(),
        }
    }

    /// Reads an adapter (perch file or PEFT directory) and checks that it fits the base.
    pub fn load_adapter(&self, path: &Path) -> Result<Adapter, EngineError> {
        Ok(Adapter::load_any(path, &self.base)?)
    }

    /// The base with `adapter` merged at its scale into a copy, or the base itself.
    pub fn merged(
        &self,
        adapter: Option<(&Adapter, f32)>,
        timings: Option<&mut BuildTimings>,
    ) -> Result<Cow<'_, OnnxModel>, EngineError> {
        let Some((a, scale)) = adapter else {
            return Ok(Cow::Borrowed(&self.base));
        };
        let t = Instant::now();
        let merged = adapter::merge::apply(&self.base, a, scale)?;
        let merge_ms = ms(t.elapsed());
        log::info!("merged adapter {} in {merge_ms:.1} ms", a.id());
        if let Some(timings) = timings {
            timings.merge_ms = merge_ms;
        }
        Ok(Cow::Owned(merged))
    }

    /// The model running every adapter of `tasks` as its own task on one shared trunk
    /// ([`OnnxModel::shared_trunk`]), each merged at its scale; with one adapter (or none) this
    /// is [`EngineBuilder::merged`] and the model is exactly today's.
    ///
    /// Fails with [`EngineError::Adapter`] naming the adapter whose merge failed, and with
    /// [`EngineError::Model`] when the graph cannot be split (see `shared_trunk`).
    pub fn merged_tasks(
        &self,
        tasks: &[(&Adapter, f32)],
        timings: Option<&mut BuildTimings>,
    ) -> Result<Cow<'_, OnnxModel>, EngineError> {
        if tasks.len() < 2 {
            return self.merged(tasks.first().copied(), timings);
        }
        let t = Instant::now();
        let mut merged = Vec::with_capacity(tasks.len());
        for (a, scale) in tasks {
            merged.push((
                a.header.name.clone(),
                adapter::merge::apply(&self.base, a, *scale)?,
            ));
        }
        let refs: Vec<(String, &OnnxModel)> = merged.iter().map(|(n, m)| (n.clone(), m)).collect();
        let (model, _) = self.base.shared_trunk(&refs)?;
        let merge_ms = ms(t.elapsed());
        log::info!("merged {} task adapters in {merge_ms:.1} ms", tasks.len());
        if let Some(timings) = timings {
            timings.merge_ms = merge_ms;
        }
        Ok(Cow::Owned(model))
    }

    /// The calibration a build of `model` with `adapter` merged uses (module documentation).
    fn calibration_for(
        &self,
        model: &OnnxModel,
        adapter: Option<&Adapter>,
    ) -> Result<Option<Arc<Calibration>>, EngineError> {
        if self.settings.precision != Precision::Int8 {
            return Ok(None);
        }
        let carried = adapter.and_then(|a| a.header.calibration.clone().map(Arc::new));
        let file = match self.settings.calibration_role {
            CalibrationRole::Override => self.calibration.as_ref(),
            CalibrationRole::Base => self.calibration.as_ref().filter(|_| carried.is_none()),
        };
        if let Some((path, cal)) = file {
            // The base's calibration standing in for an adapter without one is the documented
            // fallback; anything else should have been measured on this very model.
            let fallback =
                adapter.is_some() && self.settings.calibration_role == CalibrationRole::Base;
            if !fallback && cal.model_fingerprint != model.fingerprint() {
                log::warn!(
                    "{}: measured on another model (or with an adapter merged); int8 ranges may not fit {}",
                    path.display(),
                    self.settings.path.display()
                );
            }
            return Ok(Some(cal.clone()));
        }
        match carried {
            Some(cal) => Ok(Some(cal)),
            None => Err(EngineError::NoCalibration {
                model: self.settings.path.clone(),
                beside: calibration_beside(&self.settings.path),
            }),
        }
    }

    /// The calibration of a shared-trunk `model` of `tasks`: each task's own, combined.
    fn tasks_calibration(
        &self,
        model: &OnnxModel,
        tasks: &[&Adapter],
    ) -> Result<Option<Arc<Calibration>>, EngineError> {
        if tasks.len() < 2 || model.tasks().is_empty() {
            return self.calibration_for(model, tasks.first().copied());
        }
        let mut per_task = Vec::with_capacity(tasks.len());
        for a in tasks {
            match self.calibration_for(&self.base, Some(a))? {
                Some(c) => per_task.push(c),
                None => return Ok(None),
            }
        }
        let refs: Vec<&Calibration> = per_task.iter().map(|c| &**c).collect();
        Ok(model.task_calibration(&refs).map(Arc::new))
    }

    /// A detector for `model` (the base, or [`EngineBuilder::merged`] with `adapter`) at
    /// `size`.
    pub fn detector(
        &self,
        model: &OnnxModel,
        adapter: Option<&Adapter>,
        size: InputSize,
        timings: Option<&mut BuildTimings>,
    ) -> Result<Detector, EngineError> {
        self.tasks_detector(model, adapter.as_slice(), size, timings)
    }

    /// A detector for `model` as [`EngineBuilder::merged_tasks`] made it from `tasks` (in the
    /// same order), at `size`: one detector whose [`Detector::detect_tasks`] gives every task's
    /// detections.
    pub fn tasks_detector(
        &self,
        model: &OnnxModel,
        tasks: &[&Adapter],
        size: InputSize,
        timings: Option<&mut BuildTimings>,
    ) -> Result<Detector, EngineError> {
        let (imgsz, rect_for) = match size {
            InputSize::Configured => (self.settings.imgsz, None),
            InputSize::FitFrame(w, h) => (self.settings.imgsz, Some((w, h))),
            InputSize::Exact(h, w) => (Some((h, w)), None),
        };
        let opts = DetectorOptions {
            imgsz,
            layout: self.settings.layout,
            labels: self.labels.clone(),
            params: self.settings.params.clone(),
            prepare: PrepareOptions {
                precision: self.settings.precision,
                threads: self.settings.threads,
                calibration: self.tasks_calibration(model, tasks)?,
                reuse_graph: self.reuse_graph,
            },
            rect_for,
        };
        let t = Instant::now();
        let detector = Detector::new(model, opts)?;
        if let Some(timings) = timings {
            timings.prepare_ms = ms(t.elapsed());
        }
        Ok(detector)
    }

    /// Merges `adapter` (if any) into a copy of the base and prepares a detector at the
    /// configured input size (fitted to the frame size when the settings ask for `rect`).
    pub fn build(
        &self,
        adapter: Option<(&Adapter, f32)>,
        timings: Option<&mut BuildTimings>,
    ) -> Result<Detector, EngineError> {
        self.build_tasks(adapter.as_slice(), timings)
    }

    /// Like [`EngineBuilder::build`] for any number of adapters: several make one detector
    /// with one task each, on a shared trunk ([`EngineBuilder::merged_tasks`]).
    pub fn build_tasks(
        &self,
        tasks: &[(&Adapter, f32)],
        mut timings: Option<&mut BuildTimings>,
    ) -> Result<Detector, EngineError> {
        let t = Instant::now();
        let model = self.merged_tasks(tasks, timings.as_deref_mut())?;
        let fit = match self.settings.rect {
            Some(explicit) => explicit,
            None => self.base.input_shape().is_dynamic(),
        };
        let size = match self.frame_size.filter(|_| fit) {
            Some((w, h)) => InputSize::FitFrame(w, h),
            None => InputSize::Configured,
        };
        let adapters: Vec<&Adapter> = tasks.iter().map(|(a, _)| *a).collect();
        let detector = self.tasks_detector(&model, &adapters, size, timings)?;
        log::info!(
            "model {} ready in {:.0} ms{}",
            self.settings.path.display(),
            ms(t.elapsed()),
            match tasks {
                [] => String::new(),
                [(a, s)] => format!(" with adapter {} (scale {s})", a.id()),
                many => format!(
                    " with {} task adapters: {}",
                    many.len(),
                    many.iter()
                        .map(|(a, s)| format!("{} (scale {s})", a.id()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        );
        Ok(detector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_sits_beside_the_model() {
        assert_eq!(
            calibration_beside(Path::new("models/tree-yolo11n-320.onnx")),
            PathBuf::from("models/tree-yolo11n-320.calibration.json")
        );
        assert_eq!(
            calibration_beside(Path::new("/m/yolo")),
            PathBuf::from("/m/yolo.calibration.json")
        );
    }
}
