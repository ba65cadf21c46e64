//! `perch eval`: detection accuracy on a dataset in Ultralytics YOLO format, computed the way
//! Ultralytics `val` does (same letterbox geometry, thresholds, matching and AP).

pub mod metrics;

use std::path::{Path, PathBuf};

use serde::Serialize;
use yaml_rust2::{Yaml, YamlLoader};

use crate::detector::{Detector, DetectorError};
use crate::image_io::{IMAGE_EXTENSIONS, load_rgb};
use crate::preprocess::Letterbox;

/// Why a dataset could not be evaluated; names the file (and line) concerned.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {reason}", path.display())]
    Dataset { path: PathBuf, reason: String },
    #[error(transparent)]
    Image(#[from] crate::image_io::ImageError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    /// A detector for one of the input shapes could not be built.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// One labelled box: class id and `[x1, y1, x2, y2]` in normalised 0..1 image coordinates.
pub type Label = (usize, [f32; 4]);

/// A YOLO-format dataset split: images, their label files, class names.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub yaml: PathBuf,
    pub names: Vec<String>,
    pub images: Vec<PathBuf>,
}

fn yaml_names(v: &Yaml) -> Option<Vec<String>> {
    let scalar = |y: &Yaml| match y {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        Yaml::Array(a) => a.iter().map(scalar).collect(),
        Yaml::Hash(h) => {
            let mut pairs: Vec<(usize, String)> = h
                .iter()
                .map(|(k, v)| Some((k.as_i64()? as usize, scalar(v)?)))
                .collect::<Option<_>>()?;
            pairs.sort();
            pairs
                .iter()
                .enumerate()
                .all(|(i, (k, _))| i == *k)
                .then(|| pairs.into_iter().map(|(_, n)| n).collect())
        }
        _ => None,
    }
}

