//! The service configuration: TOML parsed into validated [`Settings`]. Every error names the
//! file, the line and the key.
//!
//! Relative paths in the file are resolved against the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::camera::{self, PixelFormat, SourceSpec};
use crate::model::Precision;
use crate::postprocess::{Layout, PostprocessParams};

/// A configuration error: `file:line: key: reason`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}: {}{reason}", file.display(), line.map_or(String::new(), |l| format!(":{l}")), key.as_ref().map_or(String::new(), |k| format!("{k}: ")))]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub reason: String,
}

/// The model and how to post-process its output.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub path: PathBuf,
    pub imgsz: Option<(usize, usize)>,
    pub layout: Option<Layout>,
    pub labels: Option<PathBuf>,
    /// Adapters merged into the base: none, one (today's single model), or several, each its
    /// own task on a shared trunk (`perch detect --adapter A --adapter B`; the service's
    /// `model.adapter` names at most one).
    pub adapters: Vec<PathBuf>,
    pub adapter_scale: f32,
    pub params: PostprocessParams,
    /// Numeric precision (`f32` default; `int8` needs `calibration`).
    pub precision: Precision,
    /// Threads splitting each frame's matrix products (default 1).
    pub threads: usize,
    /// int8 activation ranges from `perch calibrate` (default for int8: `M.calibration.json`
    /// beside the model, see [`crate::engine`]).
    pub calibration: Option<PathBuf>,
    /// Whether `calibration` overrides the one an adapter carries (a per-run choice such as
    /// `--calibration`) or is the base model's (`model.calibration`, the service's default).
    pub calibration_role: crate::engine::CalibrationRole,
    /// Run at the smallest stride-aligned input holding the camera frame (`source.width` x
    /// `source.height`) instead of a square, as Ultralytics' predictor letterboxes dynamic
    /// exports. `None` (the default): for dynamic exports whenever the frame size is configured;
    /// `Some(true)` asks for it (a static export keeps its size, with a warning); `Some(false)`
    /// keeps the square.
    pub rect: Option<bool>,
}

impl ModelSettings {
    /// Settings for the model at `path` with perch's defaults: its own input size and layout,
    /// no labels file or adapter, Ultralytics' predict thresholds, f32 on one thread, and a
    /// calibration (for int8) from beside the model.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ModelSettings {
            path: path.into(),
            imgsz: None,
            layout: None,
            labels: None,
            adapters: Vec::new(),
            adapter_scale: 1.0,
            params: PostprocessParams::default(),
            precision: Precision::F32,
            threads: 1,
            calibration: None,
            calibration_role: crate::engine::CalibrationRole::Base,
            rect: None,
        }
    }
}

/// Where JSON records go.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSettings {
    /// One JSON line per frame on stdout (journald under systemd).
    pub stdout: bool,
    /// A JSON-lines file, rotated when it reaches `file_max_bytes`.
    pub file: Option<PathBuf>,
    pub file_max_bytes: u64,
    /// Rotated files kept (`file.1` .. `file.N`).
    pub file_keep: usize,
    /// A UNIX socket where subscribers connect to receive the JSON lines.
    pub socket: Option<PathBuf>,
}

/// Annotated JPEG snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    pub dir: PathBuf,
    /// Take one at least this often.
    pub every: Option<Duration>,
    /// Take one when a detection of these classes (labels) appears ...
    pub on_classes: Vec<String>,
    /// ... but not more often than this.
    pub min_gap: Duration,
    /// Oldest snapshots are deleted to keep the directory's snapshots under this many bytes.
    pub quota_bytes: u64,
}

/// The loopback HTTP endpoint: live MJPEG view and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Frame rate cap of the MJPEG stream.
    pub max_fps: f64,
}

/// A framebuffer screen showing the annotated live view.
#[derive(Debug, Clone, PartialEq)]
pub struct FramebufferSettings {
    pub device: PathBuf,
    pub max_fps: f64,
}

/// The control socket.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSettings {
    pub socket: PathBuf,
    /// File mode of the sockets perch creates.
    pub mode: u32,
}

/// The on-device adapter store and how swaps are checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSettings {
    /// Store directory (created if missing).
    pub store: PathBuf,
    /// Largest adapter file accepted by `install`, in bytes.
    pub max_bytes: u64,
    /// Adapters to activate when the store has no state yet, or when this value changes on
    /// reload: none (the base model), one, or several, each its own task on a shared trunk
    /// (`active = "a"` or `active = ["a", "b"]`).
    pub active: Vec<String>,
    /// LoRA scale for `active` (every task).
    pub scale: f32,
    /// Frames a new adapter must process without an error before it is committed as the last
    /// known good one; 0 commits at once.
    pub probation_frames: u64,
    /// Images every new model must run cleanly on before it is published; built-in synthetic
    /// frames when unset.
    pub health_images: Option<PathBuf>,
}

