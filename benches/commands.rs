//! Command round-trip benchmark: from a command sent by one WebSocket client
//! to the confirmed status event seen by another.
//!
//! ```text
//! cargo bench --features ssr --bench commands -- --commands 1000
//! ```
//!
//! Options (all optional):
//! - `--commands N` commands to send (default 1000);
//! - `--timeout S` seconds any one command may take before the bench gives
//!   up (default 10);
//! - `--nagle` leave Nagle's algorithm on for the bench's own client sockets,
//!   as `tokio_tungstenite::connect_async` (and so `telltale agent`) does. By
//!   default the clients set `TCP_NODELAY`, so that the figures are the
//!   server's.
//!
//! It starts the real `telltale` binary (`--addr 127.0.0.1:0 --simulator off`
//! with an ingest and an operator token) and opens three WebSocket clients on
//! `GET /api/ws`, all in this process:
//! - a viewer (`hello` role `viewer`, then `subscribe` to the device `bench`);
//! - the device agent of `bench` (`hello` role `device` with the ingest
//!   token), which answers each `command` as `telltale agent` does: first a
//!   `status` with the new `power_on`, then a `result` `applied`. It does no
//!   other work, so what is measured is the server;
//! - an operator (`hello` role `operator` with the operator token).
//!
//! The agent first reports `power_on: false`. Then, one command in flight at
//! a time, the operator sends a `command` toggling `power_on`; the bench
//! records the time from the send to (a) the viewer receiving the `status`
//! event of `bench` with the new `power_on`, (b) the operator receiving the
//! `ack`, and (c) the operator receiving the command's `result` (which must be
//! `applied`). It prints p50/p90/p99/max of each (hdrhistogram, µs
//! resolution) and the commands per second of the whole sequential run. It
//! asserts nothing about the figures.
//!
//! Two small frames written back to back on one socket (the server's `ack`
//! then `result` to the operator; the agent's `status` then `result`) are
//! where Nagle's algorithm bites: the second waits for the peer's delayed ACK
//! of the first, about 40 ms on Linux. A send → result p50 near 40 ms means
//! that, not slow command handling.

mod support;

use clap::Parser;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use telltale::model::{DeviceId, StatusUpdate};
use telltale::protocol::{ClientMessage, CommandSet, Outcome, Role, ServerMessage, VERSION};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const INGEST_TOKEN: &str = "commands-bench-ingest";
const OPERATOR_TOKEN: &str = "commands-bench-operator";
const DEVICE: &str = "bench";
/// How long setting up (server start, connections, first report) may take.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "Command round-trip benchmark for the telltale server")]
struct Args {
    /// Commands to send, one in flight at a time.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    commands: u32,
    /// Seconds one command may take before the bench gives up.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Leave Nagle's algorithm on for the bench's own client sockets, as
    /// tokio-tungstenite's `connect_async` (and so `telltale agent`) does.
    #[arg(long)]
    nagle: bool,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Starts the server; returns it and the address it listens on.
async fn start_server(data_dir: &std::path::Path) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
    // Durable, as deployed: each confirmed status is fsynced before it is sent.
    command.arg("--data-dir").arg(data_dir).args([
        "--simulator",
        "off",
        "--ingest-token",
        INGEST_TOKEN,
        "--operator-token",
        OPERATOR_TOKEN,
    ]);
    support::start_server(command).await
}

fn text(message: &ClientMessage) -> Message {
    Message::text(serde_json::to_string(message).expect("a client message serializes"))
}

/// Reads the next protocol message; `None` when the connection ends.
/// Pings and pongs are skipped (tungstenite answers pings by itself).
async fn next_message(ws: &mut SplitStream<Ws>) -> Option<ServerMessage> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                    panic!("a server message that is not protocol v{VERSION} ({e}): {t}")
                }));
            }
            Ok(Message::Close(frame)) => {
                eprintln!("the server closed a WebSocket: {frame:?}");
                return None;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("a WebSocket failed: {e}");
                return None;
            }
        }
    }
}

