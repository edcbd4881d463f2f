//! Who is calling, for the HTTP side: the bearer token (or, for the dashboard in a
//! browser, the session cookie), checked against the service's token set before any
//! handler reads the body, and the role the endpoint requires.
//!
//! The token set and hashing live in `service::tokens`; this module only parses headers
//! and cookies, so the dependency points one way (HTTP → service).

use axum::http::{HeaderMap, Method, header};
use lockstep_core::Role;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
pub use crate::service::tokens::{Principal, TokenSet};

/// Name of the dashboard's session cookie; its value is the token itself, so any replica
/// can check it and revoking the token ends the session.
pub const SESSION_COOKIE: &str = "lockstep_session";

/// Header that must carry [`csrf_token`] on a state-changing request authenticated by the
/// session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The CSRF token that goes with a session: derived from the secret (hex, 32 characters),
/// so it needs no server-side state; a page from another origin can neither read the
/// cookie nor compute this.
pub fn csrf_token(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"lockstep-csrf\0");
    h.update(token.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
}

/// The value of cookie `name`, if the request carries it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Checks the request's credentials and that their role allows `required`: the bearer
/// token first; without one, the session cookie — and then, for any method that changes
/// state, the CSRF header too (a browser sends the cookie along with a forged request;
/// SameSite=Strict stops that, this is the second line).
pub fn authorize(
    tokens: &TokenSet,
    method: &Method,
    headers: &HeaderMap,
    required: Role,
) -> Result<Principal, ApiError> {
    let principal = if let Some(token) = bearer(headers) {
        tokens.lookup(token).ok_or(ApiError::Unauthorized)?
    } else if let Some(token) = cookie(headers, SESSION_COOKIE) {
        let p = tokens.lookup(token).ok_or(ApiError::Unauthorized)?;
        if method != Method::GET && method != Method::HEAD {
            let expected = csrf_token(token);
            let presented = headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(presented.ct_eq(expected.as_bytes())) {
                return Err(ApiError::Csrf);
            }
        }
        p
    } else {
        return Err(ApiError::Unauthorized);
    };
    if principal.role.allows(required) {
        Ok(principal)
    } else {
        Err(ApiError::Forbidden(required.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tokens::{generate_token, hash_token};
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("header"),
            );
        }
        h
    }

    fn set_with(t: &str, role: Role) -> TokenSet {
        let set = TokenSet::default();
        set.insert(
            hash_token(t),
            Principal {
                name: "w".into(),
                role,
                hash: hash_token(t),
            },
        );
        set
    }

    #[test]
    fn bearer_tokens_are_checked_by_hash_and_role() {
        let t = generate_token();
        let set = set_with(&t, Role::Worker);
        let get = Method::GET;
        let ok = authorize(
            &set,
            &get,
            &headers(&[("authorization", &format!("Bearer {t}"))]),
            Role::Worker,
        );
        assert_eq!(ok.ok().map(|p| p.name), Some("w".to_string()));
        assert!(matches!(
            authorize(
                &set,
                &get,
                &headers(&[("authorization", &format!("bearer {t}"))]),
                Role::Deployer
            ),
            Err(ApiError::Forbidden("deployer"))
        ));
        for bad in [
            headers(&[("authorization", "Bearer nope")]),
            HeaderMap::new(),
            headers(&[("authorization", &format!("Basic {t}"))]),
        ] {
            assert!(matches!(
                authorize(&set, &get, &bad, Role::Worker),
                Err(ApiError::Unauthorized)
            ));
        }
    }

    #[test]
    fn a_session_cookie_reads_but_writes_only_with_the_csrf_header() {
        let t = generate_token();
        let set = set_with(&t, Role::Operator);
        let cookie = format!("theme=dark; {SESSION_COOKIE}={t}");
        let read = authorize(
            &set,
            &Method::GET,
            &headers(&[("cookie", &cookie)]),
            Role::Viewer,
        );
        assert!(read.is_ok());
        assert!(matches!(
            authorize(
                &set,
                &Method::POST,
                &headers(&[("cookie", &cookie)]),
                Role::Operator
            ),
            Err(ApiError::Csrf)
        ));
        assert!(matches!(
            authorize(
                &set,
                &Method::POST,
                &headers(&[
                    ("cookie", &cookie),
                    (CSRF_HEADER, "0123456789abcdef0123456789abcdef")
                ]),
                Role::Operator
            ),
            Err(ApiError::Csrf)
        ));
        let ok = authorize(
            &set,
            &Method::POST,
            &headers(&[("cookie", &cookie), (CSRF_HEADER, &csrf_token(&t))]),
            Role::Operator,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn a_bearer_token_needs_no_csrf_header_even_when_a_cookie_is_present() {
        let t = generate_token();
        let set = set_with(&t, Role::Operator);
        let h = headers(&[
            ("authorization", &format!("Bearer {t}")),
            ("cookie", &format!("{SESSION_COOKIE}=garbage")),
        ]);
        assert!(authorize(&set, &Method::POST, &h, Role::Operator).is_ok());
    }
}

/// A role requirement known at compile time, for the [`Auth`] extractor.
pub trait Requirement {
    /// The role the endpoint requires.
    const ROLE: Role;
}

macro_rules! requirement {
    ($name:ident, $role:expr) => {
        #[doc = concat!("Requires the `", stringify!($name), "` role or stronger.")]
        pub struct $name;
        impl Requirement for $name {
            const ROLE: Role = $role;
        }
    };
}
requirement!(Worker, Role::Worker);
requirement!(Viewer, Role::Viewer);
requirement!(Operator, Role::Operator);
requirement!(Deployer, Role::Deployer);
requirement!(Admin, Role::Admin);

/// The caller, authenticated and authorised for `R` before any other extractor reads the
/// body: an unauthenticated request gets 401 whatever it sends.
pub struct Auth<R>(pub Principal, pub std::marker::PhantomData<R>);

impl<R: Requirement> axum::extract::FromRequestParts<std::sync::Arc<crate::state::AppState>>
    for Auth<R>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &std::sync::Arc<crate::state::AppState>,
    ) -> Result<Self, Self::Rejection> {
        let p = authorize(
            &state.service.projection().tokens,
            &parts.method,
            &parts.headers,
            R::ROLE,
        )?;
        Ok(Auth(p, std::marker::PhantomData))
    }
}
