"""Soak run of `perch run` (issue 15): the synthetic source at 15 fps, an adapter swap every few
seconds, and hostile control clients in parallel; RSS, open file descriptors and threads of the
service sampled every minute, with the status counters.

Hostile clients, all the time: connections that stay silent, a request dripped one byte at a
time, garbage lines, oversized lines, payloads that stop half-way, and bursts of status requests.
The swapper alternates two installed adapters with `activate` (each commit goes through
probation) and stages the next one in between.

Prints one JSON line per sample and a summary: first/last/max RSS, fds and threads, p99 latency,
frames captured, processed and dropped, inference errors, swaps, rejected requests, and whether
the service was still answering at the end. Standard library only.

Usage: python3 scripts/soak.py --minutes 60 [--fps 15] [--swap-every 5] [--json out.json]
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill9 import ROOT, request, status  # noqa: E402


def proc_counts(pid):
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, fds, threads


def hostile(sock, stop, counts, rng):
    """One hostile client, looping over the kinds of abuse until `stop`."""
    while not stop.is_set():
        kind = rng.choice(["idle", "drip", "garbage", "huge", "short_payload", "burst"])
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(str(sock))
            if kind == "idle":
                time.sleep(rng.uniform(1, 8))
            elif kind == "drip":
                for _ in range(rng.randint(10, 80)):
                    s.sendall(b"{")
                    time.sleep(0.1)
            elif kind == "garbage":
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))) + b"\n")
                s.recv(4096)
            elif kind == "huge":
                s.sendall(b"x" * (70 * 1024))
                s.recv(4096)
            elif kind == "short_payload":
                s.sendall(b'{"cmd":"install","name":"z","payload_bytes":5000}\n' + b"\0" * 100)
                time.sleep(rng.uniform(0.5, 3))
            else:
                s.close()
                for _ in range(20):
                    request(sock, {"cmd": "status"}, timeout=5)
            counts[kind] = counts.get(kind, 0) + 1
        except (OSError, ValueError):
            counts["refused_or_reset"] = counts.get("refused_or_reset", 0) + 1
        finally:
            s.close()


def swapper(sock, stop, every, counts):
    names = ["a", "b"]
    i = 0
    while not stop.wait(every):
        target, other = names[i % 2], names[(i + 1) % 2]
        try:
            r = request(sock, {"cmd": "activate", "name": target}, timeout=120)
            counts["swaps_ok" if r and r.get("ok") else "swaps_refused"] = \
                counts.get("swaps_ok" if r and r.get("ok") else "swaps_refused", 0) + 1
            request(sock, {"cmd": "stage", "name": other}, timeout=120)
        except (OSError, ValueError):
            counts["swap_errors"] = counts.get("swap_errors", 0) + 1
        i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--fps", type=float, default=15)
    ap.add_argument("--swap-every", type=float, default=5)
    ap.add_argument("--sample-every", type=float, default=60)
    ap.add_argument("--hostile", type=int, default=3, help="hostile clients in parallel")
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(Path.home() / ".cache/perch/target/release/perch")))
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perch-soak-"))
    sock = work / "c.sock"
    (work / "perch.toml").write_text(
        f'[model]\npath = "{ROOT / "models/tree-yolo11n-320.onnx"}"\n'
        f'[source]\nuri = "synthetic"\nwidth = 640\nheight = 480\nfps = {a.fps}\n'
        '[output]\nstdout = false\n[control]\nsocket = "c.sock"\n'
        '[adapters]\nstore = "store"\nprobation_frames = 10\n')
    log = open(work / "perch.log", "wb")
    p = subprocess.Popen([a.perch, "run", "--config", "perch.toml"], cwd=work,
                         stdout=subprocess.DEVNULL, stderr=log)
    t0 = time.time()
    while status(sock) is None:
        if time.time() - t0 > 60 or p.poll() is not None:
            sys.exit("perch did not start")
        time.sleep(0.1)
    for name, file in [("a", "osbs-lora"), ("b", "soap-lora")]:
        r = request(sock, {"cmd": "install", "name": name},
                    (ROOT / f"models/adapters/{file}.safetensors").read_bytes())
        assert r and r.get("ok"), r
    stop = threading.Event()
    counts = {}
    threads = [threading.Thread(target=swapper, args=(sock, stop, a.swap_every, counts))]
    threads += [threading.Thread(target=hostile, args=(sock, stop, counts, random.Random(i)))
                for i in range(a.hostile)]
    for t in threads:
        t.start()
    samples = []
    end = time.time() + a.minutes * 60
    next_sample = time.time()
    while time.time() < end and p.poll() is None:
        if time.time() >= next_sample:
            st = status(sock) or {}
            rss, fds, nthreads = proc_counts(p.pid)
            s = {
                "t_min": round((time.time() - t0) / 60, 2), "rss_mb": round(rss / 1e6, 1),
                "fds": fds, "threads": nthreads,
                "captured": st.get("frames_captured"), "processed": st.get("frames_processed"),
                "dropped": st.get("frames_dropped"), "inference_errors": st.get("inference_errors"),
                "p99_ms": (st.get("latency_ms") or {}).get("p99"),
                "swaps": ((st.get("adapters") or {}).get("swaps")),
            }
            samples.append(s)
            print(json.dumps(s), flush=True)
            next_sample += a.sample_every
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    alive = p.poll() is None and status(sock) is not None
    final = status(sock) or {}
    p.send_signal(signal.SIGTERM)
    try:
        code = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        code = "killed after 30 s"
    log.close()
    pick = lambda k: [s[k] for s in samples]  # noqa: E731
    summary = {
        "minutes": a.minutes, "fps": a.fps, "samples": len(samples),
        "rss_mb": {"first": samples[0]["rss_mb"], "last": samples[-1]["rss_mb"], "max": max(pick("rss_mb"))},
        "fds": {"first": samples[0]["fds"], "last": samples[-1]["fds"], "max": max(pick("fds"))},
        "threads": {"first": samples[0]["threads"], "last": samples[-1]["threads"], "max": max(pick("threads"))},
        "frames_captured": final.get("frames_captured"), "frames_processed": final.get("frames_processed"),
        "frames_dropped": final.get("frames_dropped"), "inference_errors": final.get("inference_errors"),
        "latency_ms": final.get("latency_ms"), "adapters": final.get("adapters"),
        "clients": counts, "alive_at_end": alive, "exit_code_after_sigterm": code,
        "stderr_lines": sum(1 for _ in open(work / "perch.log", "rb")),
    }
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if alive and code == 0 else 1)


if __name__ == "__main__":
    main()
