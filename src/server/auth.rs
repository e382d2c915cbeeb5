//! Tokens and roles, for HTTP and the WebSocket alike.
//!
//! - ingest token: `POST /api/devices/{id}/status` for any id, and the
//!   `device` role on the WebSocket for any id (it can push any id already);
//! - operator token: commands (HTTP and WebSocket), and reading;
//! - viewer token: reading; when none is configured, reading (the page,
//!   the stream, the API's reads, `/metrics`) is open to anyone. When one
//!   is, reading takes it (or the operator token) as a bearer token, or a
//!   viewer or operator session cookie;
//! - device tokens: the `device` role for the one id each is bound to;
//! - operator sessions: the page signs in once with the operator token
//!   (`POST /api/session`) and gets a signed cookie holding a random session
//!   id ([`Sessions`]);
//!   the cookie then grants what the operator token grants over HTTP
//!   (commands), and tells the server to render the page's controls;
//! - viewer sessions: the same, with the viewer token, granting reading
//!   only (the sign-in page a closed page shows).
//!
//! Every comparison runs in constant time, and a token is compared with every
//! configured token, so timing tells nothing about which one nearly matched.

use super::error::ApiError;
use super::hub::Hub;
use crate::model::DeviceId;
use crate::protocol::Role;
use axum::http::{HeaderMap, header};
use cookie::{Cookie, CookieJar, Key, SameSite};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The name of the operator session cookie.
pub const SESSION_COOKIE: &str = "telltale_session";
/// The name of the viewer session cookie.
pub const VIEWER_COOKIE: &str = "telltale_viewer";
/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// One secret token, and its SHA-256, which is what a token given is
/// compared with: digests are all one length, so the comparison tells
/// nothing, not even the token's length.
#[derive(Clone)]
pub struct Token(Arc<str>, [u8; 32]);

impl Token {
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        let token = token.into();
        let digest = Sha256::digest(token.as_bytes()).into();
        Self(token, digest)
    }

    /// A random 32-character token, for when none is configured.
    pub fn random() -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        Self::new(Alphanumeric.sample_string(&mut rand::rng(), 32))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, whatever the lengths.
    pub fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        bool::from(given.ct_eq(&self.1))
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

/// The value of the operator session cookie, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, SESSION_COOKIE)
}

/// The value of cookie `name`, if the request carries it.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// One session, as its cookie says once its signature checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// 43 random alphanumeric characters (about 256 bits): what a sign-out
    /// revokes.
    pub id: String,
    /// When it ends, in seconds since the Unix epoch.
    pub expires: i64,
}

/// Operator (or viewer) sessions, kept by the browser: the cookie holds the
/// session's id and end, signed (HMAC-SHA256, by the `cookie` crate) with a
/// key derived from the operator (viewer) token. So any instance with the
/// same token accepts it (no sticky sessions behind a load balancer), a
/// restart signs nobody out, and changing the token ends every session. The
/// cookie tells nothing about the token; the server keeps only the ids of
/// sessions signed out before their end (see [`Hub::sign_out`]).
///
/// [`Hub::sign_out`]: super::hub::Hub::sign_out
pub struct Sessions {
    key: Key,
    cookie: &'static str,
}

impl Sessions {
    pub fn new(operator: &Token) -> Self {
        Self::of("operator", operator, SESSION_COOKIE)
    }

    pub fn viewers(viewer: &Token) -> Self {
        Self::of("viewer", viewer, VIEWER_COOKIE)
    }

    fn of(role: &str, token: &Token, cookie: &'static str) -> Self {
        use sha2::{Digest, Sha256};
        let master = Sha256::new()
            .chain_update(format!("telltale {role} sessions\0"))
            .chain_update(token.as_str().as_bytes())
            .finalize();
        Self {
            key: Key::derive_from(&master),
            cookie,
        }
    }

    /// Starts a session: it, and the signed value of its cookie.
    pub fn start(&self) -> (Session, String) {
        use rand::distr::{Alphanumeric, SampleString};
        let session = Session {
            id: Alphanumeric.sample_string(&mut rand::rng(), 43),
            expires: now() + SESSION_TTL.as_secs() as i64,
        };
        let value = self.sign(&session);
        (session, value)
    }

