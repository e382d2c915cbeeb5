//! The JSON API: device reads, the ingest endpoint, commands, operator
//! sessions and `/healthz`.

use super::AppState;
use super::error::ApiError;
use super::hub::{Applied, ApplyError, Filter};
use super::thresholds::{self, MetricLimits, ThresholdsView};
use crate::model::{Device, DeviceId, Limits, Snapshot, StatusUpdate};
use crate::protocol::{CommandSet, Outcome};
use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Largest accepted ingest body.
pub const MAX_BODY: usize = 16 * 1024;

pub async fn list_devices(State(state): State<AppState>) -> Json<Snapshot> {
    Json(state.hub.snapshot(&Filter::default()))
}

pub async fn get_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    DeviceId::parse(&id)
        .ok()
        .and_then(|id| state.hub.device(&id))
        .map(Json)
        .ok_or(ApiError::UnknownDevice(id))
}

/// `POST /api/devices/{id}/status`: checks run cheapest first (token, id,
/// content type, size, JSON, values), and nothing changes unless all pass.
pub async fn post_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Applied>, ApiError> {
    state.auth.check_ingest(&headers)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let update: StatusUpdate = read_json(&headers, body).await?;
    update.validate()?;
    Ok(Json(state.hub.apply(&id, &update)?))
}

/// The body of `POST /api/devices/{id}/commands`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub set: CommandSet,
}

/// `POST /api/devices/{id}/commands`: the same path as a WebSocket command
/// (route to the device's agent, wait for its answer or the deadline), for
/// the page and for curl. Answers once the command has ended.
pub async fn post_command(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    state.auth.check_operator(&headers)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let request: CommandRequest = read_json(&headers, body).await?;
    if request.set.is_empty() {
        return Err(ApiError::invalid("set", super::commands::EMPTY_SET));
    }
    let ticket = state.commands.dispatch(&id, request.set)?;
    let settled = ticket.outcome().await;
    match settled.outcome {
        Outcome::Applied => Ok(Json(json!({ "outcome": "applied" }))),
        Outcome::Failed => Err(ApiError::CommandFailed(settled.reason.unwrap_or_default())),
        Outcome::TimedOut => Err(ApiError::CommandTimedOut(state.commands.timeout())),
    }
}

/// `GET /api/thresholds`: the file's `[defaults]`, and each device's own
/// limits (set over the API, else the file's), as
/// `{"defaults": {metric: {min, max}}, "devices": {id: {metric: {min, max}}}}`.
/// Open to anyone, as the device reads are.
pub async fn get_thresholds(State(state): State<AppState>) -> Json<ThresholdsView> {
    Json(state.hub.thresholds())
}

/// `PUT /api/devices/{id}/thresholds` with `{metric: {"min"?, "max"?}, …}`:
/// replaces the device's own limits (`{}` clears them, leaving the
/// defaults); they are kept in the store and win over the thresholds file's
/// for this device. Operator rights. Answers `{"device": id, "limits": …}`
/// with the limits now in force (empty ones dropped). The device is
/// evaluated at once: a change of its alerts is published.
///
/// An id that has not reported yet is accepted (200, not 404): a device may
/// be configured before its first report, as in the thresholds file.
pub async fn put_thresholds(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LimitsSet>, ApiError> {
    state.auth.check_operator(&headers)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let raw: BTreeMap<String, Value> = read_json(&headers, body).await?;
    let mut limits = MetricLimits::new();
    for (metric, value) in raw {
        let l: Limits = serde_path_to_error::deserialize(value).map_err(|e| {
            let message = e.inner().to_string();
            let field = match message.strip_prefix("unknown field `") {
                Some(rest) => format!("{metric}.{}", rest.split('`').next().unwrap_or_default()),
                None if e.path().to_string() == "." => metric.clone(),
                None => format!("{metric}.{}", e.path()),
            };
            ApiError::invalid(field, message)
        })?;
        limits.insert(metric, l);
    }
    let limits = thresholds::check_all(limits)?;
    state
        .hub
        .set_limits(&id, limits.clone())
        .map_err(ApplyError::from)?;
    Ok(Json(LimitsSet { device: id, limits }))
}

/// The answer of `PUT /api/devices/{id}/thresholds`.
#[derive(serde::Serialize)]
pub struct LimitsSet {
    pub device: DeviceId,
    pub limits: MetricLimits,
}

/// The body of `POST /api/session`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub token: String,
}

/// `POST /api/session`: trades the operator token, sent once, for an
/// `HttpOnly` session cookie; the page never keeps the token. Any other
/// token, or none, is a 401.
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: SignIn = read_json(&headers, body).await?;
    if !state.auth.operator.matches(&request.token) {
        return Err(ApiError::WrongOperatorToken);
    }
    // Signing in again replaces the session this browser had.
    if let Some(old) = super::auth::session_cookie(&headers) {
        state.auth.sessions.end(old);
    }
    let id = state.auth.sessions.create();
    Ok(with_cookie(
        Json(json!({ "role": "operator" })).into_response(),
        &state.auth.session_set_cookie(&id),
    ))
}

/// `DELETE /api/session`: ends this browser's session (if any) and clears
/// the cookie. Always a 204, so signing out twice is harmless.
pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = super::auth::session_cookie(&headers) {
        state.auth.sessions.end(id);
    }
    with_cookie(
        StatusCode::NO_CONTENT.into_response(),
        &state.auth.session_clear_cookie(),
    )
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        headers.insert(header::SET_COOKIE, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let (event_id, devices) = state.hub.stats();
    Json(json!({
        "status": "ok",
        "event_id": event_id,
        "devices": devices,
        "subscribers": state.hub.subscribers(),
    }))
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes, naming the faulty field
/// when the JSON is well formed but does not fit `T`.
async fn read_json<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let too_large = ApiError::PayloadTooLarge { limit: MAX_BODY };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_large);
    }
    let bytes = to_bytes(body, MAX_BODY).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            ApiError::PayloadTooLarge { limit: MAX_BODY }
        } else {
            ApiError::BadBody(e.to_string())
        }
    })?;
    parse_object(&bytes)
}

/// Reads one JSON object into `T`, naming the faulty field when the JSON is
/// well formed but does not fit. HTTP bodies and WebSocket messages alike.
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would also read a struct from an array: only an object is a status.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::invalid("", "the body must be a JSON object"),
                Err(e) => ApiError::MalformedJson(e.to_string()),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = e.inner().to_string();
        if !e.inner().is_data() {
            return ApiError::MalformedJson(message);
        }
        let field = match message.strip_prefix("unknown field `") {
            Some(rest) => rest.split('`').next().unwrap_or_default().to_owned(),
            None => e.path().to_string(),
        };
        ApiError::invalid(field, message)
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// `application/json` or `application/*+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}
