"""Build the YOLO-format tree-crown datasets from the images shipped in the deepforest wheel.

Source: deepforest==2.1.0 (MIT) from PyPI, files under deepforest/data/ (NEON airborne RGB, 10 cm/px).
Outputs (under --out, default ~/.cache/perch/data):
  yell/   base task: tiles of the two YELL crops; the bottom 25 % band of each crop is held out as val.
  osbs/   OSBS_029 (400x400, 61 trees) as a single-image target-site set.
  soap/   SOAP_061 (400x400, 37 boxes, Alive/Dead) as a single-image target-site set.
Seeds are irrelevant here: tiling is deterministic.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image

WHEEL = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
YELL = ["2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop"]


def fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "deepforest==2.1.0", "-d", str(cache)], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256}")
    return wheel


def read_voc(xml_bytes: bytes):
    root = ET.fromstring(xml_bytes)
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append((obj.findtext("name"), *(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes


def write_tile(img, boxes, region, out_img: Path, out_lbl: Path, names, min_visible=0.5):
    """Crop `region` (x0, y0, x1, y1) and write YOLO labels for boxes at least `min_visible` inside it."""
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    img.crop(region).save(out_img)
    lines = []
    for name, bx0, by0, bx1, by1 in boxes:
        cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) < min_visible * (bx1 - bx0) * (by1 - by0):
            continue
        cls = names.index(name)
        lines.append(f"{cls} {((cx0 + cx1) / 2 - x0) / w:.6f} {((cy0 + cy1) / 2 - y0) / h:.6f} "
                     f"{(cx1 - cx0) / w:.6f} {(cy1 - cy0) / h:.6f}")
    out_lbl.write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def tiles(x_lo, y_lo, x_hi, y_hi, size, stride):
    """Tile origins covering [x_lo, x_hi) x [y_lo, y_hi); the last row/column is aligned to the edge."""
    def starts(lo, hi):
        if hi - lo <= size:
            return [lo]
        s = list(range(lo, hi - size, stride))
        return s + [hi - size]
    return [(x, y) for y in starts(y_lo, y_hi) for x in starts(x_lo, x_hi)]


def data_yaml(root: Path, names, splits):
    lines = [f"path: {root}"] + [f"{k}: images/{v}" for k, v in splits.items()]
    lines += ["names:"] + [f"  {i}: {n}" for i, n in enumerate(names)]
    (root / "data.yaml").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/perch/data")
    ap.add_argument("--tile", type=int, default=320)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--val-frac", type=float, default=0.25)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(args.out)
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("deepforest/data/")])
        src = Path(tmp) / "deepforest/data"

        root = args.out / "yell"
        counts = {"train": [0, 0], "val": [0, 0]}
        for split in counts:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem in YELL:
            img = Image.open(src / f"{stem}.png").convert("RGB")
            boxes = read_voc((src / f"{stem}.xml").read_bytes())
            W, H = img.size
            y_cut = int(H * (1 - args.val_frac))
            for split, (ylo, yhi) in {"train": (0, y_cut), "val": (y_cut, H)}.items():
                for x, y in tiles(0, ylo, W, yhi, args.tile, args.stride):
                    region = (x, y, min(x + args.tile, W), min(y + args.tile, yhi))
                    name = f"{stem}_{x}_{y}"
                    n = write_tile(img, boxes, region, root / "images" / split / f"{name}.png",
                                   root / "labels" / split / f"{name}.txt", ["Tree"])
                    counts[split][0] += 1
                    counts[split][1] += n
        data_yaml(root, ["Tree"], {"train": "train", "val": "val"})
        print(f"yell: {counts}  (tiles, boxes)")

        for site, stem, names in (("osbs", "OSBS_029", ["Tree"]), ("soap", "SOAP_061", ["Alive", "Dead"])):
            r = args.out / site
            (r / "images/val").mkdir(parents=True, exist_ok=True)
            (r / "labels/val").mkdir(parents=True, exist_ok=True)
            img = Image.open(src / f"{stem}.png").convert("RGB")
            boxes = read_voc((src / f"{stem}.xml").read_bytes())
            n = write_tile(img, boxes, (0, 0, *img.size), r / "images/val" / f"{stem}.png",
                           r / "labels/val" / f"{stem}.txt", names)
            data_yaml(r, names, {"train": "val", "val": "val"})
            print(f"{site}: 1 image, {n} boxes, classes {sorted({b[0] for b in boxes})}")


if __name__ == "__main__":
    main()
