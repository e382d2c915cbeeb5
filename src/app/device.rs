//! A device's page, `/devices/{id}`: its current values and state, and a
//! line chart of each of its metrics over the last hour, day or week
//! (`?range=1h|24h|7d`, plain links, so it works without JavaScript).
//!
//! The server renders it with the history (see [`initial`]); once hydrated,
//! the page follows the device's own event stream (`/api/events?device=`)
//! and each changed value extends its chart.

use super::changes::{ChangeList, Recent};
use super::chart::{self, DAY_MS, HOUR_MS, LineChart};
use super::dashboard::{
    ConnectionIndicator, DeviceControls, LinkBadges, Value, alert_text, format_value, value_of,
};
use super::limits::{DeviceLimits, LimitsForm, MetricLimits};
use super::live::{self, Connection, Feed, Follower};
use super::{NotFound, device_href};
use crate::model::{Changed, Device, DeviceId, EventId, Point, Snapshot, Status, StatusEvent};
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::{use_params_map, use_query_map};
use serde::{Deserialize, Serialize};

/// The time range a device page shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Range {
    #[default]
    Hour,
    Day,
    Week,
}

impl Range {
    pub const ALL: [Range; 3] = [Range::Hour, Range::Day, Range::Week];

    /// From the `range` query parameter; the last hour unless it names another.
    pub fn parse(query: Option<&str>) -> Self {
        match query {
            Some("24h") => Self::Day,
            Some("7d") => Self::Week,
            _ => Self::Hour,
        }
    }

    /// The query parameter's value.
    pub fn query(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "24h",
            Self::Week => "7d",
        }
    }

    /// The link's text.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hour => "1 h",
            Self::Day => "24 h",
            Self::Week => "7 d",
        }
    }

    /// The range in words.
    pub fn words(self) -> &'static str {
        match self {
            Self::Hour => "the last hour",
            Self::Day => "the last 24 hours",
            Self::Week => "the last 7 days",
        }
    }

    pub fn window_ms(self) -> i64 {
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => DAY_MS,
            Self::Week => 7 * DAY_MS,
        }
    }

    /// The bucket width of the range's CSV download: 360, 1,440 or 1,008
    /// rows at most, within the history API's limit whatever the device's
    /// report rate.
    pub fn csv_step(self) -> &'static str {
        match self {
            Self::Hour => "10s",
            Self::Day => "1m",
            Self::Week => "10m",
        }
    }

    /// The history's bucket width when there are more than [`MAX_RAW_POINTS`]
    /// readings: a few hundred points a chart (240, 288, 336), whatever the
    /// device's report rate.
    pub fn step_ms(self) -> i64 {
        match self {
            Self::Hour => 15_000,
            Self::Day => 5 * 60_000,
            Self::Week => 30 * 60_000,
        }
    }
}

/// Up to this many readings in the range, a chart shows each of them;
/// with more, one point per [`Range::step_ms`] (their mean).
pub const MAX_RAW_POINTS: usize = 400;

/// The metrics of a status, in the order the page shows them: temperature,
/// humidity, then the extra metrics by name.
pub fn metrics_of(status: &Status) -> Vec<String> {
    let mut names = Vec::new();
    if status.temperature.is_some() {
        names.push("temperature".to_owned());
    }
    if status.humidity.is_some() {
        names.push("humidity".to_owned());
    }
    names.extend(status.metrics.keys().cloned());
    names
}

/// Changes a device page lists, newest first.
const PAGE_CHANGES: usize = 20;

/// One chart's data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub metric: String,
    pub points: Vec<Point>,
}

/// Follows a device's new state: each changed value is a new point of its
/// series (at the device's `updated_at`, as the store records it), a new
/// metric a new series; points older than the window go.
pub fn follow(series: &mut Vec<Series>, before: &Device, device: &Device, window_ms: i64) {
    let order = metrics_of(&device.status);
    let t = device.updated_at.timestamp_millis();
    for metric in &order {
        let now = value_of(&device.status, metric);
        let was = value_of(&before.status, metric);
        let Some(v) = now.filter(|_| now != was) else {
            continue;
        };
        let at = match series.iter().position(|s| &s.metric == metric) {
            Some(at) => at,
            None => {
                series.push(Series {
                    metric: metric.clone(),
                    points: Vec::new(),
                });
                series.len() - 1
            }
        };
        chart::append(&mut series[at].points, t, v, window_ms);
    }
    series.sort_by_key(|s| order.iter().position(|m| *m == s.metric));
}

