//! The Debian packages: built by `cross/package.sh` from the tested binary, their contents and
//! control fields checked, then installed into a scratch root with the real dpkg and real
//! maintainer scripts (user and group creation, unit enablement), the installed configuration
//! checked by the installed binary, and purged again.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn debian_packages_build_install_and_purge() {
    if !have("dpkg-deb") {
        eprintln!("dpkg-deb not installed: package test skipped");
        return;
    }
    let dir = scratch("deb");
    let out = dir.join("deb");
    run(Command::new(path("cross/package.sh"))
        .args([
            "--bin",
            env!("CARGO_BIN_EXE_perch"),
            "--arch",
            "amd64",
            "--output-dir",
        ])
        .arg(&out)
        .current_dir(root()));
    let version = env!("CARGO_PKG_VERSION");
    let deb = out.join(format!("perch_{version}_amd64.deb"));
    let models = out.join(format!("perch-models_{version}_all.deb"));

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for p in [
        "./usr/bin/perch",
        "./lib/systemd/system/perch.service",
        "./etc/perch/perch.toml",
        "./usr/share/doc/perch/copyright",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(p)),
            "{p} not in:\n{listing}"
        );
    }
    assert!(
        listing.lines().all(|l| l.contains(" root/root ")),
        "files owned by root:\n{listing}"
    );
    let field = |deb: &Path, f: &str| run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f));
    assert_eq!(field(&deb, "Architecture").trim(), "amd64");
    assert!(field(&deb, "Depends").starts_with("libc6 (>= 2."));
    assert_eq!(field(&deb, "Recommends").trim(), "perch-models");
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for s in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(s), "control archive lacks {s}:\n{info}");
    }
    let mlist = run(Command::new("dpkg-deb").arg("-c").arg(&models));
    assert!(mlist.contains("./usr/share/perch/models/tree-yolo11n-320.onnx"));
    assert!(mlist.contains("./usr/share/perch/models/tree-yolo11n-320.calibration.json"));
    assert_eq!(
        mlist.matches(".safetensors").count(),
        std::fs::read_dir(path("models/adapters"))
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors"))
            .count()
    );

    // A scratch root: dpkg's database, the account files useradd edits, a video group.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !have("useradd") || !have("systemctl") {
        eprintln!("not root or no useradd/systemctl: scratch-root install skipped");
        return;
    }
    let r = dir.join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "etc",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    for (f, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\nvideo:x:44:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\nvideo:!::\n"),
    ] {
        std::fs::write(r.join(f), text).unwrap();
    }
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", r.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--force-not-root",
            ])
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    };
    run(dpkg(&["-i"]).arg(&models).arg(&deb));
    let bin = r.join("usr/bin/perch");
    assert!(run(Command::new(&bin).arg("--version")).starts_with("perch "));
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("perch:") && l.ends_with(":/usr/sbin/nologin")),
        "{passwd}"
    );
    assert!(group.lines().any(|l| l.starts_with("perch:")), "{group}");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("video:") && l.ends_with("perch")),
        "perch joins video: {group}"
    );
    let wants = r.join("etc/systemd/system/multi-user.target.wants/perch.service");
    assert!(wants.symlink_metadata().is_ok(), "unit enabled");
    // The installed example configuration, pointed into the scratch root, passes the installed
    // binary's own check with the installed model.
    let cfg = std::fs::read_to_string(r.join("etc/perch/perch.toml"))
        .unwrap()
        .replace(
            "/usr/share/perch",
            &r.join("usr/share/perch").display().to_string(),
        )
        .replace(
            "/var/lib/perch",
            &r.join("var/lib/perch").display().to_string(),
        )
        .replace("/run/perch", &dir.join("run").display().to_string());
    let local = dir.join("perch.toml");
    std::fs::write(&local, cfg).unwrap();
    let check = run(Command::new(&bin)
        .args(["run", "--check-config", "--config"])
        .arg(&local));
    assert!(check.starts_with("config OK: model"), "{check}");

    run(&mut dpkg(&["--purge", "perch", "perch-models"]));
    assert!(!bin.exists());
    assert!(
        !r.join("etc/perch/perch.toml").exists(),
        "purge removes the conffile"
    );
    assert!(wants.symlink_metadata().is_err(), "unit disabled");
    assert!(!r.join("usr/share/perch/models").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
