//! The registry's wire: every request and response body of the v1 HTTP API, the error body
//! and the header names. Shared by the server, the client library, the CLI and the gateway so
//! that a field renamed in one place is renamed everywhere.

mod dashboard;
pub use dashboard::{
    DashboardReport, Deploy, InstancePage, LoginAnswer, LoginRequest, ServiceCounts,
};

use lockstep_core::{Instance, Release, Role, Status, StatusCounts, StoredRelease};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Request bodies above this size are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Header a reconnecting SSE client sends with the last id it saw.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// Error codes used in [`ErrorBody::error`].
pub mod codes {
    /// Malformed JSON, a missing field or a bad name.
    pub const BAD_REQUEST: &str = "bad_request";
    /// No or unknown bearer token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The token's role does not allow the call.
    pub const FORBIDDEN: &str = "forbidden";
    /// 403: a cookie-authenticated request without its CSRF header.
    pub const CSRF: &str = "csrf";
    /// No release registered for the service.
    pub const NO_RELEASE: &str = "no_release";
    /// Something else that does not exist.
    pub const NOT_FOUND: &str = "not_found";
    /// A registration older than the expected release.
    pub const DOWNGRADE: &str = "downgrade";
    /// A rollback away from a release that is not rollback-safe.
    pub const NOT_ROLLBACK_SAFE: &str = "not_rollback_safe";
    /// Nothing to roll back to.
    pub const NO_PREVIOUS_RELEASE: &str = "no_previous_release";
    /// A conflicting name (e.g. a token name already in use).
    pub const CONFLICT: &str = "conflict";
    /// Revoking the token would leave no admin.
    pub const LAST_ADMIN: &str = "last_admin";
    /// The body exceeds [`super::MAX_BODY_BYTES`].
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// The body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// The store failed; details are in the server log only.
    pub const INTERNAL: &str = "internal";
    /// The registry cannot serve now; reveals nothing else.
    pub const SERVICE_UNAVAILABLE: &str = "service_unavailable";
}

/// Every error answer: `{"error": "<code>", "message": "<human text>"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, see [`codes`].
    pub error: String,
    /// What went wrong and, where possible, what to do about it.
    pub message: String,
}

/// Body of `PUT /v1/envs/{env}/services/{svc}/release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PutRelease {
    /// The release; only `version_id` is required.
    #[serde(flatten)]
    pub release: Release,
    /// Register even when the release is older than the expected one.
    #[serde(default)]
    pub force: bool,
}

/// Body of `POST /v1/envs/{env}/services/{svc}/rollback` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackRequest {
    /// The release to make expected; default: the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub version_id: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Roll back even from a release marked `rollback_safe: false`.
    #[serde(default)]
    pub force: bool,
    /// Skip canary and analysis (the emergency path); recorded in the event. Also stops a
    /// running rollout of the service, or — after its latest rollout completed, while that
    /// rollout's release is still expected — tells every node it updated to roll back, all
    /// at once.
    #[serde(default)]
    pub now: bool,
    /// With `now`: at most this many nodes rolling back at once (default: all); ignored
    /// without `now`.
    #[serde(
        default,
        deserialize_with = "integral_u32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 100000)]
    pub concurrency: Option<u32>,
}

fn default_env() -> String {
    lockstep_core::DEFAULT_ENV.to_string()
}

/// Body of `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    /// Stable id of the process: 1-128 characters, no whitespace, control characters or `/`.
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000/]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub instance_id: String,
    /// Environment (default `production`).
    #[serde(default = "default_env")]
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64,
        default = "production"
    )]
    pub env: String,
    /// Service.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: String,
    /// The release it runs: 1-128 characters, no whitespace or control characters.
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub version_id: String,
    /// Baked commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    /// Build date.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub build_date: Option<OffsetDateTime>,
    /// Component versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, String>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Process id.
    #[serde(
        default,
        deserialize_with = "integral_u32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(format = Int64, maximum = 4294967295_u64)]
    pub pid: Option<u32>,
    /// Process start time.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub started_at: Option<OffsetDateTime>,
    /// URL where the gateway and the agent reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Self-reported health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// Reads an optional whole number up to `max` written as an integer or as an integral
