//! The TOML configuration: parse and validate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = perch::config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
