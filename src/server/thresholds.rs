//! Alert thresholds: the limits each reading should stay within, where they
//! come from, and which of a device's readings break them.
//!
//! A device's limits come from three places. Its **own** limits are the ones
//! last set over the API (`PUT /api/devices/{id}/thresholds`, kept in the
//! store, so they survive a restart), else its `[devices.ID]` section of the
//! thresholds file (`--thresholds`). A PUT replaces the file's section for
//! that device as a whole (`{}` leaves the device with the defaults only);
//! the file is never written to. Then, per metric, the effective limits are
//! the device's own, else the file's `[defaults]`.
//!
//! A reading breaks its limits when it is below `min` or above `max`; a
//! reading equal to a limit is inside. A reading the device does not carry
//! breaks nothing. The limits of `temperature` and `humidity` apply to those
//! readings (not to an extra metric of the same name); any other name is an
//! extra metric.

pub use crate::model::MetricLimits;
use crate::model::{
    Alert, Device, DeviceId, FieldError, Limits, MAX_METRICS, METRIC_NAME_RULE, Status,
    is_metric_name, limits_in_force,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Most metrics one device may have limits for: every extra metric it may
/// carry, and temperature and humidity.
pub const MAX_LIMITS: usize = MAX_METRICS + 2;

/// Checks one metric's limits: a valid metric name, finite ends, and
/// `min <= max`. The field named in an error is `metric` or `metric.min|max`.
pub fn check(metric: &str, limits: &Limits) -> Result<(), FieldError> {
    if !is_metric_name(metric) {
        return Err(FieldError::new(metric, METRIC_NAME_RULE));
    }
    for (end, value) in [("min", limits.min), ("max", limits.max)] {
        if value.is_some_and(|v| !v.is_finite()) {
            return Err(FieldError::new(
                format!("{metric}.{end}"),
                "a limit must be a finite number",
            ));
        }
    }
    if let (Some(min), Some(max)) = (limits.min, limits.max)
        && min > max
    {
        return Err(FieldError::new(
            metric,
            format!("min ({min}) is above max ({max})"),
        ));
    }
    Ok(())
}

/// Checks a device's limits ([`check`] for each, at most [`MAX_LIMITS`]);
/// returns them without the empty ones (neither `min` nor `max`), which
/// limit nothing.
pub fn check_all(limits: MetricLimits) -> Result<MetricLimits, FieldError> {
    if limits.len() > MAX_LIMITS {
        return Err(FieldError::new(
            "",
            format!("limits for at most {MAX_LIMITS} metrics per device"),
        ));
    }
    for (metric, l) in &limits {
        check(metric, l)?;
    }
    Ok(limits
        .into_iter()
        .filter(|(_, l)| l.min.is_some() || l.max.is_some())
        .collect())
}

/// Every configured limit, and the precedence between them (see the module
/// documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Thresholds {
    defaults: MetricLimits,
    /// The thresholds file's `[devices.ID]` sections.
    file: BTreeMap<DeviceId, MetricLimits>,
    /// Set over the API (and stored); wins over `file` for its device.
    set: BTreeMap<DeviceId, MetricLimits>,
}

/// The body of `GET /api/thresholds`: the defaults and each device's own
/// limits (those set over the API, else the file's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThresholdsView {
    pub defaults: MetricLimits,
    pub devices: BTreeMap<DeviceId, MetricLimits>,
}

impl Thresholds {
    /// Sets `device`'s own limits, replacing any it had (from the API or the
    /// file).
    pub fn set_own(&mut self, device: DeviceId, limits: MetricLimits) {
        self.set.insert(device, limits);
    }

    /// Takes the file's part (defaults and `[devices.ID]` limits) from
    /// `file`, a thresholds file read again; limits set over the API stay.
    pub fn replace_file(&mut self, file: Thresholds) {
        self.defaults = file.defaults;
        self.file = file.file;
    }

    /// The device's own limits, if it has any.
    pub fn own(&self, device: &DeviceId) -> Option<&MetricLimits> {
        self.set.get(device).or_else(|| self.file.get(device))
    }