/// Everything `perch run` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub model: ModelSettings,
    pub source: SourceSpec,
    pub output: OutputSettings,
    pub snapshots: Option<SnapshotSettings>,
    pub http: Option<HttpSettings>,
    pub framebuffer: Option<FramebufferSettings>,
    pub control: Option<ControlSettings>,
    pub adapters: Option<AdapterSettings>,
    pub mqtt: Option<MqttSettings>,
}

/// Which frames go out as detection messages over MQTT (`mqtt.detections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttDetections {
    /// Every processed frame, with or without detections.
    EveryFrame,
    /// Frames with a detection of `mqtt.classes` (any class when empty) scoring at least
    /// `mqtt.min_score`.
    Matching,
    /// None: only status, availability and events.
    Off,
}

/// How perch authenticates to the broker.
#[derive(Clone, PartialEq)]
pub struct MqttCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for MqttCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MqttCredentials {{ username: {:?}, password: \"***\" }}",
            self.username
        )
    }
}

/// `[mqtt]`: the fleet link to an MQTT broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (TLS, default 8883).
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// PEM file of the CA certificates to trust (`mqtts`; default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key (`mqtts`), both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub credentials: Option<MqttCredentials>,
    pub client_id: String,
    /// Topic prefix without a trailing `/` (default `perch/<hostname>`).
    pub prefix: String,
    /// 0, 1 or 2: the QoS of every message perch publishes and of its command subscription.
    pub qos: u8,
    pub keep_alive: Duration,
    /// How often the retained status is refreshed.
    pub status_every: Duration,
    pub detections: MqttDetections,
    pub classes: Vec<String>,
    pub min_score: f32,
    /// At most this many detection messages per second; frames over it are skipped (counted).
    pub max_rate: f64,
    /// Detection messages held while the broker is unreachable or slow (oldest dropped first);
    /// at most 10,000 (memory: about this many records).
    pub queue: usize,
    /// Longest wait between two connection attempts (the wait doubles from 0.5 s).
    pub reconnect_max: Duration,
    /// Whether `<prefix>/cmd` is served; needs credentials or a client certificate.
    pub commands: bool,
    /// Whether `install` is served over MQTT (the adapter file base64-encoded in the message).
    pub allow_install: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: RawModel,
    source: RawSource,
    #[serde(default)]
    output: RawOutput,
    snapshots: Option<RawSnapshots>,
    http: Option<RawHttp>,
    framebuffer: Option<RawFramebuffer>,
    control: Option<RawControl>,
    adapters: Option<RawAdapters>,
    mqtt: Option<RawMqtt>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "mqtt"), allow(dead_code))]
