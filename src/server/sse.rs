//! `GET /api/events`: one Server-Sent Events stream for all (or some) devices.
//!
//! The stream opens with a `retry:` line, then either a `snapshot` event or
//! the replay of exactly the events the client missed (`Last-Event-ID` header
//! or `?last_event_id=`), then every change as a `status` event. A client
//! that falls too far behind gets a fresh snapshot instead of a silent gap.
//!
//! Frames are written out here rather than with axum's `Sse`: a status
//! frame is made once, as `Bytes`, and every client's body sends that same
//! buffer (an axum `Event` is copied for each client it is cloned for), and
//! the heartbeat is a fixed interval, not a timer moved at every event.

use super::AppState;
use super::error::ApiError;
use super::hub::{Filter, Hub, Start, Subscription};
use crate::model::{DeviceId, EventId, Health, Ping, Snapshot};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};

/// How long a browser waits before reconnecting a dropped stream (1 s).
const RETRY: &[u8] = b"retry: 1000\n\n";

/// One SSE frame: `event: kind`, `id: id` when given, and `data` (one line
/// of JSON: serde_json writes no raw newline).
pub fn frame(kind: &str, id: Option<EventId>, data: &str) -> Bytes {
    debug_assert!(!data.contains(['\n', '\r']), "SSE data on one line");
    let mut frame = String::with_capacity(data.len() + 48);
    let _ = writeln!(frame, "event: {kind}");
    if let Some(id) = id {
        let _ = writeln!(frame, "id: {id}");
    }
    let _ = write!(frame, "data: {data}\n\n");
    frame.into()
}

pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<impl IntoResponse, ApiError> {
    let mut devices = Vec::new();
    let mut last_seen = None;
    for (key, value) in &params {
        match key.as_str() {
            "device" => {
                devices.push(DeviceId::parse(value).map_err(|e| ApiError::invalid("device", e))?)
            }
            "last_event_id" => last_seen = value.parse::<EventId>().ok(),
            _ => {}
        }
    }
    // The browser's own reconnect sends the header; it wins over the query.
    if let Some(header) = headers.get("last-event-id") {
        last_seen = header.to_str().ok().and_then(|v| v.trim().parse().ok());
    }
    let filter = Filter::new(devices);
    // May read the store (a long absence): off the async workers' backs.
    let subscription = tokio::task::block_in_place(|| state.hub.subscribe(last_seen, &filter));
    let stream = stream(state.hub.clone(), subscription, filter, state.heartbeat)
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(stream),
    ))
}

fn stream(
    hub: Arc<Hub>,
    subscription: Subscription,
    filter: Filter,
    heartbeat: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    async_stream::stream! {
        yield Ok(Bytes::from_static(RETRY));
        let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut health = hub.health();
        let degraded = health.borrow_and_update().clone();
        if degraded.is_some() {
            yield Ok(health_event(degraded));
        }
        let Subscription { mut start, mut events } = subscription;
        loop {
            match start {
                Start::Snapshot(snapshot) => yield Ok(snapshot_event(&snapshot)),
                Start::Replay(missed) => {
                    for event in missed {
                        yield Ok(event.sse.clone());
                    }
                }
                Start::Stored { mut after, upto } => {
                    while after < upto {
                        let page = tokio::task::block_in_place(|| hub.replay_page(after, upto));
                        let Some(page) = page else { break };
                        for event in page {
                            after = event.id;
                            if filter.matches(&event.device) {
                                yield Ok(frame("status", Some(event.id), &event.json));
                            }
                        }
                        // Alive, though a filter may let none of a page by.
                        yield Ok(ping_event(heartbeat));
                    }
                    if after < upto {
                        // The store no longer holds them all: a snapshot.
                        Subscription { start, events } =
                            tokio::task::block_in_place(|| hub.subscribe(None, &filter));
                        continue;
                    }
                }
            }
            // The page learns the interval, and the server's time, at once.
            yield Ok(ping_event(heartbeat));
            // Live events until this client lags behind or the hub goes away.
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    Ok(()) = health.changed() => {
                        let degraded = health.borrow_and_update().clone();
                        yield Ok(health_event(degraded));
                        continue;
                    }
                    _ = beat.tick() => {
                        yield Ok(ping_event(heartbeat));
                        continue;
                    }
                };
                match received {
                    Ok(event) if filter.matches(&event.device) => yield Ok(event.sse.clone()),
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "slow SSE client resynchronised with a snapshot");
                        break;
                    }
                    // The hub replaced its channel (cluster mode: it took
                    // over the cluster's state): start again from that.
                    Err(RecvError::Closed) => break,
                }
            }
            Subscription { start, events } =
                tokio::task::block_in_place(|| hub.subscribe(None, &filter));
        }
    }
}

/// The heartbeat, as an event rather than a comment (which a browser never
/// hands to the page): keeps proxies from closing a quiet stream, tells the
/// page the stream is alive (one silent for several heartbeats is not, and
/// the page opens another), and carries the server's time (milliseconds
/// since the epoch) and the interval.
fn ping_event(every: Duration) -> Bytes {
    let ping = Ping {
        now: chrono::Utc::now().timestamp_millis(),
        every: every.as_millis().try_into().unwrap_or(u64::MAX),
    };
    frame(
        "ping",
        None,
        &serde_json::to_string(&ping).expect("a ping serializes"),
    )
}

fn health_event(degraded: Option<String>) -> Bytes {
    let health = Health { degraded };
    let json = serde_json::to_string(&health).expect("health serializes");
    frame("health", None, &json)
}

pub fn snapshot_event(snapshot: &Snapshot) -> Bytes {
    let json = serde_json::to_string(snapshot).expect("a snapshot always serializes");
    frame("snapshot", Some(snapshot.event_id), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_its_lines_then_a_blank_one() {
        assert_eq!(
            frame("status", Some(7), r#"{"a":"b\nc"}"#),
            "event: status\nid: 7\ndata: {\"a\":\"b\\nc\"}\n\n"
        );
        assert_eq!(frame("health", None, "{}"), "event: health\ndata: {}\n\n");
        // serde_json keeps any text on one line.
        let json = serde_json::to_string("two\nlines\r").unwrap();
        assert!(!json.contains(['\n', '\r']));
    }
}