    /// The limits in force for `device`, by metric: its own, and the
    /// defaults for the metrics it has none of.
    pub fn in_force(&self, device: &DeviceId) -> MetricLimits {
        limits_in_force(self.own(device), &self.defaults)
    }

    /// Sets `device`'s own limits and its alerts as these thresholds have
    /// them.
    pub fn judge(&self, device: &mut Device) {
        device.limits = self.own(&device.id).cloned().unwrap_or_default();
        device.alerts = self.alerts(device);
    }

    /// The readings of `device` that break their effective limits.
    fn alerts(&self, device: &Device) -> BTreeMap<String, Alert> {
        self.in_force(&device.id)
            .into_iter()
            .filter_map(|(metric, limits)| {
                let value = reading(&device.status, &metric)?;
                (limits.min.is_some_and(|min| value < min)
                    || limits.max.is_some_and(|max| value > max))
                .then_some((metric, Alert { value, limits }))
            })
            .collect()
    }

    pub fn view(&self) -> ThresholdsView {
        let mut devices = self.file.clone();
        devices.extend(self.set.clone());
        ThresholdsView {
            defaults: self.defaults.clone(),
            devices,
        }
    }
}

/// The reading a limit named `metric` applies to.
pub fn reading(status: &Status, metric: &str) -> Option<f64> {
    match metric {
        "temperature" => status.temperature,
        "humidity" => status.humidity,
        other => status.metrics.get(other).copied(),
    }
}

/// What a thresholds file configures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThresholdsFile {
    /// The limits (none set over the API yet: the hub adds the stored ones).
    pub thresholds: Thresholds,
    /// `stale_after` in `[defaults]`: for every device without its own.
    pub stale_after: Option<Duration>,
    /// `stale_after` in a `[devices.ID]` section.
    pub device_stale_after: BTreeMap<DeviceId, Duration>,
}

/// A section: metric name → `{ min, max }`, and `stale_after`.
type RawSection = BTreeMap<String, toml::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawSection,
    #[serde(default)]
    devices: BTreeMap<String, RawSection>,
}

/// The key of a section that is not a metric.
const STALE_AFTER: &str = "stale_after";

impl ThresholdsFile {
    /// Reads and checks the file at `path`; the error names the file and
    /// the fault.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("thresholds file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("thresholds file {}: {e}", path.display()))
    }

    /// Reads a thresholds file's text, e.g.
    ///
    /// ```toml
    /// [defaults]                     # every device
    /// humidity = { min = 20, max = 80 }
    /// [devices.rack-1]
    /// temperature = { max = 30 }
    /// stale_after = "30s"            # instead of three learned intervals
    /// ```
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        let mut file = Self::default();
        let (defaults, stale_after) = section("defaults", raw.defaults)?;
        file.thresholds.defaults = defaults;
        file.stale_after = stale_after;
        for (id, raw) in raw.devices {
            let name = format!("devices.{id}");
            let id = DeviceId::parse(&id).map_err(|e| format!("[{name}]: {e}"))?;
            let (limits, stale_after) = section(&name, raw)?;
            if let Some(after) = stale_after {
                file.device_stale_after.insert(id.clone(), after);
            }
            file.thresholds.file.insert(id, limits);
        }
        Ok(file)
    }
}

