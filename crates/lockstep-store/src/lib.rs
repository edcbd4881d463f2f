//! Where the registry keeps what it must not forget: releases and their revisions, the event
//! log, tokens (hashed) and the last known state of every instance.
//!
//! One [`Store`] trait, one module per backend, and one [`conformance`] suite that every
//! backend runs, so a backend is correct when the suite passes against it.
//!
//! **Invariant:** a write that returns `Ok` is durable; revisions are strictly increasing
//! across the whole registry; the registration rules of `lockstep_core` are evaluated inside
//! the same transaction that writes the new revision.

pub mod alerts;
pub mod conformance;
mod error;
pub mod lock;
mod migrations;
pub mod postgres;
pub mod rollouts;
pub mod sqlite;

pub use alerts::{
    AlertFilter, AlertWrite, Delivery, DeliveryOutcome, DeliveryStatus, NewNotification,
    Notification,
};
pub use error::StoreError;
pub use lock::{DataDirLock, LockError};
pub use postgres::PgStore;
pub use rollouts::{LatestRolloutNode, NewRollout, NewRolloutNode, Rollout, RolloutNode};
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use lockstep_api::{Alert, ChannelConfig, Event};
use lockstep_core::{Instance, Release, Role, StoredRelease, short_id};
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

/// One change of an instance row, as the instance feed reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceChange {
    /// Position in the instance feed (strictly increasing per write).
    pub seq: i64,
    /// The instance id.
    pub instance_id: String,
    /// The instance as stored, or `None` when it was deregistered or forgotten.
    pub instance: Option<Instance>,
}

/// The holder of a lease after an acquire or renew attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it now (may be someone else).
    pub holder: String,
    /// Until when (store clock).
    pub expires_at: OffsetDateTime,
    /// Whether the caller holds it after the call.
    pub held: bool,
}

/// Name of the lease that elects the leader of background work.
pub const LEADER_LEASE: &str = "leader";

