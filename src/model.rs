//! Domain types shared by the server and the browser.
//!
//! Everything here compiles for both `ssr` and `hydrate`: the server serializes
//! these types into the first HTML render, `GET /api/devices` and the SSE
//! stream; the browser deserializes the very same types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Event ids only grow. See `server::hub` for how they start.
pub type EventId = u64;

/// Most extra metrics one device may carry; keeps a status small.
pub const MAX_METRICS: usize = 32;
/// Largest magnitude of an extra metric's value: any count a device may
/// report (a petabyte in bytes), exact as an integer in every JSON reader,
/// and far enough from f64's limits that the history's sums and means
/// never overflow.
pub const MAX_METRIC_ABS: f64 = 1e15;
/// Longest device name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// A device id that can only hold a valid id: 1–64 of `a-z 0-9 - _`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(id: &str) -> Result<Self, &'static str> {
        if id.is_empty() || id.len() > 64 {
            return Err("a device id is 1 to 64 characters long");
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err("a device id may only contain a-z, 0-9, '-' and '_'");
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = &'static str;
    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::parse(&id)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The full current status of one device. Absent readings are `null`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub power_on: Option<bool>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// One device as `GET /api/devices` and the snapshot show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
    pub status: Status,
    /// The device's live link (see [`Online`]); left out of the JSON when
    /// there is none, so HTTP-fed devices look exactly as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Online,
    /// Silent for longer than its expected report interval allows (see
    /// `server::hub`); cleared by its next report. Distinct from `online`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stale: bool,
    /// The readings outside their [`Limits`], by metric name
    /// (`temperature`, `humidity` or an extra metric).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alerts: BTreeMap<String, Alert>,
    /// Its own limits, by metric: set over the API, else its section of the
    /// thresholds file. The server's defaults apply to the metrics it has
    /// none for ([`limits_in_force`]). A change of them is an event, so
    /// every page draws the limits in force.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: MetricLimits,
    pub updated_at: DateTime<Utc>,
}

fn is_false(b: &bool) -> bool {
    !b
}

#[cfg(feature = "ssr")]
impl Device {
    /// A device just registered: named after its id, nothing known yet.
    pub fn new(id: DeviceId) -> Self {
        Self {
            name: id.to_string(),
            id,
            status: Status::default(),
            online: None,
            stale: false,
            alerts: BTreeMap::new(),
            limits: MetricLimits::new(),
            updated_at: Utc::now(),
        }
    }
}

#[cfg(test)]
impl Device {
    /// For the tests: `rack-1`, named "Rack", with `status` at `at_ms`.
    pub fn sample(at_ms: i64, status: Status) -> Self {
        Self {
            id: DeviceId::parse("rack-1").unwrap(),
            name: "Rack".into(),
            status,
            online: None,
            stale: false,
            alerts: BTreeMap::new(),
            limits: MetricLimits::new(),
            updated_at: DateTime::from_timestamp_millis(at_ms).unwrap(),
        }
    }
}

/// Whether a device has a live link to the server:
/// - `None`: it never had one (it reports over HTTP, or not at all);
/// - `Some(true)`: an agent (or the simulator) is connected for it;
/// - `Some(false)`: its agent went away or fell silent. That is news in
///   itself, unlike a device whose readings merely have not changed.
pub type Online = Option<bool>;

/// Every device (or the filtered ones) at one event id: the body of
/// `GET /api/devices` and the data of the SSE `snapshot` event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub event_id: EventId,
    pub devices: Vec<Device>,
}

/// The data of an SSE `status` event: one device's full status after a
/// change, or, with `removed`, its last status as it was removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub device: DeviceId,
    pub name: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Online,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stale: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alerts: BTreeMap<String, Alert>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: MetricLimits,
    pub updated_at: DateTime<Utc>,
    /// The device was removed (`DELETE /api/devices/{id}`): forget it. A
    /// later report of the same id registers it anew.
    #[serde(default, skip_serializing_if = "is_false")]
    pub removed: bool,
}

