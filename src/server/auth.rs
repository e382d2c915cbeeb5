//! Tokens and roles, for HTTP and the WebSocket alike.
//!
//! - ingest token: `POST /api/devices/{id}/status` for any id, and the
//!   `device` role on the WebSocket for any id (it can push any id already);
//! - operator token: commands (HTTP and WebSocket), and reading;
//! - viewer token: reading over the WebSocket; when none is configured,
//!   reading is open to anyone, as the SSE stream and the page are;
//! - device tokens: the `device` role for the one id each is bound to;
//! - operator sessions: the page signs in once with the operator token
//!   (`POST /api/session`) and gets a cookie holding a random session id;
//!   the cookie then grants what the operator token grants over HTTP
//!   (commands), and tells the server to render the page's controls.
//!
//! Every comparison runs in constant time, and a token is compared with every
//! configured token, so timing tells nothing about which one nearly matched.

use super::error::ApiError;
use crate::model::DeviceId;
use crate::protocol::Role;
use axum::http::{HeaderMap, header};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The name of the operator session cookie.
pub const SESSION_COOKIE: &str = "telltale_session";
/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; beyond it the oldest is dropped.
pub const MAX_SESSIONS: usize = 1024;

/// One secret token.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(token: impl Into<Arc<str>>) -> Self {
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
    pub fn matches(&self, given: &str) -> bool {
        bool::from(given.as_bytes().ct_eq(self.0.as_bytes()))
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Why a connection or request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token, or one that matches no configured token (401 / 4401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A valid token that does not grant this (403 / 4403).
    #[error("{0}")]
    Forbidden(String),
}

/// The value of the session cookie, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
}

/// Operator sessions, in memory: a restart signs everyone out.
///
/// A session id is 43 random alphanumeric characters (about 256 bits) from
/// a cryptographic generator; it is never derived from the operator token,
/// so the cookie tells nothing about the token. Ids are looked up in a hash
/// map: with ids that cannot be guessed, lookup timing gives nothing away.
#[derive(Default)]
pub struct Sessions {
    /// Session id → when it expires.
    live: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session; returns its id.
    pub fn create(&self) -> String {
        use rand::distr::{Alphanumeric, SampleString};
        let id = Alphanumeric.sample_string(&mut rand::rng(), 43);
        let now = Instant::now();
        let mut live = self.lock();
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(id.clone(), now + SESSION_TTL);
        id
    }

