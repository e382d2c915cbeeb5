//! Command-line options, each with an environment variable: the server's
//! ([`Config`], `telltale` with no subcommand) and the device agent's
//! ([`AgentOptions`], `telltale agent`).

use crate::model::{DeviceId, MAX_NAME_CHARS};
use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "telltale",
    version,
    about = "A live hardware-status dashboard",
    long_about = "A live hardware-status dashboard. With no subcommand, runs the server; \
                  `telltale agent` reports this machine's hardware to a server.",
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    /// `agent`, or none to run the server.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "TELLTALE_ADDR", default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,

    /// Bearer token that `POST /api/devices/{id}/status` requires.
    /// When none is given, a random one is made at start and printed once.
    #[arg(long, env = "TELLTALE_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,

    /// Bearer token for commands (`POST /api/devices/{id}/commands`, the
    /// WebSocket `operator` role). When none is given, a random one is made
    /// at start and printed once.
    #[arg(long, env = "TELLTALE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,

    /// Closes reading: the page (behind a sign-in page), the SSE stream,
    /// the API's reads, /metrics and the WebSocket `viewer` role take this
    /// token (or the operator token). When none is given, reading is open
    /// to anyone.
    #[arg(long, env = "TELLTALE_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,

    /// `ID=TOKEN`: a token for the WebSocket `device` role of one device id
    /// (repeatable; the env var takes a comma-separated list). The ingest
    /// token is accepted for any id too.
    #[arg(long = "device-token", env = "TELLTALE_DEVICE_TOKENS", hide_env_values = true,
          value_delimiter = ',', value_parser = parse_device_token)]
    pub device_tokens: Vec<(DeviceId, String)>,

    /// POST every recorded change (power, link, staleness, alerts, name) to
    /// this http(s) URL as JSON, in order, retried until it answers 2xx
    /// (repeatable; the env var takes a comma-separated list). In a cluster
    /// on one PostgreSQL, the instances given it take turns; with a store
    /// per instance, give it to one.
    /// Logs show a URL's origin only (a chat webhook's secret is in its path).
    #[arg(
        long = "webhook",
        env = "TELLTALE_WEBHOOKS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub webhooks: Vec<String>,

    /// Take devices' reports, links and command answers from this MQTT
    /// broker, and send them their commands (topics under --mqtt-topic; see
    /// README.md), e.g. `mqtt://user:secret@broker.lan:1883` or `mqtts://`
    /// for TLS (verified as for PostgreSQL); `?client_id=` names the
    /// broker session (default `telltale`). In a cluster, the instances
    /// given it take turns (one at a time, by a lease in Redis).
    #[arg(
        long,
        env = "TELLTALE_MQTT",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub mqtt: Option<String>,

    /// The topic prefix of --mqtt: devices publish on PREFIX/ID/status,
    /// PREFIX/ID/online and PREFIX/ID/result, and get PREFIX/ID/set and
    /// PREFIX/ID/error.
    #[arg(
        long,
        env = "TELLTALE_MQTT_TOPIC",
        default_value = "telltale",
        value_name = "PREFIX"
    )]
    pub mqtt_topic: String,

    /// Mark the operator session cookie `Secure`, so browsers only send it
    /// over https. Set it when the page is served over https (e.g. behind a
    /// TLS-terminating proxy); leave it off for plain http such as
    /// 127.0.0.1, where browsers would drop a `Secure` cookie.
    #[arg(long, env = "TELLTALE_SECURE_COOKIE", default_value = "off",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub secure_cookie: bool,

    /// How long a command waits for its device's answer, e.g. `5s`.
    #[arg(long, env = "TELLTALE_COMMAND_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub command_timeout: Duration,

    /// Silence (not even a pong) after which a WebSocket peer is considered
    /// gone and disconnected; its device, if any, goes offline.
    #[arg(long, env = "TELLTALE_AGENT_TIMEOUT", default_value = "15s", value_parser = parse_positive_duration)]
    pub agent_timeout: Duration,

    /// How often the server pings each WebSocket connection.
    #[arg(long, env = "TELLTALE_WS_PING", default_value = "5s", value_parser = parse_positive_duration)]
    pub ws_ping: Duration,

    /// Run the built-in simulator (on/off).
    #[arg(long, env = "TELLTALE_SIMULATOR", default_value = "on",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub simulator: bool,

    /// Turn the built-in simulator off (same as `--simulator off`).
    #[arg(long)]
    pub no_simulator: bool,

    /// How often the simulator's devices report, e.g. `2s`, `500ms`.
    #[arg(long, env = "TELLTALE_SIMULATOR_INTERVAL", default_value = "2s", value_parser = parse_positive_duration)]
    pub simulator_interval: Duration,

    /// A TOML file of alert limits (`[defaults]`, `[devices.ID]`, each
    /// `metric = { min = …, max = … }`) and `stale_after` deadlines, read at
    /// start. Limits set over the API win over the file's for their device.
    #[arg(long, env = "TELLTALE_THRESHOLDS")]
    pub thresholds: Option<PathBuf>,

    /// Silence after which any device is marked stale, e.g. `30s`, instead
    /// of three of its learned report intervals. A `stale_after` in the
    /// thresholds file wins.
    #[arg(long, env = "TELLTALE_STALE_AFTER", value_parser = parse_positive_duration)]
    pub stale_after: Option<Duration>,

    /// The shortest report interval staleness learns; a device is stale
    /// after three intervals. Lowered by tests.
    #[arg(long, env = "TELLTALE_STALE_FLOOR", default_value = "1s", hide = true,
          value_parser = parse_positive_duration)]
    pub stale_floor: Duration,

    /// Interval of the SSE heartbeat comment that keeps proxies from closing idle streams.
    #[arg(long, env = "TELLTALE_HEARTBEAT", default_value = "15s", value_parser = parse_positive_duration)]
    pub heartbeat: Duration,

    /// Where the store (an SQLite database) keeps devices, every status event
    /// and the readings history; created if missing.
    #[arg(long, env = "TELLTALE_DATA_DIR", default_value = "telltale-data")]
    pub data_dir: PathBuf,

    /// Keep nothing across restarts, as for tests and demos: the store lives
    /// in a temporary directory removed on exit (history and resume work
    /// within the run), and `--data-dir` is not used.
    #[arg(long, env = "TELLTALE_MEMORY", default_value = "off",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "on")]
    pub memory: bool,

    /// Keep the store in PostgreSQL instead of SQLite, e.g.
    /// `postgres://telltale:secret@db.example:5432/telltale`: devices, the
    /// event log, the readings history, limits set over the API and learned
    /// report intervals. Its tables are created (or migrated) at start.
    /// With it, `--data-dir` and `--memory` are not used; with
    /// `--redis-url`, every instance shares it. `?sslmode=require`: TLS,
    /// verified against this machine's trusted certificates (or
    /// `SSL_CERT_FILE`).
    #[arg(long, env = "TELLTALE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Cluster mode: share one event stream and device state with every
    /// instance on this Redis, e.g. `redis://127.0.0.1:6379/0` (or
    /// `rediss://` for TLS, verified as for PostgreSQL). Run Redis with
    /// `appendonly yes` so a Redis restart keeps the stream.
    #[arg(long, env = "TELLTALE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// How long raw readings and events are kept, e.g. `48h`; older readings
    /// are folded into per-minute min/avg/max (at least `1m`).
    #[arg(long, env = "TELLTALE_RETENTION", default_value = "48h", value_parser = parse_retention)]
    pub retention: Duration,

    /// How long the per-minute readings are kept, e.g. `30d`.
    #[arg(long, env = "TELLTALE_DOWNSAMPLED_RETENTION", default_value = "30d",
          value_parser = parse_retention)]
    pub downsampled_retention: Duration,

    /// How often retention runs (in the background, in small batches).
    #[arg(long, env = "TELLTALE_RETENTION_INTERVAL", default_value = "5m", hide = true,
          value_parser = parse_positive_duration)]
    pub retention_interval: Duration,

    /// Events kept in memory for `Last-Event-ID` replay (older ones are
    /// replayed from the store).
    #[arg(long, env = "TELLTALE_REPLAY_CAPACITY", default_value_t = 4096)]
    pub replay_capacity: usize,

    /// Events a client may fall behind before it is resynchronised with a snapshot.
    #[arg(long, env = "TELLTALE_CLIENT_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub client_queue: u32,
}

