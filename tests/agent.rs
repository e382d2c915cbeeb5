#![cfg(feature = "ssr")]
//! `telltale agent` against the real server: it reports this machine's real
//! hardware, obeys commands, goes offline when killed, stops on a refusal
//! and comes back after a server restart.

mod common;

use common::{AgentProcess, Server, within};
use serde_json::{Value, json};
use std::time::Duration;

/// Starts an agent for `device` with the server's ingest token.
fn agent(server: &Server, device: &str, token: &str) -> AgentProcess {
    AgentProcess::start(&[
        "--server",
        &server.ws_url(),
        "--device",
        device,
        "--token",
        token,
        "--interval",
        "200ms",
    ])
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

    let (status, answer) = server
        .post_command(
            "this-host",
            Some(&server.operator_token),
            &json!({"set": {"power_on": false}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"outcome": "applied"}));
    // The status went out before the result: it is already there.
    let device = server.device("this-host").await.unwrap();
    assert_eq!(device["status"]["power_on"], false, "{device}");

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
    let code = agent.exit_code().await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    let output = agent.output();
    assert!(
        output.contains("4401 unauthorized"),
        "the output names the refusal:\n{output}"
    );
    assert_eq!(server.device("refused").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_token_for_another_id_is_forbidden() {
    let server = Server::start_with(&["--device-token", "other=dev-secret"]).await;
    let mut agent = agent(&server, "mine", "dev-secret");
    let code = agent.exit_code().await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    let output = agent.output();
    assert!(output.contains("4403 forbidden"), "{output}");
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
    let code = first.exit_code().await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    assert!(
        first.output().contains("4409 replaced"),
        "{}",
        first.output()
    );
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
