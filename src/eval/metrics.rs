//! Detection metrics as Ultralytics `val` computes them: greedy matching in confidence order at
//! IoU 0.50:0.05:0.95, per-class AP by 101-point interpolation integrated with the trapezoid
//! rule (COCO style), precision and recall at the maximum of the smoothed mean F1 curve.

use crate::postprocess::iou;

/// The ten IoU thresholds 0.50, 0.55, ..., 0.95.
pub fn iou_thresholds() -> [f32; 10] {
    std::array::from_fn(|i| 0.5 + 0.05 * i as f32)
}

/// For predictions sorted by descending confidence, whether each is a true positive at each IoU
/// threshold: every prediction in turn claims the unclaimed same-class target it overlaps most.
pub fn match_predictions(
    preds: &[(usize, [f32; 4])],
    targets: &[(usize, [f32; 4])],
) -> Vec<[bool; 10]> {
    let th = iou_thresholds();
    let mut claimed = vec![[false; 10]; targets.len()];
    preds
        .iter()
        .map(|(pc, pb)| {
            let ious: Vec<f32> = targets
                .iter()
                .map(|(tc, tb)| if tc == pc { iou(tb, pb) } else { 0.0 })
                .collect();
            let mut correct = [false; 10];
            for (t, thr) in th.iter().enumerate() {
                // Best unclaimed target at this threshold (first one on ties, as numpy argmax).
                let mut best: Option<(usize, f32)> = None;
                for (k, v) in ious.iter().enumerate() {
                    let v = if claimed[k][t] { 0.0 } else { *v };
                    if best.is_none_or(|(_, b)| v > b) {
                        best = Some((k, v));
                    }
                }
                if let Some((k, v)) = best
                    && v >= *thr
                {
                    correct[t] = true;
                    claimed[k][t] = true;
                }
            }
            correct
        })
        .collect()
}

/// `np.interp(x, xp, fp)` for increasing `xp`, clamping outside the range (or using `left`).
fn interp(x: f64, xp: &[f64], fp: &[f64], left: Option<f64>) -> f64 {
    if x <= xp[0] {
        return if x < xp[0] {
            left.unwrap_or(fp[0])
        } else {
            fp[0]
        };
    }
    if x >= xp[xp.len() - 1] {
        return fp[fp.len() - 1];
    }
    let j = xp.partition_point(|v| *v <= x);
    let (x0, x1, y0, y1) = (xp[j - 1], xp[j], fp[j - 1], fp[j]);
    if x1 == x0 {
        y1
    } else {
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }
}

/// COCO 101-point interpolated AP of one recall/precision curve, as Ultralytics `compute_ap`.
pub fn average_precision(recall: &[f64], precision: &[f64]) -> f64 {
    let mut mrec = vec![0.0];
    mrec.extend_from_slice(recall);
    mrec.push(recall.last().copied().unwrap_or(1.0));
    mrec.push(1.0);
    let mut mpre = vec![1.0];
    mpre.extend_from_slice(precision);
    mpre.extend([0.0, 0.0]);
    for i in (0..mpre.len() - 1).rev() {
        mpre[i] = mpre[i].max(mpre[i + 1]);
    }
    let xs: Vec<f64> = (0..101).map(|i| i as f64 / 100.0).collect();
    let ys: Vec<f64> = xs.iter().map(|x| interp(*x, &mrec, &mpre, None)).collect();
    xs.windows(2)
        .zip(ys.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
        .sum()
}

/// Metrics of one class.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassMetrics {
    pub class_id: usize,
    pub instances: usize,
    pub precision: f64,
    pub recall: f64,
    pub map50: f64,
    pub map50_95: f64,
}

/// Dataset-level metrics: means over the classes that have labels.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub precision: f64,
    pub recall: f64,
    pub map50: f64,
    pub map50_95: f64,
    pub per_class: Vec<ClassMetrics>,
}

/// Box-filter smoothing with edge padding, as Ultralytics `smooth(y, f)`.
fn smooth(y: &[f64], f: f64) -> Vec<f64> {
    let nf = ((y.len() as f64 * f * 2.0).round() as usize) / 2 + 1;
    let half = nf / 2;
    let mut yp = vec![y[0]; half];
    yp.extend_from_slice(y);
    yp.extend(std::iter::repeat_n(y[y.len() - 1], half));
    yp.windows(nf)
        .map(|w| w.iter().sum::<f64>() / nf as f64)
        .collect()
}

