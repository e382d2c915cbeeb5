//! The JSON API: device reads, the ingest endpoint, commands, operator
//! sessions and `/healthz`.

use super::AppState;
use super::error::ApiError;
use super::hub::{Applied, ApplyError, Entry, Filter};
use super::signin;
use super::store::StoreError;
use super::thresholds::{self, MetricLimits, ThresholdsView};
use crate::model::{Changes, Device, DeviceId, Limits, Object, Snapshot, StatusUpdate};
use crate::protocol::{CommandSet, Outcome};
use axum::Json;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Largest accepted ingest body.
pub const MAX_BODY: usize = 16 * 1024;

/// The `{id}` of a route's path. One that is not even UTF-8 (`%FF`) comes
/// through, decoded lossily, to be refused as any other bad id is, in JSON:
/// an unknown device (404) on reads, an invalid id (422) on writes.
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        if let Ok(Path(id)) = Path::<String>::from_request_parts(parts, state).await {
            return Ok(Self(id));
        }
        let matched = parts.extensions.get::<MatchedPath>();
        let at = matched.and_then(|m| m.as_str().split('/').position(|s| s == "{id}"));
        let raw = at.and_then(|at| parts.uri.path().split('/').nth(at));
        let id = raw.map(|raw| percent_encoding::percent_decode_str(raw).decode_utf8_lossy());
        Ok(Self(id.unwrap_or_default().into_owned()))
    }
}

pub async fn list_devices(State(state): State<AppState>) -> Json<Snapshot> {
    Json(state.hub.snapshot(&Filter::default()))
}

pub async fn get_device(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<Device>, ApiError> {
    DeviceId::parse(&id)
        .ok()
        .and_then(|id| state.hub.device(&id))
        .map(Json)
        .ok_or(ApiError::UnknownDevice(id))
}

/// Changes `GET /api/changes` and `GET /api/devices/{id}/changes` return
/// unless `limit` says.
pub const CHANGES: usize = 50;
/// Most changes one read returns.
pub const MAX_CHANGES: usize = 1_000;

#[derive(Debug, Deserialize)]
pub struct ChangesQuery {
    limit: Option<String>,
}

/// `GET /api/changes?limit=N`: what every device's events changed besides
/// readings, newest first (see [`device_changes`]).
pub async fn changes(
    State(state): State<AppState>,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Changes>, ApiError> {
    read_changes(state, None, query).await
}

/// `GET /api/devices/{id}/changes?limit=N`: what the device's events
/// changed besides readings (power, link, staleness, alerts, name), newest
/// first; [`CHANGES`] unless `limit` (1 to [`MAX_CHANGES`]) says.
pub async fn device_changes(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Changes>, ApiError> {
    let device = DeviceId::parse(&id)
        .ok()
        .filter(|id| state.hub.device(id).is_some())
        .ok_or(ApiError::UnknownDevice(id))?;
    read_changes(state, Some(device), query).await
}

async fn read_changes(
    state: AppState,
    device: Option<DeviceId>,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Changes>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("", e.body_text()))?;
    let limit = match query.limit.as_deref() {
        None => CHANGES,
        Some(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=MAX_CHANGES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("`limit` is a number from 1 to {MAX_CHANGES}"),
                )
            })?,
    };
    let hub = state.hub.clone();
    let read = device.clone();
    let changes = tokio::task::spawn_blocking(move || hub.changes(read.as_ref(), limit))
        .await
        .map_err(|e| ApiError::StoreRead(e.to_string()))?
        .map_err(|e| {
            tracing::error!("{e}");
            ApiError::StoreRead(e.to_string())
        })?;
    Ok(Json(Changes { device, changes }))
}

/// The query of `GET /api/devices/{id}/history`; every field is optional.
#[derive(Debug, Default, Deserialize)]
pub struct HistoryQuery {
    pub metric: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub step: Option<String>,
}

