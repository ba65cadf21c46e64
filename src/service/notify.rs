//! systemd notification (`sd_notify`): READY after the first processed frame, WATCHDOG while
//! the pipeline is alive, STATUS lines, STOPPING and RELOADING. A no-op outside systemd
//! (no `NOTIFY_SOCKET`).
//!
//! The watchdog is fed only by the inference loop finishing a frame, or by the capture loop
//! while it is deliberately waiting to reopen a failed camera: a hung inference thread stops
//! the pings and systemd restarts the service, while an unplugged camera does not turn into a
//! restart loop.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The service's link to systemd. Pipeline threads only record progress
/// ([`Notifier::frame_processed`], [`Notifier::keepalive`]); the service's main loop sends
/// the messages ([`Notifier::tick`]), so a slow notify socket can never stall a frame.
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    frames: AtomicU64,
    alive_idle: AtomicBool,
    state: Mutex<State>,
}

struct State {
    ready: bool,
    /// Frames counted at the last tick.
    seen: u64,
    /// Progress was made since the last WATCHDOG.
    pending: bool,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` / `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            frames: AtomicU64::new(0),
            alive_idle: AtomicBool::new(false),
            state: Mutex::new(State {
                ready: false,
                seen: 0,
                pending: false,
                last_ping: None,
            }),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
        {
            log::warn!("sd_notify failed: {e}");
        }
    }

    /// The inference loop finished a frame.
    pub fn frame_processed(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// The capture loop is alive without frames (waiting to reopen the camera).
    pub fn keepalive(&self) {
        self.alive_idle.store(true, Ordering::Relaxed);
    }

    /// Sends READY after the first frame processed since start or the last reload, and
    /// WATCHDOG at half the watchdog interval when progress was recorded since the last one.
    /// Call it often (the main loop does, every 50 ms).
    pub fn tick(&self) {
        let mut g = self.state.lock().expect("notifier lock");
        let n = self.frames.load(Ordering::Relaxed);
        let progressed = n > g.seen;
        g.seen = n;
        g.pending |= progressed || self.alive_idle.swap(false, Ordering::Relaxed);
        let now = Instant::now();
        if progressed && !g.ready {
            g.ready = true;
            g.pending = false;
            g.last_ping = Some(now);
            self.send(&[NotifyState::Ready, NotifyState::Status("running")]);
            return;
        }
        if let Some(wd) = self.watchdog
            && g.pending
            && g.last_ping.is_none_or(|t| now.duration_since(t) >= wd / 2)
        {
            g.pending = false;
            g.last_ping = Some(now);
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// A free-form STATUS line (`systemctl status` shows it).
    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// A configuration reload has begun; READY follows with the next processed frame.
    pub fn reloading(&self) {
        let mut g = self.state.lock().expect("notifier lock");
        g.ready = false;
        g.seen = self.frames.load(Ordering::Relaxed);
        drop(g);
        let mono = NotifyState::monotonic_usec_now().ok();
        let mut states = vec![NotifyState::Reloading];
        states.extend(mono);
        self.send(&states);
    }
}
