//! Fan-out of JSON lines to clients of a local UNIX socket.
//!
//! Each subscriber gets its own writer thread and a bounded queue; a subscriber that cannot
//! keep up loses lines (counted), never the publisher's time. Disconnected subscribers are
//! removed on the next line.

use std::io::Write;
use std::os::unix::net::UnixListener;

use crate::server::{accept_until, bind_socket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Lines queued per subscriber before lines are dropped for it.
const QUEUE: usize = 256;
/// Subscribers served at once; more are refused.
pub const MAX_SUBSCRIBERS: usize = 16;

struct Subscriber {
    tx: SyncSender<Arc<str>>,
    alive: Arc<AtomicBool>,
}

/// A listening socket and its current subscribers.
pub struct Subscribers {
    path: PathBuf,
    list: Arc<Mutex<Vec<Subscriber>>>,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Subscribers {
    /// Starts listening at `path`.
    pub fn bind(path: &Path, mode: u32) -> std::io::Result<Self> {
        let listener = bind_socket(path, mode)?;
        let list: Arc<Mutex<Vec<Subscriber>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (list, stop) = (list.clone(), stop.clone());
            std::thread::Builder::new()
                .name("perch-subscribers".into())
                .spawn(move || accept_loop(listener, list, stop))?
        };
        Ok(Subscribers {
            path: path.to_path_buf(),
            list,
            dropped: Arc::default(),
            stop,
            accept: Some(accept),
        })
    }

    /// Queues `line` for every subscriber.
    pub fn publish(&self, line: &str) {
        let line: Arc<str> = Arc::from(line);
        let mut list = self.list.lock().expect("subscriber list lock");
        list.retain(|s| {
            if !s.alive.load(Ordering::Relaxed) {
                return false;
            }
            match s.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Current subscriber count.
    pub fn count(&self) -> usize {
        self.list.lock().expect("subscriber list lock").len()
    }

    /// Lines dropped for slow subscribers so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Dropping the senders ends the writer threads once their queues are flushed.
        self.list.lock().expect("subscriber list lock").clear();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, list: Arc<Mutex<Vec<Subscriber>>>, stop: Arc<AtomicBool>) {
    let accept = || listener.accept().map(|(stream, _)| stream);
    accept_until(&stop, "records socket", accept, |mut stream| {
        let mut l = list.lock().expect("subscriber list lock");
        if l.len() >= MAX_SUBSCRIBERS {
            let _ = stream.write_all(b"{\"error\":\"too many subscribers\"}\n");
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<str>>(QUEUE);
        let alive = Arc::new(AtomicBool::new(true));
        let a = alive.clone();
        let spawned = std::thread::Builder::new()
            .name("perch-subscriber".into())
            .spawn(move || {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                for line in rx {
                    if stream.write_all(line.as_bytes()).is_err()
                        || stream.write_all(b"\n").is_err()
                    {
                        break;
                    }
                }
                a.store(false, Ordering::Relaxed);
            });
        if spawned.is_ok() {
            l.push(Subscriber { tx, alive });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    #[test]
    fn fans_out_and_replaces_stale_sockets() {
        let dir = std::env::temp_dir().join(format!("perch-subs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("records.sock");
        let subs = Subscribers::bind(&p, 0o660).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o660
        );
        assert!(
            bind_socket(&p, 0o660).is_err(),
            "a live socket must not be stolen"
        );
        let a = UnixStream::connect(&p).unwrap();
        let b = UnixStream::connect(&p).unwrap();
        while subs.count() < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        subs.publish("{\"seq\":1}");
        drop(b);
        subs.publish("{\"seq\":2}");
        let mut lines = BufReader::new(a).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "{\"seq\":1}");
        assert_eq!(lines.next().unwrap().unwrap(), "{\"seq\":2}");
        drop(subs);
        assert!(!p.exists());
        // A stale socket file left by a crash is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(stale);
        let subs = Subscribers::bind(&p, 0o600).unwrap();
        drop(subs);
        std::fs::write(&p, b"x").unwrap();
        assert!(
            bind_socket(&p, 0o660).is_err(),
            "a regular file must not be replaced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
