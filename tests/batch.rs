#![cfg(feature = "ssr")]
//! `POST /api/status`: many devices' updates in one request, each its own
//! event in the order given, taken all together or not at all.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `POST /api/status` with `body` as JSON and the ingest token.
async fn post_batch(server: &Server, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let response = server
        .client
        .post(server.url("/api/status"))
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_event_per_changed_device_in_the_order_given() {
    let server = Server::start().await;
    server
        .post_status("rack-1", &json!({ "temperature": 20.0 }))
        .await;
    let mut stream = server.sse("").await;
    let start = stream.expect_start().await.id;

    let body = r#"{
        "rack-2": {"temperature": 30.5, "name": "Rack 2"},
        "rack-1": {"temperature": 20.0},
        "door": {"power_on": true, "metrics": {"opened": 3}}
    }"#;
    let (status, answer) = post_batch(&server, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({"devices": {
            "rack-2": {"id": start + 1, "changed": true},
            "rack-1": {"id": start + 1, "changed": false},
            "door": {"id": start + 2, "changed": true},
        }})
    );
    for (id, device) in [(start + 1, "rack-2"), (start + 2, "door")] {
        let record = stream.expect_status().await;
        assert_eq!(
            (record.id(), record.json()["device"].clone()),
            (id, json!(device))
        );
    }
    let door = server.device("door").await.unwrap();
    assert_eq!(door["status"]["metrics"]["opened"], json!(3.0));
    assert_eq!(server.device("rack-2").await.unwrap()["name"], "Rack 2");
    let (status, answer) = post_batch(&server, "{}").await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"devices": {}})));
}

/// An RFC 3339 time `ago` before now.
fn ago(seconds: i64) -> String {
    (chrono::Utc::now() - chrono::TimeDelta::seconds(seconds))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sends_its_kept_readings_as_an_array_each_at_its_time() {
    let server = Server::start().await;
    let mut stream = server.sse("").await;
    let start = stream.expect_start().await.id;
    let times = [ago(30), ago(20), ago(10)];
    let body = json!({
        "kept": [
            {"temperature": 1.0, "at": times[0]},
            {"temperature": 2.0, "at": times[1]},
            {"temperature": 2.0, "at": times[2]},
        ],
        "rack": {"humidity": 40.0},
    });
    let (status, answer) = post_batch(&server, body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({"devices": {
            "kept": [
                {"id": start + 1, "changed": true},
                {"id": start + 2, "changed": true},
                {"id": start + 2, "changed": false},
            ],
            "rack": {"id": start + 3, "changed": true},
        }})
    );
    for (id, device, at) in [
        (start + 1, "kept", Some(&times[0])),
        (start + 2, "kept", Some(&times[1])),
        (start + 3, "rack", None),
    ] {
        let event = stream.expect_status().await;
        assert_eq!(event.id(), id);
        assert_eq!(event.json()["device"], device);
        if let Some(at) = at {
            assert_eq!(event.json()["updated_at"], json!(at));
        }
    }
    assert_eq!(
        server.history_values("kept", "temperature").await,
        [1.0, 2.0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_changes_nothing_and_says_where() {
    let server = Server::start().await;
    let full: serde_json::Map<String, Value> =
        (0..32).map(|m| (format!("m{m}"), json!(1.0))).collect();
    server
        .post_status("full", &json!({ "metrics": full }))
        .await;
    let before = server.get_json("/api/devices").await.1;

    for (body, status, field) in [
        (
            r#"{"a": {"temperature": 1}"#.to_owned(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            r#"[{"temperature": 1}]"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(""),
        ),
        (
            r#"{"a": {"temperature": 1}, "b": {"temperature": "hot"}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b.temperature"),
        ),
        (
            r#"{"a": {"temperature": 1}, "b": {"colour": "red"}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b.colour"),
        ),
        (
            r#"{"a": {"temperature": 1}, "b": {"humidity": 101}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b.humidity"),
        ),
        (
            r#"{"a": {"temperature": 1}, "Not An Id": {}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("Not An Id"),
        ),
        (
            r#"{"a": {"temperature": 1}, "a": {"temperature": 2}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(""),
        ),
        // Valid alone, but `full` carries 32 metrics already: the update of
        // `a` before it is not kept either.
        (
            r#"{"a": {"temperature": 1}, "full": {"metrics": {"one.more": 1}}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("full.metrics"),
        ),
        (
            json!({"a": {"temperature": 1}, "b": [{"temperature": 1}, {"temperature": "hot"}]})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b[1].temperature"),
        ),
        (
            json!({"b": [{"temperature": 1}, {"humidity": 101}]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b[1].humidity"),
        ),
        // Out of order within the array: the hub refuses, naming the place.
        (
            json!({"b": [{"temperature": 1, "at": ago(10)}, {"temperature": 2, "at": ago(20)}]})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b[1].at"),
        ),
        // An array is no update: serde would take its items as the fields.
        (
            json!({"b": [[1.5]]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("b[0]"),
        ),
        (
            json!({"b": [{"temperature": 1}], "c": 3}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("c"),
        ),
        (
            json!({"a": (0..600).map(|_| json!({})).collect::<Vec<_>>(),
                   "b": (0..401).map(|_| json!({})).collect::<Vec<_>>()})
            .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(""),
        ),
        (
            serde_json::to_string(
                &(0..1001)
                    .map(|i| (format!("d{i}"), json!({})))
                    .collect::<serde_json::Map<_, _>>(),
            )
            .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(""),
        ),
        (
            format!(r#"{{"a": {{"name": "{}"}}}}"#, "x".repeat(256 * 1024)),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
    ] {
        let (got, answer) = post_batch(&server, body.clone()).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown} answered {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
        assert_eq!(answer["field"].as_str(), field, "{shown} answered {answer}");
    }
    let refused = server
        .client
        .post(server.url("/api/status"))
        .header("content-type", "application/json")
        .body(r#"{"a": {"temperature": 1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.get_json("/api/devices").await.1, before);
}
