//! `GET /api/events`: one Server-Sent Events stream for all (or some) devices.
//!
//! The stream opens with a `retry:` line, then either a `snapshot` event or
//! the replay of exactly the events the client missed (`Last-Event-ID` header
//! or `?last_event_id=`), then every change as a `status` event. A client
//! that falls too far behind gets a fresh snapshot instead of a silent gap.

use super::AppState;
use super::error::ApiError;
use super::hub::{Filter, Hub, Start, Subscription};
use crate::model::{DeviceId, EventId, Health, Snapshot};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How long a browser waits before reconnecting a dropped stream.
const RETRY: Duration = Duration::from_secs(1);

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
    let subscription = state.hub.subscribe(last_seen, &filter);
    let stream = stream(state.hub.clone(), subscription, filter)
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok((
        [(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        )],
        Sse::new(stream).keep_alive(KeepAlive::new().interval(state.heartbeat)),
    ))
}

fn stream(
    hub: Arc<Hub>,
    subscription: Subscription,
    filter: Filter,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        yield Ok(Event::default().retry(RETRY));
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
            }
            // Live events until this client lags behind or the hub goes away.
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    Ok(()) = health.changed() => {
                        let degraded = health.borrow_and_update().clone();
                        yield Ok(health_event(degraded));
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
                    Err(RecvError::Closed) => return,
                }
            }
            Subscription { start, events } = hub.subscribe(None, &filter);
        }
    }
}

fn health_event(degraded: Option<String>) -> Event {
    let health = Health { degraded };
    Event::default()
        .event("health")
        .data(serde_json::to_string(&health).expect("health serializes"))
}

pub fn snapshot_event(snapshot: &Snapshot) -> Event {
    Event::default()
        .event("snapshot")
        .id(snapshot.event_id.to_string())
        .data(serde_json::to_string(snapshot).expect("a snapshot always serializes"))
}
