"""Compare perch with onnxruntime on the same model, image and thread count, per precision.

For each thread count it runs `perch bench --json` (the release binary) at f32, int8 (with the
model's perch calibration) and f16 (only where perch builds f16, i.e. the CPU has native half
arithmetic), and onnxruntime (CPUExecutionProvider, graph optimisations on) at f32 and on two
int8 QDQ models of its own (onnxruntime.quantization.quantize_static: per-channel int8 weights,
uint8 activations, MinMax calibration on --calib-images): one with every op it quantizes, and one
with perch's policy (only the Convs perch quantizes; the detection head's final convs, DFL and
decode stay float). It prints the CPU model and the flags that pick tract's kernels, the int8
kernel perch runs (`TRACT_X86_INT8_KERNEL` forces one on x86), latency percentiles, and the
perch/onnxruntime ratio of median inference latency at equal precision and threads.

The perch binary is the first of $CARGO_TARGET_DIR/release/perch, target/release/perch (a plain
`cargo build --release` in the clone) and ~/.cache/perch/target/release/perch (CI's cache) that
exists; pass --perch or PERCH_BIN for another. Without one it stops with a one-line message.

Usage:
  PY=$(models/recipe/venv.sh)/bin/python
  cargo build --release
  $PY scripts/bench_ort.py --model models/tree-yolo11n-320.onnx --image tests/data/osbs_029.png \
      --threads 1,2 --iterations 100
"""
import argparse
import json
import os
import platform
import subprocess
import sys
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


def perch_kernel(a):
    """The int8 matrix kernel perch's tract selects on this machine (`perch bench --json`)."""
    r = perch_bench(a, 1, "int8", iterations=1)
    return ", ".join((r or {}).get("int8_kernels") or ["unknown"])


def perch_bench(a, threads, precision, iterations=None):
    cmd = [a.perch, "bench", "--model", a.model, "--image", a.image, "--json",
           "--iterations", str(iterations or a.iterations), "--warmup", str(0 if iterations else a.warmup),
           "--threads", str(threads), "--precision", precision]
    if precision == "int8":
        cmd += ["--calibration", a.calibration]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return r if r["inference_precision"] == precision else None


# Activations that mark a Conv as an inner layer: perch quantizes exactly these Convs (one group,
# float initializer weights, output feeding an activation) and leaves the rest float
# (src/model/quant.rs).
ACTIVATIONS = {"Sigmoid", "Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Clip", "Silu"}


def perch_policy_excludes(path):
    """Names of the Conv nodes perch keeps in float: the ones onnxruntime must exclude to quantize
    with perch's policy (detection head's final convs, DFL projection, depthwise convs, attention
    projections)."""
    import onnx

    g = onnx.load(path).graph
    inits = {t.name: t for t in g.initializer}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    keep_float = []
    for n in g.node:
        if n.op_type != "Conv":
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits.get(n.input[1])
        ok = (group == 1 and w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 4
              and any(op in ACTIVATIONS for op in consumers.get(n.output[0], [])))
        if not ok:
            keep_float.append(n.name)
    return keep_float


