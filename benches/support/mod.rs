//! What the benches share: starting the real `telltale` server (and a
//! `redis-server` for cluster mode).

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Spawns `command` (the server, maybe behind `taskset` or a profiler) on
/// port 0; returns it and the address it listens on, once it says so. Its
/// log keeps being read so it never blocks on a full pipe; warnings and
/// errors are passed on.
pub async fn start_server(mut command: Command) -> (Child, String) {
    command
        .args(["--addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info,tower_http=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for var in telltale::server::config::Config::env_vars() {
        command.env_remove(var);
    }
    let mut child = command.spawn().expect("start the telltale server");
    let mut lines = BufReader::new(child.stdout.take().expect("server stdout")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read server stdout") {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the server did not say where it listens");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("server: {line}");
            }
        }
    });
    (child, addr)
}

/// "p50 …, p99 …, max …" of a histogram of µs, in ms.
#[allow(dead_code)] // not every bench prints its latencies so
pub fn quantiles(h: &hdrhistogram::Histogram<u64>) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// A private `redis-server` for cluster mode (maybe pinned to `cpus`),
/// killed when dropped.
#[allow(dead_code)] // not every bench runs a cluster
pub struct Redis {
    _child: tokio::process::Child,
    pub pid: u32,
    port: u16,
}

#[allow(dead_code)]
impl Redis {
    pub async fn start(cpus: Option<&str>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut argv: Vec<String> = Vec::new();
        if let Some(cpus) = cpus {
            argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        argv.push("redis-server".into());
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        let pid = child.id().expect("redis-server pid");
        listens(port).await;
        Self {
            _child: child,
            pid,
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// A private `mosquitto` (plain, anonymous, in memory), killed when dropped.
#[allow(dead_code)] // only the ingest bench speaks MQTT
pub struct Mosquitto {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

#[allow(dead_code)]
impl Mosquitto {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("mosquitto.conf is written");
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto starts");
        listens(port).await;
        Self {
            _child: child,
            _dir: dir,
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Waits (up to 5 s) until something accepts connections on 127.0.0.1:`port`.
#[allow(dead_code)] // not every bench runs a helper server
async fn listens(port: u16) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An incremental `text/event-stream` parser (lines end in LF, CRLF tolerated).
#[derive(Default)]
#[allow(dead_code)] // the benches that read SSE use it
pub struct SseParser {
    line: Vec<u8>,
    event: Vec<u8>,
    id: Option<u64>,
    data: Vec<u8>,
    has_data: bool,
}

#[allow(dead_code)]
impl SseParser {
    /// Feeds bytes; `on_event(event, id, data)` for each whole event.
    pub fn feed(&mut self, mut input: &[u8], on_event: &mut impl FnMut(&[u8], Option<u64>, &[u8])) {
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.on_line(&input[..end], on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&input[..end]);
                self.on_line(&line, on_event);
                line.clear();
                self.line = line;
            }
            input = &input[end + 1..];
        }
        self.line.extend_from_slice(input);
    }

    fn on_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8], Option<u64>, &[u8])) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                on_event(&self.event, self.id, &self.data);
            }
            self.event.clear();
            self.data.clear();
            self.id = None;
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // a comment: the heartbeat
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" => {
                self.id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {} // retry
        }
    }
}
