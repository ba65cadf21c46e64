//! Adapter files: safetensors + header parsing and validation, then the merge against the base
//! model the demo adapters were made for (seeds: models/adapters).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use perch::adapter::Adapter;
use perch::model::OnnxModel;

fn base() -> &'static OnnxModel {
    static BASE: OnceLock<OnnxModel> = OnceLock::new();
    BASE.get_or_init(|| {
        OnnxModel::from_bytes(include_bytes!("../../models/tree-yolo11n-320.onnx"), "tree.onnx")
            .expect("fixture loads")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = Adapter::from_bytes(data, "fuzz.safetensors") {
        let _ = a.summary();
        let _ = perch::adapter::merge::merged_weights(base(), &a, 1.0);
    }
});