/// Connects to `GET /api/ws`, says `hello` as `role` and waits for `welcome`.
async fn connect(
    addr: &str,
    nagle: bool,
    role: Role,
    token: Option<&str>,
    device: Option<&DeviceId>,
) -> (SplitSink<Ws, Message>, SplitStream<Ws>) {
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/api/ws"), None, !nagle),
    )
    .await
    .expect("the WebSocket handshake hung")
    .expect("the WebSocket upgrade succeeds");
    let (mut tx, mut rx) = ws.split();
    let hello = ClientMessage::Hello {
        v: VERSION,
        role,
        token: token.map(str::to_owned),
        device: device.cloned(),
    };
    tx.send(text(&hello)).await.expect("send hello");
    match tokio::time::timeout(PATIENCE, next_message(&mut rx)).await {
        Ok(Some(ServerMessage::Welcome { role: r, .. })) if r == role => {}
        other => panic!("hello as {role:?} was answered {other:?}"),
    }
    (tx, rx)
}

/// The device agent: answers every command with its status, then `applied`.
async fn run_agent(mut tx: SplitSink<Ws, Message>, mut rx: SplitStream<Ws>) {
    while let Some(message) = next_message(&mut rx).await {
        match message {
            ServerMessage::Command {
                request_id,
                device,
                set,
            } => {
                let status = ClientMessage::Status {
                    device,
                    update: StatusUpdate {
                        power_on: set.power_on,
                        ..StatusUpdate::default()
                    },
                    request_id: None,
                };
                let result = ClientMessage::Result {
                    request_id,
                    outcome: Outcome::Applied,
                    reason: None,
                };
                if tx.send(text(&status)).await.is_err() || tx.send(text(&result)).await.is_err() {
                    return;
                }
            }
            ServerMessage::Error { .. } => panic!("the server refused the agent: {message:?}"),
            _ => {}
        }
    }
}

/// The viewer's side: each `status` event of the device, with its
/// `power_on` and the moment it was read.
async fn run_viewer(
    mut rx: SplitStream<Ws>,
    events: mpsc::UnboundedSender<(Option<bool>, Instant)>,
) {
    while let Some(message) = next_message(&mut rx).await {
        let at = Instant::now();
        let power_on = match message {
            ServerMessage::Status { data, .. } if data.device.as_str() == DEVICE => {
                data.status.power_on
            }
            ServerMessage::Error { .. } => panic!("the server refused the viewer: {message:?}"),
            _ => continue,
        };
        if events.send((power_on, at)).is_err() {
            return;
        }
    }
}

