//! The API's errors: one enum, turned into a status and
//! `{"error": "...", "field": "..."}` in one place.

use super::commands::Refused;
use super::hub::{ApplyError, RemoveError};
use super::store::StoreError;
use crate::model::FieldError;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Names the token that is wanted (`ingest`, `operator`).
    #[error("missing or wrong token: send `Authorization: Bearer <{0} token>`")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    /// `POST /api/session` with anything but the operator token.
    #[error("wrong operator token")]
    WrongOperatorToken,
    /// `POST /api/session` with neither the operator nor the viewer token.
    #[error("wrong token")]
    WrongToken,
    /// A session cookie that is not (or no longer) a live session.
    #[error(
        "the operator session has ended (signed out, expired, or the operator token changed): sign in again"
    )]
    SessionEnded,
    #[error("the body must be JSON: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{}", .0.message)]
    Invalid(FieldError),
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    /// The change would be undone at once (see [`RemoveError::Connected`]).
    #[error("{0}")]
    Conflict(String),
    #[error("no such API endpoint: {0} (see the API in README.md)")]
    NoEndpoint(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("could not read the request body: {0}")]
    BadBody(String),
    /// `/api/ws` without a WebSocket handshake; `status` is axum's.
    #[error("{reason}: /api/ws speaks WebSocket only (see README.md)")]
    NotWebSocket { status: StatusCode, reason: String },
    /// The command could not be routed (no agent, or its queue is full).
    #[error("{0}")]
    CommandRefused(Refused),
    #[error("the device refused the command: {0}")]
    CommandFailed(String),
    #[error("the device did not answer within {}", humantime::format_duration(*.0))]
    CommandTimedOut(std::time::Duration),
    /// The change could not be made durable (see [`not_stored`]). Retry
    /// later.
    #[error("{0}")]
    Unavailable(String),
    /// The store could not be read. Retry later.
    #[error("the store could not be read: {0}")]
    StoreRead(String),
    /// Too many wrong tokens from this client address (see
    /// [`Guesses`](super::auth::Guesses)).
    #[error(
        "too many wrong tokens from this address: try again in {} s",
        .0.as_secs().max(1)
    )]
    TooManyGuesses(std::time::Duration),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(FieldError::new(field, message))
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_)
            | Self::WrongOperatorToken
            | Self::WrongToken
            | Self::SessionEnded => StatusCode::UNAUTHORIZED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MalformedJson(_) | Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnknownDevice(_) | Self::NoEndpoint(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::CommandRefused(_) | Self::Unavailable(_) | Self::StoreRead(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::CommandFailed(_) | Self::Conflict(_) => StatusCode::CONFLICT,
            Self::CommandTimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::TooManyGuesses(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NotWebSocket { status, .. } => *status,
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(e)
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid(e) => Self::Invalid(e),
            ApplyError::Store(e) => Self::Unavailable(not_stored(&e)),
        }
    }
}

impl From<RemoveError> for ApiError {
    fn from(e: RemoveError) -> Self {
        match e {
            RemoveError::Unknown(id) => Self::UnknownDevice(id.to_string()),
            RemoveError::Connected(_) => Self::Conflict(e.to_string()),
            RemoveError::Store(e) => Self::Unavailable(not_stored(&e)),
        }
    }
}

/// What a change the store failed on tells its sender (logged too): that
/// nothing changed, unless it is known to have been published.
pub fn not_stored(e: &StoreError) -> String {
    tracing::error!("{e}");
    let cause = match e {
        StoreError::Group(e) => &**e,
        e => e,
    };
    match cause {
        StoreError::Unconfirmed(_) => e.to_string(),
        _ => format!("not stored, nothing changed: {e}"),
    }
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        Self::CommandRefused(e)
    }
}

impl ApiError {
    /// `{"error": "...", "field": "..."}`: what an HTTP answer carries, and
    /// what an MQTT device is told.
    pub fn body(&self) -> Value {
        match self {
            Self::Invalid(e) => json!({ "error": self.to_string(), "field": e.field }),
            Self::CommandRefused(_) => json!({ "error": self.to_string(), "field": "id" }),
            _ => json!({ "error": self.to_string() }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Self::TooManyGuesses(wait) = &self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(wait.as_secs().max(1)),
            );
        }
        if let Self::PayloadTooLarge { .. } = &self {
            // The rest of the body is left unread, so this connection cannot
            // carry another request: say so, or a client that reuses it
            // finds it closed under its next request.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
