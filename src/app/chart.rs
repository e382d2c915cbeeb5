//! Charts drawn as SVG by Leptos components, no chart library: a sparkline
//! for the dashboard's cards and a line chart with axes for device pages.
//!
//! Readings are change-only: a value holds from its time until the next
//! point. So both draw step lines, and the last value runs on to "now". The
//! math (scales, ticks, paths, live appends) is plain functions, tested below.
//!
//! Times are shown in UTC, on the server and in the browser alike: the page
//! is rendered on the server, and a label in the browser's own time zone
//! would not match what hydration finds.

use crate::model::{History, Limits, Point};
use chrono::DateTime;
use leptos::prelude::*;
use std::fmt::Write;

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Maps a domain linearly onto a range (of SVG user units).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    d0: f64,
    d1: f64,
    r0: f64,
    r1: f64,
}

impl Scale {
    pub fn new((d0, d1): (f64, f64), (r0, r1): (f64, f64)) -> Self {
        Self { d0, d1, r0, r1 }
    }

    /// An empty domain maps to the middle of the range. Computed on
    /// halves, so a domain as wide as f64 allows (a metric may be any finite
    /// number) does not overflow into NaN.
    pub fn map(&self, v: f64) -> f64 {
        if self.d1 == self.d0 {
            (self.r0 + self.r1) / 2.0
        } else {
            let (v, d0, d1) = (v / 2.0, self.d0 / 2.0, self.d1 / 2.0);
            self.r0 + (v - d0) / (d1 - d0) * (self.r1 - self.r0)
        }
    }
}

/// A step of 1, 2 or 5 × 10ⁿ that cuts `span` into about `target` parts.
pub fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span.abs() / target.max(1) as f64;
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A value axis: ticks at a nice step, from the first tick to the last.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueAxis {
    pub min: f64,
    pub max: f64,
    pub step: f64,
    pub ticks: Vec<f64>,
}

impl ValueAxis {
    /// The axis for these values, about `target` ticks; `None` without any
    /// finite value. A flat series (one value) gets room above and below.
    pub fn fit(values: impl IntoIterator<Item = f64>, target: usize) -> Option<Self> {
        let (lo, hi) = values.into_iter().filter(|v| v.is_finite()).fold(
            None,
            |acc: Option<(f64, f64)>, v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            },
        )?;
        let (lo, hi) = if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
            ((lo - pad).max(f64::MIN), (hi + pad).min(f64::MAX))
        } else {
            (lo, hi)
        };
        let step = nice_step(hi - lo, target);
        let first = (lo / step).floor();
        let last = (hi / step).ceil();
        let ticks: Vec<f64> = if (last - first).is_finite() && last - first <= 100.0 {
            (0..=(last - first) as i64)
                .map(|i| clean((first + i as f64) * step, step))
                .collect()
        } else {
            Vec::new()
        };
        if ticks.is_empty() || ticks.iter().any(|t| !t.is_finite()) {
            // Values too far apart for round ticks, or round ticks past
            // f64's limits.
            return Some(Self {
                min: lo,
                max: hi,
                step: hi / 2.0 - lo / 2.0,
                ticks: vec![lo, hi],
            });
        }
        Some(Self {
            min: ticks[0],
            max: *ticks.last().expect("at least one tick"),
            step,
            ticks,
        })
    }

    /// A tick's label, with as many decimals as the step needs.
    pub fn label(&self, v: f64) -> String {
        format!("{v:.*}", decimals(self.step))
    }
}

/// Decimals that show a multiple of `step` exactly (1 → 0, 0.5 → 1, 0.02 → 2).
fn decimals(step: f64) -> usize {
    if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    }
}

/// `v` rounded to the decimals of `step`: 0.30000000000000004 becomes 0.3.
fn clean(v: f64, step: f64) -> f64 {
    let scale = 10f64.powi(decimals(step) as i32);
    let v = (v * scale).round() / scale;
    if v == 0.0 { 0.0 } else { v }
}

/// Time steps that make readable ticks.
const TIME_STEPS: [i64; 15] = [
    MINUTE_MS,
    2 * MINUTE_MS,
    5 * MINUTE_MS,
    10 * MINUTE_MS,
    15 * MINUTE_MS,
    30 * MINUTE_MS,
    HOUR_MS,
    2 * HOUR_MS,
    3 * HOUR_MS,
    6 * HOUR_MS,
    12 * HOUR_MS,
    DAY_MS,
    2 * DAY_MS,
    7 * DAY_MS,
    30 * DAY_MS,
];

