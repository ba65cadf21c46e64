//! Adapters against Hugging Face PEFT: import, merge math, merged-model outputs, the file
//! format's validation, and the CLI. Goldens from `scripts/make_adapter_goldens.py`.

mod common;

use std::collections::HashMap;

use common::*;
use perch::adapter::merge::{add_lora, apply, merged_weights};
use perch::adapter::peft::{ImportOptions, import};
use perch::adapter::{Adapter, AdapterHeader, StoredDtype, Target, TargetKind};
use perch::image_io::load_rgb;
use perch::model::OnnxModel;
use perch::preprocess::{InputFormat, Letterbox, Placement, letterbox_into};
use perch::tensor::{NamedTensor, WeightUse};
use perch::{Detector, DetectorOptions};

const V8: &str = "tests/fixtures/v8-t160-op11.onnx";

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("perch-adapters-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn name_map(golden: &serde_json::Value) -> HashMap<String, String> {
    serde_json::from_value(json(golden["name_map"].as_str().unwrap())).unwrap()
}

/// Runs a model on a flat NCHW input and returns its first output.
fn run(model: &OnnxModel, dims: [usize; 4], input: &[f32]) -> Vec<f32> {
    let prepared = model.prepare(dims[2], dims[3]).unwrap();
    let mut s = prepared.session().unwrap();
    s.run(input).unwrap().swap_remove(0).data
}

fn assert_close(got: &[f32], want: &[f32], abs: f32, rel: f32, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= abs + rel * b.abs(),
            "{ctx}: value {i}: {a} vs {b}"
        );
    }
}

/// PEFT LoRA (k x k conv, 1x1 conv, Gemm, a MatMul weight renamed by the exporter, rsLoRA with
/// rank/alpha patterns, modules_to_save) imported and merged by perch equals PEFT's own
/// `merge_and_unload`: merged weights within 1e-5 (+1e-5 relative), and the merged model run by
/// tract equals the merged PyTorch model exported to ONNX and run by onnxruntime within 1e-4.
#[test]
fn peft_import_and_merge_match_merge_and_unload() {
    for case in ["tiny-lora", "tiny-rslora"] {
        let g = json(&format!("tests/goldens/adapters/{case}.json"));
        let base = OnnxModel::load(path(g["base"].as_str().unwrap())).unwrap();
        let opts = ImportOptions {
            name_map: name_map(&g),
            ..Default::default()
        };
        let adapter = import(&path(g["peft"].as_str().unwrap()), &base, &opts).unwrap();
        let merged = merged_weights(&base, &adapter, 1.0).unwrap();
        let want = g["merged_weights"].as_object().unwrap();
        for (name, w) in want {
            let Some(got) = merged.iter().find(|t| &t.name == name) else {
                // Untargeted weights must be untouched by the golden too.
                assert_eq!(
                    f32s(&w["data"]),
                    base.weight(name).unwrap().data,
                    "{case}: {name}"
                );
                continue;
            };
            assert_eq!(got.shape, usizes(&w["shape"]), "{case}: {name}");
            assert_close(
                &got.data,
                &f32s(&w["data"]),
                1e-5,
                1e-5,
                &format!("{case}: {name}"),
            );
        }
        let model = apply(&base, &adapter, 1.0).unwrap();
        let out = run(&model, [1, 3, 16, 16], &f32s(&g["input"]));
        assert_close(
            &out,
            &f32s(&g["output_onnxruntime"]),
            1e-4,
            1e-4,
            &format!("{case}: output vs onnxruntime"),
        );
        assert_close(
            &out,
            &f32s(&g["output_torch"]),
            1e-4,
            1e-4,
            &format!("{case}: output vs torch"),
        );

        // Stored as f16 (the default), the adapter still reproduces the output closely.
        let f16 = adapter
            .save(&tmp(&format!("{case}-f16.safetensors")), StoredDtype::F16)
            .unwrap();
        let out16 = run(
            &apply(&base, &f16, 1.0).unwrap(),
            [1, 3, 16, 16],
            &f32s(&g["input"]),
        );
        assert_close(
            &out16,
            &f32s(&g["output_torch"]),
            2e-3,
            2e-3,
            &format!("{case}: f16 adapter"),
        );
    }
}