/// What `telltale` runs besides the server.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Report this machine's hardware (CPU temperature, load, memory, CPU
    /// use, uptime) to a Telltale server as one device, and obey its power
    /// commands.
    Agent(AgentOptions),
}

/// The options of `telltale agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentOptions {
    /// The server's WebSocket endpoint: `ws://HOST:PORT/api/ws`, or
    /// `wss://HOST/api/ws` behind a TLS proxy (its certificate checked
    /// against this machine's trust store, or `SSL_CERT_FILE`).
    #[arg(long, env = "TELLTALE_SERVER", default_value = "ws://127.0.0.1:3000/api/ws",
          value_parser = parse_ws_url)]
    pub server: String,

    /// The device id to report as (1-64 of a-z 0-9 - _). Defaults to this
    /// machine's hostname, lowercased, up to its first dot, other characters
    /// made `-`.
    #[arg(long, env = "TELLTALE_DEVICE", value_parser = parse_device_id)]
    pub device: Option<DeviceId>,

    /// A token for the `device` role: the server's `--device-token` for this
    /// id, or its ingest token.
    #[arg(long, env = "TELLTALE_DEVICE_TOKEN", hide_env_values = true)]
    pub token: String,

    /// How often to read the hardware and report what changed, e.g. `5s`.
    #[arg(long, env = "TELLTALE_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub interval: Duration,

    /// The device's display name. Defaults to the hostname.
    #[arg(long, env = "TELLTALE_NAME", value_parser = parse_name)]
    pub name: Option<String>,
}

