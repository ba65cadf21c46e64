//! The frame pipeline: a capture thread hands frames to the inference thread through a
//! one-slot handoff, and the inference thread writes records to the outputs.
//!
//! ```text
//! capture thread: source.next_frame -> pace -> Handoff::put (newest wins; drops counted)
//! inference thread: Handoff::take -> letterbox, model, decode, NMS -> record -> outputs
//! ```
//! A failing or silent camera is closed and reopened with exponential backoff (0.5 s to 30 s)
//! while the rest keeps running. Replayed files without a real-time rate use a lossless
//! handoff instead, so every frame is processed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::camera::{self, FrameSource, Retry, SourceKind, SourceSpec};
use crate::frame::RgbFrame;
use crate::output::Annotatable;
use crate::output::http::Latest;
use crate::output::jsonl::RotatingFile;
use crate::output::snapshots::Snapshots;
use crate::output::subscribers::Subscribers;
use crate::report::{FrameRecord, FrameTimingsMs, ms};

use super::Engine;
use super::metrics::Metrics;
use super::notify::Notifier;
use super::swap::Mailbox;

/// Replay rate of the synthetic source when none is configured.
const SYNTHETIC_FPS: f64 = 30.0;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A frame on its way from capture to inference.
#[derive(Debug)]
pub struct Captured {
    pub seq: u64,
    pub frame: RgbFrame,
    /// Wall-clock capture time.
    pub wall: SystemTime,
    /// Monotonic capture time, for ages and latencies.
    pub at: Instant,
    /// The frame's own origin where the source has one (`FrameSource::frame_origin`).
    pub origin: Option<Arc<str>>,
}

#[derive(Default)]
struct Slot {
    frame: Option<Captured>,
    closed: bool,
    dropped: u64,
}

/// The one-slot handoff between capture and inference. Never holds more than one frame.
#[derive(Default)]
pub struct Handoff {
    slot: Mutex<Slot>,
    changed: Condvar,
}

impl Handoff {
    /// Offers a frame. Newest-wins mode replaces an untaken frame (counted as dropped);
    /// lossless mode waits until the previous frame is taken. False once closed.
    pub fn put(&self, c: Captured, lossless: bool) -> bool {
        let mut g = self.slot.lock().expect("handoff lock");
        if lossless {
            g = self
                .changed
                .wait_while(g, |s| s.frame.is_some() && !s.closed)
                .expect("handoff lock");
        }
        if g.closed {
            return false;
        }
        if g.frame.replace(c).is_some() {
            g.dropped += 1;
        }
        self.changed.notify_all();
        true
    }

    /// Takes the frame, waiting for one; `None` once closed and empty.
    pub fn take(&self) -> Option<Captured> {
        let mut g = self
            .changed
            .wait_while(self.slot.lock().expect("handoff lock"), |s| {
                s.frame.is_none() && !s.closed
            })
            .expect("handoff lock");
        let f = g.frame.take();
        self.changed.notify_all();
        f
    }

    /// No more frames will be put; the one waiting is still taken.
    pub fn close(&self) {
        self.slot.lock().expect("handoff lock").closed = true;
        self.changed.notify_all();
    }

    /// Frames replaced before being taken.
    pub fn dropped(&self) -> u64 {
        self.slot.lock().expect("handoff lock").dropped
    }
}

/// How the capture loop ended.
#[derive(Debug)]
pub struct CaptureEnd {
    /// The sequence number the next frame would have had.
    pub next_seq: u64,
    /// Why it ended, if not by reaching the end of the source or a stop request.
    pub error: Option<String>,
}

/// Sleeps `d` in short slices; false if `stop` was raised meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration, mut tick: impl FnMut()) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tick();
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The replay interval for a non-camera source, `None` to read as fast as consumed.
pub fn pacing(spec: &SourceSpec, native_fps: Option<f64>) -> Option<Duration> {
    if spec.is_live() || !spec.realtime {
        return None;
    }
    let fps = spec.fps.or(native_fps).or(match spec.kind {
        SourceKind::Synthetic => Some(SYNTHETIC_FPS),
        _ => None,
    })?;
    Some(Duration::from_secs_f64(1.0 / fps))
}

/// Everything the capture loop shares with the service.
pub struct CaptureCtx<'a> {
    pub spec: &'a SourceSpec,
    pub handoff: &'a Handoff,
    pub stop: &'a Arc<AtomicBool>,
    pub metrics: &'a Metrics,
    pub notifier: &'a Notifier,
}