struct RawMqtt {
    url: Spanned<String>,
    client_id: Option<Spanned<String>>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    prefix: Option<Spanned<String>>,
    qos: Option<Spanned<i64>>,
    keep_alive_s: Option<Spanned<i64>>,
    status_every_s: Option<Spanned<f64>>,
    detections: Option<Spanned<String>>,
    #[serde(default)]
    classes: Vec<String>,
    min_score: Option<Spanned<f64>>,
    max_rate: Option<Spanned<f64>>,
    queue: Option<Spanned<i64>>,
    reconnect_max_s: Option<Spanned<f64>>,
    #[serde(default)]
    commands: bool,
    #[serde(default)]
    allow_install: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdapters {
    store: String,
    max_mb: Option<Spanned<f64>>,
    active: Option<Spanned<OneOrMany>>,
    scale: Option<Spanned<f64>>,
    probation_frames: Option<Spanned<i64>>,
    health_images: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFramebuffer {
    device: String,
    max_fps: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Spanned<String>,
    imgsz: Option<Spanned<toml::Value>>,
    layout: Option<Spanned<String>>,
    labels: Option<String>,
    adapter: Option<Spanned<String>>,
    adapter_scale: Option<Spanned<f64>>,
    conf: Option<Spanned<f64>>,
    iou: Option<Spanned<f64>>,
    max_det: Option<Spanned<i64>>,
    classes: Option<Vec<usize>>,
    #[serde(default)]
    agnostic_nms: bool,
    precision: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
    calibration: Option<String>,
    rect: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    uri: Spanned<String>,
    width: Option<Spanned<i64>>,
    height: Option<Spanned<i64>>,
    fps: Option<Spanned<f64>>,
    format: Option<Spanned<String>>,
    realtime: Option<bool>,
    #[serde(rename = "loop", default)]
    looped: bool,
    frames: Option<Spanned<i64>>,
    stall_timeout_s: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default = "yes")]
    stdout: bool,
    file: Option<String>,
    file_max_bytes: Option<Spanned<i64>>,
    file_keep: Option<Spanned<i64>>,
    socket: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for RawOutput {
    fn default() -> Self {
        RawOutput {
            stdout: true,
            file: None,
            file_max_bytes: None,
            file_keep: None,
            socket: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnapshots {
    dir: String,
    every_s: Option<Spanned<f64>>,
    #[serde(default)]
    on_classes: Vec<String>,
    min_gap_s: Option<Spanned<f64>>,
    quota_mb: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Spanned<String>,
    max_fps: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: String,
    mode: Option<Spanned<String>>,
}

/// Validation context: turns spans into line numbers.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    base: PathBuf,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn err<T>(&self, at: &Spanned<T>, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(self.line_of(at.span().start)),
            key: Some(key.into()),
            reason: reason.into(),
        }
    }

    fn missing(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: None,
            key: Some(key.into()),
            reason: reason.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn in_range(
        &self,
        v: &Option<Spanned<f64>>,
        key: &str,
        lo: f64,
        hi: f64,
        default: f64,
    ) -> Result<f64, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(*s.get_ref()),
            Some(s) => Err(self.err(s, key, format!("{} is outside {lo}..={hi}", s.get_ref()))),
        }
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        lo: i64,
        hi: i64,
    ) -> Result<Option<i64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(Some(*s.get_ref())),
            Some(s) => Err(self.err(s, key, format!("{} is outside {lo}..={hi}", s.get_ref()))),
        }
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = crate::fsutil::read_text(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parses and validates configuration `text`; `file` names it in errors and anchors relative
/// paths.
pub fn parse(text: &str, file: &Path) -> Result<Settings, ConfigError> {
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let ctx = Ctx { file, text, base };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: e.span().map(|s| ctx.line_of(s.start)),
        key: None,
        reason: e.message().trim().to_string(),
    })?;
    let model_adapter = raw.model.adapter.clone();
    let rect = raw.model.rect.clone();
    let source = source(&ctx, raw.source)?;
    if let Some(r) = rect.filter(|r| *r.get_ref())
        && source.size.is_none()
    {
        return Err(ctx.err(
            &r,
            "model.rect",
            "needs source.width and source.height (the frame size to fit)",
        ));
    }
    Ok(Settings {
        model: model(&ctx, raw.model)?,
        source,
        output: output(&ctx, raw.output)?,
        snapshots: raw.snapshots.map(|s| snapshots(&ctx, s)).transpose()?,
        http: raw.http.map(|h| http(&ctx, h)).transpose()?,
        framebuffer: raw
            .framebuffer
            .map(|f| -> Result<_, ConfigError> {
                Ok(FramebufferSettings {
                    device: ctx.path(&f.device),
                    max_fps: ctx.in_range(&f.max_fps, "framebuffer.max_fps", 0.1, 120.0, 10.0)?,
                })
            })
            .transpose()?,
        control: raw.control.map(|c| control(&ctx, c)).transpose()?,
        adapters: match raw.adapters {
            None => None,
            Some(a) => {
                if let Some(p) = &model_adapter {
                    return Err(ctx.err(
                        p,
                        "model.adapter",
                        "cannot be combined with [adapters]: the store decides which adapter runs",
                    ));
                }
                Some(adapters(&ctx, a)?)
            }
        },
        mqtt: match raw.mqtt {
            None => None,
            #[cfg(feature = "mqtt")]
            Some(m) => Some(mqtt(&ctx, m)?),
            #[cfg(not(feature = "mqtt"))]
            Some(m) => {
                return Err(ctx.err(
                    &m.url,
                    "mqtt",
                    "this perch was built without the mqtt feature",
                ));
            }
        },
    })
}

/// This machine's host name, for the default MQTT client id and topic prefix.
#[cfg(feature = "mqtt")]
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `len` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
        _ => "localhost".to_string(),
    }
}

/// Whether `topic` is a usable MQTT topic prefix: non-empty, no wildcard or NUL, no leading or
/// trailing `/`, at most 512 bytes.
#[cfg(feature = "mqtt")]
fn check_prefix(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 512 {
        return Err("must be 1 to 512 bytes".into());
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!("'{topic}' contains a wildcard (+ or #) or NUL"));
    }
    if topic.starts_with('/') || topic.ends_with('/') || topic.contains("//") {
        return Err(format!(
            "'{topic}' has an empty level (leading, trailing or double /)"
        ));
    }
    Ok(())
}

