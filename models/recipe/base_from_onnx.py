"""Rebuild the base detector's Ultralytics checkpoint from the committed ONNX export.

train_adapters.py fine-tunes the base's PyTorch checkpoint (train_base.py's best.pt). When that
file is gone, retraining gives other weights; this script instead rebuilds a YOLO11n checkpoint
(nc=1, names {0: Tree}, built offline from Ultralytics' yolo11n.yaml) whose export is
bit-identical to models/tree-yolo11n-320.onnx.

Why not "fused conv weight + identity BatchNorm" (weight 1, mean 0, var 1, eps 0)? Two things in
Ultralytics 8.4.190 undo it: the trainer builds a fresh model from the yaml and only copies the
state dict, so every BatchNorm gets eps=1e-3 again (eps is not in the state dict); and every
checkpoint the trainer writes is FP16 (`ema.half()`), so fp32 fused weights in `conv.weight`
would be rounded, and even frozen layers would export differently from the base. (It would
also make train-mode BatchNorm normalise each fused conv output to unit variance, a different
function from the base while training.)

What is exact: the base was exported from an FP16 checkpoint, fused in fp32 by
torch.nn.utils.fusion.fuse_conv_bn_weights:
    s = fl(g * fl(rsqrt(fl(v + 1e-3))));  W = fl(Wc * s);  B = fl(fl(fl(-m * r) * g) + b)
with Wc, g, b, m, v FP16 values (the Detect head's plain 1x1 convs are stored FP16-exact in the
ONNX, which confirms it). So for every output channel this script searches FP16 values that
reproduce the ONNX weight and bias bit-for-bit under exactly that arithmetic:
  1. s: the scales for which every W_i / s rounds to an FP16 Wc_i with fl(Wc_i * s) == W_i
     (the largest weight's FP16 mantissa is enumerated, 1024 candidates);
  2. (v, g): FP16 running variance and weight with fl(g * rsqrt(v + eps)) == s (all 31743
     positive FP16 v are tried; only a few solutions exist, the original among them);
  3. the power-of-two split between Wc and g (which the fused weight cannot tell), picked so the
     running variance is within 2x of the variance of Wc * x measured on the base's own training
     tiles (YELL), so that train-mode BatchNorm (batch statistics) starts close to the base; among
     the solutions left, the one whose Wc RMS is closest to PyTorch's initial conv scale;
  4. (m, b): FP16 running mean and bias with fl(fl(fl(-m * r) * g) + b) == B, the mean closest
     to the measured mean of Wc * x.
The checkpoint is written in FP16, as Ultralytics writes its own, so a round trip through the
trainer's FP16 saves keeps frozen layers bit-identical.

Verification (run by default): the checkpoint is exported exactly as train_adapters.py exports
(imgsz 320, opset 17, simplify, static) and every initializer of the export is compared
bit-for-bit with the committed ONNX; with a perch binary, `perch adapter diff --freeze 23` of the
export against the base must find nothing changed.

Usage: $PY models/recipe/base_from_onnx.py [--onnx models/tree-yolo11n-320.onnx]
           [--out ~/.cache/perch/runs/tree-yolo11n-from-onnx/weights/best.pt]
           [--images ~/.cache/perch/data/yell/images/train] [--perch PATH]
(prepare_data.py must have written the YELL tiles; about a minute on one core.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
CACHE = Path.home() / ".cache/perch"
BN_EPS = 1e-3  # Ultralytics' initialize_weights sets every BatchNorm2d eps to 1e-3

F16 = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)  # +0 and every positive finite FP16
F16_ALL = np.unique(np.concatenate([-F16[1:], F16])).astype(np.float64)  # every finite FP16, sorted
POS16 = F16[1:]


def f32(x):
    return np.asarray(x, dtype=np.float32)


def is_f16(x: np.ndarray) -> bool:
    return bool(np.all(np.asarray(x, np.float64).astype(np.float16).astype(np.float64) == x)) and np.all(np.abs(x) <= 65504)


def onnx_weights(path: Path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def build_model():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11n.yaml", nc=1, verbose=False)
    model.names = {0: "Tree"}
    return model.float().eval()


def bn_convs(model):
    from ultralytics.nn.modules import Conv

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv) and hasattr(m, "bn")]


def plain_convs(model):
    return [(n, m) for n, m in model.named_modules()
            if type(m) is torch.nn.Conv2d and not n.endswith(".conv") and ".dfl" not in n]


def fused_stats(model, onnx_w: dict, images: Path):
    """Per-channel mean and variance of each Conv's fused conv output without bias (= s * Wc x),
    on the base's training tiles, through the exact fused base (weights straight from the ONNX)."""
    import copy

    names = [n for n, _ in bn_convs(model)]
    fused = copy.deepcopy(model).fuse(verbose=False)
    mods = dict(fused.named_modules())
    for n in names:
        m = mods[n]
        m.conv.weight.data = torch.from_numpy(onnx_w[f"{n}.conv.weight"].copy())
        m.conv.bias.data = torch.from_numpy(onnx_w[f"{n}.conv.bias"].copy())
    for n, m in plain_convs(fused):
        m.weight.data = torch.from_numpy(onnx_w[f"{n}.weight"].copy())
        m.bias.data = torch.from_numpy(onnx_w[f"{n}.bias"].copy())
    acc = {}

    def hook(name):
        def f(mod, inp, out):
            y = (out - mod.bias.view(1, -1, 1, 1)).double()
            s = acc.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + y.sum((0, 2, 3))
            s[1] = s[1] + (y * y).sum((0, 2, 3))
            s[2] += y.shape[0] * y.shape[2] * y.shape[3]
        return f

    hs = [mods[n].conv.register_forward_hook(hook(n)) for n in names]
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        sys.exit(f"no images in {images}: run models/recipe/prepare_data.py first")
    with torch.no_grad():
        for i in range(0, len(files), 8):
            batch = []
            for p in files[i:i + 8]:
                im = Image.open(p).convert("RGB")
                if im.size != (320, 320):  # letterbox like Ultralytics (gray 114, centred)
                    r = min(320 / im.width, 320 / im.height)
                    im = im.resize((round(im.width * r), round(im.height * r)), Image.BILINEAR)
                    canvas = Image.new("RGB", (320, 320), (114, 114, 114))
                    canvas.paste(im, ((320 - im.width) // 2, (320 - im.height) // 2))
                    im = canvas
                batch.append(torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1))
            fused(torch.stack(batch))
    for h in hs:
        h.remove()
    out = {}
    for n, (s1, s2, cnt) in acc.items():
        mean = (s1 / cnt).numpy()
        out[n] = (mean, np.maximum((s2 / cnt).numpy() - mean * mean, 0.0))
    return out, len(files)


def valid_scales(w: np.ndarray) -> np.ndarray:
    """fp32 scales s (> 0) for which every w_i = fl(Wc_i * s) with FP16 Wc_i; |Wc| max in [1024, 2048)."""
    k = int(np.argmax(np.abs(w)))
    a = float(abs(w[k]))
    if a == 0.0:
        return f32([1.0 / 1024])  # an all-zero channel: Wc = 0 for any scale
    mant = np.arange(1024, 2048, dtype=np.float64)
    s0 = f32(a / mant)
    cands = [s0]
    lo, hi = s0, s0
    for _ in range(2):
        lo, hi = np.nextafter(lo, f32(0)), np.nextafter(hi, f32(np.inf))
        cands += [lo, hi]
    s = np.unique(np.concatenate(cands))
    s = s[(f32(np.round(a / s.astype(np.float64))) * s == f32(a)) & (np.round(a / s.astype(np.float64)) < 2048)]
    order = np.argsort(-np.abs(w))
    for idx in (order[:8], order):  # a cheap pre-filter on the largest weights, then all of them
        ws = w[idx].astype(np.float64)
        q = (ws[None, :] / s[:, None].astype(np.float64)).astype(np.float16).astype(np.float32)
        ok = np.all(q * s[:, None] == w[idx][None, :], axis=1)
        s = s[ok]
        if len(s) == 0:
            break
    return s


def rsqrt_table():
    """fl(rsqrt(fl(v + eps))) for every positive FP16 v, computed by torch as fuse_conv_bn_weights does."""
    v = torch.from_numpy(POS16.astype(np.float32))
    return torch.rsqrt(v + BN_EPS).numpy()


def scale_solutions(s: float, R: np.ndarray):
    """(index into POS16, g at the reference scale: an 11-bit mantissa) with fl(g * r) == s."""
    ge = np.float64(s) / R.astype(np.float64)
    e = np.floor(np.log2(ge))
    sols = []
    for d in (-1, 0, 1):
        g = (np.round(ge * 2.0 ** (10 - e)) + d) * 2.0 ** (e - 10)
        ok = f32(g) * R == f32(s)
        sols += [(int(i), float(g[i])) for i in np.nonzero(ok)[0]]
    return sols


def bias_solutions(B: np.float32, r: np.float32, g: np.float32, m_target: float):
    """FP16 (m, b) with fl(fl(fl(-m * r) * g) + b) == B, nearest m_target first."""
    i = np.searchsorted(F16_ALL, m_target)
    order = []
    for win in (2048, len(F16_ALL)):
        ms = F16_ALL[max(0, i - win):i + win]
        t = (f32(-ms) * r) * g
        with np.errstate(over="ignore", invalid="ignore"):
            diff = float(B) - t.astype(np.float64)
            b0 = diff.astype(np.float16)
            bs = (b0, np.nextafter(b0, np.float16(-np.inf)), np.nextafter(b0, np.float16(np.inf)))
        for b in bs:
            with np.errstate(over="ignore", invalid="ignore"):
                ok = np.isfinite(b) & (t + b.astype(np.float32) == B)
            order += [(abs(ms[j] - m_target), float(ms[j]), float(b[j])) for j in np.nonzero(ok)[0]]
        if order:
            break
    order.sort()
    return [(m, b) for _, m, b in order]


def decompose(w: np.ndarray, B: np.float32, mean: float, var: float, R: np.ndarray):
    """FP16 (Wc, g, b, m, v) for one output channel: fused fp32 (w, B) reproduced exactly.

    Among the exact solutions: running var v within a factor 2 of the measured variance of Wc x
    (the power-of-two split between Wc and g is picked for that), then Wc's RMS closest to
    PyTorch's initial conv weight scale 1/sqrt(3 fan_in) (what the base started from)."""
    init_rms = 1.0 / np.sqrt(3.0 * w.size)
    cands = []
    for s in valid_scales(w):
        wc_ref = (w.astype(np.float64) / np.float64(s)).astype(np.float16).astype(np.float64)
        rms_ref = float(np.sqrt(np.mean(wc_ref * wc_ref)))
        var_ref = var / float(s) ** 2  # variance of Wc_ref x on the data
        for vi, g_ref in scale_solutions(s, R):
            v = float(POS16[vi])
            j = int(np.round(0.5 * np.log2(v / var_ref))) if var_ref > 0 else int(np.round(np.log2(init_rms / max(rms_ref, 1e-30))))
            for jj in (j, j + 1, j - 1, j + 2, j - 2):
                wc, g, sj = wc_ref * 2.0 ** jj, g_ref * 2.0 ** -jj, f32(float(s) * 2.0 ** -jj)
                if not (is_f16(wc) and is_f16(np.array([g])) and abs(g) >= 2.0 ** -14):
                    continue
                if not (np.all(f32(wc) * sj == w) and f32(g) * R[vi] == sj):
                    continue
                var_fit = abs(np.log2(v / (var_ref * 4.0 ** jj))) if var_ref > 0 else 0.0
                rms_fit = abs(np.log2(rms_ref * 2.0 ** jj / init_rms)) if rms_ref > 0 else 0.0
                cands.append((var_fit > 1.0, rms_fit, var_fit, jj, float(s), vi, g, wc))
                break
    cands.sort(key=lambda c: c[:3])
    for _, rms_fit, var_fit, jj, s, vi, g, wc in cands:
        m_target = mean / (s * 2.0 ** -jj)
        sol = bias_solutions(B, R[vi], f32(g), m_target)
        if sol:
            m, b = sol[0]
            return dict(wc=wc, g=g, v=float(POS16[vi]), m=m, b=b, var_fit=var_fit, rms_fit=rms_fit)
    return None


def rebuild(onnx_path: Path, images: Path):
    onnx_w = onnx_weights(onnx_path)
    model = build_model()
    stats, n_img = fused_stats(model, onnx_w, images)
    R = rsqrt_table()
    scores = []
    with torch.no_grad():
        for n, m in bn_convs(model):
            W, Bv = onnx_w[f"{n}.conv.weight"], onnx_w[f"{n}.conv.bias"]
            mean, var = stats[n]
            wc = np.empty(W.shape, np.float64)
            g, b, mm, v = (np.empty(W.shape[0]) for _ in range(4))
            for c in range(W.shape[0]):
                d = decompose(W[c].reshape(-1), Bv[c], float(mean[c]), float(var[c]), R)
                if d is None:
                    sys.exit(f"{n} channel {c}: no FP16 BatchNorm parameters reproduce the ONNX exactly")
                wc[c] = d["wc"].reshape(W.shape[1:])
                g[c], b[c], mm[c], v[c] = d["g"], d["b"], d["m"], d["v"]
                scores.append((d["var_fit"], d["rms_fit"]))
            m.conv.weight.copy_(torch.from_numpy(wc.astype(np.float32)))
            m.bn.weight.copy_(torch.from_numpy(g.astype(np.float32)))
            m.bn.bias.copy_(torch.from_numpy(b.astype(np.float32)))
            m.bn.running_mean.copy_(torch.from_numpy(mm.astype(np.float32)))
            m.bn.running_var.copy_(torch.from_numpy(v.astype(np.float32)))
            assert m.bn.eps == BN_EPS
        for n, m in plain_convs(model):
            w, b = onnx_w[f"{n}.weight"], onnx_w[f"{n}.bias"]
            if not (is_f16(w.astype(np.float64)) and is_f16(b.astype(np.float64))):
                sys.exit(f"{n}: plain conv weights are not FP16 values; the FP16 reconstruction does not apply")
            m.weight.copy_(torch.from_numpy(w.copy()))
            m.bias.copy_(torch.from_numpy(b.copy()))
        dfl = onnx_w["model.23.dfl.conv.weight"]
        assert np.array_equal(dfl, model.model[-1].dfl.conv.weight.numpy()), "DFL weights differ from arange(16)"
    sc = 2.0 ** np.array(scores)
    print(f"rebuilt {len(sc)} BN channels in {len(bn_convs(model))} convs; running var / variance of Wc*x on "
          f"{n_img} YELL tiles: median {np.median(sc[:, 0]):.2f}x, worst {sc[:, 0].max():.2f}x; "
          f"RMS(Wc) / initial scale: median {np.median(sc[:, 1]):.2f}x, worst {sc[:, 1].max():.2f}x")
    return model


def check_fused(model, onnx_w: dict):
    """Ultralytics' own fusion of the FP16-rounded model must give the ONNX tensors bit-for-bit."""
    import copy

    names = [n for n, _ in bn_convs(model)]
    fused = copy.deepcopy(model).half().float().fuse(verbose=False)
    mods = dict(fused.named_modules())
    bad = []
    for n in names:
        m = mods[n]
        for t in ("weight", "bias"):
            if not np.array_equal(getattr(m.conv, t).detach().numpy(), onnx_w[f"{n}.conv.{t}"]):
                bad.append(f"{n}.conv.{t}")
    return bad


def save_checkpoint(model, out: Path, onnx_path: Path):
    from ultralytics import __version__
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out.parent.mkdir(parents=True, exist_ok=True)
    model.args = {**DEFAULT_CFG_DICT, "imgsz": 320, "data": str(CACHE / "data/yell/data.yaml"), "task": "detect"}
    model = model.half()
    for p in model.parameters():
        p.requires_grad = False
    torch.save({
        "date": datetime.now().astimezone().isoformat(), "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
        "epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
        "scaler": None, "stopper": None, "train_args": dict(model.args),
        "train_metrics": {}, "train_results": {}, "rebuilt_from": str(onnx_path),
    }, out)


def export_like_train_adapters(pt: Path, dst: Path) -> Path:
    """The export call of train_adapters.ultralytics_finetune."""
    import shutil

    from ultralytics import YOLO

    onnx_out = Path(YOLO(str(pt)).export(format="onnx", imgsz=320, opset=17, simplify=True, dynamic=False))
    shutil.copy(onnx_out, dst)
    return dst


def compare_onnx(a: Path, b: Path):
    wa, wb = onnx_weights(a), onnx_weights(b)
    ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
    problems = []
    if sorted(wa) != sorted(wb):
        problems.append(f"initializer names differ: {sorted(set(wa) ^ set(wb))}")
    for k in sorted(set(wa) & set(wb)):
        if wa[k].dtype != wb[k].dtype or wa[k].shape != wb[k].shape or wa[k].tobytes() != wb[k].tobytes():
            problems.append(f"{k}: not bit-identical")
    nodes = lambda g: [(n.op_type, list(n.input), list(n.output)) for n in g.node]  # noqa: E731
    if nodes(ga) != nodes(gb):
        problems.append("graph nodes differ")
    return len(wa), problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, default=MODELS / "tree-yolo11n-320.onnx")
    ap.add_argument("--out", type=Path, default=CACHE / "runs/tree-yolo11n-from-onnx/weights/best.pt")
    ap.add_argument("--images", type=Path, default=CACHE / "data/yell/images/train")
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(CACHE / "target/release/perch")))
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = rebuild(a.onnx, a.images)
    bad = check_fused(model, onnx_weights(a.onnx))
    if bad:
        sys.exit(f"Ultralytics' fusion does not reproduce {len(bad)} tensors, e.g. {bad[:5]}")
    save_checkpoint(model, a.out, a.onnx)
    print(f"wrote {a.out}")
    if a.no_verify:
        return
    with tempfile.TemporaryDirectory() as tmp:
        export = export_like_train_adapters(a.out, Path(tmp) / "rebuilt.onnx")
        n, problems = compare_onnx(a.onnx, export)
        if problems:
            sys.exit("export differs from the base ONNX:\n  " + "\n  ".join(problems[:20]))
        print(f"export of {a.out.name}: all {n} initializers and the graph identical to {a.onnx.name}")
        if Path(a.perch).exists():
            r = subprocess.run([a.perch, "adapter", "diff", "--model", str(a.onnx), "--tuned", str(export),
                                "--freeze", "23", "-o", str(Path(tmp) / "none.safetensors")],
                               capture_output=True, text=True)
            msg = (r.stdout + r.stderr).strip()
            print(f"perch adapter diff --freeze 23 (exit {r.returncode}): {msg}")
            if r.returncode != 0 and "no initializer differs" not in msg:
                sys.exit("perch adapter diff failed for another reason than 'nothing changed'")
            if r.returncode == 0:
                with open(Path(tmp) / "none.safetensors", "rb") as f:
                    hdr = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                changed = [k for k in hdr if k != "__metadata__"]
                if changed:
                    sys.exit(f"perch found changed tensors: {changed[:10]}")
        else:
            print(f"({a.perch} not found: perch adapter diff check skipped)")


if __name__ == "__main__":
    main()
