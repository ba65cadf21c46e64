//! Several task adapters on one frozen trunk: each task of the shared graph must equal its
//! adapter run alone (scores and boxes within 1e-5), on the demo model with the committed site
//! adapters and on every detector family of the fixtures; one adapter must give today's model;
//! the CLI's multi-task records and reports must hold each adapter's own results.

mod common;

use std::borrow::Cow;

use common::*;
use perch::adapter::Adapter;
use perch::adapter::merge::apply;
use perch::config::ModelSettings;
use perch::engine::{EngineBuilder, InputSize};
use perch::image_io::load_rgb;
use perch::model::{ModelError, OnnxModel, Precision};
use perch::tensor::NamedTensor;
use perch::{Detection, Detector, DetectorOptions, PostprocessParams};

const DEMO: &str = "models/tree-yolo11n-320.onnx";

fn adapter(name: &str) -> Adapter {
    Adapter::load(path(&format!("models/adapters/{name}.safetensors"))).unwrap()
}

/// Every output of `model` on `input`, per output.
fn outputs(model: &OnnxModel, hw: (usize, usize), input: &[f32]) -> Vec<Vec<f32>> {
    let p = model.prepare(hw.0, hw.1).unwrap();
    let out = p.session().unwrap().run(input).unwrap();
    out.into_iter().map(|o| o.data).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{ctx}: worst difference {worst} > {tol}");
}

/// The same detections: count, classes, scores within 1e-5 and boxes within 1e-5 relative to
/// max(1, |coordinate|).
fn assert_same_detections(got: &[Detection], want: &[Detection], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: detection count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.class_id, w.class_id, "{ctx}");
        assert!(
            (g.score - w.score).abs() <= 1e-5,
            "{ctx}: score {} vs {}",
            g.score,
            w.score
        );
        for (a, b) in g.bbox.iter().zip(&w.bbox) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{ctx}: box {:?} vs {:?}",
                g.bbox,
                w.bbox
            );
        }
    }
}

/// Checks that each task's outputs of the shared graph built from `tasks` equal the outputs of
/// that task's model alone (differences relative to max(1, |value|) within 1e-5).
fn assert_tasks_match(
    base: &OnnxModel,
    tasks: &[(String, OnnxModel)],
    hw: (usize, usize),
    ctx: &str,
) {
    let refs: Vec<(String, &OnnxModel)> = tasks.iter().map(|(n, m)| (n.clone(), m)).collect();
    let (shared, split) = base.shared_trunk(&refs).unwrap();
    assert_eq!(shared.tasks().len(), tasks.len(), "{ctx}");
    assert!(
        split.nodes < tasks.len() * split.base_nodes || split.shared_nodes == 0,
        "{ctx}: {split:?}"
    );
    let input: Vec<f32> = (0..3 * hw.0 * hw.1)
        .map(|i| (i % 253) as f32 / 253.0)
        .collect();
    let all = outputs(&shared, hw, &input);
    let per_task = base.output_names().len();
    assert_eq!(all.len(), per_task * tasks.len(), "{ctx}: output count");
    let firsts: Vec<&Vec<f32>> = shared
        .tasks()
        .iter()
        .map(|t| &all[t.outputs.start])
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] != w[1]),
        "{ctx}: the tasks must differ"
    );
    for ((name, m), info) in tasks.iter().zip(shared.tasks()) {
        assert_eq!(&info.name, name);
        let alone = outputs(m, hw, &input);
        for (i, want) in alone.iter().enumerate() {
            assert_close(
                &all[info.outputs.start + i],
                want,
                1e-5,
                &format!("{ctx}: task {name} output {i}"),
            );
        }
    }
}

