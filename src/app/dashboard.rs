//! The dashboard: one card per device, an attention strip for the devices
//! whose readings are out of their limits, and the connection indicator.
//!
//! Each card owns a signal for its device (and one for its sparkline), so an
//! event re-renders only the card it concerns.
//!
//! With operator rights (an operator session cookie, known to the server when
//! it renders and carried into hydration with the snapshot) each card has a
//! power switch. The switch only ever shows the device's confirmed state, as
//! the status events report it; a click only makes it pending.

use super::changes::{ChangeList, Recent};
use super::chart::{self, HOUR_MS, Sparkline};
use super::live::{self, Connection, Feed, Follower};
use super::{api, device_href};
use crate::model::{
    Alert, Changed, Device, DeviceId, EventId, Point, Snapshot, Status, StatusEvent,
};
use leptos::prelude::*;
use leptos_meta::Title;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a card's sparkline shows: the last hour of one metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spark {
    /// See [`spark_metric`]; `None` for a device without any reading.
    pub metric: Option<String>,
    pub points: Vec<Point>,
}

/// The sparkline's window.
pub const SPARK_WINDOW_MS: i64 = HOUR_MS;

/// The sparkline's buckets, as the server renders them: a point a minute.
pub const SPARK_STEP_MS: i64 = 60_000;

/// The metric a card's sparkline shows: temperature, else humidity, else
/// the first extra metric.
pub fn spark_metric(status: &Status) -> Option<String> {
    if status.temperature.is_some() {
        Some("temperature".into())
    } else if status.humidity.is_some() {
        Some("humidity".into())
    } else {
        status.metrics.keys().next().cloned()
    }
}

/// A metric's current value by name (`temperature`, `humidity` or extra).
pub fn value_of(status: &Status, metric: &str) -> Option<f64> {
    match metric {
        "temperature" => status.temperature,
        "humidity" => status.humidity,
        other => status.metrics.get(other).copied(),
    }
}

impl Spark {
    /// Follows a device's new state: a changed value of the shown metric is
    /// a new point (at the device's `updated_at`, as the store records it),
    /// or the newest point's new value while that is younger than a
    /// bucket; points older than the window go. When the device now calls for
    /// another metric (it got a temperature, say) the line starts afresh.
    pub fn follow(&mut self, before: Option<&Device>, device: &Device) {
        let metric = spark_metric(&device.status);
        let mut before = before;
        if metric != self.metric {
            *self = Self {
                metric,
                points: Vec::new(),
            };
            before = None;
        }
        let Some(metric) = &self.metric else { return };
        let now = value_of(&device.status, metric);
        let was = before.and_then(|b| value_of(&b.status, metric));
        if let Some(v) = now
            && now != was
        {
            chart::append_coarse(
                &mut self.points,
                device.updated_at.timestamp_millis(),
                v,
                SPARK_WINDOW_MS,
                SPARK_STEP_MS,
            );
        }
    }
}

#[derive(Clone)]
pub struct Card {
    pub id: DeviceId,
    pub device: RwSignal<Device>,
    pub spark: RwSignal<Spark>,
}

impl Card {
    fn new(device: Device, spark: Spark) -> Self {
        Self {
            id: device.id.clone(),
            device: RwSignal::new(device),
            spark: RwSignal::new(spark),
        }
    }

    /// A new state for this card's device.
    fn set(&self, device: Device) {
        let before = self.device.get_untracked();
        self.spark.update(|s| s.follow(Some(&before), &device));
        self.device.set(device);
    }
}

/// A card for a device the page had not seen: its sparkline starts with
/// the current value.
fn new_card(device: Device) -> Card {
    let mut spark = Spark::default();
    spark.follow(None, &device);
    Card::new(device, spark)
}

/// Everything the page shows, as signals.
#[derive(Clone, Copy)]
pub struct Board {
    pub cards: RwSignal<Vec<Card>>,
    pub feed: Feed,
    /// Whether this page has operator rights (a live session cookie).
    pub operator: RwSignal<bool>,
    /// The page's code runs: until then its buttons are disabled (a click
    /// would do nothing, and the sign-in form would be sent as a plain form,
    /// reloading the page).
    pub hydrated: RwSignal<bool>,
    /// The page was opened with a viewer session (a dashboard closed by a
    /// viewer token): it may be ended here.
    pub viewer: bool,
    /// Every device's recent changes.
    pub changes: Recent,
}

// The server renders; only the browser applies events.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
impl Board {
    /// Reads each card's sparkline again from the server's history, a few
    /// cards at a time, keeping the points events added since.
    fn reload_sparks(&self) {
        #[cfg(feature = "hydrate")]
        {
            use futures::StreamExt;
            /// Requests at once: with the event stream, within the six
            /// connections a browser opens to one origin over HTTP/1.1.
            const AT_ONCE: usize = 4;
            let sparks: Vec<(String, String, RwSignal<Spark>)> =
                self.cards.with_untracked(|cards| {
                    cards
                        .iter()
                        .filter_map(|c| {
                            let metric = c.spark.with_untracked(|s| s.metric.clone())?;
                            Some((c.id.to_string(), metric, c.spark))
                        })
                        .collect()
                });
            let from = self.feed.now() - SPARK_WINDOW_MS;
            leptos::task::spawn_local(futures::stream::iter(sparks).for_each_concurrent(
                AT_ONCE,
                move |(id, metric, spark)| async move {
                    match api::history(&id, &metric, from, Some(SPARK_STEP_MS)).await {
                        // The card may be gone, or show another metric now.
                        Ok(history) => {
                            let _ = spark.try_update(|s| {
                                if s.metric.as_deref() == Some(metric.as_str()) {
                                    s.points = chart::reloaded(history, &s.points);
                                }
                            });
                        }
                        Err(e) => leptos::logging::warn!(
                            "the sparkline of {id} keeps what it has: {}",
                            e.message
                        ),
                    }
                },
            ));
        }
    }

