//! The built-in device source: three devices drifting realistically, so the
//! page is alive on first start. Each reading takes a small random step back
//! towards its device's set point. Power changes only by command: switched
//! off, a device drifts towards room conditions (the freezer warms up, the
//! rack cools down) and what only runs with power (fans, compressor, lamps)
//! stops at once; switched on again, it returns to its set points.
//!
//! It is also the in-process agent of its devices, registered in the same
//! command registry as a WebSocket agent: a `power_on` command is applied at
//! once, published as a status event, then confirmed as `applied`. A device
//! that another agent takes over is left to it for good: in cluster mode
//! that makes the last instance started the one that simulates.

use super::commands::{AgentLink, Commands, Settled};
use super::hub::Hub;
use crate::model::{DeviceId, Limits, StatusUpdate};
use crate::protocol::Outcome;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How one reading moves: `(set point, random step)` with power on, and
/// with power off (`None`: it needs power, so it is 0 while off).
#[derive(Clone, Copy, Debug)]
struct Drift {
    on: (f64, f64),
    off: Option<(f64, f64)>,
}

const fn drift_to(on: (f64, f64), off: (f64, f64)) -> Drift {
    Drift { on, off: Some(off) }
}

const fn powered(on: (f64, f64)) -> Drift {
    Drift { on, off: None }
}

struct Simulated {
    id: &'static str,
    name: &'static str,
    temperature: Drift,
    humidity: Drift,
    metrics: &'static [(&'static str, Drift)],
    /// The limits it comes with: `(metric, min, max)`.
    limits: &'static [(&'static str, Option<f64>, Option<f64>)],
}

const DEVICES: [Simulated; 3] = [
    Simulated {
        id: "greenhouse",
        name: "Greenhouse",
        // Off: no heating, misting or grow lights; daylight stays.
        temperature: drift_to((24.0, 0.3), (14.0, 0.3)),
        humidity: drift_to((65.0, 1.0), (80.0, 1.0)),
        metrics: &[
            ("soil_moisture", drift_to((40.0, 1.5), (25.0, 0.5))),
            ("lux", drift_to((12000.0, 400.0), (3000.0, 200.0))),
        ],
        limits: &[("soil_moisture", Some(30.0), None)],
    },
    Simulated {
        id: "server-rack",
        name: "Server rack",
        temperature: drift_to((31.0, 0.5), (22.0, 0.2)),
        humidity: drift_to((35.0, 0.5), (40.0, 0.5)),
        metrics: &[
            ("fan_rpm", powered((2400.0, 60.0))),
            ("load", powered((0.6, 0.05))),
        ],
        limits: &[("temperature", None, Some(38.0))],
    },
    Simulated {
        id: "freezer",
        name: "Lab freezer",
        temperature: drift_to((-20.0, 0.2), (21.0, 0.2)),
        humidity: drift_to((20.0, 0.5), (45.0, 0.5)),
        metrics: &[("compressor_duty", powered((0.45, 0.03)))],
        limits: &[("temperature", None, Some(-15.0))],
    },
];

/// Gives each simulated device its limits the first time it appears (as
/// an installer would, over the API's path: kept in the store, shared in a
/// cluster), so switching the freezer off ends in an alert. A device seen
/// before, or with limits of its own (from the API or the thresholds
/// file), keeps what it has: an operator's change is never undone.
fn come_with_limits(hub: &Hub) {
    for device in &DEVICES {
        let id = DeviceId::parse(device.id).expect("simulator ids are valid");
        if hub.device(&id).is_some() || hub.own_limits(&id).is_some() {
            continue;
        }
        let limits = device
            .limits
            .iter()
            .map(|&(metric, min, max)| (metric.to_owned(), Limits { min, max }))
            .collect();
        if let Err(e) = hub.set_limits(&id, limits) {
            tracing::warn!("simulator {id}: its limits are not set: {e}");
        }
    }
}

/// The next value of a reading: a tenth of the way back to its set point
/// for the power state, plus a random step; to two decimals. A reading
/// with an off set point has inertia: it moves no more than a step a tick
/// towards it (a freezer switched off warms up over minutes). What needs
/// power is 0 while off and starts at its set point when on again.
fn drift(rng: &mut impl Rng, value: f64, how: Drift, power_on: bool) -> f64 {
    let (set_point, step) = match (power_on, how.off) {
        (true, _) => how.on,
        (false, Some(off)) => off,
        (false, None) => return 0.0,
    };
    let pull = match how.off {
        Some(_) => ((set_point - value) * 0.1).clamp(-step, step),
        None if value == 0.0 => set_point,
        None => (set_point - value) * 0.1,
    };
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
    come_with_limits(&hub);
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
                d.temperature.on.0,
                d.humidity.on.0,
                true,
                d.metrics.iter().map(|m| m.1.on.0).collect(),
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
            *t = drift(&mut rng, *t, device.temperature, *on);
            *h = drift(&mut rng, *h, device.humidity, *on).clamp(0.0, 100.0);
            let metrics: BTreeMap<String, f64> = device
                .metrics
                .iter()
                .zip(metrics.iter_mut())
                .map(|(&(name, how), v)| {
                    *v = drift(&mut rng, *v, how, *on).max(0.0);
                    (name.to_owned(), *v)
                })
                .collect();
            let update = StatusUpdate {
                temperature: Some(*t),
                humidity: Some(*h),
                power_on: Some(*on),
                name: Some(device.name.to_owned()),
                metrics: Some(metrics),
                at: None,
            };
            debug_assert_eq!(update.validate(), Ok(()));
            let id = DeviceId::parse(device.id).expect("simulator ids are valid");
            if let Err(e) = hub.apply(&id, &update) {
                tracing::error!("simulator {id}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(drift_of: Drift, from: f64, power_on: bool, ticks: usize) -> f64 {
        let mut rng = SmallRng::seed_from_u64(7);
        (0..ticks).fold(from, |v, _| drift(&mut rng, v, drift_of, power_on))
    }

    #[test]
    fn a_reading_stays_near_its_set_point_while_on() {
        let freezer = DEVICES[2].temperature;
        let mut rng = SmallRng::seed_from_u64(1);
        let mut v = freezer.on.0;
        for _ in 0..1000 {
            v = drift(&mut rng, v, freezer, true);
            assert!((v - -20.0).abs() < 2.0, "{v} strayed from -20");
        }
    }

    #[test]
    fn switched_off_it_drifts_to_its_off_set_point_and_back_when_on() {
        let freezer = DEVICES[2].temperature;
        let warming = run(freezer, -20.0, false, 20);
        assert!(
            (-18.0..=-14.0).contains(&warming),
            "off for 20 ticks it warms by a step a tick or so: {warming}"
        );
        let warm = run(freezer, -20.0, false, 500);
        assert!((warm - 21.0).abs() < 1.5, "off for 500 ticks: {warm}");
        let cold = run(freezer, warm, true, 500);
        assert!((cold - -20.0).abs() < 1.5, "on again for 500 ticks: {cold}");
    }

    #[test]
    fn what_needs_power_stops_at_once_when_off() {
        let fan = DEVICES[1].metrics[0].1;
        assert_eq!(run(fan, 2400.0, false, 1), 0.0);
        let started = run(fan, 0.0, true, 1);
        assert!((started - 2400.0).abs() <= 60.0, "on again: {started}");
    }
}
