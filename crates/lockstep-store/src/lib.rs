//! Where the registry keeps what it must not forget: releases and their revisions, the event
//! log, tokens (hashed) and the last known state of every instance.
//!
//! One [`Store`] trait, one module per backend, and one [`conformance`] suite that every
//! backend runs, so a backend is correct when the suite passes against it.
//!
//! **Invariant:** a write that returns `Ok` is durable; revisions are strictly increasing
//! across the whole registry; the registration rules of `lockstep_core` are evaluated inside
//! the same transaction that writes the new revision.

pub mod conformance;
mod error;
mod migrations;
pub mod sqlite;

pub use error::StoreError;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use lockstep_api::Event;
use lockstep_core::{Instance, Release, Role, StoredRelease};
use time::OffsetDateTime;

/// A registration to apply: the release plus who asked and why.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The release (its `actor` and `reason` are overwritten from the fields below).
    pub release: Release,
    /// Register even if it is a downgrade.
    pub force: bool,
    /// Token name.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
}

/// A rollback to apply.
#[derive(Debug, Clone)]
pub struct Rollback {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// Target version id; default: the previous release.
    pub to: Option<String>,
    /// Roll back even from a release that is not rollback-safe.
    pub force: bool,
    /// Token name.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
    /// Extra event data (e.g. `{"now": true}`).
    pub data: serde_json::Value,
}

/// The outcome of a registration or rollback.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The expected release after the call.
    pub release: StoredRelease,
    /// Whether a new revision was written (false: the release was already expected).
    pub changed: bool,
    /// The event written with it, when `changed`.
    pub event: Option<Event>,
}

/// An event to append.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    /// What happened.
    pub kind: String,
    /// Environment concerned.
    pub env: Option<String>,
    /// Service concerned.
    pub service: Option<String>,
    /// Token name.
    pub actor: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Details.
    pub data: serde_json::Value,
}

/// A stored token: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// Unique name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

/// The registry's storage. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers a release and makes it expected (rules: `lockstep_core::decide_registration`).
    async fn register(&self, reg: Registration) -> Result<Registered, StoreError>;
    /// Makes an earlier release expected again (rules: `lockstep_core::rollback_target`).
    async fn rollback(&self, rb: Rollback) -> Result<Registered, StoreError>;
    /// The expected release of one service.
    async fn expected(&self, env: &str, service: &str)
    -> Result<Option<StoredRelease>, StoreError>;
    /// Every expected release (to warm the server's cache).
    async fn all_expected(&self) -> Result<Vec<StoredRelease>, StoreError>;
    /// A service's history, newest first.
    async fn history(
        &self,
        env: &str,
        service: &str,
        limit: u32,
    ) -> Result<Vec<StoredRelease>, StoreError>;
    /// Every change with `revision > since`, oldest first, at most `limit`.
    async fn changes_since(&self, since: i64, limit: u32)
    -> Result<Vec<StoredRelease>, StoreError>;
    /// Appends an event.
    async fn append_event(&self, ev: NewEvent) -> Result<Event, StoreError> {
        let mut v = self.append_events(vec![ev]).await?;
        v.pop()
            .ok_or_else(|| StoreError::Corrupt("no event written".into()))
    }
    /// Appends several events in one transaction, in order.
    async fn append_events(&self, evs: Vec<NewEvent>) -> Result<Vec<Event>, StoreError>;
    /// Events with `id > since`, oldest first, at most `limit`.
    async fn events_since(&self, since: i64, limit: u32) -> Result<Vec<Event>, StoreError>;
    /// Creates a token; `Conflict` when the name is taken.
    async fn create_token(&self, token: StoredToken) -> Result<(), StoreError>;
    /// Creates or replaces a token (the bootstrap admin token).
    async fn upsert_token(&self, token: StoredToken) -> Result<(), StoreError>;
    /// Every active token.
    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError>;
    /// Revokes a token by name; false when there was none.
    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError>;
    /// Upserts the state of instances (the heartbeat flush).
    async fn save_instances(&self, instances: &[Instance]) -> Result<(), StoreError>;
    /// Forgets instances.
    async fn delete_instances(&self, ids: &[String]) -> Result<(), StoreError>;
    /// Every known instance.
    async fn load_instances(&self) -> Result<Vec<Instance>, StoreError>;
    /// Cheap round-trip for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The event written with a registration or rollback: kind, the new and previous version
/// ids, and the caller's extra data.
pub(crate) fn registration_event(
    stored: &StoredRelease,
    previous: Option<&StoredRelease>,
    extra: serde_json::Value,
) -> NewEvent {
    let kind = match stored.kind {
        lockstep_core::RegistrationKind::Register => "release_registered",
        lockstep_core::RegistrationKind::Rollback => "release_rolled_back",
    };
    let mut data = serde_json::json!({
        "version_id": stored.release.version_id,
        "version": stored.release.version,
        "revision": stored.revision,
        "previous_version_id": previous.map(|p| p.release.version_id.clone()),
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
        obj.extend(extra);
    }
    NewEvent {
        kind: kind.to_string(),
        env: Some(stored.env.clone()),
        service: Some(stored.service.clone()),
        actor: stored.release.actor.clone(),
        reason: stored.release.reason.clone(),
        data,
    }
}
