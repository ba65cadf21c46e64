//! The fleet link: an MQTT 3.1.1 connection (rumqttc, TLS through rustls) that publishes
//! detections, a retained status, availability and service events, and, when enabled, serves
//! control commands from `<prefix>/cmd`.
//!
//! Topics under the configured prefix:
//! - `availability`: `online` (retained) once connected; `offline` (retained) on a clean
//!   stop, and the broker's last will when the connection dies.
//! - `status`: the status report (as the control socket's `status`), retained, refreshed every
//!   `status_every_s` and on every connect.
//! - `detections`: frame records, the same JSON as the records file, filtered and rate limited.
//! - `events`: adapter swaps, rollbacks, refusals, installs and removals.
//! - `cmd` (subscribed, with `commands = true`) and `cmd/reply`: requests and replies as on the
//!   control socket, correlated by the request's `id`.
//!
//! Nothing here blocks the frame pipeline: the pipeline and the swap thread only push into
//! bounded in-memory queues that drop their oldest message when full (counted in the status).
//! A publisher thread hands queued messages to the connection while it is up; the network
//! thread drives the connection and reconnects with a doubling wait (0.5 s up to
//! `reconnect_max_s`; a connection that ends within seconds does not reset the wait). Each
//! outage is logged once. Messages in flight when a connection breaks are lost with the
//! session, which starts clean on every connect. Retained command messages are ignored (they
//! would run again on every reconnect); commands wait in a queue bounded in count and bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rumqttc::{
    Client, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, NetworkOptions,
    Outgoing, Packet, QoS, Transport,
};
use serde_json::{Map, Value};

use super::control::Handler;
use super::metrics::Metrics;
use super::status::MqttStatus;
use crate::config::{MqttDetections, MqttSettings};

/// Events, replies and status messages held for the connection (oldest dropped first).
const CONTROL_QUEUE: usize = 256;
/// Commands waiting for the command thread; more get a "busy" reply.
const COMMAND_QUEUE: usize = 16;
/// Requests rumqttc buffers between the publisher thread and the connection.
const CLIENT_CHANNEL: usize = 16;
/// Largest incoming message without `allow_install` (a command line).
const MAX_COMMAND: usize = 64 * 1024;
/// Largest outgoing message (a frame record with many detections).
const MAX_OUTGOING: usize = 4 << 20;
/// How long a clean stop waits to say `offline` and disconnect.
const STOP_WAIT: Duration = Duration::from_secs(3);
/// Commands served over MQTT (`reload` re-reads a local file and stays local).
const REMOTE_COMMANDS: [&str; 9] = [
    "status",
    "ping",
    "list",
    "stage",
    "activate",
    "deactivate",
    "rollback",
    "remove",
    "install",
];

/// A command message for the command thread; its size is counted in `queued` until taken.
struct CommandMsg {
    payload: Vec<u8>,
    queued: Arc<AtomicU64>,
}

/// One message for the broker.
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

#[derive(Default)]
struct Queues {
    /// Replies, events, availability: served first.
    control: VecDeque<Msg>,
    detections: VecDeque<Msg>,
}

/// Connection state shared by the network and publisher threads.
#[derive(Default)]
struct Conn {
    connected: bool,
    /// Counts accepted connections; the publisher re-subscribes and says `online` on each.
    session: u64,
    /// When the network thread gave up (all clients gone or stopping).
    ended: bool,
}

struct Shared {
    settings: MqttSettings,
    /// The largest incoming message the connection accepts, in bytes.
    max_incoming: usize,
    broker: String,
    queues: Mutex<Queues>,
    conn: Mutex<Conn>,
    /// Signalled on queue pushes, connection changes and stop.
    wake: Condvar,
    stop: AtomicBool,
    published: AtomicU64,
    dropped: AtomicU64,
    rate_limited: AtomicU64,
    commands: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// When the last detection message was queued (for `max_rate`).
    last_detection: Mutex<Option<Instant>>,
}

