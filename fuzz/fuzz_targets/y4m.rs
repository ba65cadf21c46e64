//! YUV4MPEG2 streams: the header parser, then a whole stream read as a source (up to 4
//! frames) from a file holding the input.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use perch::camera::FrameSource;
use perch::camera::y4m::{Y4mSource, parse_header};

fn file() -> &'static PathBuf {
    static F: OnceLock<PathBuf> = OnceLock::new();
    F.get_or_init(|| std::env::temp_dir().join(format!("perch-fuzz-{}.y4m", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    if let Some(line) = data.split(|&b| b == b'\n').next()
        && let Ok(text) = std::str::from_utf8(line)
    {
        let _ = parse_header(text);
    }
    std::fs::write(file(), data).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    if let Ok(mut s) = Y4mSource::open(file(), false, Duration::from_millis(50), stop) {
        for _ in 0..4 {
            match s.next_frame() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
});
