//! Sustained durable ingest benchmark: N clients posting status updates over
//! HTTP as fast as the server acknowledges them.
//!
//! ```text
//! cargo bench --features ssr --bench ingest -- --clients 8 --duration 20
//! ```
//!
//! Options (all optional):
//! - `--clients N` concurrent posting clients (default 8), each with its own
//!   connection and device, one request in flight at a time;
//! - `--duration S` seconds to post for (default 10);
//! - `--memory` run the server with `--memory` (no fsync) instead of a
//!   durable data directory; the store's size is then not measured;
//! - `--redis` cluster mode (one instance on a private `redis-server`):
//!   each update is also published through Redis before its 200;
//! - `--database-url URL` the store in PostgreSQL instead (in its own
//!   fresh schema, dropped at the end; its size is not measured);
//! - `--batch N` each request is a `POST /api/status` of N devices (each
//!   client its own N), so an acknowledged request is N updates;
//! - `--mqtt` the clients are MQTT devices on a private `mosquitto`
//!   (`--mqtt` of the server), each publishing its next update at QoS 1
//!   once the previous one is on the server's event stream; the latency is
//!   then from the publish to the event, read by one SSE client.
//!
//! It starts the real `telltale` binary (`--simulator off`, a fresh
//! temporary `--data-dir`: durable, `synchronous=FULL`, as deployed). Each
//! update changes `temperature` and `metrics.load`, so it is one event and
//! two readings. It prints:
//! - updates acknowledged per second (each one committed and fsynced before
//!   its 200);
//! - p50/p99/max latency of one `POST /api/devices/{id}/status` (or of one
//!   batch), from the request to the answer (hdrhistogram, µs resolution);
//! - store bytes per million readings: the growth of the database file plus
//!   its WAL over the run, divided by the readings written; and the same for
//!   the database alone after a `wal_checkpoint(TRUNCATE)` (the WAL file is
//!   reused, never shrunk, so the first figure includes its high-water
//!   mark; the second is what the readings cost once settled).
//!   The event log (one JSON row per update) is part of both.
//!
//! It asserts nothing about the figures.

mod support;

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::process::Command;

const INGEST_TOKEN: &str = "ingest-bench-token";

#[derive(Parser, Debug)]
#[command(about = "Sustained ingest benchmark for the telltale server")]
struct Args {
    /// Concurrent posting clients, each its own connection and device.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// Seconds to post for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Run the server with `--memory` instead of a durable data directory.
    #[arg(long)]
    memory: bool,
    /// Cluster mode, on a private redis-server.
    #[arg(long)]
    redis: bool,
    /// Keep the store in this PostgreSQL database (a fresh schema of it).
    #[arg(long)]
    database_url: Option<String>,
    /// Each request a `POST /api/status` of this many devices.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: Option<u32>,
    /// The clients report over MQTT, through a private mosquitto.
    #[arg(long)]
    mqtt: bool,
}

/// A fresh schema in a PostgreSQL database, dropped with this.
struct Schema {
    base: String,
    name: String,
}

impl Schema {
    fn new(base: &str) -> Self {
        let name = format!("bench_{}", std::process::id());
        admin(base, &format!("CREATE SCHEMA {name}"));
        Self {
            base: base.into(),
            name,
        }
    }

    /// The URL that makes this schema the search path.
    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.base, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        admin(&self.base, &format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

fn admin(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        postgres::Client::connect(&url, postgres::NoTls)
            .and_then(|mut c| c.batch_execute(&sql))
            .expect("PostgreSQL at --database-url")
    })
    .join()
    .expect("the admin thread");
}

/// The database file and its WAL, in bytes.
fn store_bytes(dir: &Path) -> u64 {
    let file = dir.join(telltale::server::store::FILE_NAME);
    let wal = dir.join(format!("{}-wal", telltale::server::store::FILE_NAME));
    [file, wal]
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum()
}

/// Copies the WAL into the database and empties it.
fn checkpoint(dir: &Path) {
    let file = dir.join(telltale::server::store::FILE_NAME);
    let conn = rusqlite::Connection::open(&file).expect("open the store");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("a checkpoint");
}

