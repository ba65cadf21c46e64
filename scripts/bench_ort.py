"""Compare perch with onnxruntime on the same model, image and thread count.

Runs `perch bench --json` (the release binary) and onnxruntime (CPUExecutionProvider, same
number of intra-op threads, graph optimisations on) on the same letterboxed input, and prints
per-stage latency percentiles and the perch/onnxruntime ratio of median inference latency.

Usage:
  PY=$(models/recipe/venv.sh)/bin/python
  cargo build --release
  $PY scripts/bench_ort.py --model models/tree-yolo11n-320.onnx --image tests/data/osbs_029.png
"""
import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def letterbox(img_bgr, size):
    from ultralytics.data.augment import LetterBox

    lb = LetterBox(new_shape=size, auto=False, stride=32)(image=img_bgr)
    return np.ascontiguousarray(lb[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def pct(xs, p):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * p)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(Path.home() / ".cache/perch/target/release/perch")))
    a = ap.parse_args()

    perch = json.loads(subprocess.run(
        [a.perch, "bench", "--model", a.model, "--image", a.image, "--json",
         "--iterations", str(a.iterations), "--warmup", str(a.warmup)],
        check=True, capture_output=True, text=True).stdout)
    h, w = perch["input"]

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    img = cv2.imread(a.image)
    letterbox(img, (h, w))  # the first call imports Ultralytics
    pre = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        x = letterbox(img, (h, w))
        pre.append((time.perf_counter() - t) * 1e3)
    for _ in range(a.warmup):
        sess.run(None, {name: x})
    inf = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        sess.run(None, {name: x})
        inf.append((time.perf_counter() - t) * 1e3)

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus; "
          f"threads {a.threads}; onnxruntime {ort.__version__}; input {h}x{w}; {a.iterations} iterations")
    print(f"{'stage (ms)':<26}{'p50':>9}{'p90':>9}{'p99':>9}")
    for label, d in (("perch preprocess", perch["preprocess_ms"]), ("perch inference (tract)", perch["inference_ms"]),
                     ("perch postprocess", perch["postprocess_ms"]), ("perch total", perch["total_ms"])):
        print(f"{label:<26}{d['p50']:>9.3f}{d['p90']:>9.3f}{d['p99']:>9.3f}")
    for label, xs in (("ultralytics letterbox (py)", pre), ("onnxruntime inference", inf)):
        print(f"{label:<26}{pct(xs, .5):>9.3f}{pct(xs, .9):>9.3f}{pct(xs, .99):>9.3f}")
    ratio = perch["inference_ms"]["p50"] / pct(inf, .5)
    print(f"inference p50 ratio perch/onnxruntime: {ratio:.2f}x ({'slower' if ratio > 1 else 'faster'})")


if __name__ == "__main__":
    main()
