//! The JSON API: device reads, the ingest endpoint and `/healthz`.

use super::AppState;
use super::error::ApiError;
use super::hub::{Applied, Filter};
use crate::model::{Device, DeviceId, Snapshot, StatusUpdate};
use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// Largest accepted ingest body.
pub const MAX_BODY: usize = 16 * 1024;

/// The bearer token that ingest requests must carry.
#[derive(Clone)]
pub struct IngestToken(std::sync::Arc<str>);

impl IngestToken {
    pub fn new(token: impl Into<std::sync::Arc<str>>) -> Self {
        Self(token.into())
    }

    /// A random 32-character token, for when none is configured.
    pub fn random() -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        Self::new(Alphanumeric.sample_string(&mut rand::rng(), 32))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in constant time (for tokens of the same length).
    fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(ApiError::Unauthorized)?;
        if bool::from(given.as_bytes().ct_eq(self.0.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

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
    state.token.check(&headers)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let update: StatusUpdate = read_json(&headers, body).await?;
    update.validate()?;
    Ok(Json(state.hub.apply(&id, &update)?))
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
    // serde would also read a struct from an array: only an object is a status.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                Ok(_) => ApiError::invalid("", "the body must be a JSON object"),
                Err(e) => ApiError::MalformedJson(e.to_string()),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
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