/// The registry's storage: the source of truth that every replica's memory is projected
/// from. Every method is one transaction.
///
/// **Ordering:** revisions (`changes_since`) and event ids (`events_since`) commit in
/// increasing order, on every backend, so once N is visible every change below N is
/// visible too and "everything after N" is complete. Instance rows carry a feed sequence
/// (`instances_since`) for the same purpose.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A wake-up signal that changes after commits of this or any other handle on the same
    /// database (releases, events, tokens). It carries no data: readers catch up by
    /// sequence, so a lost or coalesced wake-up costs latency, never a change.
    fn feed(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Which backend this is (`sqlite`, `postgres`), for logs and `/healthz`.
    fn backend(&self) -> &'static str;

    /// Registers a release and makes it expected (rules: `lockstep_core::decide_registration`).
    async fn register(&self, reg: Registration) -> Result<Registered, StoreError>;
    /// Makes an earlier release expected again (rules: `lockstep_core::rollback_target`).
    async fn rollback(&self, rb: Rollback) -> Result<Registered, StoreError>;
    /// The expected release of one service.
    async fn expected(&self, env: &str, service: &str)
    -> Result<Option<StoredRelease>, StoreError>;
    /// Every expected release (to warm a projection).
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
    /// The highest revision committed (0 when none).
    async fn last_revision(&self) -> Result<i64, StoreError>;

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
    /// The highest event id committed (0 when none).
    async fn last_event_id(&self) -> Result<i64, StoreError>;

    /// Creates a token and logs `token_created` (actor `actor`) in the same transaction;
    /// `Conflict` when the name is taken.
    async fn create_token(&self, token: StoredToken, actor: &str) -> Result<Event, StoreError>;
    /// Creates or replaces a token (the bootstrap admin token). Logs `token_bootstrapped`
    /// and returns that event only when something changed. A secret that was revoked
    /// stays revoked: `Revoked`, and nothing changes.
    async fn upsert_token(&self, token: StoredToken) -> Result<Option<Event>, StoreError>;
    /// Every active token.
    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError>;
    /// Revokes a token by name and logs `token_revoked`; `None` when there was none;
    /// `LastAdmin` (and nothing changes) when it is the only admin token left. Its secret
    /// is remembered as revoked, so setting it again as the bootstrap token does not
    /// bring it back.
    async fn revoke_token(&self, name: &str, actor: &str) -> Result<Option<Event>, StoreError>;

    /// Upserts the soft state of instances (the heartbeat flush). A row is only replaced
    /// by a newer `last_seen` (replicas flush independently), and never resurrected by a
    /// heartbeat older than its deregistration. A newer `last_seen` clears the
    /// missing-reported mark. Returns the instance-feed positions the call reserved
    /// (first, last), so the writer's own projection can skip reading back what it wrote.
    async fn save_instances(
        &self,
        instances: &[Instance],
    ) -> Result<Option<(i64, i64)>, StoreError>;
    /// Deregisters an instance and logs `instance_deregistered` (actor `actor`) in the
    /// same transaction; `None` when it was not registered.
    async fn deregister_instance(
        &self,
        instance_id: &str,
        actor: &str,
    ) -> Result<Option<(Instance, Event)>, StoreError>;
    /// Instance rows changed with `seq > since`, oldest first, at most `limit`.
    async fn instances_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<InstanceChange>, StoreError>;
    /// Marks every live instance last seen before `cutoff` and not yet reported as
    /// missing, logging one `instance_missing` event each, in one transaction — only while
    /// `holder` holds the [`LEADER_LEASE`] (else `NotLeader`), so it happens exactly once
    /// whatever the number of replicas.
    async fn mark_missing(
        &self,
        holder: &str,
        cutoff: OffsetDateTime,
    ) -> Result<Vec<Event>, StoreError>;
    /// Forgets instances last seen before `cutoff` (they become tombstones in the feed)
    /// and drops tombstones older than `purge_before`; leader only, like `mark_missing`.
    /// Returns the ids forgotten.
    async fn expire_instances(
        &self,
        holder: &str,
        cutoff: OffsetDateTime,
        purge_before: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError>;

    /// Takes or renews lease `name` for `holder` for `ttl` when it is free, expired or
    /// already held by `holder`; answers who holds it afterwards. Times are the store's.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease, StoreError>;
    /// Gives a lease up (clean shutdown) so another replica can take it at once.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Applies the drift detector's alert writes in one transaction — only while `holder`
    /// holds the [`LEADER_LEASE`] (else `NotLeader`) — and logs one event per changed
    /// alert in it (`alert_opened`, `alert_escalated`, `alert_resolved`, data = the alert).
    /// At most one alert per (instance, condition) is open, whatever races.
    async fn apply_alerts(
        &self,
        holder: &str,
        writes: Vec<AlertWrite>,
    ) -> Result<Vec<(Alert, Event)>, StoreError>;
    /// Alerts, newest first.
    async fn alerts(&self, filter: AlertFilter) -> Result<Vec<Alert>, StoreError>;
    /// Acknowledges an alert and logs `alert_acknowledged` (actor, reason); `None` when
    /// there is no such alert; no event when it was acknowledged already.
    async fn ack_alert(
        &self,
        id: i64,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Option<(Alert, Option<Event>)>, StoreError>;
    /// The events of one alert, oldest first.
    async fn alert_history(&self, id: i64) -> Result<Vec<Event>, StoreError>;
    /// The alert channels, secrets included (callers mask them).
    async fn alert_channels(&self) -> Result<Vec<ChannelConfig>, StoreError>;
    /// Replaces the alert channels and logs `alert_channels_changed` (names only).
    async fn put_alert_channels(
        &self,
        channels: Vec<ChannelConfig>,
        actor: &str,
    ) -> Result<Event, StoreError>;
    /// The event id up to which alert events have been turned into notifications.
    async fn notify_cursor(&self) -> Result<i64, StoreError>;
    /// Queues notifications and moves the cursor from `from` to `to` in one transaction,
    /// leader only; `false` (nothing written) when the cursor is not at `from`.
    async fn enqueue_notifications(
        &self,
        holder: &str,
        from: i64,
        to: i64,
        items: Vec<NewNotification>,
    ) -> Result<bool, StoreError>;
    /// Notifications not yet assigned to a delivery, oldest first.
    async fn pending_notifications(&self) -> Result<Vec<Notification>, StoreError>;
    /// Creates a pending delivery carrying notifications `ids` (all of `channel`), leader
    /// only; `None` when one of them already belongs to a delivery.
    async fn create_delivery(
        &self,
        holder: &str,
        channel: &str,
        kind: &str,
        body: &str,
        ids: &[i64],
    ) -> Result<Option<Delivery>, StoreError>;
    /// Pending deliveries whose next attempt is due at `now`.
    async fn due_deliveries(&self, now: OffsetDateTime) -> Result<Vec<Delivery>, StoreError>;
    /// Records one attempt of a pending delivery, leader only; `false` when it was not
    /// pending.
    async fn record_delivery(
        &self,
        holder: &str,
        id: i64,
        outcome: DeliveryOutcome,
    ) -> Result<bool, StoreError>;
    /// The delivery log, newest first.
    async fn deliveries(&self, limit: u32) -> Result<Vec<Delivery>, StoreError>;
    /// When each channel's last delivery was created (its rate-limit window).
    async fn last_deliveries(&self) -> Result<Vec<(String, OffsetDateTime)>, StoreError>;

    /// Creates a rollout with its nodes and its package in one transaction; `Conflict`
    /// when a rollout of the same (env, service) is running.
    async fn create_rollout(&self, rollout: NewRollout) -> Result<Rollout, StoreError>;
    /// One rollout.
    async fn rollout(&self, id: i64) -> Result<Option<Rollout>, StoreError>;
    /// Rollouts, newest first (`running_only`: those not finished).
    async fn rollouts(&self, running_only: bool, limit: u32) -> Result<Vec<Rollout>, StoreError>;
    /// A rollout's nodes in rollout order.
    async fn rollout_nodes(&self, id: i64) -> Result<Vec<RolloutNode>, StoreError>;
    /// The nodes of the latest rollout of every (env, service) — the running one (a
    /// retried older rollout included), else the newest — in rollout order, in one read
    /// (what `/v1/status` shows beside each instance).
    async fn latest_rollout_nodes(&self) -> Result<Vec<LatestRolloutNode>, StoreError>;
    /// A rollout's package and signature.
    async fn rollout_package(
        &self,
        id: i64,
    ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, StoreError>;
    /// Records a node's step (`attempt`: one more update attempt) and appends `events`, in
    /// one transaction — only while `holder` holds the [`LEADER_LEASE`] (else `NotLeader`).
    async fn set_rollout_step(
        &self,
        holder: &str,
        id: i64,
        idx: i64,
        step: serde_json::Value,
        attempt: bool,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>, StoreError>;
    /// Moves a rollout to `phase` (`running: false` finishes it; `clear_request`: the
    /// pending request was acted on) and appends `events`; leader only.
    async fn set_rollout_phase(
        &self,
        holder: &str,
        id: i64,
        phase: &str,
        running: bool,
        clear_request: bool,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>, StoreError>;
    /// Records a person's request (`abort`, `emergency`) on a running rollout for the
    /// coordinator to act on; false when it is not running.
    async fn request_rollout(&self, id: i64, request: &str) -> Result<bool, StoreError>;
    /// Runs a finished rollout again from `phase` with the given node steps (the others
    /// keep theirs) and `request` pending (a retry: none; `rollback --now` after the
    /// rollout completed: the emergency rollback); false when there is no such rollout,
    /// `Conflict` when another rollout of the service runs.
    async fn restart_rollout(
        &self,
        id: i64,
        phase: &str,
        request: Option<&str>,
        steps: Vec<(i64, serde_json::Value)>,
    ) -> Result<bool, StoreError>;

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

/// The event logged with a token change.
pub(crate) fn token_event(kind: &str, name: &str, role: Role, actor: &str) -> NewEvent {
    NewEvent {
        kind: kind.into(),
        actor: Some(actor.into()),
        data: serde_json::json!({ "name": name, "role": role }),
        ..NewEvent::default()
    }
}

/// The event logged when an instance deregisters.
pub(crate) fn deregistered_event(i: &Instance, actor: &str) -> NewEvent {
    NewEvent {
        kind: "instance_deregistered".into(),
        env: Some(i.env.clone()),
        service: Some(i.service.clone()),
        actor: Some(actor.into()),
        reason: None,
        data: serde_json::json!({ "instance_id": i.instance_id, "version": short_id(&i.version_id) }),
    }
}

/// The event logged when an instance stops heartbeating.
pub(crate) fn missing_event(i: &Instance) -> NewEvent {
    NewEvent {
        kind: "instance_missing".into(),
        env: Some(i.env.clone()),
        service: Some(i.service.clone()),
        actor: None,
        reason: None,
        data: serde_json::json!({
            "instance_id": i.instance_id,
            "version": short_id(&i.version_id),
            "last_seen": i.last_seen
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        }),
    }
}

/// The event logged when the alert channels change: names and types, never secrets.
pub(crate) fn channels_event(channels: &[ChannelConfig], actor: &str) -> NewEvent {
    NewEvent {
        kind: "alert_channels_changed".into(),
        actor: Some(actor.into()),
        data: serde_json::json!({
            "channels": channels.iter().map(|c| serde_json::json!({"name": c.name, "type": c.kind})).collect::<Vec<_>>(),
        }),
        ..NewEvent::default()
    }
}

/// Milliseconds since the epoch: how instance times are compared inside the store.
pub fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Opens the store a URL names: `postgres://…` / `postgresql://…` for PostgreSQL,
/// `sqlite:///path/to/dir` (or a plain directory path) for the embedded store.
pub async fn open_url(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(std::sync::Arc::new(PgStore::connect(url).await?));
    }
    let dir = match url.strip_prefix("sqlite://") {
        Some(rest) => rest,
        None if url.contains("://") => {
            return Err(StoreError::Open {
                path: url.into(),
                message: "unsupported store URL: use postgres://… or sqlite:///path".into(),
            });
        }
        None => url,
    };
    Ok(std::sync::Arc::new(
        SqliteStore::open(std::path::Path::new(dir)).await?,
    ))
}