#[cfg(feature = "mqtt")]
fn mqtt(ctx: &Ctx, m: RawMqtt) -> Result<MqttSettings, ConfigError> {
    let url_err = |why: &str| ctx.err(&m.url, "mqtt.url", why.to_string());
    let u = url::Url::parse(m.url.get_ref())
        .map_err(|e| url_err(&format!("not a URL ({e}); e.g. mqtt://127.0.0.1:1883")))?;
    let tls = match u.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        s => return Err(url_err(&format!("scheme '{s}' is not mqtt:// or mqtts://"))),
    };
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(h) => h.to_string(),
        None => return Err(url_err("has no host")),
    };
    if !u.username().is_empty() || u.password().is_some() {
        return Err(url_err(
            "carries credentials; set mqtt.username and mqtt.password_file instead",
        ));
    }
    if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
        return Err(url_err("must be only scheme://host[:port]"));
    }
    let port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
    let password = match (m.password, &m.password_file) {
        (Some(_), Some(_)) => {
            return Err(ctx.missing("mqtt.password", "set password or password_file, not both"));
        }
        (Some(p), None) => Some(p),
        (None, Some(f)) => {
            let path = ctx.path(f);
            let text = crate::fsutil::read_text(&path).map_err(|e| {
                ctx.missing(
                    "mqtt.password_file",
                    format!("{}: cannot read: {e}", path.display()),
                )
            })?;
            Some(text.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, None) => None,
    };
    let credentials = match (m.username, password) {
        (Some(username), password) => Some(MqttCredentials {
            username,
            password: password.unwrap_or_default(),
        }),
        (None, Some(_)) => {
            return Err(ctx.missing("mqtt.username", "required with a password"));
        }
        (None, None) => None,
    };
    let client_cert = match (&m.cert_file, &m.key_file) {
        (Some(c), Some(k)) => Some((ctx.path(c), ctx.path(k))),
        (None, None) => None,
        (Some(_), None) => return Err(ctx.missing("mqtt.key_file", "required with cert_file")),
        (None, Some(_)) => return Err(ctx.missing("mqtt.cert_file", "required with key_file")),
    };
    if !tls && (client_cert.is_some() || m.ca_file.is_some()) {
        return Err(url_err(
            "is plain mqtt://, but ca_file or cert_file is set (use mqtts://)",
        ));
    }
    let host_name = hostname();
    let client_id = match &m.client_id {
        None => format!("perch-{host_name}"),
        Some(c) if c.get_ref().is_empty() || c.get_ref().len() > 256 => {
            return Err(ctx.err(c, "mqtt.client_id", "must be 1 to 256 bytes"));
        }
        Some(c) => c.get_ref().clone(),
    };
    let prefix = match &m.prefix {
        None => format!("perch/{host_name}"),
        Some(p) => {
            check_prefix(p.get_ref()).map_err(|e| ctx.err(p, "mqtt.prefix", e))?;
            p.get_ref().clone()
        }
    };
    if m.prefix.is_none() {
        check_prefix(&prefix).map_err(|e| {
            ctx.missing(
                "mqtt.prefix",
                format!("the default from the host name is unusable ({e}); set one"),
            )
        })?;
    }
    let detections = match &m.detections {
        None => MqttDetections::Matching,
        Some(d) => match d.get_ref().as_str() {
            "every_frame" => MqttDetections::EveryFrame,
            "matching" => MqttDetections::Matching,
            "off" => MqttDetections::Off,
            other => {
                return Err(ctx.err(
                    d,
                    "mqtt.detections",
                    format!("unknown '{other}' (every_frame, matching, off)"),
                ));
            }
        },
    };
    let has_password = credentials.as_ref().is_some_and(|c| !c.password.is_empty());
    if m.commands && !has_password && client_cert.is_none() {
        return Err(ctx.missing(
            "mqtt.commands",
            "needs an authenticated connection: set username and a non-empty password(_file), \
             or cert_file and key_file",
        ));
    }
    if m.allow_install && !m.commands {
        return Err(ctx.missing("mqtt.allow_install", "needs mqtt.commands = true"));
    }
    let secs = |v: &Option<Spanned<f64>>, key: &str, lo: f64, hi: f64, default: f64| {
        ctx.in_range(v, key, lo, hi, default)
            .map(Duration::from_secs_f64)
    };
    Ok(MqttSettings {
        host,
        port,
        tls,
        ca_file: m.ca_file.as_deref().map(|p| ctx.path(p)),
        client_cert,
        credentials,
        client_id,
        prefix,
        qos: ctx.count(&m.qos, "mqtt.qos", 0, 2)?.map_or(1, |q| q as u8),
        keep_alive: Duration::from_secs(
            ctx.count(&m.keep_alive_s, "mqtt.keep_alive_s", 5, 3600)?
                .map_or(30, |k| k as u64),
        ),
        status_every: secs(&m.status_every_s, "mqtt.status_every_s", 0.1, 3600.0, 5.0)?,
        detections,
        classes: m.classes,
        min_score: ctx.in_range(&m.min_score, "mqtt.min_score", 0.0, 1.0, 0.0)? as f32,
        max_rate: ctx.in_range(&m.max_rate, "mqtt.max_rate", 0.01, 10_000.0, 10.0)?,
        queue: ctx
            .count(&m.queue, "mqtt.queue", 1, 10_000)?
            .map_or(256, |q| q as usize),
        reconnect_max: secs(
            &m.reconnect_max_s,
            "mqtt.reconnect_max_s",
            0.5,
            3600.0,
            30.0,
        )?,
        commands: m.commands,
        allow_install: m.allow_install,
    })
}