/// A `ws://` or `wss://` URL with a host; anything else is refused at start.
fn parse_ws_url(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected ws://HOST:PORT/api/ws, or wss://HOST/api/ws behind TLS";
    let s = s.trim();
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        s.parse().map_err(|e| format!("{EXPECTED} ({e})"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("ws" | "wss"), Some(host)) if !host.is_empty() => Ok(s.to_owned()),
        _ => Err(EXPECTED.into()),
    }
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// Readings are folded by the minute: a shorter retention means nothing.
fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(60) {
        return Err("a retention is at least 1m".into());
    }
    Ok(d)
}

fn parse_device_id(s: &str) -> Result<DeviceId, String> {
    DeviceId::parse(s).map_err(str::to_owned)
}

/// Readings more often than this measure nothing but the agent itself.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn parse_interval(s: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if interval < MIN_INTERVAL {
        return Err(format!("the interval is at least {MIN_INTERVAL:?}"));
    }
    Ok(interval)
}

/// The rule of `StatusUpdate::validate` for `name`, checked at start.
pub fn parse_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "a name is 1 to {MAX_NAME_CHARS} characters, not blank"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("a name has no control characters".into());
    }
    Ok(name.to_owned())
}

fn parse_device_token(s: &str) -> Result<(DeviceId, String), String> {
    let (id, token) = s
        .split_once('=')
        .ok_or_else(|| "expected ID=TOKEN".to_owned())?;
    let id = DeviceId::parse(id.trim()).map_err(str::to_owned)?;
    let token = token.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    Ok((id, token.to_owned()))
}

impl Config {
    pub fn simulator_enabled(&self) -> bool {
        self.simulator && !self.no_simulator
    }

