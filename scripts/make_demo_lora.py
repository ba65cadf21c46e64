"""Write a PEFT-format LoRA directory for an Ultralytics ONNX export, for measuring adapter size
and merge/prepare time (the values are random: it is not a trained adapter).

Targets every non-grouped Conv weight whose name starts with --prefix (default: the YOLO11
Detect head, layer 23). Usage:
  $PY scripts/make_demo_lora.py --model models/tree-yolo11n-320.onnx --rank 8 --out /tmp/tree-lora
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefix", default="model.23.")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    m = onnx.load(a.model)
    inits = {i.name: i for i in m.graph.initializer}
    rng = np.random.default_rng(0)
    tensors, modules = {}, []
    for node in m.graph.node:
        group = next((x.i for x in node.attribute if x.name == "group"), 1)
        if node.op_type != "Conv" or group != 1 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if not (name.startswith(a.prefix) and name.endswith(".weight")):
            continue
        out_c, in_c, kh, kw = inits[name].dims
        module = name[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = (rng.standard_normal((a.rank, in_c, kh, kw)) * 0.01).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (rng.standard_normal((out_c, a.rank, 1, 1)) * 0.01).astype(np.float32)
        modules.append(module)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": a.rank, "lora_alpha": 2 * a.rank, "target_modules": modules, "use_rslora": False}
    (a.out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    print(f"{len(modules)} target convs, {sum(t.size for t in tensors.values())} LoRA parameters -> {a.out}")


if __name__ == "__main__":
    main()
