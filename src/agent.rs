//! `telltale agent`: the device agent, shipped in the same binary.
//!
//! It connects to a server's `GET /api/ws` as role `device` (the messages
//! are in [`crate::protocol`]) and every interval reports the real hardware
//! of the machine it runs on, read through `sysinfo`:
//! - `temperature`: the CPU's, where the OS exposes a sensor (see
//!   [`cpu_temperature`]);
//! - `metrics`: `load_1m`, `memory_used_pct`, `cpu_pct`, `uptime_s`.
//!
//! A reading the machine does not offer is left out (the page shows "—"),
//! and logged once. Values are rounded to what is worth showing, and only
//! the fields that changed are sent (everything once after each connect).
//!
//! The server is `ws://` or, behind a TLS proxy, `wss://`: TLS is rustls
//! with the ring provider, trusting the platform's certificates (read once
//! at start; `SSL_CERT_FILE` or `SSL_CERT_DIR` name others, e.g. a private
//! CA). A refused certificate is a connection failure like any other: it is
//! logged, with its reason, and retried.
//!
//! Power commands go to a [`PowerAction`]; the status update goes out before
//! the `applied` result, and a failing action answers `failed` with its
//! reason. When the server goes away the agent reconnects with exponential
//! backoff and jitter ([`backoff`]); a close code that retrying cannot cure
//! (4401, 4403, 4409, 1008) ends it with an error. Meanwhile it goes on
//! reading the machine every interval, keeps the last [`MAX_KEPT`] readings
//! ([`Kept`]), and once back sends them first, each `at` its own time, so
//! the history has no hole where the server was away. A reading sent is
//! kept too, until the server acks it as durable: one that a connection
//! lost on its way, or that the server could not store, is sent again.

use crate::model::{DeviceId, StatusUpdate};
use crate::protocol::{ClientMessage, CommandSet, Outcome, Role, ServerMessage, VERSION, close};
use crate::server::config::{AgentOptions, parse_name};
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// The first wait before reconnecting; each failed attempt doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before reconnecting.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connecting and being welcomed may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A send that takes longer means the server is gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agent pings the server, whatever the server's own pings.
const PING: Duration = Duration::from_secs(15);
/// Nothing heard from the server (pongs included) for this long: it is gone.
const SILENCE: Duration = Duration::from_secs(45);
/// Readings kept while the server is away or has not acked them (the
/// oldest go first).
pub const MAX_KEPT: usize = 2_000;

/// The wait before reconnect attempt `attempt` (0 for the first): doubling
/// from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`], then "equal jitter": a point
/// in the upper half of that, `jitter` (0 to 1) saying where, so that many
/// agents that lost the same server do not come back all at once.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A device id made from a hostname: lowercased, up to its first dot, every
/// run of other characters made one `-`, at most 64 characters. `None` when
/// nothing usable is left.
pub fn device_id_from_hostname(host: &str) -> Option<DeviceId> {
    let short = host.trim().split('.').find(|s| !s.is_empty())?;
    let mut id = String::with_capacity(short.len());
    for c in short.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            id.push(c);
        } else if !id.is_empty() && !id.ends_with('-') {
            id.push('-');
        }
    }
    id.truncate(64);
    DeviceId::parse(id.trim_end_matches('-')).ok()
}

/// One reading of the machine; `None` where it offers no such reading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// °C.
    pub temperature: Option<f64>,
    pub load_1m: Option<f64>,
    /// Used (not available) memory, % of the total.
    pub memory_used_pct: Option<f64>,
    /// CPU use of all cores since the previous reading, %.
    pub cpu_pct: Option<f64>,
    pub uptime_s: Option<f64>,
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

impl Reading {
    /// Rounded to the precision worth showing, so noise below it is no change.
    fn rounded(&self) -> (Option<f64>, BTreeMap<String, f64>) {
        let metrics = [
            ("load_1m", self.load_1m, 2),
            ("memory_used_pct", self.memory_used_pct, 1),
            ("cpu_pct", self.cpu_pct, 1),
            ("uptime_s", self.uptime_s, 0),
        ]
        .into_iter()
        .filter_map(|(key, value, decimals)| {
            value
                .filter(|v| v.is_finite())
                .map(|v| (key.to_owned(), round(v, decimals)))
        })
        .collect();
        (self.temperature.map(|t| round(t, 1)), metrics)
    }
}

/// What the server was told on this connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reported {
    name: Option<String>,
    temperature: Option<f64>,
    power_on: Option<bool>,
    metrics: BTreeMap<String, f64>,
}

impl Reported {
    /// The update that brings the server from what it was told to `reading`,
    /// `power_on` and `name`: only what changed, or `None` when nothing did.
    /// What it returns counts as told.
    pub fn update(
        &mut self,
        name: Option<&str>,
        reading: &Reading,
        power_on: Option<bool>,
    ) -> Option<StatusUpdate> {
        let (temperature, metrics) = reading.rounded();
        let mut update = StatusUpdate::default();
        if let Some(name) = name
            && self.name.as_deref() != Some(name)
        {
            update.name = Some(name.to_owned());
            self.name = Some(name.to_owned());
        }
        if temperature.is_some() && temperature != self.temperature {
            update.temperature = temperature;
            self.temperature = temperature;
        }
        if power_on.is_some() && power_on != self.power_on {
            update.power_on = power_on;
            self.power_on = power_on;
        }
        let changed: BTreeMap<String, f64> = metrics
            .into_iter()
            .filter(|(k, v)| self.metrics.get(k) != Some(v))
            .collect();
        if !changed.is_empty() {
            self.metrics.extend(changed.clone());
            update.metrics = Some(changed);
        }
        (update != StatusUpdate::default()).then_some(update)
    }
}

