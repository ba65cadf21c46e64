//! `perch run`: the long-running service. Owns the pipeline threads, the control socket, the
//! HTTP endpoint, systemd notification and signal handling.
//!
//! Life cycle: load and prepare the model, open the source, start the threads, then wait for
//! SIGTERM/SIGINT (drain and exit), SIGHUP or a `reload` request (re-read the configuration;
//! if it is valid, restart the pipeline with it, reusing the prepared model when the model
//! settings did not change; if not, keep running and report why), or the end of the source.
//! With an adapter store (`[adapters]`), adapters are installed and swapped while frames keep
//! flowing (see [`swap`]).

pub mod control;
pub mod metrics;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod notify;
pub mod pipeline;
pub mod status;
pub mod swap;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::adapter::Adapter;
use crate::camera::{self, Retry};
use crate::config::{self, ModelSettings, Settings};
use crate::detector::Detector;
use crate::engine::{EngineBuilder, EngineError};
use crate::output::framebuffer::{FbSink, Framebuffer};
use crate::output::http::{HttpServer, Latest, TextFn};
use crate::output::jsonl::RotatingFile;
use crate::output::snapshots::Snapshots;
use crate::output::subscribers::Subscribers;
use crate::report::{AdapterRef, ModelRef};
use control::{ControlServer, Handler};
use metrics::Metrics;
use notify::Notifier;
use pipeline::{CaptureCtx, CaptureEnd, Handoff, InferenceCtx, Outputs};
use swap::{Change, Job, Mailbox, SwapCtx, SwapLink, Swapper};

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
    /// The adapter merged in, when exactly one runs.
    pub adapter: Option<AdapterRef>,
    /// The task adapters, in task order, when several run on a shared trunk (else empty).
    pub tasks: Vec<AdapterRef>,
    /// Distinguishes the engines built by one service run (swaps, probation).
    pub generation: u64,
}

/// The model side of a running service: the pristine base, the mailbox to the inference
/// thread and, with an adapter store, the swap thread.
struct Core {
    mailbox: Arc<Mailbox>,
    swapper: Option<Swapper>,
}

impl Engine {
    /// Merges `adapters` at their scales into a copy of `builder`'s base (several: one task
    /// each on a shared trunk) and prepares it; `generation` identifies the result.
    pub fn build(
        builder: &EngineBuilder,
        adapters: &[(&Adapter, f32)],
        generation: u64,
    ) -> Result<Engine, EngineError> {
        let refs: Vec<AdapterRef> = adapters.iter().map(|(a, s)| a.reference(*s)).collect();
        Ok(Engine {
            detector: builder.build_tasks(adapters, None)?,
            model: builder.model_ref(),
            adapter: if refs.len() == 1 {
                refs.first().cloned()
            } else {
                None
            },
            tasks: if refs.len() > 1 { refs } else { Vec::new() },
            generation,
        })
    }
}