    fn new(initial: Initial) -> Self {
        let Initial {
            snapshot,
            mut sparks,
            now_ms,
            operator,
            viewer,
            changes,
        } = initial;
        let cards = snapshot
            .devices
            .into_iter()
            .map(|d| {
                let spark = sparks.remove(&d.id).unwrap_or_default();
                Card::new(d, spark)
            })
            .collect();
        Self {
            cards: RwSignal::new(cards),
            feed: Feed::new(now_ms),
            operator: RwSignal::new(operator),
            hydrated: RwSignal::new(false),
            viewer,
            changes: Recent::new(changes, BOARD_CHANGES),
        }
    }

    /// Replaces every card's values; cards of vanished devices go away.
    pub fn apply_snapshot(&self, snapshot: Snapshot) {
        let old = self.cards.get_untracked();
        let cards: Vec<Card> = snapshot
            .devices
            .into_iter()
            .map(|d| match old.iter().find(|c| c.id == d.id) {
                Some(card) => {
                    card.set(d);
                    card.clone()
                }
                None => new_card(d),
            })
            .collect();
        let same_ids =
            cards.len() == old.len() && cards.iter().zip(&old).all(|(a, b)| a.id == b.id);
        if !same_ids {
            // Removed while the page was away: their changes go with them
            // (the list read again keeps those newer than what it read).
            for gone in old.iter().filter(|o| !cards.iter().any(|c| c.id == o.id)) {
                self.changes.forget(&gone.id);
            }
            self.cards.set(cards);
        }
    }

    /// Updates one card, adds it (in id order) for a new device, or drops
    /// it for a removed one; what event `id` changed heads the recent changes.
    pub fn apply_status(&self, id: EventId, event: StatusEvent) {
        if event.removed {
            self.changes.forget(&event.device);
            let known = self
                .cards
                .with_untracked(|cards| cards.iter().any(|c| c.id == event.device));
            if known {
                self.cards
                    .update(|cards| cards.retain(|c| c.id != event.device));
            }
            return;
        }
        let device = event.into_device();
        let existing = self
            .cards
            .with_untracked(|cards| cards.iter().find(|c| c.id == device.id).cloned());
        let before = existing.as_ref().map(|c| c.device.get_untracked());
        self.changes
            .follow(id, before.as_ref(), &device, self.feed.now());
        match existing {
            Some(card) => card.set(device),
            None => self.cards.update(|cards| {
                let at = cards.partition_point(|c| c.id < device.id);
                cards.insert(at, new_card(device));
            }),
        }
    }
}

impl Follower for Board {
    fn snapshot(&self, snapshot: Snapshot) {
        self.apply_snapshot(snapshot);
        // The stream started afresh: events were missed, and with them
        // points of the sparklines and changes.
        self.reload_sparks();
        self.changes.reload(None);
    }

    fn status(&self, id: EventId, event: StatusEvent) {
        self.apply_status(id, event);
    }
}

/// What the server knew when it rendered the page; serialized into the
/// page so hydration starts from exactly the same values.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Initial {
    snapshot: Snapshot,
    /// Each device's sparkline: the last hour, one point a minute at most.
    sparks: BTreeMap<DeviceId, Spark>,
    now_ms: i64,
    /// The request's cookie is a live operator session: render the controls.
    operator: bool,
    /// The request's cookie is a live viewer session.
    viewer: bool,
    /// Every device's last [`BOARD_CHANGES`] changes, newest first.
    changes: Vec<Changed>,
}

/// Changes the dashboard lists, newest first.
const BOARD_CHANGES: usize = 10;

/// The sparklines the server rendered, kept for the next renders: each is
/// read from the store at most once a minute and, in between, follows its
/// device's state as a browser's does ([`Spark::follow`]). Without it every
/// page load would read every card's hour of readings: with 100 devices
/// reporting every 2 s, 180,000 rows a page.
#[cfg(feature = "ssr")]
#[derive(Default)]
pub struct SparkCache(std::sync::Mutex<std::collections::HashMap<DeviceId, Cached>>);

#[cfg(feature = "ssr")]
struct Cached {
    /// The state the sparkline has followed up to.
    device: Device,
    spark: Spark,
    read_at_ms: i64,
}

#[cfg(feature = "ssr")]
impl SparkCache {
    /// How long a sparkline read from the store is followed before it is
    /// read again (so its minutes become the store's time-weighted means).
    const REREAD_MS: i64 = SPARK_STEP_MS;

    /// The sparkline of `device` (as the hub has it now) at `now`.
    pub fn spark(
        &self,
        hub: &crate::server::hub::Hub,
        device: &Device,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Spark {
        let now_ms = now.timestamp_millis();
        {
            let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get_mut(&device.id)
                && now_ms - c.read_at_ms < Self::REREAD_MS
            {
                // A render that took its snapshot before another's leaves
                // the newer state in place.
                if device.updated_at > c.device.updated_at {
                    c.spark.follow(Some(&c.device), device);
                    c.device = device.clone();
                }
                chart::trim(&mut c.spark.points, now_ms - SPARK_WINDOW_MS);
                return c.spark.clone();
            }
        }
        let spark = read_spark(hub, device, now);
        let cached = Cached {
            device: device.clone(),
            spark: spark.clone(),
            read_at_ms: now_ms,
        };
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(device.id.clone(), cached);
        spark
    }

    /// Drops the sparklines of devices no longer in `devices` (removed).
    fn keep_only(&self, devices: &[Device]) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > devices.len() {
            let ids: std::collections::HashSet<&DeviceId> = devices.iter().map(|d| &d.id).collect();
            cache.retain(|id, _| ids.contains(id));
        }
    }
}

/// A device's sparkline read from the store: the last hour of its
/// sparkline's metric, a point a minute.
#[cfg(feature = "ssr")]
fn read_spark(
    hub: &crate::server::hub::Hub,
    d: &Device,
    now: chrono::DateTime<chrono::Utc>,
) -> Spark {
    let metric = spark_metric(&d.status);
    let points = match &metric {
        Some(m) => {
            let from = now - chrono::TimeDelta::milliseconds(SPARK_WINDOW_MS);
            match hub.history(&d.id, m, from, now, Some(SPARK_STEP_MS)) {
                Ok(history) => history.points.into_iter().map(chart::compact).collect(),
                Err(e) => {
                    tracing::warn!("no sparkline for {}: {e}", d.id);
                    Vec::new()
                }
            }
        }
        None => Vec::new(),
    };
    Spark { metric, points }
}

