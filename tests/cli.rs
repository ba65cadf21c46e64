//! The real `perch` binary end to end: the JSON contract, annotated output, and bad input.

mod common;

use std::process::Output;

use common::*;
use serde_json::Value;

const FIXTURE: &str = "tests/fixtures/v8-t160-op11.onnx";

fn stdout_records(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a bad-input failure: exit 2, no record, one `perch: error:` line naming `what`
/// with `reason`, and no panic.
fn assert_bad_input(out: &Output, what: &str, reason: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        out.stdout.is_empty(),
        "no record expected, got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{err}");
    let lines = error_lines(out);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(what) && lines[0].contains(reason),
        "expected '{what}' and '{reason}' in: {}",
        lines[0]
    );
}

#[test]
fn one_json_record_per_image_with_the_documented_fields() {
    let out = perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "tests/data/chelsea.png",
        "tests/data/coffee.png",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = stdout_records(&out);
    assert_eq!(recs.len(), 2);
    for (rec, (src, w, h)) in recs.iter().zip([
        ("tests/data/chelsea.png", 451.0, 300.0),
        ("tests/data/coffee.png", 600.0, 400.0),
    ]) {
        assert_eq!(rec["source"], src);
        assert_eq!(
            (
                rec["width"].as_f64().unwrap(),
                rec["height"].as_f64().unwrap()
            ),
            (w, h)
        );
        for k in ["preprocess", "inference", "postprocess"] {
            assert!(rec["timings_ms"][k].as_f64().unwrap() >= 0.0);
        }
        let dets = rec["detections"].as_array().unwrap();
        assert!(
            !dets.is_empty(),
            "conf 0.001 on the calibrated fixture finds boxes (its class scores are ~1e-3)"
        );
        let mut last = f64::INFINITY;
        for d in dets {
            let s = d["score"].as_f64().unwrap();
            assert!(s > 0.001 && s <= last, "scores above conf, descending");
            last = s;
            let b: Vec<f64> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(
                b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w && b[3] <= h,
                "{b:?}"
            );
            let label = d["label"].as_str().unwrap();
            assert_eq!(
                label,
                ["tree", "bush", "dead tree"][d["class_id"].as_u64().unwrap() as usize]
            );
        }
    }
}

#[test]
fn class_filter_max_det_and_labels_file() {
    let all = stdout_records(&perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "tests/data/chelsea.png",
    ]));
    let n_all = all[0]["detections"].as_array().unwrap().len();
    let only = stdout_records(&perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "--classes",
        "2",
        "tests/data/chelsea.png",
    ]));
    let dets = only[0]["detections"].as_array().unwrap();
    assert!(dets.iter().all(|d| d["class_id"] == 2));
    assert!(dets.len() < n_all);
    let capped = stdout_records(&perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "--max-det",
        "2",
        "tests/data/chelsea.png",
    ]));
    assert_eq!(
        capped[0]["detections"].as_array().unwrap().len(),
        2.min(n_all)
    );

    let dir = tempdir("labels");
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "pine\n\noak\nbirch\n").unwrap();
    let out = perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "--labels",
        labels.to_str().unwrap(),
        "tests/data/chelsea.png",
    ]);
    let rec = &stdout_records(&out)[0];
    for d in rec["detections"].as_array().unwrap() {
        assert_eq!(
            d["label"],
            ["pine", "oak", "birch"][d["class_id"].as_u64().unwrap() as usize]
        );
    }
    let refused = |args: &[&str], reason: &str| {
        let mut all = vec!["detect", "--model", FIXTURE];
        all.extend(args);
        all.push("tests/data/chelsea.png");
        assert_bad_input(&perch(&all), "v8-t160-op11.onnx", reason);
    };
    let labels_arg = labels.to_str().unwrap();
    std::fs::write(&labels, "pine\n").unwrap();
    refused(
        &["--labels", labels_arg],
        "1 labels given for a model with 3 classes",
    );
    std::fs::write(&labels, "pine\noak\nbirch\nwillow\n").unwrap();
    refused(
        &["--labels", labels_arg],
        "4 labels given for a model with 3 classes",
    );
    refused(
        &["--classes", "1,3"],
        "class 3 requested, but the model has 3 classes (0..=2)",
    );
}

