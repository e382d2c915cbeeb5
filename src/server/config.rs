//! Command-line options, each with an environment variable.

use crate::model::DeviceId;
use clap::Parser;
use clap::builder::BoolishValueParser;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug, Parser)]
#[command(name = "telltale", version, about = "A live hardware-status dashboard")]
pub struct Config {
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

    /// Token for the WebSocket `viewer` role. When none is given, reading is
    /// open to anyone, as the page and the SSE stream are.
    #[arg(long, env = "TELLTALE_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,

    /// `ID=TOKEN`: a token for the WebSocket `device` role of one device id
    /// (repeatable; the env var takes a comma-separated list). The ingest
    /// token is accepted for any id too.
    #[arg(long = "device-token", env = "TELLTALE_DEVICE_TOKENS", hide_env_values = true,
          value_delimiter = ',', value_parser = parse_device_token)]
    pub device_tokens: Vec<(DeviceId, String)>,

    /// Mark the operator session cookie `Secure`, so browsers only send it
    /// over https. Set it when the page is served over https (e.g. behind a
    /// TLS-terminating proxy); leave it off for plain http such as
    /// 127.0.0.1, where browsers would drop a `Secure` cookie.
    #[arg(long, env = "TELLTALE_SECURE_COOKIE", default_value = "off",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub secure_cookie: bool,

    /// How long a command waits for its device's answer, e.g. `5s`.
    #[arg(long, env = "TELLTALE_COMMAND_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    /// Silence (not even a pong) after which a WebSocket peer is considered
    /// gone and disconnected; its device, if any, goes offline.
    #[arg(long, env = "TELLTALE_AGENT_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub agent_timeout: Duration,

    /// How often the server pings each WebSocket connection.
    #[arg(long, env = "TELLTALE_WS_PING", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ws_ping: Duration,

    /// Run the built-in simulator (on/off).
    #[arg(long, env = "TELLTALE_SIMULATOR", default_value = "on",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub simulator: bool,

    /// Turn the built-in simulator off (same as `--simulator off`).
    #[arg(long)]
    pub no_simulator: bool,

    /// How often the simulator's devices report, e.g. `2s`, `500ms`.
    #[arg(long, env = "TELLTALE_SIMULATOR_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub simulator_interval: Duration,

    /// Interval of the SSE heartbeat comment that keeps proxies from closing idle streams.
    #[arg(long, env = "TELLTALE_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// Events kept in memory for `Last-Event-ID` replay.
    #[arg(long, env = "TELLTALE_REPLAY_CAPACITY", default_value_t = 4096)]
    pub replay_capacity: usize,

    /// Events a client may fall behind before it is resynchronised with a snapshot.
    #[arg(long, env = "TELLTALE_CLIENT_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub client_queue: u32,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