impl Dataset {
    /// Reads `data.yaml` (`path`, `train`/`val`/`test`, `names`) and lists the images of `split`.
    /// `path` defaults to the YAML's directory and relative paths are resolved against it; a
    /// split may be a directory, a list of directories, or a `.txt` file listing images.
    pub fn load(yaml: &Path, split: &str) -> Result<Self, EvalError> {
        let fail = |reason: String| EvalError::Dataset {
            path: yaml.to_path_buf(),
            reason,
        };
        let text = crate::fsutil::read_text(yaml).map_err(|e| fail(format!("cannot read: {e}")))?;
        let docs = YamlLoader::load_from_str(&text).map_err(|e| fail(format!("not YAML: {e}")))?;
        let doc = docs.first().ok_or_else(|| fail("empty YAML".into()))?;
        let here = yaml.parent().unwrap_or(Path::new("."));
        let root = match doc["path"].as_str() {
            Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
            Some(p) => here.join(p),
            None => here.to_path_buf(),
        };
        let names = yaml_names(&doc["names"]).ok_or_else(|| {
            fail("'names' must be a list or a {id: name} map with ids 0..n".into())
        })?;
        let entries: Vec<String> = match &doc[split] {
            Yaml::String(s) => vec![s.clone()],
            Yaml::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => return Err(fail(format!("no '{split}' split"))),
        };
        let mut images = Vec::new();
        for e in entries {
            let p = if Path::new(&e).is_absolute() {
                PathBuf::from(&e)
            } else {
                root.join(&e)
            };
            if p.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(|err| fail(format!("{}: {err}", p.display())))?
                    .filter_map(|d| d.ok().map(|d| d.path()))
                    .filter(|f| {
                        f.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                            IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())
                        })
                    })
                    .collect();
                files.sort();
                images.extend(files);
            } else if p.extension().is_some_and(|x| x == "txt") {
                let list = crate::fsutil::read_text(&p)
                    .map_err(|err| fail(format!("{}: {err}", p.display())))?;
                images.extend(
                    list.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(|l| root.join(l)),
                );
            } else {
                return Err(fail(format!(
                    "split '{split}' entry {} is neither a directory nor a .txt list",
                    p.display()
                )));
            }
        }
        if images.is_empty() {
            return Err(fail(format!("split '{split}' has no images")));
        }
        Ok(Dataset {
            yaml: yaml.to_path_buf(),
            names,
            images,
        })
    }

    /// The label file of an image: the last `images` path component replaced by `labels`,
    /// extension `.txt` (Ultralytics' convention).
    pub fn label_path(image: &Path) -> PathBuf {
        let s = image.to_string_lossy();
        let sep = std::path::MAIN_SEPARATOR;
        let swapped = match s.rfind(&format!("{sep}images{sep}")) {
            Some(i) => format!("{}{sep}labels{sep}{}", &s[..i], &s[i + 8..]),
            None => s.into_owned(),
        };
        PathBuf::from(swapped).with_extension("txt")
    }

    /// Reads the labels of one image (missing file: no objects). Lines are `class cx cy w h`
    /// (normalised), or `class x1 y1 x2 y2 ...` polygons, which become their bounding box.
    pub fn labels(&self, image: &Path) -> Result<Vec<Label>, EvalError> {
        let path = Self::label_path(image);
        let Ok(text) = crate::fsutil::read_text(&path) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let fail = |reason: String| EvalError::Dataset {
                path: path.clone(),
                reason: format!("line {}: {reason}", n + 1),
            };
            let v: Vec<&str> = line.split_whitespace().collect();
            if v.is_empty() {
                continue;
            }
            let cls: usize = v[0]
                .parse()
                .map_err(|_| fail(format!("class '{}' is not an integer", v[0])))?;
            if cls >= self.names.len() {
                return Err(fail(format!(
                    "class {cls} but the dataset names {} classes",
                    self.names.len()
                )));
            }
            let nums: Vec<f32> = v[1..]
                .iter()
                .map(|x| x.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| fail("non-numeric coordinate".into()))?;
            let b = match nums.len() {
                4 => [
                    nums[0] - nums[2] / 2.0,
                    nums[1] - nums[3] / 2.0,
                    nums[0] + nums[2] / 2.0,
                    nums[1] + nums[3] / 2.0,
                ],
                n if n >= 6 && n % 2 == 0 => {
                    let xs = nums.iter().step_by(2);
                    let ys = nums.iter().skip(1).step_by(2);
                    let (x0, x1) =
                        xs.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                    let (y0, y1) =
                        ys.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                    [x0, y0, x1, y1]
                }
                n => {
                    return Err(fail(format!(
                        "{n} coordinates; expected 4 (box) or an even count >= 6 (polygon)"
                    )));
                }
            };
            if b.iter().any(|x| !x.is_finite()) {
                return Err(fail("non-finite coordinate".into()));
            }
            out.push((cls, b));
        }
        Ok(out)
    }
}

/// The letterbox Ultralytics' validator uses: resize the long side to `imgsz` with `ceil`
/// (`load_image`), then `LetterBox(scaleup=False)` into the `dst_w` x `dst_h` input: shrunk
/// only if it does not fit, padded centred.
pub fn val_letterbox(
    src_w: usize,
    src_h: usize,
    imgsz: usize,
    dst_w: usize,
    dst_h: usize,
) -> Letterbox {
    let r = imgsz as f64 / src_w.max(src_h) as f64;
    let (mut new_w, mut new_h) = if r == 1.0 {
        (src_w, src_h)
    } else {
        (
            ((src_w as f64 * r).ceil() as usize).min(imgsz),
            ((src_h as f64 * r).ceil() as usize).min(imgsz),
        )
    };
    let fit = (dst_w as f64 / new_w as f64).min(dst_h as f64 / new_h as f64);
    if fit < 1.0 {
        new_w = (new_w as f64 * fit).round_ties_even() as usize;
        new_h = (new_h as f64 * fit).round_ties_even() as usize;
    }
    Letterbox::with_resized(src_w, src_h, dst_w, dst_h, new_w.max(1), new_h.max(1))
}

