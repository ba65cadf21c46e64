//! Annotated JPEG snapshots on a schedule and/or when chosen classes are detected, written
//! atomically by a background thread into a directory kept under a byte quota.
//!
//! Files are named `perch-<capture ms since epoch>-<seq>.jpg`, so name order is time order
//! across restarts; the oldest are deleted first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Instant;

use super::Annotatable;
use crate::config::SnapshotSettings;
use crate::image_io::encode_jpeg;

/// JPEG quality of snapshots.
const QUALITY: u8 = 85;

/// Decides which frames to snapshot and hands them to the writer thread.
pub struct Snapshots {
    settings: SnapshotSettings,
    last: Option<Instant>,
    last_triggered: Option<Instant>,
    tx: Option<SyncSender<Arc<Annotatable>>>,
    writer: Option<JoinHandle<()>>,
    written: Arc<AtomicU64>,
    skipped: u64,
}

impl Snapshots {
    /// Creates the directory and starts the writer.
    pub fn start(settings: SnapshotSettings) -> std::io::Result<Self> {
        std::fs::create_dir_all(&settings.dir)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Annotatable>>(1);
        let written = Arc::new(AtomicU64::new(0));
        let (dir, quota, w) = (settings.dir.clone(), settings.quota_bytes, written.clone());
        let writer = std::thread::Builder::new()
            .name("perch-snapshots".into())
            .spawn(move || {
                for a in rx {
                    match write_snapshot(&dir, &a) {
                        Ok(_) => {
                            w.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = enforce_quota(&dir, quota) {
                                log::warn!("{}: cannot enforce quota: {e}", dir.display());
                            }
                        }
                        Err(e) => log::warn!("{}: snapshot failed: {e}", dir.display()),
                    }
                }
            })?;
        Ok(Snapshots {
            settings,
            last: None,
            last_triggered: None,
            tx: Some(tx),
            writer: Some(writer),
            written,
            skipped: 0,
        })
    }

    /// Whether the frame with these detection labels should be kept, per schedule or trigger.
    /// Updates the schedule when it says yes.
    pub fn wants(&mut self, labels: &[&str], now: Instant) -> bool {
        let s = &self.settings;
        let scheduled = s
            .every
            .is_some_and(|e| self.last.is_none_or(|t| now.duration_since(t) >= e));
        let triggered = labels.iter().any(|l| s.on_classes.iter().any(|c| c == l))
            && self
                .last_triggered
                .is_none_or(|t| now.duration_since(t) >= s.min_gap);
        if triggered {
            self.last_triggered = Some(now);
        }
        if scheduled || triggered {
            self.last = Some(now);
        }
        scheduled || triggered
    }

    /// Queues a frame; skipped (and counted) if the writer is still busy with the previous.
    pub fn submit(&mut self, a: Arc<Annotatable>) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(a)
        {
            self.skipped += 1;
        }
    }

    /// Snapshots written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if self.skipped > 0 {
            log::info!(
                "snapshots: {} skipped while the writer was busy",
                self.skipped
            );
        }
    }
}

fn write_snapshot(dir: &Path, a: &Annotatable) -> Result<PathBuf, String> {
    let jpeg = encode_jpeg(&a.annotated(), QUALITY)?;
    let path = dir.join(format!("perch-{:013}-{:08}.jpg", a.ts_ms, a.seq));
    crate::fsutil::write_atomic(&path, &jpeg).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Deletes the oldest `perch-*.jpg` in `dir` until their total size is at most `quota` bytes.
pub fn enforce_quota(dir: &Path, quota: u64) -> std::io::Result<()> {
    let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("perch-") && n.ends_with(".jpg")
        })
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    for (p, len) in files {
        if total <= quota {
            break;
        }
        std::fs::remove_file(&p)?;
        total -= len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(dir: PathBuf) -> SnapshotSettings {
        SnapshotSettings {
            dir,
            every: Some(Duration::from_secs(10)),
            on_classes: vec!["Tree".into()],
            min_gap: Duration::from_secs(2),
            quota_bytes: 1000,
        }
    }

    #[test]
    fn schedule_and_trigger() {
        let dir = std::env::temp_dir().join(format!("perch-snap-a-{}", std::process::id()));
        let mut s = Snapshots::start(settings(dir.clone())).unwrap();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(s.wants(&[], at(0)), "first scheduled one");
        assert!(!s.wants(&[], at(5_000)));
        assert!(s.wants(&["Tree"], at(5_000)), "trigger");
        assert!(!s.wants(&["Tree"], at(6_000)), "within min gap");
        assert!(!s.wants(&["Car"], at(6_500)), "other class");
        assert!(s.wants(&["Tree"], at(7_100)));
        assert!(
            s.wants(&[], at(17_200)),
            "schedule resumes 10 s after the last one"
        );
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quota_deletes_oldest() {
        let dir = std::env::temp_dir().join(format!("perch-snap-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, n) in [(1, 400), (2, 400), (3, 400)] {
            std::fs::write(dir.join(format!("perch-{i:013}-0.jpg")), vec![0; n]).unwrap();
        }
        std::fs::write(dir.join("keep.txt"), vec![0; 5000]).unwrap();
        enforce_quota(&dir, 1000).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "keep.txt",
                "perch-0000000000002-0.jpg",
                "perch-0000000000003-0.jpg"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