/// Builds the engine of a configuration without an adapter store: the base with the fixed
/// `model.adapter`, if any, merged in.
fn fixed_engine(builder: &EngineBuilder, m: &ModelSettings) -> Result<Engine, ServiceError> {
    let config =
        |e: &(dyn std::error::Error + 'static)| ServiceError::Config(crate::exit::one_line(e));
    let adapter = m
        .adapters
        .first()
        .map(|p| builder.load_adapter(p))
        .transpose()
        .map_err(|e| config(&e))?;
    let pairs: Vec<(&Adapter, f32)> = adapter.iter().map(|a| (a, m.adapter_scale)).collect();
    Engine::build(builder, &pairs, 0).map_err(|e| config(&e))
}

/// Loads the base model and builds the engine to start with: the configured `model.adapter`,
/// or, with an adapter store, its persisted (or configured) active adapter.
fn start_core(s: &Settings, metrics: &Arc<Metrics>) -> Result<(Core, Engine), ServiceError> {
    let config = |e: String| ServiceError::Config(e);
    let factory = Arc::new(
        EngineBuilder::load(&s.model)
            .map_err(|e| config(crate::exit::one_line(&e)))?
            .with_frame_size(s.source.size)
            .with_graph_reuse(s.adapters.is_some()),
    );
    let mailbox = Arc::new(Mailbox::default());
    let Some(a) = &s.adapters else {
        let engine = fixed_engine(&factory, &s.model)?;
        return Ok((
            Core {
                mailbox,
                swapper: None,
            },
            engine,
        ));
    };
    let (ctx, engine) =
        SwapCtx::start(factory, a, mailbox.clone(), metrics.clone()).map_err(config)?;
    let swapper = Swapper::start(ctx)
        .map_err(|e| ServiceError::Runtime(format!("cannot start the swap thread: {e}")))?;
    Ok((
        Core {
            mailbox,
            swapper: Some(swapper),
        },
        engine,
    ))
}

/// Validates `settings` the way `perch run` would start: builds the model and opens the
/// source once. Returns a one-line summary.
pub fn check(settings: &Settings) -> Result<String, ServiceError> {
    let config = |e: String| ServiceError::Config(e);
    check_paths(settings, None).map_err(config)?;
    let factory = EngineBuilder::load(&settings.model)
        .map_err(|e| config(crate::exit::one_line(&e)))?
        .with_frame_size(settings.source.size);
    if let Some(a) = &settings.adapters {
        // Read-only: opening the store would clean up a running service's installs.
        if a.store.exists() && !a.store.is_dir() {
            return Err(config(format!(
                "adapters.store: {}: not a directory",
                a.store.display()
            )));
        }
        swap::health_frames(a.health_images.as_deref()).map_err(config)?;
    }
    let engine = fixed_engine(&factory, &settings.model)?;
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

/// Checks, without creating anything, that the files and sockets `s` writes can be opened:
/// the output file is a writable regular file or can be created in an existing directory, each
/// socket path is free or a socket, and the snapshot directory is a directory; and reads the
/// TLS certificates and key `[mqtt]` names. Paths that `running` (the configuration serving
/// now) already holds are taken as good.
pub fn check_paths(s: &Settings, running: Option<&Settings>) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let writable_dir = |key: &str, p: &Path| -> Result<(), String> {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{key}: {}: not a directory", dir.display())),
            // A missing directory may be created before the service starts (systemd's
            // StateDirectory, socket parents on bind): not checked here.
            Err(_) => return Ok(()),
        }
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{key}: {}: invalid path", p.display()))?;
        // SAFETY: access(2) on a NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(format!(
                "{key}: {}: directory is not writable: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if let Some(p) = &s.output.file {
        let held = running.is_some_and(|r| r.output.file.as_ref() == Some(p));
        match std::fs::metadata(p) {
            _ if held => {}
            Ok(m) if !m.is_file() => {
                return Err(format!("output.file: {}: not a regular file", p.display()));
            }
            Ok(_) => {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("output.file: {}: cannot open: {e}", p.display()))?;
            }
            Err(_) => writable_dir("output.file", p)?,
        }
    }
    let sockets = [
        ("control.socket", s.control.as_ref().map(|c| &c.socket)),
        ("output.socket", s.output.socket.as_ref()),
    ];
    for (key, p) in sockets {
        let Some(p) = p else { continue };
        let held = running.is_some_and(|r| {
            r.control.as_ref().map(|c| &c.socket) == Some(p) || r.output.socket.as_ref() == Some(p)
        });
        match std::fs::symlink_metadata(p) {
            _ if held => {}
            Ok(m) if !m.file_type().is_socket() => {
                return Err(format!(
                    "{key}: {}: exists and is not a socket",
                    p.display()
                ));
            }
            Ok(_) => {}
            Err(_) => writable_dir(key, p)?,
        }
    }
    if let Some(sn) = &s.snapshots
        && sn.dir.exists()
        && !sn.dir.is_dir()
    {
        return Err(format!(
            "snapshots.dir: {}: not a directory",
            sn.dir.display()
        ));
    }
    #[cfg(feature = "mqtt")]
    if let Some(m) = &s.mqtt {
        mqtt::check(m).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sockets and servers that live as long as one configuration.
struct Endpoints {
    _control: Option<ControlServer>,
    _http: Option<HttpServer>,
    _framebuffer: Option<FbSink>,
    latest: Option<Arc<Latest>>,
    #[cfg(feature = "mqtt")]
    mqtt: Option<mqtt::Link>,
}

/// Commands of the control socket.
const COMMANDS: &str =
    "status, ping, reload, list, install, stage, activate, deactivate, rollback, remove";
/// How long an adapter command waits for the swap thread (a build takes about a second).
const SWAP_REPLY: Duration = Duration::from_secs(120);
/// How long a `reload` request waits for the new configuration to serve.
const RELOAD_REPLY: Duration = Duration::from_secs(120);

fn str_field<'a>(req: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    req.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{key}\" (a string) is required"))
}

