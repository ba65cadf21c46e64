"""Per-layer time of perch against onnxruntime on the same model, image, precision and threads.

perch's side is `perch bench --profile --json` (tract's per-node wall time over the timed runs);
onnxruntime's is its own profiler (SessionOptions.enable_profiling: one `kernel_time` event per
node and run). Both sides are summed per Ultralytics layer, read from the node names
(`/model.N/...`, which both runtimes keep through their optimisers); nodes without a layer
(onnxruntime's NCHWc layout reorders, tract's own glue) are summed as `other`. Each side's
total is the sum of its nodes, which is a little more than its plain inference time (timing
every node costs something on both sides). Prints the CPU model and the kernel-picking flags,
then a markdown table: layer, perch ms, onnxruntime ms, ratio, and the costliest operator kind
of the layer on each side.

Usage:
  PY=$(models/recipe/venv.sh)/bin/python
  $PY scripts/layers_ort.py --model models/tree-yolo11n-320.onnx --image tests/data/osbs_029.png \
      --threads 1 --iterations 100 [--precision f32|int8]
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import cv2
import onnxruntime as ort

from bench_ort import add_run_args, cpu_facts, default_perch_bin, letterbox

LAYER = re.compile(r"/model\.(\d+)/")


def layer_of(name):
    m = LAYER.search(name)
    return int(m.group(1)) if m else "other"


def perch_layers(a):
    cmd = [a.perch, "bench", "--model", a.model, "--image", a.image, "--json", "--profile",
           "--iterations", str(a.iterations), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--precision", a.precision]
    if a.calibration:
        cmd += ["--calibration", a.calibration]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    if r["inference_precision"] != a.precision:
        raise SystemExit(f"layers_ort.py: perch ran {r['inference_precision']}, not {a.precision}")
    ms, ops = defaultdict(float), defaultdict(lambda: defaultdict(float))
    for n in r["profile_ms"]:
        k = layer_of(n["node"])
        ms[k] += n["ms"]
        ops[k][n["op"]] += n["ms"]
    return ms, ops, r


def ort_layers(a, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory() as d:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "ort")
        sess = ort.InferenceSession(a.ort_model or a.model, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(a.warmup):
            sess.run(None, {name: x})
        for _ in range(a.iterations):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    # The profiler records the warm-up runs too: keep the events from the start of the last
    # `iterations` model_run spans.
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    timed = runs[-a.iterations:]
    lo = timed[0][0]
    ms, ops = defaultdict(float), defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < lo:
            continue
        node = e["name"][: -len("_kernel_time")]
        k = layer_of(node)
        v = e["dur"] / 1e3 / a.iterations
        ms[k] += v
        ops[k][e.get("args", {}).get("op_name", "?")] += v
    return ms, ops


def top(ops):
    if not ops:
        return ""
    op, v = max(ops.items(), key=lambda kv: kv[1])
    return f"{op} {v:.2f}"


def main():
    ap = argparse.ArgumentParser()
    add_run_args(ap)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="f32", choices=["f32", "int8"])
    ap.add_argument("--calibration", help="perch calibration for int8 (default: the one beside the model)")
    ap.add_argument("--ort-model", help="model onnxruntime runs (default: --model; for int8 pass its own "
                    "QDQ export, e.g. the one bench_ort.py writes)")
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN"))
    a = ap.parse_args()
    a.perch = a.perch or default_perch_bin()
    if a.precision == "int8" and not a.ort_model:
        raise SystemExit("layers_ort.py: --precision int8 needs --ort-model (onnxruntime's own int8 model)")

    pm, pops, r = perch_layers(a)
    h, w = r["imgsz"] if isinstance(r["imgsz"], list) else (r["imgsz"], r["imgsz"])
    x = letterbox(cv2.imread(a.image), (h, w))
    om, oops = ort_layers(a, x)

    model, flags = cpu_facts()
    print(f"CPU: {model}; flags: {' '.join(flags)}")
    print(f"model {a.model} at {h}x{w}, {a.precision}, {a.threads} thread(s), {a.iterations} runs; "
          f"perch kernels: {', '.join(r['f32_kernels'] + r['int8_kernels'])}")
    print(f"perch inference p50 {r['inference_ms']['p50']:.2f} ms (min {r['inference_ms']['min']:.2f})")
    print()
    print("| layer | perch ms | onnxruntime ms | ratio | perch top op | onnxruntime top op |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    keys = sorted({*pm, *om}, key=lambda k: (k == "other", k if k != "other" else 0))
    for k in keys:
        p, o = pm.get(k, 0.0), om.get(k, 0.0)
        ratio = f"{p / o:.2f}" if o > 0 else "-"
        print(f"| {k} | {p:.3f} | {o:.3f} | {ratio} | {top(pops.get(k))} | {top(oops.get(k))} |")
    tp, to = sum(pm.values()), sum(om.values())
    print(f"| total | {tp:.3f} | {to:.3f} | {tp / to:.2f} | | |")


if __name__ == "__main__":
    main()