struct ClientResult {
    latencies: Histogram<u64>,
    updates: u64,
    errors: u64,
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench` to every bench target; ignore it.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let dir = tempfile::tempdir().expect("a temporary data directory");
    let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
    command.args(["--simulator", "off", "--ingest-token", INGEST_TOKEN]);
    let schema = args.database_url.as_deref().map(Schema::new);
    if let Some(schema) = &schema {
        command.args(["--database-url", &schema.url()]);
    } else if args.memory {
        command.arg("--memory");
    } else {
        command.arg("--data-dir").arg(dir.path());
    }
    let redis = match args.redis {
        true => Some(support::Redis::start(None).await),
        false => None,
    };
    if let Some(redis) = &redis {
        command.args(["--redis-url", &redis.url()]);
    }
    let mosquitto = match args.mqtt {
        true => Some(support::Mosquitto::start().await),
        false => None,
    };
    if let Some(mosquitto) = &mosquitto {
        command.args(["--mqtt", &mosquitto.url()]);
    }
    let sqlite = schema.is_none() && !args.memory;
    let (mut server, addr) = support::start_server(command).await;
    let base = format!("http://{addr}");
    if let Some(mosquitto) = &mosquitto {
        let (latencies, updates, elapsed) = mqtt::run(mosquitto.port, &base, &args).await;
        println!(
            "ingest over MQTT: {} devices for {elapsed:.1} s, {}",
            args.clients,
            if args.memory {
                "--memory (no fsync)"
            } else {
                "durable"
            }
        );
        println!(
            "updates: {updates} on the event stream ({:.0}/s)",
            updates as f64 / elapsed
        );
        println!("publish → event: {}", support::quantiles(&latencies));
        let _ = server.kill().await;
        return;
    }

    // Client `i`'s request `n`: where, what, and how many updates it is.
    let batch = args.batch;
    let request = move |i: usize, n: u64| {
        // Every update a change, and always in range.
        let x = (n % 1000) as f64;
        let update = json!({ "temperature": x, "metrics": { "load": x } });
        match batch {
            None => (format!("/api/devices/ingest-{i}/status"), update),
            Some(b) => (
                "/api/status".to_owned(),
                (0..b)
                    .map(|d| (format!("ingest-{i}-{d}"), update.clone()))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            ),
        }
    };
    let per_request = u64::from(batch.unwrap_or(1));

    // Register every device first, so the run measures updates only.
    let clients: Vec<reqwest::Client> = (0..args.clients).map(|_| reqwest::Client::new()).collect();
    for (i, client) in clients.iter().enumerate() {
        let (path, body) = request(i, 0);
        let status = client
            .post(format!("{base}{path}"))
            .bearer_auth(INGEST_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("the first post")
            .status();
        assert!(status.is_success(), "the first post answered {status}");
    }
    if sqlite {
        checkpoint(dir.path());
    }
    let before = store_bytes(dir.path());

    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let base = base.clone();
            tokio::spawn(async move {
                let mut result = ClientResult {
                    latencies: Histogram::new(3).expect("a histogram"),
                    updates: 0,
                    errors: 0,
                };
                let mut n = 1u64;
                while Instant::now() < deadline {
                    let (path, body) = request(i, n);
                    let sent = Instant::now();
                    let answer = client
                        .post(format!("{base}{path}"))
                        .bearer_auth(INGEST_TOKEN)
                        .json(&body)
                        .send()
                        .await;
                    let ok = match answer {
                        Ok(response) if response.status().is_success() => {
                            response.bytes().await.is_ok()
                        }
                        _ => false,
                    };
                    if ok {
                        let us = sent.elapsed().as_micros() as u64;
                        result.latencies.record(us.max(1)).expect("in range");
                        result.updates += per_request;
                    } else {
                        result.errors += 1;
                    }
                    n += 1;
                }
                result
            })
        })
        .collect();
    let mut latencies: Histogram<u64> = Histogram::new(3).expect("a histogram");
    let (mut updates, mut errors) = (0u64, 0u64);
    for task in tasks {
        let r = task.await.expect("a client task");
        latencies.add(&r.latencies).expect("histograms add");
        updates += r.updates;
        errors += r.errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = store_bytes(dir.path());
    let readings = updates * 2;

    println!(
        "ingest: {} clients for {:.1} s, {}",
        args.clients,
        elapsed,
        match (&schema, args.memory) {
            (Some(_), _) => "PostgreSQL",
            (None, true) => "--memory (no fsync)",
            (None, false) => "durable data directory (synchronous=FULL)",
        },
    );
    if redis.is_some() {
        println!("cluster mode: one instance on a private redis-server");
    }
    if let Some(b) = batch {
        println!("each request a batch of {b} devices (POST /api/status)");
    }
    println!(
        "updates: {updates} acknowledged ({:.0}/s), {readings} readings, {errors} errors",
        updates as f64 / elapsed
    );
    println!("latency: {}", support::quantiles(&latencies));
    let _ = server.kill().await;
    if sqlite && readings > 0 {
        let per_million = |bytes: u64| bytes as f64 * 1e6 / readings as f64 / 1e6;
        println!(
            "store: +{:.1} MB database + WAL = {:.1} MB per million readings",
            after.saturating_sub(before) as f64 / 1e6,
            per_million(after.saturating_sub(before))
        );
        checkpoint(dir.path());
        let checkpointed = store_bytes(dir.path());
        println!(
            "store after a checkpoint: {:.1} MB = {:.1} MB per million readings \
             (before the run: {:.1} MB)",
            checkpointed as f64 / 1e6,
            per_million(checkpointed.saturating_sub(before)),
            before as f64 / 1e6
        );
    }
}

/// The clients as MQTT devices: each publishes an update, waits for it on
/// the server's event stream, and publishes the next.
mod mqtt {
    use super::Args;
    use futures::StreamExt;
    use hdrhistogram::Histogram;
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    use serde_json::{Value, json};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc;

    /// The latencies, the updates seen, and the seconds it took.
    pub async fn run(port: u16, base: &str, args: &Args) -> (Histogram<u64>, u64, f64) {
        let mut seen = HashMap::new();
        let mut receivers = Vec::new();
        for i in 0..args.clients {
            let (sender, receiver) = mpsc::unbounded_channel();
            seen.insert(format!("mqtt-{i}"), sender);
            receivers.push(receiver);
        }
        tokio::spawn(follow(format!("{base}/api/events"), seen));
        let duration = Duration::from_secs_f64(args.duration);
        let mut tasks = Vec::new();
        let mut started = None;
        for (i, mut seen) in receivers.into_iter().enumerate() {
            let device = format!("mqtt-{i}");
            let mut options = MqttOptions::new(&device, "127.0.0.1", port);
            options.set_inflight(1);
            let (client, mut events) = AsyncClient::new(options, 16);
            tokio::spawn(async move { while events.poll().await.is_ok() {} });
            let topic = format!("telltale/{device}/status");
            let publish = move |x: f64| {
                let client = client.clone();
                let topic = topic.clone();
                async move {
                    let body = json!({ "temperature": x, "metrics": { "load": x } });
                    client
                        .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .expect("published");
                }
            };
            // The first update registers the device; until the server is
            // subscribed, it is sent again.
            loop {
                publish(0.0).await;
                if let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(500), seen.recv()).await
                {
                    break;
                }
            }
            let deadline = *started
                .get_or_insert_with(|| Instant::now() + Duration::from_millis(200))
                + duration;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
                let mut n = 1u64;
                while Instant::now() < deadline {
                    let x = (n % 1000) as f64 + 1.0;
                    let sent = Instant::now();
                    publish(x).await;
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
                            Ok(Some(t)) if t == x => break,
                            Ok(Some(_)) => continue,
                            _ => panic!("update {n} of {i} never reached the event stream"),
                        }
                    }
                    let us = sent.elapsed().as_micros() as u64;
                    latencies.record(us.max(1)).expect("in range");
                    n += 1;
                }
                latencies
            }));
        }
        let start = started.expect("some clients");
        tokio::time::sleep_until(start.into()).await;
        let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
        for task in tasks {
            latencies
                .add(task.await.expect("a client"))
                .expect("histograms add");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let updates = latencies.len();
        (latencies, updates, elapsed)
    }

    /// Reads the event stream, passing each device's temperature on.
    async fn follow(url: String, seen: HashMap<String, mpsc::UnboundedSender<f64>>) {
        let response = reqwest::get(&url).await.expect("the event stream");
        let mut body = response.bytes_stream();
        let mut sse = crate::support::SseParser::default();
        let mut on_event = |event: &[u8], _: Option<u64>, data: &[u8]| {
            if event != b"status" {
                return;
            }
            let event: Value = serde_json::from_slice(data).expect("JSON data");
            let device = event["device"].as_str().unwrap_or_default();
            if let (Some(sender), Some(t)) =
                (seen.get(device), event["status"]["temperature"].as_f64())
            {
                let _ = sender.send(t);
            }
        };
        while let Some(Ok(chunk)) = body.next().await {
            sse.feed(&chunk, &mut on_event);
        }
    }
}