/// float (`42.0`): JSON and JSON Schema make no difference between the two, so a client
/// validating against the OpenAPI description may send either.
fn integral<'de, D: serde::Deserializer<'de>>(d: D, max: u64) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=max as f64).contains(f))
                .map(|f| f as u64)
        })
        .filter(|u| *u <= max)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("expected an integer from 0 to {max}, got {n}"))
        })
}

/// [`integral`] for a `u32` (a process id).
fn integral_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(integral(d, u64::from(u32::MAX))?.map(|u| u as u32))
}

/// [`integral`] for a `u16` (a port).
fn integral_u16<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    Ok(integral(d, u64::from(u16::MAX))?.map(|u| u as u16))
}

/// Answer to a heartbeat: one round-trip tells the instance whether it is current.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatAnswer {
    /// `current`, `draining`, `stale` or `unknown`.
    pub status: Status,
    /// The expected release, or null when none is registered.
    pub expected: Option<StoredRelease>,
    /// How often to heartbeat.
    pub heartbeat_secs: u64,
    /// After this long without a heartbeat the instance is `missing`.
    pub ttl_secs: u64,
}

/// An instance with its computed status, as `GET /v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceStatus {
    /// The instance.
    #[serde(flatten)]
    pub instance: Instance,
    /// Its status.
    pub status: Status,
    /// How long it has been stale or missing, in seconds.
    pub drift_secs: u64,
    /// Its place in the latest rollout of its service: present while that rollout runs,
    /// and after it ended when this node failed, failed to roll back or was skipped — so
    /// a node waiting for its batch is told from one that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<InstanceRollout>,
}

/// An instance's place in a rollout (`InstanceStatus.rollout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceRollout {
    /// The rollout id (`lockstep rollout watch ID`).
    pub id: i64,
    /// The node's step in it.
    pub step: RolloutStep,
    /// Why (a failure, a skip), or null. Always present.
    #[schema(required = true)]
    pub reason: Option<String>,
}

/// A node's step in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStep {
    /// Not touched yet: waiting for its batch.
    Pending,
    /// Being updated.
    Updating,
    /// Runs the rollout's release and passed its health check.
    Updated,
    /// The update failed (see the reason).
    Failed,
    /// Being rolled back.
    RollingBack,
    /// Back on its previous release.
    RolledBack,
    /// Rolling back failed (see the reason): a person must look at the node.
    RollbackFailed,
    /// Left alone (see the reason).
    Skipped,
}

impl RolloutStep {
    /// The wire name: `pending`, `updating`, `updated`, `failed`, `rolling_back`,
    /// `rolled_back`, `rollback_failed`, `skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStep::Pending => "pending",
            RolloutStep::Updating => "updating",
            RolloutStep::Updated => "updated",
            RolloutStep::Failed => "failed",
            RolloutStep::RollingBack => "rolling_back",
            RolloutStep::RolledBack => "rolled_back",
            RolloutStep::RollbackFailed => "rollback_failed",
            RolloutStep::Skipped => "skipped",
        }
    }

    /// Whether the node has not reached the rollout's release yet and nothing went wrong:
    /// waiting for its batch, or being updated.
    pub fn is_waiting(self) -> bool {
        matches!(self, RolloutStep::Pending | RolloutStep::Updating)
    }

    /// Whether the rollout failed on this node (its update, or its rollback).
    pub fn is_failure(self) -> bool {
        matches!(self, RolloutStep::Failed | RolloutStep::RollbackFailed)
    }
}

impl InstanceRollout {
    /// `rollout 7: waiting for its batch`, `rollout 7: failed — health check failed`.
    pub fn describe(&self) -> String {
        let what = match self.step {
            RolloutStep::Pending => "waiting for its batch",
            RolloutStep::Updating => "updating",
            RolloutStep::Updated => "updated",
            RolloutStep::Failed => "failed",
            RolloutStep::RollingBack => "rolling back",
            RolloutStep::RolledBack => "rolled back",
            RolloutStep::RollbackFailed => "rollback failed",
            RolloutStep::Skipped => "skipped",
        };
        match self.reason.as_deref().filter(|r| !r.is_empty()) {
            Some(r) => format!("rollout {}: {what} \u{2014} {r}", self.id),
            None => format!("rollout {}: {what}", self.id),
        }
    }
}