impl Shared {
    fn new(settings: MqttSettings, broker: String) -> Shared {
        Shared {
            settings,
            max_incoming: MAX_COMMAND,
            broker,
            queues: Mutex::default(),
            conn: Mutex::default(),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_detection: Mutex::new(None),
        }
    }

    /// (connected, session, ended) of the connection.
    fn conn_state(&self) -> (bool, u64, bool) {
        let c = self.conn.lock().expect("mqtt conn lock");
        (c.connected, c.session, c.ended)
    }

    /// Records a connection change (`new_session`: a connection was accepted) and wakes the
    /// publisher.
    fn set_connected(&self, connected: bool, new_session: bool) {
        {
            let mut c = self.conn.lock().expect("mqtt conn lock");
            c.connected = connected;
            if new_session {
                c.session += 1;
            }
        }
        self.notify();
    }

    /// Wakes the publisher; taking the queue lock first means a publisher between its checks
    /// and its wait cannot miss it.
    fn notify(&self) {
        drop(self.queues.lock().expect("mqtt queue lock"));
        self.wake.notify_all();
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.settings.prefix)
    }

    fn qos(&self) -> QoS {
        match self.settings.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    /// Queues `msg` (a control message when `control`), dropping the oldest of its queue when
    /// full. Never blocks beyond the queue lock.
    fn push(&self, msg: Msg, control: bool) {
        let mut q = self.queues.lock().expect("mqtt queue lock");
        let (queue, cap) = if control {
            (&mut q.control, CONTROL_QUEUE)
        } else {
            (&mut q.detections, self.settings.queue)
        };
        if queue.len() >= cap {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(msg);
        drop(q);
        self.wake.notify_all();
    }

    fn queued(&self) -> u64 {
        let q = self.queues.lock().expect("mqtt queue lock");
        (q.control.len() + q.detections.len()) as u64
    }

    fn status(&self) -> MqttStatus {
        let (connected, connects, _) = self.conn_state();
        let last_error = self.last_error.lock().expect("mqtt error lock").clone();
        MqttStatus {
            broker: self.broker.clone(),
            prefix: self.settings.prefix.clone(),
            state: match (connected, connects, &last_error) {
                (true, _, _) => "connected",
                (false, 0, None) => "connecting",
                _ => "disconnected",
            }
            .into(),
            connects,
            published: self.published.load(Ordering::Relaxed),
            queued: self.queued(),
            dropped: self.dropped.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// Queues `payload` for `<prefix>/leaf`, not retained (see [`Shared::push`]).
    fn push_to(&self, leaf: &str, payload: Vec<u8>, control: bool) {
        let topic = self.topic(leaf);
        self.push(
            Msg {
                topic,
                payload,
                retain: false,
            },
            control,
        );
    }

    fn reply(&self, reply: Value) {
        self.push_to("cmd/reply", reply.to_string().into_bytes(), true);
    }
}

/// The pipeline's handle for detection messages; cheap to clone.
#[derive(Clone)]
pub struct DetectionOut {
    shared: Arc<Shared>,
}

impl DetectionOut {
    /// Offers one frame record (`line`, its JSON) whose detections are `found` (label, score):
    /// queued on `<prefix>/detections` if it passes `mqtt.detections`, `classes`, `min_score`
    /// and `max_rate`. Never blocks.
    pub fn offer<'a>(&self, found: impl IntoIterator<Item = (&'a str, f32)>, line: &str) {
        let s = &self.shared.settings;
        let wanted = match s.detections {
            MqttDetections::Off => false,
            MqttDetections::EveryFrame => true,
            MqttDetections::Matching => found.into_iter().any(|(label, score)| {
                score >= s.min_score
                    && (s.classes.is_empty() || s.classes.iter().any(|c| c == label))
            }),
        };
        if !wanted {
            return;
        }
        {
            let mut last = self.shared.last_detection.lock().expect("mqtt rate lock");
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t).as_secs_f64() < 1.0 / s.max_rate) {
                self.shared.rate_limited.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        self.shared
            .push_to("detections", line.as_bytes().to_vec(), false);
    }
}

/// A running fleet link. Dropping it publishes `offline`, disconnects (waiting at most a few
/// seconds) and removes its event sink from the metrics.
pub struct Link {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    publisher: Option<JoinHandle<()>>,
    ended: Receiver<()>,
}

/// Why the link could not start (unreadable certificate or key, no thread).
#[derive(Debug, thiserror::Error)]
#[error("mqtt: {0}")]
pub struct LinkError(String);

fn tls_config(s: &MqttSettings) -> Result<rustls::ClientConfig, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, LinkError> {
        let v = CertificateDer::pem_file_iter(p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| LinkError(format!("{}: cannot read certificates: {e}", p.display())))?;
        if v.is_empty() {
            return Err(LinkError(format!("{}: no PEM certificate", p.display())));
        }
        Ok(v)
    };
    let mut roots = rustls::RootCertStore::empty();
    match &s.ca_file {
        Some(ca) => {
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| LinkError(format!("{}: {e}", ca.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(LinkError(
                    "no system CA certificates found; set mqtt.ca_file".into(),
                ));
            }
        }
    }
    // ring rather than aws-lc (rustls' default): it cross-compiles for aarch64 and armv7 with
    // only a C cross compiler. rustls marks it deprecated for lacking post-quantum key
    // exchange, which MQTT brokers do not offer yet.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match &s.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| LinkError(format!("{}: cannot read the key: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| LinkError(format!("{}: {e}", cert.display())))
        }
    }
}