/// The CPU temperature among `(label, °C)` sensors: a whole-package sensor
/// (Intel `Package id`, AMD `Tctl`/`Tdie`), else the hottest core, else a
/// sensor named for the CPU or SoC, else the hottest sensor of all.
/// Implausible values (outside -40 to 150 °C) are never taken.
pub fn cpu_temperature<'a>(
    sensors: impl IntoIterator<Item = (&'a str, Option<f32>)>,
) -> Option<f64> {
    let valid: Vec<(String, f64)> = sensors
        .into_iter()
        .filter_map(|(label, t)| {
            let t = f64::from(t?);
            (-40.0..=150.0)
                .contains(&t)
                .then(|| (label.to_ascii_lowercase(), t))
        })
        .collect();
    let hottest = |keys: &[&str]| {
        valid
            .iter()
            .filter(|(label, _)| keys.is_empty() || keys.iter().any(|k| label.contains(k)))
            .map(|(_, t)| *t)
            .reduce(f64::max)
    };
    hottest(&["package", "tctl", "tdie"])
        .or_else(|| hottest(&["core"]))
        .or_else(|| hottest(&["cpu", "soc"]))
        .or_else(|| hottest(&[]))
}

/// Where readings come from.
pub trait Sensors: Send {
    fn read(&mut self) -> Reading;
}

/// The machine the agent runs on, through `sysinfo`.
pub struct Machine {
    system: Option<sysinfo::System>,
    components: Option<sysinfo::Components>,
    /// When the CPU counters were last read; CPU use is the change since.
    cpu_read_at: Option<std::time::Instant>,
    /// The readings already logged as not available.
    missing: BTreeSet<&'static str>,
}

impl Machine {
    pub fn new() -> Self {
        let mut machine = Self {
            system: None,
            components: None,
            cpu_read_at: None,
            missing: BTreeSet::new(),
        };
        match sysinfo::System::new() {
            Ok(mut system) => {
                system.refresh_cpu_usage();
                machine.cpu_read_at = Some(std::time::Instant::now());
                machine.system = Some(system);
            }
            Err(e) => machine.absent("memory and CPU use", e),
        }
        match sysinfo::Components::new_with_refreshed_list() {
            Ok(components) => machine.components = Some(components),
            Err(e) => machine.absent("temperature", e),
        }
        machine
    }

    /// Logs once that `what` is not available on this machine.
    fn absent(&mut self, what: &'static str, why: impl Display) {
        if self.missing.insert(what) {
            tracing::info!("this machine offers no {what} ({why}); it is left out of the reports");
        }
    }

    fn temperature(&mut self) -> Option<f64> {
        let components = self.components.as_mut()?;
        components.refresh(false);
        let t = cpu_temperature(components.iter().map(|c| (c.label(), c.temperature())));
        if t.is_none() {
            let n = components.len();
            self.absent(
                "temperature",
                format_args!("no CPU sensor among {n} sensors"),
            );
        }
        t
    }

    fn memory_used_pct(&mut self) -> Option<f64> {
        let system = self.system.as_mut()?;
        system.refresh_memory();
        let total = system.total_memory();
        if total == 0 {
            self.absent("memory use", "total memory is 0");
            return None;
        }
        Some((system.used_memory() as f64 / total as f64 * 100.0).clamp(0.0, 100.0))
    }

    fn cpu_pct(&mut self) -> Option<f64> {
        let system = self.system.as_mut()?;
        let since = self.cpu_read_at?.elapsed();
        // Too soon after the last read, the counters say nothing yet.
        if since < sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
            return None;
        }
        system.refresh_cpu_usage();
        self.cpu_read_at = Some(std::time::Instant::now());
        if system.cpus().is_empty() {
            self.absent("CPU use", "no CPU is listed");
            return None;
        }
        let pct = f64::from(system.global_cpu_usage());
        pct.is_finite().then_some(pct.clamp(0.0, 100.0))
    }

    fn load_1m(&mut self) -> Option<f64> {
        if cfg!(windows) {
            self.absent("load average", "Windows has none");
            return None;
        }
        match sysinfo::System::load_average() {
            Ok(load) if load.one.is_finite() && load.one >= 0.0 => Some(load.one),
            Ok(load) => {
                self.absent("load average", format_args!("it reads {}", load.one));
                None
            }
            Err(e) => {
                self.absent("load average", e);
                None
            }
        }
    }

    fn uptime_s(&mut self) -> Option<f64> {
        match sysinfo::System::uptime() {
            Ok(0) => {
                self.absent("uptime", "it reads 0");
                None
            }
            Ok(secs) => Some(secs as f64),
            Err(e) => {
                self.absent("uptime", e);
                None
            }
        }
    }
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Sensors for Machine {
    fn read(&mut self) -> Reading {
        Reading {
            temperature: self.temperature(),
            load_1m: self.load_1m(),
            memory_used_pct: self.memory_used_pct(),
            cpu_pct: self.cpu_pct(),
            uptime_s: self.uptime_s(),
        }
    }
}

/// What a power command does. The agent reports [`PowerAction::power_on`]
/// in every status; `set_power` returns why it could not, if it could not.
pub trait PowerAction: Send {
    fn set_power(&mut self, on: bool) -> Result<(), String>;
    fn power_on(&self) -> Option<bool>;
}

/// The default [`PowerAction`]: records the state in memory and switches
/// nothing. It starts on: the agent is running, so the machine is.
#[derive(Debug)]
pub struct RecordedPower {
    on: bool,
}

impl Default for RecordedPower {
    fn default() -> Self {
        Self { on: true }
    }
}

