//! `GET /metrics`: every device's current readings, and this instance's
//! state, for Prometheus (or anything that scrapes its formats) to record
//! and alert on. The values are read from the hub at each scrape, so they
//! are exactly what `GET /api/devices` shows.
//!
//! Each device's series carry only its id (`device`); its name is in
//! `telltale_device_info`, so renaming a device does not start new series.
//! Extra metrics share one family, `telltale_device_metric`, told apart by
//! a `metric` label: their names need not be valid metric names.

use super::AppState;
use super::thresholds::reading;
use crate::model::{Device, MetricLimits, Snapshot, limits_in_force};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, prometheus_text, text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The OpenMetrics text format, sent to scrapers that ask for it (as
/// Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let scrape = Scrape {
        snapshot: state.hub.snapshot(&Default::default()),
        defaults: state.hub.thresholds().defaults,
        subscribers: state.hub.subscribers(),
        degraded: state.hub.degraded().is_some(),
    };
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = scrape.encode(openmetrics);
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// What one scrape reports.
#[derive(Debug)]
struct Scrape {
    snapshot: Snapshot,
    /// The limits of the metrics a device has none of its own for.
    defaults: MetricLimits,
    subscribers: usize,
    degraded: bool,
}

impl Scrape {
    /// The text and its content type: OpenMetrics, or else Prometheus'
    /// own text format (0.0.4), which every scraper reads.
    fn encode(self, openmetrics: bool) -> (String, &'static str) {
        let mut registry = Registry::with_prefix("telltale");
        registry.register_collector(Box::new(self));
        let mut body = String::new();
        // Writing to a String cannot fail.
        if openmetrics {
            let _ = text::encode(&mut body, &registry);
            (body, OPENMETRICS)
        } else {
            let _ = prometheus_text::encode(&mut body, &registry);
            (body, prometheus_text::CONTENT_TYPE)
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = &self.snapshot.devices;
        let mut family = encoder.encode_descriptor(
            "device",
            "A device Telltale knows, with its name.",
            None,
            MetricType::Info,
        )?;
        for d in devices {
            family.encode_info(&[("device", d.id.as_str()), ("name", d.name.as_str())])?;
        }

        gauge(
            &mut encoder,
            "device_temperature",
            "The device's last reported temperature.",
            Some(Unit::Celsius),
            devices
                .iter()
                .filter_map(|d| Some((one(d), d.status.temperature?))),
        )?;
        gauge(
            &mut encoder,
            "device_humidity",
            "The device's last reported relative humidity, 0 to 100.",
            Some(Unit::Other("percent".into())),
            devices
                .iter()
                .filter_map(|d| Some((one(d), d.status.humidity?))),
        )?;
        gauge(
            &mut encoder,
            "device_power_on",
            "1 when the device last reported its power on, 0 when off.",
            None,
            devices
                .iter()
                .filter_map(|d| Some((one(d), i64::from(d.status.power_on?)))),
        )?;
        gauge(
            &mut encoder,
            "device_metric",
            "The device's last reported extra metric, by name.",
            None,
            devices.iter().flat_map(|d| {
                d.status.metrics.iter().map(|(metric, value)| {
                    (
                        [("device", d.id.as_str()), ("metric", metric.as_str())],
                        *value,
                    )
                })
            }),
        )?;
        gauge(
            &mut encoder,
            "device_online",
            "1 while the device's live link (WebSocket agent or MQTT) is up, 0 when it is down; \
             absent for devices that report over HTTP only.",
            None,
            devices
                .iter()
                .filter_map(|d| Some((one(d), i64::from(d.online?)))),
        )?;
        gauge(
            &mut encoder,
            "device_stale",
            "1 when the device is silent past its expected report interval.",
            None,
            devices.iter().map(|d| (one(d), i64::from(d.stale))),
        )?;
        gauge(
            &mut encoder,
            "device_alerts",
            "How many of the device's readings are outside their limits.",
            None,
            devices.iter().map(|d| (one(d), d.alerts.len() as i64)),
        )?;
        gauge(
            &mut encoder,
            "device_limit",
            "A limit in force for one of the device's readings (`end`: min or max; its own, \
             else the default), in the reading's unit: a reading past it alerts.",
            None,
            devices.iter().flat_map(|d| {
                limits_in_force(Some(&d.limits), &self.defaults)
                    .into_iter()
                    .filter(|(metric, _)| reading(&d.status, metric).is_some())
                    .flat_map(|(metric, l)| {
                        [("min", l.min), ("max", l.max)]
                            .into_iter()
                            .filter_map(move |(end, v)| Some((metric.clone(), end, v?)))
                    })
                    .map(|(metric, end, v)| {
                        let labels = [
                            ("device", d.id.to_string()),
                            ("metric", metric),
                            ("end", end.to_owned()),
                        ];
                        (labels, v)
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        gauge(
            &mut encoder,
            "device_last_update_timestamp",
            "When the device's status last changed, in seconds since the epoch.",
            Some(Unit::Seconds),
            devices
                .iter()
                .map(|d| (one(d), d.updated_at.timestamp_millis() as f64 / 1e3)),
        )?;

        let none: [(&str, &str); 0] = [];
        gauge(
            &mut encoder,
            "devices",
            "How many devices Telltale knows.",
            None,
            [(none, devices.len() as i64)],
        )?;
        gauge(
            &mut encoder,
            "last_event_id",
            "The id of the latest event: it grows with every change published.",
            None,
            [(none, self.snapshot.event_id as i64)],
        )?;
        gauge(
            &mut encoder,
            "subscribers",
            "Event streams (SSE and WebSocket) this instance serves right now.",
            None,
            [(none, self.subscribers as i64)],
        )?;
        gauge(
            &mut encoder,
            "degraded",
            "1 while this instance takes no changes (cluster mode, its Redis unreachable).",
            None,
            [(none, i64::from(self.degraded))],
        )?;
        Ok(())
    }
}

/// The labels of a device's own series.
fn one(d: &Device) -> [(&'static str, &str); 1] {
    [("device", d.id.as_str())]
}

/// One gauge family, one sample per label set; nothing at all when there
/// are no samples (a family without samples would only confuse readers).
fn gauge<L, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: EncodeGaugeValue,
{
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceId, Limits, Status};
    use chrono::DateTime;

    fn scrape() -> Scrape {
        let mut rack = Device::new(DeviceId::parse("rack-1").unwrap());
        rack.name = "Rack \"A\"\nleft".into();
        rack.status = Status {
            temperature: Some(21.5),
            humidity: None,
            power_on: Some(true),
            metrics: [("fan.rpm".to_string(), 1200.0)].into(),
        };
        rack.online = Some(false);
        rack.limits = [(
            "temperature".to_string(),
            Limits {
                min: None,
                max: Some(30.0),
            },
        )]
        .into();
        rack.updated_at = DateTime::from_timestamp_millis(1_700_000_000_250).unwrap();
        let bare = Device::new(DeviceId::parse("bare").unwrap());
        Scrape {
            snapshot: Snapshot {
                event_id: 42,
                devices: vec![rack, bare],
            },
            // For a reading the rack has its own limit of, and one it does
            // not report (no sample).
            defaults: [
                (
                    "temperature".to_string(),
                    Limits {
                        min: Some(5.0),
                        max: Some(40.0),
                    },
                ),
                (
                    "humidity".to_string(),
                    Limits {
                        min: None,
                        max: Some(80.0),
                    },
                ),
            ]
            .into(),
            subscribers: 3,
            degraded: false,
        }
    }

    #[test]
    fn every_reading_is_a_sample_labelled_by_device() {
        let (body, content_type) = scrape().encode(false);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        for line in [
            r#"telltale_device_info{device="rack-1",name="Rack \"A\"\nleft"} 1"#,
            r#"telltale_device_info{device="bare",name="bare"} 1"#,
            "# TYPE telltale_device_temperature_celsius gauge",
            r#"telltale_device_temperature_celsius{device="rack-1"} 21.5"#,
            r#"telltale_device_power_on{device="rack-1"} 1"#,
            r#"telltale_device_metric{device="rack-1",metric="fan.rpm"} 1200.0"#,
            r#"telltale_device_online{device="rack-1"} 0"#,
            r#"telltale_device_stale{device="bare"} 0"#,
            r#"telltale_device_alerts{device="rack-1"} 0"#,
            r#"telltale_device_limit{device="rack-1",metric="temperature",end="max"} 30.0"#,
            r#"telltale_device_last_update_timestamp_seconds{device="rack-1"} 1700000000.25"#,
            "telltale_devices 2",
            "telltale_last_event_id 42",
            "telltale_subscribers 3",
            "telltale_degraded 0",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
        }
        // Its own limit replaces the default's both ends.
        assert!(!body.contains(r#"end="min""#), "{body}");
        // Nothing is made up for what a device never reported.
        assert!(!body.contains("humidity"), "{body}");
        assert!(!body.contains(r#"online{device="bare"}"#), "{body}");
        assert!(!body.contains(r#"power_on{device="bare"}"#), "{body}");
    }

    #[test]
    fn openmetrics_when_asked() {
        let (body, content_type) = scrape().encode(true);
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(body.contains("# UNIT telltale_device_temperature_celsius celsius"));
    }
}
