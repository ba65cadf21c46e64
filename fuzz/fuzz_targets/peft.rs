//! PEFT import: `adapter_config.json` and `adapter_model.safetensors` (the input split at its
//! first NUL byte), imported against the tiny PEFT fixture base.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use perch::model::OnnxModel;

fn base() -> &'static OnnxModel {
    static BASE: OnceLock<OnnxModel> = OnceLock::new();
    BASE.get_or_init(|| {
        OnnxModel::from_bytes(include_bytes!("../../tests/fixtures/peft/tiny-base.onnx"), "tiny.onnx")
            .expect("fixture loads")
    })
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("perch-fuzz-peft-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let (cfg, st) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let d = dir();
    std::fs::write(d.join("adapter_config.json"), cfg).unwrap();
    std::fs::write(d.join("adapter_model.safetensors"), st).unwrap();
    let _ = perch::adapter::peft::import(d, base(), &Default::default());
});
