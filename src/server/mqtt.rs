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
//! Reports of different devices are stored side by side, a device's own in
//! the order they came; acknowledgements go out in that order too.
//! Whoever may publish under `P/` speaks for its devices: the broker's ACL
//! decides who may.
//!
//! In a cluster, the instances given `--mqtt` take turns: the one holding
//! a lease in Redis runs the bridge (see [`take_turns`]).

use super::api::{MAX_BODY, parse_object};
use super::cluster::{Broker, take_turns};
use super::commands::{AgentCommand, AgentLink, Commands, Settled};
use super::error::ApiError;
use super::hub::{ApplyError, Hub};
use crate::model::{DeviceId, StatusUpdate};
use crate::protocol::{CommandSet, Outcome};
use percent_encoding::percent_decode_str;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest wait between two tries to reach the broker.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Requests (publishes, acks) queued for the broker connection.
const QUEUE: usize = 1024;
/// The largest packet MQTT can frame (its "remaining length" tops out at
/// 256 MiB), so that no message is too large to be read and refused.
const MAX_PACKET: usize = 268_435_455 + 5;

/// The bridge's settings, checked at start.
#[derive(Clone)]
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
        // Every message is read, however large, so that one over
        // `MAX_BODY` is answered with an error and acknowledged: a packet
        // over the client's limit drops the connection, and the broker
        // brings it again on the next, for ever (MQTT 3.1.1 cannot tell
        // the broker a limit). The broker's `message_size_limit` bounds it.
        .set_max_packet_size(MAX_PACKET, 64 * 1024);
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

/// Starts the bridge: it connects, and reconnects, until `shutdown`. In a
/// cluster (`lease`), only while this instance holds the MQTT lease. The
/// task ends once its devices are let go of (and the lease given up).
pub fn start(
    bridge: Bridge,
    hub: &Arc<Hub>,
    commands: &Arc<Commands>,
    lease: Option<Broker>,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let (hub, commands, shutdown) = (hub.clone(), commands.clone(), shutdown.clone());
    match lease {
        None => tokio::spawn(bridge.run(hub, commands, shutdown)),
        // The instances share the broker session (same client id): the
        // messages one left unacknowledged come to the next.
        Some(lease) => tokio::spawn(take_turns(lease, "mqtt", shutdown, move |stop| {
            tokio::spawn(bridge.clone().run(hub.clone(), commands.clone(), stop))
        })),
    }
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

/// A message taken, not acknowledged yet.
struct InFlight {
    message: Publish,
    /// Its topic's device level: a device's messages are handled in order.
    device: String,
    handled: JoinHandle<Handled>,
}

/// Messages in flight at most (the broker's window is usually smaller).
const WINDOW: usize = 64;

struct Running {
    out: Outbox,
    /// The broker as logs show it.
    shown: String,
    hub: Arc<Hub>,
    commands: Arc<Commands>,
    links: HashMap<DeviceId, Linked>,
    /// Oldest first: acknowledged in the order they came, as MQTT wants.
    in_flight: VecDeque<InFlight>,
    /// A message could not be stored: the ones after it are left for the
    /// broker to bring again, until the connection is new.
    resetting: bool,
    reset: mpsc::UnboundedSender<String>,
}

/// What the bridge publishes, from wherever it is.
#[derive(Clone)]
struct Outbox {
    client: AsyncClient,
    prefix: String,
}

impl Bridge {
    async fn run(self, hub: Arc<Hub>, commands: Arc<Commands>, shutdown: CancellationToken) {
        let (client, events) = AsyncClient::new(self.options, QUEUE);
        let (heard, mut hearing) = mpsc::channel(WINDOW);
        let (reset, resets) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(
            events,
            self.shown.clone(),
            heard,
            resets,
            shutdown.clone(),
        ));
        let mut running = Running {
            out: Outbox {
                client,
                prefix: self.prefix,
            },
            shown: self.shown,
            hub,
            commands,
            links: HashMap::new(),
            in_flight: VecDeque::new(),
            resetting: false,
            reset,
        };
        loop {
            tokio::select! {
                biased;
                handled = running.oldest(), if !running.in_flight.is_empty() => {
                    running.settle_oldest(handled);
                }
                event = hearing.recv(), if running.in_flight.len() < WINDOW => match event {
                    Some(event) => running.heard(event).await,
                    None => break,
                },
                () = shutdown.cancelled() => break,
            }
        }
        // Its devices go offline with it.
        for linked in running.links.values() {
            linked.gone.cancel();
        }
        let _ = running.out.client.try_disconnect();
        driver.abort();
    }
}

