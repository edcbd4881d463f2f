//! Authentication, pure: who the caller is (bearer token, `X-API-Key`, or a session
//! cookie whose value is a token), and whether that is enough for the route's level.
//!
//! Secrets are looked up by their SHA-256, so a lookup takes the same time whatever prefix
//! of a secret a caller guesses. The identity reaches the upstream in [`USER_HEADER`] and
//! [`LEVEL_HEADER`], which the proxy strips from every incoming request first: an upstream
//! behind the gateway can trust them.

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Header carrying the authenticated user to the upstream.
pub const USER_HEADER: &str = "x-lockstep-user";
/// Header carrying the caller's level to the upstream.
pub const LEVEL_HEADER: &str = "x-lockstep-auth-level";
/// Header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// What a route requires, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Anyone.
    #[default]
    Anonymous,
    /// Any known caller.
    Authenticated,
    /// Admins only.
    Admin,
}

impl Level {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Anonymous => "anonymous",
            Level::Authenticated => "authenticated",
            Level::Admin => "admin",
        }
    }
}

/// A known caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name passed upstream.
    pub user: String,
    /// Its level.
    pub level: Level,
}

/// The secrets the gateway knows.
#[derive(Debug, Clone, Default)]
pub struct AuthTable {
    tokens: HashMap<[u8; 32], Identity>,
    keys: HashMap<[u8; 32], Identity>,
    cookie: Option<String>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl AuthTable {
    /// An empty table reading the session from `cookie` when given.
    pub fn new(cookie: Option<String>) -> Self {
        AuthTable {
            cookie,
            ..Default::default()
        }
    }

    /// Adds a bearer token (also valid as a session cookie value).
    pub fn add_token(&mut self, token: &str, id: Identity) {
        self.tokens.insert(digest(token), id);
    }

    /// Adds an API key.
    pub fn add_key(&mut self, key: &str, id: Identity) {
        self.keys.insert(digest(key), id);
    }

    /// Who presented these headers: `Ok(None)` when nothing was presented,
    /// `Err(Invalid)` when something was and it is unknown.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Option<Identity>, Invalid> {
        if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            let token = v
                .to_str()
                .ok()
                .and_then(|s| {
                    s.strip_prefix("Bearer ")
                        .or_else(|| s.strip_prefix("bearer "))
                })
                .map(str::trim)
                .ok_or(Invalid)?;
            return self
                .tokens
                .get(&digest(token))
                .cloned()
                .map(Some)
                .ok_or(Invalid);
        }
        if let Some(v) = headers.get(API_KEY_HEADER) {
            let key = v.to_str().map_err(|_| Invalid)?.trim();
            return self
                .keys
                .get(&digest(key))
                .cloned()
                .map(Some)
                .ok_or(Invalid);
        }
        if let Some(name) = &self.cookie
            && let Some(value) = cookie_value(headers, name)
        {
            return self
                .tokens
                .get(&digest(&value))
                .cloned()
                .map(Some)
                .ok_or(Invalid);
        }
        Ok(None)
    }
}

/// A presented credential that matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// The value of cookie `name`, if the request carries it.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it, as this caller (or anonymously).
    Allow(Option<Identity>),
    /// 401 with `WWW-Authenticate`: no (valid) credential and the route needs one. `failed`
    /// is true when a credential was presented and was wrong (counts against the IP).
    Unauthorized {
        /// A wrong credential was presented.
        failed: bool,
    },
    /// 403: known, but not strong enough.
    Forbidden,
}

/// The decision for a route needing `required`, given what [`AuthTable::identify`] found.
/// A wrong credential on an anonymous route is served anonymously: a stale cookie must not
/// break public pages.
pub fn decide(required: Level, found: Result<Option<Identity>, Invalid>) -> Decision {
    match (required, found) {
        (Level::Anonymous, Ok(id)) => Decision::Allow(id),
        (Level::Anonymous, Err(Invalid)) => Decision::Allow(None),
        (_, Err(Invalid)) => Decision::Unauthorized { failed: true },
        (_, Ok(None)) => Decision::Unauthorized { failed: false },
        (req, Ok(Some(id))) if id.level >= req => Decision::Allow(Some(id)),
        (_, Ok(Some(_))) => Decision::Forbidden,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> AuthTable {
        let mut t = AuthTable::new(Some("session".into()));
        t.add_token(
            "tok-admin",
            Identity {
                user: "alice".into(),
                level: Level::Admin,
            },
        );
        t.add_token(
            "tok-user",
            Identity {
                user: "bob".into(),
                level: Level::Authenticated,
            },
        );
        t.add_key(
            "key-1",
            Identity {
                user: "svc-a".into(),
                level: Level::Authenticated,
            },
        );
        t
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn callers_are_identified_by_bearer_key_or_cookie() {
        let t = table();
        for (h, want) in [
            (
                vec![("authorization", "Bearer tok-admin")],
                Ok(Some("alice")),
            ),
            (vec![("x-api-key", "key-1")], Ok(Some("svc-a"))),
            (vec![("cookie", "a=b; session=tok-user")], Ok(Some("bob"))),
            (vec![("cookie", "other=tok-user")], Ok(None)),
            (vec![], Ok(None)),
            (vec![("authorization", "Bearer nope")], Err(Invalid)),
            (vec![("authorization", "Basic dXNlcg==")], Err(Invalid)),
            (vec![("x-api-key", "tok-admin")], Err(Invalid)),
            (vec![("cookie", "session=nope")], Err(Invalid)),
        ] {
            let got = t.identify(&headers(&h)).map(|o| o.map(|i| i.user));
            assert_eq!(got, want.map(|o| o.map(str::to_string)), "{h:?}");
        }
    }

    #[test]
    fn levels_decide_401_403_or_allow() {
        let id = |level| {
            Ok(Some(Identity {
                user: "u".into(),
                level,
            }))
        };
        use Decision::*;
        for (required, found, want) in [
            (Level::Anonymous, Ok(None), Allow(None)),
            (Level::Anonymous, Err(Invalid), Allow(None)),
            (
                Level::Authenticated,
                Ok(None),
                Unauthorized { failed: false },
            ),
            (
                Level::Authenticated,
                Err(Invalid),
                Unauthorized { failed: true },
            ),
            (Level::Admin, id(Level::Authenticated), Forbidden),
            (Level::Admin, Err(Invalid), Unauthorized { failed: true }),
        ] {
            assert_eq!(decide(required, found), want);
        }
        assert!(matches!(
            decide(Level::Admin, id(Level::Admin)),
            Allow(Some(_))
        ));
        assert!(matches!(
            decide(Level::Authenticated, id(Level::Admin)),
            Allow(Some(_))
        ));
    }
}
