//! Counters and latency distributions of a running service, and the status report built from
//! them (control socket `status`, HTTP `/status` and `/metrics`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::{AdapterRef, ModelRef};

/// Frames kept for latency percentiles.
const WINDOW: usize = 512;
/// Span over which fps is measured.
const FPS_SPAN: Duration = Duration::from_secs(5);

/// Latency percentiles in milliseconds (0 when no frame was processed yet).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `v` (any order).
    pub fn of(v: impl Iterator<Item = f64>) -> Self {
        let mut s: Vec<f64> = v.collect();
        if s.is_empty() {
            return Percentiles::default();
        }
        s.sort_by(f64::total_cmp);
        let at = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

/// The status report.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// starting | running | reconnecting | reloading | stopping | ended
    pub state: String,
    pub uptime_s: f64,
    pub source: String,
    pub frames_captured: u64,
    pub frames_processed: u64,
    /// Frames replaced in the handoff before inference took them (newest frame wins).
    pub frames_dropped: u64,
    pub inference_errors: u64,
    pub output_errors: u64,
    pub reconnects: u64,
    pub reloads: u64,
    pub fps: f64,
    /// Capture to output, per frame.
    pub latency_ms: Percentiles,
    pub inference_ms: Percentiles,
    pub rss_bytes: u64,
    pub model: Option<ModelRef>,
    pub adapter: Option<AdapterRef>,
    /// The task adapters running together on a shared trunk, in task order (empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<AdapterRef>,
    /// Detections written per task name since the service started, for every task that has run
    /// in a set of several.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub task_detections: std::collections::BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub subscribers: usize,
    pub snapshots_written: u64,
    /// The adapter store, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapters: Option<super::status::AdapterStatus>,
    /// The MQTT fleet link, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<super::status::MqttStatus>,
}

/// Receives the service's events (adapter swaps, rollbacks, installs): a JSON object with
/// `event` (its kind) and `ts` (Unix seconds). Called on the thread that made the change; it
/// must not block.
pub type EventSink = std::sync::Arc<dyn Fn(serde_json::Value) + Send + Sync>;

struct Inner {
    status: Status,
    latency: VecDeque<f64>,
    inference: VecDeque<f64>,
    recent: VecDeque<Instant>,
}

/// Thread-safe metrics; cheap to update once per frame.
pub struct Metrics {
    started: Instant,
    inner: Mutex<Inner>,
    events: Mutex<Option<EventSink>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                status: Status {
                    state: "starting".into(),
                    uptime_s: 0.0,
                    source: String::new(),
                    frames_captured: 0,
                    frames_processed: 0,
                    frames_dropped: 0,
                    inference_errors: 0,
                    output_errors: 0,
                    reconnects: 0,
                    reloads: 0,
                    fps: 0.0,
                    latency_ms: Percentiles::default(),
                    inference_ms: Percentiles::default(),
                    rss_bytes: 0,
                    model: None,
                    adapter: None,
                    tasks: Vec::new(),
                    task_detections: Default::default(),
                    last_error: None,
                    subscribers: 0,
                    snapshots_written: 0,
                    adapters: None,
                    mqtt: None,
                },
                latency: VecDeque::with_capacity(WINDOW),
                inference: VecDeque::with_capacity(WINDOW),
                recent: VecDeque::new(),
            }),
            events: Mutex::new(None),
        }
    }
}

