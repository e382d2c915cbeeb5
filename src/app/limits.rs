//! A device's limits on its page. The charts draw those in force (the
//! device's own, else the defaults); a signed-in operator also gets a form
//! that sets the device's own (`PUT /api/devices/{id}/thresholds`), an
//! empty field leaving that end open, or to its default.

use super::api;
use super::chart::title_of;
pub use crate::model::MetricLimits;
use crate::model::{Device, DeviceId, Limits, limits_in_force};
use leptos::prelude::*;
use std::collections::BTreeMap;

/// A device's limits, as its page keeps them.
#[derive(Clone, Copy)]
pub struct DeviceLimits {
    /// Its own, set over the API or by the thresholds file: as its last
    /// event has them, so a change made anywhere shows at once.
    pub own: Memo<MetricLimits>,
    /// The defaults, for the metrics it has none of its own.
    pub defaults: StoredValue<MetricLimits>,
}

impl DeviceLimits {
    pub fn new(device: RwSignal<Device>, defaults: MetricLimits) -> Self {
        Self {
            own: Memo::new(move |_| device.with(|d| d.limits.clone())),
            defaults: StoredValue::new(defaults),
        }
    }

    /// The limits in force for `metric`.
    pub fn of(&self, metric: &str) -> Limits {
        let in_force = self
            .own
            .with(|own| self.defaults.with_value(|d| limits_in_force(Some(own), d)));
        in_force.get(metric).copied().unwrap_or_default()
    }
}

/// One field of the form, as typed.
type Draft = BTreeMap<String, (String, String)>;

fn text(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The fields of one metric's limits.
fn row(l: Option<&Limits>) -> (String, String) {
    let l = l.copied().unwrap_or_default();
    (text(l.min), text(l.max))
}

/// Fills the fields of `metrics` from the device's own limits, now `own`
/// and `was` when last filled: a new metric's fields, and those still as
/// filled. Fields the operator is editing stay as typed.
fn refill(draft: &mut Draft, metrics: Vec<String>, was: &MetricLimits, own: &MetricLimits) {
    for m in metrics {
        let fresh = row(own.get(&m));
        match draft.get_mut(&m) {
            Some(typed) if *typed == row(was.get(&m)) => *typed = fresh,
            Some(_) => {}
            None => {
                draft.insert(m, fresh);
            }
        }
    }
}

/// The limits a draft sets: each metric with at least one end, a typed
/// number each. An end that is not a number is refused, naming it.
pub fn parse(draft: &Draft) -> Result<MetricLimits, String> {
    let end = |metric: &str, which: &str, typed: &str| -> Result<Option<f64>, String> {
        let typed = typed.trim();
        if typed.is_empty() {
            return Ok(None);
        }
        match typed.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(format!(
                "{} {which}: “{typed}” is not a number",
                title_of(metric)
            )),
        }
    };
    let mut limits = MetricLimits::new();
    for (metric, (min, max)) in draft {
        let l = Limits {
            min: end(metric, "min", min)?,
            max: end(metric, "max", max)?,
        };
        if l.min.is_some() || l.max.is_some() {
            limits.insert(metric.clone(), l);
        }
    }
    Ok(limits)
}

