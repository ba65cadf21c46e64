//! `perch run` end to end: the real binary on replayed and synthetic sources, with real UNIX
//! sockets (control, record subscribers, sd_notify), signals, files and HTTP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `perch run --config cfg` to the end of its finite source; it must exit 0.
fn run_to_end(cfg: &std::path::Path) -> std::process::Output {
    let out = perch(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The replayed clip through the service gives, frame by frame, the detections Ultralytics'
/// predictor finds on the same frames converted by OpenCV (I420 -> RGB is bit-exact, so the
/// lossless-input bar applies: 1 px, 0.01 score). Every frame comes out once, in order.
#[test]
fn y4m_replay_matches_ultralytics_frame_by_frame() {
    let g = json("tests/goldens/stream/osbs-pan.json");
    let dir = scratch("replay");
    let clip = path(g["clip"].as_str().unwrap());
    let cfg = write_config(
        &dir,
        &format!(
            "[source]\nuri = \"y4m:{}\"\nrealtime = false\n[output]\nfile = \"out/records.jsonl\"\n",
            clip.display()
        ),
    );
    let out = run_to_end(&cfg);
    let got = records(&String::from_utf8(out.stdout).unwrap());
    let want = g["records"].as_array().unwrap();
    assert_eq!(seqs(&got), (0..want.len() as u64).collect::<Vec<_>>());
    let file = std::fs::read_to_string(dir.join("out/records.jsonl")).unwrap();
    assert_eq!(
        records(&file),
        got,
        "file and stdout carry the same records"
    );
    let base = perch::model::OnnxModel::load(model()).unwrap();
    let (mut compared, mut worst) = (0, (0.0f64, 0.0f64));
    for (r, w) in got.iter().zip(want) {
        assert_eq!((&r["width"], &r["height"]), (&w["width"], &w["height"]));
        assert_eq!(r["source"], format!("y4m:{}", clip.display()));
        assert_eq!(r["model"]["fingerprint"], base.fingerprint());
        assert!(
            r["frame_age_ms"].as_f64().unwrap() >= r["timings_ms"]["inference"].as_f64().unwrap()
        );
        let (a, b) = (
            w["detections"].as_array().unwrap(),
            r["detections"].as_array().unwrap(),
        );
        let ctx = format!("frame {}", r["seq"]);
        let (n, px, ds) = assert_covered(a, b, 0.25, (1.0, 0.01), &ctx);
        assert_covered(b, a, 0.25, (1.0, 0.01), &ctx);
        compared += n;
        worst = (worst.0.max(px), worst.1.max(ds));
    }
    eprintln!(
        "{compared} detections compared, worst {:.3} px / {:.4} score",
        worst.0, worst.1
    );
    assert!(compared >= 30, "only {compared} detections compared");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Unpaced synthetic frames: N in, N records out with consecutive sequence numbers, written
/// through size-based rotation without losing or splitting a line.
#[test]
fn synthetic_lossless_n_in_n_out_with_rotation() {
    let dir = scratch("lossless");
    let cfg = write_config(
        &dir,
        "[source]\nuri = \"synthetic\"\nwidth = 320\nheight = 240\nrealtime = false\nframes = 25\n\
         [output]\nstdout = false\nfile = \"r.jsonl\"\nfile_max_bytes = 4096\nfile_keep = 50\n",
    );
    let out = run_to_end(&cfg);
    assert!(out.stdout.is_empty(), "stdout = false");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("r.jsonl")
        })
        .collect();
    assert!(files.len() >= 2, "expected rotation, got {files:?}");
    // Oldest first: r.jsonl.N .. r.jsonl.1, then r.jsonl.
    files.sort_by_key(|p| {
        let n = p
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|e| e.parse::<u32>().ok());
        std::cmp::Reverse(n.unwrap_or(0))
    });
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.len() <= 4096 || text.lines().count() == 1,
            "{f:?} over the limit"
        );
        all.extend(records(&text));
    }
    assert_eq!(seqs(&all), (0..25).collect::<Vec<_>>());
    assert_eq!(all[0]["width"], 320);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The full service contract under systemd's protocol: READY only after a frame was processed,
