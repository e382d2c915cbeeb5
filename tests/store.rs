#![cfg(feature = "ssr")]
//! The store: nothing acknowledged is lost to a kill -9, event ids go on
//! upward after a restart, and SSE and WebSocket clients resume across it.

mod common;

use common::{Server, SseStream};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn start_on(dir: &tempfile::TempDir) -> Server {
    let path = dir.path().to_str().expect("a UTF-8 temp path");
    Server::start_with(&["--data-dir", path]).await
}

/// Reads status events until (and including) event `upto`; returns them.
async fn read_until(stream: &mut SseStream, upto: u64) -> Vec<(u64, Value)> {
    let mut events = Vec::new();
    loop {
        let record = stream.expect_status().await;
        let id = record.id();
        events.push((id, record.json()));
        if id >= upto {
            return events;
        }
    }
}

/// Proves nothing else is queued on `stream`: the next event is one made now.
async fn expect_nothing_more(server: &Server, stream: &mut SseStream) {
    let posted = server
        .post_status("sentinel", &json!({ "power_on": true }))
        .await;
    let record = stream.expect_status().await;
    assert_eq!(record.id(), posted.id, "an unexpected event: {record:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_a_burst_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_on(&dir).await;
    let url = server.base_url.clone();

    // Eight devices, each posting rising temperatures one after another, all
    // at once; each keeps what was answered 200.
    // They stop sending new requests once the kill is on its way, so none
    // reaches the restarted server; those in flight are cut by the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for d in 0..8 {
        let client = reqwest::Client::new();
        let stop = stop.clone();
        let (url, token) = (url.clone(), server.token.clone());
        tasks.push(tokio::spawn(async move {
            let device = format!("burst-{d}");
            let mut acked = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let answer = client
                    .post(format!("{url}/api/devices/{device}/status"))
                    .bearer_auth(&token)
                    .json(&json!({ "temperature": f64::from(i) }))
                    .send()
                    .await;
                let Ok(response) = answer else { break };
                if response.status() != 200 {
                    break;
                }
                let Ok(body) = response.json::<Value>().await else {
                    break;
                };
                acked.push((body["id"].as_u64().unwrap(), i));
            }
            (device, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    server.restart().await; // SIGKILL, then start on the same directory
    let mut acked: BTreeMap<String, Vec<(u64, i32)>> = BTreeMap::new();
    for task in tasks {
        let (device, ids) = task.await.unwrap();
        acked.insert(device, ids);
    }
    let all: BTreeMap<u64, (String, i32)> = acked
        .iter()
        .flat_map(|(d, ids)| ids.iter().map(move |&(id, t)| (id, (d.clone(), t))))
        .collect();
    assert!(
        all.len() >= 8,
        "too few updates were acknowledged: {acked:?}"
    );
    let (&oldest, _) = all.first_key_value().unwrap();
    let (&newest, _) = all.last_key_value().unwrap();

    // Each device is at its last acknowledged value, or at the one after it
    // if that one was stored but its answer was lost to the kill.
    for (device, ids) in &acked {
        let Some(&(_, last)) = ids.last() else {
            continue;
        };
        let state = server.device(device).await.expect("a stored device");
        let t = state["status"]["temperature"].as_f64().unwrap();
        assert!(
            t == f64::from(last) || t == f64::from(last + 1),
            "{device} is at {t}, its last acknowledged value was {last}"
        );
    }

    // Every acknowledged event is replayed, in order, with no gap.
    let current = server.healthz().await["event_id"].as_u64().unwrap();
    assert!(
        current >= newest,
        "the event id went back: {current} < {newest}"
    );
    let mut stream = server
        .sse_with("", &[("last-event-id", &(oldest - 1).to_string())])
        .await;
    stream.expect_retry().await;
    let replayed = read_until(&mut stream, current).await;
    let ids: Vec<u64> = replayed.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (oldest..=current).collect::<Vec<_>>());
    for (id, event) in &replayed {
        if let Some((device, t)) = all.get(id) {
            assert_eq!(event["device"], *device, "event {id}");
            assert_eq!(event["status"]["temperature"], json!(f64::from(*t)));
        }
    }

    // Ids go on upward, never reused.
    let next = server
        .post_status("after", &json!({ "power_on": true }))
        .await;
    assert_eq!(next.id, current + 1);
    let record = stream.expect_status().await;
    assert_eq!(record.id(), next.id);
}

/// Posts temperatures `from..from+n` to `device`; returns their ids.
async fn post_changes(server: &Server, device: &str, from: u32, n: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let t = f64::from(i) + 0.5;
        ids.push(
            server
                .post_status(device, &json!({ "temperature": t }))
                .await
                .id,
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_websocket_clients_resume_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_on(&dir).await;
    let first = post_changes(&server, "a", 0, 2).await;
    let seen = *first.last().unwrap();
    // Missed before the restart, and after it.
    let mut missed = post_changes(&server, "a", 2, 3).await;
    server.restart().await;
    missed.extend(post_changes(&server, "b", 5, 2).await);
    assert_eq!(missed, (seen + 1..=seen + 5).collect::<Vec<_>>());

    // SSE, with the header the browser sends on its own.
    let mut stream = server
        .sse_with("", &[("last-event-id", &seen.to_string())])
        .await;
    stream.expect_retry().await;
    for (i, &id) in missed.iter().enumerate() {
        let record = stream.expect_status().await;
        assert_eq!(record.id(), id, "replayed out of order or with a gap");
        let t = f64::from(i as u32 + 2) + 0.5;
        assert_eq!(record.json()["status"]["temperature"], json!(t));
    }
    expect_nothing_more(&server, &mut stream).await;
    let sentinel = stream_last_id(&server).await;

    // WebSocket, subscribing with the same id.
    let mut viewer = server.viewer().await;
    viewer
        .send(&json!({ "type": "subscribe", "last_event_id": seen }))
        .await;
    for &id in &missed {
        let status = viewer.expect("status").await;
        assert_eq!(status["id"], id);
    }
    let status = viewer.expect("status").await;
    assert_eq!(status["id"], sentinel, "the sentinel, then nothing else");
    let live = server.post_status("c", &json!({ "power_on": true })).await;
    assert_eq!(viewer.expect("status").await["id"], live.id);

    // Older than anything stored: a snapshot of the stored state.
    let mut old = server.sse("?last_event_id=1").await;
    let snapshot = old.expect_start().await;
    assert_eq!(snapshot.id, live.id);
    assert_eq!(snapshot.data["devices"].as_array().unwrap().len(), 4);
}

async fn stream_last_id(server: &Server) -> u64 {
    server.healthz().await["event_id"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_keeps_nothing() {
    let mut server = Server::start().await;
    let before = server.post_status("a", &json!({ "power_on": true })).await;
    server.restart().await;
    assert_eq!(server.device("a").await, None);
    // Ids still never repeat: they start from the clock.
    assert!(stream_last_id(&server).await > before.id);
}
