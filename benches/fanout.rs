//! Fan-out benchmark: how many SSE clients one server core can keep up to date.
//!
//! ```text
//! cargo bench --features ssr --bench fanout -- --clients 1000
//! cargo bench --features ssr --bench fanout -- --clients 10000
//! ```
//!
//! Options (all optional):
//! - `--clients N` SSE clients to open (default 1000);
//! - `--rate EVENTS_PER_SEC` events published per second for the one device
//!   every client follows, so also what each client receives (default 10);
//! - `--seconds S` length of the publish phase (default 10);
//! - `--server-threads T` the server's tokio worker threads (default 1); when
//!   `taskset` exists and the machine has more cores than `T`, the server is
//!   pinned to cores `0..T` and this load generator to the others, so "one
//!   core" really is one core;
//! - `--drain S` how long to wait for late deliveries after the last publish
//!   (default 5); what has not arrived by then counts as lost;
//! - `--heartbeat DURATION`, `--client-queue N` passed on to the server
//!   (default: the server's own defaults);
//! - `--connect-concurrency N` connections being opened at once (default 100);
//! - `--no-pin` do not pin either side to cores;
//! - `--no-busy-poll` let the load generator sleep in `epoll_wait` between
//!   events. By default, when it has its own core, it keeps polling instead:
//!   otherwise every write of the server wakes an idle core (an IPI, costly in
//!   a VM) and that cost, which a server talking to remote clients does not
//!   pay, lands on the server's CPU time and latency;
//! - `--instances N` run N instances in cluster mode on one private
//!   `redis-server` (all pinned like the one server), the clients spread
//!   over them in turn, events published to the first: the figures are for
//!   the whole cluster (CPU and memory summed over the instances and Redis);
//! - `--redis` cluster mode even with one instance, to measure the Redis
//!   hop against the embedded default;
//! - `--server-bin PATH` run another build of the server (to compare two
//!   versions) instead of the one cargo built for this bench;
//! - `--server-wrapper 'CMD ARGS'` run the server under a profiler, e.g.
//!   `--server-wrapper 'valgrind --tool=massif'` (the wrapper must exec the
//!   server or run it in its own process, so the pid, RSS and CPU figures are
//!   the wrapper's: only meant for profiling).
//!
//! It starts the real `telltale` binary (`--addr 127.0.0.1:0 --no-simulator`),
//! registers the device `bench`, measures the server's RSS, opens the clients
//! (raw HTTP/1.1 over tokio `TcpStream`, chunked body and SSE parsed by hand,
//! `GET /api/events?device=bench`), waits until each has its snapshot and
//! `/healthz` counts them all, measures the RSS again (→ memory per idle
//! connection), then publishes at the fixed rate. Each update carries the
//! metric `bench_sent_us`, the send time in µs since the bench started; each
//! client takes receive time − `bench_sent_us` as the publish-to-receive
//! latency, checks that ids are contiguous and counts resync snapshots.
//! Server CPU comes from `/proc/<pid>/stat` (utime + stime) over the publish
//! phase. It reports against the aim (10,000 clients × 10 events/s on one
//! core, p99 < 50 ms, nothing lost, < 16 KiB per idle connection) but asserts
//! nothing.
//!
//! Reading the figures: clients and server share one machine, so over loopback
//! part of the clients' kernel receive path runs on the server's core and is
//! counted as the server's time; and other work on the machine competes for
//! the cores (the `machine:` lines say how much, and warn when it is a lot).
//! The latency of one event is the time the server takes to write it to every
//! client in turn, so p99 is about clients × the µs per delivery printed.

mod support;

use support::Redis;

use clap::Parser;
use hdrhistogram::Histogram;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fanout-bench-token";
const DEVICE: &str = "bench";
const SENT_KEY: &[u8] = b"\"bench_sent_us\":";