/// The first event of `GET /v1/instances/watch`: every instance of the scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceSnapshot {
    /// The instances with their status, ordered by environment, service and id.
    pub instances: Vec<InstanceStatus>,
}

/// An instance gone from `GET /v1/instances/watch` (event `removed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceRemoved {
    /// The instance.
    pub instance_id: String,
    /// Its environment.
    pub env: String,
    /// Its service.
    pub service: String,
    /// `deregistered`, `missing` or `forgotten`.
    pub reason: String,
}

/// One service in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// The expected release, or null.
    pub expected: Option<StoredRelease>,
    /// Its instances.
    pub instances: Vec<InstanceStatus>,
    /// Counts per status.
    pub counts: StatusCounts,
}

/// One environment in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvStatus {
    /// Environment name.
    pub name: String,
    /// Its services, by name.
    pub services: Vec<ServiceStatus>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusReport {
    /// Which replica answered and which one leads background work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryInfo>,
    /// Environments, by name.
    pub environments: Vec<EnvStatus>,
}

/// The replica that answered a status request, and the leader it knows of.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistryInfo {
    /// The replica that answered.
    pub replica: String,
    /// The replica holding the leader lease (TTL scan, Redis mirror), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The store backend: `sqlite` or `postgres`.
    pub backend: String,
}

/// `GET /v1/services`: the services that have an expected release, per environment.
/// Names only, so a worker token may read it (a startup guard tells a misspelled
/// `--service` from a new one with it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceIndex {
    /// Environments, by name.
    pub environments: Vec<EnvServices>,
}

/// One environment of a [`ServiceIndex`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvServices {
    /// Environment name.
    pub name: String,
    /// Services with an expected release there, by name.
    pub services: Vec<String>,
}

impl ServiceIndex {
    /// The services registered in `env` (empty when the environment is unknown).
    pub fn services_in(&self, env: &str) -> Vec<&str> {
        self.environments
            .iter()
            .filter(|e| e.name == env)
            .flat_map(|e| e.services.iter().map(String::as_str))
            .collect()
    }
}

/// History of a service, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseHistory {
    /// Releases, newest first.
    pub releases: Vec<StoredRelease>,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Monotonic id; the SSE id of the live stream.
    pub id: i64,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub at: OffsetDateTime,
    /// What happened, e.g. `release_registered`, `release_rolled_back`, `token_created`.
    pub kind: String,
    /// Environment concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Service concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The token name that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Events with `id > since`, oldest first.
    pub events: Vec<Event>,
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateToken {
    /// Unique name; it is the actor recorded in events.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// A new token, shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The secret; the registry keeps only its hash.
    pub token: String,
}

/// A token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub created_at: OffsetDateTime,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenList {
    /// Active tokens.
    pub tokens: Vec<TokenInfo>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` (readiness only).
    pub status: String,
    /// Which replica answered, which one leads, and the store backend (`/healthz` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryInfo>,
}

/// One drift alert (`GET /v1/alerts`, `POST /v1/alerts/{id}/ack`, and the `data` of the
/// `alert_*` events). Field names follow the source system where it had them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    /// Id (an integer, as a string).
    pub alert_id: String,
    /// The instance.
    pub instance_id: String,
    /// Same as `instance_id` (the source system's name).
    pub worker_id: String,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// What is wrong.
    pub condition: lockstep_core::Condition,
    /// How urgent; raised in place as the drift grows.
    pub severity: lockstep_core::Severity,
    /// `open` or `resolved`.
    pub state: AlertState,
    /// Drift when the alert last changed, in seconds.
    pub drift_secs: u64,
    /// The same, human (`12m`).
    pub drift_duration: String,
    /// The instance's version id (8 chars).
    pub current_version: String,
    /// The expected version id (8 chars), if any.
    pub expected_version: Option<String>,
    /// What a person reads.
    pub message: String,
    /// When it opened.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub timestamp: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub updated_at: OffsetDateTime,
    /// When it resolved.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub resolved_at: Option<OffsetDateTime>,
    /// Whether someone acknowledged it.
    pub acknowledged: bool,
    /// Who (token name).
    #[serde(default)]
    pub acknowledged_by: Option<String>,
    /// When.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub acknowledged_at: Option<OffsetDateTime>,
}

/// State of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition holds.
    Open,
    /// The instance is current again, or gone.
    Resolved,
}

impl AlertState {
    /// Lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Resolved => "resolved",
        }
    }
}

/// `GET /v1/alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertList {
    /// Newest first.
    pub alerts: Vec<Alert>,
}