/// A string or an array of strings.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "adapters.active: a store name or a list of store names"
)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn adapters(ctx: &Ctx, a: RawAdapters) -> Result<AdapterSettings, ConfigError> {
    let mut active = Vec::new();
    if let Some(n) = &a.active {
        let names = match n.get_ref() {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        for name in &names {
            crate::adapter::store::check_name(name)
                .map_err(|e| ctx.err(n, "adapters.active", e.to_string()))?;
            if active.contains(name) {
                return Err(ctx.err(
                    n,
                    "adapters.active",
                    format!("'{name}' is named twice; each task runs once"),
                ));
            }
            active.push(name.clone());
        }
        let max = crate::service::swap::MAX_TASKS;
        if active.len() > max {
            return Err(ctx.err(
                n,
                "adapters.active",
                format!(
                    "{} adapters named; at most {max} run together",
                    active.len()
                ),
            ));
        }
    }
    Ok(AdapterSettings {
        store: ctx.path(&a.store),
        max_bytes: (ctx.in_range(&a.max_mb, "adapters.max_mb", 0.001, 256.0, 64.0)? * 1048576.0)
            as u64,
        active,
        scale: ctx.in_range(&a.scale, "adapters.scale", -10.0, 10.0, 1.0)? as f32,
        probation_frames: ctx
            .count(
                &a.probation_frames,
                "adapters.probation_frames",
                0,
                1_000_000,
            )?
            .map_or(100, |n| n as u64),
        health_images: a.health_images.as_deref().map(|p| ctx.path(p)),
    })
}

fn model(ctx: &Ctx, m: RawModel) -> Result<ModelSettings, ConfigError> {
    if m.path.get_ref().is_empty() {
        return Err(ctx.err(&m.path, "model.path", "must not be empty"));
    }
    let imgsz = match &m.imgsz {
        None => None,
        Some(s) => {
            let hw = match s.get_ref() {
                toml::Value::Integer(n) => Some((*n, *n)),
                toml::Value::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
                    (toml::Value::Integer(h), toml::Value::Integer(w)) => Some((*h, *w)),
                    _ => None,
                },
                _ => None,
            };
            match hw {
                Some((h, w)) if (1..=8192).contains(&h) && (1..=8192).contains(&w) => {
                    Some((h as usize, w as usize))
                }
                _ => {
                    return Err(ctx.err(
                        s,
                        "model.imgsz",
                        "must be N or [H, W] with sizes 1..=8192",
                    ));
                }
            }
        }
    };
    let layout = m
        .layout
        .as_ref()
        .map(|l| {
            l.get_ref()
                .parse::<Layout>()
                .map_err(|e| ctx.err(l, "model.layout", e))
        })
        .transpose()?;
    let defaults = PostprocessParams::default();
    let params = PostprocessParams {
        conf: ctx.in_range(&m.conf, "model.conf", 0.0, 1.0, 0.25)? as f32,
        iou: ctx.in_range(&m.iou, "model.iou", 0.0, 1.0, f64::from(defaults.iou))? as f32,
        max_det: ctx
            .count(&m.max_det, "model.max_det", 1, 100_000)?
            .map_or(defaults.max_det, |n| n as usize),
        classes: m.classes,
        agnostic: m.agnostic_nms,
    };
    if let (Some(scale), None) = (&m.adapter_scale, &m.adapter) {
        return Err(ctx.err(scale, "model.adapter_scale", "set without model.adapter"));
    }
    let precision = match &m.precision {
        None => Precision::F32,
        Some(p) => p
            .get_ref()
            .parse::<Precision>()
            .map_err(|e| ctx.err(p, "model.precision", e))?,
    };
    if let (Some(p), None) = (&m.precision, &m.calibration)
        && precision == Precision::Int8
        && !crate::engine::calibration_beside(&ctx.path(m.path.get_ref())).exists()
    {
        return Err(ctx.err(
            p,
            "model.precision",
            "int8 needs model.calibration, or M.calibration.json beside the model M.onnx (perch calibrate)",
        ));
    }
    Ok(ModelSettings {
        path: ctx.path(m.path.get_ref()),
        imgsz,
        layout,
        labels: m.labels.as_deref().map(|p| ctx.path(p)),
        adapters: m.adapter.iter().map(|p| ctx.path(p.get_ref())).collect(),
        adapter_scale: ctx.in_range(&m.adapter_scale, "model.adapter_scale", -10.0, 10.0, 1.0)?
            as f32,
        params,
        precision,
        threads: ctx
            .count(&m.threads, "model.threads", 1, 256)?
            .map_or(1, |n| n as usize),
        calibration: m.calibration.as_deref().map(|p| ctx.path(p)),
        calibration_role: crate::engine::CalibrationRole::Base,
        rect: m.rect.as_ref().map(|r| *r.get_ref()),
    })
}

