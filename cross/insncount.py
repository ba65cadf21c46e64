#!/usr/bin/env python3
"""Per-frame ARM instruction counts of `perch bench` under qemu-user, per precision.

Instruction counts under emulation, not time: no caches, no memory stalls, and out-of-order
cores overlap work that these counts add up. On in-order cores (Cortex-A53, A7) time follows
executed instructions closely; everywhere they show whether a change removed work or added it.

For each (target, qemu CPU model, precision) it runs `perch bench --iterations 1` and
`--iterations 3` (no warm-up, one thread) under qemu with the counting plugin
(cross/insncount/insncount.c) and takes (count(3) - count(1)) / 2 as one frame, so loading,
preparing and process exit cancel out. The same difference per translation block, attributed to
the unstripped binary's symbols, gives the per-function breakdown. The matrix kernels tract
picked come from `bench --json`.

Usage (after `cross/build.sh` has built the release binaries):
  cross/insncount.py [--targets aarch64,armv7] [--precisions f32,int8] [--top 12]
                     [--json FILE] [--max-ratio R]
--max-ratio fails (exit 1) when an int8/f32 per-frame ratio exceeds R (the CI regression gate).
"""

import argparse
import bisect
import re
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PERCH_CACHE", Path.home() / ".cache/perch"))
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target-arm"))

# (label, rust target, qemu binary, qemu CPU model, sysroot, nm)
CONFIGS = {
    "aarch64": [
        ("aarch64 cortex-a53", "aarch64-unknown-linux-gnu", "qemu-aarch64", "cortex-a53",
         "/usr/aarch64-linux-gnu", "aarch64-linux-gnu-nm"),
        ("aarch64 cortex-a76 (dot product)", "aarch64-unknown-linux-gnu", "qemu-aarch64",
         "cortex-a76", "/usr/aarch64-linux-gnu", "aarch64-linux-gnu-nm"),
        ("aarch64 max (SVE, dot product)", "aarch64-unknown-linux-gnu", "qemu-aarch64", "max",
         "/usr/aarch64-linux-gnu", "aarch64-linux-gnu-nm"),
    ],
    "armv7": [
        ("armv7 cortex-a7", "armv7-unknown-linux-gnueabihf", "qemu-arm", "cortex-a7",
         "/usr/arm-linux-gnueabihf", "arm-linux-gnueabihf-nm"),
    ],
}

MODEL = "models/tree-yolo11n-320.onnx"
CALIBRATION = "models/tree-yolo11n-320.calibration.json"
IMAGE = "tests/data/osbs_029.png"


def build_plugin():
    out = CACHE / "insncount" / "libinsncount.so"
    src = ROOT / "cross/insncount/insncount.c"
    if not out.exists() or out.stat().st_mtime < max(src.stat().st_mtime,
                                                      (src.parent / "insncount-api.h").stat().st_mtime):
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def run_counted(plugin, cfg, binary, precision, iterations, out_file):
    _, _, qemu, cpu, sysroot, _ = cfg
    cmd = [qemu, "-cpu", cpu, "-L", sysroot, "-plugin", f"{plugin},out={out_file}",
           str(binary), "bench", "--model", MODEL, "--image", IMAGE, "--precision", precision,
           "--iterations", str(iterations), "--warmup", "0", "--threads", "1", "--json"]
    if precision == "int8":
        cmd += ["--calibration", CALIBRATION]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"insncount: {' '.join(cmd[:4])} ... failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    bench = json.loads(r.stdout.strip().splitlines()[-1])
    blocks = {}
    start = 0
    for line in Path(out_file).read_text().splitlines():
        a, b = line.split()
        if a == "start":
            start = int(b, 16)
        elif a != "entry":
            blocks[int(a, 16)] = blocks.get(int(a, 16), 0) + int(b)
    return bench, start, blocks