/// The page's data, read on a blocking thread before the render (see
/// [`super::read_ahead`]); read here only when the request did not pass there.
#[cfg(feature = "ssr")]
fn initial() -> Initial {
    use crate::server::auth::Auth;
    use crate::server::hub::Hub;
    use std::sync::Arc;
    let parts = use_context::<axum::http::request::Parts>();
    if let Some(initial) = parts.as_ref().and_then(|p| p.extensions.get::<Initial>()) {
        return initial.clone();
    }
    let hub = expect_context::<Arc<Hub>>();
    // No request parts when the app is rendered to list its routes.
    let (operator, viewer) = match (parts, use_context::<Arc<Auth>>()) {
        (Some(parts), Some(auth)) => (
            auth.session(&parts.headers, &hub).is_some(),
            auth.viewer_session(&parts.headers, &hub).is_some(),
        ),
        _ => (false, false),
    };
    read(&hub, &SparkCache::default(), operator, viewer)
}

/// What the dashboard renders from: the devices, and each one's sparkline
/// (blocking reads).
#[cfg(feature = "ssr")]
pub(super) fn read(
    hub: &crate::server::hub::Hub,
    cache: &SparkCache,
    operator: bool,
    viewer: bool,
) -> Initial {
    use crate::server::hub::Filter;
    let snapshot = hub.snapshot(&Filter::default());
    // After the snapshot: every reading it shows is in the sparklines.
    let now = chrono::Utc::now();
    let sparks = snapshot
        .devices
        .iter()
        .map(|d| (d.id.clone(), cache.spark(hub, d, now)))
        .collect();
    cache.keep_only(&snapshot.devices);
    let mut changes = hub.changes(None, BOARD_CHANGES).unwrap_or_else(|e| {
        tracing::warn!("no recent changes: {e}");
        Vec::new()
    });
    // Those of events after the snapshot come again with the stream.
    changes.retain(|c| c.id <= snapshot.event_id);
    Initial {
        snapshot,
        sparks,
        now_ms: now.timestamp_millis(),
        operator,
        viewer,
        changes,
    }
}

/// In the browser the value is read back from the page, never computed.
#[cfg(not(feature = "ssr"))]
fn initial() -> Initial {
    Initial::default()
}

#[component]
pub fn Dashboard() -> impl IntoView {
    let initial = SharedValue::new(initial).into_inner();
    let rendered_at = initial.snapshot.event_id;
    let board = Board::new(initial);
    live::connect(board.feed, None, rendered_at, board);
    // Effects run in the browser only, once hydrated.
    Effect::new(move |_| board.hydrated.set(true));
    // `?q=` filters the cards: from the address on the server (a plain GET
    // form, so it works without JavaScript), live as one types after.
    let query = leptos_router::hooks::use_query_map();
    let filter = RwSignal::new(query.with_untracked(|q| q.get("q").unwrap_or_default()));
    let shown = Memo::new(move |_| {
        let filter = filter.get();
        board.cards.with(|cards| {
            let shown = cards
                .iter()
                .filter(|c| c.device.with(|d| matches(&filter, d)))
                .count();
            (shown, cards.len())
        })
    });

    // The devices with a reading out of its limits, in card order.
    let alerting = Memo::new(move |_| {
        board.cards.with(|cards| {
            cards
                .iter()
                .filter_map(|c| {
                    c.device.with(|d| {
                        (!d.alerts.is_empty()).then(|| {
                            let metrics: Vec<String> = d.alerts.keys().cloned().collect();
                            (d.id.clone(), d.name.clone(), metrics.join(", "))
                        })
                    })
                })
                .collect::<Vec<_>>()
        })
    });

    // A change names its device as the device's card does now.
    let name_of = Callback::new(move |id: DeviceId| {
        board.cards.with(|cards| {
            cards
                .iter()
                .find(|c| c.id == id)
                .map_or_else(|| id.to_string(), |c| c.device.with(|d| d.name.clone()))
        })
    });

    // The recent changes follow the card filter: those of the cards shown.
    let shows = Callback::new(move |id: DeviceId| {
        filter.with(|f| {
            f.trim().is_empty()
                || board.cards.with(|cards| {
                    cards
                        .iter()
                        .find(|c| c.id == id)
                        .is_some_and(|c| c.device.with(|d| matches(f, d)))
                })
        })
    });

    view! {
        // A tab in the background tells how many devices need attention.
        <Title text=move || match alerting.with(Vec::len) {
            0 => "Telltale".to_owned(),
            n => format!("({n}) Telltale"),
        } />
        <header class="top">
            <h1>"Telltale"</h1>
            <SessionControl operator=board.operator hydrated=board.hydrated viewer=board.viewer />
            <ConnectionIndicator feed=board.feed />
        </header>
        <Show when=move || alerting.with(|a| !a.is_empty())>
            <nav class="attention" data-testid="attention" aria-label="Needs attention">
                <strong>"Attention"</strong>
                <ul>
                    <For
                        each=move || alerting.get()
                        key=|a| a.clone()
                        children=|(id, name, metrics)| {
                            view! {
                                <li data-device=id.to_string()>
                                    <a href=device_href(&id) rel="external">
                                        {name}
                                    </a>
                                    <span class="attention-metrics">{metrics}</span>
                                </li>
                            }
                        }
                    />
                </ul>
            </nav>
        </Show>
        // Shown with several devices, or while a filter is set (from the
        // address, say), so it can always be cleared.
        <Show when=move || {
            shown.with(|(_, all)| *all > 1) || filter.with(|f| !f.trim().is_empty())
        }>
            <form class="filter" role="search" method="get" action="/" on:submit=|ev| ev.prevent_default()>
                <input
                    type="search"
                    name="q"
                    placeholder="Filter devices by name or id"
                    aria-label="Filter devices"
                    autocomplete="off"
                    data-testid="filter"
                    prop:value=filter
                    on:input=move |ev| {
                        let q = event_target_value(&ev);
                        keep_in_address(&q);
                        filter.set(q);
                    }
                />
                <Show when=move || filter.with(|f| !f.trim().is_empty())>
                    <span class="filter-count" data-testid="filter-count">
                        {move || shown.with(|(shown, all)| format!("{shown} of {all}"))}
                    </span>
                </Show>
            </form>
        </Show>
        <main
            class="grid"
            class:stale=move || board.feed.connection.get() != Connection::Live
        >
            <For each=move || board.cards.get() key=|card| card.id.clone() let:card>
                <DeviceCard
                    device=card.device
                    spark=card.spark
                    now_ms=board.feed.now_ms
                    operator=board.operator
                    hydrated=board.hydrated
                    hidden=Signal::derive(move || !card.device.with(|d| matches(&filter.get(), d)))
                />
            </For>
            <Show when=move || board.cards.with(Vec::is_empty)>
                <p class="empty">"No devices yet. They appear here as soon as they report."</p>
            </Show>
            <Show when=move || shown.with(|(shown, all)| *shown == 0 && *all > 0)>
                <p class="empty" data-testid="no-match">
                    {move || format!("No device matches \u{201c}{}\u{201d}.", filter.get().trim())}
                </p>
            </Show>
        </main>
        <ChangeList recent=board.changes name_of shows />
    }
    .into_any()
}

