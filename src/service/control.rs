//! The control socket: a local UNIX socket speaking line-delimited JSON.
//!
//! Each request is one line holding a JSON object with a `cmd` string, e.g.
//! `{"cmd":"status"}`. Each reply is one line: `{"ok":true, ...}` or
//! `{"ok":false,"error":"..."}`. A connection may send many requests. Lines over
//! [`MAX_REQUEST`] bytes get an error reply and the connection is closed; malformed requests
//! get an error reply. Requests are handled on the socket's own threads and never block the
//! frame pipeline.
//!
//! A request may carry a binary payload (an adapter file for `install`): it declares
//! `"payload_bytes": N` and the N raw bytes follow its newline. Payloads over the server's
//! current limit are refused before they are read, and the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::server::{Workers, accept_until, bind_socket};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(60);

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
                let accept = || listener.accept().map(|(stream, _)| stream);
                accept_until(&s, "control socket", accept, |mut stream| {
                    if !workers.has_room() {
                        let _ = reply(&mut stream, &Err("too many connections".into()));
                        return;
                    }
                    let (h, st, lim) = (handler.clone(), s.clone(), payload_limit.clone());
                    workers.spawn(move || serve(stream, &h, &st, &lim));
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

fn reply(stream: &mut UnixStream, r: &Result<Map<String, Value>, String>) -> std::io::Result<()> {
    let v = match r {
        Ok(fields) => {
            let mut m = Map::new();
            m.insert("ok".into(), Value::Bool(true));
            m.extend(fields.clone());
            Value::Object(m)
        }
        Err(e) => json!({"ok": false, "error": e}),
    };
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

fn serve(stream: UnixStream, handler: &Handler, stop: &AtomicBool, limit: &AtomicU64) {
    // Short read timeouts let the thread notice shutdown; IDLE bounds a silent client.
    let _ = stream.set_read_timeout(Some(READ_SLICE));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut idle = Duration::ZERO;
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) && idle < IDLE {
        let room = (MAX_REQUEST + 1).saturating_sub(line.len()) as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(0) if line.is_empty() => return,
            Ok(_) if line.last() == Some(&b'\n') => {
                idle = Duration::ZERO;
                let text = line.trim_ascii();
                if !text.is_empty() {
                    let (r, close) = match classify(text, limit.load(Ordering::Relaxed)) {
                        Parsed::Refuse(e, close) => (Err(e), close),
                        Parsed::Handle(cmd, m, n) => match read_payload(&mut reader, n, stop) {
                            Some(payload) => (handler(&cmd, &m, payload), false),
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
            Ok(_) => {}
            Err(e) if read_timed_out(&e) => idle += READ_SLICE,
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
        for want in [
            json!({"ok": true, "len": 3}),
            json!({"ok": true, "pong": true}),
        ] {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&l).unwrap(), want);
        }
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
}