/// The operator's side: each `ack` and `result`, with the moment it was
/// read. An `error` is fatal.
async fn run_operator(
    mut rx: SplitStream<Ws>,
    answers: mpsc::UnboundedSender<(ServerMessage, Instant)>,
) {
    while let Some(message) = next_message(&mut rx).await {
        let at = Instant::now();
        match message {
            ServerMessage::Ack { .. } | ServerMessage::Result { .. } => {}
            ServerMessage::Error { .. } => panic!("the server refused the operator: {message:?}"),
            _ => continue,
        }
        if answers.send((message, at)).is_err() {
            return;
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn report(label: &str, h: &Histogram<u64>) {
    println!(
        "{label:<28} {:>9} {:>9} {:>9} {:>9}",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

fn main() {
    // `cargo bench` passes `--bench` to every bench target; ignore it.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(args));
}

async fn run(args: Args) {
    let per_command = Duration::from_secs_f64(args.timeout);
    let data_dir = tempfile::tempdir().expect("a temporary data directory");
    let (mut server, addr) = start_server(data_dir.path()).await;
    let device = DeviceId::parse(DEVICE).expect("a valid device id");

    // The viewer subscribes first, so every event of the device reaches it.
    let (mut viewer_tx, mut viewer_rx) = connect(&addr, args.nagle, Role::Viewer, None, None).await;
    let subscribe = ClientMessage::Subscribe {
        last_event_id: None,
        devices: vec![device.clone()],
    };
    viewer_tx.send(text(&subscribe)).await.expect("subscribe");
    match tokio::time::timeout(PATIENCE, next_message(&mut viewer_rx)).await {
        Ok(Some(ServerMessage::Snapshot { .. })) => {}
        other => panic!("subscribe was answered {other:?}"),
    }
    let (status_tx, mut statuses) = mpsc::unbounded_channel();
    let viewer = tokio::spawn(run_viewer(viewer_rx, status_tx));

    // The agent reports `power_on: false` before any command.
    let (mut agent_tx, agent_rx) = connect(
        &addr,
        args.nagle,
        Role::Device,
        Some(INGEST_TOKEN),
        Some(&device),
    )
    .await;
    let first = ClientMessage::Status {
        device: device.clone(),
        update: StatusUpdate {
            power_on: Some(false),
            ..StatusUpdate::default()
        },
        request_id: None,
    };
    agent_tx.send(text(&first)).await.expect("the first report");
    tokio::time::timeout(PATIENCE, async {
        while let Some((on, _)) = statuses.recv().await {
            if on == Some(false) {
                return;
            }
        }
        panic!("the viewer stopped before the agent's first report");
    })
    .await
    .expect("the viewer never saw the agent's first report");
    let agent = tokio::spawn(run_agent(agent_tx, agent_rx));

    let (mut operator_tx, operator_rx) = connect(
        &addr,
        args.nagle,
        Role::Operator,
        Some(OPERATOR_TOKEN),
        None,
    )
    .await;
    let (answer_tx, mut answers) = mpsc::unbounded_channel();
    let operator = tokio::spawn(run_operator(operator_rx, answer_tx));

    let mut to_status = histogram();
    let mut to_ack = histogram();
    let mut to_result = histogram();
    let mut status_first = 0u32;
    let started = Instant::now();
    for i in 0..args.commands {
        let power_on = i % 2 == 0;
        let request_id = format!("c-{i}");
        let command = text(&ClientMessage::Command {
            device: device.clone(),
            set: CommandSet {
                power_on: Some(power_on),
            },
            request_id: request_id.clone(),
        });
        let sent = Instant::now();
        operator_tx.send(command).await.expect("send the command");
        let (seen, acked, answered) = tokio::time::timeout(per_command, async {
            let mut seen = None;
            let mut acked = None;
            let mut answered = None;
            while seen.is_none() || answered.is_none() {
                tokio::select! {
                    event = statuses.recv(), if seen.is_none() => {
                        let (on, at) = event.expect("the viewer's connection ended");
                        if on == Some(power_on) {
                            seen = Some(at);
                        }
                    }
                    answer = answers.recv(), if answered.is_none() => {
                        match answer.expect("the operator's connection ended") {
                            (ServerMessage::Ack { request_id: id }, at) => {
                                assert_eq!(id, request_id, "an ack for another command");
                                acked = Some(at);
                            }
                            (ServerMessage::Result { request_id: id, outcome, reason }, at) => {
                                assert_eq!(id, request_id, "a result for another command");
                                assert_eq!(
                                    outcome,
                                    Outcome::Applied,
                                    "command {id} ended {outcome:?}: {reason:?}"
                                );
                                answered = Some(at);
                            }
                            (other, _) => unreachable!("{other:?}"),
                        }
                    }
                }
            }
            let acked = acked.unwrap_or_else(|| panic!("no ack before the result of {request_id}"));
            (seen.expect("seen"), acked, answered.expect("answered"))
        })
        .await
        .unwrap_or_else(|_| panic!("command {request_id} took more than {per_command:?}"));
        to_ack
            .record(micros(acked - sent))
            .expect("a latency within bounds");
        if seen <= answered {
            status_first += 1;
        }
        to_status
            .record(micros(seen - sent))
            .expect("a latency within bounds");
        to_result
            .record(micros(answered - sent))
            .expect("a latency within bounds");
    }
    let elapsed = started.elapsed();

    let n = args.commands;
    println!(
        "{n} commands, one in flight, toggling power_on of `{DEVICE}` \
         (server {addr}, in-process agent, viewer and operator)"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "p50", "p90", "p99", "max"
    );
    report("send → viewer status event", &to_status);
    report("send → operator ack", &to_ack);
    report("send → operator result", &to_result);
    println!(
        "{:.0} commands/s ({n} in {:.3} s); the viewer had the status before \
         the operator had the result for {status_first} of {n}",
        f64::from(n) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
    );

    // Stop reading before the server goes, so its resets are not reported.
    for task in [viewer, agent, operator] {
        task.abort();
    }
    let _ = server.kill().await;
}