/// Polls the connection to the broker, reconnecting with backoff, and
/// passes what it hears on; a reset drops the connection and reconnects.
async fn drive(
    mut events: EventLoop,
    shown: String,
    heard: mpsc::Sender<Event>,
    mut resets: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    // Since when the connection is up.
    let mut connected: Option<Instant> = None;
    loop {
        let failed = tokio::select! {
            event = events.poll() => match event {
                Ok(event) => {
                    if let Event::Incoming(Packet::ConnAck(_)) = event {
                        connected = Some(Instant::now());
                    }
                    if heard.send(event).await.is_err() {
                        return;
                    }
                    None
                }
                Err(e) => Some(match crate::tls::cause(&e) {
                    Some(tls) => crate::tls::explain(tls),
                    None => e.to_string(),
                }),
            },
            // Dropping a half-read packet is fine here: the connection goes.
            Some(why) = resets.recv() => {
                events.clean();
                Some(why)
            }
            () = shutdown.cancelled() => return,
        };
        let Some(why) = failed else { continue };
        backoff = after(backoff, connected.take().map(|since| since.elapsed()));
        tracing::warn!(
            "MQTT: {shown}: {why}; connecting again in {}",
            humantime::format_duration(backoff)
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The wait before connecting again, after waiting `backoff` last time,
/// when the connection was up for `lasted` (`None`: it never came up). It
/// starts over only after a connection that held: one dropped at once,
/// however it came up (the store refusing what the broker brings again),
/// waits ever longer, so it is neither retried nor logged every second.
fn after(backoff: Duration, lasted: Option<Duration>) -> Duration {
    const HELD: Duration = Duration::from_secs(30);
    match lasted {
        Some(lasted) if lasted >= HELD => FIRST_BACKOFF,
        _ => (backoff * 2).min(MAX_BACKOFF),
    }
}

impl Running {
    async fn heard(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.resetting = false;
                if let Err(e) = self.subscribe() {
                    let _ = self.reset.send(e);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let topics = format!("{}/+/status, online and result", self.out.prefix);
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    tracing::error!(
                        "MQTT: {} refused some of {topics} (see its ACL): \
                         their messages are not taken",
                        self.shown
                    );
                } else {
                    tracing::info!("MQTT: connected to {}, following {topics}", self.shown);
                }
            }
            Event::Incoming(Packet::Publish(message)) if !self.resetting => {
                self.take(message).await;
            }
            _ => {}
        }
    }

    /// One SUBSCRIBE for the three topics devices publish on.
    fn subscribe(&self) -> Result<(), String> {
        let filters = ["status", "online", "result"].map(|level| {
            SubscribeFilter::new(format!("{}/+/{level}", self.out.prefix), QoS::AtLeastOnce)
        });
        self.out
            .client
            .try_subscribe_many(filters)
            .map_err(|e| e.to_string())
    }

    /// How the oldest message in flight ended.
    async fn oldest(&mut self) -> Handled {
        let oldest = self.in_flight.front_mut().expect("a message in flight");
        (&mut oldest.handled).await.unwrap_or_else(|e| {
            tracing::error!("MQTT: {} was dropped: {e}", oldest.message.topic);
            Handled::Done
        })
    }

    /// Acknowledges the oldest message, or, if it could not be stored,
    /// leaves it and every later one for the broker to bring again.
    fn settle_oldest(&mut self, handled: Handled) {
        let Some(oldest) = self.in_flight.pop_front() else {
            return;
        };
        match handled {
            Handled::Done => {
                if let Err(e) = self.out.client.try_ack(&oldest.message) {
                    let _ = self.reset.send(format!("could not acknowledge: {e}"));
                }
            }
            Handled::Again(why) => {
                self.in_flight.clear();
                self.resetting = true;
                let _ = self.reset.send(why);
            }
        }
    }

    /// Starts on a message once its device's earlier ones are done.
    async fn take(&mut self, message: Publish) {
        let device = self
            .out
            .device_of(&message.topic)
            .unwrap_or_default()
            .to_owned();
        while self.in_flight.iter().any(|f| f.device == device) {
            let handled = self.oldest().await;
            self.settle_oldest(handled);
            if self.resetting {
                return;
            }
        }
        let handled = match self.handle(&message) {
            Work::Now(handled) => tokio::spawn(std::future::ready(handled)),
            // Stored on a worker, as an HTTP post is: reports of several
            // devices share their fsyncs (the store's group commit).
            Work::Store(id, update) => {
                let (hub, out, topic) = (self.hub.clone(), self.out.clone(), message.topic.clone());
                tokio::spawn(async move {
                    match hub.apply(&id, &update) {
                        Ok(_) => Handled::Done,
                        Err(ApplyError::Invalid(e)) => out.refuse(id.as_str(), &topic, e.into()),
                        Err(ApplyError::Store(e)) => Handled::Again(e.to_string()),
                    }
                })
            }
        };
        self.in_flight.push_back(InFlight {
            message,
            device,
            handled,
        });
    }

    fn handle(&mut self, message: &Publish) -> Work {
        let topic = &message.topic;
        let Some((device, kind)) = self.out.split(topic) else {
            return Work::Now(Handled::Done);
        };
        let kind = match kind {
            "status" => Topic::Status,
            "online" => Topic::Online,
            "result" => Topic::Result,
            _ => return Work::Now(Handled::Done),
        };
        let refuse = |e| Work::Now(self.out.refuse(device, topic, e));
        let id = match DeviceId::parse(device) {
            Ok(id) => id,
            Err(e) => return refuse(ApiError::invalid("id", e)),
        };
        if message.payload.len() > MAX_BODY {
            return refuse(ApiError::PayloadTooLarge { limit: MAX_BODY });
        }
        let done = match kind {
            Topic::Status => match status(&message.payload) {
                Ok(update) => return Work::Store(id, update),
                Err(e) => Err(e),
            },
            Topic::Online => self.online(&id, &message.payload),
            Topic::Result => self.result(&id, &message.payload),
        };
        match done {
            Ok(()) => Work::Now(Handled::Done),
            Err(ApiError::Unavailable(why)) => Work::Now(Handled::Again(why)),
            Err(e) => Work::Now(self.out.refuse(device, topic, e)),
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
                let topic = format!("{}/{id}/set", self.out.prefix);
                tokio::spawn(forward(
                    link,
                    topic,
                    self.out.client.clone(),
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

/// What a message asks for.
enum Work {
    /// Nothing more: it was handled at once.
    Now(Handled),
    /// A report to store.
    Store(DeviceId, StatusUpdate),
}

/// A report, checked as `POST /api/devices/{id}/status` checks its body.
fn status(payload: &[u8]) -> Result<StatusUpdate, ApiError> {
    let update: StatusUpdate = parse_object(payload)?;
    update.validate()?;
    Ok(update)
}

impl Outbox {
    /// `P/ID/LEVEL` as (`ID`, `LEVEL`).
    fn split<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix('/')?
            .split_once('/')
    }

    fn device_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.split(topic).map(|(device, _)| device)
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
    fn reconnecting_waits_longer_until_a_connection_holds() {
        let s = Duration::from_secs;
        // Refused, or dropped at once: twice as long each time, to a cap.
        assert_eq!(after(FIRST_BACKOFF, None), s(1));
        assert_eq!(after(s(1), Some(Duration::from_millis(20))), s(2));
        assert_eq!(after(s(40), None), MAX_BACKOFF);
        // A connection that held starts over.
        assert_eq!(after(MAX_BACKOFF, Some(s(45))), FIRST_BACKOFF);
    }

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