fn v8_input() -> Vec<f32> {
    let frame = load_rgb(&path("tests/data/chelsea-160.png")).unwrap();
    let lb = Letterbox::new(160, 160, 160, 160, Placement::Center);
    let mut input = vec![0.0; 3 * 160 * 160];
    letterbox_into(&frame, &lb, &InputFormat::ULTRALYTICS, &mut input);
    input
}

fn v8_raw(model: &OnnxModel) -> Vec<f32> {
    let mut det = Detector::new(model, DetectorOptions::default()).unwrap();
    det.run_raw(&v8_input()).unwrap().1
}

/// LoRA on the YOLOv8 fixture's head convs, trained on the fused model: perch's merge run by
/// tract equals the PEFT-merged PyTorch model exported by Ultralytics and run by onnxruntime
/// (1e-3 + 1e-4 relative, the raw-output tolerance).
#[test]
fn yolo_head_lora_matches_the_peft_merged_export() {
    let g = json("tests/goldens/adapters/v8-head-lora.json");
    let base = OnnxModel::load(path(V8)).unwrap();
    let adapter = import(
        &path(g["peft"].as_str().unwrap()),
        &base,
        &ImportOptions::default(),
    )
    .unwrap();
    assert_eq!(adapter.header.targets.len(), 4);
    let merged = v8_raw(&apply(&base, &adapter, 1.0).unwrap());
    let want = f32s(&g["data"]);
    assert_close(&merged, &want, 1e-3, 1e-4, "v8 head LoRA");
    let before = v8_raw(&base);
    let moved = before
        .iter()
        .zip(&want)
        .filter(|(a, b)| (*a - *b).abs() > 1e-2)
        .count();
    assert!(
        moved > 100,
        "the adapter must change the output for this test to mean anything ({moved})"
    );
}

