//! `perch run`: the long-running service. Owns the pipeline threads, the control socket, the
//! HTTP endpoint, systemd notification and signal handling.
//!
//! Life cycle: load and prepare the model, open the source, start the threads, then wait for
//! SIGTERM/SIGINT (drain and exit), SIGHUP or a `reload` request (re-read the configuration;
//! if it is valid, restart the pipeline with it, reusing the prepared model when the model
//! settings did not change; if not, keep running and report why), or the end of the source.

pub mod control;
pub mod metrics;
pub mod notify;
pub mod pipeline;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::adapter::{self, Adapter};
use crate::camera::{self, Retry};
use crate::config::{self, ModelSettings, Settings};
use crate::detector::{Detector, DetectorOptions, read_labels};
use crate::model::OnnxModel;
use crate::output::framebuffer::{FbSink, Framebuffer};
use crate::output::http::{HttpServer, Latest, TextFn};
use crate::output::jsonl::RotatingFile;
use crate::output::snapshots::Snapshots;
use crate::output::subscribers::Subscribers;
use crate::report::{AdapterRef, ModelRef};
use control::{ControlServer, Handler};
use metrics::Metrics;
use notify::Notifier;
use pipeline::{CaptureCtx, CaptureEnd, Handoff, Outputs};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration, model or source is unusable; restarting will not help.
    #[error("{0}")]
    Config(String),
    /// A runtime failure (device gone for good, socket busy); a restart may help.
    #[error("{0}")]
    Runtime(String),
}

/// A prepared detector and the identity stamped on its records.
pub struct Engine {
    pub detector: Detector,
    pub model: ModelRef,
    pub adapter: Option<AdapterRef>,
}

/// Loads the model, merges the adapter, prepares the detector.
pub fn build_engine(m: &ModelSettings) -> anyhow::Result<Engine> {
    let t = Instant::now();
    let base = OnnxModel::load(&m.path)?;
    let model = ModelRef {
        path: m.path.display().to_string(),
        fingerprint: base.fingerprint(),
    };
    let (merged, adapter) = match &m.adapter {
        Some(p) => {
            let a = Adapter::load_any(p, &base)?;
            (
                adapter::merge::apply(&base, &a, m.adapter_scale)?,
                Some(a.reference()),
            )
        }
        None => (base, None),
    };
    let opts = DetectorOptions {
        imgsz: m.imgsz,
        layout: m.layout,
        labels: m.labels.as_deref().map(read_labels).transpose()?,
        params: m.params.clone(),
    };
    let detector = Detector::new(&merged, opts)?;
    log::info!(
        "model {} ready in {:.0} ms{}",
        m.path.display(),
        t.elapsed().as_secs_f64() * 1e3,
        adapter
            .as_ref()
            .map_or(String::new(), |a| format!(" with adapter {}", a.name))
    );
    Ok(Engine {
        detector,
        model,
        adapter,
    })
}