fn push(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

impl Metrics {
    /// Applies `f` to the status fields under the lock.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.inner.lock().expect("metrics lock").status);
    }

    /// Sets (or, with `None`, removes) where [`Metrics::event`] sends events.
    pub fn set_event_sink(&self, sink: Option<EventSink>) {
        *self.events.lock().expect("events lock") = sink;
    }

    /// Reports an event of kind `event` with `fields` to the event sink, if one is set.
    pub fn event(&self, event: &str, fields: serde_json::Map<String, serde_json::Value>) {
        let Some(sink) = self.events.lock().expect("events lock").clone() else {
            return;
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_millis() as f64 / 1e3);
        let mut m = serde_json::Map::new();
        m.insert("event".into(), event.into());
        m.insert("ts".into(), ts.into());
        m.extend(fields);
        sink(serde_json::Value::Object(m));
    }

    /// Records one processed frame.
    pub fn frame_done(&self, latency: Duration, inference: Duration) {
        let mut g = self.inner.lock().expect("metrics lock");
        let now = Instant::now();
        g.status.frames_processed += 1;
        push(&mut g.latency, latency.as_secs_f64() * 1e3);
        push(&mut g.inference, inference.as_secs_f64() * 1e3);
        g.recent.push_back(now);
        while g
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FPS_SPAN)
        {
            g.recent.pop_front();
        }
    }

    /// A consistent copy of the status, with derived fields filled in.
    pub fn status(&self) -> Status {
        let mut g = self.inner.lock().expect("metrics lock");
        let now = Instant::now();
        while g
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FPS_SPAN)
        {
            g.recent.pop_front();
        }
        let fps = match (g.recent.front(), g.recent.len()) {
            (Some(first), n) if n >= 2 => {
                let span = now.duration_since(*first).as_secs_f64().max(1e-3);
                (n - 1) as f64 / span
            }
            _ => 0.0,
        };
        let mut s = g.status.clone();
        s.fps = (fps * 100.0).round() / 100.0;
        s.latency_ms = Percentiles::of(g.latency.iter().copied());
        s.inference_ms = Percentiles::of(g.inference.iter().copied());
        s.uptime_s = self.started.elapsed().as_secs_f64();
        s.rss_bytes = rss_bytes().unwrap_or(0);
        s
    }
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The status as Prometheus text exposition (format 0.0.4).
pub fn prometheus(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        out.push_str(&format!(
            "# HELP perch_{name} {help}\n# TYPE perch_{name} {kind}\n"
        ));
        for (labels, v) in samples {
            out.push_str(&format!("perch_{name}{labels} {v}\n"));
        }
    };
    metric(
        "frames_captured_total",
        "counter",
        "Frames read from the source.",
        &[("", s.frames_captured as f64)],
    );
    metric(
        "frames_processed_total",
        "counter",
        "Frames run through the detector.",
        &[("", s.frames_processed as f64)],
    );
    metric(
        "frames_dropped_total",
        "counter",
        "Frames replaced before inference took them.",
        &[("", s.frames_dropped as f64)],
    );
    metric(
        "inference_errors_total",
        "counter",
        "Frames the detector failed on.",
        &[("", s.inference_errors as f64)],
    );
    metric(
        "source_reconnects_total",
        "counter",
        "Times the source was reopened.",
        &[("", s.reconnects as f64)],
    );
    if !s.task_detections.is_empty() {
        let labels: Vec<(String, f64)> = s
            .task_detections
            .iter()
            .map(|(t, n)| {
                (
                    format!(
                        "{{task=\"{}\"}}",
                        t.replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n")
                    ),
                    *n as f64,
                )
            })
            .collect();
        let samples: Vec<(&str, f64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric(
            "task_detections_total",
            "counter",
            "Detections written per task (adapter) of a multi-task set.",
            &samples,
        );
    }
    metric(
        "fps",
        "gauge",
        "Frames processed per second over the last 5 s.",
        &[("", s.fps)],
    );
    let q = |p: &Percentiles| {
        [
            ("{quantile=\"0.5\"}", p.p50),
            ("{quantile=\"0.95\"}", p.p95),
            ("{quantile=\"0.99\"}", p.p99),
        ]
    };
    metric(
        "latency_ms",
        "summary",
        "Capture-to-output latency.",
        &q(&s.latency_ms),
    );
    metric(
        "inference_ms",
        "summary",
        "Model run time.",
        &q(&s.inference_ms),
    );
    metric(
        "resident_memory_bytes",
        "gauge",
        "Resident set size.",
        &[("", s.rss_bytes as f64)],
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        &[("", s.uptime_s)],
    );
    if let Some(a) = &s.adapters {
        metric(
            "adapter_swaps_total",
            "counter",
            "Adapter activations published.",
            &[("", a.swaps as f64)],
        );
        metric(
            "adapter_rollbacks_total",
            "counter",
            "Rollbacks to the last known good adapter.",
            &[("", a.rollbacks as f64)],
        );
        metric(
            "adapter_rejected_total",
            "counter",
            "Activations refused by the build or the health check.",
            &[("", a.rejected as f64)],
        );
        metric(
            "adapter_probation",
            "gauge",
            "1 while the active adapter is on probation.",
            &[("", f64::from(u8::from(a.probation)))],
        );
        if let Some(t) = a.last_swap.and_then(|t| t.command_to_first_frame_ms) {
            metric(
                "adapter_last_swap_ms",
                "gauge",
                "Command to first frame of the last activation.",
                &[("", t)],
            );
        }
    }
    if let Some(m) = &s.mqtt {
        metric(
            "mqtt_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
            &[("", f64::from(u8::from(m.state == "connected")))],
        );
        metric(
            "mqtt_published_total",
            "counter",
            "Messages handed to the MQTT connection.",
            &[("", m.published as f64)],
        );
        metric(
            "mqtt_dropped_total",
            "counter",
            "Messages dropped from a full MQTT queue (oldest first).",
            &[("", m.dropped as f64)],
        );
        metric(
            "mqtt_rate_limited_total",
            "counter",
            "Detection messages skipped by mqtt.max_rate.",
            &[("", m.rate_limited as f64)],
        );
        metric(
            "mqtt_connects_total",
            "counter",
            "Connections accepted by the MQTT broker.",
            &[("", m.connects as f64)],
        );
        metric(
            "mqtt_commands_total",
            "counter",
            "Commands received over MQTT.",
            &[("", m.commands as f64)],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from));
        assert_eq!((p.p50, p.p95, p.p99), (50.0, 95.0, 99.0));
        let p = Percentiles::of([7.0].into_iter());
        assert_eq!((p.p50, p.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(std::iter::empty()), Percentiles::default());
    }

    #[test]
    fn counts_and_exposes() {
        let m = Metrics::default();
        for i in 0..600 {
            m.frame_done(Duration::from_millis(i % 100), Duration::from_millis(5));
        }
        m.update(|s| s.frames_dropped = 3);
        let s = m.status();
        assert_eq!(s.frames_processed, 600);
        assert_eq!(s.inference_ms.p50, 5.0);
        assert!(s.rss_bytes > 1 << 20);
        let text = prometheus(&s);
        assert!(
            text.contains("perch_frames_processed_total 600\n"),
            "{text}"
        );
        assert!(text.contains("perch_frames_dropped_total 3\n"));
        assert!(text.contains("perch_latency_ms{quantile=\"0.99\"}"));
        assert!(!text.contains("adapter"), "no store, no adapter metrics");
        m.update(|s| {
            s.adapters = Some(crate::service::status::AdapterStatus {
                swaps: 7,
                rollbacks: 1,
                probation: true,
                probation_frames: Some([3, 100]),
                ..Default::default()
            })
        });
        let text = prometheus(&m.status());
        assert!(text.contains("perch_adapter_swaps_total 7\n"), "{text}");
        assert!(text.contains("perch_adapter_rollbacks_total 1\n"));
        assert!(text.contains("perch_adapter_probation 1\n"));
    }
}