/// A LoRA trained before BatchNorm folding needs the per-channel scale gamma / sqrt(var + eps):
/// with it perch equals the reference export; without it the output is measurably wrong.
#[test]
fn unfused_lora_needs_batchnorm_channel_scales() {
    let g = json("tests/goldens/adapters/v8-unfused-lora.json");
    let dir = path(g["peft"].as_str().unwrap());
    let base = OnnxModel::load(path(V8)).unwrap();
    let bytes = std::fs::read(dir.join("channel_scales.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let channel_scales: HashMap<String, Vec<f32>> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        })
        .collect();
    let want = f32s(&g["data"]);
    let scaled = import(
        &dir,
        &base,
        &ImportOptions {
            channel_scales,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(scaled.header.targets.iter().all(|t| t.channel_scale));
    assert_close(
        &v8_raw(&apply(&base, &scaled, 1.0).unwrap()),
        &want,
        1e-3,
        1e-4,
        "with channel scales",
    );
    // Used on the fly (or by `adapter import` without --channel-scales), the directory's own
    // channel_scales.safetensors is applied, and the identity is the same on every run.
    let auto = Adapter::load_any(&dir, &base).unwrap();
    assert!(auto.header.targets.iter().all(|t| t.channel_scale));
    let weights = std::fs::metadata(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        auto.header.created,
        perch::adapter::rfc3339(weights.modified().unwrap()),
        "dated by the PEFT weights, not the conversion"
    );
    assert_eq!(
        auto.sha256(),
        Adapter::load_any(&dir, &base).unwrap().sha256()
    );
    let unscaled = import(&dir, &base, &ImportOptions::default()).unwrap();
    let wrong = v8_raw(&apply(&base, &unscaled, 1.0).unwrap());
    let worst = wrong
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst > 1e-2,
        "without channel scales the merge should be off, worst diff {worst}"
    );
}

fn tensor(name: &str, shape: &[usize], data: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data,
    }
}

fn lora_header(base: &OnnxModel, target: &str, rank: usize) -> AdapterHeader {
    AdapterHeader {
        format: "perch-adapter".into(),
        version: 1,
        kind: "lora".into(),
        name: "test".into(),
        base_fingerprint: base.fingerprint(),
        targets: vec![Target {
            name: target.into(),
            kind: TargetKind::Lora,
            rank: Some(rank),
            alpha: Some(1.0),
            scale: Some(0.5),
            channel_scale: false,
        }],
        class_names: None,
        producer: "test".into(),
        created: "2026-11-23T00:00:00Z".into(),
        dtype: StoredDtype::F32,
        calibration: None,
    }
}

/// A zero LoRA leaves weights and outputs bit-identical; merging never changes the base; and
/// adding then subtracting the same delta restores the weights within f32 rounding.
#[test]
fn zero_lora_is_identity_and_the_base_is_never_modified() {
    let base = OnnxModel::load(path(V8)).unwrap();
    let target = "model.22.cv3.0.2.weight";
    let w = base.weight(target).unwrap();
    let (out, cols) = (w.shape[0], w.shape[1..].iter().product::<usize>());
    let zero = Adapter::new(
        lora_header(&base, target, 2),
        vec![
            tensor(&format!("{target}.lora_A"), &[2, cols], vec![0.3; 2 * cols]),
            tensor(&format!("{target}.lora_B"), &[out, 2], vec![0.0; 2 * out]),
        ],
        "zero.safetensors",
    )
    .unwrap();
    let merged = apply(&base, &zero, 1.0).unwrap();
    assert_eq!(merged.weight(target).unwrap().data, w.data);
    assert_eq!(
        merged.fingerprint(),
        base.fingerprint(),
        "bit-identical weights"
    );
    assert_eq!(v8_raw(&merged), v8_raw(&base));

    let fp = base.fingerprint();
    let a = tensor(
        "a",
        &[2, cols],
        (0..2 * cols).map(|i| (i as f32 * 0.37).sin()).collect(),
    );
    let b = tensor(
        "b",
        &[out, 2],
        (0..2 * out).map(|i| (i as f32 * 0.11).cos()).collect(),
    );
    let mut x = w.clone();
    let use_ = base.weight_use(target);
    assert_eq!(use_, WeightUse::Conv { group: 1 });
    add_lora(&mut x, use_, &a, &b, 0.7, None).unwrap();
    assert!(x.data.iter().zip(&w.data).any(|(p, q)| p != q));
    add_lora(&mut x, use_, &a, &b, -0.7, None).unwrap();
    assert_close(&x.data, &w.data, 1e-6, 1e-6, "merge then negated merge");
    let _ = apply(&base, &zero, 3.0).unwrap();
    assert_eq!(
        base.fingerprint(),
        fp,
        "applying adapters never touches the base"
    );
}

fn as_refs(v: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<(&str, Vec<usize>, Vec<f32>)> {
    v.iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.clone()))
        .collect()
}

/// Serialises an adapter file by hand, so tests can write what perch itself never would.
fn raw_adapter(header: &serde_json::Value, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.to_string(),
                s.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.as_str(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("perch.adapter".to_string(), header.to_string())]);
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Corrupt, truncated, hostile and mismatched adapters are refused with one clear reason.
#[test]
fn bad_adapters_are_rejected_with_a_reason() {
    let base = OnnxModel::load(path(V8)).unwrap();
    let target = "model.22.cv3.0.2.weight";
    let w = base.weight(target).unwrap();
    let (out, cols) = (w.shape[0], w.shape[1..].iter().product::<usize>());
    let header = serde_json::to_value(lora_header(&base, target, 2)).unwrap();
    let good = vec![
        (
            &*format!("{target}.lora_A"),
            vec![2, cols],
            vec![0.1; 2 * cols],
        ),
        (
            &*format!("{target}.lora_B"),
            vec![out, 2],
            vec![0.1; 2 * out],
        ),
    ]
    .into_iter()
    .map(|(n, s, d)| (n.to_string(), s, d))
    .collect::<Vec<_>>();
    let ok = raw_adapter(&header, &as_refs(&good));
    let x = Adapter::from_bytes(&ok, "good.safetensors").unwrap();
    merged_weights(&base, &x, 1.0).unwrap();
    // A scale that is not finite is refused for the adapter, not blamed on the base model
    // (the command line also refuses finite ones beyond ±10: tests/robustness.rs).
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e = merged_weights(&base, &x, s).unwrap_err().to_string();
        assert!(
            e.contains("good.safetensors") && e.contains("scale"),
            "{s}: {e}"
        );
    }

    let expect = |bytes: &[u8], needle: &str| {
        let e = Adapter::from_bytes(bytes, "bad.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains(needle),
            "expected '{needle}' in: {e}"
        );
    };
    expect(&ok[..ok.len() - 10], "not a safetensors file");
    // A name that would bloat every detection record.
    let mut long = header.clone();
    long["name"] = serde_json::Value::from("n".repeat(100_000));
    expect(&raw_adapter(&long, &as_refs(&good)), "name must be at most");
    expect(b"short", "shorter than a safetensors header");
    expect(
        &std::fs::read(path(V8)).unwrap(),
        "not a perch adapter: not a safetensors file (it looks like an ONNX model",
    );
    let mut huge = ok.clone();
    huge[..8].copy_from_slice(&(50u64 << 20).to_le_bytes());
    expect(&huge, "over the");
    expect(
        &raw_adapter(&serde_json::json!({"x": 1}), &as_refs(&good)),
        "bad header JSON",
    );
    let mut v2 = header.clone();
    v2["version"] = 2.into();
    expect(&raw_adapter(&v2, &as_refs(&good)), "format version 2");
    let mut nan = good.clone();
    nan[1].2[5] = f32::NAN;
    expect(&raw_adapter(&header, &as_refs(&nan)), "non-finite");
    let mut shape = good.clone();
    shape[1].1 = vec![out, 3];
    shape[1].2 = vec![0.0; 3 * out];
    expect(
        &raw_adapter(&header, &as_refs(&shape)),
        "do not agree with rank 2",
    );
    let mut extra = good.clone();
    extra.push(("stray".into(), vec![1], vec![0.0]));
    expect(
        &raw_adapter(&header, &as_refs(&extra)),
        "belongs to no target",
    );
    let bytes = serde_json::to_vec(&serde_json::json!({"__metadata__": {}})).unwrap();
    let mut plain = (bytes.len() as u64).to_le_bytes().to_vec();
    plain.extend(bytes);
    expect(&plain, "not a perch adapter");

    // Well-formed but for another base, or with shapes that do not fit this one.
    let other = OnnxModel::load(path("tests/fixtures/y11-t160-op13.onnx")).unwrap();
    let e = merged_weights(&other, &x, 1.0).unwrap_err().to_string();
    assert!(e.contains("made for base weights"), "{e}");
    let mut wrong_target = header.clone();
    wrong_target["targets"][0]["name"] = "model.22.cv3.0.2.bias".into();
    let renamed: Vec<_> = good
        .iter()
        .map(|(n, s, d)| (n.replace(".weight.", ".bias."), s.clone(), d.clone()))
        .collect();
    let xb = Adapter::from_bytes(
        &raw_adapter(&wrong_target, &as_refs(&renamed)),
        "bias.safetensors",
    )
    .unwrap();
    let e = merged_weights(&base, &xb, 1.0).unwrap_err().to_string();
    assert!(e.contains("not the weight of a Conv"), "{e}");
    let mut names = header.clone();
    names["class_names"] = serde_json::json!(["a", "b"]);
    let xn =
        Adapter::from_bytes(&raw_adapter(&names, &as_refs(&good)), "names.safetensors").unwrap();
    let e = merged_weights(&base, &xn, 1.0).unwrap_err().to_string();
    assert!(e.contains("2 classes, the base has 3"), "{e}");
}

