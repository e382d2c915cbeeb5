#![cfg(feature = "ssr")]
//! Fan-out: many subscribers, subscribers that never read, and subscribers
//! that go away.

mod common;

use common::{RawSse, Server, SseRecord, eventually, full_status, full_update, within};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::{Barrier, watch};
use tokio::task::JoinSet;

/// What a subscriber should see for one posted change.
#[derive(Clone, Debug, PartialEq)]
struct Expected {
    id: u64,
    data: Value,
}

fn observed(record: &SseRecord) -> Expected {
    assert!(
        record.is_status(),
        "expected a status event, got {record:?}"
    );
    let mut data = record.json();
    // The time is the server's; everything else is what was posted.
    assert!(
        data["updated_at"].is_string(),
        "updated_at missing: {record:?}"
    );
    data.as_object_mut().unwrap().remove("updated_at");
    Expected {
        id: record.id(),
        data,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_subscribers_each_get_every_event_once_in_order() {
    const SUBSCRIBERS: usize = 100;
    const EVENTS: u32 = 8;
    // Each subscriber holds a socket here and one in the server.
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("the open-file limit");
    assert!(
        limit >= 2 * SUBSCRIBERS as u64 + 64,
        "open-file limit {limit}"
    );

    let server = Arc::new(Server::start().await);
    let ready = Arc::new(Barrier::new(SUBSCRIBERS + 1));
    let mut subscribers = JoinSet::new();
    for _ in 0..SUBSCRIBERS {
        let server = server.clone();
        let ready = ready.clone();
        subscribers.spawn(async move {
            let mut stream = server.sse("").await;
            let snapshot = stream.expect_start().await;
            assert_eq!(snapshot.data["devices"], json!([]));
            ready.wait().await;
            let mut seen = Vec::new();
            for _ in 0..EVENTS {
                seen.push(observed(&stream.next().await));
            }
            (snapshot.id, seen)
        });
    }
    within("all subscribers to be ready", ready.wait()).await;
    assert_eq!(server.subscribers().await, SUBSCRIBERS as u64);

    // Two devices, alternating, every field changing each time.
    let mut expected = Vec::new();
    for i in 0..EVENTS {
        let device = format!("rack-{}", i % 2);
        let name = format!("Rack {}", i % 2);
        let posted = server.post_status(&device, &full_update(&name, i)).await;
        assert!(posted.changed);
        expected.push(Expected {
            id: posted.id,
            data: json!({ "device": device, "name": name, "status": full_status(i) }),
        });
    }
    assert!(
        expected.windows(2).all(|w| w[0].id < w[1].id),
        "POST ids must grow: {expected:?}"
    );

    let mut finished = 0;
    while let Some(result) = within("a subscriber to finish", subscribers.join_next()).await {
        let (snapshot_id, seen) = result.expect("a subscriber task");
        assert!(snapshot_id < expected[0].id);
        assert_eq!(seen, expected, "a subscriber saw another sequence");
        finished += 1;
    }
    assert_eq!(finished, SUBSCRIBERS);

    // The last event of each device is its current state, time included.
    for device in ["rack-0", "rack-1"] {
        let current = server.device(device).await.expect("the device exists");
        let last = expected
            .iter()
            .rev()
            .find(|e| e.data["device"] == device)
            .unwrap();
        assert_eq!(current["name"], last.data["name"]);
        assert_eq!(current["status"], last.data["status"]);
    }
}

/// Reads a raw stream until it has caught up with `last_id`, checking that it
/// never skips an event silently: after its first snapshot, each status event
/// follows the one before, and a gap is only ever bridged by a new snapshot.
/// Returns how many snapshots it saw after the first.
async fn read_until_caught_up(client: &mut RawSse, last_id: u64) -> usize {
    assert!(
        client.next().await.retry.is_some(),
        "a stream opens with retry"
    );
    let first = client.next().await;
    assert!(first.is_snapshot(), "expected a snapshot, got {first:?}");
    let mut at = first.id();
    let mut resyncs = 0;
    while at < last_id {
        let record = client.next().await;
        if record.is_snapshot() {
            assert!(
                record.id() > at,
                "a resync snapshot goes forward: {record:?}"
            );
            resyncs += 1;
        } else {
            assert!(record.is_status(), "unexpected record {record:?}");
            assert_eq!(record.id(), at + 1, "an event was skipped or repeated");
        }
        at = record.id();
    }
    assert_eq!(at, last_id, "the stream went past the last event");
    resyncs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_do_not_hold_back_others() {
    const STALLED: usize = 16;
    // About 2.6 KB per event, 6 MB in all: more than a stalled connection can
    // hold (a loopback socket buffers up to tcp_wmem's 4 MiB, hyper ~400 KB).
    const EVENTS: u32 = 2400;
    // The reader may trail the publisher by this many events; well inside the queue.
    const WINDOW: u32 = 4;
    // No stale mark after the last post, however long a slow machine takes.
    let args = [
        "--client-queue",
        "16",
        "--heartbeat",
        "1h",
        "--stale-after",
        "1h",
    ];
    let server = Server::start_with(&args).await;

    // The largest status an update may carry: 32 metrics with 64-character names.
    let metrics = |i: u32| -> Value {
        (0..32)
            .map(|m| {
                (
                    format!("metric_{m:02}_{}", "x".repeat(54)),
                    json!(f64::from(i) + f64::from(m) / 64.0),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    server
        .post_status("busy", &json!({ "name": "Busy", "metrics": metrics(0) }))
        .await;

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(RawSse::connect(server.addr, "/api/events").await);
    }
    let mut reader = server.sse("").await;
    reader.expect_start().await;
    eventually("every client to be subscribed", || async {
        server.subscribers().await == STALLED as u64 + 1
    })
    .await;

    let (progress_tx, mut progress) = watch::channel(0u32);
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        for i in 1..=EVENTS {
            let record = reader.next().await;
            assert!(
                record.is_status(),
                "expected a status event, got {record:?}"
            );
            seen.push((record.id(), record.json()));
            progress_tx.send_replace(i);
        }
        (reader, seen)
    });

    let mut posted = Vec::new();
    for i in 1..=EVENTS {
        within(
            "the reader to keep up",
            progress.wait_for(|&seen| seen + WINDOW >= i),
        )
        .await
        .expect("the reader is alive");
        let answer = server
            .post_status("busy", &json!({ "metrics": metrics(i) }))
            .await;
        assert!(answer.changed);
        posted.push(answer.id);
    }

    let (reader, seen) = within("the reader to finish", reading)
        .await
        .expect("the reader task");
    let ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids, posted,
        "the reader missed, repeated or reordered events"
    );
    for (i, (_, data)) in (1..).zip(&seen) {
        assert_eq!(data["status"]["metrics"], metrics(i), "event {i} data");
    }
    let last_id = *posted.last().unwrap();

    // The stalled clients fell behind; once they read again, each one is
    // resynchronised with a snapshot rather than left with a silent gap.
    let half = STALLED / 2;
    for (n, client) in stalled.iter_mut().take(half).enumerate() {
        let resyncs = read_until_caught_up(client, last_id).await;
        assert!(resyncs >= 1, "stalled client {n} was never resynchronised");
    }
    // All of them, read or not, are released when they go away.
    drop(stalled);
    drop(reader);
    eventually("every subscriber to be released", || async {
        server.subscribers().await == 0
    })
    .await;
    // And the server still takes changes.
    let after = server.post_status("busy", &json!({ "name": "Done" })).await;
    assert_eq!(after.id, last_id + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_are_released() {
    const CLIENTS: usize = 20;
    // No heartbeat during the test: release must not wait for one.
    let server = Server::start_with(&["--heartbeat", "1h"]).await;
    server
        .post_status("a", &json!({ "temperature": 1.5 }))
        .await;
    assert_eq!(server.subscribers().await, 0);

    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = server.sse("").await;
        stream.expect_start().await;
        streams.push(stream);
    }
    let mut filtered = server.sse("?device=a").await;
    filtered.expect_start().await;
    assert_eq!(server.subscribers().await, CLIENTS as u64 + 1);
    assert_eq!(server.healthz().await["status"], "ok");

    drop(streams);
    eventually("the dropped clients to be released", || async {
        server.subscribers().await == 1
    })
    .await;
    // The one still connected is unaffected.
    let posted = server
        .post_status("a", &json!({ "temperature": 2.5 }))
        .await;
    assert_eq!(filtered.expect_status().await.id(), posted.id);

    drop(filtered);
    eventually("the last client to be released", || async {
        server.subscribers().await == 0
    })
    .await;
}
