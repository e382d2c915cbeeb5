//! "Recent changes": what devices' events changed besides their readings
//! (power, link, staleness, alerts, name; see [`Change`]), newest first. A
//! device's page lists its own; the dashboard lists every device's, each
//! line naming its device. The server renders the list from its store;
//! once hydrated, the page adds the changes of the events it follows, and
//! reads the list again when its stream starts afresh.

use super::chart;
use super::dashboard::{broken_limit, format_value};
use super::device_href;
use crate::model::{Change, Changed, Device, DeviceId, EventId};
use leptos::prelude::*;

/// A list of recent changes, as signals, and how long it may grow.
#[derive(Clone, Copy)]
pub struct Recent {
    pub list: RwSignal<Vec<Changed>>,
    limit: usize,
}

// The server renders; only the browser follows events.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
impl Recent {
    pub fn new(list: Vec<Changed>, limit: usize) -> Self {
        Self {
            list: RwSignal::new(list),
            limit,
        }
    }

    /// Adds what event `id` changed: from `before` (`None`: the device is
    /// new to the page) to `after`, at `at_ms` (the page's reckoning of the
    /// server's clock, near enough: the server records its own).
    pub fn follow(&self, id: EventId, before: Option<&Device>, after: &Device, at_ms: i64) {
        let new = Change::between(before, after);
        // Already listed (read with the page, or brought twice): once.
        let listed = || {
            self.list
                .with_untracked(|l| l.iter().any(|c| c.id == id && c.device == after.id))
        };
        if new.is_empty() || listed() {
            return;
        }
        let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default();
        let new = new.into_iter().map(|change| Changed {
            id,
            device: after.id.clone(),
            at,
            change,
        });
        self.list.update(|list| {
            list.splice(0..0, new);
            list.truncate(self.limit);
        });
    }

    /// `device` was removed, and its recorded changes with it.
    pub fn forget(&self, device: &DeviceId) {
        if self
            .list
            .with_untracked(|l| l.iter().any(|c| &c.device == device))
        {
            self.list.update(|l| l.retain(|c| &c.device != device));
        }
    }