/// The input (height, width) of each image under Ultralytics' rectangular validation
/// (`yolo val` on a dynamic export, where `model.val()` sets `rect=True`): images sorted by
/// aspect ratio (height / width) fall into batches of `batch`; a batch whose images are all
/// wider than tall gets `[max ratio, 1]`, all taller than wide `[1, 1 / min ratio]`, else
/// `[1, 1]`, times `imgsz / stride` plus half a stride, rounded up to the stride. `sizes` are
/// (width, height) in dataset order, and so is the result.
pub fn val_rect_shapes(
    sizes: &[(usize, usize)],
    imgsz: usize,
    stride: usize,
    batch: usize,
) -> Vec<(usize, usize)> {
    let ar: Vec<f64> = sizes.iter().map(|&(w, h)| h as f64 / w as f64).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| ar[a].total_cmp(&ar[b]));
    let side = |s: f64| (s * imgsz as f64 / stride as f64 + 0.5).ceil() as usize * stride;
    let mut shapes = vec![(0, 0); sizes.len()];
    for members in order.chunks(batch.max(1)) {
        let (lo, hi) = members.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &i| {
            (lo.min(ar[i]), hi.max(ar[i]))
        });
        let (sh, sw) = if hi < 1.0 {
            (hi, 1.0)
        } else if lo > 1.0 {
            (1.0, 1.0 / lo)
        } else {
            (1.0, 1.0)
        };
        for &i in members {
            shapes[i] = (side(sh), side(sw));
        }
    }
    shapes
}

/// How `perch eval` sizes each image's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValGeometry {
    /// Every image letterboxed into `imgsz` x `imgsz` (`yolo val` on a static export).
    Square(usize),
    /// Rectangular batch shapes, as `yolo val` shapes them for a dynamic export
    /// ([`val_rect_shapes`]).
    Rect {
        imgsz: usize,
        stride: usize,
        batch: usize,
    },
}

/// What `perch eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: String,
    pub split: String,
    pub images: usize,
    pub instances: usize,
    #[serde(serialize_with = "crate::report::f32_decimal")]
    pub conf: f32,
    #[serde(serialize_with = "crate::report::f32_decimal")]
    pub iou: f32,
    #[serde(flatten)]
    pub summary: metrics::Summary,
}

/// Runs the split through detectors built by `build` for each input (height, width) that
/// `geometry` needs, and computes the metrics. The detectors must use the evaluation thresholds
/// (Ultralytics val: conf 0.001, IoU 0.7, 300 detections). Matching happens in model-input
/// pixels, as Ultralytics does.
pub fn evaluate(
    build: &mut dyn FnMut(usize, usize) -> Result<Detector, crate::engine::EngineError>,
    data: &Dataset,
    split: &str,
    geometry: ValGeometry,
) -> Result<EvalReport, EvalError> {
    let mut reports = evaluate_tasks(build, data, split, geometry)?;
    Ok(reports.swap_remove(0))
}