/// The CLI: import -> inspect -> detect --adapter (file and PEFT directory) -> merge; the merged
/// ONNX file gives the same output as the in-process merge; bad adapters exit 2 in one line.
#[test]
fn adapter_cli_round_trip() {
    let x = tmp("head.safetensors");
    let xs = x.to_str().unwrap();
    let out = perch(&[
        "adapter",
        "import",
        "--peft",
        "tests/fixtures/peft/v8-head-lora",
        "--model",
        V8,
        "-o",
        xs,
        "--name",
        "head",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["dtype"], "f16");
    assert_eq!(summary["targets"].as_array().unwrap().len(), 4);
    let base_bytes = std::fs::metadata(path(V8)).unwrap().len();
    assert!(
        summary["bytes"].as_u64().unwrap() * 20 < base_bytes,
        "an adapter is a small fraction of the base"
    );

    let inspect = perch(&["adapter", "inspect", xs, "--model", V8]);
    assert_eq!(inspect.status.code(), Some(0));

    for adapter in [xs, "tests/fixtures/peft/v8-head-lora"] {
        let det = perch(&[
            "detect",
            "--model",
            V8,
            "--adapter",
            adapter,
            "--conf",
            "0.001",
            "tests/data/chelsea.png",
        ]);
        assert_eq!(
            det.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&det.stderr)
        );
        let rec: serde_json::Value = serde_json::from_slice(&det.stdout).unwrap();
        assert!(
            rec["adapter"]["sha256"].as_str().unwrap().len() == 64,
            "{rec}"
        );
    }
    let plain = perch(&["detect", "--model", V8, "tests/data/chelsea.png"]);
    let rec: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(rec.get("adapter").is_none());

    let merged_path = tmp("merged.onnx");
    let m = perch(&[
        "adapter",
        "merge",
        "--model",
        V8,
        "--adapter",
        xs,
        "-o",
        merged_path.to_str().unwrap(),
    ]);
    assert_eq!(
        m.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&m.stderr)
    );
    let base = OnnxModel::load(path(V8)).unwrap();
    let in_process = apply(&base, &Adapter::load(&x).unwrap(), 1.0).unwrap();
    let from_file = OnnxModel::load(&merged_path).unwrap();
    assert_eq!(from_file.fingerprint(), in_process.fingerprint());
    assert_eq!(v8_raw(&from_file), v8_raw(&in_process));

    let bad = tmp("truncated.safetensors");
    let bytes = std::fs::read(&x).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let b = perch(&[
        "detect",
        "--model",
        V8,
        "--adapter",
        bad.to_str().unwrap(),
        "tests/data/chelsea.png",
    ]);
    let err = String::from_utf8_lossy(&b.stderr);
    assert_eq!(b.status.code(), Some(2), "{err}");
    assert!(b.stdout.is_empty());
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("perch: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        err.contains("truncated.safetensors") && err.contains("invalid"),
        "{err}"
    );
    let wrong = perch(&[
        "detect",
        "--model",
        "tests/fixtures/y11-t160-op13.onnx",
        "--adapter",
        xs,
        "tests/data/chelsea.png",
    ]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("made for base weights"));
}