/// Reads frames until the source ends, fails for good, reaches `max_frames` or `stop` is
/// raised; then closes the handoff. `source` is `None` when the first open failed
/// transiently (a camera not plugged in yet).
pub fn capture_loop(
    ctx: CaptureCtx,
    mut source: Option<Box<dyn FrameSource>>,
    mut seq: u64,
) -> CaptureEnd {
    let CaptureCtx {
        spec,
        handoff,
        stop,
        metrics,
        notifier,
    } = ctx;
    let interval = pacing(spec, source.as_ref().and_then(|s| s.native_fps()));
    let lossless = !spec.is_live() && interval.is_none();
    let mut backoff = BACKOFF_MIN;
    let mut next_due: Option<Instant> = None;
    let mut error = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(src) = source.as_mut() else {
            metrics.update(|s| s.state = "reconnecting".into());
            if !sleep_unless(stop, backoff, || notifier.keepalive()) {
                break;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match camera::open(spec, stop.clone()) {
                Ok(s) => {
                    log::info!("reopened {}", s.describe());
                    metrics.update(|st| {
                        st.reconnects += 1;
                        st.source = s.describe();
                    });
                    source = Some(s);
                }
                Err(e) if e.retry == Retry::Reopen => {
                    log::warn!("{e}; retrying in {:.1} s", backoff.as_secs_f64());
                    metrics.update(|s| s.last_error = Some(e.to_string()));
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
            continue;
        };
        match src.next_frame() {
            Ok(Some(frame)) => {
                backoff = BACKOFF_MIN;
                if let Some(iv) = interval {
                    let now = Instant::now();
                    let due = next_due.unwrap_or(now);
                    if due > now && !sleep_unless(stop, due - now, || {}) {
                        break;
                    }
                    // Behind schedule by more than a frame: do not burst to catch up.
                    let now = Instant::now();
                    next_due = Some(if due + iv < now { now } else { due + iv });
                }
                let c = Captured {
                    seq,
                    frame,
                    wall: SystemTime::now(),
                    at: Instant::now(),
                    origin: src.frame_origin(),
                };
                metrics.update(|s| {
                    s.frames_captured += 1;
                    if s.state != "running" {
                        s.state = "running".into();
                    }
                });
                if !handoff.put(c, lossless) {
                    break;
                }
                seq += 1;
            }
            Ok(None) => break,
            Err(e) if e.retry == Retry::Reopen => {
                log::warn!("{e}; closing it and reopening");
                metrics.update(|s| s.last_error = Some(e.to_string()));
                source = None;
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(e) = &error {
        log::error!("{e}");
        metrics.update(|s| s.last_error = Some(e.clone()));
    }
    handoff.close();
    CaptureEnd {
        next_seq: seq,
        error,
    }
}

/// The record sinks of one pipeline run.
pub struct Outputs {
    pub stdout: bool,
    pub file: Option<RotatingFile>,
    pub subscribers: Option<Subscribers>,
    pub snapshots: Option<Snapshots>,
    pub latest: Option<Arc<Latest>>,
    /// Detection messages for the MQTT fleet link.
    #[cfg(feature = "mqtt")]
    pub mqtt: Option<super::mqtt::DetectionOut>,
}

impl Outputs {
    /// Writes `line` to the text sinks; false if a sink failed (and was reported).
    fn write_line(&mut self, line: &str) -> bool {
        let mut ok = true;
        if self.stdout {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                log::error!("stdout: {e}; no more records go to stdout");
                self.stdout = false;
                ok = false;
            }
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_line(line)
        {
            log::error!("records file: {e}");
            ok = false;
        }
        if let Some(s) = &self.subscribers {
            s.publish(line);
        }
        ok
    }
}

/// What the inference loop shares with the service.
pub struct InferenceCtx<'a> {
    pub handoff: &'a Handoff,
    pub mailbox: &'a Mailbox,
    pub metrics: &'a Metrics,
    pub notifier: &'a Notifier,
    pub source_name: &'a str,
    /// Stop after this many frames (`source.frames`): the handoff is closed once inference has
    /// taken them, so the records number exactly this many however many frames were dropped.
    pub max_frames: Option<u64>,
}

/// Runs frames from the handoff through `engine` into `outputs` until the handoff closes (or
/// `max_frames` frames were taken). Between two frames, an engine published in the mailbox
/// replaces `engine`.
pub fn inference_loop(engine: &mut Engine, outputs: &mut Outputs, ctx: InferenceCtx) {
    let InferenceCtx {
        handoff,
        mailbox,
        metrics,
        notifier,
        source_name,
        max_frames,
    } = ctx;
    let mut labels: Arc<[String]> = engine.detector.overlay_labels().into();
    let mut taken_frames = 0u64;
    loop {
        if max_frames.is_some_and(|m| taken_frames >= m) {
            // The capture loop stops at its next handoff, and the service after this loop.
            handoff.close();
            break;
        }
        let Some(c) = handoff.take() else {
            break;
        };
        taken_frames += 1;
        let retired = mailbox.swap_in(engine);
        if retired.is_some() {
            labels = engine.detector.overlay_labels().into();
            metrics.update(|s| {
                s.adapter = engine.adapter.clone();
                s.tasks = engine.tasks.clone();
            });
        }
        let taken = Instant::now();
        // A single-task engine's failure loses the frame; with several tasks, a task whose
        // output is not finite fails alone (its entry says why) and the frame still counts as
        // an error for the set's probation.
        let run = engine
            .detector
            .detect_tasks(&c.frame)
            .map_err(|e| e.to_string())
            .and_then(
                |(found, t)| match (engine.tasks.is_empty(), found.first()) {
                    (true, Some(Err(e))) => Err(e.to_string()),
                    _ => Ok((found, t)),
                },
            );
        let (found, timings) = match run {
            Ok(x) => x,
            Err(e) => {
                log::error!("frame {}: {e}", c.seq);
                mailbox.frame_done(engine.generation, Some(&e.to_string()));
                mailbox.release(retired);
                metrics.update(|s| {
                    s.inference_errors += 1;
                    s.last_error = Some(format!("frame {}: {e}", c.seq));
                });
                continue;
            }
        };
        let task_error = crate::detector::task_failure(&engine.tasks, &found)
            .map(|e| format!("frame {}: {e}", c.seq));
        let ts_ms = c
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (detections, tasks) = engine.detector.record_detections(&engine.tasks, &found);
        let mut record = FrameRecord {
            seq: c.seq,
            ts: ts_ms as f64 / 1e3,
            source: c.origin.as_deref().unwrap_or(source_name),
            width: c.frame.width(),
            height: c.frame.height(),
            detections,
            tasks,
            timings_ms: FrameTimingsMs {
                wait: ms(taken - c.at),
                stages: timings.into(),
            },
            frame_age_ms: 0.0,
            model: &engine.model,
            adapter: engine.adapter.as_ref(),
        };
        record.frame_age_ms = ms(c.at.elapsed());
        let line = serde_json::to_string(&record).expect("records serialise");
        let found_all = || {
            record
                .detections
                .iter()
                .flatten()
                .chain(record.tasks.iter().flatten().flat_map(|t| &t.detections))
        };
        let labels_found: Vec<&str> = found_all().map(|d| d.label.as_str()).collect();
        let snap = outputs
            .snapshots
            .as_mut()
            .is_some_and(|s| s.wants(&labels_found, taken));
        let wrote = outputs.write_line(&line);
        #[cfg(feature = "mqtt")]
        if let Some(m) = &outputs.mqtt {
            m.offer(found_all().map(|d| (d.label.as_str(), d.score)), &line);
        }
        if snap || outputs.latest.is_some() {
            let a = Arc::new(Annotatable {
                seq: c.seq,
                ts_ms,
                frame: c.frame,
                detections: engine.detector.overlay_detections(&found),
                labels: labels.clone(),
            });
            if snap && let Some(s) = outputs.snapshots.as_mut() {
                s.submit(a.clone());
            }
            if let Some(l) = &outputs.latest {
                l.publish(a);
            }
        }
        let dropped = handoff.dropped();
        let subscribers = outputs.subscribers.as_ref().map_or(0, Subscribers::count);
        let snapshots = outputs.snapshots.as_ref().map_or(0, Snapshots::written);
        let per_task: Vec<(String, u64)> = record
            .tasks
            .iter()
            .flatten()
            .map(|t| (t.task.clone(), t.detections.len() as u64))
            .collect();
        metrics.update(|s| {
            for (task, n) in per_task {
                *s.task_detections.entry(task).or_default() += n;
            }
            s.frames_dropped = dropped;
            s.subscribers = subscribers;
            s.snapshots_written = snapshots;
            if !wrote {
                s.output_errors += 1;
            }
            if let Some(e) = &task_error {
                s.inference_errors += 1;
                s.last_error = Some(e.clone());
            }
        });
        if let Some(e) = &task_error {
            log::error!("{e}");
        }
        metrics.frame_done(c.at.elapsed(), timings.inference);
        mailbox.frame_done(engine.generation, task_error.as_deref());
        notifier.frame_processed();
        // After the frame, so the first frame on a new engine is not delayed by the old one.
        mailbox.release(retired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camera::SourceError;

    fn cap(seq: u64) -> Captured {
        Captured {
            seq,
            frame: RgbFrame::filled(1, 1, [0; 3]),
            wall: SystemTime::now(),
            at: Instant::now(),
            origin: None,
        }
    }

    #[test]
    fn newest_wins_and_lossless_handoff() {
        let h = Handoff::default();
        assert!(h.put(cap(0), false));
        assert!(h.put(cap(1), false));
        assert_eq!(h.dropped(), 1);
        assert_eq!(h.take().unwrap().seq, 1);

        let h = Arc::new(Handoff::default());
        let producer = {
            let h = h.clone();
            std::thread::spawn(move || (0..50).all(|i| h.put(cap(i), true)))
        };
        let got: Vec<u64> = (0..50).map(|_| h.take().unwrap().seq).collect();
        assert!(producer.join().unwrap());
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(h.dropped(), 0);
        h.put(cap(99), true);
        h.close();
        assert_eq!(
            h.take().unwrap().seq,
            99,
            "a closed handoff still yields its frame"
        );
        assert!(h.take().is_none());
        assert!(!h.put(cap(100), false));
    }

    /// A camera stand-in: delivers `good` frames, then fails as if unplugged.
    struct Flaky {
        good: u32,
    }

    impl FrameSource for Flaky {
        fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
            if self.good > 0 {
                self.good -= 1;
                return Ok(Some(RgbFrame::filled(2, 2, [1; 3])));
            }
            Err(SourceError::transient("flaky", "unplugged"))
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[test]
    fn reconnects_with_backoff_and_stops_promptly() {
        // The flaky camera dies after 3 frames; reopening uses the real open path, which fails
        // for a missing device, so the loop keeps retrying until stopped.
        let mut spec = SourceSpec::new(SourceKind::V4l2("/dev/video-perch-none".into()));
        spec.stall_timeout = Duration::from_millis(100);
        let handoff = Arc::new(Handoff::default());
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let notifier = Notifier::from_env();
        let consumer = {
            let h = handoff.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while h.take().is_some() {
                    n += 1;
                }
                n
            })
        };
        let (h, s, m) = (handoff.clone(), stop.clone(), metrics.clone());
        let capture = std::thread::spawn(move || {
            let ctx = CaptureCtx {
                spec: &spec,
                handoff: &h,
                stop: &s,
                metrics: &m,
                notifier: &notifier,
            };
            capture_loop(ctx, Some(Box::new(Flaky { good: 3 })), 10)
        });
        std::thread::sleep(Duration::from_millis(1700));
        let st = metrics.status();
        assert_eq!(st.state, "reconnecting");
        assert_eq!(st.frames_captured, 3);
        assert!(
            st.last_error.as_deref().unwrap().contains("cannot open"),
            "{st:?}"
        );
        let t = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let end = capture.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "stop must be prompt"
        );
        assert_eq!((end.next_seq, end.error), (13, None));
        assert!(consumer.join().unwrap() >= 1);
    }

    #[test]
    fn pacing_rules() {
        let mut s = SourceSpec::new(SourceKind::Synthetic);
        assert_eq!(pacing(&s, None), Some(Duration::from_secs_f64(1.0 / 30.0)));
        s.fps = Some(10.0);
        assert_eq!(pacing(&s, None), Some(Duration::from_millis(100)));
        s.realtime = false;
        assert_eq!(pacing(&s, Some(25.0)), None);
        let mut y = SourceSpec::new(SourceKind::Y4m("a.y4m".into()));
        assert_eq!(pacing(&y, Some(25.0)), Some(Duration::from_millis(40)));
        y.fps = Some(50.0);
        assert_eq!(pacing(&y, Some(25.0)), Some(Duration::from_millis(20)));
        let i = SourceSpec::new(SourceKind::Images("d".into()));
        assert_eq!(pacing(&i, None), None);
        let v = SourceSpec::new(SourceKind::V4l2("/dev/video0".into()));
        assert_eq!(pacing(&v, Some(30.0)), None);
    }
}