/// What the server knew when it rendered the page.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Initial {
    event_id: EventId,
    now_ms: i64,
    /// `None`: no such device.
    device: Option<Device>,
    series: Vec<Series>,
    /// Its last [`PAGE_CHANGES`] changes, newest first.
    changes: Vec<Changed>,
    /// The limits for the metrics the device has none of its own for (its
    /// own come with it).
    default_limits: MetricLimits,
    /// The request's cookie is a live operator session: render the limits form.
    operator: bool,
}

/// The page's data, read on a blocking thread before the render (see
/// [`super::read_ahead`]); read here only when the request did not pass there.
#[cfg(feature = "ssr")]
fn initial(id: Option<DeviceId>, range: Range) -> Initial {
    use crate::server::hub::Hub;
    use std::sync::Arc;
    let parts = use_context::<axum::http::request::Parts>();
    if let Some(initial) = parts.as_ref().and_then(|p| p.extensions.get::<Initial>()) {
        return initial.clone();
    }
    use crate::server::auth::Auth;
    let hub = expect_context::<Arc<Hub>>();
    // No request parts when the app is rendered to list its routes.
    let operator = match (parts, use_context::<Arc<Auth>>()) {
        (Some(parts), Some(auth)) => auth.session(&parts.headers, &hub).is_some(),
        _ => false,
    };
    read(&hub, id, range, operator)
}

/// What the page of device `id` renders from: the device, and its charts
/// over `range` from the history (blocking reads).
#[cfg(feature = "ssr")]
pub(super) fn read(
    hub: &crate::server::hub::Hub,
    id: Option<DeviceId>,
    range: Range,
    operator: bool,
) -> Initial {
    use crate::server::hub::Filter;
    let now = chrono::Utc::now();
    let Some(id) = id else {
        return Initial {
            now_ms: now.timestamp_millis(),
            ..Initial::default()
        };
    };
    // The device and the event id it is current at, together.
    let snapshot = hub.snapshot(&Filter::new([id.clone()]));
    // After the snapshot: every reading it shows is in the history.
    let now = chrono::Utc::now();
    let device = snapshot.devices.into_iter().find(|d| d.id == id);
    let from = now - chrono::TimeDelta::milliseconds(range.window_ms());
    let series = device
        .as_ref()
        .map(|d| metrics_of(&d.status))
        .unwrap_or_default()
        .into_iter()
        .map(|metric| {
            let history =
                hub.history(&id, &metric, from, now, None)
                    .and_then(|raw| match raw.points.len() {
                        n if n <= MAX_RAW_POINTS => Ok(raw),
                        _ => hub.history(&id, &metric, from, now, Some(range.step_ms())),
                    });
            let points = match history {
                Ok(history) => history.points.into_iter().map(chart::compact).collect(),
                Err(e) => {
                    tracing::warn!("no history of {id} {metric}: {e}");
                    Vec::new()
                }
            };
            Series { metric, points }
        })
        .collect();
    let mut changes = match device {
        Some(_) => hub.changes(Some(&id), PAGE_CHANGES).unwrap_or_else(|e| {
            tracing::warn!("no changes of {id}: {e}");
            Vec::new()
        }),
        None => Vec::new(),
    };
    // Those of events after the snapshot come again with the stream.
    changes.retain(|c| c.id <= snapshot.event_id);
    Initial {
        event_id: snapshot.event_id,
        now_ms: now.timestamp_millis(),
        device,
        series,
        changes,
        default_limits: hub.thresholds().defaults,
        operator,
    }
}

#[cfg(not(feature = "ssr"))]
fn initial(_: Option<DeviceId>, _: Range) -> Initial {
    Initial::default()
}

/// The page's signals.
#[derive(Clone, Copy)]
struct Page {
    feed: Feed,
    device: RwSignal<Device>,
    series: RwSignal<Vec<Series>>,
    changes: Recent,
    range: Range,
    /// The device was removed: the page keeps its last state, without
    /// history, until a new report registers it again.
    removed: RwSignal<bool>,
}