/// The committed site adapters as tasks of the demo model: head replacements (freeze=23), a
/// head-only LoRA and LoRA on every conv, together; the freeze-23 pair shares everything but the
/// Detect head, and a task that changes the backbone shares nothing with the others but they
/// still share the base's layers among themselves.
#[test]
fn demo_tasks_equal_each_adapter_alone() {
    let base = OnnxModel::load(path(DEMO)).unwrap();
    let merged = |n: &str| (n.to_string(), apply(&base, &adapter(n), 1.0).unwrap());
    let heads = [merged("osbs-head"), merged("soap-head")];
    let refs: Vec<(String, &OnnxModel)> = heads.iter().map(|(n, m)| (n.clone(), m)).collect();
    let (_, split) = base.shared_trunk(&refs).unwrap();
    assert_eq!(
        split.nodes - split.shared_nodes,
        2 * (split.base_nodes - split.shared_nodes)
    );
    assert!(
        split.shared_nodes * 10 > split.base_nodes * 6,
        "freeze-23 heads should share the backbone and neck: {split:?}"
    );
    assert!(split.weights < split.base_weights * 13 / 10, "{split:?}");

    let mixed = [
        merged("osbs-head"),
        merged("soap-lora-all"),
        merged("soap-head"),
        merged("osbs-lora"),
    ];
    let refs: Vec<(String, &OnnxModel)> = mixed.iter().map(|(n, m)| (n.clone(), m)).collect();
    let (_, split) = base.shared_trunk(&refs).unwrap();
    assert_eq!(
        split.shared_nodes, 0,
        "LoRA on every conv shares nothing: {split:?}"
    );
    assert!(
        split.nodes < 3 * split.base_nodes,
        "the three head tasks share the base's layers: {split:?}"
    );
    assert_tasks_match(&base, &mixed, (320, 320), "demo");

    // Through the detector: each task's detections equal the adapter's own detector's.
    let refs: Vec<(String, &OnnxModel)> = mixed.iter().map(|(n, m)| (n.clone(), m)).collect();
    let (shared, _) = base.shared_trunk(&refs).unwrap();
    let low = DetectorOptions {
        params: PostprocessParams {
            conf: 0.01,
            ..Default::default()
        },
        ..Default::default()
    };
    let frame = load_rgb(&path("tests/data/osbs_029.png")).unwrap();
    let mut det = Detector::new(&shared, low.clone()).unwrap();
    let names: Vec<Option<&str>> = det.task_names();
    assert_eq!(
        names,
        vec![
            Some("osbs-head"),
            Some("soap-lora-all"),
            Some("soap-head"),
            Some("osbs-lora")
        ]
    );
    let (found, _) = det.detect_tasks(&frame).unwrap();
    for ((name, m), got) in mixed.iter().zip(&found) {
        let (want, _) = Detector::new(m, low.clone())
            .unwrap()
            .detect(&frame)
            .unwrap();
        assert!(want.len() > 10, "{name}: {}", want.len());
        assert_same_detections(got.as_ref().unwrap(), &want, name);
    }
}

/// Two synthetic tasks per detector family (one changing only the last convolutions, one also
/// a convolution halfway through the graph): each task of the shared graph equals its model
/// alone, on static, dynamic, NMS-free and anchor-free exports.
#[test]
fn every_fixture_family_splits_exactly() {
    for file in FAMILIES {
        let base = OnnxModel::load(path(&format!("tests/fixtures/{file}.onnx"))).unwrap();
        let convs = conv_weights(&base);
        assert!(convs.len() > 6, "{file}: {}", convs.len());
        let change = |names: &[&String], f: f32| -> OnnxModel {
            let ws: Vec<NamedTensor> = names
                .iter()
                .map(|n| {
                    let mut w = base.weight(n).unwrap();
                    w.data.iter_mut().for_each(|v| *v = *v * f + 1e-3);
                    w
                })
                .collect();
            base.with_weights(&ws, None).unwrap()
        };
        let last: Vec<&String> = convs.iter().rev().take(3).collect();
        let mid: Vec<&String> = last
            .iter()
            .copied()
            .chain([&convs[convs.len() / 2]])
            .collect();
        let tasks = [
            ("head".to_string(), change(&last, 0.97)),
            ("mid".to_string(), change(&mid, 1.02)),
        ];
        assert_tasks_match(&base, &tasks, (160, 160), file);
    }
}

fn settings(precision: Precision) -> ModelSettings {
    ModelSettings {
        params: PostprocessParams {
            conf: 0.01,
            ..Default::default()
        },
        precision,
        ..ModelSettings::new(path(DEMO))
    }
}

