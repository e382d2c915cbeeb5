//! Command-line options, each with an environment variable.

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
}
