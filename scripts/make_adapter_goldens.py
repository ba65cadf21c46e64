"""Reference adapters and merged outputs from Hugging Face PEFT (`merge_and_unload`).

  tests/fixtures/peft/tiny-base.onnx             a small net: 3x3 conv, 1x1 conv, depthwise conv,
                                                 a Linear exported as MatMul (renamed initializer),
                                                 a Linear exported as Gemm, a head Linear
  tests/fixtures/peft/tiny-lora/                 PEFT LoRA r=4 alpha=8 on conv3/conv1/proj/fc, head in
                                                 modules_to_save, random non-zero A and B
  tests/fixtures/peft/tiny-rslora/               rsLoRA, rank_pattern conv1=2, alpha_pattern fc=3
  tests/fixtures/peft/tiny-name-map.json         PEFT module -> ONNX initializer for the renamed MatMul
  tests/fixtures/peft/v8-head-lora/              LoRA on the fused YOLOv8 fixture's head convs
  tests/fixtures/peft/v8-unfused-lora/           LoRA on an unfused conv (before BatchNorm folding)
                                                 + channel_scales.safetensors (gamma / sqrt(var + eps))
  tests/goldens/adapters/*.json                  merged weights and outputs (PyTorch and onnxruntime)
"""
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_fixtures import build_ultralytics, export_ultralytics  # noqa: E402
from make_goldens import dump, floats  # noqa: E402

PEFT_DIR = ROOT / "tests/fixtures/peft"
GOLD = ROOT / "tests/goldens/adapters"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.proj = nn.Linear(8, 8)  # on [1, HW, 8]: exported as MatMul with a renamed, transposed weight
        self.fc = nn.Linear(8, 6)  # on [1, 8]: exported as Gemm(transB=1) named fc.weight
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.silu(self.conv1(F.silu(self.conv3(x))))
        x = self.dw(x)
        t = self.proj(x.flatten(2).transpose(1, 2)).mean(1)
        return self.head(F.silu(self.fc(t)))


def export_tiny(model, path, x):
    torch.onnx.export(model, x, str(path), opset_version=17, input_names=["images"], output_names=["output0"],
                      do_constant_folding=True, dynamo=False)


def ort_run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def matmul_weight_name(path):
    """The initializer the exporter gave proj's weight (a MatMul's second input)."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    names = [n.input[1] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(names) == 1, names
    return names[0]


def randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_case(name, cfg_kwargs, seed):
    torch.manual_seed(0)
    base = TinyNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base_path = PEFT_DIR / "tiny-base.onnx"
    export_tiny(base, base_path, x)
    mm = matmul_weight_name(base_path)
    (PEFT_DIR / "tiny-name-map.json").write_text(json.dumps({"proj": mm}, indent=1) + "\n")

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg_kwargs))
    randomize_lora(peft_model, seed)
    out_dir = PEFT_DIR / name
    peft_model.save_pretrained(str(out_dir))
    for extra in ("README.md",):
        (out_dir / extra).unlink(missing_ok=True)
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        y_torch = merged(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        mp = Path(tmp) / "merged.onnx"
        export_tiny(merged, mp, x)
        y_ort = ort_run(mp, x.numpy())
    sd = merged.state_dict()
    weights = {
        "conv3.weight": sd["conv3.weight"], "conv1.weight": sd["conv1.weight"],
        "fc.weight": sd["fc.weight"], "head.weight": sd["head.weight"], "head.bias": sd["head.bias"],
        mm: sd["proj.weight"].t(),  # the ONNX MatMul weight is [in, out]
    }
    dump(GOLD / f"{name}.json", {
        "base": str(base_path.relative_to(ROOT)), "peft": str(out_dir.relative_to(ROOT)),
        "name_map": str((PEFT_DIR / "tiny-name-map.json").relative_to(ROOT)),
        "input_shape": list(x.shape), "input": floats(x.numpy()),
        "merged_weights": {k: {"shape": list(v.shape), "data": floats(v.numpy())} for k, v in weights.items()},
        "output_torch": floats(y_torch), "output_onnxruntime": floats(y_ort),
    })


def v8_cases():
    import cv2

    fixture = ROOT / "tests/fixtures/v8-t160-op11.onnx"
    img = cv2.imread(str(ROOT / "tests/data/chelsea-160.png"))
    x = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0

    # Reproduce the committed fixture exactly, or the goldens would describe another base.
    yolo = build_ultralytics("yolov8n.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        again = Path(tmp) / "again.onnx"
        export_ultralytics(copy.deepcopy(yolo), again, opset=11)
        a = {i.name: i.raw_data for i in onnx.load(str(again)).graph.initializer}
        b = {i.name: i.raw_data for i in onnx.load(str(fixture)).graph.initializer}
        assert a == b, "rebuilt YOLOv8 fixture differs from tests/fixtures/v8-t160-op11.onnx"

    def export_and_run(model, tag):
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / f"{tag}.onnx"
            export_ultralytics(model, p, opset=11)
            return ort_run(p, x)

    # (a) LoRA trained on the fused model: targets are plain convs with bias, as exported.
    fused = copy.deepcopy(yolo)
    fused.model.fuse()
    targets = ["model.22.cv2.0.2", "model.22.cv3.0.2", "model.22.cv3.1.0.conv", "model.22.cv2.2.1.conv"]
    pm = get_peft_model(fused.model, LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    randomize_lora(pm, 3)
    pm.save_pretrained(str(PEFT_DIR / "v8-head-lora"))
    (PEFT_DIR / "v8-head-lora/README.md").unlink(missing_ok=True)
    fused.model = pm.merge_and_unload()
    y = export_and_run(fused, "fused")
    dump(GOLD / "v8-head-lora.json", {"base": str(fixture.relative_to(ROOT)), "peft": "tests/fixtures/peft/v8-head-lora",
                                     "image": "tests/data/chelsea-160.png", "shape": list(y.shape), "data": floats(y)})

    # (b) LoRA trained on the unfused model (conv followed by BatchNorm): the export folds BN, so
    # the delta must be scaled per output channel by gamma / sqrt(var + eps).
    unfused = copy.deepcopy(yolo)
    targets = ["model.22.cv3.1.0.conv", "model.22.cv2.0.1.conv"]
    scales = {}
    for t in targets:
        bn = unfused.model.get_submodule(t.rsplit(".", 1)[0] + ".bn")
        scales[t] = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().float().contiguous()
    pm = get_peft_model(unfused.model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    randomize_lora(pm, 4)
    out = PEFT_DIR / "v8-unfused-lora"
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    save_file(scales, str(out / "channel_scales.safetensors"))
    unfused.model = pm.merge_and_unload()
    y = export_and_run(unfused, "unfused")
    dump(GOLD / "v8-unfused-lora.json", {"base": str(fixture.relative_to(ROOT)), "peft": str(out.relative_to(ROOT)),
                                        "image": "tests/data/chelsea-160.png", "shape": list(y.shape), "data": floats(y)})


def main():
    PEFT_DIR.mkdir(parents=True, exist_ok=True)
    tiny_case("tiny-lora", dict(r=4, lora_alpha=8, target_modules=["conv3", "conv1", "proj", "fc"],
                                modules_to_save=["head"]), seed=1)
    tiny_case("tiny-rslora", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["conv3", "conv1", "fc"],
                                  rank_pattern={"conv1": 2}, alpha_pattern={"fc": 3.0}), seed=2)
    v8_cases()


if __name__ == "__main__":
    main()