    /// Reads the list again from the server (`device`'s, or every
    /// device's), keeping the changes the page added meanwhile from events
    /// the read did not see.
    pub fn reload(&self, device: Option<DeviceId>) {
        #[cfg(feature = "hydrate")]
        {
            let recent = *self;
            leptos::task::spawn_local(async move {
                match super::api::changes(device.as_ref(), recent.limit).await {
                    // The page may be gone by now.
                    Ok(read) => {
                        let _ = recent
                            .list
                            .try_update(|list| *list = reread(read.changes, list, recent.limit));
                    }
                    Err(e) => leptos::logging::warn!(
                        "the list of changes keeps what it has: {}",
                        e.message
                    ),
                }
            });
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = device;
    }
}

/// The changes read again from the server (newest first), and the ones
/// the page added meanwhile from events the read did not see yet; `limit`
/// in all.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
fn reread(read: Vec<Changed>, shown: &[Changed], limit: usize) -> Vec<Changed> {
    let seen = read.first().map(|c| c.id);
    let mut list: Vec<Changed> = shown
        .iter()
        .filter(|c| seen.is_none_or(|seen| c.id > seen))
        .cloned()
        .collect();
    list.extend(read);
    list.truncate(limit);
    list
}

/// A change in words.
pub fn change_text(change: &Change) -> String {
    match change {
        Change::Registered => "First seen".into(),
        Change::Renamed { name } => format!("Renamed to “{name}”"),
        Change::Power { on: true } => "Power on".into(),
        Change::Power { on: false } => "Power off".into(),
        Change::Online { online: true } => "Online: its agent connected".into(),
        Change::Online { online: false } => "Offline: its agent went away".into(),
        Change::Stale { stale: true } => "Stale: silent past its report interval".into(),
        Change::Stale { stale: false } => "Reporting again".into(),
        Change::Alert { metric, alert } => format!(
            "{} {}, {}",
            chart::title_of(metric),
            format_value(metric, alert.value),
            broken_limit(alert, chart::unit_of(metric))
        ),
        Change::AlertCleared { metric } => {
            format!("{} back within its limits", chart::title_of(metric))
        }
        Change::Limits { limits } if limits.is_empty() => {
            "Own limits cleared: the defaults apply".into()
        }
        Change::Limits { limits } => {
            let each = limits.iter().map(|(metric, l)| {
                let ends = [("min", l.min), ("max", l.max)]
                    .into_iter()
                    .filter_map(|(end, v)| Some(format!("{end} {}", format_value(metric, v?))));
                format!(
                    "{} {}",
                    chart::title_of(metric),
                    ends.collect::<Vec<_>>().join(", ")
                )
            });
            format!("Limits set: {}", each.collect::<Vec<_>>().join("; "))
        }
    }
}

/// The "Recent changes" section. With `name_of` (the dashboard's), each
/// line names its device, linked to its page; with `shows` (the
/// dashboard's card filter), only the lines of the devices it shows are.
#[component]
pub fn ChangeList(
    recent: Recent,
    #[prop(optional)] name_of: Option<Callback<DeviceId, String>>,
    #[prop(optional)] shows: Option<Callback<DeviceId, bool>>,
) -> impl IntoView {
    let changes = recent.list;
    let shown = move |device: &DeviceId| shows.is_none_or(|shows| shows.run(device.clone()));
    let none_shown = move || changes.with(|c| !c.is_empty() && !c.iter().any(|c| shown(&c.device)));
    view! {
        <section class="changes" data-testid="changes" aria-labelledby="changes-title">
            <h2 id="changes-title">"Recent changes"</h2>
            <Show
                when=move || changes.with(|c| !c.is_empty())
                fallback=|| {
                    view! {
                        <p class="no-data" data-testid="no-changes">
                            "No change of power, link, staleness, limits, alerts or name recorded yet."
                        </p>
                    }
                }
            >
                <Show when=none_shown>
                    <p class="no-data" data-testid="no-changes-shown">
                        "No recent change of the devices shown."
                    </p>
                </Show>
                <ol class="change-list">
                    <For
                        each=move || changes.get()
                        key=|c| {
                            (c.id, c.device.clone(), serde_json::to_string(&c.change).unwrap_or_default())
                        }
                        children=move |c| {
                            let device = name_of
                                .map(|name_of| {
                                    let id = c.device.clone();
                                    view! {
                                        <a
                                            class="change-device"
                                            href=device_href(&c.device)
                                            rel="external"
                                            data-testid="change-device"
                                        >
                                            {move || name_of.run(id.clone())}
                                        </a>
                                    }
                                });
                            let of = c.device.clone();
                            view! {
                                <li
                                    hidden=move || !shown(&of)
                                    data-testid="change"
                                    data-kind=c.change.kind()
                                    data-device=c.device.to_string()
                                >
                                    <time datetime=c.at.to_rfc3339()>
                                        {c.at.format("%Y-%m-%d %H:%M:%S UTC").to_string()}
                                    </time>
                                    {device}
                                    <span>{change_text(&c.change)}</span>
                                </li>
                            }
                        }
                    />
                </ol>
            </Show>
        </section>
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    #[test]
    fn limits_read_as_words() {
        use crate::model::{Limits, MetricLimits};
        let limits = MetricLimits::from([
            (
                "temperature".into(),
                Limits {
                    min: None,
                    max: Some(30.0),
                },
            ),
            (
                "humidity".into(),
                Limits {
                    min: Some(20.0),
                    max: Some(60.0),
                },
            ),
        ]);
        assert_eq!(
            change_text(&Change::Limits { limits }),
            "Limits set: Humidity min 20.0 %, max 60.0 %; Temperature max 30.0 °C"
        );
        let cleared = Change::Limits {
            limits: MetricLimits::new(),
        };
        assert_eq!(
            change_text(&cleared),
            "Own limits cleared: the defaults apply"
        );
    }

    #[test]
    fn changes_read_again_keep_the_ones_of_later_events() {
        let at = DateTime::from_timestamp_millis(0).unwrap();
        let power = |id, on| Changed {
            id,
            device: DeviceId::parse("rack-1").unwrap(),
            at,
            change: Change::Power { on },
        };
        let shown = [power(9, true), power(7, false)];
        let read = vec![power(8, true), power(7, false), power(5, true)];
        let ids = |list: Vec<Changed>| list.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(reread(read.clone(), &shown, 20)), [9, 8, 7, 5]);
        assert_eq!(ids(reread(Vec::new(), &shown, 20)), [9, 7]);
        assert_eq!(ids(reread(read, &shown, 2)), [9, 8]);
        let many: Vec<_> = (0..30).rev().map(|id| power(id, true)).collect();
        assert_eq!(reread(many, &shown, 20).len(), 20);
    }
}
