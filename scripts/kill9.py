"""Random kill -9 campaign against `perch run` with an adapter store (issue 15).

Each round starts the real service on the synthetic source, waits until it serves, checks the
store, then fires a random sequence of control requests (install, stage, activate, deactivate,
rollback, remove) and kills the process with SIGKILL at a random moment of it, while requests
are in flight. After every kill it checks, before and after the restart:

- `state.json` parses (or is absent) and names only entries that exist in the store;
- no temporary file survives the restart (the store cleans them on open);
- the service answers `status` and processes frames within --serve-timeout seconds;
- the adapter it serves is one the saved state allows: the active selection when it was
  committed, the last known good one when the kill came during probation (or when the active one
  no longer builds), the base model only when the state has no last known good adapter.

Standard library only; the perch binary is ~/.cache/perch/target/release/perch unless --perch or
PERCH_BIN says otherwise. Prints one line per violation and a JSON summary; exits 1 on any
violation.

Usage: python3 scripts/kill9.py --kills 200 [--seed 1] [--json out.json]
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ["osbs-lora", "soap-lora", "osbs-head", "soap-head"]


def request(sock, req, payload=b"", timeout=30.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        if payload:
            req = dict(req, payload_bytes=len(payload))
        s.sendall(json.dumps(req).encode() + b"\n" + payload)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return json.loads(buf) if buf else None
    finally:
        s.close()


def status(sock):
    try:
        r = request(sock, {"cmd": "status"}, timeout=2.0)
        return r if r and r.get("ok") else None
    except (OSError, ValueError):
        return None


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_store(store, when):
    """Violations of the store's invariants, as strings."""
    bad = []
    state_path = store / "state.json"
    state = {}
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except ValueError as e:
            bad.append(f"{when}: state.json does not parse: {e}")
            return bad, {}
    for key in ("active", "last_good", "previous"):
        sel = state.get(key)
        if sel and not (store / f"{sel['name']}.safetensors").exists():
            bad.append(f"{when}: state.{key} names '{sel['name']}', which is not in the store")
        elif sel and sel.get("sha256") and sha256(store / f"{sel['name']}.safetensors") != sel["sha256"]:
            # Reinstalling a name replaces the file: allowed only for entries not in use.
            bad.append(f"{when}: state.{key} '{sel['name']}' sha256 differs from the file")
    return bad, state


def allowed_served(state):
    """sha256s (None = base model) the service may serve after restarting on `state`."""
    ok = set()
    active, last_good = state.get("active"), state.get("last_good")
    if active and not state.get("probation"):
        ok.add(active["sha256"])
    if last_good:
        ok.add(last_good["sha256"])
    if not last_good:
        ok.add(None)
    if not active and not state.get("probation"):
        ok.add(None)
    return ok


def fire(sock, rng, files, stop):
    """Random control traffic until `stop` is set or the service goes away."""
    while not stop.is_set():
        op = rng.choice(["install", "install", "stage", "activate", "activate", "activate",
                         "activate", "deactivate", "rollback", "rollback", "remove", "list"])
        name = rng.choice(["a", "b", "c"])
        try:
            if op == "install":
                request(sock, {"cmd": "install", "name": name}, files[rng.choice(ADAPTERS)])
            elif op in ("stage", "activate"):
                request(sock, {"cmd": op, "name": name, "scale": rng.choice([0.5, 1.0])})
            elif op == "remove":
                request(sock, {"cmd": "remove", "name": name})
            else:
                request(sock, {"cmd": op})
        except (OSError, ValueError):
            return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--serve-timeout", type=float, default=60.0)
    ap.add_argument("--max-delay", type=float, default=8.0, help="longest time before a kill, s")
    ap.add_argument("--perch", default=os.environ.get("PERCH_BIN", str(Path.home() / ".cache/perch/target/release/perch")))
    ap.add_argument("--json")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    files = {n: (ROOT / f"models/adapters/{n}.safetensors").read_bytes() for n in ADAPTERS}
    work = Path(tempfile.mkdtemp(prefix="perch-kill9-"))
    store, sock = work / "store", work / "c.sock"
    cfg = work / "perch.toml"
    cfg.write_text(
        f'[model]\npath = "{ROOT / "models/tree-yolo11n-320.onnx"}"\n'
        '[source]\nuri = "synthetic"\nwidth = 320\nheight = 240\nfps = 15\n'
        '[output]\nstdout = false\n[control]\nsocket = "c.sock"\n'
        '[adapters]\nstore = "store"\nprobation_frames = 5\n')
    violations, serve_times, served_counts = [], [], {}
    # What the store said at each kill: a committed adapter, one in probation, the base.
    at_kill = {"committed_adapter": 0, "probation": 0, "base": 0}
    restarts = 0
    t0 = time.time()
    for k in range(a.kills):
        # Before the restart: what the killed service left.
        bad, state = check_store(store, f"kill {k} (before restart)")
        violations += bad
        if k > 0:
            key = "probation" if state.get("probation") else \
                "committed_adapter" if state.get("active") else "base"
            at_kill[key] += 1
        log = open(work / "perch.log", "ab")
        p = subprocess.Popen([a.perch, "run", "--config", str(cfg)], cwd=work,
                             stdout=subprocess.DEVNULL, stderr=log)
        restarts += 1
        started = time.time()
        st = None
        while time.time() - started < a.serve_timeout:
            st = status(sock)
            if st and st.get("frames_processed", 0) >= 1:
                break
            st = None
            time.sleep(0.05)
        if st is None:
            violations.append(f"kill {k}: not serving {a.serve_timeout} s after restart")
        else:
            serve_times.append(time.time() - started)
            served = (st.get("adapter") or {}).get("sha256")
            served_counts[served is not None] = served_counts.get(served is not None, 0) + 1
            if state and served not in allowed_served(state):
                violations.append(
                    f"kill {k}: serves {served} but the saved state allows {sorted(map(str, allowed_served(state)))}"
                    f" (state {json.dumps(state)})")
            leftovers = [f.name for f in store.iterdir() if ".tmp" in f.name or f.name.startswith(".")] \
                if store.exists() else []
            if leftovers:
                violations.append(f"kill {k}: temporary files after restart: {leftovers}")
        stop = threading.Event()
        traffic = [threading.Thread(target=fire, args=(sock, random.Random(rng.random()), files, stop))
                   for _ in range(1)]
        for t in traffic:
            t.start()
        time.sleep(rng.uniform(0.0, a.max_delay))
        p.send_signal(signal.SIGKILL)
        p.wait()
        stop.set()
        for t in traffic:
            t.join(timeout=10)
        log.close()
    bad, _ = check_store(store, "end")
    violations += bad
    for v in violations:
        print(v)
    summary = {
        "kills": a.kills,
        "restarts": restarts,
        "violations": len(violations),
        "serve_after_restart_s": {
            "p50": round(statistics.median(serve_times), 3) if serve_times else None,
            "max": round(max(serve_times), 3) if serve_times else None,
        },
        "store_at_kill": at_kill,
        "restarts_serving_an_adapter": served_counts.get(True, 0),
        "restarts_serving_the_base": served_counts.get(False, 0),
        "seconds": round(time.time() - t0, 1),
        "seed": a.seed,
    }
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