/// Optional body of `POST /v1/alerts/{id}/ack`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AckRequest {
    /// Why (recorded in the event log).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What is shown instead of a stored secret.
pub const MASK: &str = "********";

/// Kind of an alert channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// Generic JSON webhook, signed with HMAC-SHA256.
    Webhook,
    /// Slack incoming webhook.
    Slack,
    /// Email over SMTP.
    Email,
}

/// One alert channel, with the source system's field names. Which fields apply depends on
/// `type`; secrets (`secret`, `password`, a Slack `webhook_url`) are shown as
/// [`MASK`] by `GET`, and a `PUT` that sends the mask back keeps the stored value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelConfig {
    /// Unique name (the delivery log and metrics use it).
    pub name: String,
    /// `webhook`, `slack` or `email`.
    #[serde(rename = "type")]
    pub kind: ChannelKind,
    /// Least severity sent (default `low`; `null` reads as the default).
    #[serde(
        default = "default_min_severity",
        deserialize_with = "min_severity_or_default"
    )]
    pub min_severity: lockstep_core::Severity,
    /// Webhook: URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Webhook: method (default `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Webhook: extra headers (`null` reads as none).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub headers: BTreeMap<String, String>,
    /// Webhook: HMAC key of `X-Lockstep-Signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Slack: incoming-webhook URL (a credential: masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Slack: channel override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Slack: user name; email: SMTP user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Email: SMTP password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Email: SMTP host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_host: Option<String>,
    /// Email: SMTP port (default 587 with STARTTLS, 25 without).
    #[serde(
        default,
        deserialize_with = "integral_u16",
        skip_serializing_if = "Option::is_none"
    )]
    pub smtp_port: Option<u16>,
    /// Email: `starttls` (default) or `plain` (a local relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_security: Option<String>,
    /// Email: sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_address: Option<String>,
    /// Email: recipients.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub to_addresses: Vec<String>,
}

fn default_min_severity() -> lockstep_core::Severity {
    lockstep_core::Severity::Low
}

fn min_severity_or_default<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<lockstep_core::Severity, D::Error> {
    Ok(Option::<lockstep_core::Severity>::deserialize(d)?.unwrap_or_else(default_min_severity))
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ChannelConfig {
    /// A copy with every secret replaced by [`MASK`].
    pub fn masked(&self) -> ChannelConfig {
        let mask = |v: &Option<String>| v.as_ref().map(|_| MASK.to_string());
        ChannelConfig {
            secret: mask(&self.secret),
            password: mask(&self.password),
            webhook_url: mask(&self.webhook_url),
            ..self.clone()
        }
    }

    /// Replaces each secret that is [`MASK`] by the one `stored` holds (a PUT of what a GET
    /// showed keeps the secrets).
    pub fn unmask_from(&mut self, stored: &ChannelConfig) {
        let keep = |v: &mut Option<String>, old: &Option<String>| {
            if v.as_deref() == Some(MASK) {
                *v = old.clone();
            }
        };
        keep(&mut self.secret, &stored.secret);
        keep(&mut self.password, &stored.password);
        keep(&mut self.webhook_url, &stored.webhook_url);
    }
}

/// `GET/PUT /v1/alert-channels`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertChannels {
    /// Every channel; names are unique (a repeated name is a 409 `conflict`).
    #[schema(value_type = Vec<ChannelSchema>)]
    pub channels: Vec<ChannelConfig>,
}

/// The OpenAPI shape of a channel, by `type` (documentation only: the wire type is the flat
/// [`ChannelConfig`]).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChannelSchema {
    /// Generic JSON webhook.
    Webhook(WebhookChannel),
    /// Slack incoming webhook.
    Slack(SlackChannel),
    /// Email over SMTP.
    Email(EmailChannel),
}