#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
impl Page {
    /// Reads each chart's points again from the server's history, keeping
    /// the ones events added since (see [`chart::reloaded`]).
    fn reload(&self) {
        #[cfg(feature = "hydrate")]
        {
            let page = *self;
            let id = self.device.with_untracked(|d| d.id.to_string());
            let metrics: Vec<String> = self
                .series
                .with_untracked(|all| all.iter().map(|s| s.metric.clone()).collect());
            self.changes
                .reload(self.device.with_untracked(|d| Some(d.id.clone())));
            leptos::task::spawn_local(async move {
                let from = page.feed.now() - page.range.window_ms();
                for metric in metrics {
                    let raw = super::api::history(&id, &metric, from, None).await;
                    let history = match raw {
                        Ok(history) if history.points.len() <= MAX_RAW_POINTS => Ok(history),
                        _ => {
                            let step = Some(page.range.step_ms());
                            super::api::history(&id, &metric, from, step).await
                        }
                    };
                    match history {
                        Ok(history) => {
                            // The page may be gone by now.
                            let _ = page.series.try_update(|all| {
                                if let Some(series) = all.iter_mut().find(|s| s.metric == metric) {
                                    series.points = chart::reloaded(history, &series.points);
                                }
                            });
                        }
                        Err(e) => leptos::logging::warn!(
                            "the chart of {metric} keeps what it has: {}",
                            e.message
                        ),
                    }
                }
            });
        }
    }

    /// The device went away: its last state stays, its history (deleted
    /// with it) goes.
    fn removed(&self) {
        self.removed.set(true);
        self.series.set(Vec::new());
        self.changes.list.set(Vec::new());
    }

    /// The device's new state; `event` names the event that brought it
    /// (none for a snapshot: the changes in between are read again).
    fn apply(&self, device: Device, event: Option<EventId>) {
        let before = self.device.get_untracked();
        if device.id != before.id {
            return;
        }
        let was_removed = self.removed.get_untracked();
        if was_removed {
            self.removed.set(false);
        }
        if let Some(id) = event {
            let previous = (!was_removed).then_some(&before);
            self.changes.follow(id, previous, &device, self.feed.now());
        }
        // Back after a removal, its history gone with it: every value it
        // shows starts its chart again, changed or not.
        let blank;
        let from = match was_removed {
            true => {
                blank = Device {
                    status: Status::default(),
                    ..before.clone()
                };
                &blank
            }
            false => &before,
        };
        let window = self.range.window_ms();
        self.series
            .update(|series| follow(series, from, &device, window));
        self.device.set(device);
    }
}

impl Follower for Page {
    fn snapshot(&self, snapshot: Snapshot) {
        let id = self.device.with_untracked(|d| d.id.clone());
        match snapshot.devices.into_iter().find(|d| d.id == id) {
            Some(device) => self.apply(device, None),
            None => self.removed(),
        }
        // The stream started afresh: events were missed (this page fell
        // behind, or the server lost track of it), and with them points.
        self.reload();
    }

    fn status(&self, id: EventId, event: StatusEvent) {
        match event.removed {
            true if self.device.with_untracked(|d| d.id == event.device) => self.removed(),
            true => {}
            false => self.apply(event.into_device(), Some(id)),
        }
    }
}

