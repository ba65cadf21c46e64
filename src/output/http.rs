//! A loopback-only HTTP/1.1 endpoint: the live view as MJPEG (`/stream.mjpg`), the latest
//! annotated frame (`/snapshot.jpg`), Prometheus metrics (`/metrics`) and the status JSON
//! (`/status`). Requests are read with a size limit and a timeout; at most
//! [`MAX_CLIENTS`] are served at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Annotatable;
use crate::image_io::encode_jpeg;
use crate::server::{Workers, accept_until};

/// Concurrent connections served; more get 503.
pub const MAX_CLIENTS: usize = 8;
/// Longest accepted request head.
const MAX_REQUEST: u64 = 8192;
/// JPEG quality of the live view.
const QUALITY: u8 = 75;

/// The newest processed frame, shared between the inference thread and viewers.
#[derive(Default)]
pub struct Latest {
    frame: Mutex<Option<Arc<Annotatable>>>,
    changed: Condvar,
}

impl Latest {
    /// Replaces the newest frame and wakes viewers.
    pub fn publish(&self, a: Arc<Annotatable>) {
        *self.frame.lock().expect("latest frame lock") = Some(a);
        self.changed.notify_all();
    }

    /// The newest frame, if any.
    pub fn get(&self) -> Option<Arc<Annotatable>> {
        self.frame.lock().expect("latest frame lock").clone()
    }

    /// Waits up to `timeout` for a frame newer than `seq` (any frame if `None`).
    pub fn wait_newer(&self, seq: Option<u64>, timeout: Duration) -> Option<Arc<Annotatable>> {
        let g = self.frame.lock().expect("latest frame lock");
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |f| match (f, seq) {
                (None, _) => true,
                (Some(a), Some(s)) => a.seq <= s,
                (Some(_), None) => false,
            })
            .expect("latest frame lock");
        g.clone().filter(|a| seq.is_none_or(|s| a.seq > s))
    }
}

/// Text producers for `/status` and `/metrics`.
pub type TextFn = Arc<dyn Fn() -> String + Send + Sync>;

/// The running server.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    latest: Arc<Latest>,
    status: TextFn,
    metrics: TextFn,
    min_interval: Duration,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Binds `addr` (the caller has checked it is loopback) and serves until dropped.
    pub fn start(
        addr: SocketAddr,
        max_fps: f64,
        latest: Arc<Latest>,
        status: TextFn,
        metrics: TextFn,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            latest,
            status,
            metrics,
            min_interval: Duration::from_secs_f64(1.0 / max_fps),
            stop: stop.clone(),
        });
        let accept = std::thread::Builder::new()
            .name("perch-http".into())
            .spawn(move || accept_loop(listener, shared))?;
        Ok(HttpServer {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers = Workers::new("perch-http-client", MAX_CLIENTS);
    accept_until(
        &shared.stop,
        "http",
        || listener.accept(),
        |(mut stream, peer)| {
            if !peer.ip().is_loopback() {
                return;
            }
            if !workers.has_room() {
                let _ = respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    b"busy\n",
                );
                return;
            }
            let s = shared.clone();
            workers.spawn(move || {
                if let Err(e) = serve(stream, &s) {
                    log::debug!("http client {peer}: {e}");
                }
            });
        },
    );
    workers.join_all();
}

fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)
}

/// Reads the request head; returns (method, path).
fn read_request(stream: &TcpStream) -> std::io::Result<(String, String)> {
    let mut r = BufReader::new(stream.try_clone()?.take(MAX_REQUEST));
    let mut first = String::new();
    r.read_line(&mut first)?;
    let mut parts = first.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_string(), p.to_string()),
        _ => return Err(std::io::Error::other("malformed request line")),
    };
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("request head too long or truncated"));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok((method, path))
}

fn serve(mut stream: TcpStream, s: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let (method, path) = match read_request(&stream) {
        Ok(x) => x,
        Err(e) => {
            let _ = respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
            );
            return Err(e);
        }
    };
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    match path.split('?').next().unwrap_or("") {
        "/" | "/index.html" => respond(
            &mut stream,
            "200 OK",
            "text/html; charset=utf-8",
            INDEX.as_bytes(),
        ),
        "/status" => respond(
            &mut stream,
            "200 OK",
            "application/json",
            (s.status)().as_bytes(),
        ),
        "/metrics" => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4",
            (s.metrics)().as_bytes(),
        ),
        "/snapshot.jpg" => match s.latest.get() {
            Some(a) => {
                let jpeg = encode_jpeg(&a.annotated(), QUALITY).map_err(std::io::Error::other)?;
                respond(&mut stream, "200 OK", "image/jpeg", &jpeg)
            }
            None => respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                b"no frame yet\n",
            ),
        },
        "/stream.mjpg" => stream_mjpeg(stream, s),
        _ => respond(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// The page at `/`: the live stream and links to everything else this server answers.
const INDEX: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>perch</title>\n\
<style>body{font-family:sans-serif;margin:1em}img{max-width:100%}</style></head><body>\n\
<h1>perch</h1>\n<p><img src=\"/stream.mjpg\" alt=\"live view\"></p>\n<ul>\n\
<li><a href=\"/stream.mjpg\">/stream.mjpg</a>: annotated frames (MJPEG)</li>\n\
<li><a href=\"/snapshot.jpg\">/snapshot.jpg</a>: the latest annotated frame (JPEG)</li>\n\
<li><a href=\"/status\">/status</a>: counters, latencies, model and adapter (JSON)</li>\n\
<li><a href=\"/metrics\">/metrics</a>: the same as Prometheus metrics</li>\n\
</ul>\n</body></html>\n";

fn stream_mjpeg(mut stream: TcpStream, s: &Shared) -> std::io::Result<()> {
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=perchframe\r\n\
          Cache-Control: no-store\r\nConnection: close\r\n\r\n",
    )?;
    let mut last_seq = None;
    while !s.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let Some(a) = s.latest.wait_newer(last_seq, Duration::from_millis(500)) else {
            continue;
        };
        last_seq = Some(a.seq);
        let jpeg = encode_jpeg(&a.annotated(), QUALITY).map_err(std::io::Error::other)?;
        write!(
            stream,
            "--perchframe\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nX-Perch-Seq: {}\r\n\r\n",
            jpeg.len(),
            a.seq
        )?;
        stream.write_all(&jpeg)?;
        stream.write_all(b"\r\n")?;
        if let Some(rest) = s.min_interval.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}
