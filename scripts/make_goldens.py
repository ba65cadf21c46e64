"""Generate the reference outputs the Rust tests compare against (committed under tests/goldens).

Every golden comes from an independent implementation:
  raw/*.json        onnxruntime outputs of each fixture model on a real photo crop that needs no
                    resize (so perch and the reference see bit-identical inputs).
  nms/*.json        the reference postprocessing applied to those same raw outputs:
                    Ultralytics `non_max_suppression` (v8/11/26 one-to-many, end-to-end),
                    ultralytics/yolov5 `non_max_suppression` (v5), YOLOX `demo_postprocess` (decode).
  letterbox/*.png   Ultralytics `LetterBox` on OpenCV-decoded photos (the model input, as RGB).
  detect/*.json     Ultralytics' predictor (`YOLO(onnx).predict`, onnxruntime backend) with the
                    trained demo model on aerial images, default thresholds; and on the dynamic
                    fixture export with non-square photos, rect (its default) and square.
  eval/*.json       Ultralytics `val` of the demo model on tests/data/eval (conf 0.001, IoU 0.7).
Run: PY=$(models/recipe/venv.sh)/bin/python; $PY scripts/make_goldens.py [--only raw,letterbox,detect,detect_dynamic,eval]
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data"
FIX = ROOT / "tests/fixtures"
GOLD = ROOT / "tests/goldens"

# (fixture, layout, crop image, input (h, w))
RAW_CASES = [
    ("v8-t160-op11", "yolov8", "chelsea-160.png", (160, 160)),
    ("v8-dyn-op17", "yolov8", "chelsea-160.png", (160, 160)),
    ("v8-dyn-op17", "yolov8", "chelsea-128x224.png", (128, 224)),
    ("y11-t160-op13", "yolov8", "chelsea-160.png", (160, 160)),
    ("y26-o2m-t160-op17", "yolov8", "chelsea-160.png", (160, 160)),
    ("y26-t160-op18", "end2end", "chelsea-160.png", (160, 160)),
    ("v10-t160-op17", "end2end", "chelsea-160.png", (160, 160)),
    ("v5-t160-op12", "yolov5", "chelsea-160.png", (160, 160)),
    ("yolox-t160-op11", "yolox", "chelsea-160.png", (160, 160)),
]


def floats(a):
    """float32 values as JSON numbers that round-trip exactly."""
    return [float(np.format_float_positional(v, unique=True, precision=None)) for v in np.asarray(a, np.float32).ravel()]


def dump(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print("wrote", path.relative_to(ROOT))


def make_crops():
    chelsea = cv2.imread(str(DATA / "chelsea.png"))  # BGR, 300x451
    cv2.imwrite(str(DATA / "chelsea-160.png"), chelsea[40:200, 140:300])
    cv2.imwrite(str(DATA / "chelsea-128x224.png"), chelsea[60:188, 100:324])


def model_input(img_bgr, layout):
    if layout == "yolox":
        x = img_bgr.astype(np.float32)  # BGR 0..255
    else:
        x = img_bgr[:, :, ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def run_ort(model: Path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def case_name(fixture, hw):
    return f"{fixture}-{hw[0]}x{hw[1]}"


def make_raw_and_nms():
    from ultralytics.utils.nms import non_max_suppression as ul_nms
    from yolov5.utils.general import non_max_suppression as v5_nms

    sys.path.insert(0, str(Path(sys.prefix) / "src/yolox-0.3.0"))
    from yolox.utils.demo_utils import demo_postprocess

    for fixture, layout, image, hw in RAW_CASES:
        img = cv2.imread(str(DATA / image))
        assert img.shape[:2] == hw, (image, img.shape)
        x = model_input(img, layout)
        out = run_ort(FIX / f"{fixture}.onnx", x)[0]
        name = case_name(fixture, hw)
        dump(GOLD / "raw" / f"{name}.json", {
            "model": f"tests/fixtures/{fixture}.onnx", "image": f"tests/data/{image}", "input_hw": list(hw),
            "layout": layout, "shape": list(out.shape), "data": floats(out),
        })

        p = torch.from_numpy(out)
        cases = []
        if layout in ("yolov8", "end2end", "yolov5"):
            if layout == "yolov8":
                scores = out[0, 4:].max(0)
            elif layout == "end2end":
                scores = out[0, :, 4]
            else:
                scores = out[0, :, 4] * out[0, :, 5:].max(1)
            # A threshold that lets ~5 % of candidates through, so NMS has real work.
            conf = float(np.quantile(scores, 0.95))
            for variant in ({}, {"agnostic": True}, {"classes": [1, 2]}, {"max_det": 5}, {"iou": 0.3}):
                kw = {"iou": 0.7, "agnostic": False, "classes": None, "max_det": 300, **variant}
                if layout == "yolov5":
                    dets = v5_nms(p.clone(), conf, kw["iou"], kw["classes"], kw["agnostic"], max_det=kw["max_det"])[0]
                else:
                    dets = ul_nms(p.clone(), conf, kw["iou"], kw["classes"], kw["agnostic"], max_det=kw["max_det"],
                                  end2end=layout == "end2end")[0]
                cases.append({"conf": conf, **kw, "detections": [floats(d) for d in dets.numpy()]})
            dump(GOLD / "nms" / f"{name}.json", {"raw": f"tests/goldens/raw/{name}.json", "cases": cases})
        else:  # yolox: decoding only; its demo NMS uses (x2 - x1 + 1) areas, unlike torchvision.
            dec = demo_postprocess(out.copy(), hw)[0]
            dump(GOLD / "nms" / f"{name}.json", {"raw": f"tests/goldens/raw/{name}.json",
                                                 "decoded_cxcywh_obj_cls": [floats(r) for r in dec]})


LETTERBOX_CASES = [("chelsea.png", 320), ("coffee.png", 160), ("rocket.jpg", 320)]


def make_letterbox():
    from ultralytics.data.augment import LetterBox

    for image, size in LETTERBOX_CASES:
        img = cv2.imread(str(DATA / image))
        lb = LetterBox(new_shape=(size, size), auto=False, stride=32)(image=img)
        out = GOLD / "letterbox" / f"{Path(image).stem}-{size}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), lb)  # stored as the BGR image OpenCV wrote; PNG holds it as RGB
        print("wrote", out.relative_to(ROOT))
    # The predictor's rect letterbox of a dynamic export (auto=True): 451x300 -> 128x160.
    lb = LetterBox(new_shape=(160, 160), auto=True, stride=32)(image=cv2.imread(str(DATA / "chelsea.png")))
    out = GOLD / "letterbox" / "chelsea-rect160.png"
    cv2.imwrite(str(out), lb)
    print("wrote", out.relative_to(ROOT))


DETECT_MODEL = ROOT / "models/tree-yolo11n-320.onnx"
DETECT_IMAGES = ["osbs_029.png", "yell_val_480x320.png", "osbs_029.jpg"]


def predictor_record(image, r, **extra):
    """One predictor result as a golden record: the image, its size and every detection."""
    b = r.boxes
    return {
        "image": f"tests/data/{image}", **extra,
        "width": r.orig_shape[1], "height": r.orig_shape[0],
        "detections": [
            {"class_id": int(c), "score": float(s), "box": [float(v) for v in xyxy]}
            for xyxy, s, c in zip(b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy())
        ],
    }


def make_detect():
    from ultralytics import YOLO

    model = YOLO(str(DETECT_MODEL), task="detect")
    records = []
    for image in DETECT_IMAGES:
        r = model.predict(str(DATA / image), imgsz=320, conf=0.25, iou=0.7, max_det=300, verbose=False)[0]
        records.append(predictor_record(image, r))
    dump(GOLD / "detect" / "tree-yolo11n-320.json", {
        "model": str(DETECT_MODEL.relative_to(ROOT)), "conf": 0.25, "iou": 0.7, "records": records})


DYNAMIC_MODEL = FIX / "v8-dyn-op17.onnx"
# (image, conf): a non-square photo. This random-weight export saturates some scores at 1.0 on
# other photos (ties that NMS may break either way) and amplifies JPEG decoder differences; on
# this PNG it does neither, and it stays under max_det at this conf.
DYNAMIC_IMAGES = [("chelsea.png", 0.001)]


def make_detect_dynamic():
    """Ultralytics' predictor on a dynamic export: rect (LetterBox(auto=True), its default for
    dynamic ONNX) and square (rect=False), at the export's imgsz 160."""
    from ultralytics import YOLO

    for rect, name in [(True, "v8-dyn-op17-rect.json"), (False, "v8-dyn-op17-square.json")]:
        model = YOLO(str(DYNAMIC_MODEL), task="detect")
        records = []
        for image, conf in DYNAMIC_IMAGES:
            r = model.predict(str(DATA / image), imgsz=160, conf=conf, iou=0.7, max_det=300,
                              rect=rect, verbose=False)[0]
            assert len(r.boxes) < 300, f"{image}: {len(r.boxes)} detections reach max_det"
            records.append(predictor_record(image, r, conf=conf))
        dump(GOLD / "detect" / name, {
            "model": str(DYNAMIC_MODEL.relative_to(ROOT)), "imgsz": 160, "rect": rect,
            "iou": 0.7, "records": records})


