//! MQTT (`--mqtt URL`): devices that speak MQTT report, announce their link
//! and take commands through a broker, with the same rules as over HTTP and
//! the WebSocket. Topics, under the prefix `P` (`--mqtt-topic`, default
//! `telltale`), `ID` a device id:
//!
//! - `P/ID/status`, from the device: the JSON of
//!   `POST /api/devices/{id}/status`, checked the same way.
//! - `P/ID/online`, from the device: `true` or `false` (also `online`,
//!   `offline`, `1`, `0`). Retained `true` once connected, and `false` as
//!   its Last Will: the device is online (and takes commands) while `true`.
//! - `P/ID/set`, to an online device: `{"request_id": "c-7", "set":
//!   {"power_on": false}}`, answered on `P/ID/result` with
//!   `{"request_id": "c-7", "outcome": "applied" | "failed", "reason": "…"}`.
//! - `P/ID/error`, to the device: `{"error": "…", "field": "…"}` for a
//!   message that was refused (nothing changed).
//!
//! Telltale subscribes at QoS 1 with a persistent session (client id
//! `telltale`, or `?client_id=` in the URL) and acknowledges a message only
//! once what it says is stored, so an update published while Telltale was
//! away, or refused because the store could not take it, comes again.
//! Whoever may publish under `P/` speaks for its devices: the broker's ACL
//! decides who may.

use super::api::{MAX_BODY, parse_object};
use super::commands::{AgentCommand, AgentLink, Commands, Settled};
use super::error::ApiError;
use super::hub::{ApplyError, Hub};
use crate::model::{DeviceId, StatusUpdate};
use crate::protocol::{CommandSet, Outcome};
use percent_encoding::percent_decode_str;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest wait between two tries to reach the broker.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Requests (publishes, acks) queued for the broker connection.
const QUEUE: usize = 1024;

/// The bridge's settings, checked at start.
pub struct Bridge {
    options: MqttOptions,
    prefix: String,
    /// The broker as logs show it (no credentials).
    shown: String,
}

/// The bridge for `url` under `prefix`; `Err` says what is wrong with them.
pub fn prepare(url: &str, prefix: &str) -> Result<Bridge, String> {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() || prefix.contains(['+', '#']) {
        return Err(format!(
            "--mqtt-topic {prefix:?}: a topic prefix is not empty and has no + or #"
        ));
    }
    const EXPECTED: &str = "expected mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS";
    let url = reqwest::Url::parse(url).map_err(|e| format!("--mqtt: {EXPECTED} ({e})"))?;
    let host = match (url.scheme(), url.host_str()) {
        ("mqtt" | "mqtts", Some(host)) if !host.is_empty() => host.trim_matches(['[', ']']),
        _ => return Err(format!("--mqtt: {EXPECTED}")),
    };
    let (transport, port) = if url.scheme() == "mqtts" {
        let config = crate::tls::client_config(host).map_err(|e| format!("--mqtt: {e}"))?;
        (
            Transport::tls_with_config(TlsConfiguration::Rustls(config)),
            8883,
        )
    } else {
        (Transport::Tcp, 1883)
    };
    let mut client_id = "telltale".to_owned();
    for (key, value) in url.query_pairs() {
        match &*key {
            "client_id" if !value.is_empty() => client_id = value.into_owned(),
            _ => {
                return Err(format!(
                    "--mqtt: unknown or empty URL parameter `{key}` (known: client_id)"
                ));
            }
        }
    }
    let port = url.port().unwrap_or(port);
    let mut options = MqttOptions::new(client_id, host.to_owned(), port);
    options
        .set_transport(transport)
        .set_keep_alive(Duration::from_secs(30))
        // A session the broker keeps while Telltale is away; messages are
        // acknowledged once stored.
        .set_clean_session(false)
        .set_manual_acks(true)
        // Larger messages are answered with an error, not dropped with the
        // connection (which would bring them again).
        .set_max_packet_size(4 * MAX_BODY, 64 * 1024);
    if !url.username().is_empty() {
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        options.set_credentials(
            decode(url.username()),
            decode(url.password().unwrap_or_default()),
        );
    }
    let shown = format!("{}://{}:{port}", url.scheme(), options.broker_address().0);
    Ok(Bridge {
        options,
        prefix: prefix.to_owned(),
        shown,
    })
}

/// Starts the bridge: it connects, and reconnects, until `shutdown`.
pub fn start(
    bridge: Bridge,
    hub: &Arc<Hub>,
    commands: &Arc<Commands>,
    shutdown: &CancellationToken,
) {
    tokio::spawn(bridge.run(hub.clone(), commands.clone(), shutdown.clone()));
}

/// A message from a device, by its topic's last level.
enum Topic {
    Status,
    Online,
    Result,
}

/// The answer to a command, on `P/ID/result`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    request_id: String,
    outcome: Outcome,
    #[serde(default)]
    reason: Option<String>,
}