/// Validates `settings` the way `perch run` would start: builds the model and opens the
/// source once. Returns a one-line summary.
pub fn check(settings: &Settings) -> Result<String, ServiceError> {
    let engine = build_engine(&settings.model)
        .map_err(|e| ServiceError::Config(crate::exit::one_line(&e)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let source = match camera::open(&settings.source, stop) {
        Ok(s) => s.describe(),
        Err(e) if e.retry == Retry::Reopen => format!("{e} (will keep retrying)"),
        Err(e) => return Err(ServiceError::Config(e.to_string())),
    };
    let (h, w) = engine.detector.input_hw();
    Ok(format!(
        "config OK: model {} at {h}x{w}, {} classes; source {source}",
        engine.model.path,
        engine.detector.spec().num_classes
    ))
}

/// Sockets and servers that live as long as one configuration.
struct Endpoints {
    _control: Option<ControlServer>,
    _http: Option<HttpServer>,
    _framebuffer: Option<FbSink>,
    latest: Option<Arc<Latest>>,
}

fn start_endpoints(
    s: &Settings,
    metrics: &Arc<Metrics>,
    reload: &Sender<()>,
) -> Result<Endpoints, ServiceError> {
    let control = match &s.control {
        Some(c) => {
            let (m, tx) = (metrics.clone(), Mutex::new(reload.clone()));
            let handler: Handler = Arc::new(move |cmd, _req| match cmd {
                "ping" => Ok(Map::new()),
                "status" => Ok(Map::from_iter([(
                    "status".to_string(),
                    serde_json::to_value(m.status()).expect("status serialises"),
                )])),
                "reload" => {
                    let _ = tx.lock().expect("reload sender lock").send(());
                    Ok(Map::from_iter([(
                        "reload".to_string(),
                        Value::from("requested"),
                    )]))
                }
                other => Err(format!(
                    "unknown command '{other}' (commands: status, ping, reload)"
                )),
            });
            Some(
                ControlServer::start(&c.socket, c.mode, handler).map_err(|e| {
                    ServiceError::Runtime(format!("{}: cannot listen: {e}", c.socket.display()))
                })?,
            )
        }
        None => None,
    };
    let latest = (s.http.is_some() || s.framebuffer.is_some()).then(|| Arc::new(Latest::default()));
    let http = match (&s.http, &latest) {
        (Some(h), Some(latest)) => {
            let (m1, m2) = (metrics.clone(), metrics.clone());
            let status: TextFn =
                Arc::new(move || serde_json::to_string(&m1.status()).expect("status serialises"));
            let prom: TextFn = Arc::new(move || metrics::prometheus(&m2.status()));
            let server = HttpServer::start(h.listen, h.max_fps, latest.clone(), status, prom)
                .map_err(|e| {
                    ServiceError::Runtime(format!("http {}: cannot listen: {e}", h.listen))
                })?;
            log::info!("live view on http://{}/stream.mjpg", server.local_addr());
            Some(server)
        }
        _ => None,
    };
    let framebuffer = match (&s.framebuffer, &latest) {
        (Some(f), Some(latest)) => {
            let fb =
                Framebuffer::open(&f.device).map_err(|e| ServiceError::Config(e.to_string()))?;
            let g = fb.geometry();
            log::info!(
                "{}: {}x{} at {} bpp",
                f.device.display(),
                g.width,
                g.height,
                g.bits_per_pixel
            );
            Some(FbSink::start(fb, f.max_fps, latest.clone()).map_err(|e| {
                ServiceError::Runtime(format!("cannot start the framebuffer thread: {e}"))
            })?)
        }
        _ => None,
    };
    Ok(Endpoints {
        _control: control,
        _http: http,
        _framebuffer: framebuffer,
        latest,
    })
}

fn start_outputs(s: &Settings, latest: Option<Arc<Latest>>) -> Result<Outputs, ServiceError> {
    let o = &s.output;
    let file = o
        .file
        .as_deref()
        .map(|p| {
            RotatingFile::open(p, o.file_max_bytes, o.file_keep)
                .map_err(|e| ServiceError::Runtime(format!("{}: cannot open: {e}", p.display())))
        })
        .transpose()?;
    let mode = s.control.as_ref().map_or(0o660, |c| c.mode);
    let subscribers = o
        .socket
        .as_deref()
        .map(|p| {
            Subscribers::bind(p, mode)
                .map_err(|e| ServiceError::Runtime(format!("{}: cannot listen: {e}", p.display())))
        })
        .transpose()?;
    let snapshots = s
        .snapshots
        .clone()
        .map(|sn| {
            let dir = sn.dir.clone();
            Snapshots::start(sn)
                .map_err(|e| ServiceError::Runtime(format!("{}: {e}", dir.display())))
        })
        .transpose()?;
    Ok(Outputs {
        stdout: o.stdout,
        file,
        subscribers,
        snapshots,
        latest,
    })
}

/// One running capture + inference pair.
struct Pipeline {
    stop: Arc<AtomicBool>,
    capture: JoinHandle<CaptureEnd>,
    inference: JoinHandle<Engine>,
}

impl Pipeline {
    fn start(
        s: &Settings,
        mut engine: Engine,
        mut outputs: Outputs,
        seq: u64,
        metrics: &Arc<Metrics>,
        notifier: &Arc<Notifier>,
    ) -> Result<Self, ServiceError> {
        let stop = Arc::new(AtomicBool::new(false));
        let first = match camera::open(&s.source, stop.clone()) {
            Ok(src) => Some(src),
            Err(e) if e.retry == Retry::Reopen => {
                log::warn!("{e}; will keep retrying");
                metrics.update(|st| st.last_error = Some(e.to_string()));
                None
            }
            Err(e) => return Err(ServiceError::Config(e.to_string())),
        };
        let uri = s.source.kind.to_string();
        let described = first.as_ref().map_or_else(|| uri.clone(), |f| f.describe());
        log::info!("source {described}");
        metrics.update(|st| {
            st.source = described;
            st.model = Some(engine.model.clone());
            st.adapter = engine.adapter.clone();
        });
        let handoff = Arc::new(Handoff::default());
        let spawn_err =
            |e: std::io::Error| ServiceError::Runtime(format!("cannot start thread: {e}"));
        let inference = {
            let (h, m, n) = (handoff.clone(), metrics.clone(), notifier.clone());
            let src_name = uri;
            std::thread::Builder::new()
                .name("perch-inference".into())
                .spawn(move || {
                    pipeline::inference_loop(&mut engine, &h, &mut outputs, &m, &n, &src_name);
                    engine
                })
        };
        let inference = inference.map_err(spawn_err)?;
        let capture = {
            let (spec, h, st, m, n) = (
                s.source.clone(),
                handoff.clone(),
                stop.clone(),
                metrics.clone(),
                notifier.clone(),
            );
            std::thread::Builder::new()
                .name("perch-capture".into())
                .spawn(move || {
                    let ctx = CaptureCtx {
                        spec: &spec,
                        handoff: &h,
                        stop: &st,
                        metrics: &m,
                        notifier: &n,
                    };
                    pipeline::capture_loop(ctx, first, seq)
                })
        };
        let capture = match capture {
            Ok(c) => c,
            Err(e) => {
                handoff.close();
                let _ = inference.join();
                return Err(spawn_err(e));
            }
        };
        Ok(Pipeline {
            stop,
            capture,
            inference,
        })
    }

    fn finished(&self) -> bool {
        self.inference.is_finished()
    }

    /// Stops capture, lets inference finish the frame in hand, and returns the engine.
    fn stop(self) -> (Engine, CaptureEnd) {
        self.stop.store(true, Ordering::Relaxed);
        let end = self.capture.join().unwrap_or_else(|_| CaptureEnd {
            next_seq: 0,
            error: Some("capture thread panicked".into()),
        });
        let engine = self.inference.join().expect("inference thread panicked");
        (engine, end)
    }
}

enum Event {
    Stop,
    Ended,
    Reload(Box<(Settings, Option<Engine>)>),
}

/// How `perch run` was invoked: the configuration file (for reloads) and command-line
/// overrides applied on top of every version of it.
pub struct Invocation {
    pub config_path: Option<PathBuf>,
    pub overrides: Box<dyn Fn(&mut Settings)>,
}

fn try_reload(inv: &Invocation, current: &Settings, metrics: &Metrics) -> Option<Event> {
    let Some(path) = &inv.config_path else {
        log::warn!("reload requested, but perch runs without a configuration file");
        return None;
    };
    let fail = |e: String| {
        log::error!("reload rejected, keeping the running configuration: {e}");
        metrics.update(|s| s.last_error = Some(format!("reload rejected: {e}")));
        None
    };
    let mut next = match config::load(path) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    (inv.overrides)(&mut next);
    // File sources are checked now; a camera is busy (held by the running pipeline) and will
    // be retried by the new pipeline anyway.
    if let Err(e) = camera::open(&next.source, Arc::new(AtomicBool::new(false)))
        && e.retry == Retry::Never
    {
        return fail(e.to_string());
    }
    let engine = if next.model == current.model {
        None
    } else {
        match build_engine(&next.model) {
            Ok(e) => Some(e),
            Err(e) => return fail(crate::exit::one_line(&e)),
        }
    };
    Some(Event::Reload(Box::new((next, engine))))
}

fn wait_event(
    signals: &mut signal_hook::iterator::Signals,
    reload: &Receiver<()>,
    pipeline: &Pipeline,
    inv: &Invocation,
    settings: &Settings,
    metrics: &Metrics,
    notifier: &Notifier,
) -> Event {
    let mut last_status = Instant::now();
    loop {
        for sig in signals.pending() {
            match sig {
                SIGHUP => {
                    if let Some(ev) = try_reload(inv, settings, metrics) {
                        return ev;
                    }
                }
                _ => return Event::Stop,
            }
        }
        if reload.try_recv().is_ok()
            && let Some(ev) = try_reload(inv, settings, metrics)
        {
            return ev;
        }
        if pipeline.finished() {
            return Event::Ended;
        }
        notifier.tick();
        if last_status.elapsed() >= Duration::from_secs(2) {
            last_status = Instant::now();
            let s = metrics.status();
            notifier.status(&format!(
                "{}: {:.1} fps, {} frames, {} dropped, p99 {:.0} ms",
                s.state, s.fps, s.frames_processed, s.frames_dropped, s.latency_ms.p99
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the service until SIGTERM/SIGINT (Ok), the end of a finite source (Ok), or a fatal
/// error.
pub fn run(mut settings: Settings, inv: Invocation) -> Result<(), ServiceError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| ServiceError::Runtime(format!("cannot install signal handlers: {e}")))?;
    let notifier = Arc::new(Notifier::from_env());
    let metrics = Arc::new(Metrics::default());
    let (reload_tx, reload_rx) = std::sync::mpsc::channel();
    let mut engine = build_engine(&settings.model)
        .map_err(|e| ServiceError::Config(crate::exit::one_line(&e)))?;
    let mut seq = 0;
    let mut endpoints = start_endpoints(&settings, &metrics, &reload_tx)?;
    loop {
        let outputs = start_outputs(&settings, endpoints.latest.clone())?;
        let pipeline = Pipeline::start(&settings, engine, outputs, seq, &metrics, &notifier)?;
        let event = wait_event(
            &mut signals,
            &reload_rx,
            &pipeline,
            &inv,
            &settings,
            &metrics,
            &notifier,
        );
        if matches!(event, Event::Stop) {
            notifier.stopping();
            metrics.update(|s| s.state = "stopping".into());
        }
        let (old_engine, end) = pipeline.stop();
        seq = end.next_seq;
        match event {
            Event::Stop => return Ok(()),
            Event::Ended => {
                metrics.update(|s| s.state = "ended".into());
                return end.error.map_or(Ok(()), |e| Err(ServiceError::Runtime(e)));
            }
            Event::Reload(next) => {
                let (next, new_engine) = *next;
                notifier.reloading();
                metrics.update(|s| {
                    s.reloads += 1;
                    s.state = "reloading".into();
                });
                log::info!("configuration reloaded");
                engine = new_engine.unwrap_or(old_engine);
                // The control socket and HTTP endpoint stay up across a reload unless their
                // own settings changed, so clients polling status never see it vanish.
                if next.control != settings.control
                    || next.http != settings.http
                    || next.framebuffer != settings.framebuffer
                {
                    drop(endpoints);
                    endpoints = start_endpoints(&next, &metrics, &reload_tx)?;
                }
                settings = next;
            }
        }
    }
}

/// Reads `path` and validates it, for `perch run --config`.
pub fn load_settings(path: &Path) -> Result<Settings, ServiceError> {
    config::load(path).map_err(|e| ServiceError::Config(e.to_string()))
}
