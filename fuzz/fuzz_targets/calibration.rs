//! Calibration JSON as `Calibration::load` reads it: parse, then validate.
#![no_main]
use libfuzzer_sys::fuzz_target;
use perch::model::Calibration;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<Calibration>(data) {
        let _ = c.validate();
    }
});