/// The SSE `health` event: whether the server can take changes. Sent when
/// that changes, and at the start of a stream from a degraded server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Why the server takes no changes right now (cluster mode, Redis
    /// unreachable); `None` when it does.
    pub degraded: Option<String>,
}

/// The SSE `ping` event, every heartbeat and after a stream's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// The server's time, in milliseconds since the epoch.
    pub now: i64,
    /// Milliseconds until the next ping.
    pub every: u64,
}

impl From<&Device> for StatusEvent {
    fn from(d: &Device) -> Self {
        Self {
            device: d.id.clone(),
            name: d.name.clone(),
            status: d.status.clone(),
            online: d.online,
            stale: d.stale,
            alerts: d.alerts.clone(),
            limits: d.limits.clone(),
            updated_at: d.updated_at,
            removed: false,
        }
    }
}

impl StatusEvent {
    pub fn into_device(self) -> Device {
        Device {
            id: self.device,
            name: self.name,
            status: self.status,
            online: self.online,
            stale: self.stale,
            alerts: self.alerts,
            limits: self.limits,
            updated_at: self.updated_at,
        }
    }
}

/// The limits a reading should stay within; either end may be open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Limits by metric name.
pub type MetricLimits = BTreeMap<String, Limits>;

/// The limits in force for a device: its `own`, and the `defaults` for the
/// metrics it has none of. The server's alerts and a device page's charts
/// both read them from here.
pub fn limits_in_force(own: Option<&MetricLimits>, defaults: &MetricLimits) -> MetricLimits {
    let mut limits = defaults.clone();
    limits.extend(own.into_iter().flatten().map(|(m, l)| (m.clone(), *l)));
    limits
}

/// A reading outside its limits: the value and the limits it broke.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub value: f64,
    #[serde(flatten)]
    pub limits: Limits,
}

/// What one event changed about a device besides its readings: a line of
/// "Recent changes", on its page (`GET /api/devices/{id}/changes`) and on
/// the dashboard (`GET /api/changes`). The server records them as it
/// records the event; a page adds the ones of the events it follows with
/// the same [`Change::between`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// First seen: its first report, or its agent's hello (again after a removal).
    Registered,
    Renamed {
        name: String,
    },
    Power {
        on: bool,
    },
    /// Its agent connected (`true`) or went away (`false`).
    Online {
        online: bool,
    },
    /// Silent past its report interval (`true`), or reporting again.
    Stale {
        stale: bool,
    },
    /// A reading went outside its limits (`alert` as it first broke them).
    Alert {
        metric: String,
        alert: Alert,
    },
    /// A reading that was outside its limits is back within them (or its
    /// limits went).
    AlertCleared {
        metric: String,
    },
    /// Its own limits were set (`limits`), or cleared (empty: the
    /// defaults apply).
    Limits {
        limits: MetricLimits,
    },
}

impl Change {
    /// Its `kind` in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Registered => "registered",
            Change::Renamed { .. } => "renamed",
            Change::Power { .. } => "power",
            Change::Online { .. } => "online",
            Change::Stale { .. } => "stale",
            Change::Alert { .. } => "alert",
            Change::AlertCleared { .. } => "alert_cleared",
            Change::Limits { .. } => "limits",
        }
    }

    /// What changed from `before` (`None`: the device is new) to `after`,
    /// in a fixed order. Readings that stay within their limits are not
    /// changes here: the charts show them. Nor is the first name or power
    /// state a device reports (an agent says hello, then reports them):
    /// a name or power state changes only from one it had.
    pub fn between(before: Option<&Device>, after: &Device) -> Vec<Change> {
        let Some(before) = before else {
            return vec![Change::Registered];
        };
        let mut changes = Vec::new();
        // A new device is named after its id until it gives a name.
        if before.name != after.name && before.name != before.id.as_str() {
            changes.push(Change::Renamed {
                name: after.name.clone(),
            });
        }
        if let (Some(was), Some(on)) = (before.status.power_on, after.status.power_on)
            && was != on
        {
            changes.push(Change::Power { on });
        }
        if let Some(online) = after.online.filter(|_| before.online != after.online) {
            changes.push(Change::Online { online });
        }
        if before.stale != after.stale {
            changes.push(Change::Stale { stale: after.stale });
        }
        if before.limits != after.limits {
            changes.push(Change::Limits {
                limits: after.limits.clone(),
            });
        }
        for (metric, alert) in &after.alerts {
            if !before.alerts.contains_key(metric) {
                changes.push(Change::Alert {
                    metric: metric.clone(),
                    alert: *alert,
                });
            }
        }
        for metric in before.alerts.keys() {
            if !after.alerts.contains_key(metric) {
                changes.push(Change::AlertCleared {
                    metric: metric.clone(),
                });
            }
        }
        changes
    }
}

