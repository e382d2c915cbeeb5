#![cfg(feature = "ssr")]
//! Alerts and staleness against the real server: limits from the API and
//! from a thresholds file, alerts and stale marks as SSE status events, and
//! limits kept across a restart.

mod common;

use common::{Server, SseStream, eventually, within};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// `PUT /api/devices/{device}/thresholds` with `bearer` (if any).
async fn put_thresholds(
    server: &Server,
    device: &str,
    bearer: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut request = server
        .client
        .put(server.url(&format!("/api/devices/{device}/thresholds")))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = within("a PUT answer", request.send()).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The same with the operator token, insisting on a 200.
async fn set_limits(server: &Server, device: &str, limits: Value) -> Value {
    let (status, body) = put_thresholds(
        server,
        device,
        Some(&server.operator_token),
        &limits.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "PUT {device} {limits}: {body}");
    body
}

/// An SSE stream of `device` only, past its opening snapshot.
async fn watch(server: &Server, device: &str) -> SseStream {
    let mut stream = server.sse(&format!("?device={device}")).await;
    stream.expect_start().await;
    stream
}

async fn next_status(stream: &mut SseStream) -> Value {
    stream.expect_status().await.json()
}

fn tempfile_with(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[tokio::test]
async fn a_silent_device_goes_stale_and_its_next_report_brings_it_back() {
    let server = Server::start_with(&["--stale-floor", "150ms"]).await;
    let mut sse = watch(&server, "quiet").await;
    let first = server
        .post_status("quiet", &json!({"temperature": 20.0}))
        .await;
    let registered = next_status(&mut sse).await;
    assert_eq!(registered.get("stale"), None, "not stale: left out");
    // Reports that change nothing still teach the server the cadence.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let again = server
            .post_status("quiet", &json!({"temperature": 20.0}))
            .await;
        assert_eq!((again.id, again.changed), (first.id, false));
    }
    // Then silence: stale after three intervals (~450 ms).
    let stale = next_status(&mut sse).await;
    assert_eq!(stale["stale"], true, "{stale}");
    assert_eq!(stale["status"], registered["status"]);
    assert_eq!(
        stale["updated_at"], registered["updated_at"],
        "updated_at is the last reported change"
    );
    assert_eq!(server.device("quiet").await.unwrap()["stale"], true);
    // The same values again: back, as an event of its own.
    let back = server
        .post_status("quiet", &json!({"temperature": 20.0}))
        .await;
    assert!(back.changed);
    let event = sse.expect_status().await;
    assert_eq!(event.id(), back.id);
    let event = event.json();
    assert_eq!(event.get("stale"), None, "{event}");
    assert_eq!(event["updated_at"], registered["updated_at"]);
    // Its recent changes say so, timed when it went stale (not at its last
    // report, as `updated_at` is).
    let (_, body) = server.get_json("/api/devices/quiet/changes").await;
    let changes = body["changes"].as_array().unwrap();
    let kinds: Vec<_> = changes
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c.get("stale").cloned()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("stale", Some(json!(false))),
            ("stale", Some(json!(true))),
            ("registered", None)
        ]
    );
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let silent = time(&changes[1]["at"]) - time(&registered["updated_at"]);
    assert!(silent.num_milliseconds() >= 300, "stale after {silent}");
}

#[tokio::test]
async fn a_device_whose_agent_left_is_offline_not_stale() {
    let server = Server::start_with(&["--stale-after", "2s"]).await;
    let mut sse = watch(&server, "lamp").await;
    let mut agent = server.agent("lamp").await;
    assert_eq!(next_status(&mut sse).await["online"], true);
    agent
        .send(&json!({"type": "status", "device": "lamp", "update": {"power_on": true}}))
        .await;
    assert_eq!(next_status(&mut sse).await["status"]["power_on"], true);
    drop(agent);
    let offline = next_status(&mut sse).await;
    assert_eq!(offline["online"], false);
    assert_eq!(offline.get("stale"), None);
    // Well past the deadline, the next event is the sentinel: no stale mark.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let posted = server
        .post_status("lamp", &json!({"temperature": 3.0}))
        .await;
    let next = sse.expect_status().await;
    assert_eq!(next.id(), posted.id, "an unexpected event: {next:?}");
    assert_eq!(next.json().get("stale"), None);
}