#[test]
fn annotated_images_are_written_and_names_do_not_collide() {
    let dir = tempdir("out");
    let sub = dir.join("again");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(path("tests/data/chelsea.png"), sub.join("chelsea.png")).unwrap();
    let out_dir = dir.join("annotated");
    let out = perch(&[
        "detect",
        "--model",
        FIXTURE,
        "--conf",
        "0.001",
        "--output-dir",
        out_dir.to_str().unwrap(),
        "tests/data/chelsea.png",
        sub.to_str().unwrap(),
        "tests/data/rocket.jpg",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["chelsea.png", "chelsea_1.png", "rocket.jpg"]);
    // Each record names the annotated file written for its image.
    let written: Vec<String> = stdout_records(&out)
        .iter()
        .map(|r| r["output"].as_str().unwrap().to_string())
        .collect();
    let name = |n: &str| out_dir.join(n).display().to_string();
    assert_eq!(
        written,
        [
            name("chelsea.png"),
            name("chelsea_1.png"),
            name("rocket.jpg")
        ]
    );
    let src = perch::image_io::load_rgb(&path("tests/data/chelsea.png")).unwrap();
    let drawn = perch::image_io::load_rgb(&out_dir.join("chelsea.png")).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (src.width(), src.height()));
    let changed = src
        .data()
        .iter()
        .zip(drawn.data())
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 100, "overlay changed only {changed} bytes");
}

#[test]
fn bad_models_fail_with_one_line_and_exit_2() {
    let dir = tempdir("models");
    let trunc = dir.join("truncated.onnx");
    let bytes = std::fs::read(path(FIXTURE)).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let img = "tests/data/chelsea.png";
    let t = trunc.to_str().unwrap();
    assert_bad_input(
        &perch(&["detect", "--model", "missing.onnx", img]),
        "missing.onnx",
        "No such file",
    );
    assert_bad_input(
        &perch(&["detect", "--model", t, img]),
        "truncated.onnx",
        "not an ONNX model",
    );
    assert_bad_input(
        &perch(&["detect", "--model", empty.to_str().unwrap(), img]),
        "empty.onnx",
        "file is empty",
    );
    assert_bad_input(
        &perch(&["detect", "--model", img, img]),
        "chelsea.png",
        "not an ONNX model",
    );
    assert_bad_input(
        &perch(&[
            "detect",
            "--model",
            "tests/fixtures/not-a-detector.onnx",
            img,
        ]),
        "not-a-detector.onnx",
        "not a supported detector",
    );
    assert_bad_input(
        &perch(&["detect", "--model", FIXTURE, "--imgsz", "320", img]),
        "v8-t160-op11.onnx",
        "static input is 160x160",
    );
    assert_bad_input(
        &perch(&["detect", "--model", FIXTURE, "--layout", "end2end", img]),
        "v8-t160-op11.onnx",
        "does not fit layout end2end",
    );
}