/// The range of a history read when none is given: the last hour.
const DEFAULT_SPAN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// `GET /api/devices/{id}/history?metric=temperature&from=…&to=…&step=…`:
/// one metric of one device over a time range, as a `model::History`.
///
/// - `metric`: `temperature` (default), `humidity` or a metric's name.
/// - `from`, `to`: RFC 3339 (`2026-11-25T12:00:00Z`); `to` defaults to now,
///   `from` to an hour before `to`; `from` must be before `to`.
/// - `step`: a duration (`30s`, `1m`, `1h 30m`) or a number of seconds
///   (`90`, `0.5`); with it, points are buckets of that width carrying the
///   min, max and time-weighted mean of the values that held in each.
///   Without it, every change. At most 10 000 points: a wider request is
///   refused with the step that would fit.
///
/// The first point is the value in force at `from` (placed at `from`);
/// times older than `--retention` come from the per-minute history. A range
/// older than everything kept is simply empty. Reading is open, as
/// `GET /api/devices` is.
///
/// With `Accept: text/csv` (or at `…/history.csv`) the points come as CSV:
/// a header `t,value,min,max`, then one line per point, `t` in RFC 3339 UTC
/// with milliseconds (`2026-11-25T12:00:00.000Z`), `min` and `max` empty
/// when the point is a single reading. Errors are JSON either way.
pub async fn history(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let csv = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/csv"));
    let mut response = history_as(state, id, query, csv).await?;
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    Ok(response)
}

/// `GET /api/devices/{id}/history.csv`: [`history`] as CSV, whatever the
/// `Accept` header says.
pub async fn history_csv(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    history_as(state, id, query, true).await
}

async fn history_as(
    state: AppState,
    id: String,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    csv: bool,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("", e.body_text()))?;
    let device = DeviceId::parse(&id)
        .ok()
        .filter(|id| state.hub.device(id).is_some())
        .ok_or(ApiError::UnknownDevice(id))?;
    let metric = query.metric.unwrap_or_else(|| "temperature".to_owned());
    if !is_metric_name(&metric) {
        return Err(ApiError::invalid(
            "metric",
            "a metric name is 1 to 64 of a-z, A-Z, 0-9, '_', '-', '.'",
        ));
    }
    let to = match query.to.as_deref() {
        Some(t) => parse_time("to", t, "")?,
        None => chrono::Utc::now(),
    };
    let from = match query.from.as_deref() {
        Some(t) => parse_from(t, to)?,
        None => to
            .checked_sub_signed(DEFAULT_SPAN)
            .ok_or_else(|| ApiError::invalid("to", "`to` is too early"))?,
    };
    if from >= to {
        return Err(ApiError::invalid("from", "`from` must be before `to`"));
    }
    let step_ms = query.step.as_deref().map(parse_step).transpose()?;
    let hub = state.hub.clone();
    let history =
        tokio::task::spawn_blocking(move || hub.history(&device, &metric, from, to, step_ms))
            .await
            .map_err(|e| ApiError::StoreRead(e.to_string()))?
            .map_err(|e| match e {
                StoreError::TooManyPoints { .. } => ApiError::invalid("step", e.to_string()),
                e => {
                    tracing::error!("{e}");
                    ApiError::StoreRead(e.to_string())
                }
            })?;
    if !csv {
        return Ok(Json(history).into_response());
    }
    let mut body = String::from("t,value,min,max\n");
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for p in &history.points {
        let t = chrono::DateTime::from_timestamp_millis(p.t)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        body.push_str(&format!("{t},{},{},{}\n", p.v, opt(p.min), opt(p.max)));
    }
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
}

/// An RFC 3339 time; `or` names what else `field` may be, for the error.
fn parse_time(
    field: &str,
    value: &str,
    or: &str,
) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.to_utc())
        .map_err(|e| {
            ApiError::invalid(
                field,
                format!(
                    "`{field}` must be an RFC 3339 time such as 2026-11-25T12:00:00Z{or} ({e})"
                ),
            )
        })
}

/// `from`: an RFC 3339 time, or a duration (`24h`, `90m`) before `to`, so
/// a link can ask for "the last day" whenever it is followed.
fn parse_from(
    value: &str,
    to: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    let Ok(span) = humantime::parse_duration(value.trim()) else {
        return parse_time("from", value, ", or a duration before `to` such as 24h");
    };
    chrono::TimeDelta::from_std(span)
        .ok()
        .and_then(|span| to.checked_sub_signed(span))
        .ok_or_else(|| {
            ApiError::invalid("from", format!("`from` is too long before `to`: {value}"))
        })
}

/// A duration (`30s`, `1m`) or a number of seconds, in whole milliseconds.
fn parse_step(value: &str) -> Result<i64, ApiError> {
    let value = value.trim();
    let ms = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() => (secs * 1000.0).round(),
        Ok(_) => -1.0,
        Err(_) => humantime::parse_duration(value)
            .map_err(|e| {
                ApiError::invalid(
                    "step",
                    format!(
                        "`step` must be a duration such as 30s or 1m, or a number of seconds ({e})"
                    ),
                )
            })?
            .as_millis() as f64,
    };
    if ms < 1.0 {
        return Err(ApiError::invalid("step", "`step` must be 1ms or more"));
    }
    Ok(ms.min(i64::MAX as f64) as i64)
}

