//! The JSON records perch prints: one line per image (or frame).

use std::time::Duration;

use serde::Serialize;

/// Wall-clock time spent in each stage of one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
}

/// One detection as printed: box `[x1, y1, x2, y2]` in source-image pixels.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DetectionRecord {
    pub class_id: usize,
    pub label: String,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Per-stage wall-clock milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct TimingsMs {
    pub preprocess: f64,
    pub inference: f64,
    pub postprocess: f64,
}

impl From<StageTimings> for TimingsMs {
    fn from(t: StageTimings) -> Self {
        TimingsMs {
            preprocess: ms(t.preprocess),
            inference: ms(t.inference),
            postprocess: ms(t.postprocess),
        }
    }
}

/// The adapter a record was produced with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdapterRef {
    pub name: String,
    /// sha256 of the adapter file.
    pub sha256: String,
    /// LoRA delta scale it was merged with.
    #[serde(serialize_with = "f32_decimal")]
    pub scale: f32,
}

/// Serialises an `f32` as the shortest decimal that reads back as it (`0.001`, not the
/// `0.0010000000474974513` its widening to `f64` would print once it passes through a JSON
/// value).
pub fn f32_decimal<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.to_string().parse().unwrap_or(f64::from(*v)))
}

/// The model a record was produced with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRef {
    pub path: String,
    /// sha256 over the base model's initializers (see `OnnxModel::fingerprint`).
    pub fingerprint: String,
}

/// Per-stage wall-clock milliseconds of one camera frame.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct FrameTimingsMs {
    /// From capture until inference took the frame.
    pub wait: f64,
    #[serde(flatten)]
    pub stages: TimingsMs,
}

/// The record `perch run` emits for one frame: the `detect` record plus stream identity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FrameRecord<'a> {
    /// Frame sequence number, counted from 0 at service start across reconnects and reloads.
    pub seq: u64,
    /// Capture time, seconds since the Unix epoch (millisecond resolution).
    pub ts: f64,
    /// The frame's origin: the image file of an `images:` source, else the source URI.
    pub source: &'a str,
    pub width: usize,
    pub height: usize,
    /// The detections of a single-task engine (absent when several tasks run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Vec<DetectionRecord>>,
    /// Each task's detections when several task adapters run on a shared trunk, in task
    /// order (then `detections` and `adapter` are absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskDetections>>,
    pub timings_ms: FrameTimingsMs,
    /// Capture to the moment the record was written, milliseconds.
    pub frame_age_ms: f64,
    pub model: &'a ModelRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<&'a AdapterRef>,
}

/// Rounds a duration to milliseconds with microsecond resolution.
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The record `perch detect` prints for one image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageRecord {
    pub source: String,
    pub width: usize,
    pub height: usize,
    /// The detections of a single-task model (absent when several tasks run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Vec<DetectionRecord>>,
    /// Each task's detections when several task adapters run on a shared trunk, one entry per
    /// `--adapter` in order (then `detections` and `adapter` are absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskDetections>>,
    pub timings_ms: TimingsMs,
    /// Present when one adapter was merged into the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRef>,
    /// The annotated image written for this one (`detect --output-dir`), when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// One task's detections in an [`ImageRecord`] or a [`FrameRecord`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskDetections {
    /// The task's name (its adapter's name).
    pub task: String,
    pub adapter: AdapterRef,
    /// Empty when the task failed on this frame (see `error`).
    pub detections: Vec<DetectionRecord>,
    /// Why the task failed on this frame (its output was not finite); the other tasks'
    /// detections stand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_shape() {
        let r = ImageRecord {
            source: "a.jpg".into(),
            width: 4,
            height: 3,
            detections: Some(vec![DetectionRecord {
                class_id: 0,
                label: "Tree".into(),
                score: 0.5,
                bbox: [1.0, 2.0, 3.0, 3.0],
            }]),
            tasks: None,
            timings_ms: TimingsMs {
                preprocess: 1.0,
                inference: 2.0,
                postprocess: 0.5,
            },
            adapter: None,
            output: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"source":"a.jpg","width":4,"height":3,"detections":[{"class_id":0,"label":"Tree","score":0.5,"box":[1.0,2.0,3.0,3.0]}],"timings_ms":{"preprocess":1.0,"inference":2.0,"postprocess":0.5}}"#
        );
    }
}