/// Ticks for the time axis `from ..= to`, at most `max` of them, on round
/// UTC times (whole minutes, hours, midnights). Returns the step too.
pub fn time_ticks(from: i64, to: i64, max: usize) -> (i64, Vec<i64>) {
    let span = (to - from).max(1);
    let step = TIME_STEPS
        .iter()
        .copied()
        .find(|s| span / s < max.max(1) as i64)
        .unwrap_or(TIME_STEPS[TIME_STEPS.len() - 1]);
    let first = from.div_euclid(step) * step + if from.rem_euclid(step) == 0 { 0 } else { step };
    let ticks = (0..)
        .map(|i| first + i * step)
        .take_while(|t| *t <= to)
        .collect();
    (step, ticks)
}

/// A time tick's label in UTC: the day for day steps, else the time of day.
pub fn time_label(t: i64, step: i64) -> String {
    let Some(at) = DateTime::from_timestamp_millis(t) else {
        return String::new();
    };
    if step >= DAY_MS {
        at.format("%b %-d").to_string()
    } else {
        at.format("%H:%M").to_string()
    }
}

/// The SVG path of a step line over `from ..= end`: each value holds until
/// the next point, the last one until `end`. The point in force at `from`
/// (the last one before it) starts the line at `from`; later points than
/// `end` are left out. Empty when nothing is in the window.
pub fn step_path(points: &[Point], from: i64, end: i64, x: Scale, y: Scale) -> String {
    let start = points.partition_point(|p| p.t <= from).saturating_sub(1);
    let mut d = String::new();
    let mut visible = points[start..].iter().filter(|p| p.t <= end).peekable();
    while let Some(p) = visible.next() {
        let t0 = p.t.max(from);
        let t1 = visible.peek().map_or(end, |n| n.t.min(end));
        // To a tenth, written shortest ("12", not "12.0"): shorter pages,
        // and Rust's shortest float formatting is much faster than `{:.1}`.
        let y0 = round1(y.map(p.v));
        if d.is_empty() {
            let _ = write!(d, "M{},{y0}", round1(x.map(t0 as f64)));
        } else {
            let _ = write!(d, "V{y0}");
        }
        let _ = write!(d, "H{}", round1(x.map(t1 as f64)));
    }
    d
}

/// The points of `points` drawn in the window `from ..= end`: those inside
/// it and the one in force at its start.
pub fn in_window(points: &[Point], from: i64, end: i64) -> &[Point] {
    let start = points.partition_point(|p| p.t <= from).saturating_sub(1);
    let stop = points.partition_point(|p| p.t <= end);
    if start >= stop {
        &[]
    } else {
        &points[start..stop]
    }
}

/// Adds a live reading `v` at `t` to a series (in time order; an exact
/// repeat of a point it has is ignored), then drops what a window of
/// `window_ms` ending at the newest point no longer shows: every point
/// before the window except the one still in force at its start.
pub fn append(points: &mut Vec<Point>, t: i64, v: f64, window_ms: i64) {
    let at = points.partition_point(|p| p.t <= t);
    if at > 0 && points[at - 1].t == t && points[at - 1].v == v {
        return;
    }
    points.insert(
        at,
        Point {
            t,
            v,
            min: None,
            max: None,
        },
    );
    let newest = points.last().map_or(t, |p| p.t);
    trim(points, newest - window_ms);
}

/// [`append`] for a line drawn a point per `step_ms` (as the server
/// renders it): a reading within `step_ms` of the newest point replaces
/// that point's value instead of adding a point, so live updates keep the
/// line as coarse as its history, and it still ends at the current value.
pub fn append_coarse(points: &mut Vec<Point>, t: i64, v: f64, window_ms: i64, step_ms: i64) {
    if let Some(last) = points.last_mut()
        && (last.t..last.t + step_ms).contains(&t)
    {
        last.v = v;
        return;
    }
    append(points, t, v, window_ms);
}

/// A point as a page carries it: its value to 3 decimals and no min/max,
/// which keeps the data serialized into the page small.
pub fn compact(p: Point) -> Point {
    Point {
        t: p.t,
        v: (p.v * 1000.0).round() / 1000.0,
        min: None,
        max: None,
    }
}

