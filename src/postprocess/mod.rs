//! Turning raw model outputs into detections: output-layout detection, per-layout decoding,
//! class filtering and NMS. Pure functions over plain slices; coordinates are model-input pixels
//! until [`crate::preprocess::Letterbox::box_to_source`] maps them to the frame.

mod nms;

pub use nms::{iou, nms};

use std::fmt;
use std::str::FromStr;

/// One detection: class index, confidence in 0..1 and an `[x1, y1, x2, y2]` box in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub class_id: usize,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// How a detector lays out its output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// YOLOv8 / YOLO11 / YOLO26 one-to-many head, `[1, 4 + nc, N]`: cx, cy, w, h, class scores.
    Yolov8,
    /// YOLOv10 / YOLO26 end-to-end head, `[1, K, 6]`: x1, y1, x2, y2, score, class; no NMS.
    EndToEnd,
    /// ultralytics/yolov5 export, `[1, N, 5 + nc]`: cx, cy, w, h, objectness, class scores.
    Yolov5,
    /// YOLOX official export, `[1, N, 5 + nc]` raw grid outputs (offsets, log sizes, objectness,
    /// class scores) that need grid/stride decoding.
    Yolox,
}

impl Layout {
    /// All layouts with their CLI names.
    pub const ALL: [(&'static str, Layout); 4] = [
        ("yolov8", Layout::Yolov8),
        ("end2end", Layout::EndToEnd),
        ("yolov5", Layout::Yolov5),
        ("yolox", Layout::Yolox),
    ];
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Layout::ALL
            .iter()
            .find(|(_, l)| l == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Layout::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, l)| *l)
            .ok_or_else(|| {
                let names: Vec<&str> = Layout::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown layout '{s}' (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// The anchor-free grid of a stride-`s` pyramid: `(cell count, strides used)` for strides
/// 8, 16, 32 (and 64 for P6 models).
fn grid_cells(h: usize, w: usize, strides: &[usize]) -> usize {
    strides
        .iter()
        .map(|s| h.div_ceil(*s) * w.div_ceil(*s))
        .sum()
}

const P5: [usize; 3] = [8, 16, 32];
const P6: [usize; 4] = [8, 16, 32, 64];

/// A resolved output layout with its class count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSpec {
    pub layout: Layout,
    pub num_classes: usize,
}

/// Infers the layout of a detector from its output shapes, input size `(h, w)`, the class
/// count from metadata (if any), and whether the exporter marked it end-to-end.
/// `forced` skips inference but still checks that the shape fits.
pub fn infer_layout(
    outputs: &[Vec<usize>],
    input_hw: (usize, usize),
    meta_classes: Option<usize>,
    meta_end2end: Option<bool>,
    forced: Option<Layout>,
) -> Result<OutputSpec, String> {
    let shape = outputs.first().ok_or("model has no outputs")?;
    let [1, a, b] = shape[..] else {
        return Err(format!("output 0 has shape {shape:?}, expected [1, A, B]"));
    };
    let (h, w) = input_hw;
    let grids = [grid_cells(h, w, &P5), grid_cells(h, w, &P6)];
    let check = |layout: Layout| -> Result<OutputSpec, String> {
        let (nc, ok) = match layout {
            Layout::Yolov8 => (a.saturating_sub(4), a > 4),
            Layout::EndToEnd => (meta_classes.unwrap_or(0), b == 6),
            Layout::Yolov5 => (b.saturating_sub(5), b > 5),
            Layout::Yolox => (b.saturating_sub(5), b > 5 && grids.contains(&a)),
        };
        if !ok {
            return Err(format!(
                "output shape {shape:?} does not fit layout {layout}"
            ));
        }
        if let Some(m) = meta_classes
            && layout != Layout::EndToEnd
            && m != nc
        {
            return Err(format!(
                "output shape {shape:?} as {layout} has {nc} classes but the metadata names {m}"
            ));
        }
        Ok(OutputSpec {
            layout,
            num_classes: nc,
        })
    };
    if let Some(l) = forced {
        return check(l);
    }
    if meta_end2end == Some(true) && b == 6 {
        return check(Layout::EndToEnd);
    }
    if grids.contains(&b) && a > 4 {
        return check(Layout::Yolov8);
    }
    if grids.iter().any(|g| a == 3 * g) && b > 5 {
        return check(Layout::Yolov5);
    }
    if grids.contains(&a) && b > 5 && meta_classes.is_none() {
        return check(Layout::Yolox);
    }
    if b == 6 {
        return check(Layout::EndToEnd);
    }
    Err(format!(
        "cannot infer the output layout from shape {shape:?} at input {h}x{w}; pass --layout (yolov8, end2end, yolov5, yolox)"
    ))
}

/// Thresholds and filters applied while decoding and suppressing.
#[derive(Debug, Clone, PartialEq)]
pub struct PostprocessParams {
    /// Keep boxes with score strictly above this (0..1).
    pub conf: f32,
    /// NMS IoU threshold: suppress overlaps strictly above this.
    pub iou: f32,
    /// Maximum detections per image.
    pub max_det: usize,
    /// Keep only these class ids (after choosing each box's best class).
    pub classes: Option<Vec<usize>>,
    /// Suppress across classes.
    pub agnostic: bool,
}

impl Default for PostprocessParams {
    /// Ultralytics predict defaults: conf 0.25, IoU 0.7, 300 detections, class-aware NMS.
    fn default() -> Self {
        PostprocessParams {
            conf: 0.25,
            iou: 0.7,
            max_det: 300,
            classes: None,
            agnostic: false,
        }
    }
}

/// Most candidates handed to NMS (Ultralytics `max_nms`).
const MAX_NMS: usize = 30_000;

fn best_class(scores: impl Iterator<Item = f32>) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (c, s) in scores.enumerate() {
        if s > best.1 {
            best = (c, s);
        }
    }
    best
}

fn xywh_to_xyxy(cx: f32, cy: f32, w: f32, h: f32) -> [f32; 4] {
    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]
}

/// Decodes candidate boxes (before NMS) from output 0 of shape `shape`, in model-input pixels.
///
/// Boxes with non-finite coordinates are dropped. A `shape` that is not `[1, A, B]` or `data`
/// that does not hold `A * B` values decodes to nothing (and trips a debug assertion).
pub fn decode(
    spec: OutputSpec,
    shape: &[usize],
    data: &[f32],
    input_hw: (usize, usize),
    params: &PostprocessParams,
) -> Vec<Detection> {
    let consistent = shape.len() == 3 && shape[0] == 1 && data.len() == shape[1] * shape[2];
    debug_assert!(
        consistent,
        "decode: shape {shape:?} with {} values",
        data.len()
    );
    if !consistent {
        return Vec::new();
    }
    let allowed = |c: usize| params.classes.as_ref().is_none_or(|cs| cs.contains(&c));
    let mut out = Vec::new();
    let mut push = |class_id: usize, score: f32, bbox: [f32; 4]| {
        if score > params.conf && allowed(class_id) && bbox.iter().all(|v| v.is_finite()) {
            out.push(Detection {
                class_id,
                score,
                bbox,
            });
        }
    };
    let (a, b) = (shape[1], shape[2]);
    match spec.layout {
        Layout::Yolov8 => {
            let n = b;
            for i in 0..n {
                let (c, s) = best_class((4..a).map(|k| data[k * n + i]));
                if s > params.conf {
                    let v = |k: usize| data[k * n + i];
                    push(c, s, xywh_to_xyxy(v(0), v(1), v(2), v(3)));
                }
            }
        }
        Layout::Yolov5 => {
            for row in data.chunks_exact(b) {
                let obj = row[4];
                if obj > params.conf {
                    let (c, s) = best_class(row[5..].iter().map(|s| s * obj));
                    push(c, s, xywh_to_xyxy(row[0], row[1], row[2], row[3]));
                }
            }
        }
        Layout::Yolox => {
            let (h, w) = input_hw;
            let strides: &[usize] = if a == grid_cells(h, w, &P5) { &P5 } else { &P6 };
            let mut rows = data.chunks_exact(b);
            for &s in strides {
                for gy in 0..h.div_ceil(s) {
                    for gx in 0..w.div_ceil(s) {
                        let Some(row) = rows.next() else { return out };
                        let sf = s as f32;
                        let cx = (row[0] + gx as f32) * sf;
                        let cy = (row[1] + gy as f32) * sf;
                        let bw = row[2].exp() * sf;
                        let bh = row[3].exp() * sf;
                        let obj = row[4];
                        let (c, sc) = best_class(row[5..].iter().map(|s| s * obj));
                        push(c, sc, xywh_to_xyxy(cx, cy, bw, bh));
                    }
                }
            }
        }
        Layout::EndToEnd => {
            for row in data.chunks_exact(6).take(a) {
                let cls = row[5];
                if cls.is_finite() && cls >= 0.0 {
                    push(
                        cls.round() as usize,
                        row[4],
                        [row[0], row[1], row[2], row[3]],
                    );
                }
            }
        }
    }
    out
}

/// Decodes and suppresses: the final detections of one image, best first, in model-input pixels.
pub fn postprocess(
    spec: OutputSpec,
    shape: &[usize],
    data: &[f32],
    input_hw: (usize, usize),
    params: &PostprocessParams,
) -> Vec<Detection> {
    let mut dets = decode(spec, shape, data, input_hw, params);
    if spec.layout == Layout::EndToEnd {
        // The head already ranked and de-duplicated its top-K.
        dets.truncate(params.max_det);
        return dets;
    }
    if dets.len() > MAX_NMS {
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
        dets.truncate(MAX_NMS);
    }
    nms(dets, params.iou, params.agnostic, params.max_det)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_inference() {
        let hw = (320, 320);
        let g = 2100;
        let l = |shape: Vec<usize>, nc: Option<usize>, e2e: Option<bool>| {
            infer_layout(&[shape], hw, nc, e2e, None)
        };
        assert_eq!(
            l(vec![1, 84, g], Some(80), None).unwrap(),
            OutputSpec {
                layout: Layout::Yolov8,
                num_classes: 80
            }
        );
        // Two classes: [1, 6, 2100] is v8, not end-to-end.
        assert_eq!(l(vec![1, 6, g], None, None).unwrap().layout, Layout::Yolov8);
        assert_eq!(
            l(vec![1, 300, 6], Some(80), Some(true)).unwrap(),
            OutputSpec {
                layout: Layout::EndToEnd,
                num_classes: 80
            }
        );
        assert_eq!(
            l(vec![1, 300, 6], Some(1), None).unwrap().layout,
            Layout::EndToEnd
        );
        assert_eq!(
            l(vec![1, 3 * g, 85], Some(80), None).unwrap().layout,
            Layout::Yolov5
        );
        assert_eq!(
            l(vec![1, g, 85], None, None).unwrap(),
            OutputSpec {
                layout: Layout::Yolox,
                num_classes: 80
            }
        );
        assert!(
            l(vec![1, 84, g], Some(3), None)
                .unwrap_err()
                .contains("metadata names 3")
        );
        assert!(
            l(vec![1, 10, 17], None, None)
                .unwrap_err()
                .contains("--layout")
        );
        assert!(l(vec![2, 84, g], None, None).is_err());
        assert!(l(vec![84, g], None, None).is_err());
        let forced = infer_layout(&[vec![1, g, 85]], hw, None, None, Some(Layout::Yolov5)).unwrap();
        assert_eq!(forced.layout, Layout::Yolov5);
        assert!(infer_layout(&[vec![1, 84, g]], hw, None, None, Some(Layout::EndToEnd)).is_err());
    }

    #[test]
    fn layout_names_round_trip() {
        for (name, l) in Layout::ALL {
            assert_eq!(name.parse::<Layout>().unwrap(), l);
            assert_eq!(l.to_string(), name);
        }
        assert!("yolo9000".parse::<Layout>().is_err());
    }

    #[test]
    fn decode_v8_picks_best_class_then_filters() {
        // Two anchors, two classes: layout [1, 6, 2] channel-major.
        let data = [
            10.0, 50.0, // cx
            10.0, 50.0, // cy
            4.0, 8.0, // w
            2.0, 8.0, // h
            0.9, 0.1, // class 0
            0.3, 0.6, // class 1
        ];
        let spec = OutputSpec {
            layout: Layout::Yolov8,
            num_classes: 2,
        };
        let p = PostprocessParams::default();
        let d = decode(spec, &[1, 6, 2], &data, (64, 64), &p);
        assert_eq!(
            d,
            vec![
                Detection {
                    class_id: 0,
                    score: 0.9,
                    bbox: [8.0, 9.0, 12.0, 11.0]
                },
                Detection {
                    class_id: 1,
                    score: 0.6,
                    bbox: [46.0, 46.0, 54.0, 54.0]
                },
            ]
        );
        // Filtering to class 1 drops anchor 0 even though its class-1 score passes conf.
        let d = decode(
            spec,
            &[1, 6, 2],
            &data,
            (64, 64),
            &PostprocessParams {
                classes: Some(vec![1]),
                ..p
            },
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].class_id, 1);
    }

