#![cfg(feature = "ssr")]
//! `DELETE /api/devices/{id}`: who may, what is refused, and what a removal
//! takes with it (the device everywhere, its history), across a restart.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::json;

/// Checks `device` is gone from the API, with its history; `kept` alone
/// is left.
async fn gone(server: &Server, device: &str, kept: &str) {
    assert_eq!(server.device(device).await, None);
    assert_eq!(server.device_ids().await, [kept]);
    let (status, _) = server
        .get_json(&format!("/api/devices/{device}/history?metric=temperature"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_reaches_every_stream_takes_the_history_and_outlives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let mut server = Server::start_with(&["--data-dir", path]).await;
    for t in [10.0, 20.0] {
        server
            .post_status("old-rig", &json!({ "temperature": t, "name": "Old rig" }))
            .await;
    }
    server
        .post_status("kept", &json!({ "temperature": 5.0 }))
        .await;
    let mut stream = server.sse("").await;
    let seen = stream.expect_start().await.id;

    let (status, body) = server.remove("old-rig", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = server.remove("old-rig", Some(&server.token)).await;
    assert!(
        matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
        "the ingest token may not remove: {status} {body}"
    );
    let operator = server.operator_token.clone();
    let (status, body) = server.remove("no-such-rig", Some(&operator)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown device `no-such-rig`");
    assert!(
        server.device("old-rig").await.is_some(),
        "refusals change nothing"
    );

    let (status, body) = server.remove("old-rig", Some(&operator)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let removed_at = body["id"].as_u64().expect("the removal's event id");
    assert_eq!(removed_at, seen + 1);
    let record = stream.expect_status().await;
    assert_eq!(record.id(), removed_at);
    let data = record.json();
    assert_eq!(
        (&data["device"], &data["removed"]),
        (&json!("old-rig"), &json!(true))
    );
    assert_eq!(
        data["name"], "Old rig",
        "the removal carries the last state"
    );

    gone(&server, "old-rig", "kept").await;
    let (status, _) = server.remove("old-rig", Some(&operator)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "removed once only");

    // The store forgot it too; a client that saw the state before the
    // removal is told of it on resuming.
    server.restart().await;
    gone(&server, "old-rig", "kept").await;
    let last = seen.to_string();
    let mut resumed = server.sse_with("", &[("last-event-id", &last)]).await;
    resumed.expect_retry().await;
    let record = resumed.expect_status().await;
    assert_eq!(record.id(), removed_at);
    assert_eq!(record.json()["removed"], true);

    // A new report registers it afresh: no history from before.
    server
        .post_status("old-rig", &json!({ "temperature": 30.0 }))
        .await;
    let device = server.device("old-rig").await.expect("registered again");
    assert_eq!(device["name"], "old-rig");
    assert_eq!(
        server.history_values("old-rig", "temperature").await,
        [30.0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_live_link_is_not_removed_until_the_link_is_gone() {
    let server = Server::start().await;
    let operator = server.operator_token.clone();
    let mut agent = server.agent("bench-psu").await;
    agent
        .send(&json!({"type": "status", "device": "bench-psu", "update": {"temperature": 40.0}}))
        .await;
    common::eventually("the agent's device is known", || async {
        server.device("bench-psu").await.is_some()
    })
    .await;

    let (status, body) = server.remove("bench-psu", Some(&operator)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("is connected"), "{error}");
    assert!(server.device("bench-psu").await.is_some());

    drop(agent);
    common::eventually("the device is offline", || async {
        server
            .device("bench-psu")
            .await
            .is_some_and(|d| d["online"] == json!(false))
    })
    .await;
    let (status, body) = server.remove("bench-psu", Some(&operator)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.device("bench-psu").await, None);
}
