"""Train the base tree-crown detector from scratch on the YELL tiles and export it to ONNX.

No pretrained weights exist offline: the model is built from the Ultralytics yaml.
Usage: python train_base.py [--epochs N] [--arch yolo11n.yaml] [--data ~/.cache/perch/data/yell/data.yaml]
Writes models/tree-yolo11n-320.onnx (static 1x3x320x320, Ultralytics metadata) and keeps the
training run (weights, results.csv) under ~/.cache/perch/runs.
"""
import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="yolo11n.yaml")
    ap.add_argument("--data", type=Path, default=Path.home() / ".cache/perch/data/yell/data.yaml")
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="tree-yolo11n")
    ap.add_argument("--out", type=Path, default=MODELS / "tree-yolo11n-320.onnx")
    args = ap.parse_args()

    model = YOLO(args.arch)
    model.train(
        data=str(args.data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
        device=args.device, seed=0, deterministic=True, workers=2, pretrained=False,
        amp=False, plots=False, project=str(Path.home() / ".cache/perch/runs"), name=args.name,
        exist_ok=True, patience=0, flipud=0.5, fliplr=0.5, degrees=0.0, mosaic=1.0,
        close_mosaic=10, cache=True, verbose=False,
    )
    best = Path(model.trainer.best)
    trained = YOLO(str(best))
    onnx = Path(trained.export(format="onnx", imgsz=args.imgsz, opset=17, simplify=True, dynamic=False))
    shutil.copy(onnx, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
