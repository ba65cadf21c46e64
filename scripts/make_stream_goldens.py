"""Reference data for the camera path (committed under tests/goldens and tests/data).

  goldens/pixfmt/   YUYV, UYVY, NV12 and I420 buffers and OpenCV's `cvtColor(..., COLOR_YUV2RGB_*)`
                    of each: BT.601 limited range, the conversion V4L2 cameras need. Buffers come
                    from a real photo (OpenCV's own RGB->I420, repacked) and from random bytes
                    (every chroma extreme).
  data/osbs-pan.y4m a YUV4MPEG2 clip: 6 frames panning over the OSBS aerial image, 320x240, 5 fps.
  goldens/stream/osbs-pan.json
                    Ultralytics' predictor (onnxruntime backend) with the demo model on each clip
                    frame as OpenCV converts it (I420 -> RGB), default thresholds.
Run: PY=$(models/recipe/venv.sh)/bin/python; $PY scripts/make_stream_goldens.py
"""
import json
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data"
GOLD = ROOT / "tests/goldens"
MODEL = ROOT / "models/tree-yolo11n-320.onnx"


def planes_i420(i420, w, h):
    y = i420[: w * h].reshape(h, w)
    u = i420[w * h: w * h + w * h // 4].reshape(h // 2, w // 2)
    v = i420[w * h + w * h // 4:].reshape(h // 2, w // 2)
    return y, u, v


def packed_variants(i420, w, h):
    """The same picture in each layout (chroma shared by 2x2 blocks, as in I420)."""
    y, u, v = planes_i420(i420, w, h)
    nv12 = np.concatenate([y.ravel(), np.stack([u, v], -1).ravel()])
    # 4:2:2 packed formats: each row pair reuses the I420 chroma row.
    u2, v2 = np.repeat(u, 2, 0), np.repeat(v, 2, 0)
    yuyv = np.stack([y[:, 0::2], u2, y[:, 1::2], v2], -1).ravel()
    uyvy = np.stack([u2, y[:, 0::2], v2, y[:, 1::2]], -1).ravel()
    return {
        "i420": (i420, cv2.COLOR_YUV2RGB_I420, (h * 3 // 2, w)),
        "nv12": (nv12, cv2.COLOR_YUV2RGB_NV12, (h * 3 // 2, w)),
        "yuyv": (yuyv, cv2.COLOR_YUV2RGB_YUY2, (h, w, 2)),
        "uyvy": (uyvy, cv2.COLOR_YUV2RGB_UYVY, (h, w, 2)),
    }


def make_pixfmt():
    out = GOLD / "pixfmt"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    photo = cv2.imread(str(DATA / "chelsea.png"))[100:148, 200:264]  # 64x48, BGR
    sources = {
        "photo": (cv2.cvtColor(photo, cv2.COLOR_BGR2YUV_I420).ravel(), 64, 48),
        "random": (rng.integers(0, 256, 32 * 16 * 3 // 2, dtype=np.uint8), 32, 16),
    }
    index = []
    for name, (i420, w, h) in sources.items():
        for fmt, (buf, code, shape) in packed_variants(i420, w, h).items():
            rgb = cv2.cvtColor(np.ascontiguousarray(buf).reshape(shape), code)
            stem = f"{name}-{w}x{h}.{fmt}"
            (out / f"{stem}.yuv").write_bytes(np.ascontiguousarray(buf).tobytes())
            (out / f"{stem}.rgb").write_bytes(rgb.tobytes())
            index.append({"name": stem, "format": fmt, "width": w, "height": h})
    (out / "index.json").write_text(json.dumps({"opencv": cv2.__version__, "cases": index}, indent=1) + "\n")
    print("wrote", len(index), "pixfmt cases")


def make_clip():
    from ultralytics import YOLO

    img = cv2.imread(str(DATA / "osbs_029.png"))  # 400x400 BGR
    w, h, n = 320, 240, 6
    frames = []
    with open(DATA / "osbs-pan.y4m", "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F5:1 Ip A1:1 C420jpeg XYSCSS=420JPEG\n".encode())
        for i in range(n):
            x, y = i * 16, i * 32
            i420 = cv2.cvtColor(img[y:y + h, x:x + w], cv2.COLOR_BGR2YUV_I420)
            f.write(b"FRAME\n")
            f.write(i420.tobytes())
            frames.append(cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420))
    model = YOLO(str(MODEL), task="detect")
    records = []
    for i, bgr in enumerate(frames):
        r = model.predict(bgr, imgsz=320, conf=0.25, iou=0.7, max_det=300, verbose=False)[0]
        b = r.boxes
        records.append({
            "seq": i, "width": w, "height": h,
            "detections": [
                {"class_id": int(c), "score": float(s), "box": [float(v) for v in xyxy]}
                for xyxy, s, c in zip(b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy())
            ],
        })
    path = GOLD / "stream" / "osbs-pan.json"
    path.write_text(json.dumps({"model": str(MODEL.relative_to(ROOT)), "conf": 0.25, "iou": 0.7,
                                "clip": "tests/data/osbs-pan.y4m", "records": records},
                               separators=(",", ":")) + "\n")
    print("wrote", path.relative_to(ROOT), sum(len(r["detections"]) for r in records), "detections")


if __name__ == "__main__":
    make_pixfmt()
    make_clip()