/// A webhook channel (schema).
#[derive(Serialize, utoipa::ToSchema)]
pub struct WebhookChannel {
    /// Unique name.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Least severity sent (default `low`).
    pub min_severity: Option<lockstep_core::Severity>,
    /// Where to send.
    #[schema(pattern = "^https?://[^\\s]+$")]
    pub url: String,
    /// `POST` (default) or `PUT`.
    #[schema(pattern = "^([Pp][Oo][Ss][Tt]|[Pp][Uu][Tt])$")]
    pub method: Option<String>,
    /// Extra headers.
    pub headers: Option<BTreeMap<String, String>>,
    /// HMAC key of `X-Lockstep-Signature` (masked by `GET`).
    pub secret: Option<String>,
}

/// A Slack channel (schema).
#[derive(Serialize, utoipa::ToSchema)]
pub struct SlackChannel {
    /// Unique name.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Least severity sent (default `low`).
    pub min_severity: Option<lockstep_core::Severity>,
    /// Incoming-webhook URL (masked by `GET`).
    #[schema(pattern = "^(https?://[^\\s]+|\\*{8})$")]
    pub webhook_url: String,
    /// Channel override.
    pub channel: Option<String>,
    /// User name shown.
    pub username: Option<String>,
}

/// An email channel (schema).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EmailChannel {
    /// Unique name.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Least severity sent (default `low`).
    pub min_severity: Option<lockstep_core::Severity>,
    /// SMTP server.
    #[schema(min_length = 1)]
    pub smtp_host: String,
    /// SMTP port (default 587 with STARTTLS, 25 without).
    #[schema(minimum = 0, maximum = 65535)]
    pub smtp_port: Option<u16>,
    /// `starttls` (default) or `plain`.
    #[schema(pattern = "^(starttls|plain)$")]
    pub smtp_security: Option<String>,
    /// SMTP user.
    pub username: Option<String>,
    /// SMTP password (masked by `GET`).
    pub password: Option<String>,
    /// Sender.
    #[schema(min_length = 1)]
    pub from_address: String,
    /// Recipients.
    #[schema(min_items = 1)]
    pub to_addresses: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(json: &str) -> Result<Option<u32>, String> {
        let body = format!(r#"{{"instance_id":"i","service":"s","version_id":"v","pid":{json}}}"#);
        serde_json::from_str::<Heartbeat>(&body)
            .map(|h| h.pid)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_smtp_port_is_read_as_json_schema_reads_an_integer() {
        let port = |json: &str| {
            serde_json::from_str::<ChannelConfig>(&format!(
                r#"{{"name":"m","type":"email","smtp_host":"h","smtp_port":{json}}}"#
            ))
            .map(|c| c.smtp_port)
            .map_err(|e| e.to_string())
        };
        assert_eq!(port("2525"), Ok(Some(2525)));
        assert_eq!(port("298.0"), Ok(Some(298)));
        assert_eq!(port("null"), Ok(None));
        for bad in ["25.5", "-1", "65536"] {
            assert!(port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rollback_concurrency_is_read_as_json_schema_reads_an_integer() {
        let concurrency = |json: &str| {
            serde_json::from_str::<RollbackRequest>(&format!(
                r#"{{"now":true,"concurrency":{json}}}"#
            ))
            .map(|r| r.concurrency)
            .map_err(|e| e.to_string())
        };
        assert_eq!(concurrency("759"), Ok(Some(759)));
        assert_eq!(concurrency("759.0"), Ok(Some(759)));
        assert_eq!(concurrency("null"), Ok(None));
        for bad in ["2.5", "-1", "\"3\""] {
            assert!(concurrency(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pid_is_read_as_json_schema_reads_an_integer() {
        assert_eq!(pid("42"), Ok(Some(42)));
        assert_eq!(pid("42.0"), Ok(Some(42)));
        assert_eq!(pid("null"), Ok(None));
        assert_eq!(pid("4294967295"), Ok(Some(u32::MAX)));
        for bad in ["42.5", "-1", "4294967296", "1e300", "\"42\""] {
            assert!(pid(bad).is_err(), "{bad}");
        }
    }
}