    /// Every environment variable the binary reads (server and `agent`),
    /// taken from the options themselves, so tests and benches can clear
    /// them all without keeping a list of their own.
    pub fn env_vars() -> Vec<String> {
        fn collect(command: &clap::Command, vars: &mut Vec<String>) {
            vars.extend(
                command
                    .get_arguments()
                    .filter_map(|arg| arg.get_env())
                    .map(|env| env.to_string_lossy().into_owned()),
            );
            for sub in command.get_subcommands() {
                collect(sub, vars);
            }
        }
        let mut vars = vec!["LEPTOS_RELOAD_PORT".to_owned()];
        collect(&<Self as clap::CommandFactory>::command(), &mut vars);
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_cover_server_and_agent_options() {
        let vars = Config::env_vars();
        for var in [
            "TELLTALE_ADDR",
            "TELLTALE_DATA_DIR",
            "TELLTALE_DEVICE_TOKEN",
        ] {
            assert!(vars.iter().any(|v| v == var), "{var} missing from {vars:?}");
        }
    }

    #[test]
    fn defaults_and_flags() {
        let c = Config::try_parse_from(["telltale"]).unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:3000");
        assert!(c.simulator_enabled());
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        let c =
            Config::try_parse_from(["telltale", "--no-simulator", "--heartbeat", "500ms"]).unwrap();
        assert!(!c.simulator_enabled());
        assert_eq!(c.heartbeat, Duration::from_millis(500));
        let c = Config::try_parse_from(["telltale", "--simulator", "off"]).unwrap();
        assert!(!c.simulator_enabled());
        assert!(Config::try_parse_from(["telltale", "--addr", "nonsense"]).is_err());
        assert!(Config::try_parse_from(["telltale", "--client-queue", "0"]).is_err());
        assert_eq!(c.data_dir, PathBuf::from("telltale-data"));
        assert!(!c.memory);
        let c = Config::try_parse_from(["telltale", "--memory", "--data-dir", "/tmp/x"]).unwrap();
        assert!(c.memory);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let c = Config::try_parse_from(["telltale", "--memory", "off"]).unwrap();
        assert!(!c.memory);
        assert_eq!(c.database_url, None);
        let c = Config::try_parse_from(["telltale", "--database-url", "postgres://h/db"]).unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://h/db"));
    }

    #[test]
    fn alert_options() {
        let c = Config::try_parse_from(["telltale"]).unwrap();
        assert_eq!(c.thresholds, None);
        assert_eq!(c.stale_after, None);
        assert_eq!(c.stale_floor, Duration::from_secs(1));
        let c = Config::try_parse_from([
            "telltale",
            "--thresholds",
            "limits.toml",
            "--stale-after",
            "30s",
            "--stale-floor",
            "50ms",
        ])
        .unwrap();
        assert_eq!(c.thresholds, Some(PathBuf::from("limits.toml")));
        assert_eq!(c.stale_after, Some(Duration::from_secs(30)));
        assert_eq!(c.stale_floor, Duration::from_millis(50));
        assert!(Config::try_parse_from(["telltale", "--stale-after", "0s"]).is_err());
        assert!(Config::try_parse_from(["telltale", "--stale-floor", "0s"]).is_err());
        let vars = Config::env_vars();
        for var in [
            "TELLTALE_THRESHOLDS",
            "TELLTALE_STALE_AFTER",
            "TELLTALE_STALE_FLOOR",
        ] {
            assert!(vars.iter().any(|v| v == var), "{var} missing from {vars:?}");
        }
    }

    #[test]
    fn retention_options() {
        let c = Config::try_parse_from(["telltale"]).unwrap();
        assert_eq!(c.retention, Duration::from_secs(48 * 3600));
        assert_eq!(c.downsampled_retention, Duration::from_secs(30 * 86400));
        assert_eq!(c.retention_interval, Duration::from_secs(300));
        let c = Config::try_parse_from([
            "telltale",
            "--retention",
            "2h",
            "--downsampled-retention",
            "7d",
            "--retention-interval",
            "10s",
        ])
        .unwrap();
        assert_eq!(c.retention, Duration::from_secs(7200));
        assert_eq!(c.downsampled_retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.retention_interval, Duration::from_secs(10));
        assert!(Config::try_parse_from(["telltale", "--retention", "30s"]).is_err());
        assert!(Config::try_parse_from(["telltale", "--retention", "soon"]).is_err());
    }

    #[test]
    fn periods_and_deadlines_are_longer_than_zero() {
        // Each would panic a timer (or drop every connection) at zero.
        for option in [
            "--command-timeout",
            "--agent-timeout",
            "--ws-ping",
            "--simulator-interval",
            "--heartbeat",
            "--retention-interval",
            "--stale-after",
        ] {
            let error = Config::try_parse_from(["telltale", option, "0s"]).unwrap_err();
            assert!(
                error.to_string().contains("longer than zero"),
                "{option}: {error}"
            );
            assert!(
                Config::try_parse_from(["telltale", option, "1s"]).is_ok(),
                "{option}"
            );
        }
    }

    #[test]
    fn command_options() {
        let c = Config::try_parse_from(["telltale"]).unwrap();
        assert_eq!(c.command_timeout, Duration::from_secs(5));
        assert_eq!(c.operator_token, None);
        assert!(c.device_tokens.is_empty());
        assert!(!c.secure_cookie);
        let c = Config::try_parse_from(["telltale", "--secure-cookie", "on"]).unwrap();
        assert!(c.secure_cookie);
        let c = Config::try_parse_from([
            "telltale",
            "--device-token",
            "rack-1=s3cret",
            "--device-token",
            "b=t=2",
            "--command-timeout",
            "200ms",
        ])
        .unwrap();
        assert_eq!(c.device_tokens[0].0.as_str(), "rack-1");
        assert_eq!(c.device_tokens[0].1, "s3cret");
        assert_eq!(c.device_tokens[1].1, "t=2");
        assert_eq!(c.command_timeout, Duration::from_millis(200));
        assert!(Config::try_parse_from(["telltale", "--device-token", "Bad=x"]).is_err());
        assert!(Config::try_parse_from(["telltale", "--device-token", "a="]).is_err());
        assert!(Config::try_parse_from(["telltale", "--device-token", "a"]).is_err());
    }

    #[test]
    fn webhook_options() {
        assert!(
            Config::try_parse_from(["telltale"])
                .unwrap()
                .webhooks
                .is_empty()
        );
        let c = Config::try_parse_from([
            "telltale",
            "--webhook",
            "https://a.example/x,http://b.example/",
            "--webhook",
            "http://c.example/",
        ])
        .unwrap();
        assert_eq!(
            c.webhooks,
            [
                "https://a.example/x",
                "http://b.example/",
                "http://c.example/"
            ]
        );
    }

    fn agent(args: &[&str]) -> Result<AgentOptions, clap::Error> {
        let c = Config::try_parse_from(["telltale", "agent"].iter().chain(args))?;
        match c.command {
            Some(Command::Agent(options)) => Ok(options),
            None => panic!("`telltale agent` parsed as the server"),
        }
    }

    #[test]
    fn no_subcommand_is_the_server_and_agent_is_the_agent() {
        assert!(
            Config::try_parse_from(["telltale"])
                .unwrap()
                .command
                .is_none()
        );
        let a = agent(&["--token", "t"]).unwrap();
        assert_eq!(a.server, "ws://127.0.0.1:3000/api/ws");
        assert_eq!(a.device, None);
        assert_eq!(a.interval, Duration::from_secs(5));
        assert_eq!(a.name, None);
        let a = agent(&[
            "--token",
            "t",
            "--server",
            "ws://10.0.0.2:80/api/ws",
            "--device",
            "rack-1",
            "--interval",
            "200ms",
            "--name",
            " Rack 1 ",
        ])
        .unwrap();
        assert_eq!(a.server, "ws://10.0.0.2:80/api/ws");
        assert_eq!(a.device.unwrap().as_str(), "rack-1");
        assert_eq!(a.interval, Duration::from_millis(200));
        assert_eq!(a.name.as_deref(), Some("Rack 1"));
    }

    #[test]
    fn agent_options_are_checked() {
        assert!(agent(&[]).is_err(), "a token is required");
        assert!(agent(&["--token", "t", "--device", "Not OK"]).is_err());
        assert!(agent(&["--token", "t", "--server", "http://x/api/ws"]).is_err());
        assert!(agent(&["--token", "t", "--server", "x:80/api/ws"]).is_err());
        assert!(agent(&["--token", "t", "--server", "ws:///api/ws"]).is_err());
        assert!(agent(&["--token", "t", "--server", "ws://a b/api/ws"]).is_err());
        let wss = "wss://dashboard.example/api/ws";
        assert_eq!(
            agent(&["--token", "t", "--server", wss]).unwrap().server,
            wss
        );
        assert!(agent(&["--token", "t", "--interval", "1ms"]).is_err());
        assert!(agent(&["--token", "t", "--name", "  "]).is_err());
        // Server options belong before no subcommand at all.
        assert!(Config::try_parse_from(["telltale", "--addr", "127.0.0.1:1", "agent"]).is_err());
    }
}