/// The set change an `activate`, `deactivate` or `stage` request asks for: `names` (a list,
/// possibly empty) sets the whole set; `name` with `add: true` adds a task, with `replace:
/// OLD` replaces task OLD, alone sets the set to that one adapter; `deactivate` with `name`
/// stops that task and without it runs the base alone.
fn change_field(cmd: &str, req: &Map<String, Value>) -> Result<Change, String> {
    let scale = scale_field(req)?;
    if cmd == "deactivate" {
        return Ok(match req.get("name") {
            None => Change::Set(Vec::new()),
            Some(_) => Change::Remove(str_field(req, "name")?.to_string()),
        });
    }
    if let Some(v) = req.get("names") {
        let names = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or("\"names\" must be a list of store names")?;
        if req.contains_key("name") || req.contains_key("add") || req.contains_key("replace") {
            return Err(
                "\"names\" sets the whole set; it goes without name, add or replace".into(),
            );
        }
        return Ok(Change::Set(
            names.into_iter().map(|n| (n.to_string(), scale)).collect(),
        ));
    }
    let name = str_field(req, "name")?.to_string();
    let add = match req.get("add") {
        None => false,
        Some(v) => v.as_bool().ok_or("\"add\" must be true or false")?,
    };
    match (add, req.get("replace")) {
        (true, Some(_)) => Err("\"add\" and \"replace\" exclude each other".into()),
        (true, None) => Ok(Change::Add(name, scale)),
        (false, Some(_)) => Ok(Change::Replace {
            old: str_field(req, "replace")?.to_string(),
            new: (name, scale),
        }),
        (false, None) => Ok(Change::Set(vec![(name, scale)])),
    }
}

fn scale_field(req: &Map<String, Value>) -> Result<f32, String> {
    match req.get("scale") {
        None => Ok(1.0),
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && (-10.0..=10.0).contains(s))
            .map(|s| s as f32)
            .ok_or_else(|| "\"scale\" must be a number in -10..=10".into()),
    }
}

/// The control socket's command handler.
fn control_handler(metrics: Arc<Metrics>, reload: Sender<ReloadReply>, swap: SwapLink) -> Handler {
    let reload = Mutex::new(reload);
    Arc::new(move |cmd, req, payload| match cmd {
        "ping" => Ok(Map::new()),
        "status" => match serde_json::to_value(metrics.status()) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("status: cannot serialise".into()),
        },
        "reload" => {
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = reload.lock().expect("reload sender lock").send(Some(tx));
            match rx.recv_timeout(RELOAD_REPLY) {
                Ok(Ok(())) => Ok(Map::from_iter([(
                    "reload".to_string(),
                    Value::from("applied"),
                )])),
                Ok(Err(e)) => Err(format!("reload rejected: {e}")),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
                    "reload not finished after {} s; see status",
                    RELOAD_REPLY.as_secs()
                )),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    Err("the service stopped before the reload was applied".into())
                }
            }
        }
        "list" => swap::ask(&swap, |reply| Job::List { reply }, SWAP_REPLY),
        "install" => {
            let name = str_field(req, "name")?.to_string();
            if payload.is_empty() {
                return Err("install needs the adapter file as payload".into());
            }
            swap::ask(
                &swap,
                |reply| Job::Install {
                    name,
                    bytes: payload,
                    reply,
                },
                SWAP_REPLY,
            )
        }
        "stage" => {
            let change = change_field(cmd, req)?;
            swap::ask(&swap, |reply| Job::Stage { change, reply }, SWAP_REPLY)
        }
        "activate" | "deactivate" => {
            let at = Instant::now();
            let change = change_field(cmd, req)?;
            swap::ask(
                &swap,
                |reply| Job::Activate {
                    change,
                    at,
                    reply: Some(reply),
                },
                SWAP_REPLY,
            )
        }
        "rollback" => swap::ask(&swap, |reply| Job::Rollback { reply }, SWAP_REPLY),
        "remove" => {
            let name = str_field(req, "name")?.to_string();
            swap::ask(&swap, |reply| Job::Remove { name, reply }, SWAP_REPLY)
        }
        other => Err(format!("unknown command '{other}' (commands: {COMMANDS})")),
    })
}