/// A [`Change`] with the event that made it, its device and its time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changed {
    /// The event's id (several changes may share one).
    pub id: EventId,
    pub device: DeviceId,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub change: Change,
}

/// The body of `GET /api/changes` (every device's) and of
/// `GET /api/devices/{id}/changes` (one device's, named): newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    pub changes: Vec<Changed>,
}

/// One point of a metric's history. Readings are kept as changes: a value
/// holds from its `t` until the next point. A point made from several
/// readings (a `step` bucket, or the per-minute downsampled history) carries
/// their `min` and `max` besides the mean `v`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    pub t: i64,
    pub v: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// One metric of one device over `from ..= to`: the body of
/// `GET /api/devices/{id}/history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub device: DeviceId,
    pub metric: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The bucket width in milliseconds, when points were bucketed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<i64>,
    pub points: Vec<Point>,
}

/// What [`is_metric_name`] checks, in words.
pub const METRIC_NAME_RULE: &str = "a metric name is 1 to 64 of a-z, A-Z, 0-9, '_', '-', '.'";

/// A valid name of an extra metric (`temperature` and `humidity` are valid
/// names too, which [`Limits`] use for the two fixed readings).
pub fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A partial update, as a device reports it. Fields left out keep their value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_on: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<String, f64>>,
    /// When the device took these readings (RFC 3339), if not just now: a
    /// device that kept them while it could not reach the server sends
    /// them later, oldest first, each at its time (see [`StatusUpdate::time`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339"
    )]
    pub at: Option<DateTime<Utc>>,
}

const AT_RULE: &str = "at must be an RFC 3339 time, like 2026-12-01T12:00:00Z";

/// An `at`: an RFC 3339 time, or `null`; anything else is refused in words
/// a person reads (not chrono's).
fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    use serde::de::Error;
    let Some(text) = Option::<String>::deserialize(d).map_err(|_| D::Error::custom(AT_RULE))?
    else {
        return Ok(None);
    };
    DateTime::parse_from_rfc3339(&text)
        .map(|t| Some(t.to_utc()))
        .map_err(|_| D::Error::custom(AT_RULE))
}

/// Reads a `T` from an object only (JSON, or a TOML table), for a field
/// (`deserialize_with`): serde's derive would also take an array, its
/// fields by position, so `[21.5]` would pass for `{"temperature": 21.5}`.
pub fn object<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct OnlyObject<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OnlyObject<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(OnlyObject(std::marker::PhantomData))
}

/// A `T` read from an object only (see [`object`]), where a type is
/// wanted: an element, a value read on its own.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d).map(Object)
    }
}

/// How far ahead of the server's clock an update's `at` may be, and be
/// taken as now: clocks differ a little.
pub const AT_AHEAD_SECS: i64 = 60;

