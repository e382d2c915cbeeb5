//! `GET /api/ws`: one WebSocket for viewers, operators and device agents.
//! The messages are in [`crate::protocol`]; README.md has an example session.
//!
//! Each connection is one task that owns its socket:
//! 1. The first message must be a `hello` within [`HELLO_TIMEOUT`] of the
//!    upgrade (pings do not put it off); the token comes from it or from
//!    `Authorization: Bearer` on the upgrade request. A refusal closes with
//!    4401 / 4403 / 4429 / 1008 and a reason, having changed nothing.
//! 2. Then it waits on the socket, its event subscription, its agent link,
//!    its commands in flight and its ping timer at once.
//!
//! Bounded everywhere: events come from the hub's broadcast channel, exactly
//! as for SSE, so a client that reads too slowly lags and is resynchronised
//! with a snapshot; an operator has at most [`MAX_IN_FLIGHT`] commands
//! waiting; an agent's commands queue is bounded in `commands`. A send that
//! cannot complete within the silence deadline means the peer is gone.
//!
//! Events are sent as the text frame the hub built once per event.

use super::AppState;
use super::api::parse_object;
use super::auth::{self, Refusal, Session};
use super::commands::{AgentCommand, AgentLink, EMPTY_SET, Settled};
use super::error::{ApiError, not_stored};
use super::hub::{ApplyError, Filter, Published, Start, Subscription, ws_frame};
use crate::model::{DeviceId, Health};
use crate::protocol::{
    ClientMessage, MAX_MESSAGE, MAX_REQUEST_ID, Outcome, Role, ServerMessage, VERSION, close,
};
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// How long a new connection may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Commands one operator connection may have waiting for their outcome.
pub const MAX_IN_FLIGHT: usize = 64;

/// Frames past [`MAX_MESSAGE`] up to this size are read and refused with
/// 1009; larger ones are cut off by the WebSocket layer itself.
const HARD_LIMIT: usize = 4 * MAX_MESSAGE;

/// The WebSocket options of [`AppState`].
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    pub ping: Duration,
    /// Silence after which a peer is gone.
    pub silence: Duration,
}

/// Why a connection ends: a close frame to send, or nothing (the socket broke).
type End = Option<CloseFrame>;

fn end(code: u16, reason: impl Into<Cow<'static, str>>) -> End {
    let reason: Cow<'static, str> = reason.into();
    Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.into_owned()),
    })
}

pub async fn upgrade(
    State(state): State<AppState>,
    client: Option<axum::Extension<super::api::ClientIp>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let (status, reason) = (e.status(), e.body_text());
            return ApiError::NotWebSocket { status, reason }.into_response();
        }
    };
    let bearer = auth::bearer(&headers).map(str::to_owned);
    // A header token that matches nothing is refused before the upgrade.
    if bearer.as_deref().is_some_and(|t| !state.auth.knows(t)) {
        return ApiError::Unauthorized("viewer, operator or device").into_response();
    }
    // The page's sessions, from a page of this site only: a browser sends
    // the cookies on the handshake, so another site's page must not borrow
    // them (its `Origin` names another host).
    let sessions = if same_site(&headers) {
        Sessions {
            operator: state.auth.session(&headers, &state.hub),
            viewer: state.auth.viewer_session(&headers, &state.hub),
        }
    } else {
        Sessions::default()
    };
    ws.max_message_size(HARD_LIMIT)
        .max_frame_size(HARD_LIMIT)
        .on_upgrade(move |socket| {
            let client = client.map(|c| c.0.0);
            connection(socket, state, bearer, sessions, client)
        })
}

/// The live session cookies a handshake carried.
#[derive(Default)]
struct Sessions {
    operator: Option<Session>,
    /// Only where `--viewer-token` closes reading.
    viewer: Option<Session>,
}

