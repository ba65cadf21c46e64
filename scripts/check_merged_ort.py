"""Check that ONNX files written by `perch adapter merge` run in onnxruntime and equal the
PEFT-merged reference export (tests/goldens/adapters/v8-head-lora.json).

Usage: $PY scripts/check_merged_ort.py [--perch target/release/perch]
"""
import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(Path.home() / ".cache/perch/target/release/perch")))
    a = ap.parse_args()
    g = json.loads((ROOT / "tests/goldens/adapters/v8-head-lora.json").read_text())
    img = cv2.imread(str(ROOT / g["image"]))
    x = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    want = np.array(g["data"], np.float32).reshape(g["shape"])
    with tempfile.TemporaryDirectory() as tmp:
        for store in ("--f32", None):
            adapter = Path(tmp) / "head.safetensors"
            cmd = [a.perch, "adapter", "import", "--peft", str(ROOT / g["peft"]), "--model", str(ROOT / g["base"]), "-o", str(adapter)]
            subprocess.run(cmd + ([store] if store else []), check=True, capture_output=True)
            merged = Path(tmp) / "merged.onnx"
            subprocess.run([a.perch, "adapter", "merge", "--model", str(ROOT / g["base"]), "--adapter", str(adapter),
                            "-o", str(merged)], check=True, capture_output=True)
            s = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
            got = s.run(None, {s.get_inputs()[0].name: x})[0]
            d = np.abs(got - want).max()
            print(f"adapter stored {'f32' if store else 'f16'}: max |onnxruntime(perch merge) - PEFT merged export| = {d:.3g}")


if __name__ == "__main__":
    main()
