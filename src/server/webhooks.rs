//! Webhooks (`--webhook URL`): every change the store records (power, link,
//! staleness, alerts, name; see [`Change`](crate::model::Change)) is POSTed
//! to each URL, oldest first, a batch at a time:
//!
//! ```json
//! {"text": "Lab freezer: Power off",
//!  "changes": [{"id": 41, "device": "freezer", "name": "Lab freezer",
//!               "at": "2026-12-01T03:52:15.120Z", "kind": "power", "on": false}]}
//! ```
//!
//! (`text`, a line per change, is what chat webhooks show.) The changes
//! table is the outbox: each URL's place in it is kept in the store, moved
//! on only by a 2xx answer, so a URL that is down, slow or refusing gets
//! the same batch again (after 1 s, then 2 s, … up to a minute) and a
//! restart goes on where it stopped. Nothing is skipped; a change comes
//! twice only when an answer was lost. A URL seen for the first time
//! starts with the changes made from then on.
//!
//! In a cluster on one store, the instances given webhooks take turns (see
//! [`take_turns`]), each reading the places the one before kept.

use super::cluster::{Broker, take_turns};
use super::db::{Arg, Conn, TxKind};
use super::history::changes_of;
use super::hub::{Filter, Hub};
use super::store::{Store, StoreError, WriteGate};
use crate::app::change_text;
use crate::model::{Changed, EventId};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Changes one request carries at most.
const BATCH: usize = 100;
/// How long a URL has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle delivery looks for changes it was not woken for.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failing URL.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A change as a webhook receives it: with its device's name.
#[derive(Serialize)]
struct Named<'a> {
    #[serde(flatten)]
    changed: &'a Changed,
    name: String,
}

#[derive(Serialize)]
struct Body<'a> {
    text: String,
    changes: Vec<Named<'a>>,
}

/// One URL's delivery: its place in the changes, on a connection of its own.
pub struct Webhook {
    url: reqwest::Url,
    /// The URL as logs show it: its origin only, as chat webhooks keep
    /// their secret in the path.
    shown: String,
    /// Its place's key in the `meta` table: the last event whose changes
    /// the URL took.
    key: String,
    conn: Mutex<Conn>,
    gate: WriteGate,
    client: reqwest::Client,
}

/// One delivery for each URL (each an http or https URL); `Err` says
/// which URL is unusable, and why, before anything is sent.
pub fn prepare(urls: &[String], store: &Store) -> Result<Vec<Webhook>, String> {
    urls.iter()
        .map(|url| Webhook::new(url, store).map_err(|e| format!("--webhook {url}: {e}")))
        .collect()
}

/// Starts each delivery, following `hub`'s events. With `lease` (a
/// cluster on one shared store), only while this instance holds the
/// webhooks' lease: the instances given them take turns, each going on
/// from the places the one before kept. The task ends after `shutdown`
/// (the lease given up).
pub fn start(
    webhooks: Vec<Webhook>,
    hub: &Arc<Hub>,
    lease: Option<Broker>,
    shutdown: &CancellationToken,
) -> Option<JoinHandle<()>> {
    if webhooks.is_empty() {
        return None;
    }
    let webhooks: Vec<Arc<Webhook>> = webhooks.into_iter().map(Arc::new).collect();
    let hub = hub.clone();
    let start = move |stop: CancellationToken| {
        let tasks: Vec<_> = webhooks
            .iter()
            .map(|w| tokio::spawn(w.clone().run(hub.clone(), stop.clone())))
            .collect();
        tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    };
    Some(match lease {
        None => start(shutdown.clone()),
        Some(lease) => tokio::spawn(take_turns(lease, "webhooks", shutdown.clone(), start)),
    })
}