    #[test]
    fn decode_v5_multiplies_objectness() {
        let data = [
            10.0, 10.0, 4.0, 4.0, 0.5, 0.9, 0.2, 10.0, 10.0, 4.0, 4.0, 0.2, 1.0, 1.0,
        ];
        let spec = OutputSpec {
            layout: Layout::Yolov5,
            num_classes: 2,
        };
        let d = decode(
            spec,
            &[1, 2, 7],
            &data,
            (64, 64),
            &PostprocessParams::default(),
        );
        assert_eq!(d.len(), 1);
        assert!((d[0].score - 0.45).abs() < 1e-6);
    }

    #[test]
    fn decode_yolox_grid() {
        // 32x32 input: strides 8/16/32 give 4x4 + 2x2 + 1x1 = 21 cells of 5 + 2 classes.
        let mut data = vec![0.0f32; 21 * 7];
        // Cell 5 is (gx=1, gy=1) at stride 8: offset (0.5, 0.25), size exp(0)*8.
        data[5 * 7..6 * 7].copy_from_slice(&[0.5, 0.25, 0.0, 0.0, 0.8, 0.2, 0.5]);
        let spec = infer_layout(&[vec![1, 21, 7]], (32, 32), None, None, None).unwrap();
        assert_eq!(
            spec,
            OutputSpec {
                layout: Layout::Yolox,
                num_classes: 2
            }
        );
        let d = decode(
            spec,
            &[1, 21, 7],
            &data,
            (32, 32),
            &PostprocessParams::default(),
        );
        assert_eq!(
            d,
            vec![Detection {
                class_id: 1,
                score: 0.4,
                bbox: [8.0, 6.0, 16.0, 14.0]
            }]
        );
    }

