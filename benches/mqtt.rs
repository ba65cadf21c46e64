//! The MQTT fleet link through a real broker (Debian's `mosquitto` on a loopback port): the
//! real `perch run` binary on a paced synthetic camera publishing every frame, and a rumqttc
//! client on the fleet's side. Prints command -> reply latency (p50/p99) for `ping`, `status`
//! and cold `activate` (build + health check + first frame), the frame latency while commands
//! run, and the time from the broker's return after an outage to perch being connected again.
//!
//! `cargo bench --bench mqtt` (env: `PERCH_MQTT_PINGS`, default 200; `PERCH_MQTT_SWAPS`,
//! default 20; `PERCH_MQTT_OUTAGES`, default 5).

#[path = "../tests/common/broker.rs"]
mod broker;
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use broker::{Broker, PASS, USER};
use common::{cpu, env_or, pct, root};
use rumqttc::{Client, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::{Value, json};

const PREFIX: &str = "perch/bench";

fn request(sock: &Path, req: Value) -> Value {
    perch::service::control::request(sock, &req, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{req}: {e}"))
}

/// The fleet's client: publishes commands, receives replies.
struct Fleet {
    client: Client,
    replies: Receiver<Value>,
}

impl Fleet {
    fn connect(port: u16) -> Fleet {
        let mut o = MqttOptions::new("fleet-bench", "127.0.0.1", port);
        o.set_credentials(USER, PASS);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(o, 16);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        conn.eventloop.set_network_options(net);
        client
            .subscribe(format!("{PREFIX}/cmd/reply"), QoS::AtLeastOnce)
            .unwrap();
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice(&p.payload) {
                            let _ = tx.send(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Fleet { client, replies }
    }

    /// Sends `cmd` with a fresh id; returns the reply and the command -> reply time in ms.
    fn ask(&self, id: u64, mut cmd: Value) -> (Value, f64) {
        cmd["id"] = json!(id);
        let t = Instant::now();
        self.client
            .publish(
                format!("{PREFIX}/cmd"),
                QoS::AtLeastOnce,
                false,
                cmd.to_string(),
            )
            .unwrap();
        loop {
            let r = self
                .replies
                .recv_timeout(Duration::from_secs(120))
                .expect("a reply");
            if r["id"] == id {
                return (r, t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
}

fn line(name: &str, v: &[f64]) {
    println!(
        "  {name:<28} n={:<4} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0)
    );
}

fn main() {
    let (pings, swaps, outages) = (
        env_or("PERCH_MQTT_PINGS", 200usize),
        env_or("PERCH_MQTT_SWAPS", 20usize),
        env_or("PERCH_MQTT_OUTAGES", 5usize),
    );
    let dir = std::env::temp_dir().join(format!("perch-bench-mqtt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut b = Broker::start(&dir, None);
    let sock = dir.join("control.sock");
    let cfg = dir.join("perch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\n[source]\nuri = \"synthetic\"\nwidth = 320\nheight = 240\n\
             fps = 15\n[output]\nstdout = false\n[control]\nsocket = \"{}\"\n[adapters]\n\
             store = \"store\"\nprobation_frames = 3\n[mqtt]\nurl = \"{}\"\nusername = \"{USER}\"\n\
             password = \"{PASS}\"\nprefix = \"{PREFIX}\"\ncommands = true\n\
             detections = \"every_frame\"\nmax_rate = 1000\nreconnect_max_s = 1\n",
            root().join("models/tree-yolo11n-320.onnx").display(),
            sock.display(),
            b.url()
        ),
    )
    .unwrap();
    let exe = env!("CARGO_BIN_EXE_perch");
    let mut svc: Child = Command::new(exe)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let st = |sock: &Path| request(sock, json!({"cmd": "status"}));
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    wait("the service", &|| {
        perch::service::control::request(&sock, &json!({"cmd": "status"}), Duration::from_secs(1))
            .is_ok_and(|s| s["frames_processed"].as_u64().unwrap_or(0) > 0)
            && perch::service::control::request(
                &sock,
                &json!({"cmd": "status"}),
                Duration::from_secs(1),
            )
            .is_ok_and(|s| s["mqtt"]["state"] == "connected")
    });
    for (file, name) in [
        ("models/adapters/osbs-head.safetensors", "osbs"),
        ("models/adapters/soap-head.safetensors", "soap"),
    ] {
        let bytes = std::fs::read(root().join(file)).unwrap();
        let r = perch::service::control::request_with_payload(
            &sock,
            &json!({"cmd": "install", "name": name}),
            &bytes,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let fleet = Fleet::connect(b.port);
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "mqtt link, mosquitto on loopback, perch on a 15 fps synthetic camera publishing every \
         frame ({}, {} CPUs)",
        cpu(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    let mut ping = Vec::new();
    for _ in 0..pings {
        ping.push(fleet.ask(next(), json!({"cmd": "ping"})).1);
    }
    let mut status = Vec::new();
    for _ in 0..pings / 4 {
        status.push(fleet.ask(next(), json!({"cmd": "status"})).1);
    }
    let mut activate = Vec::new();
    let mut first_frame = Vec::new();
    for i in 0..swaps {
        let name = ["osbs", "soap"][i % 2];
        let (r, ms) = fleet.ask(next(), json!({"cmd": "activate", "name": name}));
        assert_eq!(r["ok"], true, "{r}");
        activate.push(ms);
        if let Some(f) = r["times"]["command_to_first_frame_ms"].as_f64() {
            first_frame.push(f);
        }
    }
    println!("command -> reply through the broker:");
    line("ping", &ping);
    line("status", &status);
    line("activate (cold, alternating)", &activate);
    line("  of which command->1st frame", &first_frame);
    let s = st(&sock);
    println!(
        "frame latency over the run: p50 {} ms, p99 {} ms; mqtt published {}, dropped {}",
        s["latency_ms"]["p50"],
        s["latency_ms"]["p99"],
        s["mqtt"]["published"],
        s["mqtt"]["dropped"]
    );

    let mut back = Vec::new();
    for i in 0..outages {
        b.stop();
        wait("disconnected", &|| {
            st(&sock)["mqtt"]["state"] == "disconnected"
        });
        // Let the backoff reach its bound (reconnect_max_s = 1), and return at a different
        // phase of the retry cycle each time.
        std::thread::sleep(Duration::from_millis(
            3000 + 1000 * i as u64 / outages.max(1) as u64,
        ));
        let t = Instant::now();
        b.resume();
        wait("reconnected", &|| st(&sock)["mqtt"]["state"] == "connected");
        back.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "broker back, at phases spread over the retry cycle -> perch connected \
         (reconnect_max_s = 1, so the bound is 1000 ms + connect):"
    );
    line("reconnect", &back);
    let _ = svc.kill();
    let _ = svc.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