/// The operator's form: min and max of each of the device's `metrics`,
/// prefilled with its own limits, the defaults shown as placeholders.
#[component]
pub fn LimitsForm(
    device: DeviceId,
    limits: DeviceLimits,
    #[prop(into)] metrics: Signal<Vec<String>>,
    hydrated: RwSignal<bool>,
) -> impl IntoView {
    let draft = RwSignal::new(Draft::new());
    // The fields follow the metrics and the limits (set here or anywhere).
    let filled = StoredValue::new(MetricLimits::new());
    Effect::new(move |_| {
        let (names, own) = (metrics.get(), limits.own.get());
        draft.update(|d| filled.with_value(|was| refill(d, names, was, &own)));
        filled.set_value(own);
    });
    let busy = RwSignal::new(false);
    let outcome = RwSignal::new(None::<Result<(), String>>);
    let save = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        if busy.get_untracked() {
            return;
        }
        let set = match draft.with_untracked(parse) {
            Ok(set) => set,
            Err(why) => {
                outcome.set(Some(Err(why)));
                return;
            }
        };
        busy.set(true);
        let device = device.clone();
        leptos::task::spawn_local(async move {
            let result = api::set_limits(device.as_str(), &set).await;
            busy.set(false);
            match result {
                // Its event brings the limits; the fields read as stored.
                Ok(()) => {
                    draft.update(|d| {
                        for (m, typed) in d.iter_mut() {
                            *typed = row(set.get(m));
                        }
                    });
                    outcome.set(Some(Ok(())));
                }
                Err(failure) => outcome.set(Some(Err(failure.message))),
            }
        });
    };
    let placeholder = move |metric: &str, min: bool| {
        let d = limits.defaults.with_value(|d| d.get(metric).copied());
        match d.and_then(|d| if min { d.min } else { d.max }) {
            Some(v) => format!("default {v}"),
            None => "none".to_owned(),
        }
    };
    view! {
        <section class="limits-form" data-testid="limits">
            <h2>"Limits"</h2>
            <form on:submit=save>
                <table>
                    <thead>
                        <tr>
                            <th scope="col">"Reading"</th>
                            <th scope="col">"min"</th>
                            <th scope="col">"max"</th>
                        </tr>
                    </thead>
                    <tbody>
                        <For
                            each=move || metrics.get()
                            key=|m| m.clone()
                            children=move |metric| {
                                let of = metric.clone();
                                let field = move |min: bool| {
                                    let m = of.clone();
                                    let read = m.clone();
                                    let name = format!("{m}.{}", if min { "min" } else { "max" });
                                    view! {
                                        <input
                                            type="text"
                                            inputmode="decimal"
                                            name=name
                                            aria-label=format!("{} {}", title_of(&m), if min { "min" } else { "max" })
                                            placeholder=placeholder(&m, min)
                                            data-testid=if min { "limit-min" } else { "limit-max" }
                                            prop:value=move || {
                                                draft.with(|d| {
                                                    d.get(&read)
                                                        .map(|(lo, hi)| if min { lo.clone() } else { hi.clone() })
                                                        .unwrap_or_default()
                                                })
                                            }
                                            on:input=move |ev| {
                                                let typed = event_target_value(&ev);
                                                draft.update(|d| {
                                                    let entry = d.entry(m.clone()).or_default();
                                                    if min { entry.0 = typed } else { entry.1 = typed }
                                                });
                                            }
                                        />
                                    }
                                };
                                view! {
                                    <tr data-metric=metric.clone()>
                                        <th scope="row">{title_of(&metric)}</th>
                                        <td>{field(true)}</td>
                                        <td>{field(false)}</td>
                                    </tr>
                                }
                            }
                        />
                    </tbody>
                </table>
                <button
                    type="submit"
                    data-testid="save-limits"
                    disabled=move || busy.get() || !hydrated.get()
                >
                    "Save limits"
                </button>
                {move || match outcome.get() {
                    Some(Ok(())) => {
                        view! { <span class="saved" role="status" data-testid="limits-saved">"Saved"</span> }
                            .into_any()
                    }
                    Some(Err(why)) => {
                        view! {
                            <span class="session-error" role="alert" data-testid="limits-error">
                                {why}
                            </span>
                        }
                            .into_any()
                    }
                    None => ().into_any(),
                }}
            </form>
        </section>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_limits_fill_the_fields_no_one_is_editing() {
        let max = |v| Limits {
            min: None,
            max: Some(v),
        };
        let metrics = || vec!["temperature".to_owned(), "humidity".to_owned()];
        let mut draft = Draft::new();
        let first = MetricLimits::from([("temperature".into(), max(30.0))]);
        refill(&mut draft, metrics(), &MetricLimits::new(), &first);
        assert_eq!(draft["temperature"], (String::new(), "30".into()));
        assert_eq!(draft["humidity"], (String::new(), String::new()));
        // The operator is typing a humidity limit as another sets both.
        draft.get_mut("humidity").unwrap().1 = "7".into();
        let second = MetricLimits::from([
            ("temperature".into(), max(25.5)),
            ("humidity".into(), max(60.0)),
        ]);
        refill(&mut draft, metrics(), &first, &second);
        assert_eq!(draft["temperature"], (String::new(), "25.5".into()));
        assert_eq!(draft["humidity"], (String::new(), "7".into()));
        // A new metric gets its fields; the typed ones stay.
        let more = [metrics(), vec!["load".into()]].concat();
        refill(&mut draft, more, &second, &second);
        assert_eq!(draft["load"], (String::new(), String::new()));
        assert_eq!(draft["humidity"].1, "7");
    }

    #[test]
    fn a_draft_sets_the_limits_typed_and_refuses_what_is_no_number() {
        let draft = |rows: &[(&str, &str, &str)]| -> Draft {
            rows.iter()
                .map(|(m, lo, hi)| (m.to_string(), (lo.to_string(), hi.to_string())))
                .collect()
        };
        let set = parse(&draft(&[
            ("temperature", "", " -15 "),
            ("humidity", "", ""),
            ("load", "0.5", "2e1"),
        ]))
        .unwrap();
        assert_eq!(
            set,
            MetricLimits::from([
                (
                    "load".into(),
                    Limits {
                        min: Some(0.5),
                        max: Some(20.0)
                    }
                ),
                (
                    "temperature".into(),
                    Limits {
                        min: None,
                        max: Some(-15.0)
                    }
                ),
            ])
        );
        let wrong = parse(&draft(&[("temperature", "cold", "")])).unwrap_err();
        assert_eq!(wrong, "Temperature min: “cold” is not a number");
        assert!(parse(&draft(&[("humidity", "NaN", "")])).is_err());
    }
}
