//! Adapter swaps under load: the real `perch run` binary on a paced synthetic camera, driven
//! through its control socket. Prints, for cold activations (build + health check + publish)
//! and staged ones (built ahead, activation only publishes): command-to-first-frame p50/p99,
//! frame latency p50/p99 while swaps run against a quiet baseline (with the ratio), frames lost
//! by the newest-wins handoff in each phase, and RSS after 10 swaps and after all of them.
//!
//! `cargo bench --bench swap` (env: `PERCH_SWAPS`, default 100 per phase; `PERCH_SWAP_FPS`,
//! default 15; `PERCH_SWAP_BASELINE_S`, default 20).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{cpu, env_or, pct, root};
use serde_json::{Value, json};

fn request(sock: &Path, req: Value) -> Value {
    perch::service::control::request(sock, &req, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{req}: {e}"))
}

fn install(sock: &Path, file: &str, name: &str) {
    let bytes = std::fs::read(root().join(file)).unwrap();
    let r = perch::service::control::request_with_payload(
        sock,
        &json!({"cmd": "install", "name": name}),
        &bytes,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Phase {
    name: &'static str,
    windows: Vec<(f64, f64)>,
    to_first_frame: Vec<f64>,
    build: Vec<f64>,
}

/// Latencies (frame_age_ms) and lost frames of records whose timestamp falls in `windows`.
fn frames_in(records: &[Value], windows: &[(f64, f64)]) -> (Vec<f64>, u64, u64) {
    let mut lat = Vec::new();
    let (mut seen, mut lost) = (0u64, 0u64);
    let mut prev: Option<u64> = None;
    for r in records {
        let (ts, seq) = (r["ts"].as_f64().unwrap(), r["seq"].as_u64().unwrap());
        let inside = windows.iter().any(|(a, b)| ts >= *a && ts <= *b);
        if inside {
            lat.push(r["frame_age_ms"].as_f64().unwrap());
            seen += 1;
            if let Some(p) = prev {
                lost += seq - p - 1;
            }
        }
        prev = Some(seq);
    }
    (lat, seen, lost)
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let swaps: usize = env_or("PERCH_SWAPS", 100);
    let fps: f64 = env_or("PERCH_SWAP_FPS", 15.0);
    let baseline_s: f64 = env_or("PERCH_SWAP_BASELINE_S", 20.0);
    let dir = std::env::temp_dir().join(format!("perch-bench-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("control.sock");
    let cfg = dir.join("perch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\n[source]\nuri = \"synthetic\"\nwidth = 640\nheight = 480\nfps = {fps}\n\
             [output]\nstdout = false\nfile = \"records.jsonl\"\nfile_max_bytes = 1000000000\n\
             [control]\nsocket = \"{}\"\n[adapters]\nstore = \"store\"\nprobation_frames = 5\n",
            root().join("models/tree-yolo11n-320.onnx").display(),
            sock.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_perch"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn perch run");
    let pid = child.id();
    let svc = Service(child);
    let t = Instant::now();
    while perch::service::control::request(&sock, &json!({"cmd": "status"}), Duration::from_secs(5))
        .map_or(true, |s| s["frames_processed"].as_u64().unwrap_or(0) < 10)
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "service did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (file, name) in [
        ("models/adapters/osbs-lora-all.safetensors", "osbs"),
        ("models/adapters/soap-lora.safetensors", "soap"),
        ("models/adapters/osbs-head.safetensors", "head"),
    ] {
        install(&sock, file, name);
    }
    let cycle = ["osbs", "soap", "head", ""];
    let baseline = (now_s(), now_s() + baseline_s);
    std::thread::sleep(Duration::from_secs_f64(baseline_s));
    let rss = |sock: &Path| request(sock, json!({"cmd": "status"}))["rss_bytes"].as_f64();
    let mut rss_at: Vec<(usize, Option<f64>)> = Vec::new();
    let mut phases = Vec::new();
    let mut done = 0usize;
    for (name, staged) in [("cold", false), ("staged", true)] {
        let mut p = Phase {
            name,
            windows: Vec::new(),
            to_first_frame: Vec::new(),
            build: Vec::new(),
        };
        // The base model alone cannot be staged; the staged phase cycles the adapters.
        let cycle = if staged { &cycle[..3] } else { &cycle[..] };
        for i in 0..swaps {
            let target = cycle[i % cycle.len()];
            if staged && !target.is_empty() {
                let r = request(&sock, json!({"cmd": "stage", "name": target}));
                assert_eq!(r["ok"], true, "{r}");
            }
            let start = now_s();
            let r = if target.is_empty() {
                request(&sock, json!({"cmd": "deactivate"}))
            } else {
                request(&sock, json!({"cmd": "activate", "name": target}))
            };
            assert_eq!(r["ok"], true, "{r}");
            p.windows.push((start, now_s()));
            assert_eq!(r["staged"], staged, "{r}");
            if let Some(ms) = r["times"]["command_to_first_frame_ms"].as_f64() {
                p.to_first_frame.push(ms);
            }
            p.build
                .push(r["times"]["build_ms"].as_f64().unwrap_or(f64::NAN));
            done += 1;
            if [10, 50, 100, 200, 500, 1000, 2000].contains(&done) {
                // Let the swap thread free the retired engine first.
                std::thread::sleep(Duration::from_millis(300));
                rss_at.push((done, rss(&sock)));
            }
        }
        phases.push(p);
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_end = rss(&sock);
    let hwm = vm_hwm_kb(pid);
    let status = request(&sock, json!({"cmd": "status"}));
    drop(svc);
    let text = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();

    let (base_lat, base_n, base_lost) = frames_in(&records, &[baseline]);
    println!(
        "adapter swaps under load: synthetic 640x480 at {fps} fps, model at 320, {swaps} swaps per phase"
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu()
    );
    println!(
        "| phase | frames | lost (newest-wins) | latency p50 ms | latency p99 ms | p99 vs baseline | command->first frame p50 ms | p99 ms | build p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| baseline (no swaps) | {base_n} | {base_lost} | {:.1} | {:.1} | 1.00 | - | - | - |",
        pct(&base_lat, 0.5),
        pct(&base_lat, 0.99)
    );
    for p in &phases {
        let (lat, n, lost) = frames_in(&records, &p.windows);
        println!(
            "| {} | {n} | {lost} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.0} |",
            p.name,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 0.99) / pct(&base_lat, 0.99),
            pct(&p.to_first_frame, 0.5),
            pct(&p.to_first_frame, 0.99),
            pct(&p.build, 0.5),
        );
    }
    let mb = |b: Option<f64>| b.map_or("?".into(), |b| format!("{:.1}", b / 1048576.0));
    let checkpoints: Vec<String> = rss_at
        .iter()
        .map(|(n, b)| format!("{n}: {}", mb(*b)))
        .collect();
    println!(
        "RSS (MB) after swaps {}; at the end ({done}): {}; peak (VmHWM): {} MB",
        checkpoints.join(", "),
        mb(rss_end),
        hwm.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    println!(
        "service: {} frames processed, {} inference errors, {} swaps, {} rejected",
        status["frames_processed"],
        status["inference_errors"],
        status["adapters"]["swaps"],
        status["adapters"]["rejected"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