fn start_endpoints(
    s: &Settings,
    metrics: &Arc<Metrics>,
    reload: &Sender<ReloadReply>,
    swap: &SwapLink,
    payload_limit: &Arc<AtomicU64>,
) -> Result<Endpoints, ServiceError> {
    let control = match &s.control {
        Some(c) => {
            let handler = control_handler(metrics.clone(), reload.clone(), swap.clone());
            Some(
                ControlServer::start(&c.socket, c.mode, handler, payload_limit.clone()).map_err(
                    |e| {
                        ServiceError::Runtime(format!("{}: cannot listen: {e}", c.socket.display()))
                    },
                )?,
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
    #[cfg(feature = "mqtt")]
    let mqtt = s
        .mqtt
        .as_ref()
        .map(|m| {
            let handler = control_handler(metrics.clone(), reload.clone(), swap.clone());
            mqtt::Link::start(m, metrics.clone(), handler, payload_limit.clone())
                .map_err(|e| ServiceError::Config(e.to_string()))
        })
        .transpose()?;
    Ok(Endpoints {
        _control: control,
        _http: http,
        _framebuffer: framebuffer,
        latest,
        #[cfg(feature = "mqtt")]
        mqtt,
    })
}

fn start_outputs(s: &Settings, endpoints: &Endpoints) -> Result<Outputs, ServiceError> {
    let latest = endpoints.latest.clone();
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
        #[cfg(feature = "mqtt")]
        mqtt: endpoints.mqtt.as_ref().map(mqtt::Link::detections),
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
        mailbox: &Arc<Mailbox>,
        (metrics, notifier): (&Arc<Metrics>, &Arc<Notifier>),
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
            st.tasks = engine.tasks.clone();
        });
        let handoff = Arc::new(Handoff::default());
        let spawn_err =
            |e: std::io::Error| ServiceError::Runtime(format!("cannot start thread: {e}"));
        let inference = {
            let (h, mb, m, n) = (
                handoff.clone(),
                mailbox.clone(),
                metrics.clone(),
                notifier.clone(),
            );
            let src_name = uri;
            let max_frames = s.source.max_frames;
            std::thread::Builder::new()
                .name("perch-inference".into())
                .spawn(move || {
                    let ctx = InferenceCtx {
                        handoff: &h,
                        mailbox: &mb,
                        metrics: &m,
                        notifier: &n,
                        source_name: &src_name,
                        max_frames,
                    };
                    pipeline::inference_loop(&mut engine, &mut outputs, ctx);
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
    /// A valid new configuration that needs a pipeline restart (and a new core when the model
    /// or the store changed).
    Reload(Box<(Settings, Option<(Core, Engine)>)>),
    /// A new configuration that only changes the adapter to activate: no restart.
    Adopt(Box<Settings>),
}

/// How `perch run` was invoked: the configuration file (for reloads) and command-line
/// overrides applied on top of every version of it.
pub struct Invocation {
    pub config_path: Option<PathBuf>,
    pub overrides: Box<dyn Fn(&mut Settings)>,
}

/// `s` with the adapter selection blanked, to tell selection changes from other changes.
fn without_selection(s: &Settings) -> Settings {
    let mut c = s.clone();
    if let Some(a) = &mut c.adapters {
        a.active = Vec::new();
        a.scale = 1.0;
    }
    c
}

/// The adapters `next` asks for when they differ from what `current` asked for (a
/// configuration that stops naming any keeps what runs).
fn selection_change(current: &Settings, next: &Settings) -> Option<Vec<(String, f32)>> {
    let pick = |s: &Settings| {
        s.adapters.as_ref().map_or(Vec::new(), |a| {
            a.active.iter().map(|n| (n.clone(), a.scale)).collect()
        })
    };
    let wanted = pick(next);
    (!wanted.is_empty() && wanted != pick(current)).then_some(wanted)
}

/// Where a reload request came from: a control client waiting for the outcome (`Ok` once the
/// new configuration serves, or why it was rejected), or a signal (nobody to answer).
pub type ReloadReply = Option<Sender<Result<(), String>>>;

fn answer_reload(reply: ReloadReply, r: Result<(), String>) {
    if let Some(tx) = reply {
        let _ = tx.send(r);
    }
}

fn try_reload(
    inv: &Invocation,
    current: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Event, String> {
    let Some(path) = &inv.config_path else {
        log::warn!("reload requested, but perch runs without a configuration file");
        return Err("perch runs without a configuration file".into());
    };
    let fail = |e: String| {
        log::error!("reload rejected, keeping the running configuration: {e}");
        metrics.update(|s| s.last_error = Some(format!("reload rejected: {e}")));
        Err(e)
    };
    let mut next = match config::load(path) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    (inv.overrides)(&mut next);
    let (plain_next, plain_current) = (without_selection(&next), without_selection(current));
    if plain_next == plain_current && selection_change(current, &next).is_some() {
        return Ok(Event::Adopt(Box::new(next)));
    }
    if let Err(e) = check_paths(&next, Some(current)) {
        return fail(e);
    }
    // File sources are checked now; a camera is busy (held by the running pipeline) and will
    // be retried by the new pipeline anyway, and reading a FIFO's header here would take it
    // from the new pipeline.
    let fifo = matches!(&next.source.kind, camera::SourceKind::Y4m(p) if camera::y4m::is_fifo(p));
    if !fifo
        && let Err(e) = camera::open(&next.source, Arc::new(AtomicBool::new(false)))
        && e.retry == Retry::Never
    {
        return fail(e.to_string());
    }
    let core = if next.model == current.model && plain_next.adapters == plain_current.adapters {
        None
    } else {
        match start_core(&next, metrics) {
            Ok(c) => Some(c),
            Err(e) => return fail(e.to_string()),
        }
    };
    Ok(Event::Reload(Box::new((next, core))))
}

fn wait_event(
    signals: &mut signal_hook::iterator::Signals,
    reload: &Receiver<ReloadReply>,
    pipeline: &Pipeline,
    inv: &Invocation,
    settings: &Settings,
    metrics: &Arc<Metrics>,
    notifier: &Notifier,
) -> (Event, ReloadReply) {
    let mut last_status = Instant::now();
    loop {
        for sig in signals.pending() {
            match sig {
                SIGHUP => {
                    if let Ok(ev) = try_reload(inv, settings, metrics) {
                        return (ev, None);
                    }
                }
                _ => return (Event::Stop, None),
            }
        }
        if let Ok(reply) = reload.try_recv() {
            match try_reload(inv, settings, metrics) {
                Ok(ev) => return (ev, reply),
                Err(e) => answer_reload(reply, Err(e)),
            }
        }
        if pipeline.finished() {
            return (Event::Ended, None);
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

/// Asks the swap thread to activate `target` without waiting for the result (it is logged and
/// shown in the status).
fn activate_async(swap: &SwapLink, target: Vec<(String, f32)>) {
    log::info!(
        "configuration selects {}",
        target
            .iter()
            .map(|(n, s)| format!("adapter '{n}' (scale {s})"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    if let Some(tx) = swap.lock().expect("swap link lock").as_ref() {
        let _ = tx.send(Job::Activate {
            change: Change::Set(target),
            at: Instant::now(),
            reply: None,
        });
    }
}

fn link_core(core: &Core, swap: &SwapLink, limit: &AtomicU64, s: &Settings) {
    *swap.lock().expect("swap link lock") = core.swapper.as_ref().map(Swapper::sender);
    limit.store(
        s.adapters.as_ref().map_or(0, |a| a.max_bytes),
        Ordering::Relaxed,
    );
}

/// Runs the service until SIGTERM/SIGINT (Ok), the end of a finite source (Ok), or a fatal
/// error.
pub fn run(mut settings: Settings, inv: Invocation) -> Result<(), ServiceError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| ServiceError::Runtime(format!("cannot install signal handlers: {e}")))?;
    let notifier = Arc::new(Notifier::from_env());
    let metrics = Arc::new(Metrics::default());
    let (reload_tx, reload_rx) = std::sync::mpsc::channel();
    let (mut core, mut engine) = start_core(&settings, &metrics)?;
    let swap: SwapLink = Arc::new(Mutex::new(None));
    let payload_limit = Arc::new(AtomicU64::new(0));
    link_core(&core, &swap, &payload_limit, &settings);
    let mut seq = 0;
    let mut endpoints = start_endpoints(&settings, &metrics, &reload_tx, &swap, &payload_limit)?;
    let mut pending_reply: ReloadReply = None;
    loop {
        let outputs = start_outputs(&settings, &endpoints)?;
        let pipeline = Pipeline::start(
            &settings,
            engine,
            outputs,
            seq,
            &core.mailbox,
            (&metrics, &notifier),
        )?;
        answer_reload(pending_reply.take(), Ok(()));
        let (event, reply) = loop {
            match wait_event(
                &mut signals,
                &reload_rx,
                &pipeline,
                &inv,
                &settings,
                &metrics,
                &notifier,
            ) {
                (Event::Adopt(next), reply) => {
                    metrics.update(|s| s.reloads += 1);
                    if let Some(t) = selection_change(&settings, &next) {
                        activate_async(&swap, t);
                    }
                    settings = *next;
                    answer_reload(reply, Ok(()));
                }
                (ev, reply) => break (ev, reply),
            }
        };
        pending_reply = reply;
        if matches!(event, Event::Stop) {
            notifier.stopping();
            metrics.update(|s| s.state = "stopping".into());
        }
        let (old_engine, end) = pipeline.stop();
        seq = end.next_seq;
        match event {
            Event::Stop | Event::Adopt(_) => return Ok(()),
            Event::Ended => {
                metrics.update(|s| s.state = "ended".into());
                return end.error.map_or(Ok(()), |e| Err(ServiceError::Runtime(e)));
            }
            Event::Reload(next) => {
                let (next, new_core) = *next;
                notifier.reloading();
                metrics.update(|s| {
                    s.reloads += 1;
                    s.state = "reloading".into();
                });
                log::info!("configuration reloaded");
                let selection = selection_change(&settings, &next);
                match new_core {
                    Some((c, e)) => {
                        // The old engine and swap thread go first, so at most one core lives.
                        drop(old_engine);
                        core = c;
                        engine = e;
                    }
                    None => {
                        // A swap published while the pipeline stopped is taken by the next one.
                        engine = old_engine;
                    }
                }
                link_core(&core, &swap, &payload_limit, &next);
                // The control socket and HTTP endpoint stay up across a reload unless their
                // own settings changed, so clients polling status never see it vanish.
                if next.control != settings.control
                    || next.http != settings.http
                    || next.framebuffer != settings.framebuffer
                    || next.mqtt != settings.mqtt
                    // The link sizes its largest incoming message (an install) by the store.
                    || next.mqtt.as_ref().is_some_and(|m| m.allow_install)
                        && next.adapters.as_ref().map(|a| a.max_bytes)
                            != settings.adapters.as_ref().map(|a| a.max_bytes)
                {
                    drop(endpoints);
                    endpoints =
                        start_endpoints(&next, &metrics, &reload_tx, &swap, &payload_limit)?;
                }
                settings = next;
                if let Some(t) = selection {
                    activate_async(&swap, t);
                }
            }
        }
    }
}

/// Reads `path` and validates it, for `perch run --config`.
pub fn load_settings(path: &Path) -> Result<Settings, ServiceError> {
    config::load(path).map_err(|e| ServiceError::Config(e.to_string()))
}