#[tokio::test]
async fn an_alert_comes_with_an_update_outside_the_limits_and_goes_inside() {
    let server = Server::start().await;
    // Configured before its first report: accepted.
    let answer = set_limits(&server, "rack-1", json!({"temperature": {"max": 30}})).await;
    assert_eq!(
        answer,
        json!({"device": "rack-1", "limits": {"temperature": {"max": 30.0}}})
    );
    let mut sse = watch(&server, "rack-1").await;
    server
        .post_status("rack-1", &json!({"temperature": 25.0}))
        .await;
    assert_eq!(next_status(&mut sse).await.get("alerts"), None);
    server
        .post_status("rack-1", &json!({"temperature": 31.5}))
        .await;
    let event = next_status(&mut sse).await;
    assert_eq!(
        event["alerts"],
        json!({"temperature": {"value": 31.5, "max": 30.0}})
    );
    assert_eq!(
        server.device("rack-1").await.unwrap()["alerts"],
        event["alerts"]
    );
    server
        .post_status("rack-1", &json!({"temperature": 30.0}))
        .await;
    assert_eq!(next_status(&mut sse).await.get("alerts"), None, "cleared");

    // New limits apply at once, as an event that keeps updated_at.
    let before = server.device("rack-1").await.unwrap();
    set_limits(
        &server,
        "rack-1",
        json!({"temperature": {"min": 10, "max": 20}}),
    )
    .await;
    let event = next_status(&mut sse).await;
    assert_eq!(
        event["alerts"],
        json!({"temperature": {"value": 30.0, "min": 10.0, "max": 20.0}})
    );
    assert_eq!(event["updated_at"], before["updated_at"]);
    let answer = set_limits(&server, "rack-1", json!({})).await;
    assert_eq!(answer, json!({"device": "rack-1", "limits": {}}));
    assert_eq!(next_status(&mut sse).await.get("alerts"), None);
    let (status, all) = server.get_json("/api/thresholds").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all, json!({"defaults": {}, "devices": {"rack-1": {}}}));
}

#[tokio::test]
async fn limits_from_the_thresholds_file_apply_from_the_start() {
    let file = tempfile_with(
        r#"
        [defaults]
        humidity = { min = 20, max = 80 }
        [devices.rack-1]
        temperature = { max = 30 }
        "#,
    );
    let server = Server::start_with(&["--thresholds", file.path().to_str().unwrap()]).await;
    let (status, all) = server.get_json("/api/thresholds").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        all,
        json!({
            "defaults": {"humidity": {"min": 20.0, "max": 80.0}},
            "devices": {"rack-1": {"temperature": {"max": 30.0}}},
        })
    );
    server
        .post_status("rack-1", &json!({"temperature": 35.0, "humidity": 50.0}))
        .await;
    server
        .post_status("other", &json!({"temperature": 35.0, "humidity": 85.0}))
        .await;
    assert_eq!(
        server.device("rack-1").await.unwrap()["alerts"],
        json!({"temperature": {"value": 35.0, "max": 30.0}})
    );
    assert_eq!(
        server.device("other").await.unwrap()["alerts"],
        json!({"humidity": {"value": 85.0, "min": 20.0, "max": 80.0}})
    );
}

#[tokio::test]
async fn a_bad_thresholds_file_stops_the_start_naming_file_and_fault() {
    let file = tempfile_with("[devices.rack-1]\ntemperature = { min = 40, max = 30 }\n");
    let path = file.path().to_str().unwrap();
    let text = common::refused_start(&["--memory", "--thresholds", path], &[]).await;
    assert!(text.contains(&file.path().display().to_string()), "{text}");
    assert!(
        text.contains("devices.rack-1.temperature: min (40) is above max (30)"),
        "{text}"
    );
}

