//! systemd notification (`sd_notify`): READY after the first processed frame, WATCHDOG while
//! the pipeline is alive, STATUS lines, STOPPING and RELOADING. A no-op outside systemd
//! (no `NOTIFY_SOCKET`).
//!
//! The watchdog is fed only by the inference loop finishing a frame, or by the capture loop
//! while it is deliberately waiting to reopen a failed camera: a hung inference thread stops
//! the pings and systemd restarts the service, while an unplugged camera does not turn into a
//! restart loop.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The service's link to systemd.
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    state: Mutex<State>,
}

struct State {
    ready: bool,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` / `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            state: Mutex::new(State {
                ready: false,
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

    /// A frame was processed: READY the first time, then WATCHDOG at half the interval.
    pub fn frame_processed(&self) {
        let mut g = self.state.lock().expect("notifier lock");
        if !g.ready {
            g.ready = true;
            g.last_ping = Some(Instant::now());
            self.send(&[NotifyState::Ready, NotifyState::Status("running")]);
            return;
        }
        drop(g);
        self.keepalive();
    }

    /// The service is alive without frames (waiting to reopen the camera).
    pub fn keepalive(&self) {
        let Some(wd) = self.watchdog else { return };
        let mut g = self.state.lock().expect("notifier lock");
        let now = Instant::now();
        if g.last_ping.is_none_or(|t| now.duration_since(t) >= wd / 2) {
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
        self.state.lock().expect("notifier lock").ready = false;
        let mono = NotifyState::monotonic_usec_now().ok();
        let mut states = vec![NotifyState::Reloading];
        states.extend(mono);
        self.send(&states);
    }
}
