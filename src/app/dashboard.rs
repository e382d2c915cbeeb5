//! The dashboard: one card per device and the connection indicator.
//!
//! Each card owns a signal for its device, so an event re-renders only the
//! values of the card it concerns.
//!
//! With operator rights (an operator session cookie, known to the server when
//! it renders and carried into hydration with the snapshot) each card has a
//! power switch. The switch only ever shows the device's confirmed state, as
//! the status events report it; a click only makes it pending.

use super::{api, live};
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
    /// Whether this page has operator rights (a live session cookie).
    pub operator: RwSignal<bool>,
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
            operator: RwSignal::new(initial.operator),
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
    /// The request's cookie is a live operator session: render the controls.
    operator: bool,
}

#[cfg(feature = "ssr")]
fn initial() -> Initial {
    use crate::server::auth::Auth;
    use crate::server::hub::{Filter, Hub};
    use std::sync::Arc;
    let hub = expect_context::<Arc<Hub>>();
    // No request parts when the app is rendered to list its routes.
    let operator = match (
        use_context::<axum::http::request::Parts>(),
        use_context::<Arc<Auth>>(),
    ) {
        (Some(parts), Some(auth)) => auth.has_session(&parts.headers),
        _ => false,
    };
    Initial {
        snapshot: hub.snapshot(&Filter::default()),
        now_ms: chrono::Utc::now().timestamp_millis(),
        operator,
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
            <SessionControl operator=board.operator />
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
                <DeviceCard device=card.device now_ms=board.now_ms operator=board.operator />
            </For>
            <Show when=move || board.cards.with(Vec::is_empty)>
                <p class="empty">"No devices yet. They appear here as soon as they report."</p>
            </Show>
        </main>
    }
}

/// Operator sign-in (the token is posted once, then forgotten: the server
/// answers with an `HttpOnly` session cookie) or, when signed in, sign-out.
#[component]
fn SessionControl(operator: RwSignal<bool>) -> impl IntoView {
    let token = RwSignal::new(String::new());
    let busy = RwSignal::new(false);
    let error = RwSignal::new(None::<String>);
    let sign_in = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        if busy.get_untracked() {
            return;
        }
        busy.set(true);
        let given = token.get_untracked();
        leptos::task::spawn_local(async move {
            let result = api::sign_in(given).await;
            busy.set(false);
            match result {
                Ok(()) => {
                    token.set(String::new());
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
                                    required
                                    data-testid="operator-token"
                                    bind:value=token
                                />
                            </label>
                            <button type="submit" disabled=move || busy.get()>
                                "Sign in"
                            </button>
                        </form>
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

#[component]
fn DeviceCard(
    device: RwSignal<Device>,
    now_ms: RwSignal<i64>,
    operator: RwSignal<bool>,
) -> impl IntoView {
    let id = device.with_untracked(|d| d.id.to_string());
    let metric_names =
        move || device.with(|d| d.status.metrics.keys().cloned().collect::<Vec<_>>());
    let power_on = move || device.with(|d| d.status.power_on == Some(true));
    // Its agent went away: unlike a device that never had one (`None`).
    let offline = move || device.with(|d| d.online == Some(false));
    let pending = RwSignal::new(false);
    let error = RwSignal::new(None::<String>);
    let device_id = id.clone();
    let toggle = move |_| {
        if pending.get_untracked() {
            return;
        }
        // Asks for the opposite of the confirmed state; shows nothing new
        // until the device's status event says it happened.
        let want = !power_on_untracked(device);
        pending.set(true);
        error.set(None);
        let device_id = device_id.clone();
        leptos::task::spawn_local(async move {
            let result = api::set_power(&device_id, want).await;
            // The card may be gone by now (its device vanished).
            let _ = pending.try_set(false);
            if let Err(failure) = result {
                let _ = error.try_set(Some(failure.message));
                if failure.unauthorized {
                    // The session ended: show the sign-in form again.
                    let _ = operator.try_set(false);
                }
            }
        });
    };
    view! {
        <article class="card" class:offline=offline data-testid="device" data-device=id>
            <header>
                <h2 data-testid="name">{move || device.with(|d| d.name.clone())}</h2>
                <span class="badges">
                    <Show when=offline>
                        <span class="badge offline" data-testid="offline">
                            "offline"
                        </span>
                    </Show>
                    <span class="power" class:on=power_on data-testid="power">
                        {move || match device.with(|d| d.status.power_on) {
                            Some(true) => "on",
                            Some(false) => "off",
                            None => "—",
                        }}
                    </span>
                </span>
            </header>
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
                        disabled=move || pending.get()
                        on:click=toggle.clone()
                    >
                        <span class="switch-track" aria-hidden="true">
                            <span class="switch-knob"></span>
                        </span>
                        "Power"
                    </button>
                </div>
            </Show>
            <Show when=move || error.with(Option::is_some)>
                <p class="command-error" role="alert" data-testid="command-error">
                    {move || error.get()}
                </p>
            </Show>
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

fn power_on_untracked(device: RwSignal<Device>) -> bool {
    device.with_untracked(|d| d.status.power_on == Some(true))
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
