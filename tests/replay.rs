#![cfg(feature = "ssr")]
//! Reconnecting with the last event id seen: replay from the ring or the
//! store, or a snapshot when neither can tell what was missed.

mod common;

use common::{Server, SseStream};
use serde_json::json;

/// Connects, reads the snapshot and disconnects; returns the snapshot's id.
async fn last_seen(server: &Server) -> u64 {
    let mut stream = server.sse("").await;
    stream.expect_start().await.id
}

/// Posts `n` temperature changes to `device`; returns their ids.
async fn post_changes(server: &Server, device: &str, from: u32, n: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let posted = server
            .post_status(device, &json!({ "temperature": f64::from(i) + 0.5 }))
            .await;
        assert!(posted.changed);
        ids.push(posted.id);
    }
    ids
}

/// Reads `ids.len()` status events and checks they are exactly `ids`, with
/// the temperatures posted by [`post_changes`] from `from` on.
async fn expect_events(stream: &mut SseStream, device: &str, from: u32, ids: &[u64]) {
    for (i, &id) in (from..).zip(ids) {
        let record = stream.expect_status().await;
        assert_eq!(record.id(), id, "replayed out of order or with a gap");
        let data = record.json();
        assert_eq!(data["device"], device);
        assert_eq!(data["status"]["temperature"], json!(f64::from(i) + 0.5));
    }
}

/// Proves nothing else is queued: the next thing after the events read so
/// far is a change posted now.
async fn expect_nothing_more(server: &Server, stream: &mut SseStream) {
    let posted = server
        .post_status("sentinel", &json!({ "power_on": true }))
        .await;
    let record = stream.expect_status().await;
    assert_eq!(record.id(), posted.id, "an unexpected event: {record:?}");
    assert_eq!(record.json()["device"], "sentinel");
}

/// A server whose device `a` changed once (what a client saw, `seen`),
/// then three times more (what it missed).
async fn seen_then_missed() -> (Server, u64, Vec<u64>) {
    let server = Server::start().await;
    server
        .post_status("a", &json!({ "temperature": 0.5 }))
        .await;
    let seen = last_seen(&server).await;
    let missed = post_changes(&server, "a", 1, 3).await;
    (server, seen, missed)
}