/// One `[defaults]` or `[devices.ID]` section: its limits and `stale_after`.
fn section(name: &str, raw: RawSection) -> Result<(MetricLimits, Option<Duration>), String> {
    let mut stale_after = None;
    let mut limits = MetricLimits::new();
    for (key, value) in raw {
        let at = format!("{name}.{key}");
        if key == STALE_AFTER {
            let text = value
                .as_str()
                .ok_or_else(|| format!("{at}: expected a duration such as \"30s\""))?;
            let after = humantime::parse_duration(text).map_err(|e| format!("{at}: {e}"))?;
            if after.is_zero() {
                return Err(format!("{at}: must be longer than zero"));
            }
            stale_after = Some(after);
            continue;
        }
        let crate::model::Object(l): crate::model::Object<Limits> = value
            .try_into()
            .map_err(|e: toml::de::Error| format!("{at}: expected {{ min = …, max = … }}: {e}"))?;
        limits.insert(key, l);
    }
    let limits = check_all(limits).map_err(|e| {
        let field = if e.field.is_empty() {
            name.to_owned()
        } else {
            format!("{name}.{}", e.field)
        };
        format!("{field}: {}", e.message)
    })?;
    Ok((limits, stale_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn limits(min: Option<f64>, max: Option<f64>) -> Limits {
        Limits { min, max }
    }

    fn device(name: &str, temperature: f64, humidity: f64, load: f64) -> Device {
        let mut d = Device::new(id(name));
        d.status.temperature = Some(temperature);
        d.status.humidity = Some(humidity);
        d.status.metrics.insert("load".into(), load);
        d
    }

    const EXAMPLE: &str = r#"
        [defaults]              # every device
        humidity = { min = 20, max = 80 }
        load = { max = 2.5 }

        [devices.rack-1]
        temperature = { max = 30 }
        humidity = { max = 50 }
        stale_after = "30s"
    "#;

    #[test]
    fn parses_the_example_file() {
        let file = ThresholdsFile::parse(EXAMPLE).unwrap();
        let view = file.thresholds.view();
        assert_eq!(
            view.defaults,
            MetricLimits::from([
                ("humidity".into(), limits(Some(20.0), Some(80.0))),
                ("load".into(), limits(None, Some(2.5))),
            ])
        );
        assert_eq!(
            view.devices[&id("rack-1")],
            MetricLimits::from([
                ("humidity".into(), limits(None, Some(50.0))),
                ("temperature".into(), limits(None, Some(30.0))),
            ])
        );
        assert_eq!(file.stale_after, None);
        assert_eq!(
            file.device_stale_after[&id("rack-1")],
            Duration::from_secs(30)
        );
        let empty = ThresholdsFile::parse("").unwrap();
        assert_eq!(empty, ThresholdsFile::default());
        let everyone = ThresholdsFile::parse("[defaults]\nstale_after = \"1m\"").unwrap();
        assert_eq!(everyone.stale_after, Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_bad_file_names_the_fault() {
        let fault = |text: &str| ThresholdsFile::parse(text).unwrap_err();
        assert!(
            fault("[defaults\n").contains("line 1"),
            "{}",
            fault("[defaults\n")
        );
        assert!(fault("[alarms]\nx = 1").contains("unknown field `alarms`"));
        let e = fault("[devices.rack-1]\ntemperature = { min = 40, max = 30 }");
        assert!(
            e.starts_with("devices.rack-1.temperature: min (40) is above max (30)"),
            "{e}"
        );
        let e = fault("[defaults]\ntemperature = { maximum = 30 }");
        assert!(e.starts_with("defaults.temperature: expected"), "{e}");
        assert!(e.contains("maximum"), "{e}");
        // Not read by position.
        let e = fault("[defaults]\ntemperature = [20, 30]");
        assert!(e.starts_with("defaults.temperature: expected"), "{e}");
        let e = fault("[defaults]\ntemperature = { max = nan }");
        assert!(e.starts_with("defaults.temperature.max: "), "{e}");
        let e = fault("[defaults]\ntemperature = { max = inf }");
        assert!(e.starts_with("defaults.temperature.max: "), "{e}");
        let e = fault("[defaults]\n\"bad name\" = { max = 1 }");
        assert!(e.starts_with("defaults.bad name: a metric name"), "{e}");
        let e = fault("[devices.Rack]\ntemperature = { max = 1 }");
        assert!(e.starts_with("[devices.Rack]: a device id"), "{e}");
        let e = fault("[devices.a]\nstale_after = 30");
        assert!(
            e.starts_with("devices.a.stale_after: expected a duration"),
            "{e}"
        );
        let e = fault("[devices.a]\nstale_after = \"soon\"");
        assert!(e.starts_with("devices.a.stale_after: "), "{e}");
        let e = fault("[devices.a]\nstale_after = \"0s\"");
        assert!(e.contains("longer than zero"), "{e}");
    }

    #[test]
    fn loading_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.toml");
        let e = ThresholdsFile::load(&path).unwrap_err();
        assert!(
            e.starts_with(&format!("thresholds file {}: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, "[defaults]\nhumidity = { min = 90, max = 10 }").unwrap();
        let e = ThresholdsFile::load(&path).unwrap_err();
        assert!(
            e.contains("defaults.humidity: min (90) is above max (10)"),
            "{e}"
        );
        std::fs::write(&path, EXAMPLE).unwrap();
        assert!(ThresholdsFile::load(&path).is_ok());
    }

    #[test]
    fn only_readings_outside_their_limits_alert() {
        let t = ThresholdsFile::parse(EXAMPLE).unwrap().thresholds;
        // Inside everything; a reading equal to a limit is inside.
        assert!(t.alerts(&device("other", 99.0, 80.0, 2.5)).is_empty());
        // The defaults apply to every device.
        let alerts = t.alerts(&device("other", 99.0, 19.5, 3.0));
        assert_eq!(
            alerts,
            BTreeMap::from([
                (
                    "humidity".into(),
                    Alert {
                        value: 19.5,
                        limits: limits(Some(20.0), Some(80.0))
                    }
                ),
                (
                    "load".into(),
                    Alert {
                        value: 3.0,
                        limits: limits(None, Some(2.5))
                    }
                ),
            ])
        );
        // A device's own limit replaces the default for that metric only.
        let alerts = t.alerts(&device("rack-1", 30.5, 10.0, 3.0));
        assert_eq!(
            alerts.keys().collect::<Vec<_>>(),
            ["load", "temperature"],
            "humidity 10 is inside rack-1's own {{max = 50}}"
        );
        assert_eq!(alerts["temperature"].value, 30.5);
        assert_eq!(alerts["temperature"].limits, limits(None, Some(30.0)));
        // A reading the device does not carry breaks nothing.
        assert!(t.alerts(&Device::new(id("rack-1"))).is_empty());
    }

    #[test]
    fn limits_set_over_the_api_replace_the_files_for_that_device() {
        let mut t = ThresholdsFile::parse(EXAMPLE).unwrap().thresholds;
        t.set_own(
            id("rack-1"),
            MetricLimits::from([("load".into(), limits(Some(1.0), None))]),
        );
        let alerts = t.alerts(&device("rack-1", 99.0, 90.0, 0.5));
        // The file's temperature limit is gone; humidity is the default's again.
        assert_eq!(alerts.keys().collect::<Vec<_>>(), ["humidity", "load"]);
        t.set_own(id("rack-1"), MetricLimits::new());
        assert_eq!(t.view().devices[&id("rack-1")], MetricLimits::new());
        assert_eq!(
            t.alerts(&device("rack-1", 99.0, 90.0, 0.5))
                .keys()
                .collect::<Vec<_>>(),
            ["humidity"]
        );
        // A device never mentioned in the file can have its own too.
        t.set_own(
            id("new"),
            MetricLimits::from([("temperature".into(), limits(None, Some(0.0)))]),
        );
        assert!(
            t.alerts(&device("new", 1.0, 50.0, 0.0))
                .contains_key("temperature")
        );
        assert_eq!(t.view().devices.len(), 2);
    }

    #[test]
    fn checks_name_the_faulty_field_and_drop_empty_limits() {
        let field = |m: &str, l| check(m, &l).unwrap_err().field;
        assert_eq!(
            field("temperature", limits(Some(2.0), Some(1.0))),
            "temperature"
        );
        assert_eq!(field("x", limits(Some(f64::NAN), None)), "x.min");
        assert_eq!(field("x", limits(None, Some(f64::INFINITY))), "x.max");
        assert_eq!(field("", limits(None, None)), "");
        assert_eq!(field("a b", limits(None, None)), "a b");
        assert!(check("fan.rpm-2_x", &limits(Some(1.0), Some(1.0))).is_ok());
        let kept = check_all(MetricLimits::from([
            ("a".into(), limits(None, None)),
            ("b".into(), limits(None, Some(1.0))),
        ]))
        .unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["b"]);
        let many = (0..=MAX_LIMITS)
            .map(|i| (format!("m{i}"), limits(None, Some(1.0))))
            .collect();
        assert_eq!(check_all(many).unwrap_err().field, "");
    }
}