/// Whether the handshake's `Origin`, if any, names the host it was sent to
/// (ports aside, as for `SameSite`: a proxy may pass `Host` without one).
fn same_site(headers: &HeaderMap) -> bool {
    use axum::http::{Uri, uri::Authority};
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(origin) = header(header::ORIGIN) else {
        return true;
    };
    let origin = origin.parse::<Uri>().ok();
    let host = header(header::HOST).and_then(|h| h.parse::<Authority>().ok());
    match (origin.as_ref().and_then(Uri::host), host) {
        (Some(origin), Some(host)) => origin.eq_ignore_ascii_case(host.host()),
        _ => false,
    }
}

async fn connection(
    mut socket: WebSocket,
    state: AppState,
    bearer: Option<String>,
    sessions: Sessions,
    client: Option<std::net::IpAddr>,
) {
    let (role, device, session) = match hello(&mut socket, &state, bearer, sessions, client).await {
        Ok(who) => who,
        Err(frame) => {
            // A wrong token counts as over HTTP (see `api::count_guesses`).
            if let Some(ip) = client
                && frame
                    .as_ref()
                    .is_some_and(|f| f.code == close::UNAUTHORIZED)
            {
                state.wrong_token(ip);
            }
            return close(socket, frame).await;
        }
    };
    let link = device.as_ref().map(|d| state.commands.register(d));
    let welcome = ServerMessage::Welcome {
        v: VERSION,
        role,
        device: device.clone(),
    };
    let mut conn = Connection {
        state: state.clone(),
        role,
        session,
        link,
        subscription: None,
        health: None,
        filter: Filter::default(),
        in_flight: JoinSet::new(),
        heard: Instant::now(),
    };
    let frame = match send_msg(&mut socket, &welcome, state.ws.silence).await {
        Ok(()) => conn.serve(&mut socket).await,
        Err(frame) => frame,
    };
    if let Some(link) = &conn.link {
        state.commands.unregister(link);
    }
    // Aborts the commands still in flight; their tickets forget them.
    drop(conn);
    close(socket, frame).await;
}

/// Reads and checks the `hello`; answers nothing yet. With no token, a
/// live operator session cookie on the handshake grants the operator (and
/// viewer) role, a viewer session the viewer role, for as long as the
/// session lasts. An address past its wrong tokens (`client`, see
/// [`Guesses`](super::auth::Guesses)) has none checked: it may have opened
/// this socket before it went past.
async fn hello(
    socket: &mut WebSocket,
    state: &AppState,
    bearer: Option<String>,
    sessions: Sessions,
    client: Option<std::net::IpAddr>,
) -> Result<(Role, Option<DeviceId>, Option<Session>), End> {
    // One deadline for the hello, whatever pings come before it.
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let text = loop {
        let message = tokio::time::timeout_at(deadline, socket.recv())
            .await
            .map_err(|_| end(close::POLICY, "expected a hello within 5 s"))?;
        match message {
            Some(Ok(Message::Text(text))) => break text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Binary(_))) => {
                return Err(end(close::POLICY, "messages are JSON text frames"));
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Err(None),
        }
    };
    if text.len() > MAX_MESSAGE {
        return Err(too_big());
    }
    let Ok(ClientMessage::Hello {
        v,
        role,
        token,
        device,
    }) = parse_object::<ClientMessage>(text.as_bytes())
    else {
        return Err(end(
            close::POLICY,
            r#"the first message must be {"type":"hello","v":1,"role":…}"#,
        ));
    };
    if v != VERSION {
        return Err(end(
            close::POLICY,
            format!("unsupported protocol version {v}; this server speaks {VERSION}"),
        ));
    }
    if role != Role::Device && device.is_some() {
        return Err(end(close::POLICY, "only a device hello names a device"));
    }
    if let Some(wait) = client.and_then(|ip| state.auth.guesses.wait(ip)) {
        let refusal = ApiError::TooManyGuesses(wait);
        return Err(end(close::TOO_MANY_GUESSES, refusal.to_string()));
    }
    let token = token.or(bearer);
    let session = match role {
        Role::Viewer => sessions.operator.or(sessions.viewer),
        Role::Operator => sessions.operator,
        Role::Device => None,
    };
    if token.is_none() && session.is_some() {
        return Ok((role, None, session));
    }
    match state
        .auth
        .authorize(role, device.as_ref(), token.as_deref())
    {
        Ok(()) => Ok((role, device, None)),
        Err(Refusal::Unauthorized(why)) => Err(end(close::UNAUTHORIZED, why)),
        Err(Refusal::Forbidden(why)) => Err(end(close::FORBIDDEN, why)),
    }
}