/// A "fine-tuned" copy of the v8 fixture: a rank-1 change of one head conv weight and a changed
/// head bias (plus, on request, a changed frozen-layer weight), saved to a temp file.
fn tuned_copy(file: &str, drift_frozen: bool) -> (OnnxModel, std::path::PathBuf) {
    let base = OnnxModel::load(path(V8)).unwrap();
    let mut w = base.weight("model.22.cv3.0.2.weight").unwrap();
    let (out, cols) = (w.shape[0], w.shape[1..].iter().product::<usize>());
    for o in 0..out {
        for c in 0..cols {
            w.data[o * cols + c] += 0.05 * (o as f32 + 1.0) * ((c as f32) * 0.3).cos();
        }
    }
    let mut b = base.weight("model.22.cv3.0.2.bias").unwrap();
    b.data.iter_mut().for_each(|v| *v += 0.25);
    let mut changed = vec![w, b];
    if drift_frozen {
        let mut f = base.weight("model.0.conv.weight").unwrap();
        f.data[0] += 1e-3;
        changed.push(f);
    }
    let p = tmp(file);
    base.with_weights(&changed, None).unwrap().save(&p).unwrap();
    (OnnxModel::load(&p).unwrap(), p)
}

/// `diff` recovers the fine-tune exactly as replace tensors, and as a LoRA whose rank the
/// energy criterion finds (1 here); it refuses drifted frozen layers, unrelated models and
/// identical ones; and merge refuses an initializer the exporter shared between layers.
#[test]
fn diff_recovers_fine_tunes_and_guards_frozen_layers() {
    use perch::adapter::diff::{Approx, DiffOptions, diff};
    let base = OnnxModel::load(path(V8)).unwrap();
    let (tuned, _) = tuned_copy("tuned.onnx", false);
    let opts = |approx| DiffOptions {
        freeze: Some(22),
        approx,
        name: "ft".into(),
        class_names: None,
    };

    let (replace, report) = diff(&base, &tuned, &opts(Approx::Replace)).unwrap();
    assert_eq!(report.changed.len(), 2, "{report:?}");
    let merged = apply(&base, &replace, 1.0).unwrap();
    assert_eq!(
        merged.fingerprint(),
        tuned.fingerprint(),
        "replace reproduces the tuned weights exactly"
    );

    let (lora, report) = diff(&base, &tuned, &opts(Approx::Energy(0.9999))).unwrap();
    let w = report
        .changed
        .iter()
        .find(|c| c.name == "model.22.cv3.0.2.weight")
        .unwrap();
    assert_eq!((w.kind, w.rank), (TargetKind::Lora, Some(1)), "{w:?}");
    assert!(w.relative_error.unwrap() < 1e-3);
    let saved = lora
        .save(&tmp("ft-lora.safetensors"), StoredDtype::F32)
        .unwrap();
    assert!(saved.file_bytes() < replace.to_bytes(StoredDtype::F32).unwrap().len() as u64);
    assert_close(
        &v8_raw(&apply(&base, &saved, 1.0).unwrap()),
        &v8_raw(&tuned),
        1e-3,
        1e-4,
        "LoRA diff",
    );

    let (drifted, _) = tuned_copy("drifted.onnx", true);
    let e = diff(&base, &drifted, &opts(Approx::Replace))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("frozen layers changed") && e.contains("model.0.conv.weight"),
        "{e}"
    );
    diff(
        &base,
        &drifted,
        &DiffOptions {
            freeze: None,
            ..opts(Approx::Replace)
        },
    )
    .unwrap();

    let e = diff(&base, &base, &opts(Approx::Replace))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no initializer differs"), "{e}");
    let other = OnnxModel::load(path("tests/fixtures/y11-t160-op13.onnx")).unwrap();
    let e = diff(&base, &other, &opts(Approx::Replace))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the same architecture"), "{e}");

    // The exporter shares the Detect box-branch biases (equal at init) between three convs.
    let shared = "model.22.cv2.0.2.bias";
    assert_eq!(base.weight_consumers(shared), 3);
    let mut h = serde_json::to_value(lora_header(&base, shared, 1)).unwrap();
    h["targets"][0] = serde_json::json!({"name": shared, "kind": "replace"});
    let data = base.weight(shared).unwrap().data;
    let x = Adapter::from_bytes(
        &raw_adapter(
            &h,
            &[(&format!("{shared}.replace"), vec![data.len()], data)],
        ),
        "shared.safetensors",
    )
    .unwrap();
    let e = merged_weights(&base, &x, 1.0).unwrap_err().to_string();
    assert!(e.contains("shared by 3 nodes"), "{e}");
}

