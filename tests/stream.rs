#![cfg(feature = "ssr")]
//! `GET /api/events`: its headers, its opening, unbuffered delivery and the
//! device filter.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_opens_with_retry_then_a_snapshot_of_every_device() {
    let server = Server::start().await;
    let a = server
        .post_status("a", &json!({ "name": "Alpha", "temperature": 20.5 }))
        .await;
    let b = server.post_status("b", &json!({ "power_on": true })).await;
    let (_, list) = server.get_json("/api/devices").await;

    let mut stream = server.sse("").await;
    assert_eq!(stream.expect_retry().await, 1000);
    let snapshot = stream.expect_snapshot().await;
    assert_eq!(snapshot.id, b.id);
    assert!(a.id < b.id);
    assert_eq!(snapshot.data["event_id"], b.id);
    assert_eq!(snapshot.data["devices"], list["devices"]);
    assert_eq!(snapshot.device_ids(), ["a", "b"]);
    assert_eq!(snapshot.device("a").unwrap()["name"], "Alpha");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_not_held_back_when_the_client_accepts_gzip() {
    // No heartbeat during the test: nothing but the event can push it out.
    let server = Server::start_with(&["--heartbeat", "1h"]).await;
    server
        .post_status(
            "a",
            &json!({ "name": "A device with a name long enough to compress" }),
        )
        .await;

    // The other routes do compress for such a client.
    let listed = server
        .client
        .get(server.url("/api/devices"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    assert_eq!(listed.headers()["content-encoding"], "gzip");

    let mut stream = server.sse_with("", &[("accept-encoding", "gzip")]).await;
    let headers = &stream.headers;
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{headers:?}"
    );
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(
        headers.get("content-encoding").is_none(),
        "the stream must not be compressed: {headers:?}"
    );
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    stream.expect_start().await;

    // One event at a time, each delivered before the next is posted.
    for i in 0..3 {
        let posted = server
            .post_status("a", &json!({ "temperature": f64::from(i) + 0.5 }))
            .await;
        let record = stream.expect_status().await;
        assert_eq!(record.id(), posted.id);
        assert_eq!(
            record.json()["status"]["temperature"],
            json!(f64::from(i) + 0.5)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_stream_open_without_events() {
    let server = Server::start_with(&["--heartbeat", "100ms"]).await;
    let mut stream = server.sse("").await;
    let snapshot = stream.expect_start().await;
    // Pings arrive while nothing happens (one at the start, then one per
    // heartbeat), with the server's time and the interval.
    let before = chrono::Utc::now().timestamp_millis();
    let ping = stream.wait_for_pings(3).await;
    let after = chrono::Utc::now().timestamp_millis();
    assert_eq!(ping["every"], 100, "{ping}");
    let now = ping["now"].as_i64().unwrap();
    assert!(
        (before..=after).contains(&now),
        "{before} ≤ {now} ≤ {after}"
    );
    let posted = server
        .post_status("a", &json!({ "temperature": 1.5 }))
        .await;
    let record = stream.expect_status().await;
    assert_eq!(record.id(), posted.id);
    assert_eq!(posted.id, snapshot.id + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_filter_keeps_other_devices_out() {
    let server = Server::start().await;
    for device in ["a", "b", "c"] {
        server
            .post_status(device, &json!({ "temperature": 0.5 }))
            .await;
    }

    let mut only_a = server.sse("?device=a").await;
    let snapshot = only_a.expect_start().await;
    assert_eq!(snapshot.device_ids(), ["a"]);
    let mut a_and_c = server.sse("?device=a&device=c").await;
    let snapshot = a_and_c.expect_start().await;
    assert_eq!(snapshot.device_ids(), ["a", "c"]);
    let mut all = server.sse("").await;
    assert_eq!(all.expect_start().await.device_ids(), ["a", "b", "c"]);

    let mut posted = Vec::new();
    for (i, device) in ["b", "b", "c", "b", "a", "c", "a"].into_iter().enumerate() {
        let id = server
            .post_status(device, &json!({ "temperature": i as f64 + 1.5 }))
            .await
            .id;
        posted.push((device, id));
    }
    let expect = |wanted: &[&str]| -> Vec<(String, u64)> {
        posted
            .iter()
            .filter(|(d, _)| wanted.contains(d))
            .map(|(d, id)| (d.to_string(), *id))
            .collect()
    };
    for (stream, wanted) in [
        (&mut only_a, &["a"][..]),
        (&mut a_and_c, &["a", "c"][..]),
        (&mut all, &["a", "b", "c"][..]),
    ] {
        let expected = expect(wanted);
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let record = stream.expect_status().await;
            let data: Value = record.json();
            got.push((data["device"].as_str().unwrap().to_owned(), record.id()));
        }
        assert_eq!(got, expected, "filter {wanted:?}");
    }

    // After a burst for b alone, the next event on the a-stream is a's.
    for i in 0..5 {
        server
            .post_status("b", &json!({ "temperature": f64::from(i) + 50.5 }))
            .await;
    }
    let a = server.post_status("a", &json!({ "power_on": true })).await;
    let record = only_a.expect_status().await;
    assert_eq!(record.id(), a.id);
    assert_eq!(record.json()["device"], "a");

    // A device that does not exist yet may be watched: it shows up when it reports.
    let mut later = server.sse("?device=later").await;
    assert_eq!(later.expect_start().await.data["devices"], json!([]));
    server
        .post_status("b", &json!({ "temperature": 99.5 }))
        .await;
    let first = server.post_status("later", &json!({})).await;
    let record = later.expect_status().await;
    assert_eq!(record.id(), first.id);
    assert_eq!(record.json()["device"], "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_filter_id_is_refused() {
    let server = Server::start().await;
    let long = format!("?device={}", "x".repeat(65));
    for query in [
        "?device=Bad",
        "?device=",
        "?device=a%20b",
        "?device=a&device=no/slash",
        long.as_str(),
    ] {
        let response = server.open_sse(query, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}"
        );
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["field"], "device", "{query}: {body}");
        assert!(body["error"].is_string(), "{query}: {body}");
    }
    assert_eq!(server.subscribers().await, 0);
}
