//! The WebSocket protocol of `GET /api/ws`, version [`VERSION`].
//!
//! Every message is a JSON object in a text frame, with a `type`. The first
//! message from the client is always a [`ClientMessage::Hello`]; the server
//! answers [`ServerMessage::Welcome`] or closes with a code from [`close`].
//! README.md has an example session.
//!
//! Compiled for both `ssr` and `hydrate`, so a browser client (later) reads
//! and writes exactly these types.

use crate::model::{DeviceId, EventId, Health, Snapshot, StatusEvent, StatusUpdate};
use serde::{Deserialize, Serialize};

/// The protocol version a `hello` must name.
pub const VERSION: u32 = 1;

/// Largest text frame the server reads; a larger one closes with
/// [`close::TOO_BIG`].
pub const MAX_MESSAGE: usize = 16 * 1024;

/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// Close codes the server uses, each sent with a human-readable reason.
pub mod close {
    /// The server is shutting down, or the peer stopped answering pings.
    pub const GOING_AWAY: u16 = 1001;
    /// Broken protocol: no `hello` in time, wrong version, a second `hello`.
    pub const POLICY: u16 = 1008;
    /// A message over [`super::MAX_MESSAGE`] bytes.
    pub const TOO_BIG: u16 = 1009;
    /// Missing or unknown token.
    pub const UNAUTHORIZED: u16 = 4401;
    /// A valid token, but not for this role, device or message.
    pub const FORBIDDEN: u16 = 4403;
    /// A newer agent connected for the same device.
    pub const REPLACED: u16 = 4409;
    /// Too many wrong tokens from this address: the HTTP API's 429.
    pub const TOO_MANY_GUESSES: u16 = 4429;
}

/// Who a connection speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May subscribe to events.
    Viewer,
    /// May subscribe and send commands.
    Operator,
    /// Pushes the status of one device and answers its commands.
    Device,
}

/// What a command asks a device to change. Only `power_on` for now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_on: Option<bool>,
}

impl CommandSet {
    /// A command that changes nothing is refused.
    pub fn is_empty(&self) -> bool {
        self.power_on.is_none()
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The device applied it (its status event follows or came first).
    Applied,
    /// It was refused or could not be routed; `reason` says why.
    Failed,
    /// No answer from the device within the command timeout.
    TimedOut,
}

/// Messages a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Must come first. The token may instead travel as
    /// `Authorization: Bearer` on the upgrade request.
    Hello {
        v: u32,
        role: Role,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The device this connection speaks for (role `device` only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
    },
    /// Viewer, operator: start (or restart) the event stream, like SSE with
    /// `Last-Event-ID` and `?device=`.
    Subscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_event_id: Option<EventId>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        devices: Vec<DeviceId>,
    },
    /// Operator: ask a device to change something.
    Command {
        device: DeviceId,
        #[serde(deserialize_with = "crate::model::object")]
        set: CommandSet,
        request_id: String,
    },
    /// Device: a partial status update, as `POST /api/devices/{id}/status`
    /// takes it; `device` must be the connection's own. With a
    /// `request_id`, the server answers an [`ServerMessage::Ack`] once the
    /// update is durable, or an [`ServerMessage::Error`] naming it.
    Status {
        device: DeviceId,
        #[serde(deserialize_with = "crate::model::object")]
        update: StatusUpdate,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Device: how a command sent to it ended (`applied` or `failed`).
    Result {
        request_id: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// Messages the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        v: u32,
        role: Role,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
    },
    /// The SSE `snapshot` event: same id, same data.
    Snapshot { id: EventId, data: Snapshot },
    /// The SSE `status` event: same id, same data.
    Status { id: EventId, data: StatusEvent },
    /// The SSE `health` event (cluster mode): same data, no id.
    Health { data: Health },
    /// To an operator: the command was routed to the device's agent. To a
    /// device: its `status` with this `request_id` is durable (applied,
    /// stored, and in cluster mode shared), whether it changed anything
    /// or not.
    Ack { request_id: String },
    /// To an operator: how the command ended. Exactly one per `request_id`.
    Result {
        request_id: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// To a device: a command to apply, answered with a `result` carrying
    /// the same `request_id` (the server's own id, not the operator's).
    Command {
        request_id: String,
        device: DeviceId,
        #[serde(deserialize_with = "crate::model::object")]
        set: CommandSet,
    },
    /// A message was refused; the connection stays open. Same fields as the
    /// HTTP API's errors.
    Error {
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_objects_tagged_by_type() {
        let hello: ClientMessage = serde_json::from_value(json!({
            "type": "hello", "v": 1, "role": "device", "token": "t", "device": "rack-1"
        }))
        .unwrap();
        assert_eq!(
            hello,
            ClientMessage::Hello {
                v: 1,
                role: Role::Device,
                token: Some("t".into()),
                device: Some(DeviceId::parse("rack-1").unwrap()),
            }
        );
        let command: ClientMessage = serde_json::from_value(json!({
            "type": "command", "device": "a", "set": {"power_on": false}, "request_id": "r1"
        }))
        .unwrap();
        assert!(
            matches!(command, ClientMessage::Command { set, .. } if set.power_on == Some(false))
        );
        let result = ServerMessage::Result {
            request_id: "r1".into(),
            outcome: Outcome::TimedOut,
            reason: None,
        };
        assert_eq!(
            serde_json::to_value(result).unwrap(),
            json!({"type": "result", "request_id": "r1", "outcome": "timed_out"})
        );
    }

    #[test]
    fn unknown_types_and_fields_are_refused() {
        assert!(serde_json::from_value::<ClientMessage>(json!({"type": "dance"})).is_err());
        assert!(
            serde_json::from_value::<ClientMessage>(json!({
                "type": "command", "device": "a", "set": {"power": false}, "request_id": "r"
            }))
            .is_err()
        );
        assert!(
            serde_json::from_value::<ClientMessage>(json!({
                "type": "status", "device": "A B", "update": {}
            }))
            .is_err()
        );
    }
}