    /// Whether `id` is a live session.
    pub fn is_live(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|expires| *expires > Instant::now())
    }

    /// Ends a session; returns whether it was live.
    pub fn end(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every configured token, and the operator sessions.
pub struct Auth {
    pub ingest: Token,
    pub operator: Token,
    pub viewer: Option<Token>,
    pub devices: Vec<(DeviceId, Token)>,
    pub sessions: Sessions,
    /// Mark the session cookie `Secure` (only sent over https). Off by
    /// default: the server cannot tell whether a proxy in front of it speaks
    /// https, and a `Secure` cookie set over plain http (127.0.0.1) is
    /// dropped by the browser, so sign-in would silently fail.
    pub secure_cookie: bool,
}

/// What one token grants.
#[derive(Default)]
struct Grants {
    ingest: bool,
    operator: bool,
    viewer: bool,
    device: Option<DeviceId>,
}

impl Grants {
    fn any(&self) -> bool {
        self.ingest || self.operator || self.viewer || self.device.is_some()
    }
}

impl Auth {
    fn grants(&self, token: &str) -> Grants {
        let mut grants = Grants {
            ingest: self.ingest.matches(token),
            operator: self.operator.matches(token),
            viewer: self.viewer.as_ref().is_some_and(|v| v.matches(token)),
            device: None,
        };
        for (id, t) in &self.devices {
            if t.matches(token) {
                grants.device = Some(id.clone());
            }
        }
        grants
    }

    /// Whether `token` is any configured token at all.
    pub fn knows(&self, token: &str) -> bool {
        self.grants(token).any()
    }

    /// `POST /api/devices/{id}/status`: the ingest token only, as before.
    pub fn check_ingest(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match bearer(headers) {
            Some(token) if self.ingest.matches(token) => Ok(()),
            _ => Err(ApiError::Unauthorized("ingest")),
        }
    }

    /// Whether the request carries a live operator session cookie.
    pub fn has_session(&self, headers: &HeaderMap) -> bool {
        session_cookie(headers).is_some_and(|id| self.sessions.is_live(id))
    }

    /// The `Set-Cookie` value that starts session `id` in the browser:
    /// `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's
    /// page sends it), whole site.
    pub fn session_set_cookie(&self, id: &str) -> String {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        format!(
            "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
            SESSION_TTL.as_secs()
        )
    }

    /// The `Set-Cookie` value that removes the session cookie.
    pub fn session_clear_cookie(&self) -> String {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}")
    }

    /// HTTP commands: the operator token as a bearer token (another valid
    /// token is a 403), or, with no `Authorization` header, a live operator
    /// session cookie.
    ///
    /// CSRF: the cookie is `SameSite=Strict`, so a request started by another
    /// site's page does not carry it; and commands only take
    /// `Content-Type: application/json`, which a cross-site form cannot send
    /// and a cross-site `fetch` can only send after a CORS preflight that this
    /// server never answers. Both together are enough here.
    pub fn check_operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if bearer(headers).is_none()
            && let Some(id) = session_cookie(headers)
        {
            return if self.sessions.is_live(id) {
                Ok(())
            } else {
                Err(ApiError::SessionEnded)
            };
        }
        self.authorize(Role::Operator, None, bearer(headers))
            .map_err(|e| match e {
                Refusal::Unauthorized(_) => ApiError::Unauthorized("operator"),
                Refusal::Forbidden(why) => ApiError::Forbidden(why),
            })
    }

    /// May `token` take `role` (for `device`, when the role is `device`)?
    pub fn authorize(
        &self,
        role: Role,
        device: Option<&DeviceId>,
        token: Option<&str>,
    ) -> Result<(), Refusal> {
        let grants = token.map(|t| self.grants(t));
        if grants.as_ref().is_some_and(|g| !g.any()) {
            return Err(Refusal::Unauthorized("unknown token"));
        }
        let missing = Refusal::Unauthorized("this role needs a token");
        match role {
            Role::Viewer => match grants {
                None if self.viewer.is_none() => Ok(()),
                None => Err(missing),
                Some(g) if g.viewer || g.operator || self.viewer.is_none() => Ok(()),
                Some(_) => Err(Refusal::Forbidden(
                    "this token does not grant the viewer role".into(),
                )),
            },
            Role::Operator => match grants {
                None => Err(missing),
                Some(g) if g.operator => Ok(()),
                Some(_) => Err(Refusal::Forbidden(
                    "this token does not grant the operator role".into(),
                )),
            },
            Role::Device => {
                let Some(device) = device else {
                    return Err(Refusal::Forbidden(
                        "a device hello must name its device".into(),
                    ));
                };
                match grants {
                    None => Err(missing),
                    Some(g) if g.ingest || g.device.as_ref() == Some(device) => Ok(()),
                    Some(_) => Err(Refusal::Forbidden(format!(
                        "this token does not grant the device role for `{device}`"
                    ))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn auth(viewer: Option<&str>) -> Auth {
        Auth {
            ingest: Token::new("ingest"),
            operator: Token::new("op"),
            viewer: viewer.map(Token::new),
            devices: vec![(id("rack"), Token::new("rack-secret"))],
            sessions: Sessions::default(),
            secure_cookie: false,
        }
    }

    fn with_cookie(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, cookie.parse().unwrap());
        headers
    }

    #[test]
    fn a_session_cookie_grants_the_operator_role_until_it_ends() {
        let a = auth(None);
        let id = a.sessions.create();
        assert_eq!(id.len(), 43);
        assert_ne!(id, a.sessions.create(), "ids are random");
        let headers = with_cookie(&format!("theme=dark; {SESSION_COOKIE}={id}; x=1"));
        assert_eq!(session_cookie(&headers), Some(id.as_str()));
        assert!(a.has_session(&headers));
        assert!(a.check_operator(&headers).is_ok());
        // A bearer header wins over the cookie.
        let mut both = headers.clone();
        both.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(a.check_operator(&both).is_err());
        assert!(a.sessions.end(&id));
        assert!(!a.has_session(&headers));
        assert!(matches!(
            a.check_operator(&headers),
            Err(ApiError::SessionEnded)
        ));
        assert!(!a.has_session(&with_cookie(&format!("{SESSION_COOKIE}=op"))));
        assert!(!a.has_session(&HeaderMap::new()));
    }

    #[test]
    fn session_cookies_are_http_only_and_strict() {
        let mut a = auth(None);
        let set = a.session_set_cookie("abc");
        assert!(set.starts_with("telltale_session=abc; "), "{set}");
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        assert!(!set.contains("Secure"));
        assert!(a.session_clear_cookie().contains("Max-Age=0"));
        a.secure_cookie = true;
        assert!(a.session_set_cookie("abc").ends_with("; Secure"));
    }

    #[test]
    fn sessions_are_capped() {
        let a = auth(None);
        let first = a.sessions.create();
        for _ in 0..MAX_SESSIONS {
            a.sessions.create();
        }
        assert_eq!(a.sessions.len(), MAX_SESSIONS);
        assert!(!a.sessions.is_live(&first), "the oldest went first");
    }

    fn unauthorized<T>(r: Result<T, Refusal>) -> bool {
        matches!(r, Err(Refusal::Unauthorized(_)))
    }

    fn forbidden<T>(r: Result<T, Refusal>) -> bool {
        matches!(r, Err(Refusal::Forbidden(_)))
    }

    #[test]
    fn reading_is_open_without_a_viewer_token() {
        let a = auth(None);
        assert!(a.authorize(Role::Viewer, None, None).is_ok());
        assert!(a.authorize(Role::Viewer, None, Some("op")).is_ok());
        assert!(unauthorized(a.authorize(Role::Viewer, None, Some("nope"))));
    }

    #[test]
    fn a_viewer_token_closes_reading() {
        let a = auth(Some("view"));
        assert!(unauthorized(a.authorize(Role::Viewer, None, None)));
        assert!(a.authorize(Role::Viewer, None, Some("view")).is_ok());
        assert!(a.authorize(Role::Viewer, None, Some("op")).is_ok());
        assert!(forbidden(a.authorize(
            Role::Viewer,
            None,
            Some("rack-secret")
        )));
    }

    #[test]
    fn operators_need_the_operator_token() {
        let a = auth(Some("view"));
        assert!(a.authorize(Role::Operator, None, Some("op")).is_ok());
        assert!(unauthorized(a.authorize(Role::Operator, None, None)));
        assert!(forbidden(a.authorize(Role::Operator, None, Some("view"))));
        assert!(forbidden(a.authorize(Role::Operator, None, Some("ingest"))));
    }

    #[test]
    fn device_tokens_are_bound_to_their_id_and_ingest_to_any() {
        let a = auth(None);
        let rack = id("rack");
        let other = id("other");
        assert!(
            a.authorize(Role::Device, Some(&rack), Some("rack-secret"))
                .is_ok()
        );
        assert!(forbidden(a.authorize(
            Role::Device,
            Some(&other),
            Some("rack-secret")
        )));
        assert!(
            a.authorize(Role::Device, Some(&other), Some("ingest"))
                .is_ok()
        );
        assert!(forbidden(a.authorize(Role::Device, None, Some("ingest"))));
        assert!(forbidden(a.authorize(
            Role::Device,
            Some(&rack),
            Some("op")
        )));
        assert!(unauthorized(a.authorize(Role::Device, Some(&rack), None)));
    }
}
