//! Hostile and malformed input: every one is a one-line error with a documented exit code, and a
//! running service keeps serving through it.

mod common;

use common::*;

/// Detector-shaped models with one attribute tract does not validate (made by
/// scripts/make_malformed.py). Each used to panic inside tract (exit 101).
fn malformed_models() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(path("tests/fixtures/malformed"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    assert!(v.len() >= 9, "{v:?}");
    v
}

#[test]
fn malformed_models_are_one_line_errors_not_panics() {
    for m in malformed_models() {
        let rel = rel(&m);
        let out = perch_command(&["detect", "--model", &rel, "tests/data/osbs_029.png"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rel}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{rel}: {stderr}");
        assert!(
            stderr.starts_with(&format!("perch: error: {rel}: ")),
            "{rel}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{rel}: {stderr}");
        // --check-config builds the model too: configuration error, 78.
        let dir = scratch(&format!(
            "malformed-{}",
            m.file_stem().unwrap().to_str().unwrap()
        ));
        let cfg = dir.join("perch.toml");
        std::fs::write(
            &cfg,
            format!(
                "[model]\npath = \"{}\"\n[source]\nuri = \"synthetic\"\n",
                m.display()
            ),
        )
        .unwrap();
        let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{rel}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{rel}: {stderr}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A reload onto a model tract panics on is rejected and the old engine keeps serving; a reload
/// with an adapter store configured completes (it used to wait forever for the old swap thread)
/// and SIGTERM still stops the service.
#[test]
fn reloads_onto_a_malformed_model_or_with_adapters_keep_serving() {
    let dir = scratch("robust-reload");
    let body = |model: &str, conf: &str| {
        format!(
            "[model]\npath = \"{model}\"\nconf = {conf}\n[source]\nuri = \"synthetic\"\n\
             width = 256\nheight = 192\nfps = 50\n[output]\nstdout = false\n\
             [control]\nsocket = \"c.sock\"\n[adapters]\nstore = \"store\"\n"
        )
    };
    let cfg = dir.join("perch.toml");
    std::fs::write(&cfg, body(&model(), "0.25")).unwrap();
    let control = dir.join("c.sock");
    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    wait_for(60, "first frames", || {
        control
            .exists()
            .then(|| try_status(&control))
            .flatten()
            .filter(|s| s["frames_processed"].as_u64().unwrap() >= 10)
    });
    // A [model] change with [adapters] present: the engine and its swap thread are rebuilt.
    std::fs::write(&cfg, body(&model(), "0.3")).unwrap();
    signal(&child, libc::SIGHUP);
    wait_for(60, "reload with adapters", || {
        let st = try_status(&control)?;
        (st["reloads"] == 1 && st["state"] == "running").then_some(())
    });
    for m in malformed_models().iter().take(3) {
        let before = status(&control);
        std::fs::write(&cfg, body(&m.display().to_string(), "0.3")).unwrap();
        signal(&child, libc::SIGHUP);
        let st = wait_for(60, "rejection", || {
            let st = try_status(&control)?;
            let err = st["last_error"].as_str()?;
            (err.contains("reload rejected") && err.contains(m.to_str().unwrap())).then_some(st)
        });
        assert_eq!(st["reloads"], before["reloads"], "{st}");
        let n = st["frames_processed"].as_u64().unwrap();
        wait_for(30, "frames after the rejected reload", || {
            (status(&control)["frames_processed"].as_u64().unwrap() > n + 5).then_some(())
        });
    }
    signal(&child, libc::SIGTERM);
    let (code, _, stderr) = finish(child, 30);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small JPEG whose frame header claims 65535 x 65535 pixels (no data for them).
fn jpeg_bomb() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([90, 120, 60]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0 marker");
    // FFC0, length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    bytes
}

/// A PNG whose header claims 2^31 - 1 rows (the CRC recomputed so the header is valid).
fn png_bomb() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([90, 120, 60]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), ... CRC after 13 bytes.
    bytes[20..24].copy_from_slice(&0x7FFF_FFFFu32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Image headers that claim huge sizes, and whole-file reads of endless files, stop at perch's
/// documented limits with one line, quickly, without allocating for what the header claims.
#[test]
fn memory_bombs_stop_at_the_limits() {
    let dir = scratch("bombs");
    let jpg = dir.join("bomb.jpg");
    let png = dir.join("bomb.png");
    std::fs::write(&jpg, jpeg_bomb()).unwrap();
    std::fs::write(&png, png_bomb()).unwrap();
    let m = model();
    for img in [&jpg, &png] {
        let t = std::time::Instant::now();
        let out = perch(&["detect", "--model", &m, img.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", img.display());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(img.to_str().unwrap()), "{stderr}");
        assert!(stderr.contains("beyond perch's limit"), "{stderr}");
        assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
    }
    let out = perch(&[
        "detect",
        "--model",
        &m,
        "--labels",
        "/dev/zero",
        "tests/data/osbs_029.png",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/dev/zero") && stderr.contains("larger than"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Results that cannot be written are a one-line error with exit 1, never a panic, for every
/// command that prints: a pipe closed by the reader, a full device, a closed descriptor.
#[test]
fn unwritable_stdout_is_one_line_exit_1() {
    use std::process::Stdio;
    let m = model();
    let img = "tests/data/osbs_029.png";
    let commands: Vec<Vec<&str>> = vec![
        vec!["detect", "--model", &m, img],
        vec!["bench", "--model", &m, "--image", img, "--iterations", "2"],
        vec![
            "bench",
            "--model",
            &m,
            "--image",
            img,
            "--iterations",
            "2",
            "--json",
        ],
        vec![
            "adapter",
            "inspect",
            "models/adapters/osbs-lora.safetensors",
        ],
    ];
    for args in &commands {
        // stdout is /dev/full: every write fails with ENOSPC.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = perch_command(args).stdout(full).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("perch: error: stdout: cannot write results"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // stdout is a pipe whose reader is closed before perch starts (closing it after the
        // spawn would race a fast command that fits its output into the pipe's buffer).
        let mut fds = [0; 2];
        // Close-on-exec, so that no other test's child inherits the reader.
        // SAFETY: pipe2(2) fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: each descriptor is owned once, here.
        let (reader, writer) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(reader);
        let out = perch_command(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // detect with descriptor 1 closed: refused up front instead of losing every record.
    if std::env::var_os("PERCH_TEST_RUNNER").is_some() {
        return;
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec \"$0\" detect --model {m} {img} >&-"))
        .arg(env!("CARGO_BIN_EXE_perch"))
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("perch: error: stdout: cannot write results"),
        "{stderr}"
    );
}

/// Paths `run` cannot open are configuration errors for `--check-config`, and a reload onto them
/// is rejected, with the reason in the `ctl reload` reply, while the old configuration serves.
#[test]
fn unopenable_paths_are_rejected_by_check_config_and_reload() {
    let dir = scratch("robust-paths");
    let plain = dir.join("plain-file");
    std::fs::write(&plain, "not a socket").unwrap();
    let base = "[source]\nuri = \"synthetic\"\nwidth = 256\nheight = 192\nfps = 50\n\
                [control]\nsocket = \"c.sock\"\n";
    let bad = [
        (
            "[output]\nstdout = false\nfile = \"/\"\n",
            "output.file: /: not a regular file",
        ),
        (
            "[output]\nstdout = false\nsocket = \"plain-file\"\n",
            "output.socket",
        ),
    ];
    for (extra, want) in bad {
        let cfg = write_config(&dir, &format!("{base}{extra}"));
        let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{extra}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(want), "{extra}: {stderr}");
    }
    // The control socket itself on a regular file.
    std::fs::write(dir.join("ctl-file"), "x").unwrap();
    let cfg = write_config(
        &dir,
        "[source]\nuri = \"synthetic\"\n[control]\nsocket = \"ctl-file\"\n",
    );
    let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("control.socket") && stderr.contains("not a socket"),
        "{stderr}"
    );

    let cfg = write_config(&dir, &format!("{base}[output]\nstdout = false\n"));
    let control = dir.join("c.sock");
    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    wait_for(60, "first frames", || {
        try_status(&control).filter(|s| s["frames_processed"].as_u64().unwrap() >= 5)
    });
    for (extra, want) in bad {
        write_config(&dir, &format!("{base}{extra}"));
        let r = ctl(&control, "reload");
        assert_eq!(r["ok"], false, "{r}");
        let err = r["error"].as_str().unwrap();
        assert!(
            err.starts_with("reload rejected: ") && err.contains(want),
            "{err}"
        );
        let n = status(&control)["frames_processed"].as_u64().unwrap();
        wait_for(30, "frames after the rejected reload", || {
            (status(&control)["frames_processed"].as_u64().unwrap() > n + 5).then_some(())
        });
    }
    write_config(
        &dir,
        &format!("{base}[output]\nstdout = false\nfile = \"out.jsonl\"\n"),
    );
    assert_eq!(ctl(&control, "reload")["reload"], "applied");
    wait_for(30, "records in the new output file", || {
        std::fs::metadata(dir.join("out.jsonl"))
            .ok()
            .filter(|m| m.len() > 0)
    });
    assert_eq!(status(&control)["reloads"], 1);
    signal(&child, libc::SIGTERM);
    let (code, _, stderr) = finish(child, 30);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A y4m FIFO nobody writes to yet: `--check-config` answers within the stall timeout, `run`
/// waits for a writer without blocking SIGTERM, and serves the stream once a writer comes.
#[test]
fn fifo_source_without_a_writer_neither_blocks_check_nor_stop() {
    let dir = scratch("robust-fifo");
    let fifo = dir.join("cam.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let cfg = write_config(
        &dir,
        "[source]\nuri = \"y4m:cam.fifo\"\n[output]\nstdout = false\n[control]\nsocket = \"c.sock\"\n",
    );
    let started = std::time::Instant::now();
    let out = perch(&["run", "--config", cfg.to_str().unwrap(), "--check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("no writer yet") && stdout.contains("will keep retrying"),
        "{stdout}"
    );
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());

    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    let control = dir.join("c.sock");
    wait_for(60, "the control socket", || try_status(&control));
    std::thread::sleep(std::time::Duration::from_secs(1));
    signal(&child, libc::SIGTERM);
    let started = std::time::Instant::now();
    let (code, _, stderr) = finish(child, 20);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());

    // With a writer arriving later, the stream is served.
    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    wait_for(60, "the control socket", || try_status(&control));
    let clip = std::fs::read(path("tests/data/osbs-pan.y4m")).unwrap();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let _ = f.write_all(&clip);
        })
    };
    wait_for(60, "frames from the FIFO", || {
        try_status(&control).filter(|s| s["frames_processed"].as_u64().unwrap_or(0) >= 3)
    });
    writer.join().unwrap();
    signal(&child, libc::SIGTERM);
    let (code, _, stderr) = finish(child, 20);
    assert!(matches!(code, Some(0)), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--adapter-scale` outside -10..=10 or not a number is a usage error naming the flag.
#[test]
fn adapter_scale_is_range_checked_on_the_command_line() {
    for s in ["NaN", "inf", "1e38", "-11"] {
        let out = perch(&[
            "detect",
            "--model",
            &model(),
            "--adapter",
            "models/adapters/osbs-lora.safetensors",
            &format!("--adapter-scale={s}"),
            "tests/data/osbs_029.png",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{s}: {stderr}");
        assert!(
            stderr.contains("--adapter-scale") && stderr.contains("outside"),
            "{s}: {stderr}"
        );
    }
}

fn proc_count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count())
}

/// The short soak (scripts/soak.py runs the long one): 25 s at 15 fps with an adapter swap
/// every 3 s and hostile control clients (silent, dripping, garbage, oversized, cut payloads)
/// in parallel. The service keeps serving, answers, and ends with the file descriptors and
/// threads it had after warm-up.
#[test]
fn short_soak_with_swaps_and_hostile_clients() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = scratch("robust-soak");
    let cfg = write_config(
        &dir,
        "[source]\nuri = \"synthetic\"\nwidth = 320\nheight = 240\nfps = 15\n\
         [output]\nstdout = false\n[control]\nsocket = \"c.sock\"\n\
         [adapters]\nstore = \"store\"\nprobation_frames = 5\n",
    );
    let control = dir.join("c.sock");
    let child = spawn(&["run", "--config", cfg.to_str().unwrap()], &[]);
    let pid = child.0.id();
    wait_for(60, "first frames", || {
        try_status(&control).filter(|s| s["frames_processed"].as_u64().unwrap() >= 5)
    });
    for (name, file) in [("a", "osbs-lora"), ("b", "soap-lora")] {
        let f = format!("models/adapters/{file}.safetensors");
        let r = ctl_args(&control, &["install", &f, "--name", name]);
        assert_eq!(r["ok"], true, "{r}");
    }
    // Warm-up: one swap each way, so both engines have been built once.
    for name in ["a", "b"] {
        assert_eq!(ctl_args(&control, &["activate", name])["ok"], true);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (fds0, threads0) = (proc_count(pid, "fd"), proc_count(pid, "task"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hostile = {
        let (stop, control) = (stop.clone(), control.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let Ok(mut s) = UnixStream::connect(&control) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(8)));
                let mut buf = [0u8; 512];
                match n % 5 {
                    0 => std::thread::sleep(std::time::Duration::from_millis(1500)),
                    1 => {
                        for _ in 0..15 {
                            let _ = s.write_all(b"{");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                    2 => {
                        let _ = s.write_all(&[0xff, 0x00, b'\n']);
                        let _ = s.read(&mut buf);
                    }
                    3 => {
                        let _ = s.write_all(&vec![b'x'; 70 * 1024]);
                        let _ = s.read(&mut buf);
                    }
                    _ => {
                        let _ = s.write_all(
                            b"{\"cmd\":\"install\",\"name\":\"z\",\"payload_bytes\":900}\n",
                        );
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                }
            }
        })
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(25);
    let mut swaps = 0;
    while std::time::Instant::now() < end {
        let name = if swaps % 2 == 0 { "a" } else { "b" };
        let r = ctl_args(&control, &["activate", name]);
        assert_eq!(r["ok"], true, "{r}");
        swaps += 1;
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    hostile.join().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let st = status(&control);
    let (fds1, threads1) = (proc_count(pid, "fd"), proc_count(pid, "task"));
    eprintln!(
        "short soak: {swaps} swaps, fds {fds0} -> {fds1}, threads {threads0} -> {threads1}, \
         frames {} processed / {} dropped, latency p99 {} ms",
        st["frames_processed"], st["frames_dropped"], st["latency_ms"]["p99"]
    );
    assert_eq!(st["inference_errors"], 0, "{st}");
    assert!(fds1 <= fds0 + 2, "file descriptors {fds0} -> {fds1}");
    assert!(threads1 <= threads0 + 1, "threads {threads0} -> {threads1}");
    signal(&child, libc::SIGTERM);
    let (code, _, stderr) = finish(child, 30);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