/// A command, on `P/ID/set`.
#[derive(Serialize)]
struct SetMessage<'a> {
    request_id: &'a str,
    set: &'a CommandSet,
}

/// A device that is online over MQTT: its agent link lives in [`forward`].
struct Linked {
    generation: u64,
    replaced: CancellationToken,
    gone: CancellationToken,
}

/// What became of one message.
enum Handled {
    /// Taken, or refused for good (the device was told why): acknowledge.
    Done,
    /// The store could not take it: leave it unacknowledged, so the broker
    /// brings it again once reconnected.
    Again(String),
}

struct Running {
    prefix: String,
    client: AsyncClient,
    hub: Arc<Hub>,
    commands: Arc<Commands>,
    links: HashMap<DeviceId, Linked>,
}

impl Bridge {
    async fn run(self, hub: Arc<Hub>, commands: Arc<Commands>, shutdown: CancellationToken) {
        let (client, mut events) = AsyncClient::new(self.options, QUEUE);
        let mut running = Running {
            prefix: self.prefix,
            client,
            hub,
            commands,
            links: HashMap::new(),
        };
        let shown = self.shown;
        let mut backoff = Duration::from_secs(1);
        let mut connected = false;
        loop {
            let event = tokio::select! {
                event = events.poll() => event,
                () = shutdown.cancelled() => break,
            };
            let failed = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff = Duration::from_secs(1);
                    running.subscribe().err()
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let topics = format!("{}/+/status, online and result", running.prefix);
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        tracing::error!(
                            "MQTT: {shown} refused some of {topics} (see its ACL): \
                             their messages are not taken"
                        );
                    } else {
                        tracing::info!("MQTT: connected to {shown}, following {topics}");
                    }
                    None
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    match running.handle(&message) {
                        Handled::Done => running.ack(&message),
                        Handled::Again(why) => {
                            // Nothing after it is taken either: the broker
                            // brings them again, in order.
                            events.clean();
                            Some(why)
                        }
                    }
                }
                Ok(_) => None,
                Err(e) => Some(match crate::tls::cause(&e) {
                    Some(tls) => crate::tls::explain(tls),
                    None => e.to_string(),
                }),
            };
            if let Some(why) = failed {
                if connected {
                    tracing::warn!("MQTT: {shown}: {why}; connecting again");
                } else {
                    tracing::warn!(
                        "MQTT: {shown}: {why}; trying again in {}",
                        humantime::format_duration(backoff)
                    );
                }
                connected = false;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        // Its devices go offline with it.
        for linked in running.links.values() {
            linked.gone.cancel();
        }
        let _ = running.client.try_disconnect();
    }
}

impl Running {
    /// One SUBSCRIBE for the three topics devices publish on.
    fn subscribe(&self) -> Result<(), String> {
        let filters = ["status", "online", "result"].map(|level| {
            SubscribeFilter::new(format!("{}/+/{level}", self.prefix), QoS::AtLeastOnce)
        });
        self.client
            .try_subscribe_many(filters)
            .map_err(|e| e.to_string())
    }

    fn ack(&self, message: &Publish) -> Option<String> {
        self.client.try_ack(message).err().map(|e| e.to_string())
    }

    /// Tells the device (on `P/ID/error`) why its message changed nothing.
    fn refuse(&self, device: &str, topic: &str, error: ApiError) -> Handled {
        tracing::info!("MQTT: {topic} refused: {error}");
        let body = error.body().to_string();
        let error_topic = format!("{}/{device}/error", self.prefix);
        if let Err(e) = self
            .client
            .try_publish(error_topic, QoS::AtLeastOnce, false, body)
        {
            tracing::warn!("MQTT: could not tell {device} why: {e}");
        }
        Handled::Done
    }