def symbols(cfg, binary):
    nm = cfg[5]
    out = subprocess.run([nm, "-n", "-C", "--defined-only", str(binary)], check=True,
                         capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW" and not parts[2].startswith("."):
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    # qemu reports the guest address where the first executable segment starts.
    text_vaddr = None
    for line in subprocess.run(["readelf", "-lW", str(binary)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:-1]:
            text_vaddr = int(f[2], 16)
            break
    if text_vaddr is None:
        sys.exit(f"insncount: no executable LOAD segment in {binary}")
    return addrs, names, text_vaddr


def short(name):
    # Drop the hash suffix of legacy Rust symbols; keep the path that names the function.
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return name if len(name) <= 110 else name[:107] + "..."


def attribute(blocks, base, syms):
    addrs, names, _ = syms
    per = {}
    for va, n in blocks.items():
        off = va - base
        i = bisect.bisect_right(addrs, off) - 1
        if i < 0 or off > addrs[-1] + (1 << 16):
            name = "(outside the binary: libc, libm, loader)"
        else:
            name = short(names[i])
        per[name] = per.get(name, 0) + n
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="aarch64,armv7")
    ap.add_argument("--precisions", default="f32,int8")
    ap.add_argument("--cpus", help="only these qemu CPU models (comma-separated)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--max-ratio", type=float, help="fail when an int8/f32 per-frame ratio exceeds this")
    a = ap.parse_args()
    plugin = build_plugin()
    qemu_version = subprocess.run(["qemu-aarch64", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    print(f"instruction counts under emulation ({qemu_version}), not time; demo model {MODEL} at "
          f"its export size, one thread; one frame = (bench --iterations 3 - --iterations 1) / 2")
    report = []
    failed = False
    for target in a.targets.split(","):
        for cfg in CONFIGS[target]:
            if a.cpus and cfg[3] not in a.cpus.split(","):
                continue
            binary = TARGET_DIR / cfg[1] / "release" / "perch"
            if not binary.exists():
                sys.exit(f"insncount: {binary} is missing; run cross/build.sh first")
            syms = symbols(cfg, binary)
            frame = {}
            for precision in a.precisions.split(","):
                with tempfile.TemporaryDirectory() as d:
                    bench, start1, b1 = run_counted(plugin, cfg, binary, precision, 1, f"{d}/1")
                    _, start3, b3 = run_counted(plugin, cfg, binary, precision, 3, f"{d}/3")
                base1, base3 = start1 - syms[2], start3 - syms[2]
                p1, p3 = attribute(b1, base1, syms), attribute(b3, base3, syms)
                per_fn = {k: (p3.get(k, 0) - p1.get(k, 0)) / 2 for k in set(p1) | set(p3)}
                total = (sum(b3.values()) - sum(b1.values())) / 2
                kernels = bench.get("int8_kernels" if precision == "int8" else "f32_kernels") or []
                frame[precision] = total
                print(f"\n{cfg[0]}, {bench['inference_precision']}: {total / 1e6:.1f} M instructions per frame; "
                      f"kernels: {', '.join(kernels) or 'unknown'}")
                top = sorted(per_fn.items(), key=lambda kv: -kv[1])[: a.top]
                for name, n in top:
                    print(f"  {n / 1e6:9.2f} M  {100 * n / total:5.1f} %  {name}")
                report.append({"config": cfg[0], "cpu": cfg[3], "precision": bench["inference_precision"],
                               "kernels": kernels, "per_frame": total,
                               "top": [{"symbol": k, "per_frame": v} for k, v in top]})
            if "f32" in frame and "int8" in frame:
                ratio = frame["int8"] / frame["f32"]
                print(f"{cfg[0]}: int8 / f32 = {ratio:.3f}")
                report.append({"config": cfg[0], "int8_over_f32": ratio})
                if a.max_ratio is not None and ratio > a.max_ratio:
                    print(f"insncount: {cfg[0]} int8/f32 ratio {ratio:.3f} exceeds {a.max_ratio}",
                          file=sys.stderr)
                    failed = True
    if a.json:
        Path(a.json).write_text(json.dumps({"qemu": qemu_version, "results": report}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