def calib_images(a):
    return sorted(p for p in Path(a.calib_images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def ort_quantized(a, h, w, out_dir, perch_policy):
    """onnxruntime's own int8 QDQ model (quantize_static, per-channel int8 weights, uint8
    activations, MinMax on --calib-images): every op it can quantize, or (perch_policy) only the
    Convs perch quantizes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = calib_images(a)
    name = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(images)

        def get_next(self):
            p = next(self.it, None)
            return None if p is None else {name: letterbox(cv2.imread(str(p)), (h, w))}

    pre = out_dir / "pre.onnx"
    if not pre.exists():
        quant_pre_process(a.model, str(pre))
    q = out_dir / ("qdq-perch-policy.onnx" if perch_policy else "qdq.onnx")
    kw = {}
    if perch_policy:
        kw = {"op_types_to_quantize": ["Conv"], "nodes_to_exclude": perch_policy_excludes(str(pre))}
    quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **kw)
    return str(q)


def cpu_facts():
    """CPU model and the flags that pick tract's x86/ARM int8 kernels (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = val.strip()
            elif key in ("flags", "Features"):
                flags = set(val.split())
    except OSError:
        pass
    picks = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "fphp", "neon"]
    return model, [f for f in picks if f in flags]


def ort_bench(path, threads, x, a):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(a.warmup):
        sess.run(None, {name: x})
    inf = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        sess.run(None, {name: x})
        inf.append((time.perf_counter() - t) * 1e3)
    return {"p50": pct(inf, .5), "p90": pct(inf, .9), "p99": pct(inf, .99)}


def default_perch_bin():
    """Where `cargo build --release` put perch: $CARGO_TARGET_DIR, the clone's target/, or the CI cache."""
    cands = []
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release/perch")
    cands += [ROOT / "target/release/perch", Path.home() / ".cache/perch/target/release/perch"]
    for c in cands:
        if c.is_file():
            return str(c)
    sys.exit("bench_ort.py: no perch binary in " + ", ".join(map(str, cands))
             + "; run `cargo build --release` or pass --perch / PERCH_BIN")


def add_run_args(ap):
    """The arguments every perch-against-onnxruntime script takes: model, image, run counts."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)


def main():
    import tempfile

    ap = argparse.ArgumentParser()
    add_run_args(ap)
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--calibration", help="perch calibration (default: <model stem>.calibration.json)")
    yell = Path.home() / ".cache/perch/data/yell/images/train"
    ap.add_argument("--calib-images", default=str(yell if yell.is_dir() else ROOT / "tests/data/eval/images/val"),
                    help="images for onnxruntime's calibration (default: the YELL training tiles perch's "
                         "demo calibration was made from, when models/recipe/prepare_data.py has built them)")
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN"),
                    help="perch binary (default: $CARGO_TARGET_DIR/release/perch, target/release/perch, "
                         "then ~/.cache/perch/target/release/perch, the first that exists)")
    a = ap.parse_args()
    a.perch = a.perch or default_perch_bin()
    if a.calibration is None:
        a.calibration = str(Path(a.model).with_suffix(".calibration.json"))

    probe = perch_bench(a, 1, "f32")
    h, w = probe["imgsz"]
    img = cv2.imread(a.image)
    x = letterbox(img, (h, w))
    pre = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        letterbox(img, (h, w))
        pre.append((time.perf_counter() - t) * 1e3)
    tmp = Path(tempfile.mkdtemp(prefix="perch-ort-"))
    ort_int8 = ort_quantized(a, h, w, tmp, perch_policy=False)
    ort_int8_policy = ort_quantized(a, h, w, tmp, perch_policy=True)

    model, flags = cpu_facts()
    print(f"machine: {platform.machine()} {model}, {os.cpu_count()} cpus, kernel-selecting flags: "
          f"{' '.join(flags) or 'none'}; onnxruntime {ort.__version__}; model {a.model}; input {h}x{w}; "
          f"{a.iterations} iterations; onnxruntime calibration: {len(calib_images(a))} images in {a.calib_images}")
    forced = os.environ.get("TRACT_X86_INT8_KERNEL")
    print(f"perch int8 kernel: {perch_kernel(a)}" + (f" (forced by TRACT_X86_INT8_KERNEL={forced})" if forced else ""))
    print(f"perch preprocess p50 {probe['preprocess_ms']['p50']:.3f} ms, postprocess p50 "
          f"{probe['postprocess_ms']['p50']:.3f} ms; Ultralytics LetterBox (Python/OpenCV) p50 {pct(pre, .5):.3f} ms")
    print(f"{'inference (ms)':<34}{'threads':>8}{'p50':>9}{'p90':>9}{'p99':>9}   ratio")
    for threads in [int(t) for t in a.threads.split(",")]:
        rows = {}
        for precision in ("f32", "int8", "f16"):
            if precision == "int8" and not Path(a.calibration).exists():
                continue
            r = perch_bench(a, threads, precision)
            if r is not None:
                rows[f"perch {precision}"] = r["inference_ms"]
        rows["onnxruntime f32"] = ort_bench(a.model, threads, x, a)
        rows["onnxruntime int8 (QDQ, all ops)"] = ort_bench(ort_int8, threads, x, a)
        rows["onnxruntime int8 (perch policy)"] = ort_bench(ort_int8_policy, threads, x, a)
        for label, d in rows.items():
            peers = {"perch f32": ["onnxruntime f32"],
                     "perch int8": ["onnxruntime int8 (perch policy)", "onnxruntime int8 (QDQ, all ops)"]}
            note = "; ".join(f"{d['p50'] / rows[p]['p50']:.2f}x {p}" for p in peers.get(label, []))
            if label == "perch f16":
                note = f"{d['p50'] / rows['perch f32']['p50']:.2f}x perch f32"
            if label == "perch int8":
                note += f"; {rows['perch f32']['p50'] / d['p50']:.2f}x speed-up over perch f32"
            print(f"{label:<34}{threads:>8}{d['p50']:>9.3f}{d['p90']:>9.3f}{d['p99']:>9.3f}   {note}")


if __name__ == "__main__":
    main()