#[test]
fn bad_images_are_reported_and_the_rest_still_processed() {
    let dir = tempdir("images");
    let corrupt = dir.join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 definitely not a jpeg").unwrap();
    let png = std::fs::read(path("tests/data/chelsea.png")).unwrap();
    let trunc = dir.join("truncated.png");
    std::fs::write(&trunc, &png[..png.len() / 2]).unwrap();
    // A critical chunk renamed: the PNG decoder's message embeds a Rust debug dump.
    let mut renamed = png.clone();
    let idat = renamed.windows(4).position(|w| w == b"IDAT").unwrap();
    renamed[idat + 3] = b'X';
    let chunk = dir.join("chunk.png");
    std::fs::write(&chunk, &renamed).unwrap();
    // A JPEG cut short decodes (grey rows), with a warning naming it.
    let jpeg = std::fs::read(path("tests/data/osbs_029.jpg")).unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() / 3]).unwrap();
    let out = perch(&[
        "detect",
        "--model",
        FIXTURE,
        "tests/data/nope.png",
        corrupt.to_str().unwrap(),
        "tests/data/chelsea.png",
        trunc.to_str().unwrap(),
        "Cargo.toml",
        chunk.to_str().unwrap(),
        cut.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let recs = stdout_records(&out);
    assert_eq!(
        recs.len(),
        2,
        "the good and the cut images are still processed"
    );
    assert_eq!(recs[0]["source"], "tests/data/chelsea.png");
    assert_eq!(recs[1]["source"], cut.to_str().unwrap());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("cut.jpg") && l.contains("no end-of-image marker")),
        "{err}"
    );
    assert!(!err.contains(" { "), "no debug dumps: {err}");
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 5, "{err}");
    for (line, (name, reason)) in lines.iter().zip([
        ("nope.png", "No such file"),
        ("corrupt.jpg", "cannot decode"),
        ("truncated.png", "cannot decode"),
        ("Cargo.toml", "unrecognised format"),
        ("chunk.png", "critical chunk: ChunkType"),
    ]) {
        assert!(
            line.starts_with("perch: error:") && line.contains(name) && line.contains(reason),
            "{line}"
        );
    }
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["detect", "--model", FIXTURE, "--conf", "1.5", "x.png"][..],
        &["detect", "--model", FIXTURE, "--imgsz", "0", "x.png"],
        &[
            "detect", "--model", FIXTURE, "--layout", "yolo9000", "x.png",
        ],
        &["detect", "--model", FIXTURE],
        &["detect", "--model", FIXTURE, "--max-det", "0", "x.png"],
    ] {
        let out = perch(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
    }
    // Usage errors are one `perch: error:` line naming the argument and the help to read; a
    // negative number is a value out of range, not an unknown flag.
    for (args, what) in [
        (
            &["detect", "--model", FIXTURE, "--conf", "-1", "x.png"][..],
            "'-1' for '--conf",
        ),
        (&["detect", "x.png"], "--model <M.onnx>"),
        (
            &["adapter", "merge", "--model", FIXTURE, "--bogus"],
            "'--bogus'",
        ),
        (&["run", "--model", FIXTURE], "--model and --source"),
    ] {
        let out = perch(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("perch: error: "), "{err}");
        assert!(err.contains(what), "{args:?}: '{what}' not in {err}");
        let help = format!("'perch {} --help'", args[0]);
        let help = help.replace("perch adapter", "perch adapter merge");
        assert!(err.contains(&help), "{args:?}: {err}");
    }
}

