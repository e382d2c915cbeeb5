#![cfg(feature = "ssr")]
//! `GET /api/ws`: viewers, operators and device agents against the real server.

mod common;

use common::{Server, SseStream, answer_next_command, command, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// Reads SSE status events until one for `device` satisfies `check`.
async fn sse_status_where(sse: &mut SseStream, device: &str, check: impl Fn(&Value) -> bool) {
    loop {
        let record = sse.expect_status().await;
        let data = record.json();
        if data["device"] == device && check(&data) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_sees_the_same_snapshot_and_events_as_sse() {
    let server = Server::start().await;
    server.post_status("a", &json!({"temperature": 1.5})).await;
    let mut sse = server.sse("").await;
    let sse_snapshot = sse.expect_start().await;
    let mut viewer = server.viewer().await;
    viewer.send(&json!({"type": "subscribe"})).await;
    let snapshot = viewer.expect("snapshot").await;
    assert_eq!(snapshot["id"], sse_snapshot.id);
    assert_eq!(snapshot["data"], sse_snapshot.data);

    let posted = server.post_status("a", &json!({"temperature": 2.5})).await;
    let status = viewer.expect("status").await;
    let record = sse.expect_status().await;
    assert_eq!(status["id"], posted.id);
    assert_eq!(record.id(), posted.id);
    assert_eq!(status["data"], record.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_last_event_id_replays_exactly_the_missed_events() {
    let server = Server::start().await;
    let seen = server
        .post_status("a", &json!({"temperature": 0.5}))
        .await
        .id;
    let mut missed = Vec::new();
    for i in 1..=3 {
        let t = f64::from(i) + 0.5;
        missed.push(server.post_status("a", &json!({"temperature": t})).await.id);
    }
    let mut viewer = server.viewer().await;
    viewer
        .send(&json!({"type": "subscribe", "last_event_id": seen}))
        .await;
    for id in &missed {
        assert_eq!(viewer.expect("status").await["id"], *id);
    }
    // Nothing else was queued: the next message is a change made now.
    let live = server.post_status("b", &json!({"power_on": true})).await;
    let status = viewer.expect("status").await;
    assert_eq!(status["id"], live.id);
    assert_eq!(status["data"]["device"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_acked_routed_applied_and_seen_on_sse() {
    let server = Server::start().await;
    let mut agent = server.agent("lamp").await;
    agent
        .send(&json!({"type": "status", "device": "lamp", "update": {"power_on": true}}))
        .await;
    eventually("the agent's first report", || async {
        server
            .device("lamp")
            .await
            .is_some_and(|d| d["status"]["power_on"] == true)
    })
    .await;
    let mut sse = server.sse("?device=lamp").await;
    let start = sse.expect_start().await;
    assert_eq!(start.device("lamp").unwrap()["online"], true);

    let mut operator = server.operator().await;
    operator.send(&command("lamp", false, "r-1")).await;
    assert_eq!(operator.expect("ack").await["request_id"], "r-1");
    let routed = answer_next_command(&mut agent, "lamp", true).await;
    assert_eq!(routed["set"], json!({"power_on": false}));
    let result = operator.expect("result").await;
    assert_eq!(result["request_id"], "r-1");
    assert_eq!(result["outcome"], "applied");
    sse_status_where(&mut sse, "lamp", |d| d["status"]["power_on"] == false).await;

    // A refusal by the device is a failed result with its reason.
    operator.send(&command("lamp", true, "r-2")).await;
    operator.expect("ack").await;
    answer_next_command(&mut agent, "lamp", false).await;
    let result = operator.expect("result").await;
    assert_eq!(result["outcome"], "failed");
    assert_eq!(result["reason"], "relay stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_command_takes_the_same_path() {
    let server = Server::start().await;
    let mut agent = server.agent("lamp").await;
    let op = server.operator_token.clone();
    let body = json!({"set": {"power_on": false}});
    let (answer, _) = tokio::join!(
        server.post_command("lamp", Some(&op), &body),
        answer_next_command(&mut agent, "lamp", true)
    );
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(answer.1, json!({"outcome": "applied"}));
    assert_eq!(
        server.device("lamp").await.unwrap()["status"]["power_on"],
        false
    );

    let (status, _) = server.post_command("lamp", None, &body).await;
    assert_eq!(status, 401);
    let (status, _) = server
        .post_command("lamp", Some(&server.token.clone()), &body)
        .await;
    assert_eq!(status, 403);
    for set in [json!({}), json!([false])] {
        let (status, err) = server
            .post_command("lamp", Some(&op), &json!({ "set": set }))
            .await;
        assert_eq!(status, 422, "{set}: {err}");
        assert_eq!(err["field"], "set", "{set}: {err}");
    }
    let (status, err) = server.post_command("nobody", Some(&op), &body).await;
    assert_eq!(status, 503, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_device_without_an_agent_fails_at_once() {
    let server = Server::start().await;
    server
        .post_status("http-only", &json!({"power_on": true}))
        .await;
    let mut operator = server.operator().await;
    operator.send(&command("http-only", false, "r-1")).await;
    let result = operator.expect("result").await;
    assert_eq!(result["request_id"], "r-1");
    assert_eq!(result["outcome"], "failed");
    assert!(
        result["reason"].as_str().unwrap().contains("no agent"),
        "{result}"
    );
    assert_eq!(
        server.device("http-only").await.unwrap()["status"]["power_on"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_command_times_out() {
    let server = Server::start_with(&["--command-timeout", "300ms"]).await;
    let mut agent = server.agent("mute").await;
    let mut operator = server.operator().await;
    operator.send(&command("mute", true, "r-1")).await;
    operator.expect("ack").await;
    let routed = agent.expect("command").await;
    let result = operator.expect("result").await;
    assert_eq!(result["outcome"], "timed_out");
    // A late answer is refused; the connection stays up.
    agent
        .send(&json!({"type": "result", "request_id": routed["request_id"], "outcome": "applied"}))
        .await;
    let error = agent.expect("error").await;
    assert_eq!(error["field"], "request_id");
    let (status, _) = server
        .post_command(
            "mute",
            Some(&server.operator_token.clone()),
            &json!({"set": {"power_on": true}}),
        )
        .await;
    assert_eq!(status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_roles_and_tokens_are_refused_and_change_nothing() {
    let server = Server::start_with(&["--device-token", "rack=rack-secret"]).await;
    let mut agent = server.agent("lamp").await;

    // A viewer may not command.
    let mut viewer = server.viewer().await;
    viewer.send(&command("lamp", false, "r-1")).await;
    assert_eq!(viewer.expect_close().await.0, 4403);

    // A device may push for its own id only.
    let mut rack = server
        .ws_as(json!({"type": "hello", "v": 1, "role": "device", "token": "rack-secret", "device": "rack"}))
        .await;
    rack.send(&json!({"type": "status", "device": "other", "update": {"power_on": true}}))
        .await;
    assert_eq!(rack.expect_close().await.0, 4403);
    assert_eq!(server.device("other").await, None);

    // A device token is bound to its id.
    let mut ws = server.ws().await;
    ws.send(&json!({"type": "hello", "v": 1, "role": "device", "token": "rack-secret", "device": "other"}))
        .await;
    assert_eq!(ws.expect_close().await.0, 4403);

    // A bad token, or none for an operator: 4401.
    let mut ws = server.ws().await;
    ws.send(&json!({"type": "hello", "v": 1, "role": "operator", "token": "nope"}))
        .await;
    assert_eq!(ws.expect_close().await.0, 4401);
    let mut ws = server.ws().await;
    ws.send(&json!({"type": "hello", "v": 1, "role": "operator"}))
        .await;
    assert_eq!(ws.expect_close().await.0, 4401);

    // The token may come as a header instead; a bad one is a 401 upgrade.
    let mut ws = server
        .ws_with_bearer(Some(&server.operator_token.clone()))
        .await;
    ws.send(&json!({"type": "hello", "v": 1, "role": "operator"}))
        .await;
    assert_eq!(ws.expect("welcome").await["role"], "operator");
    let refused = server
        .client
        .get(server.url("/api/ws"))
        .bearer_auth("nope")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // The first message must be a hello.
    let mut ws = server.ws().await;
    ws.send(&json!({"type": "subscribe"})).await;
    assert_eq!(ws.expect_close().await.0, 1008);

    // Nothing reached the agent, and nothing changed.
    let mut operator = server.operator().await;
    operator.send(&command("lamp", true, "r-2")).await;
    operator.expect("ack").await;
    let routed = answer_next_command(&mut agent, "lamp", true).await;
    assert_eq!(routed["set"], json!({"power_on": true}));
    assert_eq!(operator.expect("result").await["request_id"], "r-2");
}

/// The next message is an `error` saying an object was expected.
async fn refused_as_no_object(ws: &mut common::Ws) {
    let error = ws.expect("error").await;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected an object")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_messages_are_refused_and_the_server_is_unharmed() {
    let server = Server::start().await;
    let mut agent = server.agent("probe").await;
    agent.send_text("not json".into()).await;
    assert!(agent.expect("error").await["error"].is_string());
    agent.send(&json!({"type": "dance"})).await;
    agent.expect("error").await;
    agent
        .send(&json!({"type": "status", "device": "probe", "update": {"temperature": 99999}}))
        .await;
    assert_eq!(agent.expect("error").await["field"], "temperature");
    agent
        .send(&json!({"type": "status", "device": "probe", "update": {"temprature": 1}}))
        .await;
    assert_eq!(agent.expect("error").await["field"], "temprature");
    // An array is no update: serde would take its items as the fields.
    agent
        .send(&json!({"type": "status", "device": "probe", "update": [20.5]}))
        .await;
    refused_as_no_object(&mut agent).await;

    let mut operator = server.operator().await;
    operator
        .send(&json!({"type": "command", "device": "probe", "set": [true], "request_id": "r-1"}))
        .await;
    refused_as_no_object(&mut operator).await;

    // The connection still works.
    agent
        .send(&json!({"type": "status", "device": "probe", "update": {"temperature": 20.5}}))
        .await;
    eventually("the valid report", || async {
        server
            .device("probe")
            .await
            .is_some_and(|d| d["status"]["temperature"] == 20.5)
    })
    .await;

    let big = json!({"type": "status", "device": "probe", "update": {"name": "x".repeat(20_000)}});
    agent.send(&big).await;
    assert_eq!(agent.expect_close().await.0, 1009);
    assert_eq!(server.healthz().await["status"], "ok");
    let mut viewer = server.viewer().await;
    viewer.send(&json!({"type": "subscribe"})).await;
    viewer.expect("snapshot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_disconnects_makes_its_device_offline_on_sse() {
    let server = Server::start().await;
    let agent = server.agent("lamp").await;
    let mut sse = server.sse("?device=lamp").await;
    assert_eq!(
        sse.expect_start().await.device("lamp").unwrap()["online"],
        true
    );
    drop(agent);
    sse_status_where(&mut sse, "lamp", |d| d["online"] == false).await;
    // A device fed over HTTP only has no `online` at all.
    server
        .post_status("plain", &json!({"power_on": true}))
        .await;
    assert!(
        server
            .device("plain")
            .await
            .unwrap()
            .get("online")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_device_whose_agent_does_not_come_back_goes_offline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let mut server =
        Server::start_with_simulator(&["--data-dir", path, "--agent-timeout", "3s"]).await;
    let agent = server.agent("psu").await;
    eventually("the agent's device to be online", || async {
        server
            .device("psu")
            .await
            .is_some_and(|d| d["online"] == true)
    })
    .await;
    // Killed with its agent connected: the store says online.
    server.restart().await;
    drop(agent);
    let mut sse = server.sse("?device=psu").await;
    let start = sse.expect_start().await;
    assert_eq!(
        start.device("psu").unwrap()["online"],
        true,
        "its agent may be on its way back"
    );
    sse_status_where(&mut sse, "psu", |d| d["online"] == false).await;
    // The simulator's devices came back with the server.
    assert_eq!(server.device("freezer").await.unwrap()["online"], true);
    // Offline, it may be removed.
    let operator = server.operator_token.clone();
    let (status, body) = server.remove("psu", Some(&operator)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_disconnected_and_goes_offline() {
    let server = Server::start_with(&["--ws-ping", "100ms", "--agent-timeout", "500ms"]).await;
    let mut sse = server.sse("?device=quiet").await;
    sse.expect_start().await;
    // Never read again: no pongs go back.
    let mut agent = server.agent("quiet").await;
    sse_status_where(&mut sse, "quiet", |d| d["online"] == true).await;
    sse_status_where(&mut sse, "quiet", |d| d["online"] == false).await;
    let code = agent.closed().await;
    assert!(matches!(code, None | Some(1001)), "closed with {code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_replaces_the_first() {
    let server = Server::start().await;
    let mut first = server.agent("lamp").await;
    let mut second = server.agent("lamp").await;
    let (code, reason) = first.expect_close().await;
    assert_eq!(code, 4409);
    assert!(reason.contains("replaced"), "{reason}");
    // The first one's cleanup left its successor online and in charge.
    assert_eq!(server.device("lamp").await.unwrap()["online"], true);
    let mut operator = server.operator().await;
    operator.send(&command("lamp", false, "r-1")).await;
    operator.expect("ack").await;
    answer_next_command(&mut second, "lamp", true).await;
    assert_eq!(operator.expect("result").await["outcome"], "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_device_applies_commands() {
    let server = Server::start_with_simulator(&["--simulator-interval", "100ms"]).await;
    let freezer = loop {
        if let Some(d) = server.device("freezer").await
            && d["status"]["power_on"].is_boolean()
        {
            break d;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(freezer["online"], true);
    let wanted = !freezer["status"]["power_on"].as_bool().unwrap();
    let mut sse = server.sse("?device=freezer").await;
    sse.expect_start().await;
    let mut operator = server.operator().await;
    operator.send(&command("freezer", wanted, "r-1")).await;
    operator.expect("ack").await;
    let result = operator.expect("result").await;
    assert_eq!(result["outcome"], "applied", "{result}");
    sse_status_where(&mut sse, "freezer", |d| d["status"]["power_on"] == wanted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_takes_a_simulator_device_over_for_good() {
    let server = Server::start_with_simulator(&["--simulator-interval", "50ms"]).await;
    eventually("the simulator's freezer", || async {
        server.device("freezer").await.is_some()
    })
    .await;
    let mut agent = server.agent("freezer").await;
    agent
        .send(&json!({"type": "status", "device": "freezer",
                      "update": {"temperature": 4.0, "humidity": 50.0}}))
        .await;
    eventually("the agent's reading", || async {
        server.device("freezer").await.unwrap()["status"]["temperature"] == 4.0
    })
    .await;
    // Many simulator ticks later, the agent's values still stand.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let freezer = server.device("freezer").await.unwrap();
    assert_eq!(freezer["status"]["temperature"], 4.0, "{freezer}");
    assert_eq!(freezer["status"]["humidity"], 50.0, "{freezer}");
    // The other simulated devices go on drifting.
    let before = server.device("greenhouse").await.unwrap()["status"].clone();
    eventually("the greenhouse to drift", || async {
        server.device("greenhouse").await.unwrap()["status"] != before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_online_sends_the_readings_it_kept_at_their_own_times() {
    let server = Server::start().await;
    let status = |t: f64, at: Option<String>| {
        let mut update = json!({ "temperature": t });
        if let Some(at) = at {
            update["at"] = json!(at);
        }
        json!({ "type": "status", "device": "probe", "update": update })
    };
    let device = || async { server.device("probe").await.unwrap_or_default() };
    let mut agent = server.agent("probe").await;
    agent.send(&status(10.0, None)).await;
    eventually("the first reading", || async {
        device().await["status"]["temperature"] == 10.0
    })
    .await;
    let reported = device().await["updated_at"].clone();
    drop(agent);
    eventually("offline", || async { device().await["online"] == false }).await;
    let away = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let mut agent = server.agent("probe").await;
    eventually("online again", || async {
        device().await["online"] == true
    })
    .await;
    // A link is no reading: the last reported change keeps its time.
    assert_eq!(device().await["updated_at"], reported);
    agent.send(&status(11.0, Some(away.clone()))).await;
    eventually("the kept reading", || async {
        device().await["status"]["temperature"] == 11.0
    })
    .await;
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!(time(&device().await["updated_at"]), time(&json!(away)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_update_with_a_request_id_is_acked_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&["--data-dir", dir.path().to_str().unwrap()]).await;
    let mut agent = server.agent("probe").await;
    let status = |update: Value, request_id: &str| json!({"type": "status", "device": "probe", "update": update, "request_id": request_id});
    let ack = |request_id: &str| json!({"type": "ack", "request_id": request_id});
    agent
        .send(&status(json!({"temperature": 21.5}), "r-1"))
        .await;
    assert_eq!(agent.next().await, ack("r-1"));
    // Changing nothing is taken all the same.
    agent
        .send(&status(json!({"temperature": 21.5}), "r-2"))
        .await;
    assert_eq!(agent.next().await, ack("r-2"));
    // A refusal names the update it refuses.
    agent
        .send(&status(json!({"temperature": 99999}), "r-3"))
        .await;
    let error = agent.expect("error").await;
    assert_eq!(
        (&error["field"], &error["request_id"]),
        (&json!("temperature"), &json!("r-3"))
    );
    agent
        .send(&status(json!({"temperature": 40}), &"r".repeat(129)))
        .await;
    assert_eq!(agent.expect("error").await["field"], "request_id");
    // Without a request id, no answer: the next one is for r-4.
    agent
        .send(&json!({"type": "status", "device": "probe", "update": {"humidity": 50}}))
        .await;
    agent
        .send(&status(json!({"temperature": 22.5}), "r-4"))
        .await;
    assert_eq!(agent.next().await, ack("r-4"));

    // Acked means durable: killed at once, the server has it on restart.
    server.restart().await;
    let device = server.device("probe").await.unwrap();
    assert_eq!(device["status"]["temperature"], 22.5, "{device}");
    assert_eq!(device["status"]["humidity"], 50.0, "{device}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_do_not_put_off_the_hello() {
    let server = Server::start().await;
    let mut ws = server.ws().await;
    // The hello is due 5 s after connecting, whatever comes before it.
    let closed = ws
        .ping_until_closed(Duration::from_secs(1), Duration::from_secs(15))
        .await;
    assert!(
        matches!(closed, Ok(Some(1008) | None)),
        "still open after 15 s of pings: {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_wrong_tokens_has_no_token_checked_on_sockets_it_opened_before() {
    let server = Server::start().await;
    let guesses = telltale::server::auth::GUESSES as usize;
    // Opened while the address still had its allowance.
    let mut sockets = Vec::new();
    for _ in 0..=guesses + 1 {
        sockets.push(server.ws().await);
    }
    let right = sockets.pop().unwrap();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        ws.send(
            &json!({"type": "hello", "v": 1, "role": "operator", "token": format!("guess-{i}")}),
        )
        .await;
        assert_eq!(ws.expect_close().await.0, 4401, "guess {i}");
    }
    let mut ws = right;
    ws.send(&json!({"type": "hello", "v": 1, "role": "operator", "token": server.operator_token}))
        .await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, 4429, "{reason}");
    assert!(reason.contains("too many wrong tokens"), "{reason}");
}