#[component]
pub fn DevicePage() -> impl IntoView {
    let params = use_params_map();
    let query = use_query_map();
    let id = params
        .with_untracked(|p| p.get("id"))
        .and_then(|id| DeviceId::parse(&id).ok());
    let range = Range::parse(query.with_untracked(|q| q.get("range")).as_deref());
    let given = params.with_untracked(|p| p.get("id")).unwrap_or_default();
    let initial = SharedValue::new(move || initial(id, range)).into_inner();
    let Some(device) = initial.device else {
        return view! { <NotFound what=format!("There is no device \"{given}\".") /> }.into_any();
    };
    let feed = Feed::new(initial.now_ms);
    let id = device.id.clone();
    let page = Page {
        feed,
        device: RwSignal::new(device),
        series: RwSignal::new(initial.series),
        changes: Recent::new(initial.changes, PAGE_CHANGES),
        range,
        removed: RwSignal::new(false),
    };
    live::connect(feed, Some(id.clone()), initial.event_id, page);
    let device = page.device;
    let name = move || device.with(|d| d.name.clone());
    let offline = move || device.with(|d| d.online == Some(false));
    let alerting = move || device.with(|d| !d.alerts.is_empty());
    let metrics = move || device.with(|d| metrics_of(&d.status));
    let href = device_href(&id);
    let csv_of = id.clone();
    let limits = DeviceLimits::new(device, initial.default_limits);
    let operator = RwSignal::new(initial.operator);
    // Effects run in the browser only, once hydrated.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));

    view! {
        <Title text=move || format!("{} · Telltale", name()) />
        <header class="top">
            <a class="back" href="/" rel="external" data-testid="back">
                "← All devices"
            </a>
            <h1 data-testid="name">{name}</h1>
            <span class="badges">
                <LinkBadges device=device />
                <Show when=alerting>
                    <span class="badge alerting" data-testid="alerting">
                        "alert"
                    </span>
                </Show>
            </span>
            <ConnectionIndicator feed=feed />
        </header>
        <main
            class="device-page"
            class:stale=move || feed.connection.get() != Connection::Live
            data-testid="device-page"
            data-device=id.to_string()
        >
            <Show when=move || page.removed.get()>
                <p class="removed-note" role="status" data-testid="removed">
                    "This device was removed, with its history: shown is its last state. \
                     Its next report brings it back."
                </p>
            </Show>
            <section class="current" class:alerting=alerting class:offline=offline>
                <DeviceControls device operator hydrated />
                <dl class="readings">
                    <For
                        each=metrics
                        key=|m| m.clone()
                        children=move |metric| {
                            let m = metric.clone();
                            let alert = Signal::derive(move || device.with(|d| alert_text(d, &m)));
                            let m = metric.clone();
                            let value = move || {
                                device
                                    .with(|d| value_of(&d.status, &m).map(|v| format_value(&m, v)))
                                    .unwrap_or_else(|| "—".into())
                            };
                            view! {
                                <div
                                    data-testid="reading"
                                    data-metric=metric.clone()
                                    class:alerting=move || alert.with(Option::is_some)
                                >
                                    <dt>{chart::title_of(&metric)}</dt>
                                    <dd data-testid="value">
                                        <Value alert>{value}</Value>
                                    </dd>
                                </div>
                            }
                        }
                    />
                    <div data-testid="reading" data-metric="power">
                        <dt>"Power"</dt>
                        <dd data-testid="power">
                            {move || match device.with(|d| d.status.power_on) {
                                Some(true) => "on",
                                Some(false) => "off",
                                None => "—",
                            }}
                        </dd>
                    </div>
                </dl>
                <p class="updated" data-testid="updated">
                    {move || {
                        let at = device.with(|d| d.updated_at);
                        format!("last change {} UTC", at.format("%Y-%m-%d %H:%M:%S"))
                    }}
                </p>
            </section>
            {
                let id = id.clone();
                view! {
                    <Show when=move || operator.get()>
                        <LimitsForm
                            device=id.clone()
                            limits
                            metrics=Signal::derive(metrics)
                            hydrated
                        />
                    </Show>
                }
            }
            <nav class="ranges" aria-label="Time range" data-testid="ranges">
                {Range::ALL
                    .into_iter()
                    .map(|r| {
                        view! {
                            <a
                                href=format!("{href}?range={}", r.query())
                                rel="external"
                                aria-current=(r == range).then_some("page")
                                class:current=r == range
                            >
                                {r.label()}
                            </a>
                        }
                    })
                    .collect_view()}
            </nav>
            <section class="charts">
                <For
                    each=move || page.series.with(|s| s.iter().map(|s| s.metric.clone()).collect::<Vec<_>>())
                    key=|m| m.clone()
                    children=move |metric| {
                        let m = metric.clone();
                        let points = Memo::new(move |_| {
                            page.series
                                .with(|s| {
                                    s.iter()
                                        .find(|s| s.metric == m)
                                        .map(|s| s.points.clone())
                                        .unwrap_or_default()
                                })
                        });
                        let download = (
                            format!(
                                "/api/devices/{csv_of}/history.csv?metric={metric}&from={}&step={}",
                                range.query(),
                                range.csv_step(),
                            ),
                            format!("{csv_of}-{metric}-{}.csv", range.query()),
                        );
                        let m = metric.clone();
                        let limits = Signal::derive(move || limits.of(&m));
                        view! {
                            <LineChart
                                metric
                                download
                                points=points.into()
                                now_ms=feed.now_ms.into()
                                window_ms=range.window_ms()
                                range_label=range.words()
                                limits
                            />
                        }
                    }
                />
                <Show when=move || page.series.with(Vec::is_empty)>
                    <p class="no-data" data-testid="no-data">
                        {move || {
                            if page.removed.get() {
                                "Its history was removed with it."
                            } else {
                                "This device has reported no readings yet."
                            }
                        }}
                    </p>
                </Show>
            </section>
            <ChangeList recent=page.changes />
        </main>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ranges_come_from_the_query_and_default_to_an_hour() {
        assert_eq!(Range::parse(None), Range::Hour);
        assert_eq!(Range::parse(Some("24h")), Range::Day);
        assert_eq!(Range::parse(Some("7d")), Range::Week);
        assert_eq!(Range::parse(Some("nonsense")), Range::Hour);
        for r in Range::ALL {
            assert_eq!(Range::parse(Some(r.query())), r);
            assert!(r.window_ms() / r.step_ms() <= 400, "{r:?}: too many points");
        }
    }

    #[test]
    fn metrics_come_in_page_order() {
        let status = Status {
            temperature: Some(20.0),
            humidity: None,
            power_on: Some(true),
            metrics: BTreeMap::from([("zeta".into(), 1.0), ("alpha".into(), 2.0)]),
        };
        assert_eq!(metrics_of(&status), ["temperature", "alpha", "zeta"]);
        assert!(metrics_of(&Status::default()).is_empty());
    }

    #[test]
    fn a_device_back_after_its_removal_charts_every_value_again() {
        let owner = Owner::new();
        owner.with(|| {
            let status = Status {
                temperature: Some(20.0),
                humidity: Some(40.0),
                ..Status::default()
            };
            let page = Page {
                feed: Feed::new(0),
                device: RwSignal::new(Device::sample(1_000, status.clone())),
                series: RwSignal::new(Vec::new()),
                changes: Recent::new(Vec::new(), 10),
                range: Range::Hour,
                removed: RwSignal::new(false),
            };
            page.removed();
            // Registered again with the same values, one changed.
            let back = Status {
                temperature: Some(21.0),
                ..status
            };
            page.apply(Device::sample(2_000, back), Some(7));
            let charted: Vec<_> = page.series.with_untracked(|series| {
                series
                    .iter()
                    .map(|s| (s.metric.clone(), s.points.len()))
                    .collect()
            });
            assert_eq!(
                charted,
                [("temperature".to_owned(), 1), ("humidity".to_owned(), 1)]
            );
            assert!(!page.removed.get_untracked());
        });
    }

    #[test]
    fn changed_values_extend_their_series_and_new_metrics_get_one() {
        let before = Device::sample(
            1_000,
            Status {
                temperature: Some(20.0),
                humidity: Some(40.0),
                ..Status::default()
            },
        );
        let mut series = vec![
            Series {
                metric: "temperature".into(),
                points: vec![chart::compact(Point {
                    t: 1_000,
                    v: 20.0,
                    min: None,
                    max: None,
                })],
            },
            Series {
                metric: "humidity".into(),
                points: Vec::new(),
            },
        ];
        let after = Device::sample(
            5_000,
            Status {
                temperature: Some(21.5),
                humidity: Some(40.0),
                metrics: BTreeMap::from([("fan_rpm".into(), 900.0)]),
                ..Status::default()
            },
        );
        follow(&mut series, &before, &after, HOUR_MS);
        let metrics: Vec<_> = series.iter().map(|s| s.metric.as_str()).collect();
        assert_eq!(metrics, ["temperature", "humidity", "fan_rpm"]);
        assert_eq!(
            series[0]
                .points
                .iter()
                .map(|p| (p.t, p.v))
                .collect::<Vec<_>>(),
            [(1_000, 20.0), (5_000, 21.5)]
        );
        assert!(
            series[1].points.is_empty(),
            "an unchanged value adds nothing"
        );
        assert_eq!(series[2].points.len(), 1);
        // An hour later the window has moved on: the old value in force at
        // its start stays, nothing older.
        let later = Device::sample(
            5_000 + 2 * HOUR_MS,
            Status {
                temperature: Some(22.0),
                ..after.status.clone()
            },
        );
        follow(&mut series, &after, &later, HOUR_MS);
        assert_eq!(
            series[0].points.iter().map(|p| p.t).collect::<Vec<_>>(),
            [5_000, 5_000 + 2 * HOUR_MS]
        );
    }
}