/// Why an update was refused, and which field is at fault.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl StatusUpdate {
    /// Checks every field; the first fault found is returned.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(t) = self.temperature
            && (!t.is_finite() || !(-273.15..=10_000.0).contains(&t))
        {
            return Err(FieldError::new(
                "temperature",
                "temperature must be a number of °C between -273.15 and 10000",
            ));
        }
        if let Some(h) = self.humidity
            && (!h.is_finite() || !(0.0..=100.0).contains(&h))
        {
            return Err(FieldError::new(
                "humidity",
                "humidity must be a percentage between 0 and 100",
            ));
        }
        if let Some(name) = &self.name {
            let chars = name.chars().count();
            if name.trim().is_empty() || chars > MAX_NAME_CHARS {
                return Err(FieldError::new(
                    "name",
                    format!("name must be 1 to {MAX_NAME_CHARS} characters, not blank"),
                ));
            }
            if name.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "name",
                    "name must not contain control characters",
                ));
            }
        }
        if let Some(metrics) = &self.metrics {
            if metrics.len() > MAX_METRICS {
                return Err(FieldError::new(
                    "metrics",
                    format!("at most {MAX_METRICS} metrics per update"),
                ));
            }
            for (key, value) in metrics {
                let field = format!("metrics.{key}");
                if !is_metric_name(key) {
                    return Err(FieldError::new(field, METRIC_NAME_RULE));
                }
                if key == "temperature" || key == "humidity" {
                    // Their history, limits and alerts would mix with the
                    // reading's own, under the same name.
                    return Err(FieldError::new(
                        field,
                        format!("{key} is a reading of its own: send it as `{key}`, not a metric"),
                    ));
                }
                if !value.is_finite() || value.abs() > MAX_METRIC_ABS {
                    return Err(FieldError::new(
                        field,
                        "a metric must be a number between -1e15 and 1e15",
                    ));
                }
            }
        }
        Ok(())
    }

    /// When the readings were taken: `at`, or `now` without it. Refused,
    /// naming `at`, when it is more than [`AT_AHEAD_SECS`] ahead of `now`
    /// (up to that it is `now`, so no time ever runs ahead of the server's
    /// clock), older than `oldest`, or before `last`, the time of the
    /// device's last readings (they go in order, oldest first; `None` for
    /// a device that has none yet).
    pub fn time(
        &self,
        now: DateTime<Utc>,
        oldest: DateTime<Utc>,
        last: Option<DateTime<Utc>>,
    ) -> Result<DateTime<Utc>, FieldError> {
        let Some(at) = self.at else {
            return Ok(now);
        };
        let wrong = |why: String| Err(FieldError::new("at", why));
        let ahead = (at - now).num_seconds();
        if ahead > AT_AHEAD_SECS {
            return wrong(format!(
                "at is {ahead} s ahead of the server's clock: check the device's clock"
            ));
        }
        let shown = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        if at < oldest {
            return wrong(format!(
                "at is before {}: readings that old are no longer taken",
                shown(oldest)
            ));
        }
        if let Some(last) = last.filter(|last| at < *last) {
            return wrong(format!(
                "at is before the device's last change ({}): send readings oldest first",
                shown(last)
            ));
        }
        Ok(at.min(now))
    }

    /// Applies this (validated) update to a device; returns whether anything
    /// changed. Refused, leaving the device as it was, when the device would
    /// carry more than [`MAX_METRICS`] metrics.
    pub fn apply_to(&self, device: &mut Device) -> Result<bool, FieldError> {
        if let Some(metrics) = &self.metrics {
            let new = metrics
                .keys()
                .filter(|k| !device.status.metrics.contains_key(*k))
                .count();
            if device.status.metrics.len() + new > MAX_METRICS {
                return Err(FieldError::new(
                    "metrics",
                    format!("a device carries at most {MAX_METRICS} metrics"),
                ));
            }
        }
        let before = (device.name.clone(), device.status.clone());
        let status = &mut device.status;
        if let Some(t) = self.temperature {
            status.temperature = Some(t);
        }
        if let Some(h) = self.humidity {
            status.humidity = Some(h);
        }
        if let Some(p) = self.power_on {
            status.power_on = Some(p);
        }
        if let Some(metrics) = &self.metrics {
            status
                .metrics
                .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        }
        if let Some(name) = &self.name {
            device.name = name.trim().to_owned();
        }
        Ok((device.name.as_str(), &device.status) != (before.0.as_str(), &before.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device {
            id: DeviceId::parse("rack-1").unwrap(),
            name: "Rack".into(),
            status: Status {
                temperature: Some(20.0),
                humidity: Some(40.0),
                power_on: Some(true),
                metrics: BTreeMap::from([("load".into(), 0.5)]),
            },
            online: None,
            stale: false,
            alerts: BTreeMap::new(),
            limits: MetricLimits::new(),
            updated_at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn an_update_is_read_from_an_object_only() {
        let read = |v: serde_json::Value| object::<_, StatusUpdate>(v);
        let update = read(serde_json::json!({"temperature": 21.5})).unwrap();
        assert_eq!(update.temperature, Some(21.5));
        // The derive alone takes an array, by position.
        assert!(serde_json::from_str::<StatusUpdate>("[21.5]").is_ok());
        let refused = read(serde_json::json!([21.5])).unwrap_err().to_string();
        assert!(refused.contains("expected an object"), "{refused}");
    }

    #[test]
    fn readings_are_at_their_time_in_order_and_never_ahead_of_the_server() {
        let t = |s: i64| DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap();
        let (now, oldest) = (t(0), t(-86_400));
        let at = |s| StatusUpdate {
            at: Some(t(s)),
            ..Default::default()
        };
        assert_eq!(
            StatusUpdate::default().time(now, oldest, Some(t(-5))),
            Ok(now)
        );
        assert_eq!(at(-3_600).time(now, oldest, Some(t(-7_200))), Ok(t(-3_600)));
        // The same time again is fine (a retry); an earlier one is not.
        assert_eq!(at(-3_600).time(now, oldest, Some(t(-3_600))), Ok(t(-3_600)));
        let before = at(-3_601).time(now, oldest, Some(t(-3_600))).unwrap_err();
        assert_eq!(before.field, "at");
        assert!(
            before.message.contains("oldest first"),
            "{}",
            before.message
        );
        // A clock a little ahead is now; far ahead, refused.
        assert_eq!(at(AT_AHEAD_SECS).time(now, oldest, None), Ok(now));
        let ahead = at(AT_AHEAD_SECS + 30).time(now, oldest, None).unwrap_err();
        assert_eq!(
            ahead.message,
            "at is 90 s ahead of the server's clock: check the device's clock"
        );
        let old = at(-86_401).time(now, oldest, None).unwrap_err();
        assert!(old.message.contains("no longer taken"), "{}", old.message);
    }

    #[test]
    fn changes_are_what_moved_besides_readings() {
        let before = device();
        assert_eq!(Change::between(None, &before), [Change::Registered]);
        // Its first name and power state, after a hello: no change yet.
        let hello = Device {
            name: "rack-1".into(),
            status: Status::default(),
            ..device()
        };
        assert!(Change::between(Some(&hello), &before).is_empty());
        let mut after = device();
        after.status.temperature = Some(25.0);
        after.status.metrics.insert("load".into(), 0.9);
        assert!(
            Change::between(Some(&before), &after).is_empty(),
            "readings are the charts' business"
        );
        let hot = Alert {
            value: 31.0,
            limits: Limits {
                min: None,
                max: Some(30.0),
            },
        };
        after.name = "Rack one".into();
        after.status.power_on = Some(false);
        after.online = Some(false);
        after.stale = true;
        after.limits.insert("temperature".into(), hot.limits);
        after.alerts.insert("temperature".into(), hot);
        assert_eq!(
            Change::between(Some(&before), &after),
            [
                Change::Renamed {
                    name: "Rack one".into()
                },
                Change::Power { on: false },
                Change::Online { online: false },
                Change::Stale { stale: true },
                Change::Limits {
                    limits: after.limits.clone()
                },
                Change::Alert {
                    metric: "temperature".into(),
                    alert: hot,
                },
            ]
        );
        // Still alerting, at another value: no new change; back within
        // limits, online and reporting: each says so.
        let mut hotter = after.clone();
        hotter
            .alerts
            .insert("temperature".into(), Alert { value: 35.0, ..hot });
        assert!(Change::between(Some(&after), &hotter).is_empty());
        let mut back = hotter.clone();
        back.alerts.clear();
        back.limits.clear();
        back.online = Some(true);
        back.stale = false;
        assert_eq!(
            Change::between(Some(&hotter), &back),
            [
                Change::Online { online: true },
                Change::Stale { stale: false },
                Change::Limits {
                    limits: MetricLimits::new()
                },
                Change::AlertCleared {
                    metric: "temperature".into()
                },
            ]
        );
    }

    #[test]
    fn a_change_reads_as_flat_json_and_back() {
        let changed = Changed {
            id: 7,
            device: DeviceId::parse("rack-1").unwrap(),
            at: DateTime::from_timestamp_millis(1_764_000_000_000).unwrap(),
            change: Change::Alert {
                metric: "humidity".into(),
                alert: Alert {
                    value: 95.0,
                    limits: Limits {
                        min: Some(20.0),
                        max: Some(80.0),
                    },
                },
            },
        };
        let json = serde_json::to_value(&changed).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": 7,
                "device": "rack-1",
                "at": "2025-11-24T16:00:00Z",
                "kind": "alert",
                "metric": "humidity",
                "alert": {"value": 95.0, "min": 20.0, "max": 80.0},
            })
        );
        assert_eq!(json["kind"], changed.change.kind());
        assert_eq!(serde_json::from_value::<Changed>(json).unwrap(), changed);
        let power = serde_json::json!({"id": 8, "device": "a", "at": "2025-11-24T16:00:01Z", "kind": "power", "on": true});
        let power: Changed = serde_json::from_value(power).unwrap();
        assert_eq!(power.change, Change::Power { on: true });
    }

    #[test]
    fn device_ids_follow_the_rule() {
        assert!(DeviceId::parse("a").is_ok());
        assert!(DeviceId::parse("rack_2-b").is_ok());
        assert!(DeviceId::parse(&"x".repeat(64)).is_ok());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse(&"x".repeat(65)).is_err());
        assert!(DeviceId::parse("Rack").is_err());
        assert!(DeviceId::parse("a b").is_err());
        assert!(DeviceId::parse("a/b").is_err());
        assert!(DeviceId::parse("é").is_err());
    }

    #[test]
    fn device_id_deserialization_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"NOT OK\"").is_err());
    }

    #[test]
    fn partial_update_keeps_missing_fields() {
        let mut d = device();
        let changed = StatusUpdate {
            temperature: Some(21.5),
            ..Default::default()
        }
        .apply_to(&mut d)
        .unwrap();
        assert!(changed);
        assert_eq!(d.status.temperature, Some(21.5));
        assert_eq!(d.status.humidity, Some(40.0));
        assert_eq!(d.status.power_on, Some(true));
        assert_eq!(d.status.metrics["load"], 0.5);
    }

    #[test]
    fn same_values_are_no_change() {
        let mut d = device();
        let update = StatusUpdate {
            temperature: Some(20.0),
            power_on: Some(true),
            name: Some("Rack".into()),
            metrics: Some(BTreeMap::from([("load".into(), 0.5)])),
            ..Default::default()
        };
        assert!(!update.apply_to(&mut d).unwrap());
        assert!(!StatusUpdate::default().apply_to(&mut d).unwrap());
        assert_eq!(d, device());
    }

    #[test]
    fn metrics_merge_and_name_counts_as_change() {
        let mut d = device();
        let update = StatusUpdate {
            metrics: Some(BTreeMap::from([("fan".into(), 1200.0)])),
            ..Default::default()
        };
        assert!(update.apply_to(&mut d).unwrap());
        assert_eq!(d.status.metrics.len(), 2);
        let rename = StatusUpdate {
            name: Some("  Rack A ".into()),
            ..Default::default()
        };
        assert!(rename.apply_to(&mut d).unwrap());
        assert_eq!(d.name, "Rack A");
    }

    #[test]
    fn a_device_never_carries_more_than_max_metrics() {
        let mut d = device(); // already carries `load`
        let names = |from: usize, n: usize| StatusUpdate {
            metrics: Some((from..from + n).map(|i| (format!("m{i}"), 1.0)).collect()),
            ..Default::default()
        };
        assert!(names(0, MAX_METRICS - 1).apply_to(&mut d).unwrap());
        let before = d.clone();
        let err = names(100, 1).apply_to(&mut d).unwrap_err();
        assert_eq!(err.field, "metrics");
        assert_eq!(d, before, "a refused update changes nothing");
        // Updating metrics it already carries is still fine.
        assert!(names(0, 3).apply_to(&mut d).is_ok());
    }

    fn field_of(update: StatusUpdate) -> String {
        update.validate().unwrap_err().field
    }

    #[test]
    fn validation_names_the_faulty_field() {
        let ok = StatusUpdate {
            temperature: Some(-40.0),
            humidity: Some(100.0),
            power_on: Some(false),
            name: Some("Freezer ❄".into()),
            metrics: Some(BTreeMap::from([("fan_rpm".into(), 900.0)])),
            at: None,
        };
        assert_eq!(ok.validate(), Ok(()));

        let t = |t| StatusUpdate {
            temperature: Some(t),
            ..Default::default()
        };
        assert_eq!(field_of(t(-300.0)), "temperature");
        assert_eq!(field_of(t(f64::NAN)), "temperature");
        assert_eq!(field_of(t(f64::INFINITY)), "temperature");

        let h = |h| StatusUpdate {
            humidity: Some(h),
            ..Default::default()
        };
        assert_eq!(field_of(h(-0.1)), "humidity");
        assert_eq!(field_of(h(100.1)), "humidity");

        let n = |n: &str| StatusUpdate {
            name: Some(n.into()),
            ..Default::default()
        };
        assert_eq!(field_of(n("")), "name");
        assert_eq!(field_of(n("   ")), "name");
        assert_eq!(field_of(n(&"x".repeat(65))), "name");
        assert_eq!(field_of(n("a\nb")), "name");

        let m = |k: &str, v| StatusUpdate {
            metrics: Some(BTreeMap::from([(k.into(), v)])),
            ..Default::default()
        };
        assert_eq!(field_of(m("bad key", 1.0)), "metrics.bad key");
        assert_eq!(field_of(m("", 1.0)), "metrics.");
        assert_eq!(field_of(m("ok", f64::NAN)), "metrics.ok");
        assert_eq!(field_of(m("ok", 1.5e15)), "metrics.ok");
        assert_eq!(field_of(m("temperature", 1.0)), "metrics.temperature");
        assert_eq!(field_of(m("humidity", 1.0)), "metrics.humidity");
        assert_eq!(field_of(m("ok", -f64::MAX)), "metrics.ok");
        let at_the_limits = StatusUpdate {
            metrics: Some(BTreeMap::from([
                ("max".into(), MAX_METRIC_ABS),
                ("min".into(), -MAX_METRIC_ABS),
            ])),
            ..Default::default()
        };
        assert_eq!(at_the_limits.validate(), Ok(()));
        let many = StatusUpdate {
            metrics: Some((0..=MAX_METRICS).map(|i| (format!("m{i}"), 1.0)).collect()),
            ..Default::default()
        };
        assert_eq!(field_of(many), "metrics");
    }

    #[test]
    fn online_is_left_out_of_the_json_when_there_is_no_link() {
        let json = serde_json::to_value(device()).unwrap();
        assert!(json.get("online").is_none(), "{json}");
        let linked = Device {
            online: Some(false),
            ..device()
        };
        let json = serde_json::to_value(StatusEvent::from(&linked)).unwrap();
        assert_eq!(json["online"], false);
        let back: StatusEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back.into_device(), linked);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<StatusUpdate>(r#"{"temprature": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `temprature`"));
    }
}
