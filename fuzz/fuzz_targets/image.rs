//! JPEG/PNG decoding with perch's size limits.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = perch::image_io::decode_rgb(data, std::path::Path::new("fuzz.img"));
});
