//! The MQTT fleet link against a real broker: Debian's `mosquitto`, started by each test on a
//! free loopback port with a temporary configuration (password file, optionally TLS), and the
//! real `mosquitto_sub`/`mosquitto_pub` clients on the other side.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{Broker, PASS, USER, free_port, tool};
use common::*;
use serde_json::Value;

const PREFIX: &str = "perch/test";

/// `mosquitto_sub` on `PREFIX/#`, collecting (topic, payload, retained) in the background.
struct Sub {
    child: Child,
    got: Arc<Mutex<Vec<(String, String, bool)>>>,
}

impl Sub {
    fn start(b: &Broker, topic: &str) -> Sub {
        let mut child = Command::new(tool("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &b.port.to_string()])
            .args(["-u", USER, "-P", PASS, "-q", "1", "-t", topic])
            .args(["-F", "%r %t %p"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (out, g) = (child.stdout.take().unwrap(), got.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut it = line.splitn(3, ' ');
                let (r, t, p) = (it.next(), it.next(), it.next());
                if let (Some(r), Some(t)) = (r, t) {
                    let p = p.unwrap_or("").to_string();
                    g.lock().unwrap().push((t.to_string(), p, r == "1"));
                }
            }
        });
        Sub { child, got }
    }

    fn on(&self, leaf: &str) -> Vec<String> {
        let topic = format!("{PREFIX}/{leaf}");
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| *t == topic)
            .map(|(_, p, _)| p.clone())
            .collect()
    }

    fn json_on(&self, leaf: &str) -> Vec<Value> {
        self.on(leaf)
            .iter()
            .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{leaf}: {p}: {e}")))
            .collect()
    }

    fn wait(&self, secs: u64, what: &str, f: impl Fn(&Sub) -> bool) {
        wait_for(secs, what, || f(self).then_some(()));
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(b: &Broker, topic: &str, payload: &[u8]) {
    publish_with(b, topic, payload, &[]);
}

/// `mosquitto_pub` with `extra` arguments (e.g. `-r`, retain); the payload from stdin (an
/// empty one as `-n`, which clears a retained message).
fn publish_with(b: &Broker, topic: &str, payload: &[u8], extra: &[&str]) {
    let mut child = Command::new(tool("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &b.port.to_string()])
        .args(["-u", USER, "-P", PASS, "-q", "1", "-t", topic])
        .arg(if payload.is_empty() { "-n" } else { "-s" })
        .args(extra)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    assert!(child.wait().unwrap().success());
}

/// Sends a command on `PREFIX/cmd` and waits for the reply with the same `id`.
fn command(b: &Broker, sub: &Sub, id: &str, body: &str) -> Value {
    let msg = if body.is_empty() {
        format!("{{\"id\":\"{id}\"}}")
    } else {
        format!("{{\"id\":\"{id}\",{body}}}")
    };
    publish(b, &format!("{PREFIX}/cmd"), msg.as_bytes());
    let mut reply = None;
    wait_for(120, &format!("the reply to {id}"), || {
        reply = sub.json_on("cmd/reply").into_iter().find(|r| r["id"] == id);
        reply.as_ref().map(|_| ())
    });
    reply.unwrap()
}

/// A running service in `dir` ([`image_loop_service`] on one image) with `[mqtt]` under
/// `PREFIX` and `mqtt` lines. Returns once the first frame is processed.
fn service(dir: &Path, mqtt: &str) -> (PathBuf, Running) {
    image_loop_service(
        dir,
        &["tests/data/osbs_029.jpg"],
        "",
        &format!("[mqtt]\nprefix = \"{PREFIX}\"\n{mqtt}"),
    )
}

fn auth(b: &Broker) -> String {
    format!(
        "url = \"{}\"\nusername = \"{USER}\"\npassword = \"{PASS}\"\n",
        b.url()
    )
}

fn frames(sock: &Path) -> u64 {
    status(sock)["frames_processed"].as_u64().unwrap()
}

/// Detections, the retained status, availability, events, and commands (an install with its
/// file in the message, an activation, bad requests) through the broker; `offline` on a clean
/// stop.
#[test]
fn publishes_and_serves_commands_through_a_real_broker() {
    let dir = scratch("mqtt-main");
    let b = Broker::start(&dir, None);
    let sub = Sub::start(&b, &format!("{PREFIX}/#"));
    let cmd_topic = format!("{PREFIX}/cmd");
    publish_with(&b, &cmd_topic, br#"{"id":"ret","cmd":"rollback"}"#, &["-r"]);
    let (sock, svc) = service(
        &dir,
        &format!(
            "{}detections = \"every_frame\"\nmax_rate = 1000\nstatus_every_s = 0.5\n\
             commands = true\nallow_install = true\n",
            auth(&b)
        ),
    );
    sub.wait(20, "online", |s| {
        s.on("availability").last().map(String::as_str) == Some("online")
    });
    sub.wait(20, "detections", |s| s.on("detections").len() >= 3);

    // The retained status reaches a client that subscribes later, flagged as retained.
    let late = Sub::start(&b, &format!("{PREFIX}/status"));
    late.wait(10, "the retained status", |s| {
        !s.got.lock().unwrap().is_empty()
    });
    let (_, payload, retained) = late.got.lock().unwrap()[0].clone();
    assert!(retained, "status is retained");
    let st: Value = serde_json::from_str(&payload).unwrap();
    assert!(
        st["model"]["path"].as_str().unwrap().ends_with(".onnx"),
        "{st}"
    );
    assert_eq!(st["mqtt"]["prefix"], PREFIX);
    drop(late);

    // Bad requests: one error reply each, and nothing else happens.
    let events_before = sub.on("events").len();
    // A command left retained on the broker is not run when perch subscribes (it would run
    // again on every reconnect).
    sub.wait(10, "the reply to a retained command", |s| {
        s.json_on("cmd/reply").iter().any(|r| {
            r["ok"] == false && r["error"].as_str().unwrap().starts_with("retained command")
        })
    });
    assert!(!sub.json_on("cmd/reply").iter().any(|r| r["id"] == "ret"));
    publish_with(&b, &cmd_topic, b"", &["-r"]);
    publish(&b, &format!("{PREFIX}/cmd"), b"not json at all");
    sub.wait(10, "the reply to garbage", |s| {
        s.json_on("cmd/reply")
            .iter()
            .any(|r| r["id"].is_null() && r["error"].as_str().unwrap().starts_with("not JSON"))
    });
    let r = command(&b, &sub, "no-cmd", "");
    assert_eq!(
        (r["ok"].clone(), r["error"].clone()),
        (false.into(), "\"cmd\" (a string) is required".into())
    );
    let r = command(&b, &sub, "reload", "\"cmd\":\"reload\"");
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not served over MQTT"),
        "{r}"
    );
    let r = command(
        &b,
        &sub,
        "bad-b64",
        "\"cmd\":\"install\",\"name\":\"x\",\"payload_b64\":\"%%%\"",
    );
    assert!(r["error"].as_str().unwrap().contains("not base64"), "{r}");
    assert_eq!(
        sub.on("events").len(),
        events_before,
        "bad requests make no event: {:?}",
        sub.on("events")
    );
    assert_eq!(status(&sock)["adapters"]["active"], Value::Null);
    // A well-formed activation the swap thread refuses: an error reply and a `refused` event.
    let r = command(
        &b,
        &sub,
        "bad-name",
        "\"cmd\":\"activate\",\"name\":\"../etc\"",
    );
    assert_eq!(r["ok"], false, "{r}");
    sub.wait(10, "the refused event", |s| {
        s.json_on("events")
            .iter()
            .any(|e| e["event"] == "refused" && e["error"].as_str().unwrap().contains("../etc"))
    });

    // Install with the file in the message, then activate: reply, events, and the
    // detection messages name the adapter.
    use base64::Engine as _;
    let bytes = std::fs::read(path("models/adapters/osbs-head.safetensors")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let r = command(
        &b,
        &sub,
        "i1",
        &format!("\"cmd\":\"install\",\"name\":\"osbs\",\"payload_b64\":\"{b64}\""),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["installed"]["bytes"], bytes.len());
    let sha = r["installed"]["sha256"].clone();
    let t0 = Instant::now();
    let r = command(&b, &sub, "a1", "\"cmd\":\"activate\",\"name\":\"osbs\"");
    let latency = t0.elapsed();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["cmd"], "activate");
    assert_eq!(r["active"]["name"], "osbs");
    eprintln!(
        "activate over MQTT: command -> reply {:.0} ms (mosquitto_pub start included)",
        latency.as_secs_f64() * 1e3
    );
    sub.wait(20, "activated and committed events", |s| {
        let ev = s.json_on("events");
        ev.iter().any(|e| e["event"] == "installed")
            && ev
                .iter()
                .any(|e| e["event"] == "activated" && e["active"]["name"] == "osbs")
            && ev.iter().any(|e| e["event"] == "committed")
    });
    sub.wait(20, "detections with the adapter", |s| {
        s.json_on("detections")
            .iter()
            .any(|d| d["adapter"]["sha256"] == sha)
    });
    let r = command(&b, &sub, "r1", "\"cmd\":\"rollback\"");
    assert_eq!(r["ok"], true, "{r}");
    sub.wait(20, "the rolled_back event", |s| {
        s.json_on("events")
            .iter()
            .any(|e| e["event"] == "rolled_back" && e["from"]["name"] == "osbs")
    });

    // A message over the link's incoming limit (with allow_install: the store's 64 MB as
    // base64, about 85 MB; 64 KiB without) ends the connection before it is read whole; the
    // link reconnects and commands work again.
    let connects = status(&sock)["mqtt"]["connects"].as_u64().unwrap();
    publish(&b, &format!("{PREFIX}/cmd"), &vec![b'x'; 100 << 20]);
    wait_for(30, "the reconnect after an oversized message", || {
        (status(&sock)["mqtt"]["connects"].as_u64().unwrap() > connects).then_some(())
    });
    assert_eq!(command(&b, &sub, "p1", "\"cmd\":\"ping\"")["ok"], true);

    // Detection messages are the records, byte for byte.
    signal(&svc, libc::SIGTERM);
    let (code, _, err) = finish(svc, 60);
    assert_eq!(code, Some(0), "{err}");
    sub.wait(10, "offline", |s| {
        s.on("availability").last().map(String::as_str) == Some("offline")
    });
    let recs = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
    let lines: std::collections::HashSet<&str> = recs.lines().collect();
    let dets = sub.on("detections");
    assert!(dets.len() >= 3);
    for d in &dets {
        assert!(
            lines.contains(d.as_str()),
            "a detection message that is not a record: {d}"
        );
    }
    let mqtt_lines: Vec<&str> = err.lines().filter(|l| l.contains("mqtt")).collect();
    assert_eq!(
        mqtt_lines.len(),
        1,
        "one line, for the oversized message: {err}"
    );
    assert!(mqtt_lines[0].contains("size"), "{err}");
}

/// A board that dies (`kill -9`) shows `offline` through the broker's last will.
#[test]
fn last_will_marks_a_killed_board_offline() {
    let dir = scratch("mqtt-will");
    let b = Broker::start(&dir, None);
    let sub = Sub::start(&b, &format!("{PREFIX}/availability"));
    let (_sock, svc) = service(&dir, &format!("{}detections = \"off\"\n", auth(&b)));
    sub.wait(20, "online", |s| {
        s.on("availability").last().map(String::as_str) == Some("online")
    });
    signal(&svc, libc::SIGKILL);
    let t = Instant::now();
    sub.wait(20, "the last will", |s| {
        s.on("availability").last().map(String::as_str) == Some("offline")
    });
    eprintln!(
        "kill -9 -> offline seen after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(svc);
    // Retained: a dashboard that connects later sees the board offline.
    let late = Sub::start(&b, &format!("{PREFIX}/availability"));
    late.wait(10, "retained offline", |s| {
        s.on("availability") == ["offline"]
    });
}

/// Wrong credentials: one clear error line (not one per retry), the service keeps serving
/// locally, and the status says why.
#[test]
fn wrong_credentials_give_one_error_and_frames_keep_flowing() {
    let dir = scratch("mqtt-auth");
    let b = Broker::start(&dir, None);
    let (sock, svc) = service(
        &dir,
        &format!(
            "url = \"{}\"\nusername = \"{USER}\"\npassword = \"wrong\"\nreconnect_max_s = 0.5\n",
            b.url()
        ),
    );
    let before = frames(&sock);
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&sock);
    assert!(
        st["frames_processed"].as_u64().unwrap() > before + 10,
        "{st}"
    );
    assert_eq!(st["mqtt"]["state"], "disconnected", "{st}");
    assert_eq!(st["mqtt"]["connects"], 0);
    let why = st["mqtt"]["last_error"].as_str().unwrap();
    assert!(why.contains("connection refused"), "{why}");
    let log = std::fs::read_to_string(&b.log).unwrap();
    let refusals = log.matches("not authorised").count();
    assert!(refusals >= 3, "several attempts in 3 s: {log}");
    signal(&svc, libc::SIGTERM);
    let (code, _, err) = finish(svc, 60);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("mqtt")).collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line for {refusals} refusals: {err}"
    );
    assert!(lines[0].contains("connection refused"), "{}", lines[0]);
}

/// The broker stops mid-run: every frame is still processed and written (lossless source),
/// the queue is bounded, and perch reconnects within the backoff bound once the broker is
/// back; then detections flow again. A stopped (SIGSTOP) subscriber does not slow perch.
#[test]
fn broker_outage_loses_no_frame_and_reconnects() {
    let dir = scratch("mqtt-outage");
    let mut b = Broker::start(&dir, None);
    let stalled = Sub::start(&b, &format!("{PREFIX}/#"));
    let (sock, svc) = service(
        &dir,
        &format!(
            "{}detections = \"every_frame\"\nmax_rate = 1000\nqueue = 20\nreconnect_max_s = 1\n",
            auth(&b)
        ),
    );
    // A subscriber that stops reading: the broker, not perch, holds its backlog.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(stalled.child.id() as i32, libc::SIGSTOP) };
    let rate = |secs: f64| {
        let (n0, t0) = (frames(&sock), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        (frames(&sock) - n0) as f64 / t0.elapsed().as_secs_f64()
    };
    let connected = rate(3.0);
    b.stop();
    wait_for(10, "perch to see the outage", || {
        (status(&sock)["mqtt"]["state"] == "disconnected").then_some(())
    });
    let down = rate(3.0);
    let st = status(&sock);
    assert!(
        st["mqtt"]["queued"].as_u64().unwrap() <= 20 + 256,
        "bounded: {st}"
    );
    assert!(
        st["mqtt"]["dropped"].as_u64().unwrap() > 0,
        "the queue overflowed: {st}"
    );
    eprintln!("frames/s: {connected:.1} connected (stalled subscriber), {down:.1} broker down");
    assert!(
        down > 0.5 * connected,
        "frames slowed by the outage: {down:.1} vs {connected:.1}"
    );
    let sub_back = {
        b.resume();
        let t = Instant::now();
        let sub = Sub::start(&b, &format!("{PREFIX}/#"));
        sub.wait(10, "reconnect", |s| !s.on("detections").is_empty());
        eprintln!(
            "broker back -> detections again after {:.0} ms (bound: reconnect_max_s 1 s + connect)",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        sub
    };
    assert_eq!(
        sub_back.on("availability").last().map(String::as_str),
        Some("online")
    );
    wait_for(5, "two connects in the status", || {
        (status(&sock)["mqtt"]["connects"] == 2).then_some(())
    });
    // SAFETY: as above.
    unsafe { libc::kill(stalled.child.id() as i32, libc::SIGCONT) };
    let (_, err) = stop_and_read_records(svc, &dir);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("mqtt")).collect();
    assert_eq!(lines.len(), 1, "one line for the outage: {err}");
}

/// A broker link throttled to a trickle (a TCP relay that forwards 2 KB/s): perch's frame
/// rate is that of an unthrottled link, and the overflow is dropped oldest-first and counted.
#[test]
fn a_throttled_link_does_not_slow_the_frames() {
    let dir = scratch("mqtt-slow");
    let b = Broker::start(&dir, None);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    // A small receive window, so the kernel's buffers do not hide the trickle for long.
    {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt(2) on our own listening socket with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                relay.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }
    let relay_port = relay.local_addr().unwrap().port();
    let broker_port = b.port;
    std::thread::spawn(move || {
        for client in relay.incoming() {
            let Ok(client) = client else { break };
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", broker_port)) else {
                continue;
            };
            let (mut c_rd, mut u_wr) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut u_rd, mut c_wr) = (upstream, client);
            // Client -> broker at 2 KB/s; broker -> client unthrottled.
            std::thread::spawn(move || {
                let mut buf = [0u8; 200];
                while let Ok(n) = c_rd.read(&mut buf) {
                    if n == 0 || u_wr.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            std::thread::spawn(move || std::io::copy(&mut u_rd, &mut c_wr));
        }
    });
    let fast_dir = dir.join("fast");
    std::fs::create_dir_all(&fast_dir).unwrap();
    let measure = |d: &Path, url: String| {
        let (sock, svc) = service(
            d,
            &format!(
                "url = \"{url}\"\nusername = \"{USER}\"\npassword = \"{PASS}\"\n\
                 detections = \"every_frame\"\nmax_rate = 1000\nqueue = 16\n"
            ),
        );
        wait_for(20, "connected", || {
            (status(&sock)["mqtt"]["state"] == "connected").then_some(())
        });
        let (n0, t0) = (frames(&sock), Instant::now());
        std::thread::sleep(Duration::from_secs(6));
        let fps = (frames(&sock) - n0) as f64 / t0.elapsed().as_secs_f64();
        let st = status(&sock);
        stop_and_read_records(svc, d);
        (fps, st["mqtt"].clone())
    };
    let (fast, _) = measure(&fast_dir, b.url());
    let (slow, m) = measure(&dir, format!("mqtt://127.0.0.1:{relay_port}"));
    eprintln!(
        "frames/s: {fast:.1} direct, {slow:.1} through a 2 KB/s link ({} published, {} dropped)",
        m["published"], m["dropped"]
    );
    assert!(m["dropped"].as_u64().unwrap() > 0, "{m}");
    assert!(
        slow > 0.7 * fast,
        "throttled link slowed the frames: {slow:.1} vs {fast:.1}"
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(tool("openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name`.pem/.key in `dir`, and for each `(leaf, cn, san)` a certificate
/// `leaf`.pem/.key signed by it: a server certificate for `san` (subjectAltName) when given,
/// else a client certificate.
fn certificates(dir: &Path, name: &str, leaves: &[(&str, &str, Option<&str>)]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_pem) = (format!("{name}.key"), format!("{name}.pem"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "2",
        "-subj",
        "/CN=perch-test-ca",
    ]);
    openssl(dir, &a);
    for (leaf, cn, san) in leaves {
        let (key, csr, pem, subj) = (
            format!("{leaf}.key"),
            format!("{leaf}.csr"),
            format!("{leaf}.pem"),
            format!("/CN={cn}"),
        );
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        let ext = dir.join(format!("{leaf}.ext"));
        // Extensions make it an X.509 v3 certificate, which rustls requires.
        let ext_text = match san {
            Some(s) => format!("subjectAltName={s}\nextendedKeyUsage=serverAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".to_string(),
        };
        std::fs::write(&ext, ext_text).unwrap();
        let ext = ext.display().to_string();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        // The broker may read its files after dropping root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// mqtts with a client certificate as the only credential (the broker takes the certificate's
/// name as the user): status and commands flow; a board that trusts another CA refuses the
/// broker and says why in its status, and keeps serving.
#[test]
fn mqtts_with_a_client_certificate() {
    let dir = scratch("mqtt-tls");
    certificates(
        &dir,
        "ca",
        &[
            ("server", "localhost", Some("DNS:localhost,IP:127.0.0.1")),
            ("client", USER, None),
        ],
    );
    certificates(&dir, "other-ca", &[]);
    let tls_port = free_port();
    let b = Broker::start(
        &dir,
        Some(&format!(
            "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\n\
             keyfile {0}/server.key\nrequire_certificate true\nuse_identity_as_username true",
            dir.display()
        )),
    );
    let sub = Sub::start(&b, &format!("{PREFIX}/#"));
    let (sock, svc) = service(
        &dir,
        &format!(
            "url = \"mqtts://localhost:{tls_port}\"\nca_file = \"ca.pem\"\n\
             cert_file = \"client.pem\"\nkey_file = \"client.key\"\ncommands = true\n\
             detections = \"every_frame\"\nmax_rate = 1000\n"
        ),
    );
    sub.wait(20, "online over TLS", |s| {
        s.on("availability").last().map(String::as_str) == Some("online")
            && !s.on("detections").is_empty()
    });
    let r = command(&b, &sub, "t1", "\"cmd\":\"status\"");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["mqtt"]["broker"], format!("mqtts://localhost:{tls_port}"));
    assert_eq!(status(&sock)["mqtt"]["state"], "connected");
    signal(&svc, libc::SIGTERM);
    let (code, _, err) = finish(svc, 60);
    assert_eq!(code, Some(0), "{err}");

    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["other-ca.pem", "client.pem", "client.key"] {
        std::fs::copy(dir.join(f), other.join(f)).unwrap();
    }
    let (sock, svc) = service(
        &other,
        &format!(
            "url = \"mqtts://localhost:{tls_port}\"\nca_file = \"other-ca.pem\"\n\
             cert_file = \"client.pem\"\nkey_file = \"client.key\"\n"
        ),
    );
    let why = wait_for(20, "the TLS refusal", || {
        let st = status(&sock);
        st["mqtt"]["last_error"].as_str().map(String::from)
    });
    assert!(
        why.contains("certificate") || why.contains("Certificate"),
        "{why}"
    );
    let n = frames(&sock);
    wait_for(20, "frames", || (frames(&sock) > n + 5).then_some(()));
    signal(&svc, libc::SIGTERM);
    let (code, _, err) = finish(svc, 60);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("mqtt")).count(),
        1,
        "{err}"
    );
}