impl PowerAction for RecordedPower {
    fn set_power(&mut self, on: bool) -> Result<(), String> {
        self.on = on;
        Ok(())
    }

    fn power_on(&self) -> Option<bool> {
        Some(self.on)
    }
}

/// How one connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Reconnect after a backoff; says why.
    Retry(String),
    /// Stop for good; says why.
    Fatal(String),
    /// Asked to stop (ctrl-c, SIGTERM).
    Stopped,
}

/// What a close code from the server means for the agent.
pub fn on_close(code: Option<u16>, reason: &str, device: &DeviceId) -> Ended {
    match code {
        Some(close::UNAUTHORIZED) => Ended::Fatal(format!(
            "the server refused this agent: 4401 unauthorized ({reason}); check --token"
        )),
        Some(close::FORBIDDEN) => Ended::Fatal(format!(
            "the server refused this agent: 4403 forbidden ({reason}); the token is not \
             valid for device `{device}`"
        )),
        Some(close::REPLACED) => Ended::Fatal(format!(
            "4409 replaced: another agent connected for device `{device}` ({reason}); \
             stopping so that the two do not take turns"
        )),
        Some(close::POLICY) => Ended::Fatal(format!(
            "the server refused this agent's protocol: 1008 ({reason}); this agent speaks v{VERSION}"
        )),
        Some(code) => Ended::Retry(format!("the server closed the connection: {code} {reason}")),
        None => Ended::Retry("the server closed the connection".into()),
    }
}

/// How to reach `server`: plain for `ws://`; for `wss://`, TLS trusting
/// this machine's certificates. `Err` (saying why) when none are found.
fn connector(server: &str) -> Result<Connector, String> {
    if !server.starts_with("wss://") {
        return Ok(Connector::Plain);
    }
    crate::tls::client_config(server).map(Connector::Rustls)
}