impl Webhook {
    fn new(url: &str, store: &Store) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("not an http:// or https:// URL".into());
        }
        let mut client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("telltale/", env!("CARGO_PKG_VERSION")));
        if url.scheme() == "https" {
            let host = url.host_str().unwrap_or_default();
            client = client.use_preconfigured_tls((*crate::tls::client_config(host)?).clone());
        }
        let client = client.build().map_err(|e| e.to_string())?;
        let key = format!("webhook {url}");
        let shown = match url.path() {
            "/" if url.query().is_none() => url.origin().ascii_serialization(),
            _ => format!("{}/…", url.origin().ascii_serialization()),
        };
        let conn = store.connect().map_err(|e| e.to_string())?;
        let webhook = Self {
            url,
            shown,
            key,
            conn: Mutex::new(conn),
            gate: store.write_gate(),
            client,
        };
        // First seen: from the changes made from now on.
        if webhook.kept_place().map_err(|e| e.to_string())?.is_none() {
            let now = webhook
                .read_i64("SELECT MAX(id) FROM changes", &[])
                .map_err(|e| e.to_string())?;
            webhook
                .save_place(now.unwrap_or(0) as EventId)
                .map_err(|e| e.to_string())?;
        }
        Ok(webhook)
    }

    /// One integer (or none) that `sql` reads.
    fn read_i64(&self, sql: &str, args: &[Arg]) -> Result<Option<i64>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        Ok(conn
            .query_opt(sql, args)?
            .map(|r| r.opt_i64(0))
            .transpose()?
            .flatten())
    }

    /// The place kept in the store, if any.
    fn kept_place(&self) -> Result<Option<EventId>, StoreError> {
        let place = self.read_i64(
            "SELECT value FROM meta WHERE key = ?1",
            &[Arg::Str(&self.key)],
        )?;
        Ok(place.map(|p| p as EventId))
    }

    fn save_place(&self, id: EventId) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        conn.transaction(TxKind::Write, |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[Arg::Str(&self.key), Arg::I64(id as i64)],
            )?;
            Ok(())
        })
    }

    /// The changes after `place`, oldest first: whole events, [`BATCH`]
    /// changes or a little more.
    fn after(&self, place: EventId) -> Result<Vec<Changed>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let rows = conn.query(
            "SELECT id, device, ts, json FROM changes WHERE id > ?1 ORDER BY id LIMIT ?2",
            &[Arg::I64(place as i64), Arg::I64(BATCH as i64)],
        )?;
        let mut changes = changes_of(rows)?;
        // Whole events: cut after the event the BATCH-th change is of.
        if let Some(last) = changes.get(BATCH.saturating_sub(1)).map(|c| c.id) {
            changes.retain(|c| c.id <= last);
        }
        Ok(changes)
    }

    async fn run(self: Arc<Self>, hub: Arc<Hub>, shutdown: CancellationToken) {
        let this = self;
        let mut events = hub.subscribe(None, &Filter::default()).events;
        // Read here, not kept: another instance may have moved it.
        let mut backoff = Duration::from_secs(1);
        let mut place = loop {
            let reader = this.clone();
            match tokio::task::spawn_blocking(move || reader.kept_place()).await {
                Ok(Ok(place)) => break place.unwrap_or(0),
                Ok(Err(e)) => tracing::warn!("webhook {}: reading its place: {e}", this.shown),
                Err(e) => tracing::warn!("webhook {}: reading its place: {e}", this.shown),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        tracing::info!(
            "webhook {}: sending the changes recorded after event {place}",
            this.shown
        );
        backoff = Duration::from_secs(1);
        loop {
            match this.clone().deliver(&hub, place).await {
                // Level: wait for the next event (an instance records its
                // changes before it sends it), or a second at most: in a
                // cluster on one store, an event made elsewhere may arrive
                // before the store shows its changes.
                Ok(None) => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = events.recv() => if let Err(RecvError::Closed) = got {
                        // The hub took the cluster's state: a new channel.
                        events = hub.subscribe(None, &Filter::default()).events;
                    },
                    () = tokio::time::sleep(LOOK_AGAIN) => {}
                },
                Ok(Some(last)) => {
                    place = last;
                    if backoff > Duration::from_secs(1) {
                        tracing::info!("webhook {}: takes changes again", this.shown);
                    }
                    backoff = Duration::from_secs(1);
                }
                Err(why) => {
                    tracing::warn!("webhook {}: {why}; sent again in {backoff:?}", this.shown);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sends the changes after `place`, if any, and keeps the new place:
    /// `Ok(None)` when there were none, `Ok(Some(last))` once taken (a
    /// place that could not be kept is logged: a restart sends them again).
    async fn deliver(
        self: Arc<Self>,
        hub: &Hub,
        place: EventId,
    ) -> Result<Option<EventId>, String> {
        let this = self.clone();
        let changes = tokio::task::spawn_blocking(move || this.after(place))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading the changes: {e}"))?;
        let Some(last) = changes.last().map(|c| c.id) else {
            return Ok(None);
        };
        self.post(hub, &changes)
            .await
            .map_err(|why| format!("{why}; {} changes", changes.len()))?;
        let this = self.clone();
        let saved = tokio::task::spawn_blocking(move || this.save_place(last)).await;
        if let Some(e) = saved
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .err()
        {
            tracing::warn!("webhook {}: its place is not kept: {e}", self.shown);
        }
        Ok(Some(last))
    }

    /// Sends `changes`; `Err` says why the URL did not take them.
    async fn post(&self, hub: &Hub, changes: &[Changed]) -> Result<(), String> {
        let named: Vec<Named> = changes
            .iter()
            .map(|c| Named {
                changed: c,
                // A removed device's changes went with it; its name too.
                name: hub
                    .device(&c.device)
                    .map_or_else(|| c.device.to_string(), |d| d.name),
            })
            .collect();
        let text = named
            .iter()
            .map(|n| format!("{}: {}", n.name, change_text(&n.changed.change)))
            .collect::<Vec<_>>()
            .join("\n");
        let body = Body {
            text,
            changes: named,
        };
        let response = self
            .client
            .post(self.url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| match crate::tls::cause(&e) {
                Some(tls) => format!("no answer: {}", crate::tls::explain(tls)),
                None => format!("no answer ({})", error_chain(&e)),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let said = response.text().await.unwrap_or_default();
        let said: String = said.chars().take(200).collect();
        Err(format!("answered {status} {}", said.trim()))
    }
}

/// An error and its causes, in one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut words = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        words.push_str(": ");
        words.push_str(&cause.to_string());
        source = cause.source();
    }
    words
}