/// Ultralytics `ap_per_class`: `tp`, `conf`, `pred_cls` over all predictions of the dataset,
/// `target_cls` over all labels. Classes without labels are not reported.
pub fn ap_per_class(
    tp: &[[bool; 10]],
    conf: &[f32],
    pred_cls: &[usize],
    target_cls: &[usize],
) -> Summary {
    let eps = 1e-16;
    let mut order: Vec<usize> = (0..conf.len()).collect();
    order.sort_by(|a, b| conf[*b].total_cmp(&conf[*a]));
    let mut classes: Vec<usize> = target_cls.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let x: Vec<f64> = (0..1000).map(|i| i as f64 / 999.0).collect();
    let mut rows = Vec::new();
    let (mut p_curves, mut r_curves) = (Vec::new(), Vec::new());
    for &c in &classes {
        let n_l = target_cls.iter().filter(|t| **t == c).count();
        let idx: Vec<usize> = order
            .iter()
            .copied()
            .filter(|i| pred_cls[*i] == c)
            .collect();
        let mut ap = [0.0f64; 10];
        let (mut pc, mut rc) = (vec![0.0; 1000], vec![0.0; 1000]);
        if !idx.is_empty() {
            let mut tpc = vec![[0.0f64; 10]; idx.len()];
            let mut fpc = vec![[0.0f64; 10]; idx.len()];
            for (k, i) in idx.iter().enumerate() {
                for t in 0..10 {
                    let hit = if tp[*i][t] { 1.0 } else { 0.0 };
                    tpc[k][t] = hit + if k > 0 { tpc[k - 1][t] } else { 0.0 };
                    fpc[k][t] = (1.0 - hit) + if k > 0 { fpc[k - 1][t] } else { 0.0 };
                }
            }
            let recall =
                |t: usize| -> Vec<f64> { tpc.iter().map(|v| v[t] / (n_l as f64 + eps)).collect() };
            let precision = |t: usize| -> Vec<f64> {
                tpc.iter()
                    .zip(&fpc)
                    .map(|(a, b)| a[t] / (a[t] + b[t]))
                    .collect()
            };
            // Curves over confidence, decreasing: interpolate on negated values.
            let neg_conf: Vec<f64> = idx.iter().map(|i| -(conf[*i] as f64)).collect();
            let (r0, p0) = (recall(0), precision(0));
            for (j, xv) in x.iter().enumerate() {
                rc[j] = interp(-xv, &neg_conf, &r0, Some(0.0));
                pc[j] = interp(-xv, &neg_conf, &p0, Some(1.0));
            }
            for (t, a) in ap.iter_mut().enumerate() {
                *a = average_precision(&recall(t), &precision(t));
            }
        }
        p_curves.push(pc);
        r_curves.push(rc);
        rows.push((c, n_l, ap));
    }
    let f1: Vec<Vec<f64>> = p_curves
        .iter()
        .zip(&r_curves)
        .map(|(p, r)| {
            p.iter()
                .zip(r)
                .map(|(p, r)| 2.0 * p * r / (p + r + eps))
                .collect()
        })
        .collect();
    let best = if classes.is_empty() {
        0
    } else {
        let mean: Vec<f64> = (0..1000)
            .map(|j| f1.iter().map(|c| c[j]).sum::<f64>() / f1.len() as f64)
            .collect();
        let s = smooth(&mean, 0.1);
        s.iter()
            .enumerate()
            .fold(
                (0, f64::MIN),
                |b, (j, v)| if *v > b.1 { (j, *v) } else { b },
            )
            .0
    };
    let per_class: Vec<ClassMetrics> = rows
        .iter()
        .enumerate()
        .map(|(ci, (c, n, ap))| ClassMetrics {
            class_id: *c,
            instances: *n,
            precision: p_curves[ci][best],
            recall: r_curves[ci][best],
            map50: ap[0],
            map50_95: ap.iter().sum::<f64>() / 10.0,
        })
        .collect();
    let mean = |f: fn(&ClassMetrics) -> f64| {
        if per_class.is_empty() {
            0.0
        } else {
            per_class.iter().map(f).sum::<f64>() / per_class.len() as f64
        }
    };
    Summary {
        precision: mean(|m| m.precision),
        recall: mean(|m| m.recall),
        map50: mean(|m| m.map50),
        map50_95: mean(|m| m.map50_95),
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_predictions_score_ultralytics_0_995() {
        let t = vec![(0, [0.0, 0.0, 10.0, 10.0]), (1, [20.0, 20.0, 30.0, 30.0])];
        let tp = match_predictions(&t, &t);
        assert!(tp.iter().all(|r| r.iter().all(|v| *v)));
        let s = ap_per_class(&tp, &[0.9, 0.8], &[0, 1], &[0, 1]);
        // Ultralytics' integration drops to the 0 sentinel between recall 0.99 and 1.0, so a
        // perfect detector scores 0.995, as `yolo val` reports.
        assert!(
            (s.map50 - 0.995).abs() < 1e-9 && (s.map50_95 - 0.995).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!((s.precision, s.recall), (1.0, 1.0));
    }

    #[test]
    fn one_target_is_claimed_once_and_classes_must_match() {
        let targets = vec![(0, [0.0, 0.0, 10.0, 10.0])];
        let preds = vec![
            (0, [0.0, 0.0, 10.0, 10.0]),
            (0, [0.0, 0.0, 10.0, 10.0]),
            (1, [0.0, 0.0, 10.0, 10.0]),
        ];
        let tp = match_predictions(&preds, &targets);
        assert_eq!(
            tp.iter().map(|r| r[0]).collect::<Vec<_>>(),
            vec![true, false, false]
        );
        // IoU 0.6 counts at 0.50 and 0.55 only.
        let tp = match_predictions(&[(0, [0.0, 0.0, 6.0, 10.0])], &targets);
        assert_eq!(tp[0].iter().filter(|v| **v).count(), 3, "{:?}", tp[0]);
    }

    #[test]
    fn ap_of_a_known_curve() {
        // Two targets; predictions hit, miss, hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
        let ap = average_precision(&[0.5, 0.5, 1.0], &[1.0, 0.5, 2.0 / 3.0]);
        // Envelope: 1 up to recall 0.5, then 2/3 up to 1.
        let expected = 0.5 + 0.5 * 2.0 / 3.0;
        assert!((ap - expected).abs() < 0.01, "{ap} vs {expected}");
    }
}
