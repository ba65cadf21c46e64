//! The control socket: a local UNIX socket speaking line-delimited JSON.
//!
//! Each request is one line holding a JSON object with a `cmd` string, e.g.
//! `{"cmd":"status"}`. Each reply is one line: `{"ok":true, ...}` or
//! `{"ok":false,"error":"..."}`. A connection may send many requests. Lines over
//! [`MAX_REQUEST`] bytes get an error reply and the connection is closed; malformed requests
//! get an error reply. Requests are handled on the socket's own threads and never block the
//! frame pipeline.
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once. When all are taken, a new client
//! waits up to [`ADMIT_WAIT`] for a slot, and a connection that has been waiting for its next
//! request for [`EVICTABLE_AFTER`] or more is closed to make room, so idle or slow clients cannot
//! lock others out; a request line must be complete within [`REQUEST_DEADLINE`] of its first byte.
//!
//! A request may carry a binary payload (an adapter file for `install`): it declares
//! `"payload_bytes": N` and the N raw bytes follow its newline. Payloads over the server's
//! current limit are refused before they are read, and the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::server::{Workers, accept_until, bind_socket};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// A connection waiting this long for its next request may be closed for a new client.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// How long a new client waits for a free slot before "too many connections".
pub const ADMIT_WAIT: Duration = Duration::from_secs(3);
/// A request line must be complete this long after its first byte arrived.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// One served connection, as the accept loop sees it.
#[derive(Default)]
struct Conn {
    /// Since when it has been waiting for a request with nothing received; `None` while a
    /// request is arriving or being handled.
    waiting_since: Mutex<Option<Instant>>,
    /// Set by the accept loop: close at the next read slice.
    evict: AtomicBool,
}

type Conns = Arc<Mutex<Vec<Arc<Conn>>>>;

