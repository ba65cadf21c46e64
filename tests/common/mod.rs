//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
