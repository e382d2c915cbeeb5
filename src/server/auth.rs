//! Tokens and roles, for HTTP and the WebSocket alike.
//!
//! - ingest token: `POST /api/devices/{id}/status` for any id, and the
//!   `device` role on the WebSocket for any id (it can push any id already);
//! - operator token: commands (HTTP and WebSocket), and reading;
//! - viewer token: reading over the WebSocket; when none is configured,
//!   reading is open to anyone, as the SSE stream and the page are;
//! - device tokens: the `device` role for the one id each is bound to.
//!
//! Every comparison runs in constant time, and a token is compared with every
//! configured token, so timing tells nothing about which one nearly matched.

use super::error::ApiError;
use crate::model::DeviceId;
use crate::protocol::Role;
use axum::http::{HeaderMap, header};
use std::sync::Arc;
use subtle::ConstantTimeEq;

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

/// Every configured token.
pub struct Auth {
    pub ingest: Token,
    pub operator: Token,
    pub viewer: Option<Token>,
    pub devices: Vec<(DeviceId, Token)>,
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

    /// HTTP commands: the operator token; another valid token is a 403.
    pub fn check_operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
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
        }
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