/// A chart's points read afresh from the history, followed by those of
/// `current` newer than the read (added by events that came meanwhile).
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
pub fn reloaded(history: History, current: &[Point]) -> Vec<Point> {
    let upto = history.to.timestamp_millis();
    let mut points: Vec<Point> = history.points.into_iter().map(compact).collect();
    points.extend(current.iter().filter(|p| p.t > upto).cloned());
    points
}

/// Drops the points before `from`, except the one in force at `from`.
pub fn trim(points: &mut Vec<Point>, from: i64) {
    let keep = points.partition_point(|p| p.t <= from).saturating_sub(1);
    points.drain(..keep);
}

/// The unit of a metric, for axes and values: known names, else by suffix.
pub fn unit_of(metric: &str) -> &'static str {
    match metric {
        "temperature" => "°C",
        "humidity" => "%",
        "lux" => "lx",
        m if m.ends_with("_pct") || m.ends_with("_percent") => "%",
        m if m.ends_with("_ppm") => "ppm",
        m if m.ends_with("_rpm") => "rpm",
        m if m.ends_with("_c") || m.ends_with("_celsius") => "°C",
        m if m.ends_with("_w") || m.ends_with("_watts") => "W",
        m if m.ends_with("_v") || m.ends_with("_volts") => "V",
        m if m.ends_with("_s") || m.ends_with("_seconds") => "s",
        m if m.ends_with("_kpa") => "kPa",
        m if m.ends_with("_hpa") => "hPa",
        m if m.ends_with("_hz") => "Hz",
        m if m.ends_with("_kwh") => "kWh",
        _ => "",
    }
}

/// The title of a metric's chart.
pub fn title_of(metric: &str) -> String {
    match metric {
        "temperature" => "Temperature".into(),
        "humidity" => "Humidity".into(),
        other => other.to_owned(),
    }
}

/// The lowest and highest value drawn, padded, for a chart without axes.
fn spark_domain(points: &[Point]) -> (f64, f64) {
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.v), hi.max(p.v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // On halves, and kept finite: the values may be as far apart as f64
    // allows.
    let pad = ((hi / 2.0 - lo / 2.0) * 0.2).max(hi.abs().max(1.0) * 1e-3);
    ((lo - pad).max(f64::MIN), (hi + pad).min(f64::MAX))
}

/// The time span a sparkline draws, `(from, end)`: its whole window once
/// its points reach that far back, else from its first point (a minute at
/// least), so a young history fills the line rather than a sliver at its
/// end.
pub fn spark_span(points: &[Point], now: i64, window_ms: i64) -> (i64, i64) {
    let end = points.last().map_or(now, |p| p.t.max(now));
    let from = end - window_ms;
    let first = points.first().map_or(end, |p| p.t);
    (from.max(first).min(end - MINUTE_MS), end)
}

/// A sparkline's span for people: "1 h", or "25 min" while it is shorter.
pub fn span_text(ms: i64) -> String {
    if ms >= HOUR_MS && ms % HOUR_MS == 0 {
        format!("{} h", ms / HOUR_MS)
    } else {
        format!("{} min", (ms + MINUTE_MS - 1) / MINUTE_MS)
    }
}

const SPARK_W: f64 = 120.0;
const SPARK_H: f64 = 32.0;

/// A small step line of the last `window_ms` of one metric (or less: see
/// [`spark_span`]), no axes. `data-points` tells how many points are drawn,
/// `data-last` the value the line ends at.
#[component]
pub fn Sparkline(
    points: Signal<Vec<Point>>,
    now_ms: Signal<i64>,
    window_ms: i64,
    /// What it shows, for people who cannot see it.
    label: Signal<String>,
) -> impl IntoView {
    let geometry = Memo::new(move |_| {
        let now = now_ms.get();
        points.with(|points| {
            let (from, end) = spark_span(points, now, window_ms);
            let shown = in_window(points, from, end);
            let (lo, hi) = spark_domain(shown);
            let x = Scale::new((from as f64, end as f64), (1.0, SPARK_W - 1.0));
            let y = Scale::new((lo, hi), (SPARK_H - 2.0, 2.0));
            let last = shown.last().map(|p| p.v);
            (step_path(shown, from, end, x, y), shown.len(), last)
        })
    });
    view! {
        <svg
            class="sparkline"
            data-testid="sparkline"
            data-points=move || geometry.with(|g| g.1)
            data-last=move || geometry.with(|g| g.2)
            viewBox=format!("0 0 {SPARK_W} {SPARK_H}")
            preserveAspectRatio="none"
            role="img"
            aria-label=label
        >
            <path class="spark-line" d=move || geometry.with(|g| g.0.clone()) />
        </svg>
    }
    .into_any()
}