#[derive(Parser, Debug)]
#[command(about = "SSE fan-out benchmark for the telltale server")]
struct Args {
    /// SSE clients to open.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Events published per second (each client receives all of them).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Length of the publish phase in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The server's tokio worker threads (TOKIO_WORKER_THREADS); also the cores it is pinned to.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Seconds to wait for late deliveries after the last publish.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Passed on as the server's `--heartbeat` (e.g. `15s`).
    #[arg(long)]
    heartbeat: Option<String>,
    /// Passed on as the server's `--client-queue`.
    #[arg(long)]
    client_queue: Option<u32>,
    /// Connections being opened at once (the server's accept backlog is 128:
    /// more than that at once overflows it, and those clients wait for a SYN retry).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Do not pin the server and the load generator to cores.
    #[arg(long)]
    no_pin: bool,
    /// Let the load generator sleep between events instead of polling on its own core.
    #[arg(long)]
    no_busy_poll: bool,
    /// Instances of a cluster on one private redis-server (implies --redis).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Cluster mode (a private redis-server), even with one instance.
    #[arg(long)]
    redis: bool,
    /// A server binary to run instead of the one cargo built (to compare builds).
    #[arg(long)]
    server_bin: Option<String>,
    /// A command (split on whitespace) to run the server under, for profiling.
    #[arg(long)]
    server_wrapper: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    assert!(args.clients > 0 && args.rate > 0.0 && args.seconds > 0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.server_threads.max(1);
    let have_taskset = std::process::Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let pin = !args.no_pin && have_taskset && cores > threads;
    let server_cpus = format!("0-{}", threads - 1);
    let loadgen_cpus = format!("{threads}-{}", cores - 1);
    if pin {
        // Before any thread exists, so every thread of the load generator inherits it.
        let ok = std::process::Command::new("taskset")
            .args(["-p", "-c", &loadgen_cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "taskset could not pin the load generator");
    }
    let workers = if pin { cores - threads } else { cores };
    let placement = if pin {
        format!(
            "server on {threads} worker thread(s) pinned to CPU {server_cpus}, load generator on CPU {loadgen_cpus}{}",
            if args.no_busy_poll {
                ""
            } else {
                " (busy-polling)"
            }
        )
    } else {
        format!("server on {threads} worker thread(s), not pinned (no taskset or too few cores)")
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("fanout-loadgen")
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(
            args,
            pin.then_some((server_cpus, 0..threads)),
            placement,
        ));
}

/// `pinned`: the server's `taskset` CPU list and the same cores as a range.
async fn run(args: Args, pinned: Option<(String, std::ops::Range<usize>)>, placement: String) {
    let busy_poll = pinned.is_some() && !args.no_busy_poll;
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-file limit: {e}");
    }
    let (server_cpus, server_cores) = pinned.unzip();
    let redis = if args.redis || args.instances > 1 {
        Some(Redis::start(server_cpus.as_deref()).await)
    } else {
        None
    };
    let mut servers = Vec::new();
    for _ in 0..args.instances.max(1) {
        let url = redis.as_ref().map(Redis::url);
        servers.push(Server::start(&args, server_cpus.as_deref(), url.as_deref()).await);
    }
    let mut server = Cluster {
        servers,
        redis: redis.as_ref().map(|r| r.pid),
    };
    let addr = server.servers[0].addr.clone();
    let addrs: Vec<String> = server.servers.iter().map(|s| s.addr.clone()).collect();
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("http client");
    let base = format!("http://{addr}");

    // Register the device (so every client's snapshot holds it) and warm up.
    let warmup = publish(&http, &base, now_us())
        .await
        .expect("warm-up publish");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = server.rss_kib();

    // Open the clients.
    println!(
        "fanout: {} clients, {} events/s for {} s; {placement}",
        args.clients, args.rate, args.seconds
    );
    if redis.is_some() {
        println!(
            "cluster:     {} instance(s) on one redis-server, clients spread over them, events published to the first",
            addrs.len()
        );
    }
    let shared = Arc::new(Shared::default());
    let cancel = CancellationToken::new();
    if busy_poll {
        // Keeps this runtime's worker from parking: it polls for I/O without
        // blocking instead, so the server's writes never wake an idle core.
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                tokio::task::yield_now().await;
            }
        });
    }
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let expected_events = (args.rate * args.seconds).round().max(1.0) as u64;
    let connect_start = Instant::now();
    let handles: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(client(
                addrs[i % addrs.len()].clone(),
                shared.clone(),
                permits.clone(),
                cancel.clone(),
                expected_events as usize,
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60 + args.clients as u64 / 50);
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
        < args.clients
    {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let ready = shared.ready.load(Ordering::Relaxed);
    let mut subscribers = 0;
    for _ in 0..500 {
        subscribers = 0;
        for addr in &addrs {
            subscribers += healthz_subscribers(&http, &format!("http://{addr}"))
                .await
                .unwrap_or(0);
        }
        if subscribers >= ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "connect:     {ready} of {} clients had their snapshot after {connect_secs:.2} s; /healthz counts {subscribers} subscribers",
        args.clients
    );
    // Let the connections go idle, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = server.rss_kib();
    let per_conn = (rss_idle as f64 - rss_before as f64) / ready.max(1) as f64;
    println!(
        "memory:      server RSS {:.1} MiB before, {:.1} MiB with {ready} idle clients → {per_conn:.1} KiB per idle connection",
        rss_before as f64 / 1024.0,
        rss_idle as f64 / 1024.0,
    );

    // Publish at the fixed rate.
    let cpu_before = Cpu::sample(&server.pids());
    let phase_start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut request_hist = latency_histogram();
    let mut published = 0u64;
    let mut publish_errors = 0u64;
    let mut last_id = warmup;
    let mut late_sends = 0u64;
    for i in 0..expected_events {
        let due = phase_start + period.mul_f64(i as f64);
        if Instant::now() > due + period {
            late_sends += 1;
        }
        tokio::time::sleep_until(due.into()).await;
        let sent = now_us();
        match publish(&http, &base, sent).await {
            Ok(id) => {
                if id != last_id + 1 {
                    eprintln!("publish: id {id} after {last_id} (another publisher?)");
                }
                last_id = id;
                published += 1;
                let _ = request_hist.record((now_us().saturating_sub(sent)).max(1));
            }
            Err(e) => {
                publish_errors += 1;
                eprintln!("publish failed: {e}");
            }
        }
    }
    let publish_secs = phase_start.elapsed().as_secs_f64();
    let expected = published * ready as u64;
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let phase_secs = phase_start.elapsed().as_secs_f64();
    let cpu_after = Cpu::sample(&server.pids());
    let rss_after = server.rss_kib();

    // Collect every client's tally.
    cancel.cancel();
    let mut totals = Totals::default();
    let mut latency = latency_histogram();
    let mut connect = latency_histogram();
    for handle in handles {
        match handle.await {
            Ok(stats) => totals.add(stats, &mut latency, &mut connect),
            Err(e) => totals.note_error(format!("client task: {e}")),
        }
    }
    server.stop().await;
    drop(redis);

    let lost = expected.saturating_sub(totals.unique);
    println!(
        "published:   {published} events in {publish_secs:.2} s ({publish_errors} failed, {late_sends} sent late); publish request p50 {:.2} ms, p99 {:.2} ms",
        ms(request_hist.value_at_quantile(0.5)),
        ms(request_hist.value_at_quantile(0.99)),
    );
    println!(
        "deliveries:  {expected} expected, {} received, {lost} lost ({} gaps skipping {} ids, {} resync snapshots, {} duplicate/out-of-order, {} client errors)",
        totals.unique,
        totals.gaps,
        totals.skipped,
        totals.resyncs,
        totals.duplicates,
        totals.errors,
    );
    if !connect.is_empty() {
        println!(
            "connect:     connect-to-snapshot per client p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(connect.value_at_quantile(0.5)),
            ms(connect.value_at_quantile(0.99)),
            ms(connect.max()),
        );
    }
    if let Some(e) = &totals.first_error {
        println!("             first client error: {e}");
    }
    println!(
        "throughput:  {:.0} deliveries/s over {phase_secs:.2} s",
        totals.unique as f64 / phase_secs
    );
    if latency.is_empty() {
        println!("latency:     no events received");
    } else {
        println!(
            "latency:     p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (publish → receive, {} samples)",
            ms(latency.value_at_quantile(0.5)),
            ms(latency.value_at_quantile(0.99)),
            ms(latency.value_at_quantile(0.999)),
            ms(latency.max()),
            latency.len(),
        );
    }
    let ticks = |f: fn(&Cpu) -> u64| {
        f(&cpu_after).saturating_sub(f(&cpu_before)) as f64 / cpu_after.hz / phase_secs * 100.0
    };
    let server_pct = ticks(|c| c.server);
    let self_pct = ticks(|c| c.me);
    let busy_pct = ticks(|c| c.busy);
    let others_pct = (busy_pct - server_pct - self_pct).max(0.0);
    let server_secs = server_pct / 100.0 * phase_secs;
    println!(
        "server CPU:  {server_pct:.1} % of one core during the publish phase = {:.1} µs per delivery; server RSS after it {:.1} MiB",
        server_secs * 1e6 / totals.unique.max(1) as f64,
        rss_after as f64 / 1024.0
    );
    println!(
        "machine:     load generator {self_pct:.1} %, everything else {others_pct:.1} % of one core (all {} cores {:.0} % busy)",
        cpu_after.cores,
        busy_pct / cpu_after.cores as f64,
    );
    if let Some(cores) = &server_cores {
        // Busy time of the server's own cores that was not the server's.
        let core_busy: u64 = cores
            .clone()
            .filter_map(|c| Some(cpu_after.per_core.get(c)? - cpu_before.per_core.get(c)?))
            .sum();
        let intruders =
            (core_busy as f64 / cpu_after.hz / phase_secs * 100.0 - server_pct).max(0.0);
        println!(
            "             other processes on the server's core(s): {intruders:.1} % of one core"
        );
    }
    if others_pct > 20.0 {
        println!(
            "             note: other processes used {others_pct:.0} % of a core; the figures may be CPU-starved"
        );
    }
    let yes = |b: bool| if b { "yes" } else { "NO" };
    let p99 = ms(latency.value_at_quantile(0.99));
    println!(
        "aim:         p99 < 50 ms: {} ({p99:.2}); nothing lost: {} ({lost}); < 16 KiB per idle connection: {} ({per_conn:.1}); within one core: {} ({server_pct:.0} %)",
        yes(!latency.is_empty() && p99 < 50.0),
        yes(lost == 0 && totals.resyncs == 0 && ready == args.clients),
        yes(per_conn < 16.0),
        yes(server_pct < 100.0),
    );
}

/// Microseconds since this bench started (publishers and clients share the
/// process, so its clock): small enough for a metric's ±1e15 limit, which
/// µs since the UNIX epoch (~1.8e15) are not.
fn now_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// `POST /api/devices/bench/status` with `bench_sent_us`; returns the event id.
async fn publish(http: &reqwest::Client, base: &str, sent_us: u64) -> Result<u64, String> {
    let response = http
        .post(format!("{base}/api/devices/{DEVICE}/status"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(format!(r#"{{"metrics":{{"bench_sent_us":{sent_us}}}}}"#))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() || body["changed"] != true {
        return Err(format!("{status}: {body}"));
    }
    body["id"]
        .as_u64()
        .ok_or_else(|| format!("no id in {body}"))
}

async fn healthz_subscribers(http: &reqwest::Client, base: &str) -> Option<usize> {
    let body: serde_json::Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["subscribers"].as_u64().map(|n| n as usize)
}

/// The servers under test, and their Redis in cluster mode.
struct Cluster {
    servers: Vec<Server>,
    redis: Option<u32>,
}

impl Cluster {
    /// Every process of the server side.
    fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .map(|s| s.pid)
            .chain(self.redis)
            .collect()
    }

    fn rss_kib(&self) -> u64 {
        self.pids().into_iter().map(rss_kib).sum()
    }

    async fn stop(&mut self) {
        for server in &mut self.servers {
            server.stop().await;
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One server under test.
struct Server {
    child: tokio::process::Child,
    pid: u32,
    addr: String,
    wrapped: bool,
}

impl Server {
    async fn start(args: &Args, cpus: Option<&str>, redis_url: Option<&str>) -> Self {
        let exe = args
            .server_bin
            .as_deref()
            .unwrap_or(env!("CARGO_BIN_EXE_telltale"));
        let mut argv: Vec<String> = Vec::new();
        if let Some(cpus) = cpus {
            argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        if let Some(wrapper) = &args.server_wrapper {
            argv.extend(wrapper.split_whitespace().map(str::to_owned));
        }
        argv.push(exe.into());
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.args([
            "--ingest-token",
            TOKEN,
            "--no-simulator",
            // Fan-out only: the store's fsync per event is measured elsewhere.
            "--memory",
        ]);
        if let Some(h) = &args.heartbeat {
            cmd.args(["--heartbeat", h]);
        }
        if let Some(url) = redis_url {
            cmd.args(["--redis-url", url]);
        }
        if let Some(q) = args.client_queue {
            cmd.args(["--client-queue", &q.to_string()]);
        }
        cmd.env(
            "TOKIO_WORKER_THREADS",
            args.server_threads.max(1).to_string(),
        );
        let (child, addr) = support::start_server(cmd).await;
        // taskset execs the server, so the pid is the server's.
        let pid = child.id().expect("server pid");
        Self {
            child,
            pid,
            addr,
            wrapped: args.server_wrapper.is_some(),
        }
    }

    /// SIGTERM (the server shuts down gracefully, and a profiler wrapping it
    /// writes its report), then SIGKILL if it is still there after a while.
    async fn stop(&mut self) {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let wait = Duration::from_secs(if self.wrapped { 120 } else { 10 });
        if tokio::time::timeout(wait, self.child.wait()).await.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// CPU time in clock ticks: the server, this process, and the whole machine (busy).
struct Cpu {
    server: u64,
    me: u64,
    busy: u64,
    /// Busy ticks of each core.
    per_core: Vec<u64>,
    cores: usize,
    hz: f64,
}

impl Cpu {
    fn sample(server: &[u32]) -> Self {
        let proc_ticks = |path: &str| -> u64 {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| {
                    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
                    let rest = &s[s.rfind(')')? + 2..];
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
                })
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let busy_of = |line: &str| {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal …
            v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
        };
        let busy = stat.lines().next().map_or(0, busy_of);
        let per_core: Vec<u64> = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(busy_of)
            .collect();
        Self {
            server: server
                .iter()
                .map(|pid| proc_ticks(&format!("/proc/{pid}/stat")))
                .sum(),
            me: proc_ticks("/proc/self/stat"),
            busy,
            cores: per_core.len(),
            per_core,
            hz: clock_ticks_per_second(),
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Counters every client updates.
#[derive(Default)]
struct Shared {
    /// Clients that have their first snapshot.
    ready: AtomicUsize,
    /// Clients that failed before their first snapshot.
    failed: AtomicUsize,
    /// Status events received in order, over all clients.
    delivered: AtomicU64,
}

/// One client's tally.
#[derive(Default)]
struct ClientStats {
    snapshots: u64,
    /// Status events with an id above every id seen before.
    unique: u64,
    /// Times an id was more than one above the last.
    gaps: u64,
    /// Ids jumped over by those gaps.
    skipped: u64,
    duplicates: u64,
    /// Publish-to-receive latency per status event, µs.
    latencies: Vec<u32>,
    /// From the start of the connect to the first snapshot, µs.
    connect_us: Option<u64>,
    error: Option<String>,
}

#[derive(Default)]
struct Totals {
    unique: u64,
    gaps: u64,
    skipped: u64,
    resyncs: u64,
    duplicates: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Totals {
    fn add(
        &mut self,
        stats: ClientStats,
        latency: &mut Histogram<u64>,
        connect: &mut Histogram<u64>,
    ) {
        if let Some(us) = stats.connect_us {
            let _ = connect.record(us.max(1));
        }
        self.unique += stats.unique;
        self.gaps += stats.gaps;
        self.skipped += stats.skipped;
        self.resyncs += stats.snapshots.saturating_sub(1);
        self.duplicates += stats.duplicates;
        for l in stats.latencies {
            let _ = latency.record(u64::from(l).max(1));
        }
        if let Some(e) = stats.error {
            self.note_error(e);
        }
    }

    fn note_error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// One SSE client: connects, then tallies events until cancelled.
async fn client(
    addr: String,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
    expected_events: usize,
) -> ClientStats {
    let mut stats = ClientStats {
        latencies: Vec::with_capacity(expected_events),
        ..Default::default()
    };
    let permit = permits.acquire_owned().await.expect("semaphore");
    let connect_start = Instant::now();
    let mut stream = match connect(&addr).await {
        Ok(s) => s,
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            stats.error = Some(e);
            return stats;
        }
    };
    let mut permit = Some(permit);
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    let mut body: Option<Body> = None;
    let mut sse = support::SseParser::default();
    let mut last_id: Option<u64> = None;
    let result: Result<(), String> = loop {
        let n = tokio::select! {
            biased;
            () = cancel.cancelled() => break Ok(()),
            r = stream.read(&mut buf) => match r {
                Ok(0) => break Err("the server closed the stream".into()),
                Ok(n) => n,
                Err(e) => break Err(e.to_string()),
            },
        };
        let mut input = &buf[..n];
        if body.is_none() {
            head.extend_from_slice(input);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 16 * 1024 {
                    break Err("response head too large".into());
                }
                continue;
            };
            match parse_head(&head[..end]) {
                Ok(b) => body = Some(b),
                Err(e) => break Err(e),
            }
            // What followed the head is body; `buf` still holds it.
            let body_start = end + 4 - (head.len() - n);
            input = &buf[body_start..n];
            head = Vec::new();
        }
        let body = body.as_mut().expect("head parsed");
        let mut on_event = |event: &[u8], id: Option<u64>, data: &[u8]| match event {
            b"snapshot" => {
                stats.snapshots += 1;
                if stats.snapshots == 1 {
                    shared.ready.fetch_add(1, Ordering::Relaxed);
                    stats.connect_us = Some(connect_start.elapsed().as_micros() as u64);
                    permit = None;
                }
                if let Some(id) = id {
                    last_id = Some(last_id.map_or(id, |l| l.max(id)));
                }
            }
            b"status" => {
                let received = now_us();
                let Some(id) = id else { return };
                match last_id {
                    Some(last) if id <= last => {
                        stats.duplicates += 1;
                        return;
                    }
                    Some(last) if id > last + 1 => {
                        stats.gaps += 1;
                        stats.skipped += id - last - 1;
                    }
                    _ => {}
                }
                last_id = Some(id);
                stats.unique += 1;
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                if let Some(sent) = sent_us(data) {
                    stats
                        .latencies
                        .push(received.saturating_sub(sent).min(u32::MAX as u64) as u32);
                }
            }
            _ => {}
        };
        match body.feed(input, &mut |bytes| sse.feed(bytes, &mut on_event)) {
            Ok(true) => {}
            Ok(false) => break Err("the server ended the stream".into()),
            Err(e) => break Err(e),
        }
    };
    if stats.snapshots == 0 {
        shared.failed.fetch_add(1, Ordering::Relaxed);
    }
    drop(permit);
    if let Err(e) = result {
        stats.error = Some(e);
    }
    stats
}

async fn connect(addr: &str) -> Result<TcpStream, String> {
    let request = format!(
        "GET /api/events?device={DEVICE} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    );
    let mut last_error = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match TcpStream::connect(addr).await {
            Ok(mut stream) => match stream.write_all(request.as_bytes()).await {
                Ok(()) => return Ok(stream),
                Err(e) => last_error = format!("send request: {e}"),
            },
            Err(e) => last_error = format!("connect: {e}"),
        }
    }
    Err(last_error)
}

/// Checks the status line and headers; says how the body is framed.
fn parse_head(head: &[u8]) -> Result<Body, String> {
    let head = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("unexpected response: {status}"));
    }
    let mut chunked = false;
    let mut event_stream = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.split(',').any(|v| v.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("content-type") {
            event_stream = value.starts_with("text/event-stream");
        } else if name.eq_ignore_ascii_case("content-encoding") && value != "identity" {
            return Err(format!("unexpected content-encoding: {value}"));
        }
    }
    if !event_stream {
        return Err("the response is not text/event-stream".into());
    }
    Ok(Body {
        chunked,
        state: Chunk::Size {
            size: 0,
            digits: 0,
            extension: false,
        },
    })
}

/// The response body: chunked transfer coding, or read to the end.
struct Body {
    chunked: bool,
    state: Chunk,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// In a chunk-size line (hex digits, then an optional `;extension`).
    Size {
        size: usize,
        digits: u8,
        extension: bool,
    },
    /// In a chunk's data, this many bytes to go.
    Data(usize),
    /// After a chunk's data, before its CRLF ends.
    DataEnd,
    /// After the last (zero-size) chunk.
    Done,
}

impl Body {
    /// Decodes `input`, handing payload to `out`. `Ok(false)` once the body ended.
    fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<bool, String> {
        if !self.chunked {
            out(input);
            return Ok(true);
        }
        while !input.is_empty() {
            match self.state {
                Chunk::Size {
                    size,
                    digits,
                    extension,
                } => {
                    let byte = input[0];
                    input = &input[1..];
                    self.state = match byte {
                        b'\n' if digits == 0 => return Err("empty chunk size".into()),
                        b'\n' if size == 0 => Chunk::Done,
                        b'\n' => Chunk::Data(size),
                        b'\r' => self.state,
                        b';' => Chunk::Size {
                            size,
                            digits,
                            extension: true,
                        },
                        _ if extension => self.state,
                        _ => {
                            let digit = (byte as char)
                                .to_digit(16)
                                .ok_or_else(|| format!("bad chunk size byte {byte:#x}"))?;
                            if digits >= 15 {
                                return Err("chunk size too large".into());
                            }
                            Chunk::Size {
                                size: size * 16 + digit as usize,
                                digits: digits + 1,
                                extension,
                            }
                        }
                    };
                }
                Chunk::Data(left) => {
                    let take = left.min(input.len());
                    out(&input[..take]);
                    input = &input[take..];
                    self.state = if take == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::DataEnd => {
                    let byte = input[0];
                    input = &input[1..];
                    match byte {
                        b'\r' => {}
                        b'\n' => {
                            self.state = Chunk::Size {
                                size: 0,
                                digits: 0,
                                extension: false,
                            }
                        }
                        _ => return Err("chunk data longer than its size".into()),
                    }
                }
                Chunk::Done => return Ok(false),
            }
        }
        Ok(!matches!(self.state, Chunk::Done))
    }
}

/// The `bench_sent_us` metric of a status event's JSON.
fn sent_us(data: &[u8]) -> Option<u64> {
    let at = data.windows(SENT_KEY.len()).position(|w| w == SENT_KEY)? + SENT_KEY.len();
    let rest = &data[at..];
    let end = rest
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
        .unwrap_or(rest.len());
    let value: f64 = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some(value as u64)
}
