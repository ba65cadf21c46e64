//! Small filesystem helpers shared by the readers and writers.

use std::io::{Read, Write};
use std::path::Path;

/// The most bytes perch reads from a text file it takes whole (configuration, labels, dataset
/// YAML, calibration, PEFT config): 16 MiB.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// The most bytes perch reads from a model file (ONNX): 2 GiB, protobuf's own limit.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// The most bytes perch reads from an adapter file outside a store (whose own limit applies
/// inside it): 1 GiB.
pub const MAX_ADAPTER_BYTES: u64 = 1 << 30;

/// Reads all of `path`, failing with `InvalidData` ("larger than N bytes") instead of reading
/// on when it holds more than `max` bytes (a device such as `/dev/zero`, a wrong file). Reads at
/// most `max + 1` bytes.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let hint = f.metadata().map(|m| m.len()).unwrap_or(0).min(max);
    let mut bytes = Vec::with_capacity(hint as usize);
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// [`read_limited`] to [`MAX_TEXT_BYTES`], as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, MAX_TEXT_BYTES)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod read_tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_limit() {
        let e = read_limited(Path::new("/dev/zero"), 1000).unwrap_err();
        assert_eq!(e.to_string(), "larger than 1000 bytes");
        let e = read_text(Path::new("/dev/urandom")).unwrap_err();
        assert!(e.to_string().contains("larger than") || e.to_string().contains("UTF-8"));
        assert_eq!(
            read_limited(Path::new("Cargo.toml"), 1 << 20).unwrap(),
            std::fs::read("Cargo.toml").unwrap()
        );
    }
}
