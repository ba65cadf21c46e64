"""Site adapters on the frozen base tree detector, and a full fine-tune to compare against.

For each target site (OSBS_029, SOAP_061 from the deepforest wheel) the image is split
spatially: the left half trains, the right half tests (boxes at least half inside a half belong
to it). SOAP's Alive/Dead labels are mapped to the base's single class "Tree" (see README).

Per site:
  head:  Ultralytics freeze=23 (only the Detect head trains; BN of frozen layers stays fixed),
         exported, then `perch adapter diff --freeze 23` -> models/adapters/<site>-head.safetensors
  lora:  PEFT LoRA (r=8) on every non-grouped conv of the fused Detect head, trained with
         Ultralytics' detection loss, then `perch adapter import` -> models/adapters/<site>-lora.safetensors
  lora-all: the same on every non-grouped conv of the model -> models/adapters/<site>-lora-all.safetensors
  neck:  Ultralytics freeze=10 (backbone layers 0-9 frozen, their BN statistics fixed; neck and head train),
         exported, then `perch adapter diff --freeze 10` -> models/adapters/<site>-neck.safetensors
  full:  Ultralytics fine-tune of all layers (same data and epochs), for comparison (not committed)
Then `perch eval` of base and of each variant run (base+head, base+lora, base+lora-all, base+neck, full) on the
YELL held-out band (base site) and on the site's test half; the rows are merged into models/adapters/results.json
(rows of variants not run this time are kept).

The base checkpoint: train_base.py's best.pt when it exists, else the checkpoint rebuilt bit-exactly from the
committed ONNX by base_from_onnx.py (built here on first use), or --base-pt.

Usage: $PY models/recipe/train_adapters.py [--epochs 300] [--perch PATH] [--sites osbs,soap]
           [--variants head,lora,lora-all,neck,full] [--base-pt PATH]  (one image: one step per epoch)
"""
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET  # noqa: F401  (prepare_data parses VOC)
import zipfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from prepare_data import fetch_wheel, read_voc, write_tile  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
BASE_ONNX = MODELS / "tree-yolo11n-320.onnx"
CACHE = Path.home() / ".cache/perch"
BASE_PT = CACHE / "runs/tree-yolo11n/weights/best.pt"  # train_base.py's checkpoint
REBUILT_PT = CACHE / "runs/tree-yolo11n-from-onnx/weights/best.pt"  # base_from_onnx.py's rebuild of it
VARIANTS = ["head", "lora", "lora-all", "neck", "full"]
SITES = {"osbs": "OSBS_029", "soap": "SOAP_061"}