/// WATCHDOG pings while frames flow, STATUS lines; the control socket answers status and shrugs
/// off garbage; subscribers get the records; the live view serves frames that match their
/// records; snapshots land on disk; SIGTERM drains and exits 0, removing the sockets.
#[test]
fn service_notify_control_subscribers_http_snapshots_and_sigterm() {
    let dir = scratch("notify");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        &dir,
        &format!(
            "[source]\nuri = \"synthetic\"\nwidth = 320\nheight = 240\nfps = 8\n\
             [output]\nsocket = \"records.sock\"\n\
             [snapshots]\ndir = \"snaps\"\nevery_s = 0.3\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\nmax_fps = 20\n\
             [control]\nsocket = \"control.sock\"\nmode = \"0600\"\n"
        ),
    );
    let child = spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    // Datagrams are drained on their own thread for the whole run, as systemd would.
    let msgs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let (msgs, done) = (msgs.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    let mut m = msgs.lock().unwrap();
                    m.push_str(&String::from_utf8_lossy(&buf[..n]));
                    m.push('\n');
                }
            }
        })
    };
    let received = || msgs.lock().unwrap().clone();
    wait_for(60, "READY=1", || {
        received().lines().any(|l| l == "READY=1").then_some(())
    });
    let control = dir.join("control.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&control).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let st = status(&control);
    assert!(
        st["frames_processed"].as_u64().unwrap() >= 1,
        "READY before any frame: {st}"
    );

    // Garbage on the control socket gets an error reply; the service keeps serving.
    let mut s = UnixStream::connect(&control).unwrap();
    s.write_all(b"{\"cmd\": 42}\nnot json\n{\"cmd\":\"explode\"}\n")
        .unwrap();
    let mut r = BufReader::new(s);
    for want in [
        "no \\\"cmd\\\" string",
        "malformed request",
        "unknown command 'explode'",
    ] {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("\"ok\":false") && l.contains(want), "{l}");
    }
    assert_eq!(ctl(&control, "ping")["ok"], true);

    // A subscriber receives consecutive records.
    let sub = UnixStream::connect(dir.join("records.sock")).unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut sub = BufReader::new(sub);
    let mut got = Vec::new();
    while got.len() < 3 {
        let mut l = String::new();
        sub.read_line(&mut l).unwrap();
        got.push(
            serde_json::from_str::<Value>(&l).unwrap()["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    assert!(got.windows(2).all(|w| w[1] > w[0]), "{got:?}");

    // Live view: /snapshot.jpg is a frame whose embedded index is a processed seq; the MJPEG
    // stream delivers parts with increasing X-Perch-Seq; /metrics and /status answer.
    let http_get = |path: &str| -> (String, Vec<u8>) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&buf[..split]).into_owned(),
            buf[split + 4..].to_vec(),
        )
    };
    let (head, body) = http_get("/snapshot.jpg");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("image/jpeg"),
        "{head}"
    );
    let img = image::load_from_memory(&body).unwrap().into_rgb8();
    let frame =
        perch::RgbFrame::new(img.width() as usize, img.height() as usize, img.into_raw()).unwrap();
    let idx = perch::camera::synthetic::read_index(&frame).expect("index readable after JPEG");
    // The newest processed frame: no older than the records already received, and a frame
    // that was captured (seq counts captured frames, dropped ones included).
    let captured = status(&control)["frames_captured"].as_u64().unwrap();
    let seen = *got.last().unwrap();
    assert!(
        seen <= idx && idx < captured,
        "snapshot index {idx}: records seen up to {seen}, {captured} captured"
    );
    let (head, body) = http_get("/metrics");
    assert!(head.contains("200 OK"));
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("# TYPE perch_frames_processed_total counter"),
        "{text}"
    );
    let (head, body) = http_get("/");
    let page = String::from_utf8(body).unwrap();
    assert!(
        head.contains("200 OK") && head.contains("text/html"),
        "{head}"
    );
    for link in ["/stream.mjpg", "/snapshot.jpg", "/status", "/metrics"] {
        assert!(page.contains(&format!("href=\"{link}\"")), "{page}");
    }
    let (head, _) = http_get("/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /stream.mjpg HTTP/1.1\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            let mut l = Vec::new();
            r.read_until(b'\n', &mut l).unwrap();
            if let Some(v) = l.strip_prefix(b"X-Perch-Seq: ") {
                seqs.push(String::from_utf8_lossy(v).trim().parse::<u64>().unwrap());
            }
        }
        assert!(seqs[1] > seqs[0], "{seqs:?}");
    }

    // Snapshots: files named by seq whose pixels carry that same frame index.
    let snaps = dir.join("snaps");
    let snap = wait_for(20, "a snapshot", || {
        std::fs::read_dir(&snaps)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "jpg"))
    });
    let name = snap.file_stem().unwrap().to_string_lossy().into_owned();
    let seq: u64 = name.rsplit('-').next().unwrap().parse().unwrap();
    let f = perch::image_io::load_rgb(&snap).unwrap();
    assert_eq!(
        perch::camera::synthetic::read_index(&f),
        Some(seq),
        "{name}"
    );

    // Watchdog pings and STATUS lines while frames flow.
    wait_for(20, "WATCHDOG=1 and STATUS=", || {
        let all = received();
        (all.contains("WATCHDOG=1") && all.contains("STATUS=running: ")).then_some(())
    });

    signal(&child, libc::SIGTERM);
    let (code, stdout, stderr) = finish(child, 30);
    assert_eq!(code, Some(0), "{stderr}");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    drain.join().unwrap();
    assert!(received().contains("STOPPING=1"), "{}", received());
    let recs = records(&stdout);
    assert!(recs.len() >= 3);
    let s = seqs(&recs);
    assert!(s.windows(2).all(|w| w[1] > w[0]), "records out of order");
    assert!(
        !control.exists() && !dir.join("records.sock").exists(),
        "sockets removed"
    );
    assert!(
        !stderr.contains("perch: error"),
        "clean shutdown expected: {stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Names of the service's long-lived threads, sorted (control connection threads, which live
/// as long as a client stays connected, are left out).
fn thread_names(child: &Running) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.starts_with("perch-control-c"))
        .collect();
    names.sort();
    names
}

