//! Non-maximum suppression, as torchvision's `nms` that Ultralytics calls.

use super::Detection;

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when both are empty.
///
/// ```
/// assert_eq!(perch::postprocess::iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 3.0, 2.0]), 2.0 / 6.0);
/// ```
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Greedy NMS: sorts `dets` by descending score (stable, so equal scores keep input order),
/// drops every box whose IoU with a kept box of the same class (any class when `agnostic`)
/// is greater than `iou_thres`, and keeps at most `max_det` boxes.
pub fn nms(
    mut dets: Vec<Detection>,
    iou_thres: f32,
    agnostic: bool,
    max_det: usize,
) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Detection> = Vec::new();
    let mut suppressed = vec![false; dets.len()];
    for i in 0..dets.len() {
        if suppressed[i] {
            continue;
        }
        if keep.len() == max_det {
            break;
        }
        let d = &dets[i];
        for (j, s) in suppressed.iter_mut().enumerate().skip(i + 1) {
            if !*s
                && (agnostic || dets[j].class_id == d.class_id)
                && iou(&d.bbox, &dets[j].bbox) > iou_thres
            {
                *s = true;
            }
        }
        keep.push(d.clone());
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class_id: usize, score: f32, bbox: [f32; 4]) -> Detection {
        Detection {
            class_id,
            score,
            bbox,
        }
    }

    #[test]
    fn iou_basics() {
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[0.0, 0.0, 2.0, 2.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 3.0, 2.0]), 2.0 / 6.0);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn keeps_highest_score_first_and_respects_classes() {
        let dets = vec![
            det(0, 0.5, [0.0, 0.0, 10.0, 10.0]),
            det(0, 0.9, [1.0, 1.0, 11.0, 11.0]),
            det(1, 0.8, [0.0, 0.0, 10.0, 10.0]),
            det(0, 0.7, [50.0, 50.0, 60.0, 60.0]),
        ];
        let kept = nms(dets.clone(), 0.5, false, 300);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.8, 0.7]);
        let kept = nms(dets.clone(), 0.5, true, 300);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.7]);
        assert_eq!(nms(dets, 0.5, false, 2).len(), 2);
    }

    #[test]
    fn iou_equal_to_threshold_is_kept() {
        // IoU exactly 0.5: torchvision suppresses only strictly greater overlaps.
        let dets = vec![
            det(0, 0.9, [0.0, 0.0, 3.0, 1.0]),
            det(0, 0.8, [1.0, 0.0, 4.0, 1.0]),
        ];
        assert_eq!(iou(&dets[0].bbox, &dets[1].bbox), 0.5);
        assert_eq!(nms(dets, 0.5, false, 300).len(), 2);
    }
}
