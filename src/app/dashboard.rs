//! The dashboard: one card per device and the connection indicator.
//!
//! Each card owns a signal for its device, so an event re-renders only the
//! values of the card it concerns.

use super::live;
use crate::model::{Device, DeviceId, Snapshot, StatusEvent};
use leptos::prelude::*;
use serde::{Deserialize, Serialize};

/// The state of the page's event stream, in the words the page shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Live,
    Reconnecting,
    Offline,
}

impl Connection {
    pub fn label(self) -> &'static str {
        match self {
            Self::Live => "Live",
            Self::Reconnecting => "Reconnecting…",
            Self::Offline => "Offline",
        }
    }
}

#[derive(Clone)]
pub struct Card {
    pub id: DeviceId,
    pub device: RwSignal<Device>,
}

/// Everything the page shows, as signals.
#[derive(Clone, Copy)]
pub struct Board {
    pub cards: RwSignal<Vec<Card>>,
    pub connection: RwSignal<Connection>,
    /// Milliseconds since the epoch; ticks so "updated N s ago" keeps counting.
    pub now_ms: RwSignal<i64>,
}

// The server renders; only the browser applies events.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
impl Board {
    fn new(initial: Initial) -> Self {
        let cards = initial
            .snapshot
            .devices
            .into_iter()
            .map(|d| Card {
                id: d.id.clone(),
                device: RwSignal::new(d),
            })
            .collect();
        Self {
            cards: RwSignal::new(cards),
            connection: RwSignal::new(Connection::Offline),
            now_ms: RwSignal::new(initial.now_ms),
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
                    card.device.set(d);
                    card.clone()
                }
                None => Card {
                    id: d.id.clone(),
                    device: RwSignal::new(d),
                },
            })
            .collect();
        let same_ids =
            cards.len() == old.len() && cards.iter().zip(&old).all(|(a, b)| a.id == b.id);
        if !same_ids {
            self.cards.set(cards);
        }
    }

    /// Updates one card, or adds it (in id order) for a new device.
    pub fn apply_status(&self, event: StatusEvent) {
        let device = event.into_device();
        let existing = self
            .cards
            .with_untracked(|cards| cards.iter().find(|c| c.id == device.id).map(|c| c.device));
        match existing {
            Some(signal) => signal.set(device),
            None => self.cards.update(|cards| {
                let at = cards.partition_point(|c| c.id < device.id);
                cards.insert(
                    at,
                    Card {
                        id: device.id.clone(),
                        device: RwSignal::new(device),
                    },
                );
            }),
        }
    }
}

/// What the server knew when it rendered the page; serialized into the
/// page so hydration starts from exactly the same values.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Initial {
    snapshot: Snapshot,
    now_ms: i64,
}

#[cfg(feature = "ssr")]
fn initial() -> Initial {
    use crate::server::hub::{Filter, Hub};
    let hub = expect_context::<std::sync::Arc<Hub>>();
    Initial {
        snapshot: hub.snapshot(&Filter::default()),
        now_ms: chrono::Utc::now().timestamp_millis(),
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
    live::connect(board, rendered_at);

    view! {
        <header class="top">
            <h1>"Telltale"</h1>
            <span
                class="connection"
                class:live=move || board.connection.get() == Connection::Live
                class:reconnecting=move || board.connection.get() == Connection::Reconnecting
                data-testid="connection"
                role="status"
            >
                {move || board.connection.get().label()}
            </span>
        </header>
        <main class="grid" class:stale=move || board.connection.get() != Connection::Live>
            <For each=move || board.cards.get() key=|card| card.id.clone() let:card>
                <DeviceCard device=card.device now_ms=board.now_ms />
            </For>
            <Show when=move || board.cards.with(Vec::is_empty)>
                <p class="empty">"No devices yet. They appear here as soon as they report."</p>
            </Show>
        </main>
    }
}

#[component]
fn DeviceCard(device: RwSignal<Device>, now_ms: RwSignal<i64>) -> impl IntoView {
    let id = device.with_untracked(|d| d.id.to_string());
    let metric_names =
        move || device.with(|d| d.status.metrics.keys().cloned().collect::<Vec<_>>());
    view! {
        <article class="card" data-testid="device" data-device=id>
            <header>
                <h2 data-testid="name">{move || device.with(|d| d.name.clone())}</h2>
                <span
                    class="power"
                    class:on=move || device.with(|d| d.status.power_on == Some(true))
                    data-testid="power"
                >
                    {move || match device.with(|d| d.status.power_on) {
                        Some(true) => "on",
                        Some(false) => "off",
                        None => "—",
                    }}
                </span>
            </header>
            <dl class="readings">
                <div>
                    <dt>"Temperature"</dt>
                    <dd data-testid="temperature">
                        {move || reading(device.with(|d| d.status.temperature), "°C")}
                    </dd>
                </div>
                <div>
                    <dt>"Humidity"</dt>
                    <dd data-testid="humidity">
                        {move || reading(device.with(|d| d.status.humidity), "%")}
                    </dd>
                </div>
            </dl>
            <ul class="metrics">
                <For
                    each=metric_names
                    key=|name| name.clone()
                    children=move |name| {
                        let label = name.clone();
                        let attr = name.clone();
                        view! {
                            <li data-testid="metric" data-metric=attr>
                                <span class="metric-name">{label}</span>
                                <span class="metric-value">
                                    {move || {
                                        device.with(|d| d.status.metrics.get(&name).map(|v| number(*v)))
                                    }}
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
}

fn reading(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.1} {unit}"))
}

/// Up to two decimals, without trailing zeros.
fn number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
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
    }
}
