//! Several task adapters on one frozen trunk against one model per task.
//!
//! For each adapter family (freeze-23 heads, freeze-10 necks and heads, LoRA on every conv) and
//! K = 1, 2, 3 tasks, prints per-frame time (letterbox + inference + decode of every task) of
//! the shared graph, of one model alone and of K separate models run one after the other, with
//! the ratios, plus the nodes and weights each way holds. Rounds alternate between the shared
//! graph and the separate models so that a noisy host hits both alike.
//!
//! `cargo bench --bench tasks` (env: `PERCH_TASK_ROUNDS`, default 40; `PERCH_TASK_THREADS`,
//! default 1).

mod common;

use std::time::Instant;

use common::{cpu, env_or, pct, root};
use perch::adapter::Adapter;
use perch::adapter::merge::apply;
use perch::config::ModelSettings;
use perch::engine::{EngineBuilder, InputSize};
use perch::image_io::load_rgb;
use perch::model::OnnxModel;
use perch::{Detector, RgbFrame};

fn frame_ms(det: &mut Detector, frame: &RgbFrame) -> f64 {
    let t = Instant::now();
    det.detect_all(frame).expect("every task detects");
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let rounds: usize = env_or("PERCH_TASK_ROUNDS", 40);
    let threads: usize = env_or("PERCH_TASK_THREADS", 1);
    let settings = ModelSettings {
        threads,
        ..ModelSettings::new(root().join("models/tree-yolo11n-320.onnx"))
    };
    let builder = EngineBuilder::load(&settings).expect("base model");
    let base: &OnnxModel = builder.base();
    let frame = load_rgb(&root().join("tests/data/osbs_029.png")).expect("image");
    let adapter = |n: &str| {
        let p = root().join(format!("models/adapters/{n}.safetensors"));
        p.exists().then(|| Adapter::load(&p).expect("adapter"))
    };
    println!(
        "tasks on one trunk: {} at 320x320, f32, {threads} thread(s), {rounds} alternating rounds; CPU {}",
        settings.path.display(),
        cpu()
    );
    let families: [(&str, &[&str]); 3] = [
        ("freeze-23 heads", &["osbs-head", "soap-head", "osbs-lora"]),
        (
            "freeze-10 (neck+head)",
            &["osbs-neck", "soap-neck", "osbs-head"],
        ),
        ("LoRA on every conv", &["osbs-lora-all", "soap-lora-all"]),
    ];
    println!(
        "{:<22} {:>2} {:>10} {:>10} {:>12} {:>9} {:>11} {:>13} {:>15}",
        "family",
        "K",
        "shared ms",
        "one ms",
        "separate ms",
        "vs one",
        "vs separate",
        "nodes run",
        "weights held"
    );
    for (family, names) in families {
        let adapters: Vec<Adapter> = names.iter().map_while(|n| adapter(n)).collect();
        if adapters.len() < names.len().min(2) {
            println!("{family:<22} skipped: adapters {names:?} not all present");
            continue;
        }
        let mut singles: Vec<Detector> = adapters
            .iter()
            .map(|x| {
                let m = apply(base, x, 1.0).expect("merge");
                builder
                    .detector(&m, Some(x), InputSize::Configured, None)
                    .expect("detector")
            })
            .collect();
        for k in 1..=adapters.len() {
            let tasks: Vec<(&Adapter, f32)> = adapters[..k].iter().map(|x| (x, 1.0)).collect();
            let refs: Vec<&Adapter> = adapters[..k].iter().collect();
            let model = builder.merged_tasks(&tasks, None).expect("shared model");
            let (nodes, weights) = if k > 1 {
                let merged: Vec<(String, OnnxModel)> = adapters[..k]
                    .iter()
                    .map(|x| (x.header.name.clone(), apply(base, x, 1.0).expect("merge")))
                    .collect();
                let r: Vec<(String, &OnnxModel)> =
                    merged.iter().map(|(n, m)| (n.clone(), m)).collect();
                let (_, s) = base.shared_trunk(&r).expect("split");
                (
                    format!("{}/{}", s.nodes, k * s.base_nodes),
                    format!(
                        "{:.1}/{:.1} MB",
                        s.weights as f64 * 4e-6,
                        (k * s.base_weights) as f64 * 4e-6
                    ),
                )
            } else {
                ("-".into(), "-".into())
            };
            let mut shared = builder
                .tasks_detector(&model, &refs, InputSize::Configured, None)
                .expect("shared detector");
            for _ in 0..3 {
                frame_ms(&mut shared, &frame);
                for s in singles.iter_mut().take(k) {
                    frame_ms(s, &frame);
                }
            }
            let (mut t_shared, mut t_one, mut t_sep) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                t_shared.push(frame_ms(&mut shared, &frame));
                let each: Vec<f64> = singles
                    .iter_mut()
                    .take(k)
                    .map(|s| frame_ms(s, &frame))
                    .collect();
                t_one.push(each[0]);
                t_sep.push(each.iter().sum());
            }
            let (s, o, p) = (pct(&t_shared, 0.5), pct(&t_one, 0.5), pct(&t_sep, 0.5));
            println!(
                "{family:<22} {k:>2} {s:>10.2} {o:>10.2} {p:>12.2} {:>8.3}x {:>10.3}x {nodes:>13} {weights:>15}",
                s / o,
                s / p
            );
        }
    }
    println!(
        "(ms: p50 per frame; 'vs one' = shared / one model; 'vs separate' = shared / K models one after the other)"
    );
}
