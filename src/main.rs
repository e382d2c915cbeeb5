//! `telltale`: start-up only. Options → tracing → server, or `telltale agent`.

use clap::Parser;
use telltale::server::{
    self,
    config::{Command, Config},
};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if let Some(Command::Agent(options)) = config.command {
        return telltale::agent::run(options).await;
    }
    raise_fd_limit();
    match server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("telltale stopped: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every SSE client holds a socket: allow as many as the system permits.
fn raise_fd_limit() {
    #[cfg(unix)]
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("could not raise the open-file limit: {e}");
    }
}
