"""How far int8 detections move from f32, for perch and for onnxruntime, on the same images.

For each runtime the reference is its own f32 run on the same model: perch f32 for perch int8
(`perch detect --precision int8` with the model's perch calibration), onnxruntime f32 for
onnxruntime's int8 QDQ model built with perch's policy (only the Convs perch quantizes, head and
DFL float; the same builder and calibration images as scripts/bench_ort.py) and for its fully
quantized QDQ model. onnxruntime's raw output is decoded with Ultralytics' own
`non_max_suppression` and `scale_boxes`, at the same confidence and IoU thresholds as perch.

Detections are matched greedily (f32 by descending score, same class, IoU >= --match-iou). It
prints, per runtime: f32 detections, matched, vanished (an f32 detection with no int8 twin),
appeared (an int8 detection with no f32 twin), mean and max |score delta|, mean and min IoU of
the matched pairs. Lower deltas and fewer vanished/appeared detections are better.

Usage:
  PY=$(models/recipe/venv.sh)/bin/python
  cargo build --release
  $PY scripts/int8_accuracy.py --model models/tree-yolo11n-320.onnx
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ort  # noqa: E402  (same directory: letterbox, calibration images, QDQ builder)

ROOT = Path(__file__).resolve().parent.parent


def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def perch_detections(a, images, precision):
    cmd = [a.perch, "detect", "--model", a.model, "--precision", precision, "--conf", str(a.conf),
           "--iou", str(a.iou)]
    if precision == "int8":
        cmd += ["--calibration", a.calibration]
    out = subprocess.run(cmd + [str(p) for p in images], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {Path(r["source"]).name: [(d["box"], d["score"], d["class_id"]) for d in r["detections"]]
            for r in rows}


def ort_detections(a, model, images, h, w):
    import torch
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    res = {}
    for p in images:
        img = cv2.imread(str(p))
        pred = s.run(None, {name: bench_ort.letterbox(img, (h, w))})[0]
        det = non_max_suppression(torch.from_numpy(pred), conf_thres=a.conf, iou_thres=a.iou, max_det=300)[0]
        det[:, :4] = scale_boxes((h, w), det[:, :4], img.shape[:2])
        res[p.name] = [(r[:4].tolist(), float(r[4]), int(r[5])) for r in det]
    return res


def compare(ref, cand, match_iou):
    n_ref = matched = vanished = appeared = 0
    dscore, ious = [], []
    for key, r in ref.items():
        c = list(cand.get(key, []))
        used = [False] * len(c)
        for box, score, cls in sorted(r, key=lambda d: -d[1]):
            n_ref += 1
            best, best_j = match_iou, None
            for j, (cb, _, cc) in enumerate(c):
                if not used[j] and cc == cls:
                    v = iou(box, cb)
                    if v >= best:
                        best, best_j = v, j
            if best_j is None:
                vanished += 1
                continue
            used[best_j] = True
            matched += 1
            dscore.append(abs(c[best_j][1] - score))
            ious.append(best)
        appeared += used.count(False)
    return {
        "f32": n_ref, "matched": matched, "vanished": vanished, "appeared": appeared,
        "mean_dscore": float(np.mean(dscore)) if dscore else 0.0,
        "max_dscore": float(np.max(dscore)) if dscore else 0.0,
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "min_iou": float(np.min(ious)) if ious else 0.0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", help="perch calibration (default: <model stem>.calibration.json)")
    ap.add_argument("--images", nargs="*", help="images to compare on (default: the committed eval "
                    "tiles and tests/data/osbs_029.png)")
    yell = Path.home() / ".cache/perch/data/yell/images/train"
    ap.add_argument("--calib-images", default=str(yell if yell.is_dir() else ROOT / "tests/data/eval/images/val"),
                    help="onnxruntime's calibration images (as scripts/bench_ort.py)")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (perch's default)")
    ap.add_argument("--match-iou", type=float, default=0.5)
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(Path.home() / ".cache/perch/target/release/perch")))
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args()
    if a.calibration is None:
        a.calibration = str(Path(a.model).with_suffix(".calibration.json"))
    images = [Path(p) for p in a.images] if a.images else sorted(
        (ROOT / "tests/data/eval/images/val").glob("*.png")) + [ROOT / "tests/data/osbs_029.png"]
    shape = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    h, w = int(shape[2]), int(shape[3])

    results = {}
    results["perch int8 vs perch f32"] = compare(
        perch_detections(a, images, "f32"), perch_detections(a, images, "int8"), a.match_iou)
    with tempfile.TemporaryDirectory() as d:
        ort_f32 = ort_detections(a, a.model, images, h, w)
        for label, policy in (("onnxruntime int8 (perch policy)", True), ("onnxruntime int8 (QDQ, all ops)", False)):
            q = bench_ort.ort_quantized(a, h, w, Path(d), policy)
            results[f"{label} vs onnxruntime f32"] = compare(ort_f32, ort_detections(a, q, images, h, w), a.match_iou)

    if a.json:
        print(json.dumps({"model": a.model, "images": len(images), "conf": a.conf, "results": results}))
        return
    print(f"model {a.model}; {len(images)} images; conf {a.conf}, NMS IoU {a.iou}, match IoU {a.match_iou}; "
          f"onnxruntime calibration: {len(bench_ort.calib_images(a))} images in {a.calib_images}")
    cols = ["f32", "matched", "vanished", "appeared", "mean_dscore", "max_dscore", "mean_iou", "min_iou"]
    print(f"{'comparison':45}" + "".join(f"{c:>12}" for c in cols))
    for label, r in results.items():
        print(f"{label:45}" + "".join(f"{r[c]:>12}" if isinstance(r[c], int) else f"{r[c]:>12.4f}" for c in cols))


if __name__ == "__main__":
    main()
