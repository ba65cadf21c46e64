//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod broker;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Repository root (tests run with the package root as working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn path(rel: &str) -> PathBuf {
    root().join(rel)
}

pub fn json(rel: &str) -> Value {
    let p = path(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as usize)
        .collect()
}

/// All `*.json` files of a goldens folder, sorted.
pub fn golden_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(path(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no goldens in {dir}");
    v
}

pub fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// Runs the real `perch` binary in the repository root, with `RUST_LOG` unset. A cross-built
/// binary runs through `PERCH_TEST_RUNNER` (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`):
/// cargo's target runner wraps test executables, not the processes they spawn.
pub fn perch(args: &[&str]) -> Output {
    perch_command(args).output().expect("run perch")
}

/// Runs `perch eval` on the model and dataset an eval golden names (its `model` and `data`
/// keys), followed by `extra` arguments.
pub fn eval_golden(g: &Value, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "--model",
        g["model"].as_str().unwrap(),
        "--data",
        g["data"].as_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    perch(&args)
}

/// The `perch` command [`perch`] runs, for tests that need pipes, signals or environment.
pub fn perch_command(args: &[&str]) -> Command {
    let runner = std::env::var("PERCH_TEST_RUNNER").unwrap_or_default();
    let mut prefix = runner.split_whitespace();
    let mut cmd = match prefix.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(prefix).arg(env!("CARGO_BIN_EXE_perch"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_perch")),
    };
    cmd.args(args).current_dir(root()).env_remove("RUST_LOG");
    cmd
}

/// One-sided match: every detection in `a` scoring at least `conf + score_tol` has a partner in
/// `b` of the same class with every box coordinate within `px_tol` and the score within
/// `score_tol`. Detections that close to the threshold may legitimately appear on one side only.
/// Returns (matched, worst box distance, worst score difference).
pub fn assert_covered(
    a: &[Value],
    b: &[Value],
    conf: f64,
    (px_tol, score_tol): (f64, f64),
    ctx: &str,
) -> (usize, f64, f64) {
    let boxf = |d: &Value| -> Vec<f64> {
        d["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (mut matched, mut worst_px, mut worst_score) = (0, 0.0f64, 0.0f64);
    for d in a {
        let s = d["score"].as_f64().unwrap();
        if s < conf + score_tol {
            continue;
        }
        let bx = boxf(d);
        let best = b
            .iter()
            .filter(|e| e["class_id"] == d["class_id"])
            .map(|e| {
                let eb = boxf(e);
                let dist = bx
                    .iter()
                    .zip(&eb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                (dist, (e["score"].as_f64().unwrap() - s).abs())
            })
            .min_by(|x, y| x.0.total_cmp(&y.0));
        let (dist, ds) = best.unwrap_or_else(|| panic!("{ctx}: no partner for {d}"));
        assert!(
            dist <= px_tol && ds <= score_tol,
            "{ctx}: {d} is {dist:.3} px / {ds:.4} score from its nearest partner"
        );
        matched += 1;
        worst_px = worst_px.max(dist);
        worst_score = worst_score.max(ds);
    }
    (matched, worst_px, worst_score)
}

// ---- running the service ----

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("perch-svc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn model() -> String {
    path("models/tree-yolo11n-320.onnx").display().to_string()
}

pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("perch.toml");
    std::fs::write(&p, format!("[model]\npath = \"{}\"\n{body}", model())).unwrap();
    p
}

pub fn records(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l}: {e}")))
        .collect()
}

pub fn seqs(recs: &[Value]) -> Vec<u64> {
    recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// Sends one control request and returns the reply.
pub fn ctl(sock: &Path, cmd: &str) -> Value {
    ctl_args(sock, &[cmd])
}

/// Runs `perch ctl` with `args` and returns the reply.
pub fn ctl_args(sock: &Path, args: &[&str]) -> Value {
    let mut all = vec!["ctl", "--socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = perch(&all);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The status, or None while the service is not answering yet.
pub fn try_status(sock: &Path) -> Option<Value> {
    let out = perch(&["ctl", "--socket", sock.to_str().unwrap(), "status"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    (v["ok"] == true).then_some(v)
}

pub fn status(sock: &Path) -> Value {
    ctl(sock, "status")
}

// Not every test crate polls.
#[allow(unused_imports)]
pub use broker::wait_for;

/// A spawned service, killed when dropped, so a failing test leaves no process behind.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn signal(child: &Running, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, sig) }, 0);
}

pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Running {
    let mut cmd = perch_command(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Running)
        .expect("spawn perch run")
}

/// Waits for exit (killing after `secs`) and returns (code, stdout, stderr).
pub fn finish(mut running: Running, secs: u64) -> (Option<i32>, String, String) {
    let child = &mut running.0;
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        so.read_to_string(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        se.read_to_string(&mut s).unwrap();
        s
    });
    let end = Instant::now() + Duration::from_secs(secs);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("perch run did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    out.push_str(&t_out.join().unwrap());
    err.push_str(&t_err.join().unwrap());
    (code, out, err)
}

/// One fixture of each detector family in `tests/fixtures` (v5, v8, v8 dynamic, v10, 11, 26,
/// 26 one-to-many, YOLOX), for properties that must hold on all of them.
pub const FAMILIES: [&str; 8] = [
    "v5-t160-op12",
    "v8-t160-op11",
    "v8-dyn-op17",
    "v10-t160-op17",
    "y11-t160-op13",
    "y26-t160-op18",
    "y26-o2m-t160-op17",
    "yolox-t160-op11",
];

/// The weights of `base`'s single-consumer Conv layers, in graph order: what adapters change.
/// The DFL projection (a fixed arange tract folds) is left out.
pub fn conv_weights(base: &perch::model::OnnxModel) -> Vec<String> {
    base.weight_shapes()
        .into_iter()
        .filter(|(n, s)| {
            s.len() == 4
                && !n.contains("dfl")
                && matches!(base.weight_use(n), perch::tensor::WeightUse::Conv { .. })
                && base.weight_consumers(n) == 1
        })
        .map(|(n, _)| n)
        .collect()
}

/// Safetensors parts: (JSON header, data offset).
pub fn safetensors_header(bytes: &[u8]) -> (Value, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

/// Every tensor's byte range in the file, with its dtype.
pub fn tensor_ranges(bytes: &[u8]) -> Vec<(String, std::ops::Range<usize>)> {
    let (h, data) = safetensors_header(bytes);
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            let o = t["data_offsets"].as_array().unwrap();
            let (b, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (t["dtype"].as_str().unwrap().to_string(), data + b..data + e)
        })
        .collect()
}

/// Fills every tensor with its largest finite value: a valid file that fits the base but
/// makes the merged model overflow.
pub fn overflowing(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for (dtype, r) in tensor_ranges(bytes) {
        let pattern: &[u8] = match dtype.as_str() {
            "F16" => &[0xff, 0x7b],
            "F32" => &[0xff, 0xff, 0x7f, 0x7f],
            other => panic!("dtype {other}"),
        };
        for chunk in out[r].chunks_mut(pattern.len()) {
            chunk.copy_from_slice(pattern);
        }
    }
    out
}

/// The `perch: error:` lines of a run's stderr. Log lines (e.g. tract's CPU-feature warning
/// under qemu) may come with them; each error is one such line.
pub fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("perch: error:"))
        .map(String::from)
        .collect()
}

/// Stops the service with SIGTERM (it must exit 0) and returns the records of its
/// `records.jsonl` and its stderr, after checking that every frame was written exactly once,
/// in order.
pub fn stop_and_read_records(svc: Running, dir: &Path) -> (Vec<Value>, String) {
    signal(&svc, libc::SIGTERM);
    let (code, _, err) = finish(svc, 60);
    assert_eq!(code, Some(0), "{err}");
    let recs = records(&std::fs::read_to_string(dir.join("records.jsonl")).unwrap());
    let s = seqs(&recs);
    assert_eq!(
        s,
        (0..s.len() as u64).collect::<Vec<_>>(),
        "every frame exactly once, in order"
    );
    (recs, err)
}

/// A service in `dir` on a lossless source looping over `images` (frame `seq` shows
/// `images[seq % n]`), records in `records.jsonl`, a control socket and an empty adapter store
/// with a 3-frame probation; `model` adds lines to `[model]`, `sections` adds sections at the
/// end. Returns once the first frame is processed; fails with perch's stderr if it exits
/// first.
pub fn image_loop_service(
    dir: &Path,
    images: &[&str],
    model: &str,
    sections: &str,
) -> (PathBuf, Running) {
    let image_dir = dir.join("images");
    std::fs::create_dir_all(&image_dir).unwrap();
    for (i, f) in images.iter().enumerate() {
        let ext = Path::new(f).extension().unwrap().to_str().unwrap();
        std::fs::copy(path(f), image_dir.join(format!("{i}.{ext}"))).unwrap();
    }
    let sock = dir.join("control.sock");
    let cfg = write_config(
        dir,
        &format!(
            "{model}[source]\nuri = \"images:{}\"\nloop = true\n[output]\nstdout = false\n\
             file = \"records.jsonl\"\n[control]\nsocket = \"{}\"\n[adapters]\n\
             store = \"store\"\nprobation_frames = 3\n{sections}",
            image_dir.display(),
            sock.display()
        ),
    );
    let mut svc = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    wait_for(60, "the first frame", || {
        if let Ok(Some(code)) = svc.0.try_wait() {
            let mut err = String::new();
            let _ = svc.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("perch run exited with {code}: {err}");
        }
        let n = try_status(&sock)?["frames_processed"].as_u64()?;
        (n > 0).then_some(())
    });
    (sock, svc)
}
