//! Page-load benchmark: clients loading the dashboard as fast as the server
//! renders it, while a steady publisher's events are timed to an SSE client.
//!
//! ```text
//! cargo bench --features ssr --bench pages -- --clients 8 --devices 12 --duration 10
//! ```
//!
//! Options (all optional):
//! - `--clients N` concurrent page loaders (default 8), one request in
//!   flight each;
//! - `--devices D` devices on the page (default 12), each with an hour of
//!   history (a reading every 2 s), so every card's sparkline is read from
//!   the store as deployed (the server keeps them, and reads each again
//!   once a minute);
//! - `--duration S` seconds to load pages for (default 10);
//! - `--rate R` events per second the publisher posts meanwhile (default 20);
//! - `--path P` the address loaded (default `/`, the dashboard): a device's
//!   page, or `/metrics` for a Prometheus scrape of every device.
//!
//! It seeds a temporary `--data-dir` through the store itself (readings
//! dated over the last hour), starts the real `telltale` binary on it, and
//! prints:
//! - pages rendered per second, and p50/p99/max of one `GET /`;
//! - p50/p99/max from a publisher's `POST` to its event on the SSE stream,
//!   during the page loads: a render that held up the server's async
//!   workers shows here.
//!
//! It asserts nothing about the figures.

mod support;

use chrono::{TimeDelta, Utc};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telltale::model::{Device, DeviceId, Status};
use telltale::server::store::{Durability, Recorded, Store};
use tokio::process::Command;

const INGEST_TOKEN: &str = "pages-bench-token";

#[derive(Parser, Debug)]
#[command(about = "Page-load benchmark for the telltale server")]
struct Args {
    /// Concurrent page loaders.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// Devices on the page, each with an hour of history.
    #[arg(long, default_value_t = 12)]
    devices: u32,
    /// Seconds to load pages for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Events per second posted meanwhile, timed to an SSE client.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// The address loaded.
    #[arg(long, default_value = "/")]
    path: String,
}

/// An hour of readings for `devices` devices, one every 2 s, written
/// through the store as the server writes them.
fn seed(dir: &std::path::Path, devices: u32) {
    let mut store = Store::open_with(dir, Durability::Off).expect("a store");
    let now = Utc::now();
    let mut id = 0;
    for d in 0..devices {
        let device_id = DeviceId::parse(&format!("bench-{d}")).expect("a valid id");
        let mut previous: Option<Device> = None;
        let mut batch = Vec::new();
        for i in 0..1800 {
            let x = (i % 100) as f64 / 10.0;
            let device = Device {
                id: device_id.clone(),
                name: format!("Bench {d}"),
                status: Status {
                    temperature: Some(20.0 + x),
                    humidity: Some(40.0 + x),
                    power_on: Some(true),
                    metrics: [("load".to_owned(), x)].into(),
                },
                online: None,
                stale: false,
                alerts: Default::default(),
                limits: Default::default(),
                updated_at: now - TimeDelta::seconds(3600 - 2 * i),
            };
            id += 1;
            let json = json!({
                "device": device.id, "name": device.name,
                "status": device.status, "updated_at": device.updated_at,
            });
            batch.push(Recorded {
                id,
                device: device.clone(),
                previous: previous.replace(device),
                json: json.to_string().into(),
                removed: false,
            });
        }
        store.record_all(&batch).expect("the history is written");
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench` to every bench target; ignore it.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let dir = tempfile::tempdir().expect("a temporary data directory");
    seed(dir.path(), args.devices);
    let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
    command
        .args(["--simulator", "off", "--ingest-token", INGEST_TOKEN])
        .arg("--data-dir")
        .arg(dir.path());
    let (mut server, addr) = support::start_server(command).await;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();

    // The publisher's events, timed from each POST to its SSE event.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let delivery = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("a histogram")));
    let mut events = client
        .get(format!("{base}/api/events?device=publisher"))
        .send()
        .await
        .expect("the event stream")
        .bytes_stream();
    let reader = {
        let (sent, delivery) = (sent.clone(), delivery.clone());
        tokio::spawn(async move {
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = events.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let record: String = buffer.drain(..end + 2).collect();
                    let Some(data) = record.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
                        continue;
                    };
                    let Some(n) = event["status"]["metrics"]["n"].as_f64() else {
                        continue;
                    };
                    if let Some(at) = sent.lock().unwrap().remove(&(n as u64)) {
                        let us = at.elapsed().as_micros() as u64;
                        delivery
                            .lock()
                            .unwrap()
                            .record(us.max(1))
                            .expect("in range");
                    }
                }
            }
        })
    };

    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let deadline = started + duration;
    let publisher = {
        let (client, base, sent) = (client.clone(), base.clone(), sent.clone());
        let period = Duration::from_secs_f64(1.0 / args.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut n = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                n += 1;
                sent.lock().unwrap().insert(n, Instant::now());
                let _ = client
                    .post(format!("{base}/api/devices/publisher/status"))
                    .bearer_auth(INGEST_TOKEN)
                    .json(&json!({ "metrics": { "n": n } }))
                    .send()
                    .await;
            }
            n
        })
    };
    let loaders: Vec<_> = (0..args.clients)
        .map(|_| {
            let (client, url) = (reqwest::Client::new(), format!("{base}{}", args.path));
            tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let at = Instant::now();
                    let page = match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => r.text().await.ok(),
                        _ => None,
                    };
                    match page {
                        Some(page) if page.contains("bench-0") => {
                            let us = at.elapsed().as_micros() as u64;
                            latencies.record(us.max(1)).expect("in range");
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut pages = Histogram::<u64>::new(3).expect("a histogram");
    let mut errors = 0;
    for loader in loaders {
        let (latencies, e) = loader.await.expect("a loader");
        pages.add(&latencies).expect("histograms add");
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let published = publisher.await.expect("the publisher");
    // The last events' way to the stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let delivery = delivery.lock().unwrap().clone();
    let lost = sent.lock().unwrap().len();

    println!(
        "pages: GET {} by {} clients for {elapsed:.1} s, {} devices with an hour of history each",
        args.path, args.clients, args.devices
    );
    println!(
        "pages: {} rendered ({:.0}/s), {errors} errors; {}",
        pages.len(),
        pages.len() as f64 / elapsed,
        support::quantiles(&pages)
    );
    println!(
        "events meanwhile: {published} posted at {}/s, {} seen on SSE, {lost} not seen; POST to SSE {}",
        args.rate,
        delivery.len(),
        support::quantiles(&delivery)
    );
    let _ = server.kill().await;
}