async fn alerts(server: &Server, device: &str) -> Value {
    server.device(device).await.expect("the device")["alerts"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_thresholds_file_again_and_a_bad_file_changes_nothing() {
    let file = tempfile_with("[devices.rack-1]\ntemperature = { max = 30 }\n");
    let path = file.path().to_str().unwrap();
    let server = Server::start_with(&["--thresholds", path, "--stale-floor", "50ms"]).await;
    server
        .post_status("rack-1", &json!({ "temperature": 35.0 }))
        .await;
    assert_eq!(alerts(&server, "rack-1").await["temperature"]["max"], 30.0);

    std::fs::write(
        file.path(),
        "[devices.rack-1]\ntemperature = { max = 40 }\nstale_after = \"100ms\"\n",
    )
    .unwrap();
    server.signal("HUP");
    eventually("the alert cleared under the new limit", || async {
        alerts(&server, "rack-1").await["temperature"].is_null()
    })
    .await;
    let (_, thresholds) = server.get_json("/api/thresholds").await;
    assert_eq!(thresholds["devices"]["rack-1"]["temperature"]["max"], 40.0);
    // The new `stale_after` holds too: silent past 100 ms, it is stale.
    eventually("rack-1 stale", || async {
        server.device("rack-1").await.unwrap()["stale"] == json!(true)
    })
    .await;

    // A file that does not read changes nothing, and says so.
    std::fs::write(
        file.path(),
        "[devices.rack-1]\ntemperature = { min = 50, max = 40 }\n",
    )
    .unwrap();
    server.signal("HUP");
    eventually("the refusal in the log", || async {
        server.output().contains("the limits in force stay")
    })
    .await;
    assert!(server.output().contains(path), "{}", server.output());
    let (status, kept) = server.get_json("/api/thresholds").await;
    assert_eq!((status, kept), (StatusCode::OK, thresholds));
    server
        .post_status("rack-1", &json!({ "temperature": 45.0 }))
        .await;
    assert_eq!(alerts(&server, "rack-1").await["temperature"]["max"], 40.0);
}

#[tokio::test]
async fn setting_limits_needs_operator_rights_and_valid_limits() {
    let server = Server::start().await;
    let body = r#"{"temperature": {"max": 30}}"#;
    let (status, _) = put_thresholds(&server, "rack-1", None, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = put_thresholds(&server, "rack-1", Some("not-a-token"), body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = put_thresholds(&server, "rack-1", Some(&server.token), body).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the ingest token is no operator"
    );

    let op = Some(server.operator_token.as_str());
    for (body, field) in [
        (r#"{"temperature": {"min": 31, "max": 30}}"#, "temperature"),
        (r#"{"bad name": {"max": 1}}"#, "bad name"),
        (r#"{"temperature": {"maximum": 30}}"#, "temperature.maximum"),
        (r#"{"temperature": {"max": "hot"}}"#, "temperature.max"),
        (r#"{"temperature": 30}"#, "temperature"),
        // Not read by position: an array is no limits.
        (r#"{"temperature": [20, 30]}"#, "temperature"),
    ] {
        let (status, answer) = put_thresholds(&server, "rack-1", op, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
    }
    let (status, answer) = put_thresholds(&server, "Rack 1", op, body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["field"], "id");
    // Nothing of it was kept.
    let (_, all) = server.get_json("/api/thresholds").await;
    assert_eq!(all, json!({"defaults": {}, "devices": {}}));

    // The page's operator session works as the token does.
    let signed_in = server
        .client
        .post(server.url("/api/session"))
        .json(&json!({"token": server.operator_token}))
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let answer = server
        .client
        .put(server.url("/api/devices/rack-1/thresholds"))
        .header("content-type", "application/json")
        .header("cookie", cookie)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
}

#[tokio::test]
async fn limits_set_over_the_api_survive_a_restart_and_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile_with("[devices.rack-1]\ntemperature = { max = 30 }\n");
    let mut server = Server::start_with(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--thresholds",
        file.path().to_str().unwrap(),
    ])
    .await;
    set_limits(&server, "rack-1", json!({"temperature": {"max": 50}})).await;
    server
        .post_status("rack-1", &json!({"temperature": 40.0}))
        .await;
    assert_eq!(server.device("rack-1").await.unwrap().get("alerts"), None);
    server
        .post_status("rack-1", &json!({"temperature": 55.0}))
        .await;

    server.restart().await;
    let (_, all) = server.get_json("/api/thresholds").await;
    assert_eq!(
        all["devices"]["rack-1"],
        json!({"temperature": {"max": 50.0}})
    );
    let alerts = json!({"temperature": {"value": 55.0, "max": 50.0}});
    assert_eq!(server.device("rack-1").await.unwrap()["alerts"], alerts);
    let mut sse = watch(&server, "rack-1").await;
    server
        .post_status("rack-1", &json!({"temperature": 45.0}))
        .await;
    assert_eq!(next_status(&mut sse).await.get("alerts"), None);
}

#[tokio::test]
async fn new_limits_are_an_event_every_page_sees_and_a_recorded_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&["--data-dir", dir.path().to_str().unwrap()]).await;
    server
        .post_status("rack-1", &json!({"temperature": 20.0}))
        .await;
    let mut sse = watch(&server, "rack-1").await;
    set_limits(&server, "rack-1", json!({"temperature": {"max": 50}})).await;
    let event = next_status(&mut sse).await;
    let limits = json!({"temperature": {"max": 50.0}});
    // No alert changed: the limits are the news.
    assert_eq!((&event["limits"], event.get("alerts")), (&limits, None));
    assert_eq!(server.device("rack-1").await.unwrap()["limits"], limits);
    let (_, changes) = server.get_json("/api/devices/rack-1/changes").await;
    assert_eq!(changes["changes"][0]["kind"], "limits", "{changes}");
    assert_eq!(changes["changes"][0]["limits"], limits);
    // Cleared: the defaults apply, and the device carries none.
    set_limits(&server, "rack-1", json!({})).await;
    assert_eq!(next_status(&mut sse).await.get("limits"), None);
    set_limits(&server, "rack-1", json!({"humidity": {"min": 10}})).await;
    next_status(&mut sse).await;
    // Kept with the device: a restart has no news.
    let (_, before) = server.get_json("/api/devices").await;
    server.restart().await;
    let (_, after) = server.get_json("/api/devices").await;
    assert_eq!(after, before);
    assert_eq!(after["devices"][0]["limits"]["humidity"]["min"], 10.0);
}

#[tokio::test]
async fn a_device_that_died_while_the_server_was_down_still_goes_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--stale-floor",
        "50ms",
    ])
    .await;
    for t in 0..4 {
        if t > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
            .post_status("rack-2", &json!({"temperature": 20.0}))
            .await;
    }
    // A kill -9: the learned interval was saved when it was learned.
    server.restart().await;
    let mut sse = server.sse("?device=rack-2").await;
    let start = sse.expect_start().await;
    let stale = match start.device("rack-2") {
        Some(d) if d["stale"] == true => d.clone(),
        _ => next_status(&mut sse).await,
    };
    assert_eq!(stale["stale"], true, "{stale}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_freezer_comes_with_a_limit_and_switched_off_warms_into_an_alert() {
    let server = Server::start_with_simulator(&["--simulator-interval", "20ms"]).await;
    eventually("the simulator's freezer", || async {
        server.device("freezer").await.is_some()
    })
    .await;
    let (_, view) = server.get_json("/api/thresholds").await;
    assert_eq!(
        view["devices"]["freezer"],
        json!({"temperature": {"max": -15.0}})
    );
    assert_eq!(
        view["devices"]["greenhouse"],
        json!({"soil_moisture": {"min": 30.0}})
    );
    let freezer = server.device("freezer").await.unwrap();
    assert_eq!(freezer.get("alerts"), None, "at its set point: {freezer}");
    let mut sse = watch(&server, "freezer").await;
    let (status, body) = server
        .post_command(
            "freezer",
            Some(&server.operator_token),
            &json!({"set": {"power_on": false}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // From -20 °C, warming about a step (0.2 °C) a tick: some 25 ticks.
    let alerted = within("the freezer's alert", async {
        loop {
            let event = next_status(&mut sse).await;
            if event.get("alerts").is_some() {
                return event;
            }
        }
    })
    .await;
    assert_eq!(alerted["status"]["power_on"], false, "{alerted}");
    assert!(
        alerted["status"]["temperature"].as_f64().unwrap() > -15.0,
        "{alerted}"
    );
    assert_eq!(alerted["alerts"]["temperature"]["max"], -15.0);
}