    /// The signed cookie value of `session`.
    fn sign(&self, session: &Session) -> String {
        let mut jar = CookieJar::new();
        jar.signed_mut(&self.key).add(Cookie::new(
            self.cookie,
            format!("{}.{}", session.id, session.expires),
        ));
        jar.get(self.cookie).expect("just added").value().to_owned()
    }

    /// The session a cookie value stands for, if its signature is this
    /// server's and it has not ended.
    pub fn read(&self, value: &str) -> Option<Session> {
        let cookie = Cookie::new(self.cookie, value.to_owned());
        let verified = CookieJar::new().signed(&self.key).verify(cookie)?;
        let (id, expires) = verified.value().split_once('.')?;
        let expires = expires.parse().ok()?;
        (expires > now()).then(|| Session {
            id: id.to_owned(),
            expires,
        })
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Wrong tokens one client address may send at once ...
pub const GUESSES: u32 = 10;
/// ... and how often it gets one more.
pub const GUESS_EVERY: Duration = Duration::from_secs(6);

/// Wrong tokens by client address, so no one tries tokens by the million:
/// [`GUESSES`] at once, then one every [`GUESS_EVERY`] (GCRA, by the
/// governor crate). An address past its allowance gets 429, on every
/// request that checks a token, until it has one again; other addresses
/// are not affected, nor are requests that need no token.
pub struct Guesses {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses past their allowance, and until when.
    waiting: std::sync::Mutex<HashMap<IpAddr, Instant>>,
}

impl Default for Guesses {
    fn default() -> Self {
        let quota = governor::Quota::with_period(GUESS_EVERY)
            .expect("a period")
            .allow_burst(NonZeroU32::new(GUESSES).expect("some guesses"));
        Self {
            limiter: governor::RateLimiter::keyed(quota),
            waiting: Default::default(),
        }
    }
}

impl Guesses {
    /// How long `ip` must wait before a token of its is checked, if at all.
    pub fn wait(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let until = *waiting.get(&ip)?;
        (until > now).then(|| until - now)
    }

    /// Counts a wrong token from `ip`.
    pub fn wrong(&self, ip: IpAddr) {
        use governor::clock::{Clock, DefaultClock};
        if let Err(denied) = self.limiter.check_key(&ip) {
            let wait = denied.wait_time_from(DefaultClock::default().now());
            let now = Instant::now();
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.retain(|_, until| *until > now);
            waiting.insert(ip, now + wait.max(Duration::from_secs(1)));
            drop(waiting);
            self.limiter.retain_recent();
        }
    }
}

/// Every configured token, and the operator sessions.
pub struct Auth {
    pub ingest: Token,
    pub operator: Token,
    pub viewer: Option<Token>,
    pub devices: Vec<(DeviceId, Token)>,
    pub sessions: Sessions,
    /// With a viewer token: its sessions.
    pub viewer_sessions: Option<Sessions>,
    pub guesses: Arc<Guesses>,
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

    /// The request's operator session, if its cookie holds one that is
    /// signed by this server, has not ended and was not signed out.
    pub fn session(&self, headers: &HeaderMap, hub: &Hub) -> Option<Session> {
        session_cookie(headers)
            .and_then(|value| self.sessions.read(&value))
            .filter(|s| !hub.signed_out(&s.id))
    }

    /// The request's viewer session, if reading takes a token and its
    /// viewer cookie holds a live session.
    pub fn viewer_session(&self, headers: &HeaderMap, hub: &Hub) -> Option<Session> {
        let sessions = self.viewer_sessions.as_ref()?;
        cookie_value(headers, VIEWER_COOKIE)
            .and_then(|value| sessions.read(&value))
            .filter(|s| !hub.signed_out(&s.id))
    }

    /// The `Set-Cookie` value that starts an operator session in the
    /// browser, given its signed `value`: `HttpOnly` (no script reads it),
    /// `SameSite=Strict` (no other site's page sends it), whole site.
    pub fn session_set_cookie(&self, value: &str) -> String {
        self.cookie_of(SESSION_COOKIE, value, SameSite::Strict)
            .max_age(cookie::time::Duration::seconds(SESSION_TTL.as_secs() as i64))
            .to_string()
    }

    /// [`session_set_cookie`](Self::session_set_cookie) for a viewer
    /// session: `SameSite=Lax`, so a link from another site (a chat, a
    /// mail) opens the page signed in. It grants reading only, and reading
    /// changes nothing.
    pub fn viewer_set_cookie(&self, value: &str) -> String {
        self.cookie_of(VIEWER_COOKIE, value, SameSite::Lax)
            .max_age(cookie::time::Duration::seconds(SESSION_TTL.as_secs() as i64))
            .to_string()
    }

    /// The `Set-Cookie` values that remove both session cookies.
    pub fn clear_cookies(&self) -> [String; 2] {
        [
            (SESSION_COOKIE, SameSite::Strict),
            (VIEWER_COOKIE, SameSite::Lax),
        ]
        .map(|(name, same_site)| {
            self.cookie_of(name, "", same_site)
                .max_age(cookie::time::Duration::ZERO)
                .to_string()
        })
    }

    fn cookie_of(
        &self,
        name: &'static str,
        value: &str,
        same_site: SameSite,
    ) -> cookie::CookieBuilder<'static> {
        Cookie::build((name, value.to_owned()))
            .http_only(true)
            .same_site(same_site)
            .path("/")
            .secure(self.secure_cookie)
    }

    /// Reading (the page, the stream, the API's reads, `/metrics`): open
    /// when no viewer token is configured; else the viewer or operator
    /// token as a bearer token (another valid token is a 403), or a live
    /// viewer or operator session cookie.
    pub fn check_reader(&self, headers: &HeaderMap, hub: &Hub) -> Result<(), ApiError> {
        if self.viewer.is_none() {
            return Ok(());
        }
        if let Some(token) = bearer(headers) {
            return self
                .authorize(Role::Viewer, None, Some(token))
                .map_err(|e| match e {
                    Refusal::Unauthorized(_) => ApiError::Unauthorized("viewer"),
                    Refusal::Forbidden(why) => ApiError::Forbidden(why),
                });
        }
        if self.viewer_session(headers, hub).is_some() || self.session(headers, hub).is_some() {
            return Ok(());
        }
        Err(ApiError::Unauthorized("viewer"))
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
    pub fn check_operator(&self, headers: &HeaderMap, hub: &Hub) -> Result<(), ApiError> {
        if bearer(headers).is_none() && session_cookie(headers).is_some() {
            return match self.session(headers, hub) {
                Some(_) => Ok(()),
                None => Err(ApiError::SessionEnded),
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
        let operator = Token::new("op");
        let viewer = viewer.map(Token::new);
        Auth {
            ingest: Token::new("ingest"),
            sessions: Sessions::new(&operator),
            viewer_sessions: viewer.as_ref().map(Sessions::viewers),
            operator,
            viewer,
            devices: vec![(id("rack"), Token::new("rack-secret"))],
            guesses: Arc::default(),
            secure_cookie: false,
        }
    }

    fn with_cookie(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, cookie.parse().unwrap());
        headers
    }

    #[test]
    fn a_session_cookie_grants_the_operator_role_until_signed_out() {
        let (a, hub) = (auth(None), Hub::new(8, 8));
        let (session, value) = a.sessions.start();
        assert_eq!(session.id.len(), 43);
        assert_ne!(session, a.sessions.start().0, "ids are random");
        let headers = with_cookie(&format!("theme=dark; {SESSION_COOKIE}={value}; x=1"));
        assert_eq!(session_cookie(&headers), Some(value.clone()));
        assert_eq!(a.session(&headers, &hub), Some(session.clone()));
        assert!(a.check_operator(&headers, &hub).is_ok());
        // A bearer header wins over the cookie.
        let mut both = headers.clone();
        both.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(a.check_operator(&both, &hub).is_err());
        hub.sign_out(&session).unwrap();
        assert_eq!(a.session(&headers, &hub), None);
        assert!(matches!(
            a.check_operator(&headers, &hub),
            Err(ApiError::SessionEnded)
        ));
        assert_eq!(a.session(&HeaderMap::new(), &hub), None);
    }

    #[test]
    fn only_cookies_signed_with_the_same_operator_token_and_not_ended_count() {
        let (a, hub) = (auth(None), Hub::new(8, 8));
        let (session, value) = a.sessions.start();
        let read = |sessions: &Sessions, value: &str| {
            let headers = with_cookie(&format!("{SESSION_COOKIE}={value}"));
            session_cookie(&headers).and_then(|v| sessions.read(&v))
        };
        // Another instance, or the next start, with the same token.
        assert_eq!(read(&auth(None).sessions, &value), Some(session.clone()));
        assert_eq!(read(&Sessions::new(&Token::new("op2")), &value), None);
        // Made up, or changed: the end pushed later, the id swapped.
        assert_eq!(read(&a.sessions, "op"), None);
        assert_eq!(read(&a.sessions, &format!("{}.1", session.id)), None);
        let later = value.replace(&session.expires.to_string(), "99999999999");
        assert_eq!(read(&a.sessions, &later), None);
        // Ended.
        let ended = Session {
            id: session.id.clone(),
            expires: now() - 1,
        };
        assert_eq!(read(&a.sessions, &a.sessions.sign(&ended)), None);
        assert!(!hub.signed_out(&session.id));
    }

    #[test]
    fn an_address_past_its_wrong_tokens_waits_and_others_do_not() {
        let guesses = Guesses::default();
        let (one, other) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..GUESSES {
            assert_eq!(guesses.wait(one), None);
            guesses.wrong(one);
        }
        assert_eq!(guesses.wait(one), None, "the allowance is used, not passed");
        guesses.wrong(one);
        let wait = guesses.wait(one).expect("past it: wait");
        assert!(wait <= GUESS_EVERY, "{wait:?}");
        assert_eq!(guesses.wait(other), None);
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
        let set = a.viewer_set_cookie("abc");
        assert!(set.starts_with("telltale_viewer=abc; "), "{set}");
        for part in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=43200"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        for clear in a.clear_cookies() {
            assert!(clear.contains("Max-Age=0"), "{clear}");
        }
        a.secure_cookie = true;
        assert!(a.session_set_cookie("abc").contains("; Secure"));
    }

    fn unauthorized<T>(r: Result<T, Refusal>) -> bool {
        matches!(r, Err(Refusal::Unauthorized(_)))
    }

    fn forbidden<T>(r: Result<T, Refusal>) -> bool {
        matches!(r, Err(Refusal::Forbidden(_)))
    }

    #[test]
    fn a_token_matches_itself_only() {
        let token = Token::new("s3cret-token");
        assert!(token.matches("s3cret-token"));
        for other in [
            "",
            "s3cret",
            "s3cret-token ",
            "s3cret-tokem",
            "S3CRET-TOKEN",
        ] {
            assert!(!token.matches(other), "{other:?}");
        }
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
    fn a_viewer_token_closes_reading_over_http_to_all_but_tokens_and_sessions() {
        let hub = Hub::new(8, 8);
        let none = HeaderMap::new();
        assert!(auth(None).check_reader(&none, &hub).is_ok());
        let a = auth(Some("view"));
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            h
        };
        assert!(matches!(
            a.check_reader(&none, &hub),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(a.check_reader(&bearer("view"), &hub).is_ok());
        assert!(a.check_reader(&bearer("op"), &hub).is_ok());
        assert!(matches!(
            a.check_reader(&bearer("nope"), &hub),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.check_reader(&bearer("ingest"), &hub),
            Err(ApiError::Forbidden(_))
        ));

        let (session, viewer) = a.viewer_sessions.as_ref().unwrap().start();
        let (_, operator) = a.sessions.start();
        let viewing = with_cookie(&format!("{VIEWER_COOKIE}={viewer}"));
        assert!(a.check_reader(&viewing, &hub).is_ok());
        assert!(
            a.check_reader(&with_cookie(&format!("{SESSION_COOKIE}={operator}")), &hub)
                .is_ok()
        );
        // A viewer session is no operator session, under either name.
        assert!(a.check_operator(&viewing, &hub).is_err());
        let renamed = with_cookie(&format!("{SESSION_COOKIE}={viewer}"));
        assert_eq!(a.session(&renamed, &hub), None);
        // Nor is it one for another viewer token.
        let other = auth(Some("view2"));
        assert!(other.check_reader(&viewing, &hub).is_err());
        hub.sign_out(&session).unwrap();
        assert!(a.check_reader(&viewing, &hub).is_err(), "signed out");
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
