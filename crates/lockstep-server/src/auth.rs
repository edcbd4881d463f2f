//! Bearer tokens: generation, hashing, and the per-request role check.
//!
//! Secrets never touch the disk or the log: the store keeps SHA-256 hashes, and a presented
//! token is hashed and then compared against every known hash with a constant-time
//! comparison, so neither the lookup nor the comparison leaks how close a guess was.

use axum::http::{HeaderMap, header};
use lockstep_core::Role;
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: the actor recorded in events.
    pub name: String,
    /// The token's role.
    pub role: Role,
    /// SHA-256 of the presented secret: long-lived streams re-check it after every
    /// change of the token set and end once it is revoked.
    pub hash: [u8; 32],
}

/// A fresh random token: `lst_` and 64 hex digits (244 random bits from the OS).
pub fn generate_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("lst_{}{}", a.simple(), b.simple())
}

/// SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The in-memory set of valid tokens (hashes only), refreshed on every change.
#[derive(Default)]
pub struct TokenSet {
    entries: RwLock<Vec<([u8; 32], Principal)>>,
}

impl TokenSet {
    /// Replaces the whole set.
    pub fn replace(&self, entries: Vec<([u8; 32], Principal)>) {
        if let Ok(mut g) = self.entries.write() {
            *g = entries;
        }
    }

    /// Adds or replaces one token by name.
    pub fn insert(&self, hash: [u8; 32], principal: Principal) {
        if let Ok(mut g) = self.entries.write() {
            g.retain(|(_, p)| p.name != principal.name);
            g.push((hash, principal));
        }
    }

    /// Removes a token by name.
    pub fn remove(&self, name: &str) {
        if let Ok(mut g) = self.entries.write() {
            g.retain(|(_, p)| p.name != name);
        }
    }

    /// Whether a token with this hash is still valid.
    pub fn is_valid(&self, hash: &[u8; 32]) -> bool {
        let Ok(g) = self.entries.read() else {
            // Unknown state: treat as revoked, so a stream ends rather than outlives it.
            return false;
        };
        let mut found = false;
        for (h, _) in g.iter() {
            found |= bool::from(h.ct_eq(hash));
        }
        found
    }

    /// Finds the principal of a presented token, comparing every stored hash in constant time.
    pub fn lookup(&self, token: &str) -> Option<Principal> {
        let presented = hash_token(token);
        let g = self.entries.read().ok()?;
        let mut found: Option<&Principal> = None;
        for (hash, principal) in g.iter() {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(principal);
            }
        }
        found.cloned()
    }

    /// Checks the request's bearer token and that its role allows `required`.
    pub fn authorize(&self, headers: &HeaderMap, required: Role) -> Result<Principal, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let principal = self.lookup(token).ok_or(ApiError::Unauthorized)?;
        if principal.role.allows(required) {
            Ok(principal)
        } else {
            Err(ApiError::Forbidden(required.as_str()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("header"),
        );
        h
    }

    #[test]
    fn tokens_are_checked_by_hash_and_role() {
        let set = TokenSet::default();
        let t = generate_token();
        assert!(t.starts_with("lst_") && t.len() == 68);
        set.insert(
            hash_token(&t),
            Principal {
                name: "w".into(),
                role: Role::Worker,
                hash: hash_token(&t),
            },
        );
        assert!(set.is_valid(&hash_token(&t)));
        let ok = set.authorize(&headers(&format!("Bearer {t}")), Role::Worker);
        assert_eq!(ok.ok().map(|p| p.name), Some("w".to_string()));
        assert!(matches!(
            set.authorize(&headers(&format!("bearer {t}")), Role::Deployer),
            Err(ApiError::Forbidden("deployer"))
        ));
        assert!(matches!(
            set.authorize(&headers("Bearer nope"), Role::Worker),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            set.authorize(&HeaderMap::new(), Role::Worker),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            set.authorize(&headers(&format!("Basic {t}")), Role::Worker),
            Err(ApiError::Unauthorized)
        ));
        set.remove("w");
        assert!(set.lookup(&t).is_none());
        assert!(!set.is_valid(&hash_token(&t)));
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
        let p = state
            .service
            .projection()
            .tokens
            .authorize(&parts.headers, R::ROLE)?;
        Ok(Auth(p, std::marker::PhantomData))
    }
}
