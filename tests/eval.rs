//! `perch eval` against Ultralytics `val` on the committed evaluation set.

mod common;

use common::*;

/// The bar: mAP50 and mAP50-95 within 0.5 points of Ultralytics `val` on the same ONNX
/// model and data; precision and recall (taken at the smoothed max-F1 point) within 0.01.
#[test]
fn eval_agrees_with_ultralytics_val() {
    let g = json("tests/goldens/eval/tree-yolo11n-320.json");
    let out = eval_golden(&g, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["images"], 6);
    assert_eq!(r["conf"].to_string(), "0.001", "thresholds print as given");
    agrees_with_ultralytics(
        "",
        &r,
        &g,
        &[
            ("map50", 0.005),
            ("map50_95", 0.005),
            ("precision", 0.01),
            ("recall", 0.01),
        ],
    );
    assert_eq!(r["per_class"][0]["label"], "Tree");
    assert_eq!(r["per_class"][0]["instances"], r["instances"]);
}

/// A dynamic export is evaluated as `yolo val` evaluates it: rectangular batch shapes from
/// images grouped by aspect ratio (`--batch`), on non-square images where the square input
/// gives other figures (mAP50 0.314 against 0.303 at batch 16).
#[test]
fn dynamic_export_eval_matches_ultralytics_rect_batches() {
    let g = json("tests/goldens/eval/tree-yolo11n-dyn-rect.json");
    for batch in ["16", "2"] {
        let out = eval_golden(&g, &["--imgsz", "320", "--batch", batch]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["rect_batch"].to_string(), batch);
        agrees_with_ultralytics(
            &format!("batch {batch} "),
            &r,
            &g[format!("batch{batch}")],
            &[
                ("map50", 0.002),
                ("map50_95", 0.005),
                ("precision", 0.01),
                ("recall", 0.01),
            ],
        );
    }
}

/// Asserts each metric of perch's report `r` within its tolerance of Ultralytics' `want`;
/// `label` prefixes the printed and failed lines.
fn agrees_with_ultralytics(
    label: &str,
    r: &serde_json::Value,
    want: &serde_json::Value,
    tolerances: &[(&str, f64)],
) {
    for &(key, tol) in tolerances {
        let (got, want) = (r[key].as_f64().unwrap(), want[key].as_f64().unwrap());
        eprintln!("{label}{key}: perch {got:.4} ultralytics {want:.4}");
        assert!(
            (got - want).abs() <= tol,
            "{label}{key}: perch {got} vs ultralytics {want}"
        );
    }
}

#[test]
fn bad_datasets_fail_with_one_line() {
    let dir = std::env::temp_dir().join(format!("perch-eval-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("images/val")).unwrap();
    std::fs::create_dir_all(dir.join("labels/val")).unwrap();
    std::fs::copy(
        path("tests/data/osbs_029.png"),
        dir.join("images/val/a.png"),
    )
    .unwrap();
    std::fs::write(
        dir.join("labels/val/a.txt"),
        "0 0.5 0.5 0.1 0.1\n0 0.5 oops 0.1 0.1\n",
    )
    .unwrap();
    let yaml = dir.join("data.yaml");
    std::fs::write(&yaml, "val: images/val\nnames: [Tree]\n").unwrap();
    let model = "models/tree-yolo11n-320.onnx";
    for (data, needle) in [
        (
            yaml.to_str().unwrap().to_string(),
            "a.txt: line 2: non-numeric coordinate",
        ),
        ("missing.yaml".to_string(), "missing.yaml: cannot read"),
    ] {
        let out = perch(&["eval", "--model", model, "--data", &data]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("perch: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains(needle), "expected '{needle}' in {err}");
    }
    std::fs::write(&yaml, "val: images/val\nnames: [Tree]\n").unwrap();
    std::fs::write(dir.join("labels/val/a.txt"), "3 0.5 0.5 0.1 0.1\n").unwrap();
    let out = perch(&["eval", "--model", model, "--data", yaml.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("class 3 but the dataset names 1 classes")
    );
    let out = perch(&[
        "eval",
        "--model",
        model,
        "--data",
        yaml.to_str().unwrap(),
        "--split",
        "test",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no 'test' split"));
}
