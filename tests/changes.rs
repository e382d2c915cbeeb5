#![cfg(feature = "ssr")]
//! `GET /api/devices/{id}/changes` and `GET /api/changes`: what a device's
//! (every device's) events changed besides readings, newest first, kept
//! across a restart, and on its page (the dashboard).

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `(kind, the change's one other field)` of each change, newest first.
async fn changes(server: &Server, device: &str, query: &str) -> Vec<(String, Value)> {
    let (status, body) = server
        .get_json(&format!("/api/devices/{device}/changes{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device"], device);
    let list = body["changes"].as_array().expect("a list of changes");
    list.iter()
        .map(|c| {
            assert!(c["id"].is_u64() && c["at"].is_string(), "{c}");
            let kind = c["kind"].as_str().expect("a kind").to_owned();
            let detail = ["on", "online", "stale", "name", "metric"]
                .iter()
                .find_map(|k| c.get(*k).cloned())
                .unwrap_or(Value::Null);
            (kind, detail)
        })
        .collect()
}

fn change(kind: &str, detail: Value) -> (String, Value) {
    (kind.to_owned(), detail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_link_alerts_and_name_are_listed_newest_first_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.toml");
    std::fs::write(&limits, "[devices.rig]\ntemperature = { max = 30 }\n").unwrap();
    let data = dir.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--thresholds",
        limits.to_str().unwrap(),
    ];
    let mut server = Server::start_with(&args).await;
    let post = |body: Value| {
        let server = &server;
        async move { server.post_status("rig", &body).await }
    };
    post(json!({"temperature": 20.0, "power_on": true, "name": "Rig"})).await;
    post(json!({"temperature": 21.0})).await;
    post(json!({"temperature": 35.0})).await;
    post(json!({"temperature": 36.0, "power_on": false, "name": "Test rig"})).await;
    post(json!({"temperature": 22.0})).await;
    let agent = server.agent("rig").await;
    common::eventually("the rig is online", || async {
        server.device("rig").await.unwrap()["online"] == true
    })
    .await;
    drop(agent);
    common::eventually("the rig is offline", || async {
        server.device("rig").await.unwrap()["online"] == false
    })
    .await;

    let expected = [
        change("online", json!(false)),
        change("online", json!(true)),
        change("alert_cleared", json!("temperature")),
        change("renamed", json!("Test rig")),
        change("power", json!(false)),
        change("alert", json!("temperature")),
        change("registered", Value::Null),
    ];
    assert_eq!(changes(&server, "rig", "").await, expected);
    assert_eq!(changes(&server, "rig", "?limit=2").await, expected[..2]);
    let (_, body) = server.get_json("/api/devices/rig/changes").await;
    let alert = &body["changes"][5];
    assert_eq!(
        (&alert["alert"]["value"], &alert["alert"]["max"]),
        (&json!(35.0), &json!(30.0)),
        "an alert names the value that broke the limit: {alert}"
    );

    // The page lists them, rendered by the server.
    let page = server
        .client
        .get(server.url("/devices/rig"))
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    assert!(html.contains("Recent changes"), "{html}");
    assert_eq!(html.matches(r#"data-testid="change""#).count(), 7);
    for text in [
        "Power off",
        "Renamed to “Test rig”",
        "Offline: its agent went away",
    ] {
        assert!(html.contains(text), "{text} is not on the page");
    }
    assert!(
        html.contains("Temperature 35.0 °C, above the maximum of 30 °C"),
        "the alert in words"
    );

    server.restart().await;
    assert_eq!(changes(&server, "rig", "").await, expected, "kept");
}

#[tokio::test]
async fn bad_reads_are_refused_with_a_reason() {
    let server = Server::start().await;
    server.post_status("rig", &json!({"power_on": true})).await;
    for limit in ["0", "1001", "-1", "many"] {
        let (status, body) = server
            .get_json(&format!("/api/devices/rig/changes?limit={limit}"))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{limit}: {body}");
        assert_eq!(body["field"], "limit");
        assert_eq!(body["error"], "`limit` is a number from 1 to 1000");
    }
    let (status, body) = server.get_json("/api/changes?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "limit");
    for device in ["nope", "Not-An-Id"] {
        let (status, body) = server
            .get_json(&format!("/api/devices/{device}/changes"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"], format!("unknown device `{device}`"));
    }
    assert_eq!(
        changes(&server, "rig", "?limit=1000").await,
        [change("registered", Value::Null)]
    );
}

#[tokio::test]
async fn every_devices_changes_name_their_device_and_go_with_it() {
    let server = Server::start().await;
    server
        .post_status("fridge", &json!({"power_on": true, "name": "Fridge"}))
        .await;
    server
        .post_status("oven", &json!({"power_on": true, "name": "Oven"}))
        .await;
    server
        .post_status("fridge", &json!({"power_on": false}))
        .await;
    server
        .post_status("oven", &json!({"name": "Big oven"}))
        .await;
    let all = |query: &'static str| {
        let server = &server;
        async move {
            let (status, body) = server.get_json(&format!("/api/changes{query}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.get("device").is_none(), "{body}");
            body["changes"]
                .as_array()
                .expect("a list of changes")
                .iter()
                .map(|c| {
                    let device = c["device"].as_str().expect("its device").to_owned();
                    (device, c["kind"].as_str().expect("a kind").to_owned())
                })
                .collect::<Vec<_>>()
        }
    };
    let pair = |device: &str, kind: &str| (device.to_owned(), kind.to_owned());
    let expected = [
        pair("oven", "renamed"),
        pair("fridge", "power"),
        pair("oven", "registered"),
        pair("fridge", "registered"),
    ];
    assert_eq!(all("").await, expected);
    assert_eq!(all("?limit=3").await, expected[..3]);

    // The dashboard lists them, each naming its device by its name.
    let html = server
        .client
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("Recent changes"), "{html}");
    assert_eq!(html.matches(r#"data-testid="change""#).count(), 4);
    assert_eq!(html.matches(r#"data-testid="change-device""#).count(), 4);
    assert!(html.contains(r#"href="/devices/oven""#));
    assert!(html.contains("Renamed to “Big oven”"));
    assert!(html.contains(">Big oven</a>"), "named by its name");

    let (status, body) = server.remove("oven", Some(&server.operator_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        all("").await,
        [pair("fridge", "power"), pair("fridge", "registered")]
    );
}