/// The rule of `StatusUpdate::validate` for a metric's name.
fn is_metric_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A known address asked with a method it does not take.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// `POST /api/devices/{id}/status`: checks run cheapest first (token, id,
/// content type, size, JSON, values), and nothing changes unless all pass.
pub async fn post_status(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Applied>, ApiError> {
    state.auth.check_ingest(&headers)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let update: StatusUpdate = read_json(&headers, body, MAX_BODY).await?;
    update.validate()?;
    Ok(Json(state.hub.apply(&id, &update)?))
}

/// Largest accepted `POST /api/status` body, and most updates in it.
pub const MAX_BATCH_BODY: usize = 256 * 1024;
pub const MAX_BATCH: usize = 1_000;

/// The body of `POST /api/status`: status updates by device id, in the
/// order given. An id given twice is refused (a JSON reader would keep
/// only one of them, silently).
struct Batch(Vec<(String, Updates)>);

/// One device's part of a batch: an update, or an array of them applied in
/// order (a device sending what it kept while away, each with its `at`).
/// The answer takes the same shape.
enum Updates {
    One(StatusUpdate),
    Several(Vec<StatusUpdate>),
}

impl Updates {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Several(all) => all.len(),
        }
    }
}

impl<'de> Deserialize<'de> for Updates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrSeveral;
        impl<'de> serde::de::Visitor<'de> for OneOrSeveral {
            type Value = Updates;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a status update, or an array of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Updates, A::Error> {
                StatusUpdate::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Updates::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Updates, A::Error> {
                let mut all = Vec::new();
                while let Some(Object(update)) = seq.next_element()? {
                    all.push(update);
                }
                Ok(Updates::Several(all))
            }
        }
        d.deserialize_any(OneOrSeveral)
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Batch;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of status updates by device id")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Batch, A::Error> {
                let mut entries: Vec<(String, Updates)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                let mut updates = 0;
                while let Some(id) = map.next_key::<String>()? {
                    if !seen.insert(id.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "device `{id}` is given twice: give its updates as an array"
                        )));
                    }
                    let value: Updates = map.next_value()?;
                    updates += value.len();
                    if updates > MAX_BATCH {
                        return Err(serde::de::Error::custom(format!(
                            "at most {MAX_BATCH} updates per request"
                        )));
                    }
                    entries.push((id, value));
                }
                Ok(Batch(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// What `POST /api/status` answers for one device: the shape it was sent in.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum BatchApplied {
    One(Applied),
    Several(Vec<Applied>),
}

/// `POST /api/status` with `{"<device id>": {<as POST /api/devices/{id}/status>} or [{…}, …], …}`:
/// many updates in one request (a gateway's, or a device's kept readings),
/// each its own event, in the order given, recorded with one commit: all
/// are taken, or, when one is refused, none. Answers
/// `{"devices": {id: {"id", "changed"} or [{"id", "changed"}, …]}}`.
pub async fn post_statuses(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BTreeMap<&'static str, BTreeMap<String, BatchApplied>>>, ApiError> {
    state.auth.check_ingest(&headers)?;
    let Batch(entries) = read_json(&headers, body, MAX_BATCH_BODY).await?;
    // Each device's id, and how many updates it sent in an array (`None`
    // for a lone update): the answer's shape.
    let mut shape = Vec::with_capacity(entries.len());
    let mut batch = Vec::with_capacity(entries.len());
    for (id, updates) in entries {
        let device = DeviceId::parse(&id).map_err(|e| ApiError::invalid(id.clone(), e))?;
        let (count, placed): (_, Vec<_>) = match updates {
            Updates::One(update) => (None, vec![(id.clone(), update)]),
            Updates::Several(all) => (
                Some(all.len()),
                all.into_iter()
                    .enumerate()
                    .map(|(i, update)| (format!("{id}[{i}]"), update))
                    .collect(),
            ),
        };
        shape.push((id, count));
        for (place, update) in placed {
            update
                .validate()
                .map_err(|e| ApiError::invalid(format!("{place}.{}", e.field), e.message))?;
            batch.push(Entry {
                place,
                device: device.clone(),
                update,
            });
        }
    }
    let mut applied = state.hub.apply_all(&batch)?.into_iter();
    let devices = shape
        .into_iter()
        .map(|(id, count)| {
            let answer = match count {
                None => BatchApplied::One(applied.next().expect("one per update")),
                Some(n) => BatchApplied::Several(applied.by_ref().take(n).collect()),
            };
            (id, answer)
        })
        .collect();
    Ok(Json(BTreeMap::from([("devices", devices)])))
}

/// `DELETE /api/devices/{id}`: removes a device that has no live link, with
/// its history (see [`Hub::remove`](super::hub::Hub::remove)); every page
/// drops its card.
pub async fn remove_device(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> Result<Json<Applied>, ApiError> {
    state.auth.check_operator(&headers, &state.hub)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    Ok(Json(state.hub.remove(&id)?))
}

/// The body of `POST /api/devices/{id}/commands`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    #[serde(deserialize_with = "crate::model::object")]
    pub set: CommandSet,
}

/// `POST /api/devices/{id}/commands`: the same path as a WebSocket command
/// (route to the device's agent, wait for its answer or the deadline), for
/// the page and for curl. Answers once the command has ended.
pub async fn post_command(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    state.auth.check_operator(&headers, &state.hub)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let request: CommandRequest = read_json(&headers, body, MAX_BODY).await?;
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
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LimitsSet>, ApiError> {
    state.auth.check_operator(&headers, &state.hub)?;
    let id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let raw: BTreeMap<String, Value> = read_json(&headers, body, MAX_BODY).await?;
    let mut limits = MetricLimits::new();
    for (metric, value) in raw {
        let Object(l): Object<Limits> = serde_path_to_error::deserialize(value).map_err(|e| {
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

/// The sign-in page's form: the token, and the page to return to.
#[derive(Deserialize)]
pub struct SignInForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /api/session`: trades the operator token, sent once, for an
/// `HttpOnly` session cookie; the page never keeps the token. Where reading
/// takes a viewer token, that token gets a viewer session. Any other
/// token, or none, is a 401.
///
/// JSON (`{"token"}`, the page's script) answers `{"role"}`; a form (the
/// sign-in page's, which works without JavaScript) is sent back to its
/// `next` page, or shown the sign-in page again with the reason.
pub async fn sign_in(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let headers = request.headers().clone();
    if form {
        let body = read_body(&headers, request.into_body(), MAX_BODY).await?;
        let form: SignInForm = serde_urlencoded::from_bytes(&body)
            .map_err(|e| ApiError::invalid("", e.to_string()))?;
        return Ok(match start_session(&state, &headers, &form.token) {
            Ok((_, cookie)) => with_cookie(
                axum::response::Redirect::to(signin::safe_next(&form.next)).into_response(),
                &cookie,
            ),
            Err(e) => signin::page(StatusCode::UNAUTHORIZED, &form.next, Some(&e.to_string())),
        });
    }
    let body = request.into_body();
    let request: SignIn = read_json(&headers, body, MAX_BODY).await?;
    let (role, cookie) = start_session(&state, &headers, &request.token)?;
    Ok(with_cookie(
        Json(json!({ "role": role })).into_response(),
        &cookie,
    ))
}

/// The session `token` starts, and the `Set-Cookie` value that keeps it;
/// signing in again replaces the session this browser had.
fn start_session(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
) -> Result<(&'static str, String), ApiError> {
    let auth = &state.auth;
    let viewers = auth
        .viewer_sessions
        .as_ref()
        .filter(|_| auth.viewer.as_ref().is_some_and(|v| v.matches(token)));
    if auth.operator.matches(token) {
        sign_out_sessions(state, headers);
        let (_, value) = auth.sessions.start();
        Ok(("operator", auth.session_set_cookie(&value)))
    } else if let Some(viewers) = viewers {
        sign_out_sessions(state, headers);
        let (_, value) = viewers.start();
        Ok(("viewer", auth.viewer_set_cookie(&value)))
    } else if auth.viewer.is_some() {
        Err(ApiError::WrongToken)
    } else {
        Err(ApiError::WrongOperatorToken)
    }
}

/// `DELETE /api/session`: ends this browser's sessions (if any) on every
/// instance, and clears their cookies. Always a 204, so signing out twice
/// is harmless.
pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Response {
    sign_out_sessions(&state, &headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    for cookie in state.auth.clear_cookies() {
        response = with_cookie(response, &cookie);
    }
    response
}

fn sign_out_sessions(state: &AppState, headers: &HeaderMap) {
    let sessions = [
        state.auth.session(headers, &state.hub),
        state.auth.viewer_session(headers, &state.hub),
    ];
    for session in sessions.iter().flatten() {
        if let Err(e) = state.hub.sign_out(session) {
            // The browser forgets the cookie all the same.
            tracing::error!("a session signed out here only: {e}");
        }
    }
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        headers.append(header::SET_COOKIE, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `200 {"status":"ok",…}`, or in cluster mode while Redis is unreachable
/// `503 {"status":"degraded","reason":…}`: this instance still serves what
/// it has, but takes no changes, so a load balancer may prefer another.
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (event_id, devices) = state.hub.stats();
    let degraded = state.hub.degraded();
    let mut body = json!({
        "status": if degraded.is_some() { "degraded" } else { "ok" },
        "event_id": event_id,
        "devices": devices,
        "subscribers": state.hub.subscribers(),
    });
    let code = match degraded {
        Some(reason) => {
            body["reason"] = reason.into();
            StatusCode::SERVICE_UNAVAILABLE
        }
        None => StatusCode::OK,
    };
    (code, Json(body))
}

/// Reads a JSON body of at most `limit` bytes, naming the faulty field
/// when the JSON is well formed but does not fit `T`.
async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    parse_object(&read_body(headers, body, limit).await?)
}

/// Reads a body of at most `limit` bytes (413 past it, before reading
/// anything when `Content-Length` says so).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large);
    }
    to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large
        } else {
            ApiError::BadBody(e.to_string())
        }
    })
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
        // An unknown field's path ends with its name: `colour`, or in a
        // batch `rack-1.colour`; but in a tagged message (the WebSocket's)
        // the path stops at the message, so the name is read from the
        // error. The body as a whole is "".
        let path = e.path().to_string();
        let field = match (path.as_str(), message.strip_prefix("unknown field `")) {
            (".", Some(rest)) => rest.split('`').next().unwrap_or_default().to_owned(),
            (".", None) => String::new(),
            (path, _) => path.to_owned(),
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

/// The client address of a request, as [`count_guesses`] found it.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub std::net::IpAddr);

/// Around every route that checks a token: refuses (429) a client address
/// that sent too many wrong tokens, and counts each 401. The address is the
/// peer's, or, when the peer is this machine (a proxy in front, as in
/// `tests/nginx/telltale.conf`), the last `X-Forwarded-For` entry, the one
/// the proxy added.
pub async fn count_guesses(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(ip) = client_ip(&request) else {
        return next.run(request).await;
    };
    if let Some(wait) = state.auth.guesses.wait(ip) {
        return ApiError::TooManyGuesses(wait).into_response();
    }
    request.extensions_mut().insert(ClientIp(ip));
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        state.wrong_token(ip);
    }
    response
}

/// Reading (the page, the stream, the API's reads, `/metrics`), when a
/// viewer token closes it: the request needs the token or a session (see
/// [`Auth::check_reader`](super::auth::Auth::check_reader)). A page asked
/// for without one gets the sign-in page; anything else its JSON 401 or
/// 403. Wrong bearer tokens count as guesses (see [`count_guesses`]).
pub async fn require_reader(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.auth.viewer.is_none() {
        return next.run(request).await;
    }
    let guessing = super::auth::bearer(request.headers())
        .is_some()
        .then(|| client_ip(&request))
        .flatten();
    if let Some(wait) = guessing.and_then(|ip| state.auth.guesses.wait(ip)) {
        return ApiError::TooManyGuesses(wait).into_response();
    }
    match state.auth.check_reader(request.headers(), &state.hub) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            if let (Some(ip), ApiError::Unauthorized(_)) = (guessing, &e) {
                state.wrong_token(ip);
            }
            let path = request.uri().path();
            if path.starts_with("/api/") || path == "/metrics" {
                e.into_response()
            } else {
                let here = request.uri().path_and_query().map_or("/", |p| p.as_str());
                signin::page(StatusCode::UNAUTHORIZED, here, None)
            }
        }
    }
}

/// See [`count_guesses`].
fn client_ip(request: &axum::extract::Request) -> Option<std::net::IpAddr> {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()?
        .0
        .ip();
    let forwarded = || {
        request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()?
            .trim()
            .parse()
            .ok()
    };
    if peer.is_loopback() {
        Some(forwarded().unwrap_or(peer))
    } else {
        Some(peer)
    }
}