/// SIGHUP and `perch ctl reload` apply a changed configuration without a restart; an invalid
/// one is rejected with the file, line and key while the old configuration keeps serving.
/// Threads do not leak across reloads, and once the reloads are over memory stays flat.
#[test]
fn reload_applies_valid_and_rejects_invalid_config() {
    let dir = scratch("reload");
    let body = |conf: &str| {
        format!(
            "conf = {conf}\n[source]\nuri = \"synthetic\"\nwidth = 256\nheight = 192\nfps = 50\n\
             [output]\nstdout = false\n[control]\nsocket = \"c.sock\"\n"
        )
    };
    let cfg = write_config(&dir, &body("0.25"));
    let control = dir.join("c.sock");
    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    wait_for(60, "first frames", || {
        control
            .exists()
            .then(|| status(&control))
            .filter(|s| s["frames_processed"].as_u64().unwrap() >= 20)
    });
    let rss_first = status(&control)["rss_bytes"].as_u64().unwrap();
    let threads = thread_names(&child);
    assert!(
        threads.contains(&"perch-inference".to_string()),
        "{threads:?}"
    );

    // Valid change via SIGHUP: the model is rebuilt with the new threshold.
    write_config(&dir, &body("0.5"));
    signal(&child, libc::SIGHUP);
    wait_for(60, "reload 1", || {
        (status(&control)["reloads"] == 1).then_some(())
    });
    // Invalid change: rejected, still serving, error names file, line and key.
    write_config(&dir, &body("1.5"));
    signal(&child, libc::SIGHUP);
    let st = wait_for(30, "rejection", || {
        let st = status(&control);
        st["last_error"]
            .as_str()?
            .contains("reload rejected")
            .then_some(st)
    });
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("perch.toml:3: model.conf: 1.5 is outside"),
        "{err}"
    );
    assert_eq!(st["reloads"], 1);
    let before = st["frames_processed"].as_u64().unwrap();
    wait_for(30, "frames after the rejected reload", || {
        (status(&control)["frames_processed"].as_u64().unwrap() > before + 10).then_some(())
    });
    // Valid again, through the control socket this time; repeat to expose leaks.
    write_config(&dir, &body("0.3"));
    for n in 2..=4 {
        // The reply comes once the new configuration serves.
        assert_eq!(ctl(&control, "reload")["reload"], "applied");
        wait_for(60, "reload", || {
            let st = status(&control);
            (st["reloads"] == n && st["state"] == "running").then_some(())
        });
    }
    wait_for(10, "the same threads as before the reloads", || {
        (thread_names(&child) == threads).then_some(())
    });
    // Memory: 150 more frames at the same settings, counted from a steady state (the new
    // pipeline's threads grow their malloc arenas over their first frames).
    let settled = status(&control)["frames_processed"].as_u64().unwrap() + 50;
    wait_for(120, "50 frames after the reloads", || {
        (status(&control)["frames_processed"].as_u64().unwrap() >= settled).then_some(())
    });
    let st = status(&control);
    let (start, rss_early) = (
        st["frames_processed"].as_u64().unwrap(),
        st["rss_bytes"].as_u64().unwrap(),
    );
    let st = wait_for(300, "150 more frames", || {
        let st = status(&control);
        (st["frames_processed"].as_u64().unwrap() >= start + 150).then_some(st)
    });
    let rss_late = st["rss_bytes"].as_u64().unwrap();
    eprintln!(
        "rss {:.1} MB after 20 frames; after 4 reloads {:.1} MB at frame {start}, {:.1} MB at frame {}",
        rss_first as f64 / 1e6,
        rss_early as f64 / 1e6,
        rss_late as f64 / 1e6,
        st["frames_processed"]
    );
    assert!(
        rss_late < rss_early + 8_000_000,
        "RSS grew from {rss_early} to {rss_late}"
    );
    signal(&child, libc::SIGTERM);
    let (code, _, stderr) = finish(child, 30);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bad configurations and sources: one line naming the thing, exit status 78 (which the unit
/// file excludes from restarts); `--check-config` validates without running.
#[test]
fn bad_configs_exit_78_with_one_line() {
    let dir = scratch("badcfg");
    let cases: Vec<(String, &str)> = vec![
        (
            "[source]\nuri = \"synthetic\"\nfps = 0\n".into(),
            "perch.toml:5: source.fps: 0 is outside",
        ),
        (
            "[source]\nuri = \"synthetic\"\ncolour = 1\n".into(),
            "perch.toml:5: unknown field `colour`",
        ),
        (
            "[source]\nuri = \"y4m:missing.y4m\"\n".into(),
            "missing.y4m: cannot open",
        ),
        (
            "[source]\nuri = \"images:/nonexistent/*.png\"\n".into(),
            "no image files found",
        ),
        (
            "[source]\nuri = \"synthetic\"\n[http]\nlisten = \"0.0.0.0:80\"\n".into(),
            "not a loopback address",
        ),
        (
            "[source]\nuri = \"synthetic\"\n[framebuffer]\ndevice = \"/dev/null\"\n".into(),
            "/dev/null: not a framebuffer device",
        ),
    ];
    for (body, want) in cases {
        let cfg = write_config(&dir, &body);
        let out = perch(&["run", "--config", cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{body}: {err}");
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("perch: error:"))
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(want), "want '{want}' in {err}");
    }
    let cfg = write_config(&dir, "[source]\nuri = \"synthetic\"\n");
    std::fs::write(dir.join("broken.onnx"), b"not a model").unwrap();
    let out = perch(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--model",
        dir.join("broken.onnx").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.onnx"));
    let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config OK: model"));
    // A missing camera is not a configuration error: check-config says it will be retried.
    let out = perch(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--check-config",
        "--source",
        "v4l2:/dev/video-perch-none",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("cannot open: No such file or directory (os error 2) (will keep retrying)")
    );
    let out = perch(&[
        "ctl",
        "--socket",
        dir.join("none.sock").to_str().unwrap(),
        "status",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("perch: error: "));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shipped unit and example configuration are valid: `systemd-analyze verify` accepts the
/// unit (with ExecStart pointed at the built binary) and the example parses.
#[test]
fn shipped_unit_and_config_are_valid() {
    let unit = std::fs::read_to_string(path("deploy/perch.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "SupplementaryGroups=video",
        "ProtectSystem=strict",
        "StateDirectory=perch",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    let cfg = perch::config::load(&path("deploy/perch.toml")).unwrap();
    assert_eq!(cfg.control.unwrap().mode, 0o660);
    perch::config::load(&path("deploy/replay.toml")).unwrap();
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: unit lint skipped");
        return;
    };
    let dir = scratch("unit");
    let local = dir.join("perch.service");
    std::fs::write(
        &local,
        unit.replace("/usr/bin/perch", env!("CARGO_BIN_EXE_perch")),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on this machine are not ours to judge.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("perch.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// An image directory replays in name order; a corrupt file is skipped with a warning naming it,
/// and the records keep consecutive sequence numbers.
#[test]
fn image_directory_source_skips_corrupt_files() {
    let dir = scratch("images");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::copy(path("tests/data/osbs_029.png"), imgs.join("a.png")).unwrap();
    std::fs::write(imgs.join("b.jpg"), b"\xff\xd8 truncated").unwrap();
    std::fs::copy(path("tests/data/chelsea-160.png"), imgs.join("c.png")).unwrap();
    let source = format!("images:{}", imgs.display());
    let out = perch(&["run", "--model", &model(), "--source", &source]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(seqs(&recs), [0, 1]);
    assert_eq!(
        (&recs[0]["width"], &recs[1]["width"]),
        (&400.into(), &160.into())
    );
    // Each record names its file, as `perch detect` does.
    assert_eq!(
        (&recs[0]["source"], &recs[1]["source"]),
        (
            &imgs.join("a.png").display().to_string().into(),
            &imgs.join("c.png").display().to_string().into()
        )
    );
    assert!(
        err.contains("b.jpg") && err.contains("cannot decode"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--frames N` (`source.frames`) stops after N records, even when a real-time source delivers
/// frames faster than inference takes them (the dropped ones do not count).
#[test]
fn frames_limit_counts_records() {
    let out = perch(&[
        "run",
        "--model",
        &model(),
        "--source",
        "synthetic",
        "--frames",
        "12",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recs = records(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(recs.len(), 12, "{:?}", seqs(&recs));
    let s = seqs(&recs);
    assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
}

/// A dynamic export in the service runs at the smallest stride-aligned input holding the
/// configured frame (Ultralytics' predictor letterbox) unless `rect = false`; a static export
/// keeps its size.
#[test]
fn dynamic_models_fit_the_configured_frame_by_default() {
    let dir = scratch("rect-default");
    let check = |model: &str, extra: &str| {
        let cfg = dir.join("perch.toml");
        std::fs::write(
            &cfg,
            format!(
                "[model]\npath = \"{}\"\n{extra}[source]\nuri = \"synthetic\"\nwidth = 320\nheight = 240\n",
                path(model).display()
            ),
        )
        .unwrap();
        let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let dynamic = "tests/fixtures/v8-dyn-op17.onnx";
    assert!(
        check(dynamic, "").contains(" at 128x160,"),
        "{}",
        check(dynamic, "")
    );
    let square = check(dynamic, "rect = false\n");
    assert!(square.contains(" at 160x160,"), "{square}");
    let fixed = check("tests/fixtures/v8-t160-op11.onnx", "");
    assert!(fixed.contains(" at 160x160,"), "{fixed}");
    std::fs::remove_dir_all(&dir).unwrap();
}
