//! The JSON records perch prints: one line per image (or frame).

use serde::Serialize;

use crate::detector::StageTimings;

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
        // Microsecond resolution keeps the JSON short; the clock is not finer in practice.
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
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
}

/// The record `perch detect` prints for one image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageRecord {
    pub source: String,
    pub width: usize,
    pub height: usize,
    pub detections: Vec<DetectionRecord>,
    pub timings_ms: TimingsMs,
    /// Present when an adapter was merged into the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRef>,
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
            detections: vec![DetectionRecord {
                class_id: 0,
                label: "Tree".into(),
                score: 0.5,
                bbox: [1.0, 2.0, 3.0, 3.0],
            }],
            timings_ms: TimingsMs {
                preprocess: 1.0,
                inference: 2.0,
                postprocess: 0.5,
            },
            adapter: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"source":"a.jpg","width":4,"height":3,"detections":[{"class_id":0,"label":"Tree","score":0.5,"box":[1.0,2.0,3.0,3.0]}],"timings_ms":{"preprocess":1.0,"inference":2.0,"postprocess":0.5}}"#
        );
    }
}