/// One vocabulary: `bench --json` and `eval` name the input size `imgsz` and the arithmetic
/// `inference_precision`, an adapter is always `{"name","sha256","scale"}` (scale 1 included),
/// and thresholds print as given.
#[test]
fn reports_share_one_vocabulary() {
    let adapter = "models/adapters/osbs-lora-all.safetensors";
    let model = "models/tree-yolo11n-320.onnx";
    let bench = perch(&[
        "bench",
        "--model",
        model,
        "--adapter",
        adapter,
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let b = &stdout_records(&bench)[0];
    assert_eq!(b["imgsz"], serde_json::json!([320, 320]), "{b}");
    assert_eq!(b["inference_precision"], "f32");
    assert_eq!(b["adapter"]["scale"], 1.0, "{b}");
    assert_eq!(b["adapter"]["sha256"].as_str().unwrap().len(), 64);
    let detect = perch(&[
        "detect",
        "--model",
        model,
        "--adapter",
        adapter,
        "--adapter-scale",
        "0.3",
        "tests/data/osbs_029.png",
    ]);
    let d = &stdout_records(&detect)[0];
    assert_eq!(d["adapter"]["scale"].to_string(), "0.3", "{d}");
    assert_eq!(d["adapter"]["name"], b["adapter"]["name"]);
    assert_eq!(d["adapter"]["sha256"], b["adapter"]["sha256"]);
}

#[test]
fn every_fixture_family_runs_through_the_cli() {
    for (model, extra) in [
        ("v8-dyn-op17.onnx", &["--imgsz", "128,224"][..]),
        ("y11-t160-op13.onnx", &[]),
        ("y26-t160-op18.onnx", &[]),
        ("y26-o2m-t160-op17.onnx", &[]),
        ("v10-t160-op17.onnx", &[]),
        ("v5-t160-op12.onnx", &[]),
        ("yolox-t160-op11.onnx", &[]),
    ] {
        let m = format!("tests/fixtures/{model}");
        let mut args = vec!["detect", "--model", m.as_str(), "--conf", "0.05"];
        args.extend_from_slice(extra);
        args.push("tests/data/coffee.png");
        let out = perch(&args);
        assert_eq!(out.status.code(), Some(0), "{model}: {}", stderr(&out));
        let rec = &stdout_records(&out)[0];
        for d in rec["detections"].as_array().unwrap() {
            let b: Vec<f64> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(
                b[0] >= 0.0 && b[2] <= 600.0 && b[1] >= 0.0 && b[3] <= 400.0,
                "{model}: {b:?}"
            );
        }
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("perch-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The trained demo model: perch detect equals Ultralytics' predictor (onnxruntime backend)
/// on aerial images. Lossless (PNG) input: same classes, boxes within 1 px, scores within 0.01
/// (the bar). JPEG input: within 2 px and 0.02, because the decoders differ
/// (libjpeg-turbo in OpenCV, zune-jpeg here; up to 2 levels per pixel, see the letterbox golden).
/// A dynamic export on non-square photos: by default perch letterboxes as Ultralytics'
/// predictor does for dynamic ONNX models (the smallest stride-aligned rectangle), and
/// `--square` as its `rect=False`. Tolerance 1 px / 0.0005 score (same decoded pixels; this
/// random-weight export scores 0.001-0.007 on the photo).
#[test]
fn dynamic_export_matches_ultralytics_rect_and_square() {
    for (golden, extra) in [
        ("tests/goldens/detect/v8-dyn-op17-rect.json", None),
        (
            "tests/goldens/detect/v8-dyn-op17-square.json",
            Some("--square"),
        ),
    ] {
        let g = json(golden);
        let model = g["model"].as_str().unwrap();
        let mut total = 0;
        for rec in g["records"].as_array().unwrap() {
            let image = rec["image"].as_str().unwrap();
            let conf = rec["conf"].as_f64().unwrap();
            let conf_arg = conf.to_string();
            let mut args = vec!["detect", "--model", model, "--conf", &conf_arg];
            args.extend(extra);
            args.push(image);
            total += matches_predictor_record(&args, rec, conf, (1.0, 0.0005), golden);
        }
        assert!(total >= 20, "{golden}: only {total} detections compared");
    }
}

/// Runs perch with `args` (one image) and checks its record against `rec`, one record of a
/// golden from Ultralytics' predictor: same image size, and every detection scoring above
/// `conf` has a partner within `tol` (pixels, score) both ways. Returns how many were compared.
fn matches_predictor_record(
    args: &[&str],
    rec: &Value,
    conf: f64,
    tol: (f64, f64),
    golden: &str,
) -> usize {
    let out = perch(args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = &stdout_records(&out)[0];
    assert_eq!(
        (&got["width"], &got["height"]),
        (&rec["width"], &rec["height"])
    );
    let (want, have) = (
        rec["detections"].as_array().unwrap(),
        got["detections"].as_array().unwrap(),
    );
    let ctx = format!("{golden} {}", rec["image"].as_str().unwrap());
    let (n, px, ds) = assert_covered(want, have, conf, tol, &format!("{ctx}: golden -> perch"));
    assert_covered(have, want, conf, tol, &format!("{ctx}: perch -> golden"));
    eprintln!(
        "{ctx}: {} reference / {} perch detections, {n} compared, worst {px:.3} px, {ds:.5} score",
        want.len(),
        have.len()
    );
    n
}

#[test]
fn trained_model_matches_ultralytics_predictor() {
    let g = json("tests/goldens/detect/tree-yolo11n-320.json");
    let model = g["model"].as_str().unwrap();
    let conf = g["conf"].as_f64().unwrap();
    let mut total = 0;
    for rec in g["records"].as_array().unwrap() {
        let image = rec["image"].as_str().unwrap();
        let tol = if image.ends_with(".png") {
            (1.0, 0.01)
        } else {
            (2.0, 0.02)
        };
        total += matches_predictor_record(
            &["detect", "--model", model, image],
            rec,
            conf,
            tol,
            "tree-yolo11n-320.json",
        );
    }
    assert!(
        total >= 20,
        "only {total} detections compared: the test would prove little"
    );
}