/// Why connecting to `server` failed, in words; a TLS failure says so.
fn cannot_connect(server: &str, e: &tungstenite::Error) -> String {
    let tls = match e {
        tungstenite::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        tungstenite::Error::Tls(tungstenite::error::TlsError::Rustls(tls)) => Some(&**tls),
        _ => None,
    };
    match tls {
        Some(tls) => format!("cannot connect to {server}: {}", crate::tls::explain(tls)),
        None => format!("cannot connect to {server}: {e}"),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One agent: who it is, where it reports, and what it reads and switches.
pub struct Agent {
    pub server: String,
    pub device: DeviceId,
    pub token: String,
    pub name: Option<String>,
    pub interval: Duration,
    pub sensors: Box<dyn Sensors>,
    pub power: Box<dyn PowerAction>,
    /// Plain or TLS, made once by [`Agent::run`].
    connector: Connector,
    reading: Reading,
    reported: Reported,
    kept: Kept,
    /// The server said it could not store a reading, and has not acked
    /// one since.
    unstored: bool,
}

/// The readings the server has not acknowledged, oldest first: taken
/// while it was away, sent but not yet answered, or refused for want of
/// storage. Each is sent with a number as its `request_id`; the server acks
/// it once durable, and only then is it forgotten.
#[derive(Debug, Default)]
pub struct Kept {
    readings: std::collections::VecDeque<KeptReading>,
    /// Dropped for want of room since the last catch-up.
    dropped: usize,
    /// The number the next reading sent goes out with.
    next: u64,
}

#[derive(Debug)]
struct KeptReading {
    at: chrono::DateTime<chrono::Utc>,
    reading: Reading,
    power: Option<bool>,
    /// The number it went out with on this connection; `None`: to be sent.
    sent: Option<u64>,
}

impl Kept {
    /// Keeps one more reading, to be sent; the oldest goes past [`MAX_KEPT`].
    pub fn keep(
        &mut self,
        at: chrono::DateTime<chrono::Utc>,
        reading: Reading,
        power: Option<bool>,
    ) {
        self.push(at, reading, power, None);
    }

    /// Keeps a reading sent just now (its update worked out by the caller),
    /// until the server acks it; returns its number.
    pub fn sent(
        &mut self,
        at: chrono::DateTime<chrono::Utc>,
        reading: Reading,
        power: Option<bool>,
    ) -> u64 {
        self.next += 1;
        self.push(at, reading, power, Some(self.next));
        self.next
    }

    fn push(
        &mut self,
        at: chrono::DateTime<chrono::Utc>,
        reading: Reading,
        power: Option<bool>,
        sent: Option<u64>,
    ) {
        if self.readings.len() == MAX_KEPT {
            self.readings.pop_front();
            self.dropped += 1;
        }
        self.readings.push_back(KeptReading {
            at,
            reading,
            power,
            sent,
        });
    }

    /// The updates that tell the readings still to be sent, in order, each
    /// `at` its time and numbered, from what `reported` says the server was
    /// told (and told now); those are sent from now on. A reading that
    /// tells nothing new is forgotten.
    pub fn unsent(
        &mut self,
        reported: &mut Reported,
        name: Option<&str>,
    ) -> Vec<(u64, StatusUpdate)> {
        let mut updates = Vec::new();
        self.readings.retain_mut(|kept| {
            if kept.sent.is_some() {
                return true;
            }
            let Some(mut update) = reported.update(name, &kept.reading, kept.power) else {
                return false;
            };
            update.at = Some(kept.at);
            self.next += 1;
            kept.sent = Some(self.next);
            updates.push((self.next, update));
            true
        });
        updates
    }

    /// The server acked reading `n`: it is durable, and the ones before it
    /// are past (acked, or refused and now older than what the server has).
    pub fn acked(&mut self, n: u64) {
        if let Some(i) = self.readings.iter().position(|k| k.sent == Some(n)) {
            self.readings.drain(..=i);
        }
    }

    /// The server refused reading `n` for good (a field it cannot take).
    pub fn refused(&mut self, n: u64) {
        self.readings.retain(|k| k.sent != Some(n));
    }

    /// The server could not store reading `n`: it is sent again.
    pub fn not_stored(&mut self, n: u64) {
        for kept in self.readings.iter_mut().filter(|k| k.sent == Some(n)) {
            kept.sent = None;
        }
    }

    /// The connection ended: whatever was not acked is sent again on the
    /// next one.
    pub fn send_again(&mut self) {
        for kept in &mut self.readings {
            kept.sent = None;
        }
    }
}

/// `telltale agent`: runs until ctrl-c or SIGTERM (success) or a refusal
/// (failure, with the reason logged).
pub async fn run(options: AgentOptions) -> ExitCode {
    let host = sysinfo::System::host_name().ok();
    let device = match options.device {
        Some(device) => device,
        None => match host.as_deref().and_then(device_id_from_hostname) {
            Some(device) => device,
            None => {
                tracing::error!(
                    "cannot make a device id from the hostname {host:?}; pass --device"
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let name = options
        .name
        .or_else(|| host.and_then(|h| parse_name(&h).ok()));
    let mut agent = Agent::new(
        options.server,
        device,
        options.token,
        name,
        options.interval,
        Box::new(Machine::new()),
        Box::new(RecordedPower::default()),
    );
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        on_signal.cancel();
    });
    match agent.run(&stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            tracing::error!("telltale agent stopped: {why}");
            ExitCode::FAILURE
        }
    }
}

impl Agent {
    pub fn new(
        server: String,
        device: DeviceId,
        token: String,
        name: Option<String>,
        interval: Duration,
        sensors: Box<dyn Sensors>,
        power: Box<dyn PowerAction>,
    ) -> Self {
        Self {
            server,
            device,
            token,
            name,
            interval,
            sensors,
            power,
            connector: Connector::Plain,
            reading: Reading::default(),
            reported: Reported::default(),
            kept: Kept::default(),
            unstored: false,
        }
    }

    /// Connects, reports and reconnects until `stop` (`Ok`) or a refusal
    /// (`Err`, saying why).
    pub async fn run(&mut self, stop: &CancellationToken) -> Result<(), String> {
        self.connector = connector(&self.server)?;
        tracing::info!(
            "telltale agent: reporting this machine as device `{}` to {} every {:?}",
            self.device,
            self.server,
            self.interval
        );
        // Readings are taken on one schedule, connected or not.
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut attempt = 0;
        loop {
            let mut welcomed = false;
            let why = match self.session(stop, &mut welcomed, &mut tick).await {
                Ended::Stopped => return Ok(()),
                Ended::Fatal(why) => return Err(why),
                Ended::Retry(why) => why,
            };
            if welcomed {
                attempt = 0;
            }
            let wait = backoff(attempt, rand::random());
            attempt = attempt.saturating_add(1);
            tracing::warn!("{why}; reconnecting in {:.1} s", wait.as_secs_f64());
            let waited = tokio::time::sleep(wait);
            tokio::pin!(waited);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = &mut waited => break,
                    _ = tick.tick() => self.keep_reading(),
                }
            }
        }
    }

    /// Reads the machine now, and keeps the reading for when the server is
    /// back.
    fn keep_reading(&mut self) {
        self.reading = self.sensors.read();
        let power = self.power.power_on();
        self.kept
            .keep(chrono::Utc::now(), self.reading.clone(), power);
    }

    /// One connection, from connecting to its end, reading the machine on
    /// `tick`. Sets `welcomed` once the server has taken the hello.
    async fn session(
        &mut self,
        stop: &CancellationToken,
        welcomed: &mut bool,
        tick: &mut Interval,
    ) -> Ended {
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            // Nagle off: `status` and `result` go out back to back.
            tokio_tungstenite::connect_async_tls_with_config(
                self.server.as_str(),
                None,
                true,
                Some(self.connector.clone()),
            ),
        );
        let mut ws = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            connected = connect => match connected {
                Err(_) => return Ended::Retry(format!("connecting to {} timed out", self.server)),
                Ok(Err(e)) => return Ended::Retry(cannot_connect(&self.server, &e)),
                Ok(Ok((ws, _))) => ws,
            },
        };
        let hello = ClientMessage::Hello {
            v: VERSION,
            role: Role::Device,
            token: Some(self.token.clone()),
            device: Some(self.device.clone()),
        };
        if let Err(end) = send(&mut ws, &hello).await {
            return end;
        }
        let welcome = tokio::time::timeout(CONNECT_TIMEOUT, self.welcome(&mut ws));
        let end = tokio::select! {
            () = stop.cancelled() => Some(Ended::Stopped),
            welcome = welcome => match welcome {
                Err(_) => Some(Ended::Retry("no welcome from the server".into())),
                Ok(result) => result.err(),
            },
        };
        if let Some(end) = end {
            return end;
        }
        *welcomed = true;
        tracing::info!("connected to {} as device `{}`", self.server, self.device);
        // The server may have restarted and forgotten everything: tell all,
        // the readings kept meanwhile first, then one taken now.
        self.reported = Reported::default();
        self.kept.send_again();
        match self.catch_up(&mut ws).await {
            Ok(0) => {}
            Ok(count) => tracing::info!("sent the {count} readings the server had not acked"),
            Err(end) => return end,
        }
        tick.reset_immediately();
        let end = self.serve(&mut ws, stop, tick).await;
        if end == Ended::Stopped {
            let goodbye = CloseFrame {
                code: CloseCode::Normal,
                reason: "the agent is stopping".into(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(goodbye))).await;
        }
        end
    }

    async fn welcome(&mut self, ws: &mut Socket) -> Result<(), Ended> {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ServerMessage>(text.as_str()) {
                        Ok(ServerMessage::Welcome { .. }) => return Ok(()),
                        Ok(ServerMessage::Error { error, .. }) => {
                            tracing::warn!("the server refused the hello: {error}");
                        }
                        _ => tracing::debug!("before the welcome, ignored: {text}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => return Err(self.closed(frame)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Ended::Retry(format!("the connection failed: {e}"))),
                None => return Err(Ended::Retry("the connection ended".into())),
            }
        }
    }

    fn closed(&self, frame: Option<CloseFrame>) -> Ended {
        match frame {
            Some(f) => on_close(Some(f.code.into()), f.reason.as_str(), &self.device),
            None => on_close(None, "", &self.device),
        }
    }

    /// Sends the kept readings not sent on this connection yet, oldest
    /// first, each at its time; returns how many went.
    async fn catch_up(&mut self, ws: &mut Socket) -> Result<usize, Ended> {
        let dropped = std::mem::take(&mut self.kept.dropped);
        if dropped > 0 {
            tracing::warn!(
                "{dropped} readings the server had not acked were dropped for want \
                 of room: the last {MAX_KEPT} are kept"
            );
        }
        let updates = self.kept.unsent(&mut self.reported, self.name.as_deref());
        let count = updates.len();
        for (n, update) in updates {
            send(ws, &self.status(update, n)).await?;
        }
        Ok(count)
    }

    fn status(&self, update: StatusUpdate, n: u64) -> ClientMessage {
        ClientMessage::Status {
            device: self.device.clone(),
            update,
            request_id: Some(n.to_string()),
        }
    }

    /// Reports every `tick` and answers commands until the connection ends.
    async fn serve(
        &mut self,
        ws: &mut Socket,
        stop: &CancellationToken,
        tick: &mut Interval,
    ) -> Ended {
        let mut ping = tokio::time::interval_at(Instant::now() + PING, PING);
        let mut heard = Instant::now();
        loop {
            let result = tokio::select! {
                biased;
                () = stop.cancelled() => return Ended::Stopped,
                message = ws.next() => {
                    heard = Instant::now();
                    match message {
                        Some(Ok(Message::Text(text))) => self.receive(ws, text.as_str()).await,
                        Some(Ok(Message::Close(frame))) => return self.closed(frame),
                        Some(Ok(_)) => Ok(()),
                        Some(Err(e)) => return Ended::Retry(format!("the connection failed: {e}")),
                        None => return Ended::Retry("the connection ended".into()),
                    }
                }
                _ = tick.tick() => {
                    // sysinfo reads /proc and /sys: quick, no need for a thread.
                    self.reading = self.sensors.read();
                    self.report(ws).await
                }
                _ = ping.tick() => {
                    if heard.elapsed() > SILENCE {
                        return Ended::Retry(format!("no word from the server for {SILENCE:?}"));
                    }
                    send_frame(ws, Message::Ping(Default::default())).await
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Sends what changed since the last report, if anything did, after
    /// the readings still to be sent (the server could not store them).
    async fn report(&mut self, ws: &mut Socket) -> Result<(), Ended> {
        self.catch_up(ws).await?;
        let power_on = self.power.power_on();
        let Some(update) = self
            .reported
            .update(self.name.as_deref(), &self.reading, power_on)
        else {
            return Ok(());
        };
        if let Err(e) = update.validate() {
            // Cannot happen with the checks above; never send what is refused.
            tracing::warn!("a reading was not sent: {}", e.message);
            return Ok(());
        }
        let n = self
            .kept
            .sent(chrono::Utc::now(), self.reading.clone(), power_on);
        send(ws, &self.status(update, n)).await
    }

    async fn receive(&mut self, ws: &mut Socket, text: &str) -> Result<(), Ended> {
        match serde_json::from_str::<ServerMessage>(text) {
            Ok(ServerMessage::Command {
                request_id, set, ..
            }) => self.command(ws, request_id, set).await,
            Ok(ServerMessage::Ack { request_id }) => {
                if let Ok(n) = request_id.parse() {
                    self.kept.acked(n);
                }
                if std::mem::take(&mut self.unstored) {
                    tracing::info!("the server stores readings again");
                }
                Ok(())
            }
            Ok(ServerMessage::Error {
                error,
                field,
                request_id,
            }) => {
                let n = request_id.and_then(|id| id.parse().ok());
                match (n, field) {
                    // Not stored, so not taken: sent again on the next tick.
                    (Some(n), None) => {
                        self.kept.not_stored(n);
                        if !std::mem::replace(&mut self.unstored, true) {
                            tracing::warn!(
                                "the server could not store a reading: {error}; \
                                 readings are kept and sent again until it can"
                            );
                        }
                    }
                    (n, field) => {
                        if let Some(n) = n {
                            self.kept.refused(n);
                        }
                        let field = field.map(|f| format!(" ({f})")).unwrap_or_default();
                        tracing::warn!("the server refused a message: {error}{field}");
                    }
                }
                // What it refused is not told: the next report tells all.
                self.reported = Reported::default();
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                // A command this agent cannot read still gets its answer.
                let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                match (value["type"].as_str(), value["request_id"].as_str()) {
                    (Some("command"), Some(request_id)) => {
                        let reason = format!("this agent cannot apply this command: {e}");
                        self.answer(ws, request_id.to_owned(), Outcome::Failed, Some(reason))
                            .await
                    }
                    _ => {
                        tracing::debug!("ignored a message from the server ({e}): {text}");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Applies a command: the status first, then the result.
    async fn command(
        &mut self,
        ws: &mut Socket,
        request_id: String,
        set: CommandSet,
    ) -> Result<(), Ended> {
        let Some(on) = set.power_on else {
            let reason = Some("the command changes nothing".to_owned());
            return self.answer(ws, request_id, Outcome::Failed, reason).await;
        };
        match self.power.set_power(on) {
            Ok(()) => {
                tracing::info!(
                    "power {} by command {request_id}",
                    if on { "on" } else { "off" }
                );
                self.report(ws).await?;
                self.answer(ws, request_id, Outcome::Applied, None).await
            }
            Err(reason) => {
                tracing::warn!("command {request_id} failed: {reason}");
                self.answer(ws, request_id, Outcome::Failed, Some(reason))
                    .await
            }
        }
    }

    async fn answer(
        &mut self,
        ws: &mut Socket,
        request_id: String,
        outcome: Outcome,
        reason: Option<String>,
    ) -> Result<(), Ended> {
        let result = ClientMessage::Result {
            request_id,
            outcome,
            reason,
        };
        send(ws, &result).await
    }
}

async fn send(ws: &mut Socket, message: &ClientMessage) -> Result<(), Ended> {
    let text = serde_json::to_string(message).expect("a client message always serializes");
    send_frame(ws, Message::text(text)).await
}

async fn send_frame(ws: &mut Socket, frame: Message) -> Result<(), Ended> {
    match tokio::time::timeout(SEND_TIMEOUT, ws.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
            Err(Ended::Retry("the connection ended".into()))
        }
        Ok(Err(e)) => Err(Ended::Retry(format!("sending failed: {e}"))),
        Err(_) => Err(Ended::Retry("the server is too slow to read".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Option<String> {
        device_id_from_hostname(s).map(|d| d.as_str().to_owned())
    }

    #[test]
    fn hostnames_become_valid_device_ids() {
        assert_eq!(id("rack-1").as_deref(), Some("rack-1"));
        assert_eq!(id("Web01.example.com").as_deref(), Some("web01"));
        assert_eq!(id("My Laptop (2)").as_deref(), Some("my-laptop-2"));
        assert_eq!(id("db_primary").as_deref(), Some("db_primary"));
        assert_eq!(id("--edge--").as_deref(), Some("edge"));
        assert_eq!(id("café-bar").as_deref(), Some("caf-bar"));
        assert_eq!(id(" .local").as_deref(), Some("local"));
        assert_eq!(id(&"x".repeat(100)).map(|s| s.len()), Some(64));
        // Cut at 64 right after a separator: no dash is left at the end.
        let long = format!("{}-b", "a".repeat(63));
        assert_eq!(id(&long), Some("a".repeat(63)));
        assert_eq!(id(""), None);
        assert_eq!(id("..."), None);
        assert_eq!(id("東京"), None);
    }

    #[test]
    fn backoff_doubles_within_bounds_and_caps() {
        for attempt in [0, 1, 2, 5, 6, 10, 40, u32::MAX] {
            let low = backoff(attempt, 0.0);
            let high = backoff(attempt, 1.0);
            let ceiling = FIRST_BACKOFF
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(MAX_BACKOFF);
            assert_eq!(high, ceiling, "attempt {attempt}");
            assert_eq!(low, ceiling / 2, "attempt {attempt}");
            let mid = backoff(attempt, 0.5);
            assert!(low <= mid && mid <= high);
            assert!(backoff(attempt, 7.0) <= MAX_BACKOFF);
        }
        assert_eq!(backoff(0, 1.0), FIRST_BACKOFF);
        assert_eq!(backoff(1, 1.0), FIRST_BACKOFF * 2);
        assert_eq!(backoff(100, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(100, 0.0), MAX_BACKOFF / 2);
    }

    fn reading() -> Reading {
        Reading {
            temperature: Some(48.26),
            load_1m: Some(0.4567),
            memory_used_pct: Some(41.234),
            cpu_pct: Some(12.34),
            uptime_s: Some(3600.4),
        }
    }

    fn t(s: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn warmer(by: f64) -> Reading {
        Reading {
            temperature: reading().temperature.map(|t| t + by),
            ..reading()
        }
    }

    /// The times of `kept`'s readings and whether each is still to be sent.
    fn pending(kept: &Kept) -> Vec<(chrono::DateTime<chrono::Utc>, bool)> {
        kept.readings
            .iter()
            .map(|k| (k.at, k.sent.is_none()))
            .collect()
    }

    #[test]
    fn readings_kept_while_away_are_told_in_order_each_at_its_time() {
        let mut kept = Kept::default();
        kept.keep(t(0), reading(), Some(true));
        kept.keep(t(5), reading(), Some(true));
        kept.keep(t(10), warmer(2.0), Some(true));
        let mut reported = Reported::default();
        let updates = kept.unsent(&mut reported, Some("Lab box"));
        // Everything at first; nothing for the unchanged one; then the change.
        let times: Vec<_> = updates.iter().map(|(_, u)| u.at).collect();
        assert_eq!(times, [Some(t(0)), Some(t(10))]);
        assert_eq!(updates[0].1.name.as_deref(), Some("Lab box"));
        assert_eq!(updates[1].1.temperature, Some(50.3));
        assert_eq!(updates[1].1.metrics, None);
        // Numbered in order; the one that told nothing is forgotten, the
        // others wait for their ack.
        assert!(updates[0].0 < updates[1].0);
        assert_eq!(pending(&kept), [(t(0), false), (t(10), false)]);
        assert!(kept.unsent(&mut reported, Some("Lab box")).is_empty());
        // What they told counts as told.
        assert_eq!(
            reported.update(Some("Lab box"), &warmer(2.0), Some(true)),
            None
        );

        // Bounded: the oldest go, and are counted.
        let mut full = Kept::default();
        for i in 0..MAX_KEPT + 3 {
            full.keep(t(i as i64), reading(), None);
        }
        assert_eq!((full.readings.len(), full.dropped), (MAX_KEPT, 3));
        assert_eq!(full.readings[0].at, t(3));
    }

    #[test]
    fn a_reading_is_kept_until_acked_and_sent_again_when_not_stored_or_lost() {
        let mut kept = Kept::default();
        let mut reported = Reported::default();
        let a = kept.sent(t(0), reading(), None);
        let b = kept.sent(t(5), warmer(1.0), None);
        let c = kept.sent(t(10), warmer(2.0), None);
        assert!(a < b && b < c);
        // The server could not store `b`: it goes again, at its time.
        kept.not_stored(b);
        assert_eq!(
            pending(&kept),
            [(t(0), false), (t(5), true), (t(10), false)]
        );
        let again = kept.unsent(&mut reported, None);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.at, Some(t(5)));
        let b = again[0].0;
        // An ack covers the readings before it; an unknown number nothing.
        kept.acked(a);
        assert_eq!(pending(&kept), [(t(5), false), (t(10), false)]);
        kept.acked(999);
        kept.acked(c);
        assert!(kept.readings.is_empty());

        // Refused for good (a field the server cannot take): forgotten.
        let d = kept.sent(t(15), reading(), None);
        kept.refused(b);
        kept.refused(d);
        assert!(kept.readings.is_empty());

        // A connection lost: all that was not acked goes on the next one.
        kept.sent(t(20), reading(), None);
        kept.keep(t(25), warmer(1.0), None);
        kept.send_again();
        let mut fresh = Reported::default();
        let times: Vec<_> = kept
            .unsent(&mut fresh, None)
            .into_iter()
            .map(|(_, u)| u.at)
            .collect();
        assert_eq!(times, [Some(t(20)), Some(t(25))]);
    }

    #[test]
    fn the_first_update_tells_everything_then_only_changes() {
        let mut reported = Reported::default();
        let first = reported
            .update(Some("Rack 1"), &reading(), Some(true))
            .unwrap();
        assert_eq!(first.validate(), Ok(()));
        let json = serde_json::to_value(&first).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "Rack 1",
                "temperature": 48.3,
                "power_on": true,
                "metrics": {"load_1m": 0.46, "memory_used_pct": 41.2, "cpu_pct": 12.3, "uptime_s": 3600.0},
            })
        );
        // The same reading, and noise below the rounding, is no change.
        assert_eq!(
            reported.update(Some("Rack 1"), &reading(), Some(true)),
            None
        );
        let noise = Reading {
            memory_used_pct: Some(41.2449),
            ..reading()
        };
        assert_eq!(reported.update(Some("Rack 1"), &noise, Some(true)), None);
        // A change sends just that field.
        let later = Reading {
            uptime_s: Some(3605.0),
            ..noise
        };
        let update = reported.update(Some("Rack 1"), &later, Some(true)).unwrap();
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"metrics": {"uptime_s": 3605.0}})
        );
        let update = reported
            .update(Some("Rack 1"), &later, Some(false))
            .unwrap();
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"power_on": false})
        );
    }

    #[test]
    fn absent_readings_are_left_out() {
        let mut reported = Reported::default();
        let bare = Reading {
            uptime_s: Some(10.0),
            cpu_pct: Some(f64::NAN),
            ..Reading::default()
        };
        let update = reported.update(None, &bare, None).unwrap();
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"metrics": {"uptime_s": 10.0}})
        );
        // A reading that goes missing later is not sent at all.
        assert_eq!(reported.update(None, &Reading::default(), None), None);
    }

    #[test]
    fn the_cpu_sensor_is_chosen_sensibly() {
        let intel = [
            ("acpitz temp1", Some(27.8)),
            ("coretemp Core 0", Some(51.0)),
            ("coretemp Package id 0", Some(49.0)),
            ("coretemp Core 1", Some(55.0)),
            ("nvme Composite", Some(38.0)),
        ];
        assert_eq!(cpu_temperature(intel), Some(49.0));
        let amd = [("amdgpu edge", Some(60.0)), ("k10temp Tctl", Some(45.5))];
        assert_eq!(cpu_temperature(amd), Some(45.5));
        let cores = [
            ("coretemp Core 0", Some(51.0)),
            ("coretemp Core 1", Some(55.0)),
        ];
        assert_eq!(cpu_temperature(cores), Some(55.0));
        let pi = [
            ("cpu_thermal temp1", Some(44.0)),
            ("rp1_adc temp1", Some(50.0)),
        ];
        assert_eq!(cpu_temperature(pi), Some(44.0));
        let other = [("acpitz temp1", Some(30.0)), ("acpitz temp2", Some(35.0))];
        assert_eq!(cpu_temperature(other), Some(35.0));
        // Unreadable and implausible sensors are never taken.
        let bogus = [
            ("coretemp Package id 0", None),
            ("coretemp Core 0", Some(-273.0)),
            ("acpitz temp1", Some(f32::NAN)),
            ("thing", Some(40.0)),
        ];
        assert_eq!(cpu_temperature(bogus), Some(40.0));
        assert_eq!(cpu_temperature([]), None);
    }

    #[test]
    fn refusals_stop_the_agent_and_the_rest_retry() {
        let d = DeviceId::parse("rack-1").unwrap();
        let fatal = |code| matches!(on_close(Some(code), "why", &d), Ended::Fatal(_));
        assert!(fatal(4401));
        assert!(fatal(4403));
        assert!(fatal(4409));
        assert!(fatal(1008));
        assert!(!fatal(1001));
        assert!(!fatal(1011));
        assert!(matches!(on_close(None, "", &d), Ended::Retry(_)));
        let Ended::Fatal(why) = on_close(Some(4401), "unknown token", &d) else {
            unreachable!()
        };
        assert!(why.contains("4401 unauthorized") && why.contains("unknown token"));
    }

    #[test]
    fn a_refused_certificate_is_named_as_a_tls_failure() {
        let url = "wss://dashboard.example/api/ws";
        let tls = |e: rustls::Error| {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            cannot_connect(url, &tungstenite::Error::Io(io))
        };
        let untrusted = tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(
            untrusted.starts_with(&format!(
                "cannot connect to {url}: TLS: invalid peer certificate"
            )) && untrusted.contains("SSL_CERT_FILE"),
            "{untrusted}"
        );
        let expired = tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
        assert!(
            expired.contains(": TLS: invalid peer certificate"),
            "{expired}"
        );
        assert!(!expired.contains("SSL_CERT_FILE"), "{expired}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let plain = cannot_connect(url, &tungstenite::Error::Io(refused));
        assert!(!plain.contains("TLS"), "{plain}");
    }

    #[test]
    fn plain_ws_needs_no_trust_store() {
        assert!(matches!(
            connector("ws://127.0.0.1:3000/api/ws"),
            Ok(Connector::Plain)
        ));
    }

    #[test]
    fn the_default_power_action_records_the_state() {
        let mut power = RecordedPower::default();
        assert_eq!(power.power_on(), Some(true));
        power.set_power(false).unwrap();
        assert_eq!(power.power_on(), Some(false));
    }

    #[test]
    fn this_machine_gives_real_readings() {
        let mut machine = Machine::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let reading = machine.read();
        let memory = reading
            .memory_used_pct
            .expect("memory use is readable here");
        assert!(memory > 0.0 && memory <= 100.0, "{reading:?}");
        assert!(reading.uptime_s.expect("uptime is readable here") > 0.0);
        if let Some(cpu) = reading.cpu_pct {
            assert!((0.0..=100.0).contains(&cpu), "{reading:?}");
        }
    }

    /// Sensors whose temperature rises by one degree at each reading.
    struct Rising(f64);

    impl Sensors for Rising {
        fn read(&mut self) -> Reading {
            self.0 += 1.0;
            Reading {
                temperature: Some(self.0),
                ..Reading::default()
            }
        }
    }

    type Peer = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

    /// Takes the agent's next connection and welcomes it.
    async fn welcome_agent(listener: &tokio::net::TcpListener) -> Peer {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let Some(Ok(Message::Text(hello))) = ws.next().await else {
            panic!("no hello");
        };
        let hello: ClientMessage = serde_json::from_str(hello.as_str()).unwrap();
        assert!(matches!(hello, ClientMessage::Hello { .. }), "{hello:?}");
        let welcome = ServerMessage::Welcome {
            v: VERSION,
            role: Role::Device,
            device: None,
        };
        answer(&mut ws, &welcome).await;
        ws
    }

    async fn answer(ws: &mut Peer, message: &ServerMessage) {
        let text = serde_json::to_string(message).unwrap();
        ws.send(Message::text(text)).await.unwrap();
    }

    /// The agent's next status: its request id and update.
    async fn next_status(ws: &mut Peer) -> (String, StatusUpdate) {
        let within = Duration::from_secs(10);
        loop {
            match tokio::time::timeout(within, ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if let Ok(ClientMessage::Status {
                        update, request_id, ..
                    }) = serde_json::from_str(text.as_str())
                    {
                        return (request_id.expect("a request id"), update);
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no status from the agent: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_reading_is_sent_again_until_the_server_acks_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut agent = Agent::new(
            format!("ws://{}", listener.local_addr().unwrap()),
            DeviceId::parse("probe").unwrap(),
            "token".into(),
            None,
            Duration::from_millis(50),
            Box::new(Rising(20.0)),
            Box::new(RecordedPower::default()),
        );
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let stop = stop.clone();
            async move { agent.run(&stop).await }
        });

        // The connection ends before the first reading is acked...
        let mut ws = welcome_agent(&listener).await;
        let (_, first) = next_status(&mut ws).await;
        assert_eq!(first.at, None, "a live reading takes the server's time");
        drop(ws);
        // ...so it comes first on the next one, at the time it was taken.
        let mut ws = welcome_agent(&listener).await;
        let (id, again) = next_status(&mut ws).await;
        assert_eq!(again.temperature, first.temperature);
        let at = again.at.expect("sent again at its time");
        // The server cannot store it: it comes again on a later tick.
        let not_stored = ServerMessage::Error {
            error: "not stored".into(),
            field: None,
            request_id: Some(id),
        };
        answer(&mut ws, &not_stored).await;
        let mut seen = Vec::new();
        let id = loop {
            let (id, update) = next_status(&mut ws).await;
            if update.at == Some(at) {
                assert_eq!(update.temperature, first.temperature);
                break id;
            }
            seen.push(id);
        };
        // Acked, it is forgotten, as are the others once acked: from now
        // on only new readings come, each once.
        for request_id in seen.into_iter().chain([id]) {
            answer(&mut ws, &ServerMessage::Ack { request_id }).await;
        }
        let mut ids = BTreeSet::new();
        for _ in 0..5 {
            let (id, update) = next_status(&mut ws).await;
            assert_eq!(update.at, None, "{update:?}");
            assert!(ids.insert(id));
        }
        stop.cancel();
        assert_eq!(run.await.unwrap(), Ok(()));
    }
}
