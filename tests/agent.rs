#![cfg(feature = "ssr")]
//! `telltale agent` against the real server: it reports this machine's real
//! hardware, obeys commands, goes offline when killed, stops on a refusal
//! and comes back after a server restart; over `wss://` through nginx
//! terminating TLS, it reports only when it trusts the certificate.

mod common;

use common::{AgentProcess, Nginx, SelfSigned, Server, eventually, within};
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::time::Duration;

/// Starts an agent for `device` with `token`, straight to the server.
fn agent(server: &Server, device: &str, token: &str) -> AgentProcess {
    agent_to(&server.ws_url(), device, token, &[])
}

/// Starts an agent for `device` reporting to `url`, with `env` set.
fn agent_to(url: &str, device: &str, token: &str, env: &[(&str, &OsStr)]) -> AgentProcess {
    let args = [
        "--server",
        url,
        "--device",
        device,
        "--token",
        token,
        "--interval",
        "200ms",
    ];
    AgentProcess::start_with_env(&args, env)
}

/// Polls `GET /api/devices/{id}` until `check` holds; returns the device.
async fn device_where(
    server: &Server,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    within(what, async {
        loop {
            if let Some(d) = server.device(id).await
                && check(&d)
            {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Waits for `agent` to exit on its own; asserts it failed, saying `why`.
async fn fails_saying(agent: &mut AgentProcess, why: &str) {
    let code = agent.exit_code().await;
    let output = agent.output();
    assert!(
        code.is_some_and(|c| c != 0),
        "exit code {code:?}:\n{output}"
    );
    assert!(output.contains(why), "the output says {why:?}:\n{output}");
}

/// Sends the agent of `device` a power-off command, which it applies.
async fn switches_off(server: &Server, device: &str) {
    let (status, answer) = server
        .post_command(
            device,
            Some(&server.operator_token),
            &json!({"set": {"power_on": false}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"outcome": "applied"}));
    // The status went out before the result: it is already there.
    let device = server.device(device).await.unwrap();
    assert_eq!(device["status"]["power_on"], false, "{device}");
}

/// Real readings of this machine: memory in use and an uptime.
fn has_real_reading(device: &Value) -> bool {
    let metrics = &device["status"]["metrics"];
    let memory = metrics["memory_used_pct"].as_f64();
    let uptime = metrics["uptime_s"].as_f64();
    memory.is_some_and(|m| m > 0.0 && m <= 100.0) && uptime.is_some_and(|u| u > 0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_this_machine_obeys_commands_and_goes_offline_when_killed() {
    let server = Server::start().await;
    let mut agent = agent(&server, "this-host", &server.token);
    let device = device_where(&server, "this-host", "a real reading", |d| {
        d["online"] == true && has_real_reading(d)
    })
    .await;
    eprintln!("GET /api/devices/this-host: {device:#}");
    assert_eq!(device["status"]["power_on"], true);
    if let Some(t) = device["status"]["temperature"].as_f64() {
        assert!((-40.0..=150.0).contains(&t), "a CPU temperature of {t} °C");
    }
    if let Some(load) = device["status"]["metrics"]["load_1m"].as_f64() {
        assert!(load >= 0.0);
    }
    // CPU use needs two samples; it comes with a later report.
    let device = device_where(&server, "this-host", "a CPU use reading", |d| {
        d["status"]["metrics"]["cpu_pct"].as_f64().is_some()
    })
    .await;
    let cpu = device["status"]["metrics"]["cpu_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "CPU use {cpu} %");

    switches_off(&server, "this-host").await;

    agent.kill().await;
    device_where(&server, "this-host", "the device offline", |d| {
        d["online"] == false
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_stops_the_agent_with_the_refusal() {
    let server = Server::start().await;
    let mut agent = agent(&server, "refused", "not-a-token");
    fails_saying(&mut agent, "4401 unauthorized").await;
    assert_eq!(server.device("refused").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_token_for_another_id_is_forbidden() {
    let server = Server::start_with(&["--device-token", "other=dev-secret"]).await;
    let mut agent = agent(&server, "mine", "dev-secret");
    fails_saying(&mut agent, "4403 forbidden").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_agent_replaces_the_older_which_exits() {
    let server = Server::start().await;
    let mut first = agent(&server, "twin", &server.token);
    device_where(
        &server,
        "twin",
        "the first agent's report",
        has_real_reading,
    )
    .await;
    let _second = agent(&server, "twin", &server.token);
    fails_saying(&mut first, "4409 replaced").await;
    assert_eq!(server.device("twin").await.unwrap()["online"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_the_server_restarts() {
    let mut server = Server::start().await;
    let mut agent = agent(&server, "survivor", &server.token);
    device_where(&server, "survivor", "the first report", has_real_reading).await;
    server.restart().await;
    // The new server knows nothing until the agent is back and tells all.
    let device = device_where(&server, "survivor", "the report after the restart", |d| {
        d["online"] == true && has_real_reading(d) && d["status"]["power_on"] == true
    })
    .await;
    assert_eq!(device["id"], "survivor");
    // Asked to stop, it says goodbye and exits cleanly; the device is offline.
    assert_eq!(agent.terminate().await, Some(0), "{}", agent.output());
    device_where(&server, "survivor", "the device offline", |d| {
        d["online"] == false
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_taken_while_the_server_was_away_reach_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&["--data-dir", dir.path().to_str().unwrap()]).await;
    let _agent = agent(&server, "keeper", &server.token);
    device_where(&server, "keeper", "the first report", has_real_reading).await;
    let away = chrono::Utc::now();
    server.restart_after(Duration::from_millis(2_500)).await;
    // Uptime moves every second: the agent kept a reading of it while the
    // server was down, and its point is where it was taken.
    let (from, to) = (
        away.timestamp_millis() + 500,
        away.timestamp_millis() + 2_300,
    );
    let query = format!(
        "/api/devices/keeper/history?metric=uptime_s&from={}",
        away.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    eventually("a point of the outage in the history", || async {
        let (_, history) = server.get_json(&query).await;
        history["points"].as_array().is_some_and(|points| {
            points
                .iter()
                .any(|p| p["t"].as_i64().is_some_and(|t| (from..to).contains(&t)))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_over_wss_through_nginx_terminating_tls() {
    let server = Server::start().await;
    let certificate = SelfSigned::new();
    let nginx = Nginx::start_tls(&[server.addr], &certificate).await;
    let url = nginx.ws_url();
    assert!(url.starts_with("wss://localhost:"), "{url}");
    let trust = [("SSL_CERT_FILE", certificate.cert.as_os_str())];
    let mut agent = agent_to(&url, "over-tls", &server.token, &trust);
    let device = device_where(&server, "over-tls", "a real reading over wss", |d| {
        d["online"] == true && has_real_reading(d)
    })
    .await;
    assert_eq!(device["status"]["power_on"], true, "{device}");
    let output = agent.output();
    assert!(
        output.contains(&format!("connected to {url}")),
        "the agent says where it is connected:\n{output}"
    );
    // Commands come back through the proxy too.
    switches_off(&server, "over-tls").await;
    assert_eq!(agent.terminate().await, Some(0), "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_logged_and_retried_and_nothing_is_reported() {
    let server = Server::start().await;
    let certificate = SelfSigned::new();
    let nginx = Nginx::start_tls(&[server.addr], &certificate).await;
    // The agent trusts another certificate, not the one nginx shows.
    let other = SelfSigned::new();
    let trust = [("SSL_CERT_FILE", other.cert.as_os_str())];
    let mut agent = agent_to(&nginx.ws_url(), "untrusted", &server.token, &trust);
    // Two refusals: the first is retried with the usual backoff.
    eventually("the agent to be refused twice", || async {
        agent.output().matches("invalid peer certificate").count() >= 2
    })
    .await;
    let output = agent.output();
    let refusal = output
        .lines()
        .find(|l| l.contains("invalid peer certificate"))
        .unwrap();
    assert!(
        refusal.contains("UnknownIssuer")
            && refusal.contains("SSL_CERT_FILE")
            && refusal.contains("reconnecting in"),
        "one clear line says why and that it retries:\n{output}"
    );
    assert_eq!(server.device("untrusted").await, None);
    assert_eq!(agent.terminate().await, Some(0), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_url_that_is_not_ws_or_wss_is_refused_at_start() {
    for url in ["http://127.0.0.1:3000/api/ws", "garbage"] {
        let mut agent = AgentProcess::start(&["--server", url, "--token", "t"]);
        fails_saying(
            &mut agent,
            "expected ws://HOST:PORT/api/ws, or wss://HOST/api/ws",
        )
        .await;
    }
}