/// Like [`evaluate`], for every task of the detectors (see [`Detector::detect_tasks`]): one
/// report per task, in task order, from one run of the model per image.
pub fn evaluate_tasks(
    build: &mut dyn FnMut(usize, usize) -> Result<Detector, crate::engine::EngineError>,
    data: &Dataset,
    split: &str,
    geometry: ValGeometry,
) -> Result<Vec<EvalReport>, EvalError> {
    let (imgsz, shapes) = match geometry {
        ValGeometry::Square(s) => (s, vec![(s, s); data.images.len()]),
        ValGeometry::Rect {
            imgsz,
            stride,
            batch,
        } => {
            let sizes = data
                .images
                .iter()
                .map(|p| crate::image_io::oriented_size(p))
                .collect::<Result<Vec<_>, _>>()?;
            (imgsz, val_rect_shapes(&sizes, imgsz, stride, batch))
        }
    };
    let mut built = crate::engine::DetectorsBySize::default();
    let mut thresholds = None;
    // Per task: true-positive rows, confidences and predicted classes.
    let mut per_task: Vec<(Vec<_>, Vec<f32>, Vec<usize>)> = Vec::new();
    let mut target_cls = Vec::new();
    for (image, &(h, w)) in data.images.iter().zip(&shapes) {
        let frame = load_rgb(image)?;
        let labels = data.labels(image)?;
        let det = built.get_or_build((h, w), || build(h, w))?;
        thresholds.get_or_insert((det.params().conf, det.params().iou));
        let lb = val_letterbox(frame.width(), frame.height(), imgsz, w, h);
        let tasks = det.detect_tasks_in_input_space(&frame, &lb)?;
        per_task.resize_with(tasks.len(), Default::default);
        let to_input = |b: &[f32; 4]| {
            let sx = lb.new_w as f32;
            let sy = lb.new_h as f32;
            [
                b[0] * sx + lb.left as f32,
                b[1] * sy + lb.top as f32,
                b[2] * sx + lb.left as f32,
                b[3] * sy + lb.top as f32,
            ]
        };
        let targets: Vec<(usize, [f32; 4])> =
            labels.iter().map(|(c, b)| (*c, to_input(b))).collect();
        for (dets, (tp, conf, pred_cls)) in tasks.iter().zip(per_task.iter_mut()) {
            let preds: Vec<(usize, [f32; 4])> = dets.iter().map(|d| (d.class_id, d.bbox)).collect();
            tp.extend(metrics::match_predictions(&preds, &targets));
            conf.extend(dets.iter().map(|d| d.score));
            pred_cls.extend(dets.iter().map(|d| d.class_id));
        }
        target_cls.extend(targets.iter().map(|t| t.0));
    }
    if per_task.is_empty() {
        per_task.push(Default::default());
    }
    let (conf_t, iou) = thresholds.unwrap_or_default();
    Ok(per_task
        .iter()
        .map(|(tp, conf, pred_cls)| EvalReport {
            data: data.yaml.display().to_string(),
            split: split.to_string(),
            images: data.images.len(),
            instances: target_cls.len(),
            conf: conf_t,
            iou,
            summary: metrics::ap_per_class(tp, conf, pred_cls, &target_cls),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_paths_follow_ultralytics() {
        assert_eq!(
            Dataset::label_path(Path::new("/d/images/val/a.png")),
            PathBuf::from("/d/labels/val/a.txt")
        );
        assert_eq!(
            Dataset::label_path(Path::new("/images/x/images/val/b.jpg")),
            PathBuf::from("/images/x/labels/val/b.txt")
        );
    }

    #[test]
    fn val_letterbox_uses_ceil_and_no_upscale() {
        let lb = val_letterbox(400, 300, 320, 320, 320);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 240, 0, 40));
        let lb = val_letterbox(451, 300, 320, 320, 320);
        assert_eq!(
            (lb.new_w, lb.new_h),
            (320, 213),
            "ceil(300 * 320 / 451) = ceil(212.86)"
        );
        let lb = val_letterbox(320, 64, 320, 320, 320);
        assert_eq!((lb.new_w, lb.new_h, lb.top), (320, 64, 128));
        // Into a rectangular batch shape: no rescale, centred padding.
        let lb = val_letterbox(400, 240, 320, 352, 224);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 192, 16, 16));
    }

    /// The shapes Ultralytics 8.4 computes (`BaseDataset.set_rectangle`, pad 0.5).
    #[test]
    fn rect_shapes_follow_ultralytics_batches() {
        // Wide 400x240 (ar 0.6), wide 400x300 (0.75), tall 250x400 (1.6), square-ish 400x370.
        let sizes = [(400, 240), (400, 300), (250, 400), (400, 370)];
        // One batch mixing wide and tall: [1, 1] -> ceil(10 + 0.5) * 32 = 352 square.
        assert_eq!(val_rect_shapes(&sizes, 320, 32, 16), vec![(352, 352); 4]);
        // Batches of 2 in aspect order: (0.6, 0.75) -> [0.75, 1]; (0.925, 1.6) -> [1, 1].
        assert_eq!(
            val_rect_shapes(&sizes, 320, 32, 2),
            vec![(256, 352), (256, 352), (352, 352), (352, 352)]
        );
        // All tall: [1, 1 / 1.6] -> w = ceil(6.25 + 0.5) * 32 = 224.
        assert_eq!(val_rect_shapes(&[(250, 400)], 320, 32, 1), vec![(352, 224)]);
    }

    #[test]
    fn names_as_list_or_map() {
        let d = YamlLoader::load_from_str("a: [x, y]\nb: {1: y, 0: x}\nc: {0: x, 2: z}").unwrap();
        assert_eq!(yaml_names(&d[0]["a"]).unwrap(), vec!["x", "y"]);
        assert_eq!(yaml_names(&d[0]["b"]).unwrap(), vec!["x", "y"]);
        assert!(yaml_names(&d[0]["c"]).is_none());
    }
}