/// One adapter through `merged_tasks` is exactly today's merged model, none is the base itself;
/// int8 tasks (each task's ranges combined) equal each adapter's int8 model alone.
#[test]
fn one_task_is_todays_model_and_int8_tasks_match() {
    let builder = EngineBuilder::load(&settings(Precision::F32)).unwrap();
    let osbs = adapter("osbs-lora-all");
    assert!(matches!(
        builder.merged_tasks(&[], None).unwrap(),
        Cow::Borrowed(_)
    ));
    let one = builder.merged_tasks(&[(&osbs, 1.0)], None).unwrap();
    assert!(one.tasks().is_empty());
    assert_eq!(
        one.to_bytes(),
        apply(builder.base(), &osbs, 1.0).unwrap().to_bytes()
    );

    let builder = EngineBuilder::load(&settings(Precision::Int8)).unwrap();
    let soap = adapter("soap-head");
    let tasks = [(&osbs, 1.0), (&soap, 1.0)];
    let shared = builder.merged_tasks(&tasks, None).unwrap();
    let frame = load_rgb(&path("tests/data/osbs_029.png")).unwrap();
    let mut det = builder
        .tasks_detector(&shared, &[&osbs, &soap], InputSize::Configured, None)
        .unwrap();
    assert_eq!(det.prepared().precision(), Precision::Int8);
    let (found, _) = det.detect_tasks(&frame).unwrap();
    for (x, got) in [&osbs, &soap].into_iter().zip(&found) {
        let m = builder.merged(Some((x, 1.0)), None).unwrap();
        let mut alone = builder
            .detector(&m, Some(x), InputSize::Configured, None)
            .unwrap();
        let (want, _) = alone.detect(&frame).unwrap();
        let name = &x.header.name;
        assert!(want.len() > 5, "{name}");
        assert_same_detections(got.as_ref().unwrap(), &want, &format!("{name} (int8)"));
    }
}

/// A single task, a model that is not the base with other weights, and a multi-task model as a
/// base are refused with a reason; nothing is prepared.
#[test]
fn bad_task_sets_are_refused() {
    let base = OnnxModel::load(path(DEMO)).unwrap();
    let osbs = apply(&base, &adapter("osbs-head"), 1.0).unwrap();
    let other = OnnxModel::load(path("tests/fixtures/y11-t160-op13.onnx")).unwrap();
    let err = |r: Result<(OnnxModel, perch::model::TrunkSplit), ModelError>| match r {
        Err(ModelError::Unsupported { reason, .. }) => reason,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("accepted"),
    };
    let e = err(base.shared_trunk(&[("osbs".into(), &osbs)]));
    assert!(e.contains("at least two tasks"), "{e}");
    let e = err(base.shared_trunk(&[("osbs".into(), &osbs), ("y11".into(), &other)]));
    assert!(
        e.contains("task 'y11'") && e.contains("not this model"),
        "{e}"
    );
    let (shared, _) = base
        .shared_trunk(&[("a".into(), &osbs), ("b".into(), &base)])
        .unwrap();
    let e = err(shared.shared_trunk(&[("a".into(), &osbs), ("b".into(), &base)]));
    assert!(e.contains("already a multi-task model"), "{e}");
}

/// `perch detect` on the demo model with `adapters` (in order) at conf 0.05 on `img`.
fn detect_with(adapters: &[&str], img: &str) -> std::process::Output {
    let mut args = vec!["detect", "--model", DEMO, "--conf", "0.05"];
    for x in adapters {
        args.extend(["--adapter", x]);
    }
    args.push(img);
    perch(&args)
}

fn stdout_json(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    records(&String::from_utf8_lossy(&out.stdout))
}