fn source(ctx: &Ctx, s: RawSource) -> Result<SourceSpec, ConfigError> {
    let uri = s.uri.get_ref();
    let kind = camera::parse_uri(uri).map_err(|e| ctx.err(&s.uri, "source.uri", e))?;
    // File sources are relative to the configuration, like every other path.
    let kind = match kind {
        camera::SourceKind::Y4m(p) => camera::SourceKind::Y4m(ctx.path(&p.to_string_lossy())),
        camera::SourceKind::Images(p) => {
            camera::SourceKind::Images(ctx.path(&p).to_string_lossy().into_owned())
        }
        k => k,
    };
    let mut spec = SourceSpec::new(kind);
    let w = ctx.count(&s.width, "source.width", 16, 16384)?;
    let h = ctx.count(&s.height, "source.height", 16, 16384)?;
    spec.size = match (w, h) {
        (Some(w), Some(h)) => Some((w as usize, h as usize)),
        (None, None) => None,
        (Some(_), None) => return Err(ctx.missing("source.height", "required with source.width")),
        (None, Some(_)) => return Err(ctx.missing("source.width", "required with source.height")),
    };
    spec.fps = match &s.fps {
        Some(f) if !(f.get_ref().is_finite() && *f.get_ref() > 0.0 && *f.get_ref() <= 1000.0) => {
            return Err(ctx.err(
                f,
                "source.fps",
                format!("{} is outside (0, 1000]", f.get_ref()),
            ));
        }
        f => f.as_ref().map(|f| *f.get_ref()),
    };
    spec.format = s
        .format
        .as_ref()
        .filter(|f| f.get_ref() != "auto")
        .map(|f| {
            PixelFormat::from_name(f.get_ref()).ok_or_else(|| {
                ctx.err(
                    f,
                    "source.format",
                    format!(
                        "unknown '{}' (auto, yuyv, uyvy, nv12, yu12, rgb24, bgr24, mjpeg, grey)",
                        f.get_ref()
                    ),
                )
            })
        })
        .transpose()?;
    spec.realtime = s.realtime.unwrap_or(true);
    spec.looped = s.looped;
    spec.max_frames = ctx
        .count(&s.frames, "source.frames", 1, i64::MAX)?
        .map(|n| n as u64);
    spec.stall_timeout = Duration::from_secs_f64(ctx.in_range(
        &s.stall_timeout_s,
        "source.stall_timeout_s",
        0.1,
        3600.0,
        5.0,
    )?);
    Ok(spec)
}

fn output(ctx: &Ctx, o: RawOutput) -> Result<OutputSettings, ConfigError> {
    Ok(OutputSettings {
        stdout: o.stdout,
        file: o.file.as_deref().map(|p| ctx.path(p)),
        file_max_bytes: ctx
            .count(&o.file_max_bytes, "output.file_max_bytes", 4096, i64::MAX)?
            .map_or(64 << 20, |n| n as u64),
        file_keep: ctx
            .count(&o.file_keep, "output.file_keep", 0, 1000)?
            .map_or(3, |n| n as usize),
        socket: o.socket.as_deref().map(|p| ctx.path(p)),
    })
}

fn snapshots(ctx: &Ctx, s: RawSnapshots) -> Result<SnapshotSettings, ConfigError> {
    let secs = |v: &Option<Spanned<f64>>, key: &str| {
        v.as_ref()
            .map(|x| {
                if x.get_ref().is_finite() && *x.get_ref() >= 0.0 {
                    Ok(Duration::from_secs_f64(*x.get_ref()))
                } else {
                    Err(ctx.err(x, key, "must be a number of seconds >= 0"))
                }
            })
            .transpose()
    };
    let every = secs(&s.every_s, "snapshots.every_s")?;
    if every.is_none() && s.on_classes.is_empty() {
        return Err(ctx.missing(
            "snapshots",
            "set every_s, on_classes or both (otherwise no snapshot is ever taken)",
        ));
    }
    let quota = ctx.in_range(&s.quota_mb, "snapshots.quota_mb", 0.1, 1e7, 100.0)?;
    Ok(SnapshotSettings {
        dir: ctx.path(&s.dir),
        every,
        on_classes: s.on_classes,
        min_gap: secs(&s.min_gap_s, "snapshots.min_gap_s")?.unwrap_or(Duration::from_secs(10)),
        quota_bytes: (quota * 1e6) as u64,
    })
}

