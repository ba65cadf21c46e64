//! A mosquitto broker for tests and benchmarks: Debian's `mosquitto` on a free loopback port
//! with a temporary configuration and a password file (`USER`/`PASS`).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user the broker admits.
pub const USER: &str = "board";
pub const PASS: &str = "s3cret";

/// Polls `f` every 50 ms until it returns Some, failing after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The path of an installed program, or a panic saying how to install it.
pub fn tool(name: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("{name} is not installed (apt-get install mosquitto mosquitto-clients; .ci/run does)");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mosquitto broker on a loopback port, killed when dropped.
pub struct Broker {
    pub port: u16,
    conf: PathBuf,
    /// The broker's log (its stderr), appended over restarts.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// A broker in `dir` with a plain listener that admits only `USER`/`PASS`; `extra` adds
    /// configuration lines before it (e.g. a TLS listener).
    pub fn start(dir: &Path, extra: Option<&str>) -> Broker {
        let pw = dir.join("passwd");
        let st = Command::new(tool("mosquitto_passwd"))
            .args(["-b", "-c", pw.to_str().unwrap(), USER, PASS])
            .status()
            .unwrap();
        assert!(st.success());
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let listener = format!("{}\nlistener {port} 127.0.0.1\n", extra.unwrap_or(""));
        std::fs::write(
            &conf,
            format!(
                "{listener}allow_anonymous false\npassword_file {}\npersistence false\nset_tcp_nodelay true\n\
                 log_dest stderr\n",
                pw.display(),
            ),
        )
        .unwrap();
        let mut b = Broker {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        b.resume();
        b
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub fn resume(&mut self) {
        let child = Command::new(tool("mosquitto"))
            .args(["-c", self.conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_for(10, "mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
