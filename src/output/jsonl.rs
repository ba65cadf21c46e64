//! A JSON-lines file rotated by size: `out.jsonl` is renamed to `out.jsonl.1` (and `.1` to
//! `.2`, ...) when the next line would take it past the limit; the oldest beyond `keep` is
//! deleted. Lines are never split across files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An append-only line file with size-based rotation.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl RotatingFile {
    /// Opens `path` for appending (creating it and its directory).
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends `line` and a newline, rotating first if the file would exceed its limit.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let n = line.len() as u64 + 1;
        if self.size > 0 && self.size + n > self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += n;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            self.file = File::create(&self.path)?;
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, self.keep));
            for i in (1..self.keep).rev() {
                let from = rotated(&self.path, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, i + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_keeping_whole_lines() {
        let dir = std::env::temp_dir().join(format!("perch-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("sub/out.jsonl");
        let mut f = RotatingFile::open(&p, 25, 2).unwrap();
        for i in 0..10 {
            f.write_line(&format!("line-{i:04}")).unwrap(); // 10 bytes each
        }
        drop(f);
        let read = |q: &Path| std::fs::read_to_string(q).unwrap();
        assert_eq!(read(&p), "line-0008\nline-0009\n");
        assert_eq!(read(&rotated(&p, 1)), "line-0006\nline-0007\n");
        assert_eq!(read(&rotated(&p, 2)), "line-0004\nline-0005\n");
        assert!(!rotated(&p, 3).exists());
        // Reopening appends and keeps counting the existing size.
        let mut f = RotatingFile::open(&p, 25, 2).unwrap();
        f.write_line("line-0010").unwrap();
        assert_eq!(read(&p), "line-0010\n");
        assert_eq!(read(&rotated(&p, 1)), "line-0008\nline-0009\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