/// `perch detect` and `perch eval` with two adapters: one record per image with one `tasks`
/// entry per adapter, equal to each adapter's own run (records: within 1e-5; eval: the same
/// metrics); the same adapter twice and `calibrate` with two are one-line errors (exit 2).
#[test]
fn cli_runs_tasks_and_reports_each() {
    let a = "models/adapters/osbs-head.safetensors";
    let b = "models/adapters/soap-lora-all.safetensors";
    let img = "tests/data/osbs_029.png";
    let detect = |adapters: &[&str]| stdout_json(&detect_with(adapters, img)).swap_remove(0);
    let r = detect(&[a, b]);
    assert!(
        r.get("detections").is_none() && r.get("adapter").is_none(),
        "{r}"
    );
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for (t, file) in tasks.iter().zip([a, b]) {
        let alone = &detect(&[file]);
        assert_eq!(t["adapter"], alone["adapter"]);
        assert_eq!(t["task"], alone["adapter"]["name"]);
        let (g, w) = (
            t["detections"].as_array().unwrap(),
            alone["detections"].as_array().unwrap(),
        );
        assert_eq!(g.len(), w.len(), "{file}");
        for (g, w) in g.iter().zip(w) {
            assert_eq!(g["label"], w["label"]);
            assert!((g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() <= 1e-5);
            for (x, y) in f32s(&g["box"]).iter().zip(f32s(&w["box"])) {
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{file}: {g} vs {w}"
                );
            }
        }
    }
    let eval = |adapters: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            DEMO,
            "--data",
            "tests/data/eval/data.yaml",
        ];
        for x in adapters {
            args.extend(["--adapter", x]);
        }
        stdout_json(&perch(&args)).swap_remove(0)
    };
    let both = eval(&[a, b]);
    let tasks = both["tasks"].as_array().unwrap();
    for (t, file) in tasks.iter().zip([a, b]) {
        let alone = &eval(&[file]);
        for key in ["map50", "map50_95", "precision", "recall", "instances"] {
            let (x, y) = (t[key].as_f64().unwrap(), alone[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-6, "{file}: {key} {x} vs {y}");
        }
    }

    for args in [
        vec![
            "detect",
            "--model",
            DEMO,
            "--adapter",
            a,
            "--adapter",
            a,
            img,
        ],
        vec![
            "calibrate",
            "--model",
            DEMO,
            "--adapter",
            a,
            "--adapter",
            b,
            "--images",
            img,
            "-o",
            "/dev/null",
        ],
    ] {
        let out = perch(&args);
        let err = error_lines(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err:?}");
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(
            err[0].contains("twice") || err[0].contains("one adapter at a time"),
            "{err:?}"
        );
    }
}

/// Shared-trunk graphs are never kept for reuse (their shape depends on which weights each
/// task changes): every prepare is a full one, and the base's kept graph is not pushed out.
#[test]
fn task_sets_take_the_full_prepare() {
    let base = OnnxModel::load(path(DEMO)).unwrap();
    let merged = |n: &str| (n.to_string(), apply(&base, &adapter(n), 1.0).unwrap());
    let (a, b) = (merged("osbs-head"), merged("soap-head"));
    let shared = |x: &(String, OnnxModel), y: &(String, OnnxModel)| {
        base.shared_trunk(&[(x.0.clone(), &x.1), (y.0.clone(), &y.1)])
            .unwrap()
            .0
    };
    let reuse = perch::model::PrepareOptions {
        reuse_graph: true,
        ..Default::default()
    };
    let reused = |m: &OnnxModel| m.prepare_with(320, 320, &reuse).unwrap().graph_reused();
    assert!(!reused(&base));
    assert!(!reused(&shared(&a, &b)));
    assert!(!reused(&shared(&a, &b)), "a task set is never kept");
    assert!(reused(&a.1), "single adapters still reuse the base's graph");
}

/// A task whose output overflows fails alone: `perch detect` prints the record with that
/// task's `error` and the other task's detections (equal to its adapter alone), then one error
/// line naming the image and the task (exit 2).
#[test]
fn a_failing_task_fails_alone() {
    let dir = std::env::temp_dir().join(format!("perch-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("overflow.safetensors");
    let good = "models/adapters/osbs-head.safetensors";
    std::fs::write(
        &bad,
        overflowing(&std::fs::read(path("models/adapters/soap-lora.safetensors")).unwrap()),
    )
    .unwrap();
    let img = "tests/data/osbs_029.png";
    let args = |adapters: &[&str]| detect_with(adapters, img);
    let out = args(&[good, bad.to_str().unwrap()]);
    let err = error_lines(&out);
    assert_eq!(out.status.code(), Some(2), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("task 'soap-lora'") && err[0].contains("non-finite"),
        "{err:?}"
    );
    let rec = &records(&String::from_utf8_lossy(&out.stdout))[0];
    let tasks = rec["tasks"].as_array().unwrap();
    assert!(tasks[0].get("error").is_none(), "{rec}");
    assert!(
        tasks[1]["error"].as_str().unwrap().contains("non-finite"),
        "{rec}"
    );
    assert!(tasks[1]["detections"].as_array().unwrap().is_empty());
    let alone = &stdout_json(&args(&[good]))[0];
    assert_eq!(tasks[0]["detections"], alone["detections"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