/// A resumed stream holds exactly `missed`, then live events.
async fn expect_exactly(server: &Server, stream: &mut SseStream, missed: &[u64]) {
    stream.expect_retry().await;
    expect_events(stream, "a", 1, missed).await;
    expect_nothing_more(server, stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_header_replays_exactly_the_missed_events() {
    let (server, seen, missed) = seen_then_missed().await;
    assert_eq!(missed[0], seen + 1);
    let mut stream = server
        .sse_with("", &[("last-event-id", &seen.to_string())])
        .await;
    expect_exactly(&server, &mut stream, &missed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_query_replays_exactly_the_missed_events() {
    let (server, seen, missed) = seen_then_missed().await;
    let mut stream = server.sse(&format!("?last_event_id={seen}")).await;
    expect_exactly(&server, &mut stream, &missed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_wins_over_the_query() {
    let (server, seen, missed) = seen_then_missed().await;
    // The query asks for everything after the first missed event; the header
    // (what a browser sends on its own reconnect) asks for all three.
    let mut stream = server
        .sse_with(
            &format!("?last_event_id={}", missed[0]),
            &[("Last-Event-ID", &seen.to_string())],
        )
        .await;
    expect_exactly(&server, &mut stream, &missed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_to_date_id_gets_no_snapshot_and_no_replay_only_live_events() {
    let server = Server::start().await;
    server
        .post_status("a", &json!({ "temperature": 0.5 }))
        .await;
    let seen = last_seen(&server).await;

    let mut stream = server
        .sse_with("", &[("last-event-id", &seen.to_string())])
        .await;
    stream.expect_retry().await;
    let live = post_changes(&server, "a", 1, 2).await;
    expect_events(&mut stream, "a", 1, &live).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_respects_the_device_filter() {
    let server = Server::start().await;
    server
        .post_status("a", &json!({ "temperature": 0.5 }))
        .await;
    server
        .post_status("b", &json!({ "temperature": 0.5 }))
        .await;
    let seen = last_seen(&server).await;
    let mut a_ids = Vec::new();
    for i in 1..=3 {
        server
            .post_status("b", &json!({ "temperature": f64::from(i) + 0.5 }))
            .await;
        a_ids.extend(post_changes(&server, "a", i, 1).await);
    }

    let mut stream = server
        .sse_with("?device=a", &[("last-event-id", &seen.to_string())])
        .await;
    stream.expect_retry().await;
    expect_events(&mut stream, "a", 1, &a_ids).await;
    let next = post_changes(&server, "a", 4, 1).await;
    expect_events(&mut stream, "a", 4, &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_anything_stored_gets_a_snapshot_then_live_events() {
    let server = Server::start_with(&["--replay-capacity", "3"]).await;
    server
        .post_status("a", &json!({ "temperature": 0.5 }))
        .await;
    let seen = last_seen(&server).await;
    let ids = post_changes(&server, "a", 1, 5).await;
    let last = *ids.last().unwrap();

    // `--memory` has a (temporary) store: only ids before its first event
    // are too old.
    let mut current = last;
    for (n, too_old) in (100..).zip([seen - 2, seen - 3]) {
        let mut stream = server
            .sse_with("", &[("last-event-id", &too_old.to_string())])
            .await;
        let snapshot = stream.expect_start().await;
        assert_eq!(snapshot.id, current, "the snapshot is the current state");
        assert_eq!(snapshot.data["event_id"], current);
        assert_eq!(snapshot.device_ids(), ["a"]);
        let temperature = if n == 100 { 5.5 } else { 100.5 };
        assert_eq!(
            snapshot.device("a").unwrap()["status"]["temperature"],
            json!(temperature)
        );
        let live = post_changes(&server, "a", n, 1).await;
        expect_events(&mut stream, "a", n, &live).await;
        current = live[0];
    }

    // Older than the ring but stored: replayed from the store.
    let mut stream = server
        .sse_with("", &[("last-event-id", &seen.to_string())])
        .await;
    stream.expect_retry().await;
    for id in seen + 1..=current {
        assert_eq!(stream.expect_status().await.id(), id);
    }
    drop(stream);

    // The ring still holds the last three events: those are replayed.
    let (_, last) = server.get_json("/api/devices").await;
    let last = last["event_id"].as_u64().unwrap();
    let mut stream = server
        .sse_with("", &[("last-event-id", &(last - 3).to_string())])
        .await;
    stream.expect_retry().await;
    for id in last - 2..=last {
        assert_eq!(stream.expect_status().await.id(), id);
    }
    expect_nothing_more(&server, &mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_unreadable_id_gets_a_snapshot() {
    let server = Server::start().await;
    server
        .post_status("a", &json!({ "temperature": 0.5 }))
        .await;
    post_changes(&server, "a", 1, 2).await;
    let (_, list) = server.get_json("/api/devices").await;
    let current = list["event_id"].as_u64().unwrap();

    let future = (current + 1000).to_string();
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        // From the future: no such event yet.
        (String::new(), vec![("last-event-id", &future)]),
        (format!("?last_event_id={future}"), vec![]),
        // From long ago (an earlier run of the server).
        (String::new(), vec![("last-event-id", "1")]),
        ("?last_event_id=0".into(), vec![]),
        // Not an id at all.
        (String::new(), vec![("last-event-id", "yesterday")]),
        ("?last_event_id=-5".into(), vec![]),
        ("?last_event_id=99999999999999999999999".into(), vec![]),
    ];
    let mut current = current;
    for ((query, headers), n) in cases.into_iter().zip(50..) {
        let mut stream = server.sse_with(&query, &headers).await;
        let snapshot = stream.expect_start().await;
        assert_eq!(snapshot.id, current, "case {query} {headers:?}");
        assert_eq!(snapshot.device_ids(), ["a"]);
        let live = post_changes(&server, "a", n, 1).await;
        expect_events(&mut stream, "a", n, &live).await;
        current = live[0];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_replayed_whole_in_order_over_sse_and_websocket() {
    // More than the store replays a page at a time (1,000 events): the
    // client gets them all, then live events, nothing twice.
    // No stale mark of the silent devices, however long a slow machine takes.
    let server = Server::start_with(&["--replay-capacity", "3", "--stale-after", "1h"]).await;
    let seen = server
        .post_status("x", &json!({ "power_on": true }))
        .await
        .id;
    for round in 0..25 {
        let batch: serde_json::Map<String, serde_json::Value> = (0..100)
            .map(|i| {
                let t = f64::from(round * 100 + i) + 0.5;
                (format!("d{i:02}"), json!({ "temperature": t }))
            })
            .collect();
        let response = server
            .client
            .post(server.url("/api/status"))
            .bearer_auth(&server.token)
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let upto = seen + 2_500;

    let mut stream = server
        .sse_with("", &[("last-event-id", &seen.to_string())])
        .await;
    stream.expect_retry().await;
    for id in seen + 1..=upto {
        let record = stream.expect_status().await;
        assert_eq!(record.id(), id, "replayed out of order or with a gap");
        let n = id - seen - 1;
        assert_eq!(record.json()["device"], format!("d{:02}", n % 100));
        assert_eq!(
            record.json()["status"]["temperature"],
            json!(n as f64 + 0.5)
        );
    }
    // A ping after each page read (pages of 1,000), then one after the
    // replay: a page a filter lets nothing through is no silence.
    assert!(stream.pings() >= 2, "{} pings", stream.pings());
    expect_nothing_more(&server, &mut stream).await;

    let mut viewer = server.viewer().await;
    viewer
        .send(&json!({"type": "subscribe", "last_event_id": seen, "devices": ["d07"]}))
        .await;
    for n in (7..2_500).step_by(100) {
        let status = viewer.expect("status").await;
        assert_eq!(status["id"], seen + 1 + n);
        assert_eq!(status["data"]["device"], "d07");
    }
    let live = server
        .post_status("d07", &json!({ "power_on": true }))
        .await;
    assert_eq!(viewer.expect("status").await["id"], live.id);
}
