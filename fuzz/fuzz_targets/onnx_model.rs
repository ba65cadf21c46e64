//! ONNX model loading (protobuf decode, graph checks, metadata) and output-layout inference.
#![no_main]
use libfuzzer_sys::fuzz_target;
use perch::model::OnnxModel;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = OnnxModel::from_bytes(data, "fuzz.onnx") {
        let _ = m.metadata();
        let _ = m.input_shape();
        let _ = m.fingerprint();
    }
    // Layout inference on shapes taken from the bytes: rank 1..=4, dims up to 2^16.
    let dims: Vec<usize> = data
        .chunks(2)
        .take(4)
        .map(|c| c.iter().fold(0usize, |a, &b| (a << 8) | b as usize))
        .collect();
    let classes = data.get(8).map(|&b| b as usize);
    let end2end = data.get(9).map(|&b| b & 1 == 1);
    let _ = perch::postprocess::infer_layout(&[dims], (640, 640), classes, end2end, None);
});
