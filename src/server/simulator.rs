//! The built-in device source: three devices drifting realistically, so the
//! page is alive on first start. Each reading takes a small random step back
//! towards its device's set point; power changes now and then.

use super::hub::Hub;
use crate::model::{DeviceId, StatusUpdate};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Simulated {
    id: &'static str,
    name: &'static str,
    temperature: (f64, f64),
    humidity: (f64, f64),
    metrics: &'static [(&'static str, f64, f64)],
}

/// (set point, step size) per reading; metrics are (name, set point, step).
const DEVICES: [Simulated; 3] = [
    Simulated {
        id: "greenhouse",
        name: "Greenhouse",
        temperature: (24.0, 0.3),
        humidity: (65.0, 1.0),
        metrics: &[("soil_moisture", 40.0, 1.5), ("lux", 12000.0, 400.0)],
    },
    Simulated {
        id: "server-rack",
        name: "Server rack",
        temperature: (31.0, 0.5),
        humidity: (35.0, 0.5),
        metrics: &[("fan_rpm", 2400.0, 60.0), ("load", 0.6, 0.05)],
    },
    Simulated {
        id: "freezer",
        name: "Lab freezer",
        temperature: (-20.0, 0.2),
        humidity: (20.0, 0.5),
        metrics: &[("compressor_duty", 0.45, 0.03)],
    },
];

fn drift(rng: &mut impl Rng, value: f64, (set_point, step): (f64, f64)) -> f64 {
    let pull = (set_point - value) * 0.1;
    let next = value + pull + rng.random_range(-step..=step);
    (next * 100.0).round() / 100.0
}

pub async fn run(hub: Arc<Hub>, interval: Duration, shutdown: CancellationToken) {
    let mut rng = SmallRng::from_os_rng();
    let mut readings: Vec<(f64, f64, bool, Vec<f64>)> = DEVICES
        .iter()
        .map(|d| {
            (
                d.temperature.0,
                d.humidity.0,
                true,
                d.metrics.iter().map(|m| m.1).collect(),
            )
        })
        .collect();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        for (device, (t, h, on, metrics)) in DEVICES.iter().zip(readings.iter_mut()) {
            *t = drift(&mut rng, *t, device.temperature);
            *h = drift(&mut rng, *h, device.humidity).clamp(0.0, 100.0);
            if rng.random_bool(0.02) {
                *on = !*on;
            }
            let metrics: BTreeMap<String, f64> = device
                .metrics
                .iter()
                .zip(metrics.iter_mut())
                .map(|(&(name, set_point, step), v)| {
                    *v = drift(&mut rng, *v, (set_point, step)).max(0.0);
                    (name.to_owned(), *v)
                })
                .collect();
            let update = StatusUpdate {
                temperature: Some(*t),
                humidity: Some(*h),
                power_on: Some(*on),
                name: Some(device.name.to_owned()),
                metrics: Some(metrics),
            };
            debug_assert_eq!(update.validate(), Ok(()));
            let id = DeviceId::parse(device.id).expect("simulator ids are valid");
            hub.apply(&id, &update)
                .expect("simulator updates are valid");
        }
    }
}