    fn handle(&mut self, message: &Publish) -> Handled {
        let topic = &message.topic;
        let Some((device, kind)) = topic
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split_once('/'))
        else {
            return Handled::Done;
        };
        let kind = match kind {
            "status" => Topic::Status,
            "online" => Topic::Online,
            "result" => Topic::Result,
            _ => return Handled::Done,
        };
        let id = match DeviceId::parse(device) {
            Ok(id) => id,
            Err(e) => return self.refuse(device, topic, ApiError::invalid("id", e)),
        };
        if message.payload.len() > MAX_BODY {
            return self.refuse(device, topic, ApiError::PayloadTooLarge { limit: MAX_BODY });
        }
        let done = match kind {
            Topic::Status => self.status(&id, &message.payload),
            Topic::Online => self.online(&id, &message.payload),
            Topic::Result => self.result(&id, &message.payload),
        };
        match done {
            Ok(()) => Handled::Done,
            Err(ApiError::Unavailable(why)) => Handled::Again(why),
            Err(e) => self.refuse(device, topic, e),
        }
    }

    fn status(&self, id: &DeviceId, payload: &[u8]) -> Result<(), ApiError> {
        let update: StatusUpdate = parse_object(payload)?;
        update.validate()?;
        match self.hub.apply(id, &update) {
            Ok(_) => Ok(()),
            Err(ApplyError::Invalid(e)) => Err(e.into()),
            Err(ApplyError::Store(e)) => Err(ApiError::Unavailable(e.to_string())),
        }
    }

    fn online(&mut self, id: &DeviceId, payload: &[u8]) -> Result<(), ApiError> {
        let online = match std::str::from_utf8(payload).map(str::trim) {
            Ok("true" | "online" | "1") => true,
            Ok("false" | "offline" | "0") => false,
            _ => {
                return Err(ApiError::invalid(
                    "",
                    "expected true or false (or online, offline, 1, 0)",
                ));
            }
        };
        let current = self
            .links
            .get(id)
            .filter(|linked| !linked.replaced.is_cancelled());
        match (online, current) {
            (true, Some(_)) => {}
            (true, None) => {
                let link = self.commands.register(id);
                let gone = CancellationToken::new();
                self.links.insert(
                    id.clone(),
                    Linked {
                        generation: link.generation,
                        replaced: link.replaced.clone(),
                        gone: gone.clone(),
                    },
                );
                let topic = format!("{}/{id}/set", self.prefix);
                tokio::spawn(forward(
                    link,
                    topic,
                    self.client.clone(),
                    self.commands.clone(),
                    gone,
                ));
            }
            (false, _) => {
                if let Some(linked) = self.links.remove(id) {
                    linked.gone.cancel();
                }
            }
        }
        Ok(())
    }

    fn result(&self, id: &DeviceId, payload: &[u8]) -> Result<(), ApiError> {
        let answer: Answer = parse_object(payload)?;
        if answer.outcome == Outcome::TimedOut {
            return Err(ApiError::invalid(
                "outcome",
                "a device answers `applied` or `failed`",
            ));
        }
        let generation = self
            .links
            .get(id)
            .map(|linked| linked.generation)
            .ok_or_else(|| {
                ApiError::invalid(
                    "",
                    "this device is not online: publish true on its online topic first",
                )
            })?;
        let settled = Settled {
            outcome: answer.outcome,
            reason: answer.reason,
        };
        self.commands
            .settle(id, generation, &answer.request_id, settled)
            .map_err(|why| ApiError::invalid("request_id", why))
    }
}

/// Publishes the commands routed to `link` on `topic` until the device
/// goes offline (`gone`) or another agent takes it over; then lets go of it.
async fn forward(
    mut link: AgentLink,
    topic: String,
    client: AsyncClient,
    commands: Arc<Commands>,
    gone: CancellationToken,
) {
    loop {
        let command: AgentCommand = tokio::select! {
            Some(command) = link.commands.recv() => command,
            () = link.replaced.cancelled() => break,
            () = gone.cancelled() => break,
        };
        let message = SetMessage {
            request_id: &command.request_id,
            set: &command.set,
        };
        let body = serde_json::to_vec(&message).unwrap_or_default();
        if let Err(e) = client.publish(&topic, QoS::AtLeastOnce, false, body).await {
            let _ = commands.settle(
                &link.device,
                link.generation,
                &command.request_id,
                Settled::failed(format!("not sent to the MQTT broker: {e}")),
            );
        }
    }
    commands.unregister(&link);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_prefixes() {
        let bridge = prepare(
            "mqtt://user:p%40ss@broker.lan:1884?client_id=lab-1",
            "site/a/",
        )
        .unwrap();
        assert_eq!(bridge.prefix, "site/a");
        assert_eq!(bridge.shown, "mqtt://broker.lan:1884");
        assert_eq!(bridge.options.client_id(), "lab-1");
        let login = bridge.options.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("user", "p@ss")
        );
        assert!(!bridge.options.clean_session());

        let plain = prepare("mqtt://127.0.0.1", "telltale").unwrap();
        assert_eq!(
            plain.options.broker_address(),
            ("127.0.0.1".to_owned(), 1883)
        );
        assert_eq!(plain.options.client_id(), "telltale");
        assert!(plain.options.credentials().is_none());

        for (url, prefix, says) in [
            (
                "http://broker:1883",
                "telltale",
                "expected mqtt://HOST:PORT",
            ),
            ("broker:1883", "telltale", "expected mqtt://HOST:PORT"),
            (
                "mqtt://broker?qos=2",
                "telltale",
                "unknown or empty URL parameter `qos`",
            ),
            ("mqtt://broker", "", "a topic prefix is not empty"),
            ("mqtt://broker", "a/#", "no + or #"),
        ] {
            let e = prepare(url, prefix)
                .err()
                .unwrap_or_else(|| panic!("{url} {prefix}"));
            assert!(e.contains(says), "{url} {prefix}: {e}");
        }
    }
}