/// A device's link badges, on its card and its page: "stale" (silent for
/// longer than it should be) and "offline" (its agent went away; a device
/// that never had one is `None`, not offline).
#[component]
pub fn LinkBadges(device: RwSignal<Device>) -> impl IntoView {
    view! {
        <Show when=move || device.with(|d| d.stale)>
            <span
                class="badge stale"
                data-testid="stale"
                title="No report for longer than this device's interval"
            >
                "stale"
            </span>
        </Show>
        <Show when=move || device.with(|d| d.online == Some(false))>
            <span class="badge offline" data-testid="offline">
                "offline"
            </span>
        </Show>
    }
}

/// The page's stream state: Live, Reconnecting… or Offline; and, when the
/// server says it takes no changes (its cluster's Redis is away), a
/// "Degraded" mark with the reason as its title.
#[component]
pub fn ConnectionIndicator(feed: Feed) -> impl IntoView {
    let Feed {
        connection,
        degraded,
        ..
    } = feed;
    view! {
        <span class="indicators">
        <span
            class="connection"
            class:live=move || connection.get() == Connection::Live
            class:reconnecting=move || connection.get() == Connection::Reconnecting
            data-testid="connection"
            role="status"
        >
            {move || connection.get().label()}
        </span>
        <Show when=move || degraded.with(Option::is_some)>
            <span
                class="degraded"
                data-testid="degraded"
                role="status"
                title=move || degraded.get().unwrap_or_default()
            >
                "Degraded: read-only"
            </span>
        </Show>
        </span>
    }
}

/// A metric's value with its unit: temperature and humidity to a tenth, as
/// the cards show them, other metrics to two decimals at most; seconds of
/// two minutes or more in the largest unit that keeps them readable.
pub fn format_value(metric: &str, v: f64) -> String {
    let unit = chart::unit_of(metric);
    match metric {
        "temperature" | "humidity" => reading(Some(v), unit),
        _ if unit == "s" && v.abs() >= 120.0 => duration(v),
        _ if unit.is_empty() => number(v),
        _ => format!("{} {unit}", number(v)),
    }
}

/// Which limit an alert's value broke, in words ("above the maximum of 30 °C").
pub fn broken_limit(alert: &Alert, unit: &str) -> String {
    let with_unit = |v: f64| {
        if unit.is_empty() {
            number(v)
        } else {
            format!("{} {unit}", number(v))
        }
    };
    match (alert.limits.min, alert.limits.max) {
        (_, Some(max)) if alert.value > max => format!("above the maximum of {}", with_unit(max)),
        (Some(min), _) if alert.value < min => format!("below the minimum of {}", with_unit(min)),
        (Some(min), Some(max)) => format!("outside {}–{}", with_unit(min), with_unit(max)),
        (Some(min), None) => format!("below the minimum of {}", with_unit(min)),
        (None, Some(max)) => format!("above the maximum of {}", with_unit(max)),
        (None, None) => "out of its limits".into(),
    }
}

/// The alert text of one metric of a device, if it is in alert.
pub fn alert_text(device: &Device, metric: &str) -> Option<String> {
    device
        .alerts
        .get(metric)
        .map(|a| broken_limit(a, chart::unit_of(metric)))
}

/// Operator sign-in (the token is posted once, then forgotten: the server
/// answers with an `HttpOnly` session cookie) or, when signed in, sign-out.
/// A `viewer` session (a closed dashboard's) may be ended too: the page then
/// loads again, as the sign-in page.
#[component]
fn SessionControl(
    operator: RwSignal<bool>,
    hydrated: RwSignal<bool>,
    viewer: bool,
) -> impl IntoView {
    // The field is read when the form is sent, never bound to a signal:
    // hydration would empty what was typed before the page's code ran.
    let token = NodeRef::<leptos::html::Input>::new();
    let busy = RwSignal::new(false);
    let error = RwSignal::new(None::<String>);
    let sign_in = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let Some(field) = token.get_untracked() else {
            return;
        };
        if busy.get_untracked() {
            return;
        }
        busy.set(true);
        let given = field.value();
        leptos::task::spawn_local(async move {
            let result = api::sign_in(given).await;
            busy.set(false);
            match result {
                Ok(()) => {
                    field.set_value("");
                    error.set(None);
                    operator.set(true);
                }
                Err(failure) => error.set(Some(failure.message)),
            }
        });
    };
    let sign_out = move |_| {
        busy.set(true);
        leptos::task::spawn_local(async move {
            let result = api::sign_out().await;
            busy.set(false);
            match result {
                Ok(()) => {
                    error.set(None);
                    operator.set(false);
                }
                Err(failure) => error.set(Some(failure.message)),
            }
        });
    };
    // Ends the viewer session; the page loads again, as the sign-in page.
    let end_viewing = move |_| {
        busy.set(true);
        leptos::task::spawn_local(async move {
            match api::sign_out().await {
                Ok(()) => {
                    let _ = window().location().reload();
                }
                Err(failure) => {
                    busy.set(false);
                    error.set(Some(failure.message));
                }
            }
        });
    };
    view! {
        <div class="session">
            <Show
                when=move || operator.get()
                fallback=move || {
                    // `method="post"` keeps the token out of the URL should the
                    // form ever be sent before the page is hydrated.
                    view! {
                        <form
                            method="post"
                            action="/api/session"
                            data-testid="sign-in"
                            on:submit=sign_in
                        >
                            <label>
                                <span>"Operator token"</span>
                                <input
                                    type="password"
                                    name="token"
                                    autocomplete="current-password"
                                    placeholder="Operator token"
                                    required
                                    data-testid="operator-token"
                                    node_ref=token
                                />
                            </label>
                            <button
                                type="submit"
                                disabled=move || busy.get() || !hydrated.get()
                                title=move || {
                                    (!hydrated.get()).then_some("Signing in needs JavaScript")
                                }
                            >
                                "Sign in"
                            </button>
                        </form>
                        {viewer
                            .then(|| {
                                view! {
                                    <button
                                        type="button"
                                        data-testid="viewer-sign-out"
                                        disabled=move || busy.get() || !hydrated.get()
                                        on:click=end_viewing
                                    >
                                        "Sign out"
                                    </button>
                                }
                            })}
                    }
                }
            >
                <span class="role" data-testid="operator">
                    "Operator"
                </span>
                <button
                    type="button"
                    data-testid="sign-out"
                    disabled=move || busy.get()
                    on:click=sign_out
                >
                    "Sign out"
                </button>
            </Show>
            <Show when=move || error.with(Option::is_some)>
                <span class="session-error" role="alert" data-testid="session-error">
                    {move || error.get()}
                </span>
            </Show>
        </div>
    }
}