def make_aerial_samples():
    """Small aerial test images from the deepforest wheel (MIT): OSBS_029 (a site the base model
    never saw) as PNG and JPEG, and a 480x320 crop of the YELL held-out band (bottom 25 %)."""
    import tempfile
    import zipfile

    sys.path.insert(0, str(ROOT / "models/recipe"))
    from prepare_data import fetch_wheel

    from PIL import Image

    wheel = fetch_wheel(Path.home() / ".cache/perch/data")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        z.extractall(tmp, ["deepforest/data/OSBS_029.png", "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png"])
        src = Path(tmp) / "deepforest/data"
        osbs = Image.open(src / "OSBS_029.png").convert("RGB")
        osbs.save(DATA / "osbs_029.png")
        osbs.save(DATA / "osbs_029.jpg", quality=85)
        yell = Image.open(src / "2019_YELL_2_528000_4978000_image_crop2.png").convert("RGB")
        w, h = yell.size
        y0 = int(h * 0.75) + 40
        yell.crop((600, y0, 1080, y0 + 320)).save(DATA / "yell_val_480x320.png")
    for f in ("osbs_029.png", "osbs_029.jpg", "yell_val_480x320.png"):
        print("wrote", (DATA / f).relative_to(ROOT))


EVAL_DIR = DATA / "eval"