/// Checks what [`Link::start`] reads from files (TLS roots, client certificate and key); part
/// of [`super::check_paths`], so `perch run --check-config` and a reload read them first.
pub fn check(s: &MqttSettings) -> Result<(), LinkError> {
    if s.tls {
        tls_config(s)?;
    }
    Ok(())
}

/// One line for a connection failure, with a hint where the cause is the configuration.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad user name or password (mqtt.username, mqtt.password)"
                }
                ConnectReturnCode::NotAuthorized => "not authorized (mqtt.username, mqtt.password)",
                ConnectReturnCode::BadClientId => "client id rejected (mqtt.client_id)",
                ConnectReturnCode::ServiceUnavailable => "broker unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not supported",
                ConnectReturnCode::Success => "refused",
            };
            format!("connection refused: {why}")
        }
        ConnectionError::Io(io) => format!("I/O: {io}"),
        other => crate::exit::one_line(other),
    }
}

impl Link {
    /// Connects to the broker of `s` in the background and starts publishing. `handler` serves
    /// `<prefix>/cmd` when `s.commands`; `payload_limit` bounds an installed adapter's size
    /// (the store's `max_mb`; 0: no store). Fails only on unreadable TLS material or when a
    /// thread cannot start; an unreachable or refusing broker is retried while the service
    /// runs.
    pub fn start(
        s: &MqttSettings,
        metrics: Arc<Metrics>,
        handler: Handler,
        payload_limit: Arc<AtomicU64>,
    ) -> Result<Link, LinkError> {
        let scheme = if s.tls { "mqtts" } else { "mqtt" };
        let broker = if s.host.contains(':') {
            format!("{scheme}://[{}]:{}", s.host, s.port)
        } else {
            format!("{scheme}://{}:{}", s.host, s.port)
        };
        let mut opts = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
        opts.set_keep_alive(s.keep_alive);
        opts.set_clean_session(true);
        let incoming = if s.allow_install {
            let limit = payload_limit.load(Ordering::Relaxed) as usize;
            (limit / 3 * 4 + 4).saturating_add(MAX_COMMAND)
        } else {
            MAX_COMMAND
        };
        opts.set_max_packet_size(incoming, MAX_OUTGOING);
        if let Some(c) = &s.credentials {
            opts.set_credentials(c.username.clone(), c.password.clone());
        }
        if s.tls {
            opts.set_transport(Transport::Tls(tls_config(s)?.into()));
        }
        let mut shared = Shared::new(s.clone(), broker);
        shared.max_incoming = incoming;
        let shared = Arc::new(shared);
        opts.set_last_will(LastWill::new(
            shared.topic("availability"),
            "offline",
            shared.qos(),
            true,
        ));
        let (client, mut connection) = Client::new(opts, CLIENT_CHANNEL);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        connection.eventloop.set_network_options(net);
        let spawn = |name: &str| std::thread::Builder::new().name(name.into());
        // Threads already started see the stop and end.
        let thread_err = |e: std::io::Error| {
            shared.stop.store(true, Ordering::Relaxed);
            shared.notify();
            LinkError(format!("cannot start a thread: {e}"))
        };
        let loopback = s.host == "localhost"
            || s.host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if s.commands && !s.tls && !loopback {
            log::warn!(
                "mqtt: commands over plain mqtt://{}: credentials and commands travel in clear \
                 text; use mqtts://",
                s.host
            );
        }

        let (cmd_tx, cmd_rx) = std::sync::mpsc::sync_channel::<CommandMsg>(COMMAND_QUEUE);
        let commands = s.commands;
        if commands {
            let (sh, limit) = (shared.clone(), payload_limit);
            spawn("perch-mqtt-cmd")
                .spawn(move || command_loop(&sh, &cmd_rx, &handler, &limit))
                .map_err(thread_err)?;
        }
        let (ended_tx, ended) = std::sync::mpsc::channel();
        {
            let sh = shared.clone();
            spawn("perch-mqtt-net")
                .spawn(move || {
                    network_loop(&sh, &mut connection, commands.then_some(cmd_tx));
                    sh.conn.lock().expect("mqtt conn lock").ended = true;
                    sh.set_connected(false, false);
                    let _ = ended_tx.send(());
                })
                .map_err(thread_err)?;
        }
        let publisher = {
            let (sh, m) = (shared.clone(), metrics.clone());
            spawn("perch-mqtt-pub")
                .spawn(move || publish_loop(&sh, &client, &m))
                .map_err(thread_err)?
        };
        let sink_shared = shared.clone();
        metrics.set_event_sink(Some(Arc::new(move |ev: Value| {
            sink_shared.push_to("events", ev.to_string().into_bytes(), true);
        })));
        metrics.update(|st| st.mqtt = Some(shared.status()));
        log::info!(
            "mqtt: publishing to {} under {}/",
            shared.broker,
            shared.settings.prefix
        );
        Ok(Link {
            shared,
            metrics,
            publisher: Some(publisher),
            ended,
        })
    }