/// Whether a device matches a card filter: its name or id contains the
/// filter's words, ignoring case (an empty filter matches every device).
/// Cheap without a filter: every card checks it on each of its device's
/// events.
pub fn matches(filter: &str, device: &Device) -> bool {
    let mut words = filter.split_whitespace().peekable();
    if words.peek().is_none() {
        return true;
    }
    let name = device.name.to_lowercase();
    words
        .map(str::to_lowercase)
        .all(|word| name.contains(&word) || device.id.as_str().contains(&word))
}

/// Puts a card filter into the page's address (`/?q=…`, or `/` when empty)
/// without a reload, so a reload or a shared link keeps it.
fn keep_in_address(_filter: &str) {
    #[cfg(feature = "hydrate")]
    {
        let filter = _filter.trim();
        let url = if filter.is_empty() {
            "/".to_owned()
        } else {
            format!("/?q={}", js_sys::encode_uri_component(filter))
        };
        if let Some(history) = web_sys::window().and_then(|w| w.history().ok()) {
            let _ = history.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(&url));
        }
    }
}

#[component]
fn DeviceCard(
    device: RwSignal<Device>,
    spark: RwSignal<Spark>,
    now_ms: RwSignal<i64>,
    operator: RwSignal<bool>,
    hydrated: RwSignal<bool>,
    /// Left out by the card filter.
    #[prop(into)]
    hidden: Signal<bool>,
) -> impl IntoView {
    let id = device.with_untracked(|d| d.id.to_string());
    let metric_names =
        move || device.with(|d| d.status.metrics.keys().cloned().collect::<Vec<_>>());
    let power_on = move || device.with(|d| d.status.power_on == Some(true));
    let offline = move || device.with(|d| d.online == Some(false));
    let stale = move || device.with(|d| d.stale);
    let alerting = move || device.with(|d| !d.alerts.is_empty());
    let alert = move |metric: &'static str| move || device.with(|d| alert_text(d, metric));
    let href = device.with_untracked(|d| device_href(&d.id));
    let spark_points = Signal::derive(move || spark.with(|s| s.points.clone()));
    let span = move || {
        let (from, end) =
            spark.with(|s| chart::spark_span(&s.points, now_ms.get(), SPARK_WINDOW_MS));
        chart::span_text(end - from)
    };
    let spark_label = Signal::derive(move || {
        spark.with(|s| match &s.metric {
            Some(m) => format!("{} over the last {}", chart::title_of(m), span()),
            None => "no readings".into(),
        })
    });
    view! {
        <article
            class="card"
            hidden=move || hidden.get()
            class:offline=offline
            class:silent=stale
            class:alerting=alerting
            data-testid="device"
            data-device=id
        >
            <header>
                <h2 data-testid="name">
                    <a href=href.clone() rel="external">
                        {move || device.with(|d| d.name.clone())}
                    </a>
                </h2>
                <span class="badges">
                    <LinkBadges device=device />
                    <span
                        class="power"
                        class:on=power_on
                        class:unknown=move || device.with(|d| d.status.power_on.is_none())
                        data-testid="power"
                    >
                        {move || match device.with(|d| d.status.power_on) {
                            Some(true) => "on",
                            Some(false) => "off",
                            None => "—",
                        }}
                    </span>
                </span>
            </header>
            <DeviceControls device operator hydrated />
            <dl class="readings">
                <div>
                    <dt>"Temperature"</dt>
                    <dd data-testid="temperature" class:alerting=move || alert("temperature")().is_some()>
                        <Value alert=Signal::derive(alert("temperature"))>
                            {move || reading(device.with(|d| d.status.temperature), "°C")}
                        </Value>
                    </dd>
                </div>
                <div>
                    <dt>"Humidity"</dt>
                    <dd data-testid="humidity" class:alerting=move || alert("humidity")().is_some()>
                        <Value alert=Signal::derive(alert("humidity"))>
                            {move || reading(device.with(|d| d.status.humidity), "%")}
                        </Value>
                    </dd>
                </div>
            </dl>
            <Show when=move || spark.with(|s| s.metric.is_some())>
                <a class="spark" href=href.clone() rel="external" data-testid="spark">
                    <Sparkline
                        points=spark_points
                        now_ms=Signal::from(now_ms)
                        window_ms=SPARK_WINDOW_MS
                        label=spark_label
                    />
                    <span class="spark-label">
                        {move || {
                            spark.with(|s| s.metric.as_deref().map(chart::title_of)).unwrap_or_default()
                        }}
                        " · "
                        {span}
                    </span>
                </a>
            </Show>
            <ul class="metrics">
                <For
                    each=metric_names
                    key=|name| name.clone()
                    children=move |name| {
                        let label = name.clone();
                        let title = name.clone();
                        let attr = name.clone();
                        let metric = name.clone();
                        let alert = Signal::derive(move || device.with(|d| alert_text(d, &metric)));
                        view! {
                            <li
                                data-testid="metric"
                                data-metric=attr
                                class:alerting=move || alert.with(Option::is_some)
                            >
                                <span class="metric-name" title=title>{label}</span>
                                <span class="metric-value">
                                    <Value alert>
                                        {move || {
                                            device
                                                .with(|d| {
                                                    d.status.metrics.get(&name).map(|v| format_value(&name, *v))
                                                })
                                        }}
                                    </Value>
                                </span>
                            </li>
                        }
                    }
                />
            </ul>
            <footer data-testid="updated">
                {move || ago(now_ms.get(), device.with(|d| d.updated_at.timestamp_millis()))}
            </footer>
        </article>
    }
    .into_any()
}