def make_eval_set(n_tiles=5):
    """A small committed evaluation set: the YELL held-out tiles with the most trees, plus
    OSBS_029 (another site, resized by the validator), in Ultralytics YOLO layout."""
    import shutil

    src = Path.home() / ".cache/perch/data"
    if EVAL_DIR.exists():
        shutil.rmtree(EVAL_DIR)
    for sub in ("images/val", "labels/val"):
        (EVAL_DIR / sub).mkdir(parents=True)
    labels = sorted((src / "yell/labels/val").glob("*.txt"), key=lambda p: (-len(p.read_text().splitlines()), p.name))
    picked = [(src / "yell", p.stem) for p in labels[:n_tiles]] + [(src / "osbs", "OSBS_029")]
    for root, stem in picked:
        shutil.copy(root / "images/val" / f"{stem}.png", EVAL_DIR / "images/val" / f"{stem}.png")
        shutil.copy(root / "labels/val" / f"{stem}.txt", EVAL_DIR / "labels/val" / f"{stem}.txt")
    (EVAL_DIR / "data.yaml").write_text("# YELL held-out tiles + OSBS_029 (deepforest 2.1.0, MIT)\ntrain: images/val  # unused; Ultralytics requires the key\nval: images/val\nnames:\n  0: Tree\n")
    print("wrote", EVAL_DIR.relative_to(ROOT), len(picked), "images")


def make_eval_golden():
    """Ultralytics `val` of the demo model on the committed eval set (conf 0.001, IoU 0.7)."""
    from ultralytics import YOLO

    model = YOLO(str(DETECT_MODEL), task="detect")
    r = model.val(data=str(EVAL_DIR / "data.yaml"), imgsz=320, batch=1, conf=0.001, iou=0.7, plots=False,
                  verbose=False, save_json=False)
    b = r.box
    dump(GOLD / "eval" / "tree-yolo11n-320.json", {
        "model": str(DETECT_MODEL.relative_to(ROOT)), "data": "tests/data/eval/data.yaml",
        "precision": float(b.mp), "recall": float(b.mr), "map50": float(b.map50), "map50_95": float(b.map),
        "per_class_map50_95": [float(v) for v in b.maps],
    })


DYN_MODEL = FIX / "tree-yolo11n-dyn.onnx"
RECT_DIR = DATA / "eval-rect"


