//! Tokens as the service knows them: generation, hashing, and the in-memory set of valid
//! tokens (hashes only) that the projection keeps. The HTTP side (`auth.rs`) parses headers
//! and cookies and asks this set who the caller is; it never works the other way round.
//!
//! Secrets never touch the disk or the log: the store keeps SHA-256 hashes.

use lockstep_core::Role;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;

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
///
/// Lookup is one hash-map probe keyed by the SHA-256 of the presented secret, so its cost
/// does not grow with the number of tokens (a fleet that gives every node its own token
/// pays nothing per request for it). Why a map lookup leaks nothing a timing attack can
/// use, where comparing the secrets themselves would: the key is a digest, and the caller
/// controls only the digest's preimage. Whatever the probe's timing says about how close
/// the *digest* of a guess came to a stored digest (the bucket it fell in, a shared
/// prefix), it says nothing about the secret behind the stored digest — a secret of 244
/// random bits cannot be approached byte by byte through SHA-256, and the map's hasher is
/// keyed at random per process besides.
#[derive(Default)]
pub struct TokenSet {
    by_hash: RwLock<HashMap<[u8; 32], Principal>>,
}

impl TokenSet {
    /// Replaces the whole set.
    pub fn replace(&self, entries: Vec<([u8; 32], Principal)>) {
        if let Ok(mut g) = self.by_hash.write() {
            *g = entries.into_iter().collect();
        }
    }

    /// Adds or replaces one token by name.
    pub fn insert(&self, hash: [u8; 32], principal: Principal) {
        if let Ok(mut g) = self.by_hash.write() {
            g.retain(|_, p| p.name != principal.name);
            g.insert(hash, principal);
        }
    }

    /// Removes a token by name.
    pub fn remove(&self, name: &str) {
        if let Ok(mut g) = self.by_hash.write() {
            g.retain(|_, p| p.name != name);
        }
    }

    /// How many tokens are valid.
    pub fn len(&self) -> usize {
        self.by_hash.read().map(|g| g.len()).unwrap_or(0)
    }

    /// Whether no token is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a token with this hash is still valid. An unknown state (a poisoned lock)
    /// reads as revoked, so a stream ends rather than outlives its token.
    pub fn is_valid(&self, hash: &[u8; 32]) -> bool {
        self.by_hash
            .read()
            .map(|g| g.contains_key(hash))
            .unwrap_or(false)
    }

    /// The principal of a presented secret, if it is valid.
    pub fn lookup(&self, token: &str) -> Option<Principal> {
        self.lookup_hash(&hash_token(token))
    }

    /// The principal of a token by the SHA-256 of its secret.
    pub fn lookup_hash(&self, hash: &[u8; 32]) -> Option<Principal> {
        self.by_hash.read().ok()?.get(hash).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, t: &str) -> Principal {
        Principal {
            name: name.into(),
            role: Role::Worker,
            hash: hash_token(t),
        }
    }

    #[test]
    fn tokens_are_found_by_the_hash_of_their_secret_and_gone_once_removed() {
        let set = TokenSet::default();
        let t = generate_token();
        assert!(t.starts_with("lst_") && t.len() == 68);
        set.insert(hash_token(&t), principal("w", &t));
        assert!(set.is_valid(&hash_token(&t)));
        assert_eq!(set.lookup(&t).map(|p| p.name), Some("w".to_string()));
        assert!(set.lookup("nope").is_none());
        set.remove("w");
        assert!(set.lookup(&t).is_none());
        assert!(!set.is_valid(&hash_token(&t)));
    }

    #[test]
    fn inserting_a_name_again_replaces_its_old_secret() {
        let set = TokenSet::default();
        let (a, b) = (generate_token(), generate_token());
        set.insert(hash_token(&a), principal("n", &a));
        set.insert(hash_token(&b), principal("n", &b));
        assert!(set.lookup(&a).is_none(), "the old secret must stop working");
        assert_eq!(set.lookup(&b).map(|p| p.name), Some("n".to_string()));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn lookup_stays_correct_with_ten_thousand_tokens() {
        let set = TokenSet::default();
        let tokens: Vec<String> = (0..10_000).map(|_| generate_token()).collect();
        set.replace(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (hash_token(t), principal(&format!("node-{i}"), t)))
                .collect(),
        );
        assert_eq!(set.len(), 10_000);
        assert_eq!(
            set.lookup(&tokens[4242]).map(|p| p.name),
            Some("node-4242".to_string())
        );
    }
}