#[test]
fn diff_cli_reports_per_tensor_error() {
    let (_, tuned) = tuned_copy("tuned-cli.onnx", false);
    let out_file = tmp("cli-diff.safetensors");
    let out = perch(&[
        "adapter",
        "diff",
        "--model",
        V8,
        "--tuned",
        tuned.to_str().unwrap(),
        "--freeze",
        "22",
        "--rank",
        "1",
        "-o",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changed = s["diff"]["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2);
    assert!(changed.iter().any(|c| c["kind"] == "lora"
        && c["rank"] == 1
        && c["relative_error"].as_f64().unwrap() < 1e-3));
    assert!(
        changed.iter().any(|c| c["kind"] == "replace"),
        "a bias cannot be low-rank"
    );
    assert_eq!(s["kind"], "mixed");
}

/// The committed site adapters fit the demo base, change its detections, and never alter the
/// base: running the base after an adapter gives bit-identical outputs (switching back restores
/// base accuracy exactly).
#[test]
fn committed_site_adapters_fit_the_demo_base_and_switching_back_is_exact() {
    let base = OnnxModel::load(path("models/tree-yolo11n-320.onnx")).unwrap();
    let fp = base.fingerprint();
    let frame = load_rgb(&path("tests/data/osbs_029.png")).unwrap();
    let run_frame = |m: &OnnxModel| {
        let mut det = Detector::new(m, DetectorOptions::default()).unwrap();
        let (h, w) = det.input_hw();
        let lb = Letterbox::new(frame.width(), frame.height(), w, h, Placement::Center);
        let mut input = vec![0.0; 3 * h * w];
        letterbox_into(&frame, &lb, &InputFormat::ULTRALYTICS, &mut input);
        det.run_raw(&input).unwrap().1
    };
    let before = run_frame(&base);
    let mut files: Vec<_> = std::fs::read_dir(path("models/adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "site adapters missing: {files:?}");
    for f in files {
        let x = Adapter::load(&f).unwrap();
        // The largest (freeze=10: neck and head) are 28 % of the base; heads and LoRAs 1-8 %.
        assert!(
            x.file_bytes() * 3
                < std::fs::metadata(path("models/tree-yolo11n-320.onnx"))
                    .unwrap()
                    .len()
        );
        let adapted = run_frame(&apply(&base, &x, 1.0).unwrap());
        let changed = adapted
            .iter()
            .zip(&before)
            .filter(|(a, b)| (*a - *b).abs() > 1e-3)
            .count();
        assert!(
            changed > 100,
            "{}: adapter barely changes the output ({changed})",
            f.display()
        );
        assert_eq!(
            run_frame(&base),
            before,
            "{}: base output changed after applying the adapter",
            f.display()
        );
        assert_eq!(base.fingerprint(), fp);
    }
}

/// A prepare that starts from the base's kept decluttered graph (as the service's swaps do)
/// gives bit-identical outputs to a full prepare of the merged model, for LoRA on every conv,
/// replaced head layers and a small LoRA; int8 (whose weight scales feed a `Mul` tract folds)
/// and another input size take the full path and are still identical.
#[test]
fn reused_graph_prepares_match_full_prepares_bit_for_bit() {
    use perch::model::{Calibration, Precision, PrepareOptions};
    let base = OnnxModel::load(path("models/tree-yolo11n-320.onnx")).unwrap();
    let img = load_rgb(&path("tests/data/osbs_029.png")).unwrap();
    let mut input = vec![0f32; 3 * 320 * 320];
    let lb = Letterbox::new(img.width(), img.height(), 320, 320, Placement::Center);
    letterbox_into(&img, &lb, &InputFormat::ULTRALYTICS, &mut input);
    let outputs = |m: &OnnxModel, opts: &PrepareOptions| {
        let p = m.prepare_with(320, 320, opts).unwrap();
        let out = p.session().unwrap().run(&input).unwrap();
        (
            p.graph_reused(),
            out.into_iter().map(|o| o.data).collect::<Vec<_>>(),
        )
    };
    let f32_reuse = PrepareOptions {
        reuse_graph: true,
        ..Default::default()
    };
    let (reused, base_out) = outputs(&base, &f32_reuse);
    assert!(!reused, "the first prepare has nothing to start from");
    for name in ["osbs-lora-all", "osbs-head", "soap-lora"] {
        let adapter = Adapter::load(path(&format!("models/adapters/{name}.safetensors"))).unwrap();
        let merged = apply(&base, &adapter, 1.0).unwrap();
        let (reused, fast) = outputs(&merged, &f32_reuse);
        assert!(
            reused,
            "{name}: the merged model should reuse the base's graph"
        );
        let (_, full) = outputs(&merged, &PrepareOptions::default());
        assert!(
            fast == full,
            "{name}: reused graph output differs from a full prepare"
        );
        assert!(
            fast != base_out,
            "{name}: the adapter must change the output"
        );
    }
    let (reused, again) = outputs(&base, &f32_reuse);
    assert!(reused && again == base_out, "back to the base");

    // A dynamic export: the kept graph is for one input size; another size is a miss and is
    // kept beside it.
    let dyn_base = OnnxModel::load(path("tests/fixtures/tree-yolo11n-dyn.onnx")).unwrap();
    let scaled: Vec<NamedTensor> = dyn_base
        .weight_shapes()
        .into_iter()
        .filter(|(n, s)| s.len() == 4 && n.ends_with("conv.weight") && !n.contains("dfl"))
        .map(|(n, _)| {
            let mut w = dyn_base.weight(&n).unwrap();
            w.data.iter_mut().for_each(|v| *v *= 0.98);
            w
        })
        .collect();
    assert!(scaled.len() > 50, "{}", scaled.len());
    let dyn_merged = dyn_base.with_weights(&scaled, None).unwrap();
    let at = |m: &OnnxModel, h: usize, w: usize, reuse: bool| {
        let opts = PrepareOptions {
            reuse_graph: reuse,
            ..Default::default()
        };
        let p = m.prepare_with(h, w, &opts).unwrap();
        let mut input = vec![0f32; 3 * h * w];
        let lb = Letterbox::new(img.width(), img.height(), w, h, Placement::Center);
        letterbox_into(&img, &lb, &InputFormat::ULTRALYTICS, &mut input);
        let out = p.session().unwrap().run(&input).unwrap();
        (
            p.graph_reused(),
            out.into_iter().map(|o| o.data).collect::<Vec<_>>(),
        )
    };
    assert!(!at(&dyn_base, 320, 320, true).0);
    assert!(!at(&dyn_merged, 256, 320, true).0, "another size is a miss");
    let (reused, fast) = at(&dyn_merged, 320, 320, true);
    assert!(reused, "dynamic: the 320x320 graph is still kept");
    assert!(
        fast == at(&dyn_merged, 320, 320, false).1,
        "dynamic: differs"
    );
    let (reused, fast) = at(&dyn_base, 256, 320, true);
    assert!(reused, "dynamic: the 256x320 graph is kept too");
    assert!(
        fast == at(&dyn_base, 256, 320, false).1,
        "dynamic 256x320: differs"
    );

    let cal = std::sync::Arc::new(
        Calibration::load(&path("models/tree-yolo11n-320.calibration.json")).unwrap(),
    );
    let int8 = PrepareOptions {
        precision: Precision::Int8,
        calibration: Some(cal),
        reuse_graph: true,
        ..Default::default()
    };
    let adapter = Adapter::load(path("models/adapters/osbs-lora-all.safetensors")).unwrap();
    let merged = apply(&base, &adapter, 1.0).unwrap();
    let (_, first) = outputs(&base, &int8);
    let (reused, fast) = outputs(&merged, &int8);
    assert!(!reused, "int8 weights are integers, never swapped");
    let (_, full) = outputs(
        &merged,
        &PrepareOptions {
            reuse_graph: false,
            ..int8.clone()
        },
    );
    assert!(fast == full, "int8: output differs from a full prepare");
    assert!(fast != first);
}

/// Across every detector family in the fixtures, a prepare of changed conv weights that starts
/// from the kept graph gives bit-identical outputs to a full prepare, or does not start from it.
#[test]
fn reused_graphs_are_exact_on_every_fixture_family() {
    use perch::model::PrepareOptions;
    let reuse = PrepareOptions {
        reuse_graph: true,
        ..Default::default()
    };
    let mut hits = Vec::new();
    for file in FAMILIES {
        let base = OnnxModel::load(path(&format!("tests/fixtures/{file}.onnx"))).unwrap();
        let changed: Vec<NamedTensor> = conv_weights(&base)
            .into_iter()
            .filter_map(|n| base.weight(&n).ok())
            .map(|mut w| {
                w.data.iter_mut().for_each(|v| *v = *v * 0.97 + 1e-3);
                w
            })
            .collect();
        assert!(!changed.is_empty(), "{file}");
        let merged = base.with_weights(&changed, None).unwrap();
        let input: Vec<f32> = (0..3 * 160 * 160)
            .map(|i| (i % 251) as f32 / 251.0)
            .collect();
        let run = |m: &OnnxModel, opts: &PrepareOptions| {
            let p = m.prepare_with(160, 160, opts).unwrap();
            let out = p.session().unwrap().run(&input).unwrap();
            (
                p.graph_reused(),
                out.into_iter().map(|o| o.data).collect::<Vec<_>>(),
            )
        };
        let (_, before) = run(&base, &reuse);
        let (reused, fast) = run(&merged, &reuse);
        let (_, full) = run(&merged, &PrepareOptions::default());
        assert!(full != before, "{file}: the change must show");
        assert!(
            fast == full,
            "{file}: reused={reused}, output differs from a full prepare"
        );
        if reused {
            hits.push(file);
        }
    }
    assert!(hits.len() == 8, "reused only on {hits:?}");
}