    /// The handle the frame pipeline offers its records to.
    pub fn detections(&self) -> DetectionOut {
        DetectionOut {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.metrics.set_event_sink(None);
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.notify();
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
        // The network thread ends once the disconnect is sent; else at its next event or
        // failure (then it closes the socket itself, and the broker publishes the last will).
        let _ = self.ended.recv_timeout(STOP_WAIT);
        self.metrics.update(|st| st.mqtt = None);
    }
}

/// Drives the connection: connects, reconnects with a doubling wait, hands command messages to
/// the command thread (or answers "busy"), and records the state for the publisher. Ends on
/// the clean disconnect of a stop, at the first event after [`STOP_WAIT`] past the stop, or on
/// a connection failure after the stop (the socket then closes and the broker publishes the
/// last will).
fn network_loop(
    sh: &Shared,
    connection: &mut rumqttc::Connection,
    commands: Option<SyncSender<CommandMsg>>,
) {
    let cmd_topic = sh.topic("cmd");
    let first_wait = Duration::from_millis(500);
    // A connection that lasts this long resets the doubling wait; shorter ones (a broker that
    // drops each connection at once) keep it growing.
    let stable = Duration::from_secs(10);
    let mut wait = first_wait;
    let mut logged: Option<String> = None;
    let mut connected_at: Option<Instant> = None;
    let mut stop_seen: Option<Instant> = None;
    // Bytes of command messages waiting for the command thread: at most one message of the
    // largest allowed size, or several small ones.
    let queued_bytes = Arc::new(AtomicU64::new(0));
    loop {
        if sh.stop.load(Ordering::Relaxed)
            && stop_seen.get_or_insert_with(Instant::now).elapsed() >= STOP_WAIT
        {
            return;
        }
        let Ok(event) = connection.recv() else {
            return;
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                sh.set_connected(true, true);
                connected_at = Some(Instant::now());
                *sh.last_error.lock().expect("mqtt error lock") = None;
                if logged.take().is_some() {
                    log::info!("mqtt: connected to {} again", sh.broker);
                } else {
                    log::info!("mqtt: connected to {}", sh.broker);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == cmd_topic => {
                sh.commands.fetch_add(1, Ordering::Relaxed);
                let Some(tx) = &commands else { continue };
                // A retained command would run again on every reconnect, long after it was
                // meant.
                if p.retain {
                    sh.reply(error_reply(
                        Value::Null,
                        "retained command messages are ignored; publish commands without retain",
                    ));
                    continue;
                }
                let len = p.payload.len() as u64;
                let busy = queued_bytes.load(Ordering::Relaxed) > 0
                    && queued_bytes.load(Ordering::Relaxed) + len > sh.max_incoming as u64;
                let sent = !busy
                    && match tx.try_send(CommandMsg {
                        payload: p.payload.to_vec(),
                        queued: queued_bytes.clone(),
                    }) {
                        Ok(()) => {
                            queued_bytes.fetch_add(len, Ordering::Relaxed);
                            true
                        }
                        Err(TrySendError::Full(_)) => false,
                        Err(TrySendError::Disconnected(_)) => continue,
                    };
                if !sent {
                    // Only small messages are parsed for their id here.
                    let id = if p.payload.len() <= MAX_COMMAND {
                        request_id(&p.payload)
                    } else {
                        Value::Null
                    };
                    sh.reply(error_reply(
                        id,
                        "busy: earlier commands are still waiting; try again",
                    ));
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if sh.stop.load(Ordering::Relaxed) => {
                return;
            }
            Ok(_) => {}
            Err(e) => {
                sh.set_connected(false, false);
                if sh.stop.load(Ordering::Relaxed) {
                    return;
                }
                if connected_at.take().is_some_and(|t| t.elapsed() >= stable) {
                    wait = first_wait;
                }
                let why = describe(&e);
                let refused = matches!(e, ConnectionError::ConnectionRefused(_));
                // One line per outage; a refusal (a configuration matter) is also logged when
                // it follows another failure of the same outage.
                let first = logged.is_none();
                if first || (refused && logged.as_deref() != Some(why.as_str())) {
                    log::error!(
                        "mqtt: {}: {why}; frames keep flowing, retrying (at most every {:.1} s)",
                        sh.broker,
                        sh.settings.reconnect_max.as_secs_f64()
                    );
                    logged = Some(why.clone());
                } else {
                    log::debug!("mqtt: {}: {why}", sh.broker);
                }
                *sh.last_error.lock().expect("mqtt error lock") = Some(why);
                // A refusal will not change by itself soon: wait the longest.
                let pause = if refused {
                    sh.settings.reconnect_max
                } else {
                    wait
                };
                wait = (wait * 2).min(sh.settings.reconnect_max);
                let until = Instant::now() + pause;
                while Instant::now() < until {
                    if sh.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Hands queued messages to the connection while it is up; on every new connection subscribes
/// to commands and says `online`; refreshes the retained status; on stop says `offline` and
/// disconnects. Never blocks on the connection: a full client channel leaves the message at
/// the head of its queue for the next try.
fn publish_loop(sh: &Shared, client: &Client, metrics: &Metrics) {
    let qos = sh.qos();
    let mut seen_session = 0;
    let mut next_status = Instant::now();
    let mut next_metrics = Instant::now();
    let send = |m: &Msg| -> bool {
        let sent = client
            .try_publish(m.topic.clone(), qos, m.retain, m.payload.clone())
            .is_ok();
        if sent {
            sh.published.fetch_add(1, Ordering::Relaxed);
        }
        sent
    };
    let availability = |what: &str| Msg {
        topic: sh.topic("availability"),
        payload: what.as_bytes().to_vec(),
        retain: true,
    };
    // The newest status replaces one not sent yet.
    let mut status: Option<Msg> = None;
    // Waiting for room in the client channel.
    let mut full = false;
    let mut last_state = (false, 0);
    loop {
        let now = Instant::now();
        let (connected, session, ended) = sh.conn_state();
        if now >= next_metrics || (connected, session) != last_state {
            last_state = (connected, session);
            metrics.update(|st| st.mqtt = Some(sh.status()));
            next_metrics = now + Duration::from_millis(200);
        }
        if sh.stop.load(Ordering::Relaxed) || ended {
            if connected && !ended {
                say_offline(sh, client, &send, &availability("offline"));
            }
            return;
        }
        if connected && session != seen_session && !full {
            // Both must reach the client channel, else the session would run without its
            // command subscription or stay `offline`: retried until they do.
            let subscribed =
                !sh.settings.commands || client.try_subscribe(sh.topic("cmd"), qos).is_ok();
            if subscribed && send(&availability("online")) {
                seen_session = session;
                next_status = now;
            } else {
                full = true;
            }
        }
        if connected && now >= next_status && seen_session == session {
            status = Some(Msg {
                topic: sh.topic("status"),
                payload: serde_json::to_vec(&metrics.status()).expect("status serialises"),
                retain: true,
            });
            next_status = now + sh.settings.status_every;
        }
        if connected && !full && seen_session == session {
            if let Some(m) = status.take() {
                if !send(&m) {
                    status = Some(m);
                    full = true;
                }
                continue;
            }
            let next = {
                let mut q = sh.queues.lock().expect("mqtt queue lock");
                match q.control.pop_front() {
                    Some(m) => Some((m, true)),
                    None => q.detections.pop_front().map(|m| (m, false)),
                }
            };
            if let Some((m, control)) = next {
                if !send(&m) {
                    let mut q = sh.queues.lock().expect("mqtt queue lock");
                    if control {
                        q.control.push_front(m);
                    } else {
                        q.detections.push_front(m);
                    }
                    full = true;
                }
                continue;
            }
        }
        let q = sh.queues.lock().expect("mqtt queue lock");
        // Checked under the lock that pushes and state changes take before they notify, so
        // no wake-up is lost between this check and the wait.
        let work = !q.control.is_empty() || !q.detections.is_empty();
        if sh.conn_state() != (connected, session, ended) || sh.stop.load(Ordering::Relaxed) {
            continue;
        }
        if connected && work && !full {
            continue;
        }
        let mut until = next_metrics;
        if connected {
            until = until.min(next_status);
        }
        let mut timeout = until.saturating_duration_since(Instant::now());
        if full {
            timeout = timeout.min(Duration::from_millis(5));
            full = false;
        }
        let _ = sh
            .wake
            .wait_timeout(q, timeout.max(Duration::from_millis(1)));
    }
}

/// On a clean stop: queues `offline` and then the disconnect, retrying while the client
/// channel is full, until [`STOP_WAIT`]. When `offline` cannot be queued in time the disconnect
/// is not sent either: the socket then closes without it and the broker publishes the last
/// will (`offline`) instead.
fn say_offline(sh: &Shared, client: &Client, send: &dyn Fn(&Msg) -> bool, offline: &Msg) {
    let deadline = Instant::now() + STOP_WAIT / 2;
    let retry = |f: &dyn Fn() -> bool| {
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            if !sh.conn_state().0 {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    };
    if retry(&|| send(offline)) {
        retry(&|| client.try_disconnect().is_ok());
    }
}

/// The `id` of a request, when it is a JSON object that has one.
fn request_id(payload: &[u8]) -> Value {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(Value::Null)
}

/// The control socket's reply to `r` with the request's `id`.
fn reply_with_id(id: Value, r: Result<Map<String, Value>, String>) -> Value {
    let mut m = super::control::reply_object(r);
    m.insert("id".into(), id);
    Value::Object(m)
}

fn error_reply(id: Value, error: &str) -> Value {
    reply_with_id(id, Err(error.to_string()))
}

/// Serves `<prefix>/cmd` messages one at a time until the link stops.
fn command_loop(sh: &Shared, rx: &Receiver<CommandMsg>, handler: &Handler, limit: &AtomicU64) {
    while !sh.stop.load(Ordering::Relaxed) {
        let Ok(msg) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        msg.queued
            .fetch_sub(msg.payload.len() as u64, Ordering::Relaxed);
        let reply = answer(sh, &msg.payload, handler, limit);
        sh.reply(reply);
    }
}

/// A command message, checked: what the control handler gets.
#[derive(Debug)]
pub struct Command {
    /// The request's `id` (any JSON value; null when absent), echoed in the reply.
    pub id: Value,
    pub cmd: String,
    /// The request object without `payload_b64`.
    pub req: Map<String, Value>,
    /// The decoded `payload_b64` of an `install` (empty otherwise).
    pub payload: Vec<u8>,
}

/// Parses and checks one `<prefix>/cmd` message: a JSON object with a served `cmd` (`install`
/// only with `allow_install`, its base64 payload decoded and at most `limit` bytes; `limit` 0:
/// no adapter store). Errors are the error reply to publish (with the request's id when it has
/// one).
pub fn parse_command(payload: &[u8], allow_install: bool, limit: usize) -> Result<Command, Value> {
    let mut req = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(error_reply(Value::Null, "a command is a JSON object")),
        Err(e) => return Err(error_reply(Value::Null, &format!("not JSON: {e}"))),
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let fail = |why: &str| {
        Err(error_reply(
            req.get("id").cloned().unwrap_or(Value::Null),
            why,
        ))
    };
    let Some(cmd) = req.get("cmd").and_then(Value::as_str).map(str::to_string) else {
        return fail("\"cmd\" (a string) is required");
    };
    if !REMOTE_COMMANDS.contains(&cmd.as_str()) || (cmd == "install" && !allow_install) {
        let served: Vec<&str> = REMOTE_COMMANDS
            .iter()
            .copied()
            .filter(|c| *c != "install" || allow_install)
            .collect();
        return fail(&format!(
            "command '{cmd}' is not served over MQTT (commands: {})",
            served.join(", ")
        ));
    }
    let over = || format!("the adapter file is over the store's limit of {limit} bytes");
    let payload = if cmd == "install" {
        let Some(b64) = req.get("payload_b64").and_then(Value::as_str) else {
            return fail("install needs the adapter file base64-encoded in \"payload_b64\"");
        };
        if limit == 0 {
            return fail("no adapter store is configured ([adapters])");
        }
        if b64.len() / 4 * 3 > limit.saturating_add(3) {
            return fail(&over());
        }
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(b) if b.len() <= limit => b,
            Ok(_) => return fail(&over()),
            Err(e) => return fail(&format!("\"payload_b64\" is not base64: {e}")),
        }
    } else {
        Vec::new()
    };
    req.remove("payload_b64");
    Ok(Command {
        id,
        cmd,
        req,
        payload,
    })
}

/// The reply to one command message: `{"id", "ok": true, "cmd", ...}` or `{"id", "ok":
/// false, "error"}`.
fn answer(sh: &Shared, payload: &[u8], handler: &Handler, limit: &AtomicU64) -> Value {
    let limit = limit.load(Ordering::Relaxed) as usize;
    let c = match parse_command(payload, sh.settings.allow_install, limit) {
        Ok(c) => c,
        Err(reply) => return reply,
    };
    let r = handler(&c.cmd, &c.req, c.payload).map(|mut fields| {
        fields.insert("cmd".into(), c.cmd.into());
        fields
    });
    reply_with_id(c.id, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> MqttSettings {
        let cfg = "[model]\npath = \"m.onnx\"\n[source]\nuri = \"synthetic\"\n[mqtt]\n\
                   url = \"mqtt://127.0.0.1\"\nprefix = \"p\"\nqueue = 3\n";
        crate::config::parse(cfg, std::path::Path::new("t.toml"))
            .unwrap()
            .mqtt
            .unwrap()
    }

    fn queued(sh: &Shared) -> Vec<String> {
        let q = sh.queues.lock().unwrap();
        q.control
            .iter()
            .chain(&q.detections)
            .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
            .collect()
    }

    /// `matching` takes frames with a wanted class at the score; the rate limit skips and
    /// counts; a full queue drops its oldest.
    #[test]
    fn detection_filter_rate_and_queue() {
        let mut s = settings();
        s.classes = vec!["tree".into()];
        s.min_score = 0.5;
        s.max_rate = 10_000.0;
        let out = DetectionOut {
            shared: Arc::new(Shared::new(s, String::new())),
        };
        out.offer([("tree", 0.4), ("car", 0.9)], "a");
        out.offer([], "b");
        assert!(queued(&out.shared).is_empty());
        for line in ["1", "2", "3", "4", "5"] {
            out.offer([("car", 0.9), ("tree", 0.5)], line);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            queued(&out.shared),
            ["p/detections 3", "p/detections 4", "p/detections 5"]
        );
        assert_eq!(out.shared.dropped.load(Ordering::Relaxed), 2);
        let mut s = settings();
        s.detections = MqttDetections::EveryFrame;
        s.max_rate = 0.01;
        let out = DetectionOut {
            shared: Arc::new(Shared::new(s, String::new())),
        };
        out.offer([], "x");
        out.offer([], "y");
        assert_eq!(queued(&out.shared), ["p/detections x"]);
        assert_eq!(out.shared.rate_limited.load(Ordering::Relaxed), 1);
    }

    /// Commands: malformed and unserved requests are answered without reaching the handler;
    /// install decodes base64 within the store's limit.
    #[test]
    fn command_answers() {
        let mut s = settings();
        s.commands = true;
        let sh = Shared::new(s, String::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handler: Handler = Arc::new(move |cmd, req, payload| {
            log.lock().unwrap().push((cmd.to_string(), payload.len()));
            assert!(!req.contains_key("payload_b64"));
            Ok(Map::from_iter([("x".to_string(), json!(1))]))
        });
        let limit = AtomicU64::new(4);
        let ask = |sh: &Shared, msg: &str| answer(sh, msg.as_bytes(), &handler, &limit);
        assert_eq!(ask(&sh, "[1]")["error"], "a command is a JSON object");
        assert!(ask(&sh, "{").to_string().contains("not JSON"));
        assert_eq!(ask(&sh, r#"{"id":5}"#)["id"], 5);
        assert!(
            ask(&sh, r#"{"id":5,"cmd":"reload"}"#)["error"]
                .as_str()
                .unwrap()
                .contains("not served")
        );
        assert!(
            ask(&sh, r#"{"cmd":"install","name":"a","payload_b64":"AAAA"}"#)["error"]
                .as_str()
                .unwrap()
                .contains("not served"),
            "install is off unless allow_install"
        );
        assert!(seen.lock().unwrap().is_empty());
        let r = ask(&sh, r#"{"id":"q","cmd":"status"}"#);
        assert_eq!(r, json!({"id": "q", "ok": true, "cmd": "status", "x": 1}));
        let mut s = settings();
        s.commands = true;
        s.allow_install = true;
        let sh = Shared::new(s, String::new());
        let install = |b64: &str| {
            ask(
                &sh,
                &format!(r#"{{"cmd":"install","name":"a","payload_b64":"{b64}"}}"#),
            )
        };
        assert_eq!(install("AAECAw==")["ok"], true);
        assert!(
            install("AAECAwQ=")["error"]
                .as_str()
                .unwrap()
                .contains("limit of 4 bytes")
        );
        assert!(
            install("AAECAwQFBgcICQ==")["error"]
                .as_str()
                .unwrap()
                .contains("limit")
        );
        assert!(
            install("!!!!")["error"]
                .as_str()
                .unwrap()
                .contains("not base64")
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [("status".to_string(), 0), ("install".to_string(), 4)]
        );
    }
}