def site_data(root: Path):
    """Left half -> train, right half -> test, single class Tree."""
    wheel = fetch_wheel(root)
    out = {}
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("deepforest/data/")])
        src = Path(tmp) / "deepforest/data"
        for site, stem in SITES.items():
            d = root / f"{site}-split"
            shutil.rmtree(d, ignore_errors=True)
            img = Image.open(src / f"{stem}.png").convert("RGB")
            boxes = [("Tree", *b[1:]) for b in read_voc((src / f"{stem}.xml").read_bytes())]
            w, h = img.size
            for split, region in {"train": (0, 0, w // 2, h), "test": (w // 2, 0, w, h)}.items():
                (d / "images" / split).mkdir(parents=True)
                (d / "labels" / split).mkdir(parents=True)
                n = write_tile(img, boxes, region, d / "images" / split / f"{stem}_{split}.png",
                               d / "labels" / split / f"{stem}_{split}.txt", ["Tree"])
                print(f"{site} {split}: {n} boxes")
            (d / "data.yaml").write_text(f"path: {d}\ntrain: images/train\nval: images/test\ntest: images/test\nnames:\n  0: Tree\n")
            out[site] = d / "data.yaml"
    return out


def ultralytics_finetune(base_pt: Path, data: Path, freeze, epochs: int, name: str) -> Path:
    from ultralytics import YOLO

    model = YOLO(str(base_pt))
    model.train(data=str(data), epochs=epochs, imgsz=320, batch=8, freeze=freeze, device="cpu", workers=0,
                seed=0, deterministic=True, amp=False, plots=False, val=False, project=str(CACHE / "runs"),
                name=name, exist_ok=True, pretrained=True, verbose=False, flipud=0.5, cache=True)
    last = CACHE / "runs" / name / "weights/last.pt"
    onnx = Path(YOLO(str(last)).export(format="onnx", imgsz=320, opset=17, simplify=True, dynamic=False))
    dst = CACHE / "work" / f"{name}.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx, dst)
    return dst


def conv_modules(model, prefix: str) -> list[str]:
    """Non-grouped convs under `prefix` (`model.23.`: the YOLO11 Detect head; `model.`: all) of a
    fused YOLO11, DFL excluded."""
    return [n for n, m in model.named_modules()
            if n.startswith(prefix) and isinstance(m, torch.nn.Conv2d) and m.groups == 1 and ".dfl" not in n]


def lora_finetune(base_pt: Path, data: Path, epochs: int, out_dir: Path, rank=8, prefix="model.23."):
    from peft import LoraConfig, get_peft_model
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = YOLO(str(base_pt)).model.float()
    model.fuse()  # train on the fused convs, as exported: the LoRA then imports without BN scales
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": 320, "flipud": 0.5, "batch": 8, "seed": 0})
    model.args = cfg
    targets = conv_modules(model, prefix)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    d = check_det_dataset(str(data))
    ds = build_yolo_dataset(cfg, d["train"], 8, d, mode="train", stride=32)
    dl = build_dataloader(ds, 8, 0, shuffle=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    base = peft_model.base_model.model
    for epoch in range(epochs):
        peft_model.train()
        for batch in dl:
            batch["img"] = batch["img"].float() / 255.0
            loss, _ = base.loss(batch)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"lora epoch {epoch}: loss {float(loss.sum()):.3f}")
    shutil.rmtree(out_dir, ignore_errors=True)
    peft_model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def perch(binary: str, *args) -> dict:
    r = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def base_checkpoint(arg) -> Path:
    if arg:
        return Path(arg)
    if BASE_PT.exists():
        return BASE_PT
    if not REBUILT_PT.exists():
        print(f"{BASE_PT} not found: rebuilding it from {BASE_ONNX.name} with base_from_onnx.py")
        subprocess.run([sys.executable, str(HERE / "base_from_onnx.py"), "--out", str(REBUILT_PT)], check=True)
    return REBUILT_PT


def merge_results(path: Path, rows: list) -> list:
    """Rows of this run replace the stored rows with the same (site, model); the others are kept."""
    old = json.loads(path.read_text()) if path.exists() else []
    new = {(r["site"], r["model"]): r for r in rows}
    merged = [r for r in old if (r["site"], r["model"]) not in new] + rows

    def rank(r):
        site, label = r["site"], r["model"]
        kinds = ["base"] + [f"base + {site}-{v}" for v in VARIANTS if v != "full"] + [f"{site} full fine-tune"]
        sites = list(SITES)
        return (sites.index(site) if site in sites else len(sites), kinds.index(label) if label in kinds else len(kinds))

    merged.sort(key=rank)
    return merged


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(CACHE / "target/release/perch")))
    ap.add_argument("--sites", default="osbs,soap")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--base-pt", help=f"base checkpoint (default: {BASE_PT} if present, else {REBUILT_PT})")
    a = ap.parse_args()
    variants = a.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    base_pt = base_checkpoint(a.base_pt)
    print(f"base checkpoint: {base_pt}")
    adapters = MODELS / "adapters"
    adapters.mkdir(exist_ok=True)
    data = site_data(CACHE / "data")
    yell = CACHE / "data/yell/data.yaml"
    results = []
    for site in a.sites.split(","):
        rows = [("base", BASE_ONNX, None)]
        def freeze_adapter(freeze: int, variant: str):
            """Ultralytics freeze=N fine-tune, then `perch adapter diff --freeze N`."""
            tuned = ultralytics_finetune(base_pt, data[site], freeze, a.epochs, f"{site}-freeze{freeze}")
            out = adapters / f"{site}-{variant}.safetensors"
            perch(a.perch, "adapter", "diff", "--model", str(BASE_ONNX), "--tuned", str(tuned), "--freeze",
                  str(freeze), "-o", str(out), "--name", f"{site}-{variant}")
            rows.append((f"base + {site}-{variant}", BASE_ONNX, out))

        if "head" in variants:
            freeze_adapter(23, "head")
        if "lora" in variants:
            peft_dir = lora_finetune(base_pt, data[site], a.epochs, CACHE / "work" / f"{site}-lora-peft")
            lora = adapters / f"{site}-lora.safetensors"
            perch(a.perch, "adapter", "import", "--peft", str(peft_dir), "--model", str(BASE_ONNX), "-o", str(lora),
                  "--name", f"{site}-lora")
            rows.append((f"base + {site}-lora", BASE_ONNX, lora))
        if "lora-all" in variants:
            peft_all = lora_finetune(base_pt, data[site], a.epochs, CACHE / "work" / f"{site}-lora-all-peft",
                                     prefix="model.")
            lora_all = adapters / f"{site}-lora-all.safetensors"
            perch(a.perch, "adapter", "import", "--peft", str(peft_all), "--model", str(BASE_ONNX), "-o",
                  str(lora_all), "--name", f"{site}-lora-all")
            rows.append((f"base + {site}-lora-all", BASE_ONNX, lora_all))
        if "neck" in variants:
            freeze_adapter(10, "neck")
        if "full" in variants:
            full_onnx = ultralytics_finetune(base_pt, data[site], None, a.epochs, f"{site}-full")
            rows.append((f"{site} full fine-tune", full_onnx, None))
        for label, model, adapter in rows:
            row = {"site": site, "model": label,
                   "bytes": (adapter or model).stat().st_size}
            for key, yaml, split in (("base_site", yell, "val"), ("target_site", data[site], "test")):
                args = ["eval", "--model", str(model), "--data", str(yaml), "--split", split]
                if adapter:
                    args += ["--adapter", str(adapter)]
                r = perch(a.perch, *args)
                row[key] = {"map50": r["map50"], "map50_95": r["map50_95"], "images": r["images"], "instances": r["instances"]}
            results.append(row)
            print(json.dumps(row))
    out = adapters / "results.json"
    out.write_text(json.dumps(merge_results(out, results), indent=1) + "\n")


if __name__ == "__main__":
    main()