    #[test]
    fn end_to_end_skips_nms_and_truncates() {
        let data = [
            0.0, 0.0, 10.0, 10.0, 0.9, 2.0, //
            0.0, 0.0, 10.0, 10.0, 0.8, 2.0, //
            5.0, 5.0, 9.0, 9.0, 0.1, 1.0,
        ];
        let spec = OutputSpec {
            layout: Layout::EndToEnd,
            num_classes: 3,
        };
        let mut p = PostprocessParams::default();
        let d = postprocess(spec, &[1, 3, 6], &data, (64, 64), &p);
        assert_eq!(
            d.len(),
            2,
            "overlapping boxes are kept: the head did the suppression"
        );
        assert_eq!(d[0].class_id, 2);
        p.max_det = 1;
        assert_eq!(postprocess(spec, &[1, 3, 6], &data, (64, 64), &p).len(), 1);
    }

    #[test]
    fn non_finite_values_are_dropped() {
        let data = [
            f32::NAN,
            1.0,
            2.0,
            2.0,
            0.9,
            0.0,
            1.0,
            f32::INFINITY,
            0.8,
            0.0,
        ];
        let spec = OutputSpec {
            layout: Layout::EndToEnd,
            num_classes: 1,
        };
        assert!(
            decode(
                spec,
                &[1, 1, 6],
                &data[..6],
                (8, 8),
                &PostprocessParams::default()
            )
            .is_empty()
        );
        let spec = OutputSpec {
            layout: Layout::Yolov8,
            num_classes: 1,
        };
        let data = [1.0, 1.0, 2.0, f32::NAN, f32::NAN];
        assert!(
            decode(
                spec,
                &[1, 5, 1],
                &data,
                (8, 8),
                &PostprocessParams::default()
            )
            .is_empty()
        );
    }
}