def make_dynamic_demo():
    """The demo model as a dynamic export: YOLO11n built from its yaml (nc=1), fused, its weights
    taken from the static export's initializers, exported with dynamic=True. At 320x320 it
    gives the static export's output bit for bit (checked here with onnxruntime)."""
    import onnx
    from onnx import numpy_helper
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(DETECT_MODEL)).graph.initializer}
    net = DetectionModel("yolo11n.yaml", nc=1, verbose=False)
    net.fuse(verbose=False)
    sd = net.state_dict()
    for k in sd:
        assert tuple(sd[k].shape) == inits[k].shape, k
        sd[k] = torch.from_numpy(inits[k].copy())
    net.load_state_dict(sd)
    net.names, net.task = {0: "Tree"}, "detect"
    net.yaml["nc"] = 1
    y = YOLO("yolo11n.yaml")
    y.model = net
    y.model.args = {"imgsz": 320, "data": "", "task": "detect"}
    out = Path(y.export(format="onnx", dynamic=True, imgsz=320, simplify=True, opset=17))
    out.replace(DYN_MODEL)
    x = np.random.RandomState(0).rand(1, 3, 320, 320).astype(np.float32)
    a = ort.InferenceSession(str(DETECT_MODEL)).run(None, {"images": x})[0]
    b = ort.InferenceSession(str(DYN_MODEL)).run(None, {"images": x})[0]
    assert np.array_equal(a, b), np.abs(a - b).max()
    print("wrote", DYN_MODEL.relative_to(ROOT))


def make_rect_eval_set():
    """Non-square crops of the committed eval images (two wide, two tall, two near-square),
    their labels clipped to the crop (boxes keeping under half their area are dropped)."""
    import shutil

    if RECT_DIR.exists():
        shutil.rmtree(RECT_DIR)
    for sub in ("images/val", "labels/val"):
        (RECT_DIR / sub).mkdir(parents=True)
    crops = [(0, 0, 400, 240), (0, 90, 400, 300), (0, 0, 250, 400), (120, 0, 300, 400), (0, 0, 400, 370), (20, 0, 360, 400)]
    for (x0, y0, w, h), img in zip(crops, sorted((EVAL_DIR / "images/val").glob("*.png"))):
        im = cv2.imread(str(img))
        H, W = im.shape[:2]
        w, h = min(w, W - x0), min(h, H - y0)
        cv2.imwrite(str(RECT_DIR / "images/val" / img.name), im[y0:y0 + h, x0:x0 + w])
        rows = []
        for line in (EVAL_DIR / "labels/val" / f"{img.stem}.txt").read_text().split("\n"):
            if not line.strip():
                continue
            c, cx, cy, bw, bh = line.split()
            cx, cy, bw, bh = float(cx) * W, float(cy) * H, float(bw) * W, float(bh) * H
            a = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
            b = [max(a[0], x0), max(a[1], y0), min(a[2], x0 + w), min(a[3], y0 + h)]
            if b[2] <= b[0] or b[3] <= b[1] or (b[2] - b[0]) * (b[3] - b[1]) < 0.5 * bw * bh:
                continue
            rows.append(f"{c} {((b[0] + b[2]) / 2 - x0) / w:.6f} {((b[1] + b[3]) / 2 - y0) / h:.6f} "
                        f"{(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}")
        (RECT_DIR / "labels/val" / f"{img.stem}.txt").write_text("\n".join(rows) + "\n")
    (RECT_DIR / "data.yaml").write_text("# non-square crops of tests/data/eval (see scripts/make_goldens.py)\n"
                                        "train: images/val  # unused; Ultralytics requires the key\nval: images/val\n"
                                        "names:\n  0: Tree\n")
    print("wrote", RECT_DIR.relative_to(ROOT))


def make_rect_eval_golden():
    """Ultralytics `val` of the dynamic demo export on the non-square set: rectangular batch
    shapes (rect=True, as `model.val()` sets), for batch 16 (the default: one batch) and 2."""
    from ultralytics import YOLO

    out = {"model": str(DYN_MODEL.relative_to(ROOT)), "data": "tests/data/eval-rect/data.yaml", "imgsz": 320}
    for batch in (16, 2):
        r = YOLO(str(DYN_MODEL), task="detect").val(data=str(RECT_DIR / "data.yaml"), imgsz=320, batch=batch,
                                                     conf=0.001, iou=0.7, plots=False, verbose=False, save_json=False)
        b = r.box
        out[f"batch{batch}"] = {"precision": float(b.mp), "recall": float(b.mr), "map50": float(b.map50),
                                "map50_95": float(b.map)}
    dump(GOLD / "eval" / "tree-yolo11n-dyn-rect.json", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="raw,letterbox,detect,detect_dynamic")
    only = set(ap.parse_args().only.split(","))
    if "raw" in only or "nms" in only:
        make_crops()
        make_raw_and_nms()
    if "letterbox" in only:
        make_letterbox()
    if "detect" in only:
        make_aerial_samples()
        make_detect()
    if "detect_dynamic" in only:
        make_detect_dynamic()
    if "eval" in only:
        make_eval_set()
        make_eval_golden()
    if "eval_rect" in only:
        make_dynamic_demo()
        make_rect_eval_set()
        make_rect_eval_golden()


if __name__ == "__main__":
    main()