/// A value, marked when it is out of its limits: class `alerting`,
/// `data-testid="alert"`, and the broken limit as its title and description.
#[component]
pub fn Value(alert: Signal<Option<String>>, children: Children) -> impl IntoView {
    view! {
        <span
            class="value"
            class:alerting=move || alert.with(Option::is_some)
            data-testid=move || alert.with(|a| a.as_ref().map(|_| "alert"))
            title=move || alert.get()
            aria-description=move || alert.get()
        >
            {children()}
        </span>
    }
}

/// For an operator, a device's power switch and, while it has no live link,
/// its Remove button (on its card and its page); and why the last request
/// failed. The switch shows the device's confirmed state, or pending: a
/// click asks for the opposite, and nothing changes until the device's
/// status event says so.
#[component]
pub fn DeviceControls(
    device: RwSignal<Device>,
    operator: RwSignal<bool>,
    hydrated: RwSignal<bool>,
) -> impl IntoView {
    let id = device.with_untracked(|d| d.id.to_string());
    let power_on = move || device.with(|d| d.status.power_on == Some(true));
    let request = Request {
        pending: RwSignal::new(false),
        error: RwSignal::new(None),
        operator,
    };
    let Request { pending, error, .. } = request;
    let device_id = id.clone();
    let toggle = move |_| {
        let want = !power_on_untracked(device);
        let device_id = device_id.clone();
        request.send(async move { api::set_power(&device_id, want).await });
    };
    // Only a device without a live link: its agent would bring it back.
    let removable = move || device.with(|d| d.online != Some(true));
    let remove = Callback::new(move |_: ()| {
        let name = device.with_untracked(|d| d.name.clone());
        let question = format!("Remove {name} and all its history?");
        if !window().confirm_with_message(&question).unwrap_or(false) {
            return;
        }
        let device_id = id.clone();
        // The card (or page) follows when the removal's event arrives.
        request.send(async move { api::remove_device(&device_id).await });
    });
    view! {
        <Show when=move || operator.get()>
            <div class="control">
                <button
                    type="button"
                    class="switch"
                    data-testid="power-switch"
                    aria-pressed=move || power_on().to_string()
                    data-state=move || {
                        if pending.get() {
                            "pending"
                        } else if power_on() {
                            "on"
                        } else {
                            "off"
                        }
                    }
                    disabled=move || pending.get() || !hydrated.get()
                    on:click=toggle.clone()
                >
                    <span class="switch-track" aria-hidden="true">
                        <span class="switch-knob"></span>
                    </span>
                    "Power"
                </button>
                <Show when=removable>
                    <button
                        type="button"
                        class="remove"
                        data-testid="remove"
                        title="Remove this device and its history"
                        disabled=move || pending.get() || !hydrated.get()
                        on:click=move |_| remove.run(())
                    >
                        "Remove"
                    </button>
                </Show>
            </div>
        </Show>
        <Show when=move || error.with(Option::is_some)>
            <p class="command-error" role="alert" data-testid="command-error">
                {move || error.get()}
            </p>
        </Show>
    }
}

/// An operator's requests: one at a time, the last one's failure shown.
#[derive(Clone, Copy)]
struct Request {
    pending: RwSignal<bool>,
    error: RwSignal<Option<String>>,
    operator: RwSignal<bool>,
}

impl Request {
    fn send(self, request: impl Future<Output = Result<(), api::Failure>> + 'static) {
        if self.pending.get_untracked() {
            return;
        }
        self.pending.set(true);
        self.error.set(None);
        leptos::task::spawn_local(async move {
            let result = request.await;
            // The card may be gone by now (its device vanished).
            let _ = self.pending.try_set(false);
            if let Err(failure) = result {
                let _ = self.error.try_set(Some(failure.message));
                if failure.unauthorized {
                    // The session ended: show the sign-in form again.
                    let _ = self.operator.try_set(false);
                }
            }
        });
    }
}

fn power_on_untracked(device: RwSignal<Device>) -> bool {
    device.with_untracked(|d| d.status.power_on == Some(true))
}

fn reading(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.1} {unit}"))
}

/// Up to two decimals, without trailing zeros.
pub fn number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Seconds in minutes, hours or days: "24 min", "5.5 h", "12.3 d".
fn duration(secs: f64) -> String {
    let (v, unit) = match secs.abs() {
        s if s < 2.0 * 3600.0 => ((secs / 60.0).round(), "min"),
        s if s < 2.0 * 86_400.0 => ((secs / 360.0).round() / 10.0, "h"),
        _ => ((secs / 8_640.0).round() / 10.0, "d"),
    };
    format!("{} {unit}", number(v))
}

fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("updated {s} s ago"),
        60..3600 => format!("updated {} min ago", s / 60),
        _ => format!("updated {} h ago", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_readings_for_people() {
        assert_eq!(reading(Some(21.345), "°C"), "21.3 °C");
        assert_eq!(reading(None, "%"), "—");
        assert_eq!(number(2400.0), "2400");
        assert_eq!(number(0.456), "0.46");
        assert_eq!(number(1.5), "1.5");
        assert_eq!(ago(10_000, 7_000), "updated 3 s ago");
        assert_eq!(ago(0, 5_000), "updated 0 s ago");
        assert_eq!(ago(200_000, 0), "updated 3 min ago");
        assert_eq!(ago(7_200_000, 0), "updated 2 h ago");
        assert_eq!(format_value("temperature", 23.0), "23.0 °C");
        assert_eq!(format_value("fan_rpm", 1000.0), "1000 rpm");
        assert_eq!(format_value("load_1m", 0.456), "0.46");
        assert_eq!(format_value("uptime_s", 119.0), "119 s");
        assert_eq!(format_value("uptime_s", 1441.0), "24 min");
        assert_eq!(format_value("uptime_s", 19_800.0), "5.5 h");
        assert_eq!(format_value("uptime_s", 1_062_720.0), "12.3 d");
    }

    use crate::model::{Limits, Status};

    fn alert(value: f64, min: Option<f64>, max: Option<f64>) -> Alert {
        Alert {
            value,
            limits: Limits { min, max },
        }
    }

    #[test]
    fn alerts_name_the_limit_they_broke() {
        assert_eq!(
            broken_limit(&alert(31.5, None, Some(30.0)), "°C"),
            "above the maximum of 30 °C"
        );
        assert_eq!(
            broken_limit(&alert(100.0, Some(500.0), Some(2000.0)), "rpm"),
            "below the minimum of 500 rpm"
        );
        assert_eq!(
            broken_limit(&alert(0.5, Some(1.0), None), ""),
            "below the minimum of 1"
        );
        // The server said so, though the value is within: say what the limits are.
        assert_eq!(
            broken_limit(&alert(5.0, Some(1.0), Some(10.0)), "%"),
            "outside 1 %–10 %"
        );
        let mut d = Device::sample(0, Status::default());
        d.alerts
            .insert("temperature".into(), alert(31.5, None, Some(30.0)));
        d.alerts
            .insert("co2_ppm".into(), alert(1500.0, None, Some(1000.0)));
        assert_eq!(
            alert_text(&d, "temperature").as_deref(),
            Some("above the maximum of 30 °C")
        );
        assert_eq!(
            alert_text(&d, "co2_ppm").as_deref(),
            Some("above the maximum of 1000 ppm")
        );
        assert_eq!(alert_text(&d, "humidity"), None);
    }

    #[test]
    fn a_filter_matches_every_word_in_the_name_or_id_ignoring_case() {
        let mut d = Device::sample(0, Status::default());
        d.name = "Cold Room B".into();
        assert!(matches("", &d));
        assert!(matches("  ", &d));
        assert!(matches("cold", &d));
        assert!(matches("ROOM cold", &d));
        assert!(matches("rack-1", &d), "the id");
        assert!(matches("room rack", &d), "one word each");
        assert!(!matches("freezer", &d));
        assert!(!matches("cold freezer", &d));
    }

    #[test]
    fn the_sparkline_shows_temperature_else_humidity_else_the_first_metric() {
        let mut status = Status {
            metrics: BTreeMap::from([("b".into(), 1.0), ("a".into(), 2.0)]),
            ..Status::default()
        };
        assert_eq!(spark_metric(&status).as_deref(), Some("a"));
        status.humidity = Some(40.0);
        assert_eq!(spark_metric(&status).as_deref(), Some("humidity"));
        status.temperature = Some(20.0);
        assert_eq!(spark_metric(&status).as_deref(), Some("temperature"));
        assert_eq!(spark_metric(&Status::default()), None);
    }

    #[test]
    fn sparklines_follow_changes_of_their_metric_for_an_hour() {
        let t = |v| Status {
            temperature: Some(v),
            humidity: Some(40.0),
            ..Status::default()
        };
        let first = Device::sample(1_000, t(20.0));
        let mut spark = Spark::default();
        spark.follow(None, &first);
        assert_eq!(spark.metric.as_deref(), Some("temperature"));
        assert_eq!(spark.points.len(), 1, "a new card starts with its value");

        // Within the same minute: the newest point takes the new value.
        let second = Device::sample(30_000, t(20.5));
        spark.follow(Some(&first), &second);
        assert_eq!(
            spark.points.iter().map(|p| (p.t, p.v)).collect::<Vec<_>>(),
            [(1_000, 20.5)]
        );
        let third = Device::sample(61_000, t(21.0));
        spark.follow(Some(&second), &third);
        assert_eq!(spark.points.len(), 2, "a minute on: a new point");
        // Only humidity changed: nothing to add.
        let fourth = Device::sample(
            200_000,
            Status {
                humidity: Some(45.0),
                ..t(21.0)
            },
        );
        spark.follow(Some(&third), &fourth);
        assert_eq!(spark.points.len(), 2);
        // Over an hour later: the old points go, but the one in force at
        // the window's start.
        let later = Device::sample(61_000 + SPARK_WINDOW_MS + 5_000, t(22.0));
        spark.follow(Some(&fourth), &later);
        assert_eq!(
            spark.points.iter().map(|p| (p.t, p.v)).collect::<Vec<_>>(),
            [(61_000, 21.0), (later.updated_at.timestamp_millis(), 22.0)]
        );

        // A device that had humidity only, and now reports a temperature.
        let humid = Device::sample(
            0,
            Status {
                humidity: Some(40.0),
                ..Status::default()
            },
        );
        let mut spark = Spark::default();
        spark.follow(None, &humid);
        assert_eq!(spark.metric.as_deref(), Some("humidity"));
        spark.follow(Some(&humid), &Device::sample(1_000, t(19.0)));
        assert_eq!(spark.metric.as_deref(), Some("temperature"));
        assert_eq!(spark.points.len(), 1);
    }

    #[test]
    fn a_snapshot_or_event_updates_cards_and_their_sparklines() {
        let owner = Owner::new();
        owner.with(|| {
            let board = Board::new(Initial {
                snapshot: Snapshot {
                    event_id: 1,
                    devices: vec![Device::sample(
                        1_000,
                        Status {
                            temperature: Some(20.0),
                            ..Status::default()
                        },
                    )],
                },
                ..Initial::default()
            });
            let mut event = StatusEvent::from(&Device::sample(
                2_000,
                Status {
                    temperature: Some(21.0),
                    ..Status::default()
                },
            ));
            event
                .alerts
                .insert("temperature".into(), alert(21.0, None, Some(20.5)));
            event.stale = true;
            board.apply_status(2, event);
            let card = board.cards.with_untracked(|c| c[0].clone());
            assert!(
                card.device
                    .with_untracked(|d| d.stale && d.alerts.contains_key("temperature"))
            );
            assert_eq!(
                card.spark.with_untracked(|s| s.points.len()),
                1,
                "the new value; the rendered history had none"
            );
            let mut other = Device::sample(
                3_000,
                Status {
                    humidity: Some(30.0),
                    ..Status::default()
                },
            );
            other.id = DeviceId::parse("a-first").unwrap();
            board.apply_status(3, StatusEvent::from(&other));
            // What each event changed, newest first.
            let changes = || {
                board.changes.list.with_untracked(|l| {
                    l.iter()
                        .map(|c| (c.id, c.device.to_string(), c.change.kind()))
                        .collect::<Vec<_>>()
                })
            };
            assert_eq!(
                changes(),
                [
                    (3, "a-first".into(), "registered"),
                    (2, "rack-1".into(), "stale"),
                    (2, "rack-1".into(), "alert"),
                ]
            );
            let ids: Vec<_> = board
                .cards
                .with_untracked(|c| c.iter().map(|c| c.id.to_string()).collect());
            assert_eq!(ids, ["a-first", "rack-1"]);
            let spark = board.cards.with_untracked(|c| c[0].spark.get_untracked());
            assert_eq!(spark.metric.as_deref(), Some("humidity"));
            assert_eq!(spark.points.len(), 1);
            // A removal drops the card; once is enough.
            let removal = StatusEvent {
                removed: true,
                ..StatusEvent::from(&other)
            };
            board.apply_status(4, removal.clone());
            board.apply_status(5, removal);
            let ids: Vec<_> = board
                .cards
                .with_untracked(|c| c.iter().map(|c| c.id.to_string()).collect());
            assert_eq!(ids, ["rack-1"]);
            // Its changes went with it (as the server deletes them).
            assert_eq!(changes().len(), 2);
            assert!(changes().iter().all(|(_, device, _)| device == "rack-1"));
            // Removed while the page was away: a snapshot without it drops
            // its card and its changes too.
            board.apply_snapshot(Snapshot {
                event_id: 9,
                devices: vec![other.clone()],
            });
            let ids: Vec<_> = board
                .cards
                .with_untracked(|c| c.iter().map(|c| c.id.to_string()).collect());
            assert_eq!(ids, ["a-first"]);
            assert_eq!(changes(), []);
        });
    }

    #[cfg(feature = "ssr")]
    #[test]
    fn the_server_keeps_sparklines_between_renders_and_reads_them_again_a_minute_on() {
        // No store: what the hub reads for a sparkline is always empty, so
        // any point comes from following the device.
        let hub = crate::server::hub::Hub::new(8, 8);
        let cache = SparkCache::default();
        let at = |ms| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let t = |v| Status {
            temperature: Some(v),
            ..Status::default()
        };
        let points = |s: &Spark| s.points.iter().map(|p| (p.t, p.v)).collect::<Vec<_>>();
        let first = Device::sample(1_000, t(20.0));
        let read = cache.spark(&hub, &first, at(2_000));
        assert_eq!(read.metric.as_deref(), Some("temperature"));
        assert_eq!(points(&read), []);
        let second = Device::sample(30_000, t(21.0));
        assert_eq!(
            points(&cache.spark(&hub, &second, at(31_000))),
            [(30_000, 21.0)],
            "followed, not read"
        );
        assert_eq!(
            points(&cache.spark(&hub, &first, at(31_500))),
            [(30_000, 21.0)],
            "a render with an older snapshot leaves the newer state"
        );
        assert_eq!(
            points(&cache.spark(&hub, &second, at(2_000 + SPARK_STEP_MS))),
            [],
            "read again"
        );
    }

    /// The server's render of a card (what the first HTML shows).
    #[cfg(feature = "ssr")]
    fn card_html(d: Device) -> String {
        let owner = Owner::new();
        owner.with(|| {
            let mut spark = Spark::default();
            spark.follow(None, &d);
            view! {
                <DeviceCard
                    device=RwSignal::new(d)
                    spark=RwSignal::new(spark)
                    now_ms=RwSignal::new(0)
                    operator=RwSignal::new(false)
                    hydrated=RwSignal::new(false)
                    hidden=false
                />
            }
            .to_html()
        })
    }

    #[cfg(feature = "ssr")]
    #[test]
    fn stale_and_alerting_cards_are_marked() {
        let status = Status {
            temperature: Some(31.5),
            humidity: Some(40.0),
            metrics: BTreeMap::from([("fan_rpm".into(), 100.0)]),
            ..Status::default()
        };
        let plain = card_html(Device::sample(0, status.clone()));
        assert!(!plain.contains("data-testid=\"stale\""), "{plain}");
        assert!(!plain.contains("data-testid=\"alert\""), "{plain}");
        assert!(!plain.contains("alerting"), "{plain}");
        assert!(plain.contains("href=\"/devices/rack-1\""), "{plain}");
        assert!(plain.contains("data-testid=\"sparkline\""), "{plain}");

        let mut d = Device::sample(0, status);
        d.stale = true;
        d.alerts
            .insert("temperature".into(), alert(31.5, None, Some(30.0)));
        d.alerts
            .insert("fan_rpm".into(), alert(100.0, Some(500.0), None));
        let html = card_html(d);
        assert!(html.contains("data-testid=\"stale\""), "{html}");
        let card_class = html
            .split("class=\"card")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default();
        assert!(card_class.contains("alerting"), "{html}");
        assert!(card_class.contains("silent"), "{html}");
        assert_eq!(html.matches("data-testid=\"alert\"").count(), 2, "{html}");
        assert!(
            html.contains("title=\"above the maximum of 30 °C\""),
            "{html}"
        );
        assert!(
            html.contains("title=\"below the minimum of 500 rpm\""),
            "{html}"
        );
    }
}
