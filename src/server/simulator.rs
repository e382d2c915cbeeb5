//! The built-in device source: three devices drifting realistically, so the
//! page is alive on first start. Each reading takes a small random step back
//! towards its device's set point; power changes now and then.
//!
//! It is also the in-process agent of its devices, registered in the same
//! command registry as a WebSocket agent: a `power_on` command is applied at
//! once, published as a status event, then confirmed as `applied`. A device
//! that another agent takes over is left to it for good: in cluster mode
//! that makes the last instance started the one that simulates.

use super::commands::{AgentLink, Commands, Settled};
use super::hub::Hub;
use crate::model::{DeviceId, StatusUpdate};
use crate::protocol::Outcome;
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

pub async fn run(
    hub: Arc<Hub>,
    commands: Arc<Commands>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut rng = SmallRng::from_os_rng();
    // One link per device, funnelled into one queue tagged with the index.
    let (commanded, mut incoming) = tokio::sync::mpsc::channel(16);
    let links: Vec<_> = DEVICES
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let id = DeviceId::parse(device.id).expect("simulator ids are valid");
            let AgentLink {
                generation,
                commands: mut queue,
                replaced,
                ..
            } = commands.register(&id);
            let commanded = commanded.clone();
            tokio::spawn(async move {
                while let Some(command) = queue.recv().await {
                    if commanded.send((i, command)).await.is_err() {
                        break;
                    }
                }
            });
            (id, generation, replaced)
        })
        .collect();
    drop(commanded);
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
            Some((i, command)) = incoming.recv() => {
                let (id, generation, replaced) = &links[i];
                if replaced.is_cancelled() {
                    // A real agent took this device over; it answers now.
                    continue;
                }
                if let Some(on) = command.set.power_on {
                    readings[i].2 = on;
                    let update = StatusUpdate { power_on: Some(on), ..Default::default() };
                    if let Err(e) = hub.apply(id, &update) {
                        tracing::error!("simulator {id}: {e}");
                    }
                }
                let link_state = commands.settle(id, *generation, &command.request_id, Settled {
                    outcome: Outcome::Applied,
                    reason: None,
                });
                if let Err(e) = link_state {
                    tracing::debug!("simulator command {}: {e}", command.request_id);
                }
                continue;
            }
            () = shutdown.cancelled() => return,
        }
        for ((device, (t, h, on, metrics)), (_, _, replaced)) in
            DEVICES.iter().zip(readings.iter_mut()).zip(&links)
        {
            if replaced.is_cancelled() {
                // A real agent (or, in cluster mode, another instance's
                // simulator) took this device over: its readings are theirs.
                continue;
            }
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
            if let Err(e) = hub.apply(&id, &update) {
                tracing::error!("simulator {id}: {e}");
            }
        }
    }
}