/// What woke a connection up.
enum Wake {
    Shutdown,
    Replaced,
    Socket(Option<Result<Message, axum::Error>>),
    Ping,
    Settled((String, Settled)),
    Command(AgentCommand),
    Event(Result<Arc<Published>, RecvError>),
    Health,
}

/// Awaits `fut`, or forever when there is none (a disabled `select!` branch).
async fn maybe<F: Future>(fut: Option<F>) -> F::Output {
    match fut {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

struct Connection {
    state: AppState,
    role: Role,
    /// The session (operator or viewer) the role came from, if it did.
    session: Option<Session>,
    link: Option<AgentLink>,
    subscription: Option<Subscription>,
    /// Whether the server takes changes, followed once subscribed.
    health: Option<watch::Receiver<Option<String>>>,
    filter: Filter,
    in_flight: JoinSet<(String, Settled)>,
    /// When the peer last sent anything, pongs included.
    heard: Instant,
}

impl Connection {
    async fn serve(&mut self, socket: &mut WebSocket) -> End {
        match self.run(socket).await {
            Err(end) => end,
            Ok(never) => match never {},
        }
    }

    /// Serves until something ends the connection.
    async fn run(&mut self, socket: &mut WebSocket) -> Result<Infallible, End> {
        let silence = self.state.ws.silence;
        let mut ping = tokio::time::interval(self.state.ws.ping);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.state.shutdown.clone();
        let replaced = self.link.as_ref().map(|l| l.replaced.clone());
        loop {
            let wake = {
                let Self {
                    link,
                    subscription,
                    health,
                    in_flight,
                    ..
                } = &mut *self;
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => Wake::Shutdown,
                    () = maybe(replaced.as_ref().map(|r| r.cancelled())) => Wake::Replaced,
                    message = socket.recv() => Wake::Socket(message),
                    _ = ping.tick() => Wake::Ping,
                    Some(Ok(done)) = in_flight.join_next(), if !in_flight.is_empty() => Wake::Settled(done),
                    Some(command) = maybe(link.as_mut().map(|l| l.commands.recv())) => Wake::Command(command),
                    event = maybe(subscription.as_mut().map(|s| s.events.recv())) => Wake::Event(event),
                    Ok(()) = maybe(health.as_mut().map(|h| h.changed())) => Wake::Health,
                }
            };
            match wake {
                Wake::Shutdown => {
                    return Err(end(close::GOING_AWAY, "the server is shutting down"));
                }
                Wake::Replaced => {
                    return Err(end(
                        close::REPLACED,
                        "replaced by a newer agent for this device",
                    ));
                }
                Wake::Socket(message) => {
                    self.heard = Instant::now();
                    match message {
                        Some(Ok(Message::Text(text))) => self.receive(socket, &text).await?,
                        Some(Ok(Message::Binary(_))) => {
                            let error = error_msg("messages are JSON text frames", None, None);
                            send_msg(socket, &error, silence).await?;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => return Err(None),
                        Some(Err(e)) => {
                            tracing::debug!("WebSocket read failed: {e}");
                            return Err(None);
                        }
                    }
                }
                Wake::Ping => {
                    self.session_lasts()?;
                    if self.heard.elapsed() > silence {
                        return Err(end(
                            close::GOING_AWAY,
                            "no pong within the silence deadline",
                        ));
                    }
                    send(socket, Message::Ping(Default::default()), silence).await?;
                }
                Wake::Settled((request_id, settled)) => {
                    let result = ServerMessage::Result {
                        request_id,
                        outcome: settled.outcome,
                        reason: settled.reason,
                    };
                    send_msg(socket, &result, silence).await?;
                }
                Wake::Command(command) => {
                    let Some(link) = &self.link else { continue };
                    let message = ServerMessage::Command {
                        request_id: command.request_id,
                        device: link.device.clone(),
                        set: command.set,
                    };
                    send_msg(socket, &message, silence).await?;
                }
                Wake::Event(Ok(event)) => {
                    if self.filter.matches(&event.device) {
                        send(socket, Message::Text(event.ws.clone()), silence).await?;
                    }
                }
                Wake::Event(Err(RecvError::Lagged(missed))) => {
                    tracing::debug!(
                        missed,
                        "slow WebSocket client resynchronised with a snapshot"
                    );
                    self.subscribe(socket, None).await?;
                }
                // The hub replaced its channel (cluster mode: it took over
                // the cluster's state): start again from that.
                Wake::Event(Err(RecvError::Closed)) => self.subscribe(socket, None).await?,
                Wake::Health => {
                    let degraded = self.health.as_mut().map(|h| h.borrow_and_update().clone());
                    send_msg(socket, &health_msg(degraded.flatten()), silence).await?;
                }
            }
        }
    }

    /// Ends a connection whose role came from a session that was signed out
    /// or ran out since: at its next command, or ping.
    fn session_lasts(&self) -> Result<(), End> {
        match &self.session {
            Some(s) if s.expires <= auth::now() || self.state.hub.signed_out(&s.id) => Err(end(
                close::UNAUTHORIZED,
                "the session ended (signed out or expired)",
            )),
            _ => Ok(()),
        }
    }

    /// One text message from the peer. `Err` ends the connection.
    async fn receive(&mut self, socket: &mut WebSocket, text: &str) -> Result<(), End> {
        let silence = self.state.ws.silence;
        if text.len() > MAX_MESSAGE {
            return Err(too_big());
        }
        let message = match parse_object::<ClientMessage>(text.as_bytes()) {
            Ok(m) => m,
            Err(e) => {
                let field = match &e {
                    ApiError::Invalid(f) => Some(f.field.clone()),
                    _ => None,
                };
                return send_msg(socket, &error_msg(e.to_string(), field, None), silence).await;
            }
        };
        match message {
            ClientMessage::Hello { .. } => Err(end(close::POLICY, "hello was already said")),
            ClientMessage::Subscribe {
                last_event_id,
                devices,
            } => {
                if self.role == Role::Device {
                    return Err(end(
                        close::FORBIDDEN,
                        "a device connection cannot subscribe",
                    ));
                }
                self.filter = Filter::new(devices);
                self.subscribe(socket, last_event_id).await
            }
            ClientMessage::Command {
                device,
                set,
                request_id,
            } => {
                if self.role != Role::Operator {
                    return Err(end(close::FORBIDDEN, "only an operator may send commands"));
                }
                self.session_lasts()?;
                self.command(socket, device, set, request_id).await
            }
            ClientMessage::Status {
                device,
                update,
                request_id,
            } => {
                let Some(link) = &self.link else {
                    return Err(end(close::FORBIDDEN, "only a device may push its status"));
                };
                if device != link.device {
                    return Err(end(
                        close::FORBIDDEN,
                        format!(
                            "this connection speaks for `{}`, not `{device}`",
                            link.device
                        ),
                    ));
                }
                if let Some(error) = request_id.as_deref().and_then(wrong_request_id) {
                    return send_msg(socket, &error, silence).await;
                }
                let applied = match update.validate() {
                    Ok(()) => self.state.hub.apply(&device, &update),
                    Err(e) => Err(e.into()),
                };
                let answer = match (applied, request_id) {
                    (Ok(_), None) => return Ok(()),
                    (Ok(_), Some(request_id)) => ServerMessage::Ack { request_id },
                    (Err(ApplyError::Invalid(e)), id) => error_msg(e.message, Some(e.field), id),
                    (Err(ApplyError::Store(e)), id) => error_msg(not_stored(&e), None, id),
                };
                send_msg(socket, &answer, silence).await
            }
            ClientMessage::Result {
                request_id,
                outcome,
                reason,
            } => {
                let Some(link) = &self.link else {
                    return Err(end(close::FORBIDDEN, "only a device may answer commands"));
                };
                if outcome == Outcome::TimedOut {
                    let error = error_msg(
                        "a device answers `applied` or `failed`",
                        Some("outcome".into()),
                        Some(request_id),
                    );
                    return send_msg(socket, &error, silence).await;
                }
                let settled = Settled { outcome, reason };
                match self.state.commands.settle(
                    &link.device,
                    link.generation,
                    &request_id,
                    settled,
                ) {
                    Ok(()) => Ok(()),
                    Err(why) => {
                        let error = error_msg(why, Some("request_id".into()), Some(request_id));
                        send_msg(socket, &error, silence).await
                    }
                }
            }
        }
    }

    /// (Re)starts the event stream: a snapshot or the missed events, then live.
    async fn subscribe(
        &mut self,
        socket: &mut WebSocket,
        last_seen: Option<crate::model::EventId>,
    ) -> Result<(), End> {
        let silence = self.state.ws.silence;
        // As on SSE: a stream from a degraded server starts by saying so.
        // A stream restarted (subscribed again, or resynchronised after
        // lagging) keeps its receiver, so a change not yet told still is.
        let health = self.health.get_or_insert_with(|| self.state.hub.health());
        let degraded = health.borrow().clone();
        if degraded.is_some() {
            send_msg(socket, &health_msg(degraded), silence).await?;
        }
        let mut last_seen = last_seen;
        loop {
            // May read the store (a long absence): off the async workers' backs.
            let Subscription { start, events } =
                tokio::task::block_in_place(|| self.state.hub.subscribe(last_seen, &self.filter));
            self.subscription = Some(Subscription {
                start: Start::Replay(Vec::new()),
                events,
            });
            match start {
                Start::Snapshot(snapshot) => {
                    let data =
                        serde_json::to_string(&snapshot).expect("a snapshot always serializes");
                    let frame = ws_frame("snapshot", snapshot.event_id, &data);
                    return send(socket, Message::Text(frame), silence).await;
                }
                Start::Replay(missed) => {
                    for event in missed {
                        send(socket, Message::Text(event.ws.clone()), silence).await?;
                    }
                }
                Start::Stored { mut after, upto } => {
                    let hub = &self.state.hub;
                    while after < upto {
                        let page = tokio::task::block_in_place(|| hub.replay_page(after, upto));
                        let Some(page) = page else { break };
                        for event in page {
                            after = event.id;
                            if self.filter.matches(&event.device) {
                                let frame = ws_frame("status", event.id, &event.json);
                                send(socket, Message::Text(frame), silence).await?;
                            }
                        }
                    }
                    if after < upto {
                        // The store no longer holds them all: a snapshot.
                        last_seen = None;
                        continue;
                    }
                }
            }
            // A long replay, read all along, is a sign of life: no ping
            // went out meanwhile to be answered.
            self.heard = Instant::now();
            return Ok(());
        }
    }

    async fn command(
        &mut self,
        socket: &mut WebSocket,
        device: DeviceId,
        set: crate::protocol::CommandSet,
        request_id: String,
    ) -> Result<(), End> {
        let silence = self.state.ws.silence;
        if let Some(error) = wrong_request_id(&request_id) {
            return send_msg(socket, &error, silence).await;
        }
        let refused = |reason: String| ServerMessage::Result {
            request_id: request_id.clone(),
            outcome: Outcome::Failed,
            reason: Some(reason),
        };
        if set.is_empty() {
            let error = error_msg(EMPTY_SET, Some("set".into()), Some(request_id.clone()));
            return send_msg(socket, &error, silence).await;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            let reason = format!("at most {MAX_IN_FLIGHT} commands may wait at once");
            return send_msg(socket, &refused(reason), silence).await;
        }
        match self.state.commands.dispatch(&device, set) {
            Err(e) => send_msg(socket, &refused(e.to_string()), silence).await,
            Ok(ticket) => {
                let ack = ServerMessage::Ack {
                    request_id: request_id.clone(),
                };
                self.in_flight
                    .spawn(async move { (request_id, ticket.outcome().await) });
                send_msg(socket, &ack, silence).await
            }
        }
    }
}

fn health_msg(degraded: Option<String>) -> ServerMessage {
    ServerMessage::Health {
        data: Health { degraded },
    }
}

fn too_big() -> End {
    end(
        close::TOO_BIG,
        format!("a message is at most {MAX_MESSAGE} bytes"),
    )
}

/// The error for a `request_id` of the wrong length, if it is.
fn wrong_request_id(request_id: &str) -> Option<ServerMessage> {
    (request_id.is_empty() || request_id.len() > MAX_REQUEST_ID).then(|| {
        error_msg(
            format!("a request_id is 1 to {MAX_REQUEST_ID} bytes"),
            Some("request_id".into()),
            None,
        )
    })
}

fn error_msg(
    error: impl Into<String>,
    field: Option<String>,
    request_id: Option<String>,
) -> ServerMessage {
    ServerMessage::Error {
        error: error.into(),
        field,
        request_id,
    }
}

async fn send_msg(
    socket: &mut WebSocket,
    message: &ServerMessage,
    silence: Duration,
) -> Result<(), End> {
    let text = serde_json::to_string(message).expect("a server message always serializes");
    send(socket, Message::Text(text.into()), silence).await
}

/// Sends one frame; a peer that takes longer than `silence` to take it is gone.
async fn send(socket: &mut WebSocket, message: Message, silence: Duration) -> Result<(), End> {
    match tokio::time::timeout(silence, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(None),
        Err(_) => Err(end(close::GOING_AWAY, "too slow to read")),
    }
}

/// Sends the close frame (when there is one) and lets the socket go.
async fn close(mut socket: WebSocket, frame: End) {
    if let Some(frame) = frame {
        tracing::debug!(code = frame.code, reason = %frame.reason, "closing a WebSocket");
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(origin: Option<&str>, host: Option<&str>) -> bool {
        let mut headers = HeaderMap::new();
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, origin.parse().unwrap());
        }
        if let Some(host) = host {
            headers.insert(header::HOST, host.parse().unwrap());
        }
        same_site(&headers)
    }

    #[test]
    fn same_site_compares_the_hosts_of_origin_and_host() {
        assert!(
            site(None, Some("127.0.0.1:3000")),
            "no Origin: not a browser page"
        );
        assert!(site(Some("http://127.0.0.1:3000"), Some("127.0.0.1:3000")));
        // A proxy may pass Host without the port the page was served on.
        assert!(site(
            Some("https://Dash.Example"),
            Some("dash.example:8080")
        ));
        assert!(site(Some("http://[::1]:3000"), Some("[::1]:3000")));
        assert!(!site(Some("https://evil.example"), Some("127.0.0.1:3000")));
        assert!(!site(
            Some("http://127.0.0.1.evil.example"),
            Some("127.0.0.1")
        ));
        assert!(!site(Some("null"), Some("127.0.0.1:3000")));
        assert!(!site(Some("http://127.0.0.1:3000"), None));
    }
}