/// Marks the connection waiting longest (at least [`EVICTABLE_AFTER`]) for eviction; false
/// when none qualifies.
fn evict_one(conns: &Conns) -> bool {
    let Ok(conns) = conns.lock() else {
        return false;
    };
    let oldest = conns
        .iter()
        .filter(|c| !c.evict.load(Ordering::Relaxed))
        .filter_map(|c| Some((c.waiting_since.lock().ok()?.as_ref().copied()?, c)))
        .filter(|(since, _)| since.elapsed() >= EVICTABLE_AFTER)
        .min_by_key(|(since, _)| *since);
    match oldest {
        Some((_, c)) => {
            c.evict.store(true, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// Answers one request (the parsed object, `cmd` included, and its payload, empty when none)
/// with the fields of an `ok` reply, or an error message.
pub type Handler = Arc<
    dyn Fn(&str, &Map<String, Value>, Vec<u8>) -> Result<Map<String, Value>, String> + Send + Sync,
>;

/// A listening control socket; stops and removes the socket file when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` with file `mode` and serves requests with `handler`. Payloads larger than
    /// `payload_limit` bytes (read at each request) are refused.
    pub fn start(
        path: &Path,
        mode: u32,
        handler: Handler,
        payload_limit: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let listener = bind_socket(path, mode)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let accept = std::thread::Builder::new()
            .name("perch-control".into())
            .spawn(move || {
                let mut workers = Workers::new("perch-control-conn", MAX_CONNECTIONS);
                let conns: Conns = Arc::default();
                let accept = || listener.accept().map(|(stream, _)| stream);
                accept_until(&s, "control socket", accept, |mut stream| {
                    let deadline = Instant::now() + ADMIT_WAIT;
                    while !workers.has_room() {
                        if Instant::now() >= deadline || s.load(Ordering::Relaxed) {
                            let _ = reply(&mut stream, &Err("too many connections".into()));
                            return;
                        }
                        evict_one(&conns);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let conn = Arc::new(Conn::default());
                    if let Ok(mut c) = conns.lock() {
                        c.push(conn.clone());
                    }
                    let (h, st, lim, all) = (
                        handler.clone(),
                        s.clone(),
                        payload_limit.clone(),
                        conns.clone(),
                    );
                    workers.spawn(move || {
                        serve(stream, &h, &st, &lim, &conn);
                        if let Ok(mut c) = all.lock() {
                            c.retain(|x| !Arc::ptr_eq(x, &conn));
                        }
                    });
                });
                workers.join_all();
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The reply object to a handled request: `{"ok": true, ...fields}` or `{"ok": false,
/// "error": ...}` (the control socket's replies, and the MQTT link's with its `id` added).
pub fn reply_object(r: Result<Map<String, Value>, String>) -> Map<String, Value> {
    let mut m = Map::new();
    match r {
        Ok(fields) => {
            m.insert("ok".into(), Value::Bool(true));
            m.extend(fields);
        }
        Err(e) => {
            m.insert("ok".into(), Value::Bool(false));
            m.insert("error".into(), Value::String(e));
        }
    }
    m
}

fn reply(stream: &mut UnixStream, r: &Result<Map<String, Value>, String>) -> std::io::Result<()> {
    let v = Value::Object(reply_object(r.clone()));
    let mut line = serde_json::to_vec(&v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Parses one request line into (cmd, object).
pub fn parse_request(line: &[u8]) -> Result<(String, Map<String, Value>), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    let Value::Object(m) = v else {
        return Err("malformed request: not a JSON object".into());
    };
    match m.get("cmd") {
        Some(Value::String(c)) => Ok((c.clone(), m)),
        _ => Err("malformed request: no \"cmd\" string".into()),
    }
}

/// Read timeout of a connection: short, so its thread notices shutdown.
const READ_SLICE: Duration = Duration::from_millis(200);

/// True for the error a read returns when [`READ_SLICE`] passed without data.
fn read_timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads exactly `n` payload bytes, tolerating the short read timeouts; `None` if the peer
/// stops sending for [`IDLE`] or the service stops.
fn read_payload(reader: &mut impl Read, n: usize, stop: &AtomicBool) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let (mut got, mut idle) = (0, Duration::ZERO);
    while got < n {
        if stop.load(Ordering::Relaxed) || idle >= IDLE {
            return None;
        }
        match reader.read(&mut buf[got..]) {
            Ok(0) => return None,
            Ok(k) => {
                got += k;
                idle = Duration::ZERO;
            }
            Err(e) if read_timed_out(&e) => idle += READ_SLICE,
            Err(_) => return None,
        }
    }
    Some(buf)
}

/// What to do with one request line: handle it (with its payload) or refuse it.
enum Parsed {
    Handle(String, Map<String, Value>, usize),
    Refuse(String, bool),
}

fn classify(line: &[u8], limit: u64) -> Parsed {
    match parse_request(line) {
        Err(e) => Parsed::Refuse(e, false),
        Ok((cmd, m)) => match m.get("payload_bytes") {
            None => Parsed::Handle(cmd, m, 0),
            Some(v) => match v.as_u64() {
                Some(_) if limit == 0 => Parsed::Refuse(
                    "this service takes no uploads (no [adapters] store is configured)".into(),
                    true,
                ),
                Some(n) if n <= limit => Parsed::Handle(cmd, m, n as usize),
                Some(n) => Parsed::Refuse(
                    format!("payload of {n} bytes is over the {limit}-byte limit"),
                    true,
                ),
                None => Parsed::Refuse(
                    "malformed request: \"payload_bytes\" must be a byte count".into(),
                    true,
                ),
            },
        },
    }
}

/// Appends to `line` what one read brings, up to a newline and at most `room` bytes; `Ok(0)` at
/// the end of the stream. Unlike `read_until` it returns after each read, so a client dripping
/// bytes cannot hold the loop past its deadline.
fn read_some_of_line(
    reader: &mut BufReader<UnixStream>,
    room: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let buf = reader.fill_buf()?;
    let avail = &buf[..buf.len().min(room)];
    let n = match avail.iter().position(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => avail.len(),
    };
    line.extend_from_slice(&avail[..n]);
    reader.consume(n);
    Ok(n)
}

fn serve(stream: UnixStream, handler: &Handler, stop: &AtomicBool, limit: &AtomicU64, conn: &Conn) {
    let set_waiting = |w: bool| {
        if let Ok(mut since) = conn.waiting_since.lock() {
            *since = match (w, *since) {
                (true, Some(t)) => Some(t),
                (true, None) => Some(Instant::now()),
                (false, _) => None,
            };
        }
    };
    // Short read timeouts let the thread notice shutdown; IDLE bounds a silent client.
    let _ = stream.set_read_timeout(Some(READ_SLICE));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut idle = Duration::ZERO;
    let mut line = Vec::new();
    let mut started: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) && idle < IDLE {
        if conn.evict.load(Ordering::Relaxed) {
            let _ = reply(
                &mut out,
                &Err("connection closed: idle while another client waited".into()),
            );
            return;
        }
        if started.is_some_and(|t| t.elapsed() >= REQUEST_DEADLINE) {
            let _ = reply(
                &mut out,
                &Err(format!(
                    "request not complete {} s after its first byte",
                    REQUEST_DEADLINE.as_secs()
                )),
            );
            return;
        }
        set_waiting(line.is_empty() && reader.buffer().is_empty());
        let room = (MAX_REQUEST + 1).saturating_sub(line.len());
        match read_some_of_line(&mut reader, room, &mut line) {
            Ok(0) if line.is_empty() => return,
            Ok(_) if line.last() == Some(&b'\n') => {
                set_waiting(false);
                started = None;
                idle = Duration::ZERO;
                let text = line.trim_ascii();
                if !text.is_empty() {
                    let (r, close) = match classify(text, limit.load(Ordering::Relaxed)) {
                        Parsed::Refuse(e, close) => (Err(e), close),
                        // A request with a payload ends its connection: bytes sent past the
                        // declared payload are not read as further requests.
                        Parsed::Handle(cmd, m, n) => match read_payload(&mut reader, n, stop) {
                            Some(payload) => (handler(&cmd, &m, payload), n > 0),
                            None => return,
                        },
                    };
                    if reply(&mut out, &r).is_err() || close {
                        return;
                    }
                }
                line.clear();
            }
            Ok(_) if line.len() > MAX_REQUEST => {
                let _ = reply(
                    &mut out,
                    &Err(format!("request longer than {MAX_REQUEST} bytes")),
                );
                return;
            }
            // End of stream inside a line: answer it, then close.
            Ok(0) => {
                let r = match classify(line.trim_ascii(), 0) {
                    Parsed::Handle(cmd, m, 0) => handler(&cmd, &m, Vec::new()),
                    Parsed::Handle(..) => Err("payload missing".into()),
                    Parsed::Refuse(e, _) => Err(e),
                };
                let _ = reply(&mut out, &r);
                return;
            }
            Ok(_) => {
                started.get_or_insert_with(Instant::now);
            }
            Err(e) if read_timed_out(&e) => {
                if !line.is_empty() {
                    started.get_or_insert_with(Instant::now);
                }
                idle += READ_SLICE;
            }
            Err(_) => return,
        }
    }
}

/// Sends one request to the control socket at `path` and returns the reply object.
pub fn request(path: &Path, req: &Value, timeout: Duration) -> std::io::Result<Value> {
    request_with_payload(path, req, &[], timeout)
}

/// Like [`request`], followed by `payload` (declared in `req` as `payload_bytes`, which this
/// function sets when the payload is not empty).
pub fn request_with_payload(
    path: &Path,
    req: &Value,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = req.clone();
    if !payload.is_empty()
        && let Value::Object(m) = &mut req
    {
        m.insert("payload_bytes".into(), Value::from(payload.len()));
    }
    let mut line = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)?;
    // A refused payload is answered before it is read and the server closes: the write then
    // fails, and the reply explains why.
    let sent = s.write_all(payload);
    let mut reply = String::new();
    match BufReader::new(s).read_line(&mut reply) {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            return Err(sent
                .err()
                .unwrap_or_else(|| std::io::Error::other("no reply")));
        }
        Err(e) => return Err(sent.err().unwrap_or(e)),
    }
    serde_json::from_str(&reply).map_err(|e| std::io::Error::other(format!("bad reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_errors_and_limits() {
        let dir = std::env::temp_dir().join(format!("perch-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("control.sock");
        let handler: Handler = Arc::new(|cmd, _, payload| match cmd {
            "ping" => Ok(Map::from_iter([("pong".to_string(), Value::Bool(true))])),
            "len" => Ok(Map::from_iter([(
                "len".to_string(),
                Value::from(payload.len()),
            )])),
            other => Err(format!("unknown command '{other}'")),
        });
        let server =
            ControlServer::start(&p, 0o600, handler, Arc::new(AtomicU64::new(1000))).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(
            request(&p, &json!({"cmd": "ping"}), t).unwrap(),
            json!({"ok": true, "pong": true})
        );
        assert_eq!(
            request(&p, &json!({"cmd": "fly"}), t).unwrap(),
            json!({"ok": false, "error": "unknown command 'fly'"})
        );
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{not json\n[1]\n{\"cmd\":\"ping\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            lines.push(serde_json::from_str::<Value>(&l).unwrap());
        }
        assert!(
            lines[0]["error"]
                .as_str()
                .unwrap()
                .starts_with("malformed request")
        );
        assert_eq!(lines[1]["error"], "malformed request: not a JSON object");
        assert_eq!(lines[2]["ok"], true);
        // Payloads: delivered whole (also when they contain newlines), limited, refused early.
        let payload: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            request_with_payload(&p, &json!({"cmd": "len"}), &payload, t).unwrap(),
            json!({"ok": true, "len": 1000, })
        );
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{\"cmd\":\"len\",\"payload_bytes\":3}\nab\n{\"cmd\":\"ping\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&l).unwrap(),
            json!({"ok": true, "len": 3})
        );
        // The connection ends with the payload request: the trailing ping is not run.
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "{rest}");
        let over = request_with_payload(&p, &json!({"cmd": "len"}), &[0; 1001], t).unwrap();
        assert!(
            over["error"]
                .as_str()
                .unwrap()
                .contains("over the 1000-byte limit")
        );
        // Oversized: error reply, then the server closes the connection.
        let mut big = UnixStream::connect(&p).unwrap();
        let _ = big.write_all(&vec![b'x'; MAX_REQUEST + 10]);
        let mut l = String::new();
        BufReader::new(big).read_line(&mut l).unwrap();
        assert!(l.contains("longer than"), "{l}");
        drop(server);
        assert!(!p.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Idle and dripping clients cannot lock others out: with every slot held by a silent
    /// connection a new client is still answered, a request dripping one byte at a time is cut
    /// off at its deadline, and 200 concurrent clients are all answered.
    #[test]
    fn idle_and_slow_clients_do_not_lock_others_out() {
        let dir = std::env::temp_dir().join(format!("perch-ctl-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("control.sock");
        let handler: Handler = Arc::new(|_, _, _| Ok(Map::new()));
        let server = ControlServer::start(&p, 0o600, handler, Arc::new(AtomicU64::new(0))).unwrap();
        let t = Duration::from_secs(10);
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&p).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(request(&p, &json!({"cmd": "ping"}), t).unwrap()["ok"], true);
        assert!(started.elapsed() < ADMIT_WAIT, "{:?}", started.elapsed());
        // The dripping client: one byte every 100 ms, never a newline.
        let mut drip = UnixStream::connect(&p).unwrap();
        drip.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        while started.elapsed() < REQUEST_DEADLINE + Duration::from_secs(3) {
            if drip.write_all(b" ").is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            match drip.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if got.ends_with(b"\n") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.contains("not complete"),
            "{got:?} after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < REQUEST_DEADLINE + Duration::from_secs(2));
        let answered = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..200 {
                s.spawn(|| {
                    if request(&p, &json!({"cmd": "status"}), t).is_ok_and(|r| r["ok"] == true) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(answered.load(Ordering::Relaxed), 200);
        // This server takes no payloads (limit 0): the refusal says why.
        let r = request_with_payload(&p, &json!({"cmd": "install"}), b"xyz", t).unwrap();
        assert!(
            r["error"].as_str().unwrap().contains("no [adapters] store"),
            "{r}"
        );
        drop(idle);
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