const W: f64 = 480.0;
const H: f64 = 220.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 26.0;

/// A coordinate to a tenth of a user unit: plenty for the eye, short in HTML.
fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Everything a line chart draws, computed from its points and the clock.
#[derive(Clone, Debug, PartialEq)]
struct Layout {
    path: String,
    shown: usize,
    last: Option<(f64, f64)>,
    y_ticks: Vec<(f64, String)>,
    x_ticks: Vec<(f64, String)>,
    /// The metric's limits: where each is drawn, `min` or `max`, its value.
    limits: Vec<(f64, &'static str, f64)>,
}

/// The limits as (`min`|`max`, value), those set.
fn bounds(limits: &Limits) -> impl Iterator<Item = (&'static str, f64)> {
    [("min", limits.min), ("max", limits.max)]
        .into_iter()
        .filter_map(|(kind, v)| Some((kind, v?)))
}

/// The layout of a chart: the axes take in the limits as well as the
/// values, so a value's distance to its limit is always in sight.
fn layout(points: &[Point], now: i64, window_ms: i64, limits: &Limits) -> Layout {
    let end = points.last().map_or(now, |p| p.t.max(now));
    let from = end - window_ms;
    let shown = in_window(points, from, end);
    let x = Scale::new((from as f64, end as f64), (LEFT, W - RIGHT));
    let (step, times) = time_ticks(from, end, 7);
    let x_ticks = times
        .into_iter()
        .map(|t| (round1(x.map(t as f64)), time_label(t, step)))
        .collect();
    let values = shown.iter().map(|p| p.v);
    let axis = match shown.is_empty() {
        true => None,
        false => ValueAxis::fit(values.chain(bounds(limits).map(|(_, v)| v)), 5),
    };
    let Some(axis) = axis else {
        return Layout {
            path: String::new(),
            shown: 0,
            last: None,
            y_ticks: Vec::new(),
            x_ticks,
            limits: Vec::new(),
        };
    };
    let y = Scale::new((axis.min, axis.max), (H - BOTTOM, TOP));
    Layout {
        path: step_path(shown, from, end, x, y),
        shown: shown.len(),
        last: shown
            .last()
            .map(|p| (round1(x.map(end as f64)), round1(y.map(p.v)))),
        y_ticks: axis
            .ticks
            .iter()
            .map(|&v| (round1(y.map(v)), axis.label(v)))
            .collect(),
        x_ticks,
        limits: bounds(limits)
            .map(|(kind, v)| (round1(y.map(v)), kind, v))
            .collect(),
    }
}

/// A line chart of one metric over the last `window_ms`: value axis with
/// its unit, time axis in UTC, a grid, the step line and a dot for the
/// current value. `data-points` on the `<svg>` tells how many points are
/// drawn. Without points in the window it says so instead.
#[component]
pub fn LineChart(
    metric: String,
    /// Where its data is, as CSV, and the name to save it under.
    download: (String, String),
    points: Signal<Vec<Point>>,
    now_ms: Signal<i64>,
    window_ms: i64,
    /// The window in words ("the last hour"), for the empty message.
    range_label: &'static str,
    /// The metric's limits, drawn as dashed lines.
    #[prop(into)]
    limits: Signal<Limits>,
) -> impl IntoView {
    let unit = unit_of(&metric);
    let title = title_of(&metric);
    let geometry =
        Memo::new(move |_| limits.with(|l| points.with(|p| layout(p, now_ms.get(), window_ms, l))));
    // Each limit: where, `min` or `max`, and in words ("max -15.0 °C").
    let limit_lines = {
        let metric = metric.clone();
        Memo::new(move |_| {
            geometry.with(|g| {
                g.limits
                    .iter()
                    .map(|&(y, kind, v)| {
                        let value = super::dashboard::format_value(&metric, v);
                        (y, kind, format!("{kind} {value}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
    };
    let has_points = move || geometry.with(|g| g.shown > 0);
    let aria = {
        let title = title.clone();
        let metric_name = metric.clone();
        move || {
            points.with(|p| match p.last() {
                Some(last) => {
                    let n = geometry.with(|g| g.shown);
                    format!(
                        "{title} over {range_label}: {n} point{}, now {}",
                        if n == 1 { "" } else { "s" },
                        super::dashboard::format_value(&metric_name, last.v)
                    )
                }
                None => format!("{title}: no readings in {range_label}"),
            })
        }
    };
    let axis_unit = if unit.is_empty() { "value" } else { unit };
    view! {
        <figure class="chart" data-testid="chart" data-metric=metric.clone()>
            <figcaption>
                {title} {(!unit.is_empty()).then(|| view! { <span class="unit">{unit}</span> })}
                <a class="download" href=download.0 download=download.1 data-testid="csv">
                    "CSV"
                </a>
            </figcaption>
            <Show
                when=has_points
                fallback=move || {
                    view! {
                        <p class="no-data" data-testid="no-data">
                            {format!("No readings in this range ({range_label}).")}
                        </p>
                    }
                }
            >
                <svg
                    class="line-chart"
                    viewBox=format!("0 0 {W} {H}")
                    role="img"
                    aria-label=aria.clone()
                    data-points=move || geometry.with(|g| g.shown)
                >
                    <text class="axis-unit" x="4" y="12">
                        {axis_unit}
                    </text>
                    <text class="axis-unit" x=W - RIGHT y="12" text-anchor="end">
                        "UTC"
                    </text>
                    <g class="y-axis">
                        {move || {
                            geometry
                                .with(|g| g.y_ticks.clone())
                                .into_iter()
                                .map(|(y, label)| {
                                    view! {
                                        <line class="grid" x1=LEFT x2=W - RIGHT y1=y y2=y />
                                        <text x=LEFT - 6.0 y=y + 4.0 text-anchor="end">
                                            {label}
                                        </text>
                                    }
                                })
                                .collect_view()
                        }}
                    </g>
                    <g class="x-axis">
                        <line class="axis" x1=LEFT x2=W - RIGHT y1=H - BOTTOM y2=H - BOTTOM />
                        {move || {
                            geometry
                                .with(|g| g.x_ticks.clone())
                                .into_iter()
                                .map(|(x, label)| {
                                    view! {
                                        <line class="tick" x1=x x2=x y1=H - BOTTOM y2=H - BOTTOM + 4.0 />
                                        <text x=x y=H - BOTTOM + 16.0 text-anchor="middle">
                                            {label}
                                        </text>
                                    }
                                })
                                .collect_view()
                        }}
                    </g>
                    <g class="limits">
                        {move || {
                            limit_lines
                                .get()
                                .into_iter()
                                .map(|(y, kind, label)| {
                                    view! {
                                        <line
                                            class="limit"
                                            data-testid="limit"
                                            data-kind=kind
                                            x1=LEFT
                                            x2=W - RIGHT
                                            y1=y
                                            y2=y
                                        />
                                        <text class="limit" x=LEFT + 4.0 y=y - 4.0>
                                            {label}
                                        </text>
                                    }
                                })
                                .collect_view()
                        }}
                    </g>
                    <path class="line" d=move || geometry.with(|g| g.path.clone()) />
                    {move || {
                        geometry
                            .with(|g| g.last)
                            .map(|(x, y)| view! { <circle class="now" cx=x cy=y r="3.5" /> })
                    }}
                </svg>
            </Show>
        </figure>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: i64, v: f64) -> Point {
        Point {
            t,
            v,
            min: None,
            max: None,
        }
    }

    #[test]
    fn a_sparkline_spans_its_window_or_its_history_if_shorter() {
        let now = 10 * HOUR_MS;
        // A full hour, and more: the window.
        let full = [p(now - 2 * HOUR_MS, 1.0), p(now - 10_000, 2.0)];
        assert_eq!(spark_span(&full, now, HOUR_MS), (now - HOUR_MS, now));
        // Ten minutes of history: those ten minutes.
        let young = [p(now - 10 * MINUTE_MS, 1.0), p(now - 5_000, 2.0)];
        assert_eq!(
            spark_span(&young, now, HOUR_MS),
            (now - 10 * MINUTE_MS, now)
        );
        // Seconds, or nothing: a minute.
        let fresh = [p(now - 5_000, 1.0)];
        assert_eq!(spark_span(&fresh, now, HOUR_MS), (now - MINUTE_MS, now));
        assert_eq!(spark_span(&[], now, HOUR_MS), (now - MINUTE_MS, now));
        // A point newer than the clock ends the span.
        let ahead = [p(now - MINUTE_MS * 3, 1.0), p(now + 2_000, 2.0)];
        assert_eq!(
            spark_span(&ahead, now, HOUR_MS),
            (now - MINUTE_MS * 3, now + 2_000)
        );
        assert_eq!(span_text(HOUR_MS), "1 h");
        assert_eq!(span_text(10 * MINUTE_MS), "10 min");
        assert_eq!(span_text(10 * MINUTE_MS + 1), "11 min");
        assert_eq!(span_text(MINUTE_MS), "1 min");
    }

    #[test]
    fn a_reloaded_chart_keeps_only_the_points_newer_than_the_read() {
        let read = |points: Vec<Point>, to_ms: i64| History {
            device: crate::model::DeviceId::parse("rack-1").unwrap(),
            metric: "temperature".into(),
            from: DateTime::from_timestamp_millis(0).unwrap(),
            to: DateTime::from_timestamp_millis(to_ms).unwrap(),
            step_ms: None,
            points,
        };
        // Read up to t=35 (a bucket at 30 covers 30..35): the page's old
        // points go, the one an event added at t=40 stays.
        let current = [p(10, 1.0), p(32, 9.0), p(40, 4.0)];
        assert_eq!(
            reloaded(read(vec![p(20, 2.0), p(30, 3.123_456)], 35), &current),
            [p(20, 2.0), p(30, 3.123), p(40, 4.0)]
        );
        // Nothing in the history: only what came after the read stays.
        assert_eq!(reloaded(read(Vec::new(), 35), &current), [p(40, 4.0)]);
    }

    #[test]
    fn scales_map_linearly_and_an_empty_domain_to_the_middle() {
        let s = Scale::new((0.0, 10.0), (100.0, 200.0));
        assert_eq!(s.map(0.0), 100.0);
        assert_eq!(s.map(5.0), 150.0);
        assert_eq!(s.map(10.0), 200.0);
        // SVG's y grows downwards: a reversed range.
        let y = Scale::new((20.0, 30.0), (200.0, 0.0));
        assert_eq!(y.map(30.0), 0.0);
        assert_eq!(y.map(25.0), 100.0);
        assert_eq!(Scale::new((3.0, 3.0), (0.0, 10.0)).map(3.0), 5.0);
    }

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(3.0, 5), 1.0);
        assert_eq!(nice_step(0.4, 5), 0.1);
        assert_eq!(nice_step(22.0, 5), 5.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(nice_step(f64::NAN, 5), 1.0);
    }

    #[test]
    fn value_axes_cover_the_values_with_round_ticks() {
        let axis = ValueAxis::fit([21.3, 24.8, 22.0], 5).unwrap();
        assert_eq!(axis.step, 1.0);
        assert_eq!(axis.ticks, vec![21.0, 22.0, 23.0, 24.0, 25.0]);
        assert_eq!((axis.min, axis.max), (21.0, 25.0));
        assert_eq!(axis.label(22.0), "22");

        let small = ValueAxis::fit([0.1, 0.3], 5).unwrap();
        assert_eq!(small.ticks, vec![0.1, 0.15, 0.2, 0.25, 0.3]);
        assert_eq!(small.label(0.15), "0.15");

        let negative = ValueAxis::fit([-19.96, -18.2], 4).unwrap();
        assert!(negative.min <= -19.96 && negative.max >= -18.2);
        assert_eq!(negative.label(-19.5), "-19.5");
    }

    #[test]
    fn a_flat_series_gets_room_and_no_values_no_axis() {
        let one = ValueAxis::fit([20.0], 5).unwrap();
        assert!(one.min < 20.0 && one.max > 20.0, "{one:?}");
        assert!(one.ticks.len() >= 2);
        let zero = ValueAxis::fit([0.0, 0.0], 5).unwrap();
        assert!(zero.min < 0.0 && zero.max > 0.0);
        assert_eq!(zero.ticks.iter().filter(|t| **t == 0.0).count(), 1);
        assert_eq!(ValueAxis::fit([], 5), None);
        let huge = ValueAxis::fit([-f64::MAX, f64::MAX], 5).unwrap();
        assert_eq!(huge.ticks.len(), 2, "no endless ticks");
        let flat = ValueAxis::fit([f64::MAX], 5).unwrap();
        assert!(flat.min.is_finite() && flat.max.is_finite(), "{flat:?}");
        assert_eq!(ValueAxis::fit([f64::NAN], 5), None);
    }

    // 2026-11-25T12:00:00Z
    const NOON: i64 = 1_795_608_000_000;

    #[test]
    fn time_ticks_fall_on_round_utc_times() {
        // An hour from 11:03:20: ticks every 10 minutes, from 11:10.
        let (step, ticks) = time_ticks(NOON - HOUR_MS + 200_000, NOON + 200_000, 7);
        assert_eq!(step, 10 * MINUTE_MS);
        assert_eq!(ticks.len(), 6);
        assert_eq!(time_label(ticks[0], step), "11:10");
        assert_eq!(time_label(*ticks.last().unwrap(), step), "12:00");

        let (step, ticks) = time_ticks(NOON - DAY_MS, NOON, 7);
        assert_eq!(step, 6 * HOUR_MS);
        assert_eq!(
            ticks.first(),
            Some(&(NOON - DAY_MS)),
            "a tick on the edge counts"
        );
        assert_eq!(time_label(ticks[1], step), "18:00");

        let (step, ticks) = time_ticks(NOON - 7 * DAY_MS, NOON, 8);
        assert_eq!(step, DAY_MS);
        assert_eq!(ticks.len(), 7);
        assert_eq!(time_label(ticks[0], step), "Nov 19");
        assert!(ticks.iter().all(|t| t % DAY_MS == 0), "at midnight UTC");
    }

    fn unit_scales() -> (Scale, Scale) {
        (
            Scale::new((0.0, 100.0), (0.0, 100.0)),
            Scale::new((0.0, 10.0), (100.0, 0.0)),
        )
    }

    #[test]
    fn paths_step_from_point_to_point_and_run_on_to_the_end() {
        let (x, y) = unit_scales();
        let points = [p(10, 1.0), p(40, 5.0), p(70, 2.0)];
        assert_eq!(step_path(&points, 0, 100, x, y), "M10,90H40V50H70V80H100");
    }

    #[test]
    fn paths_start_with_the_value_in_force_and_leave_out_the_future() {
        let (x, y) = unit_scales();
        let points = [p(-50, 3.0), p(-20, 4.0), p(30, 5.0), p(150, 9.0)];
        // -20's value holds at 0; the point at 150 is after the end.
        assert_eq!(step_path(&points, 0, 100, x, y), "M0,60H30V50H100");
        assert_eq!(in_window(&points, 0, 100), &points[1..3]);
    }

    #[test]
    fn empty_and_one_point_paths() {
        let (x, y) = unit_scales();
        assert_eq!(step_path(&[], 0, 100, x, y), "");
        assert!(in_window(&[], 0, 100).is_empty());
        assert_eq!(step_path(&[p(50, 5.0)], 0, 100, x, y), "M50,50H100");
        // Only a point after the end: nothing to draw.
        assert_eq!(step_path(&[p(150, 5.0)], 0, 100, x, y), "");
        assert!(in_window(&[p(150, 5.0)], 0, 100).is_empty());
    }

    #[test]
    fn live_appends_keep_order_and_trim_to_the_window() {
        let mut points = vec![p(0, 1.0), p(10, 2.0), p(20, 3.0)];
        append(&mut points, 30, 4.0, 100);
        assert_eq!(points.len(), 4);
        // A repeat of a point it has (a replayed event) changes nothing.
        append(&mut points, 30, 4.0, 100);
        assert_eq!(points.len(), 4);
        // Out of order: put in its place.
        append(&mut points, 25, 3.5, 100);
        assert_eq!(
            points.iter().map(|p| p.t).collect::<Vec<_>>(),
            [0, 10, 20, 25, 30]
        );
        // The window moves to 15..=115: 0 and 10 fall out of it, but 10's
        // value is still in force at 15 and stays.
        append(&mut points, 115, 6.0, 100);
        assert_eq!(
            points.iter().map(|p| p.t).collect::<Vec<_>>(),
            [10, 20, 25, 30, 115]
        );
        // Far later: only the newest and the one in force at the start.
        append(&mut points, 1_000, 7.0, 100);
        assert_eq!(points.iter().map(|p| p.t).collect::<Vec<_>>(), [115, 1_000]);
        let mut empty = Vec::new();
        append(&mut empty, 5, 1.0, 100);
        assert_eq!(empty, vec![p(5, 1.0)]);
    }

    #[test]
    fn a_chart_layout_has_ticks_path_and_the_current_value() {
        let now = NOON;
        let points = [p(now - 30 * MINUTE_MS, 20.0), p(now - 10 * MINUTE_MS, 22.0)];
        let l = layout(&points, now, HOUR_MS, &Limits::default());
        assert_eq!(l.shown, 2);
        assert!(l.limits.is_empty());
        assert!(l.path.starts_with('M'));
        assert_eq!(l.path.matches('V').count(), 1);
        assert!(!l.y_ticks.is_empty() && !l.x_ticks.is_empty());
        assert_eq!(l.last.unwrap().0, W - RIGHT, "the dot is at now");
        assert_eq!(l.x_ticks.last().unwrap().1, "12:00");
        let empty = layout(&[], now, HOUR_MS, &Limits::default());
        assert_eq!((empty.shown, empty.path.as_str()), (0, ""));
        assert!(!empty.x_ticks.is_empty());
        // Read before the window but still in force in it: drawn from its start.
        let old = layout(
            &[p(now - 2 * HOUR_MS, 1.0)],
            now,
            HOUR_MS,
            &Limits::default(),
        );
        assert_eq!(old.shown, 1, "the value in force at the start is drawn");
    }

    #[test]
    fn limits_are_drawn_within_the_axis() {
        let now = NOON;
        let points = [
            p(now - 30 * MINUTE_MS, -20.0),
            p(now - 10 * MINUTE_MS, -19.0),
        ];
        let limits = Limits {
            min: None,
            max: Some(-15.0),
        };
        let l = layout(&points, now, HOUR_MS, &limits);
        let y_of = |label: &str| l.y_ticks.iter().find(|(_, t)| t == label).map(|(y, _)| *y);
        // The axis reaches the limit, far as it is from the values.
        let (y, kind, v) = l.limits[0];
        assert_eq!((l.limits.len(), kind, v), (1, "max", -15.0));
        assert_eq!(Some(y), y_of("-15"), "{:?}", l.y_ticks);
        // No readings, no chart: a limit alone draws nothing.
        assert!(layout(&[], now, HOUR_MS, &limits).limits.is_empty());
    }

    #[test]
    fn values_as_far_apart_as_f64_allows_still_draw() {
        let now = NOON;
        let finite = |path: &str| {
            assert!(!path.is_empty(), "a path");
            assert!(!path.contains("NaN") && !path.contains("inf"), "{path}");
        };
        for values in [[-f64::MAX, f64::MAX], [1e308, -1e308], [f64::MAX, f64::MAX]] {
            let points = [
                p(now - 30 * MINUTE_MS, values[0]),
                p(now - 10 * MINUTE_MS, values[1]),
            ];
            let l = layout(&points, now, HOUR_MS, &Limits::default());
            finite(&l.path);
            assert!(l.y_ticks.iter().all(|(y, _)| y.is_finite()), "{values:?}");
            // The sparkline's way.
            let (lo, hi) = spark_domain(&points);
            let x = Scale::new(((now - HOUR_MS) as f64, now as f64), (1.0, 119.0));
            let y = Scale::new((lo, hi), (30.0, 2.0));
            finite(&step_path(&points, now - HOUR_MS, now, x, y));
        }
    }

    #[test]
    fn compact_points_round_and_drop_min_max() {
        let bucket = Point {
            t: 60_000,
            v: 21.333333333333332,
            min: Some(21.0),
            max: Some(21.5),
        };
        assert_eq!(compact(bucket), p(60_000, 21.333));
        assert_eq!(
            serde_json::to_string(&compact(bucket)).unwrap(),
            r#"{"t":60000,"v":21.333}"#
        );
    }

    #[test]
    fn units_come_from_known_names_and_suffixes() {
        assert_eq!(unit_of("temperature"), "°C");
        assert_eq!(unit_of("humidity"), "%");
        assert_eq!(unit_of("memory_used_pct"), "%");
        assert_eq!(unit_of("co2_ppm"), "ppm");
        assert_eq!(unit_of("fan_rpm"), "rpm");
        assert_eq!(unit_of("uptime_s"), "s");
        assert_eq!(unit_of("inlet_pressure_kpa"), "kPa");
        assert_eq!(unit_of("energy_kwh"), "kWh");
        assert_eq!(unit_of("load_1m"), "");
        assert_eq!(title_of("humidity"), "Humidity");
        assert_eq!(title_of("load_1m"), "load_1m");
    }
}
