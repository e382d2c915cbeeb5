//! The page's few requests to the server: operator sign-in and sign-out,
//! commands, limits, and removing a device. All go to the page's own origin, so the browser sends the
//! `HttpOnly` session cookie by itself; the page never sees it, and keeps the
//! operator token only for the moment it takes to post it.

/// Why a request did not succeed, in words the page can show.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub message: String,
    /// The server answered 401: the page is not (or no longer) signed in.
    pub unauthorized: bool,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unauthorized: false,
        }
    }

    /// A response that is not a success: the server's `error`, if it gave
    /// one.
    #[cfg(feature = "hydrate")]
    async fn of(response: gloo_net::http::Response) -> Self {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("the server answered {status}"));
        Self {
            message,
            unauthorized: status == 401,
        }
    }
}

/// `POST /api/session` with the operator token.
pub async fn sign_in(token: String) -> Result<(), Failure> {
    let body = serde_json::json!({ "token": token }).to_string();
    send(Method::Post, "/api/session", Some(body)).await
}

/// `DELETE /api/session`.
pub async fn sign_out() -> Result<(), Failure> {
    send(Method::Delete, "/api/session", None).await
}

/// `DELETE /api/devices/{id}`. The card goes when the removal's status
/// event arrives, on this page and every other.
pub async fn remove_device(device: &str) -> Result<(), Failure> {
    send(Method::Delete, &format!("/api/devices/{device}"), None).await
}

/// `POST /api/devices/{id}/commands` setting `power_on`. Ends when the device
/// has applied the command (or refused it, or the server gave up waiting);
/// the new state itself arrives as a status event.
pub async fn set_power(device: &str, on: bool) -> Result<(), Failure> {
    let body = serde_json::json!({ "set": { "power_on": on } }).to_string();
    send(
        Method::Post,
        &format!("/api/devices/{device}/commands"),
        Some(body),
    )
    .await
}

/// `PUT /api/devices/{id}/thresholds`: sets the device's own limits.
pub async fn set_limits(
    device: &str,
    limits: &std::collections::BTreeMap<String, crate::model::Limits>,
) -> Result<(), Failure> {
    let body = serde_json::to_string(limits).map_err(|e| Failure::new(e.to_string()))?;
    send(
        Method::Put,
        &format!("/api/devices/{device}/thresholds"),
        Some(body),
    )
    .await
}

/// `GET /api/devices/{id}/history` of `metric` from `from_ms` to the
/// server's now, in buckets of `step_ms` when given.
#[cfg(feature = "hydrate")]
pub async fn history(
    device: &str,
    metric: &str,
    from_ms: i64,
    step_ms: Option<i64>,
) -> Result<crate::model::History, Failure> {
    let from = chrono::DateTime::from_timestamp_millis(from_ms)
        .ok_or_else(|| Failure::new(format!("no such time: {from_ms} ms")))?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut query = vec![("metric", metric.to_owned()), ("from", from)];
    if let Some(step) = step_ms {
        query.push(("step", format!("{}s", step / 1000)));
    }
    get(
        &format!("/api/devices/{device}/history"),
        query,
        "a history",
    )
    .await
}

/// The last `limit` changes, newest first: `device`'s
/// (`GET /api/devices/{id}/changes`), or every device's (`GET /api/changes`).
#[cfg(feature = "hydrate")]
pub async fn changes(
    device: Option<&crate::model::DeviceId>,
    limit: usize,
) -> Result<crate::model::Changes, Failure> {
    let url = match device {
        Some(device) => format!("/api/devices/{device}/changes"),
        None => "/api/changes".to_owned(),
    };
    get(&url, [("limit", limit.to_string())], "a list of changes").await
}

/// `GET url?query`, read as JSON; `what` names it in the error.
#[cfg(feature = "hydrate")]
async fn get<T: serde::de::DeserializeOwned>(
    url: &str,
    query: impl IntoIterator<Item = (&'static str, String)>,
    what: &str,
) -> Result<T, Failure> {
    let response = gloo_net::http::Request::get(url)
        .query(query)
        .send()
        .await
        .map_err(|e| Failure::new(format!("the server could not be reached: {e}")))?;
    if !response.ok() {
        return Err(Failure::of(response).await);
    }
    let text = response.text().await.unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| Failure::new(format!("{what} that does not read: {e}")))
}

#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
enum Method {
    Post,
    Put,
    Delete,
}

/// The server's own timeout ends a command long before this; it only guards
/// against a request that never ends (a proxy, a dead connection).
#[cfg(feature = "hydrate")]
const GIVE_UP_MS: u32 = 30_000;

#[cfg(feature = "hydrate")]
async fn send(method: Method, url: &str, body: Option<String>) -> Result<(), Failure> {
    use gloo_net::http::Request;

    let builder = match method {
        Method::Post => Request::post(url),
        Method::Put => Request::put(url),
        Method::Delete => Request::delete(url),
    };
    let signal = web_sys::AbortSignal::timeout_with_u32(GIVE_UP_MS);
    let builder = builder.abort_signal(Some(&signal));
    let sent = match body {
        // `application/json` is also what keeps other sites out (see
        // `server::auth::Auth::check_operator`).
        Some(body) => {
            builder
                .header("content-type", "application/json")
                .body(body)
                .map_err(|e| Failure::new(e.to_string()))?
                .send()
                .await
        }
        None => builder.send().await,
    };
    let response = sent.map_err(|e| {
        if signal.aborted() {
            Failure::new(format!(
                "no answer from the server within {} s",
                GIVE_UP_MS / 1000
            ))
        } else {
            Failure::new(format!("the server could not be reached: {e}"))
        }
    })?;
    if response.ok() {
        return Ok(());
    }
    Err(Failure::of(response).await)
}

/// Requests are only sent from the browser; the server renders no click.
#[cfg(not(feature = "hydrate"))]
async fn send(_: Method, _: &str, _: Option<String>) -> Result<(), Failure> {
    Err(Failure::new("requests are sent from the browser only"))
}
