//! Pieces shared by perch's socket servers (control, record subscribers, HTTP): binding a
//! UNIX socket safely, a stoppable accept loop, and connection threads with a limit.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Binds a UNIX socket at `path` with file mode `mode`, replacing a stale socket file (one
/// nobody listens on) and refusing a live one or a non-socket file.
pub fn bind_socket(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::other("exists and is not a socket"));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::other("another process is listening on it"));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Calls `accept` (on a non-blocking listener) until `stop` is raised, handing each connection
/// to `on_conn`; sleeps briefly when none is pending. `what` names the listener in logs.
pub fn accept_until<C>(
    stop: &AtomicBool,
    what: &str,
    mut accept: impl FnMut() -> std::io::Result<C>,
    mut on_conn: impl FnMut(C),
) {
    while !stop.load(Ordering::Relaxed) {
        match accept() {
            Ok(c) => on_conn(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                log::warn!("{what}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Connection threads, at most `max` running at once.
pub struct Workers {
    name: &'static str,
    max: usize,
    active: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Threads will be named `name`.
    pub fn new(name: &'static str, max: usize) -> Self {
        Workers {
            name,
            max,
            active: Arc::default(),
            handles: Vec::new(),
        }
    }

    /// Whether another connection may be served now.
    pub fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.max
    }

    /// Runs `serve` on a new thread (the caller checked [`Workers::has_room`]).
    pub fn spawn(&mut self, serve: impl FnOnce() + Send + 'static) {
        self.handles.retain(|h| !h.is_finished());
        self.active.fetch_add(1, Ordering::Relaxed);
        let active = self.active.clone();
        let spawned = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                serve();
                active.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(h) => self.handles.push(h),
            Err(e) => {
                self.active.fetch_sub(1, Ordering::Relaxed);
                log::warn!("{}: cannot start a thread: {e}", self.name);
            }
        }
    }

    /// Waits for every connection thread to end.
    pub fn join_all(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}