fn http(ctx: &Ctx, h: RawHttp) -> Result<HttpSettings, ConfigError> {
    let listen: SocketAddr = h.listen.get_ref().parse().map_err(|_| {
        ctx.err(
            &h.listen,
            "http.listen",
            "must be IP:PORT, e.g. 127.0.0.1:8090",
        )
    })?;
    if !listen.ip().is_loopback() {
        return Err(ctx.err(
            &h.listen,
            "http.listen",
            format!(
                "{} is not a loopback address; the live view is for local use only (tunnel it \
                 over SSH to view it remotely)",
                listen.ip()
            ),
        ));
    }
    Ok(HttpSettings {
        listen,
        max_fps: ctx.in_range(&h.max_fps, "http.max_fps", 0.1, 120.0, 10.0)?,
    })
}

fn control(ctx: &Ctx, c: RawControl) -> Result<ControlSettings, ConfigError> {
    let mode = match &c.mode {
        None => 0o660,
        Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 && v & 0o007 == 0 => v,
            Ok(_) => {
                return Err(ctx.err(
                    m,
                    "control.mode",
                    "must not grant access to others (e.g. \"0660\")",
                ));
            }
            Err(_) => {
                return Err(ctx.err(m, "control.mode", "must be an octal mode such as \"0660\""));
            }
        },
    };
    Ok(ControlSettings {
        socket: ctx.path(&c.socket),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
path = "models/m.onnx"
conf = 0.4
imgsz = [320, 480]

[source]
uri = "y4m:clip.y4m"
fps = 12.5
frames = 100

[output]
file = "/var/lib/perch/out.jsonl"
socket = "records.sock"

[snapshots]
dir = "snaps"
on_classes = ["Tree"]

[http]
listen = "127.0.0.1:8090"

[control]
socket = "/run/perch/control.sock"
"#;

    fn parse_str(text: &str) -> Result<Settings, ConfigError> {
        parse(text, Path::new("/etc/perch/perch.toml"))
    }

    /// `adapters.active` is one name or a list of task names; duplicates and bad names are
    /// refused with the line and key.
    #[test]
    fn active_adapters_are_one_name_or_a_list() {
        let with = |active: &str| {
            parse_str(&format!(
                "{GOOD}\n[adapters]\nstore = \"store\"\nactive = {active}\n"
            ))
        };
        let active = |s: Settings| s.adapters.unwrap().active;
        assert_eq!(active(with("\"osbs\"").unwrap()), ["osbs"]);
        assert_eq!(
            active(with("[\"osbs\", \"soap\"]").unwrap()),
            ["osbs", "soap"]
        );
        assert!(active(with("[]").unwrap()).is_empty());
        for (bad, why) in [
            ("[\"osbs\", \"osbs\"]", "named twice"),
            ("[\"../x\"]", "adapters.active"),
            ("7", "adapters.active"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// `[mqtt]`: defaults, URL forms, and each refusal naming its key.
    #[cfg(feature = "mqtt")]
    #[test]
    fn mqtt_settings() {
        let with = |body: &str| parse_str(&format!("{GOOD}\n[mqtt]\n{body}\n"));
        let m = with("url = \"mqtt://broker.lan\"").unwrap().mqtt.unwrap();
        assert_eq!(
            (m.host.as_str(), m.port, m.tls),
            ("broker.lan", 1883, false)
        );
        assert!(m.prefix.starts_with("perch/") && m.client_id.starts_with("perch-"));
        assert_eq!((m.qos, m.queue, m.commands), (1, 256, false));
        assert_eq!(m.detections, MqttDetections::Matching);
        assert_eq!(m.credentials, None);
        let m = with(
            "url = \"mqtts://[::1]:9000\"\nca_file = \"ca.pem\"\nusername = \"u\"\n\
             password = \"p\"\ncommands = true\nprefix = \"fleet/a/b\"\ndetections = \"off\"",
        )
        .unwrap()
        .mqtt
        .unwrap();
        assert_eq!((m.host.as_str(), m.port, m.tls), ("::1", 9000, true));
        assert_eq!(m.ca_file.as_deref(), Some(Path::new("/etc/perch/ca.pem")));
        assert_eq!(m.credentials.as_ref().unwrap().password, "p");
        assert!(
            !format!("{m:?}").contains("\"p\""),
            "the password stays out of Debug"
        );
        assert_eq!(
            (m.prefix.as_str(), m.detections),
            ("fleet/a/b", MqttDetections::Off)
        );
        for (body, why) in [
            ("url = \"http://x\"", "mqtt.url"),
            ("url = \"mqtt://\"", "mqtt.url"),
            ("url = \"mqtt://u:p@x\"", "carries credentials"),
            ("url = \"mqtt://x/topic\"", "scheme://host[:port]"),
            ("url = \"mqtt://x\"\nca_file = \"c\"", "use mqtts://"),
            ("url = \"mqtt://x\"\ncommands = true", "authenticated"),
            (
                "url = \"mqtt://x\"\nusername = \"u\"\ncommands = true",
                "non-empty password",
            ),
            ("url = \"mqtt://x\"\nqueue = 10001", "mqtt.queue"),
            ("url = \"mqtt://x\"\nallow_install = true", "mqtt.commands"),
            ("url = \"mqtt://x\"\nprefix = \"a/#\"", "wildcard"),
            ("url = \"mqtt://x\"\nprefix = \"a/\"", "empty level"),
            ("url = \"mqtt://x\"\nqos = 3", "mqtt.qos"),
            ("url = \"mqtt://x\"\npassword = \"p\"", "mqtt.username"),
            (
                "url = \"mqtt://x\"\nusername = \"u\"\npassword = \"p\"\npassword_file = \"f\"",
                "not both",
            ),
            (
                "url = \"mqtt://x\"\npassword_file = \"/nonexistent/pw\"\nusername = \"u\"",
                "cannot read",
            ),
            ("url = \"mqtts://x\"\ncert_file = \"c\"", "mqtt.key_file"),
            (
                "url = \"mqtt://x\"\ndetections = \"some\"",
                "every_frame, matching, off",
            ),
            ("url = \"mqtt://x\"\nbogus = 1", "unknown field"),
        ] {
            let e = with(body).unwrap_err().to_string();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn parses_and_resolves_paths() {
        let s = parse_str(GOOD).unwrap();
        assert_eq!(s.model.path, Path::new("/etc/perch/models/m.onnx"));
        assert_eq!(s.model.imgsz, Some((320, 480)));
        assert_eq!(
            (s.model.precision, s.model.threads, &s.model.calibration),
            (Precision::F32, 1, &None)
        );
        let q = parse_str(&GOOD.replace(
            "imgsz = [320, 480]",
            "precision = \"int8\"\ncalibration = \"m.cal.json\"\nthreads = 2",
        ))
        .unwrap();
        assert_eq!(q.model.precision, Precision::Int8);
        assert_eq!(q.model.threads, 2);
        assert_eq!(
            q.model.calibration.as_deref(),
            Some(Path::new("/etc/perch/m.cal.json"))
        );
        assert_eq!(s.model.params.conf, 0.4);
        assert_eq!(
            s.source.kind,
            camera::SourceKind::Y4m("/etc/perch/clip.y4m".into())
        );
        assert_eq!((s.source.fps, s.source.max_frames), (Some(12.5), Some(100)));
        assert_eq!(s.output.socket, Some("/etc/perch/records.sock".into()));
        assert_eq!(s.snapshots.unwrap().quota_bytes, 100_000_000);
        assert_eq!(s.control.unwrap().mode, 0o660);
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases = [
            (
                GOOD.replace("conf = 0.4", "conf = 1.5"),
                "perch.toml:4: model.conf: 1.5 is outside",
            ),
            (
                GOOD.replace("fps = 12.5", "fps = -1.0"),
                "perch.toml:9: source.fps:",
            ),
            (
                GOOD.replace("fps = 12.5", "fpss = 1.0"),
                "perch.toml:9: unknown field `fpss`",
            ),
            (
                GOOD.replace("127.0.0.1:8090", "0.0.0.0:8090"),
                "perch.toml:21: http.listen: 0.0.0.0 is not a loopback",
            ),
            (
                GOOD.replace("y4m:clip.y4m", "rtsp://x"),
                "perch.toml:8: source.uri:",
            ),
            (
                GOOD.replace("on_classes = [\"Tree\"]", ""),
                "perch.toml: snapshots: set every_s",
            ),
            (
                GOOD.replace("[model]\npath = \"models/m.onnx\"", "[model]"),
                "missing field `path`",
            ),
            (
                GOOD.replace("conf = 0.4", "conf = \"high\""),
                "perch.toml:4: invalid type",
            ),
            (
                GOOD.replace(
                    "socket = \"/run/perch/control.sock\"",
                    "socket = \"/run/c\"\nmode = \"0666\"",
                ),
                "control.mode: must not grant",
            ),
            (
                GOOD.replace("imgsz = [320, 480]", "imgsz = 0"),
                "perch.toml:5: model.imgsz",
            ),
            (
                GOOD.replace("imgsz = [320, 480]", "precision = \"f64\""),
                "perch.toml:5: model.precision: 'f64' is not a precision",
            ),
            (
                GOOD.replace("imgsz = [320, 480]", "precision = \"int8\""),
                "model.precision: int8 needs model.calibration",
            ),
            (
                GOOD.replace("imgsz = [320, 480]", "threads = 0"),
                "perch.toml:5: model.threads",
            ),
            (
                GOOD.replace("imgsz = [320, 480]", "rect = true"),
                "perch.toml:5: model.rect: needs source.width",
            ),
            ("[model\n".to_string(), "perch.toml:1:"),
        ];
        for (text, want) in cases {
            let e = parse_str(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("/etc/perch/") && e.contains(want),
                "want '{want}' in '{e}'"
            );
        }
        let e = load(Path::new("/nonexistent/perch.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/perch.toml: cannot read:"),
            "{e}"
        );
    }
}
