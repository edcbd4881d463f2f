//! The rollout coordinator: drives update agents through a fleet rollout, on the leader
//! only, with every node's step in the store.
//!
//! The rules are `lockstep_rollout::plan` (pure); this module reads a rollout's state from
//! the store, asks [`plan::next`] (or [`plan::abort`] when a person asked), records each
//! node's new step — leader-fenced, with its events, in one transaction — *before* acting
//! on it, and then talks to the agent. A replica that becomes leader finds every running
//! rollout in the store and carries on: a node recorded as `Updating` is never applied
//! blindly again — its agent's version is asked first (and the agent's apply is idempotent
//! for the release it already runs) — and a failure recorded stays recorded.

use bytes::Bytes;
use lockstep_agent::{AgentClient, ClientError};
use lockstep_api::{Alert, AlertState, InstanceRollout, PutRelease, RollbackRequest, RolloutStep};
use lockstep_core::{Condition, Release, Severity, short_id};
use lockstep_rollout::plan::{self, Action, NodeStep, Phase, Settings, Stop, Summary};
use lockstep_store::{AlertWrite, NewEvent, NewRollout, NewRolloutNode, Rollout, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

use super::metrics::{Histogram, header, label};
use super::{RegistryError, RegistryService};

/// Node update durations, seconds.
const UPDATE_BOUNDS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Default cap of an uploaded package: 256 MiB.
pub const DEFAULT_MAX_PACKAGE: u64 = 256 * 1024 * 1024;

/// How often the coordinator looks for work when nothing wakes it.
const TICK: Duration = Duration::from_millis(250);

/// A rollout's settings as stored: the plan's, plus the per-node timing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutSettings {
    /// Canary, concurrency, failures, rollback safety.
    #[serde(flatten)]
    pub plan: Settings,
    /// How often an agent is asked for its version while it updates, ms.
    pub poll_ms: u64,
    /// How long a node may take to report the new release healthy, ms.
    pub timeout_ms: u64,
}

/// What `POST /v1/rollouts` asks for (the package travels beside it).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StartRollout {
    /// Environment (default `production`).
    #[serde(default = "default_env")]
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub env: String,
    /// Service.
    #[schema(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: String,
    /// The package's release id (its manifest's `version_id`).
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub version_id: String,
    /// Its label.
    #[serde(default)]
    pub version: Option<String>,
    /// Its commit.
    #[serde(default)]
    pub git_sha: Option<String>,
    /// Agent URLs; default: every live instance of the service with an `endpoint`.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Canary nodes (default 1).
    #[serde(default = "one")]
    #[schema(minimum = 0, maximum = 100000)]
    pub canary: usize,
    /// Nodes at once (default 3).
    #[serde(default = "three")]
    #[schema(minimum = 0, maximum = 100000)]
    pub concurrency: usize,
    /// Failures tolerated (default 0).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100000)]
    pub max_failures: usize,
    /// Poll interval, seconds (default 10).
    #[serde(default = "ten")]
    #[schema(schema_with = poll_secs_schema)]
    pub poll_secs: f64,
    /// Per-node timeout, seconds (default 300).
    #[serde(default = "five_min")]
    #[schema(schema_with = timeout_secs_schema)]
    pub timeout_secs: f64,
    /// Whether the release may be rolled back automatically (default true).
    #[serde(default = "yes")]
    pub rollback_safe: bool,
}

/// A number of seconds, 0 to 86,400, fractions allowed — without the `format: double`
/// utoipa gives an `f64`: that format constrains nothing a JSON number can carry, and
/// schemathesis, asked to break it, drops it and may send a value that is valid (then
/// reports the 201 as a schema-violating request accepted).
fn seconds_schema(description: &str) -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Number)
        .minimum(Some(0))
        .maximum(Some(86_400))
        .description(Some(description))
        .build()
}

fn poll_secs_schema() -> utoipa::openapi::schema::Object {
    seconds_schema("Poll interval, seconds (default 10).")
}

fn timeout_secs_schema() -> utoipa::openapi::schema::Object {
    seconds_schema("Per-node timeout, seconds (default 300).")
}

fn default_env() -> String {
    "production".into()
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn ten() -> f64 {
    10.0
}
fn five_min() -> f64 {
    300.0
}
fn yes() -> bool {
    true
}

/// One node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    /// Instance id (or the agent URL).
    pub instance_id: String,
    /// Agent URL.
    pub endpoint: String,
    /// `pending`, `updating`, `updated`, `failed`, `rolling_back`, `rolled_back`,
    /// `rollback_failed`, `skipped`.
    pub step: String,
    /// Why (failures, skips).
    pub reason: Option<String>,
    /// Update attempts.
    pub attempts: i64,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// A rollout as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// Id.
    pub id: i64,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// Target release.
    pub version_id: String,
    /// Release before.
    pub previous_version_id: Option<String>,
    /// `canary`, `batches`, `rolling_back`, `frozen`, `completed`, `rolled_back`, `aborted`.
    pub phase: String,
    /// Whether it still runs.
    pub running: bool,
    /// A person's request being acted on: `abort`, `keep` (abort without rolling back),
    /// `emergency` or `emergency:N` (`rollback --now`, at most N rollbacks at once).
    pub request: Option<String>,
    /// Settings.
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// Who started it.
    pub actor: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Seconds from creation to the end (or now).
    pub elapsed_secs: f64,
    /// `succeeded`, `failed`, `aborted` once finished.
    pub outcome: Option<String>,
    /// The summary line.
    pub summary: String,
    /// Nodes, in rollout order.
    pub nodes: Vec<NodeView>,
}

/// The coordinator's state in this process: the rollouts it drives and the metrics.
pub struct Rollouts {
    agent_token: Mutex<Option<String>>,
    max_package_size: AtomicU64,
    driving: Mutex<HashSet<i64>>,
    wake: Notify,
    /// Node update durations, seconds.
    pub node_update_seconds: Histogram,
    succeeded: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
    node_rollbacks: AtomicU64,
    /// Each instance's place in the latest rollout of its service, with the event id the
    /// projection had applied before it was read (see [`RegistryService::rollout_marks`]).
    marks: RwLock<Option<(i64, Arc<RolloutMarks>)>>,
}

/// Each instance's place in the latest rollout of its service, as `/v1/status` shows it
/// (`InstanceStatus.rollout`): every node of a running rollout; of an ended one, only the
/// nodes that failed, failed to roll back or were skipped — the ones left behind.
#[derive(Debug, Default)]
pub struct RolloutMarks {
    /// env → service → node key (instance id, and the agent URL) → mark.
    scopes: HashMap<String, HashMap<String, ServiceMarks>>,
}

/// The marks of one service, by instance id and by agent URL (a node given to
/// `rollout start --agents` by URL is known by its URL, which its instance heartbeats as
/// its `endpoint`).
#[derive(Debug, Default)]
pub struct ServiceMarks {
    by_id: HashMap<String, InstanceRollout>,
    by_endpoint: HashMap<String, InstanceRollout>,
}

impl ServiceMarks {
    /// The mark of one instance: by its id, else by its endpoint.
    pub fn of(&self, inst: &lockstep_core::Instance) -> Option<InstanceRollout> {
        self.by_id
            .get(&inst.instance_id)
            .or_else(|| {
                inst.endpoint
                    .as_deref()
                    .and_then(|e| self.by_endpoint.get(e.trim_end_matches('/')))
            })
            .cloned()
    }
}

impl RolloutMarks {
    /// Builds the marks from the nodes of each service's latest rollout.
    pub fn from_nodes(nodes: &[lockstep_store::LatestRolloutNode]) -> RolloutMarks {
        let mut m = RolloutMarks::default();
        for n in nodes {
            let (step, reason) = wire_step(&step_of(&n.step));
            let shown = n.running
                || matches!(
                    step,
                    RolloutStep::Failed | RolloutStep::RollbackFailed | RolloutStep::Skipped
                );
            if !shown {
                continue;
            }
            let mark = InstanceRollout {
                id: n.rollout_id,
                step,
                reason,
            };
            let svc = m
                .scopes
                .entry(n.env.clone())
                .or_default()
                .entry(n.service.clone())
                .or_default();
            svc.by_endpoint
                .insert(n.endpoint.trim_end_matches('/').to_string(), mark.clone());
            svc.by_id.insert(n.instance_id.clone(), mark);
        }
        m
    }

    /// The marks of one service (`None`: no instance of it has one).
    pub fn service(&self, env: &str, service: &str) -> Option<&ServiceMarks> {
        self.scopes.get(env).and_then(|s| s.get(service))
    }

    /// The mark of one instance.
    pub fn of(&self, inst: &lockstep_core::Instance) -> Option<InstanceRollout> {
        self.service(&inst.env, &inst.service)
            .and_then(|s| s.of(inst))
    }
}

/// A node's step in the API's words.
pub fn wire_step(s: &NodeStep) -> (RolloutStep, Option<String>) {
    match s {
        NodeStep::Pending => (RolloutStep::Pending, None),
        NodeStep::Updating => (RolloutStep::Updating, None),
        NodeStep::Updated => (RolloutStep::Updated, None),
        NodeStep::Failed(r) => (RolloutStep::Failed, Some(r.clone())),
        NodeStep::RollingBack => (RolloutStep::RollingBack, None),
        NodeStep::RolledBack => (RolloutStep::RolledBack, None),
        NodeStep::RollbackFailed(r) => (RolloutStep::RollbackFailed, Some(r.clone())),
        NodeStep::Skipped(r) => (RolloutStep::Skipped, Some(r.clone())),
    }
}

impl Default for Rollouts {
    fn default() -> Self {
        Rollouts::new()
    }
}

impl Rollouts {
    /// Nothing driven yet.
    pub fn new() -> Rollouts {
        Rollouts {
            agent_token: Mutex::new(None),
            max_package_size: AtomicU64::new(DEFAULT_MAX_PACKAGE),
            driving: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            node_update_seconds: Histogram::new(UPDATE_BOUNDS),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            node_rollbacks: AtomicU64::new(0),
            marks: RwLock::new(None),
        }
    }

    /// The bearer token presented to agents (`serve --agent-token`).
    pub fn set_agent_token(&self, token: Option<String>) {
        if let Ok(mut g) = self.agent_token.lock() {
            *g = token;
        }
    }

    /// The largest package `POST /v1/rollouts` accepts (`serve --max-package-size`); read
    /// when the router is built.
    pub fn set_max_package_size(&self, bytes: u64) {
        self.max_package_size.store(bytes, Ordering::Relaxed);
    }

    /// See [`Rollouts::set_max_package_size`].
    pub fn max_package_size(&self) -> usize {
        usize::try_from(self.max_package_size.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// The rollout marks last read (empty before the first read): for callers that cannot
    /// wait, such as the instance stream. `/v1/status` refreshes them first with
    /// [`RegistryService::rollout_marks`].
    pub fn cached_marks(&self) -> Arc<RolloutMarks> {
        self.marks
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|(_, m)| m.clone()))
            .unwrap_or_default()
    }

    fn token(&self) -> Option<String> {
        self.agent_token.lock().ok().and_then(|g| g.clone())
    }

    /// Wakes the coordinator (a rollout was created or a person asked something).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Prometheus text: rollouts by outcome, node update durations, node rollbacks.
    pub fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        header(
            out,
            "lockstep_rollouts_total",
            "counter",
            "Rollouts finished by this replica, by outcome.",
        );
        for (o, n) in [
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
            ("aborted", &self.aborted),
        ] {
            let _ = writeln!(
                out,
                "lockstep_rollouts_total{{outcome=\"{}\"}} {}",
                label(o),
                n.load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "lockstep_rollout_node_update_seconds",
            "histogram",
            "Time to update one node (upload, apply, new release reported healthy).",
        );
        self.node_update_seconds
            .render(out, "lockstep_rollout_node_update_seconds", "");
        header(
            out,
            "lockstep_rollout_node_rollbacks_total",
            "counter",
            "Nodes told to roll back by the coordinator.",
        );
        let _ = writeln!(
            out,
            "lockstep_rollout_node_rollbacks_total {}",
            self.node_rollbacks.load(Ordering::Relaxed)
        );
    }
}

/// A person's request as stored in `Rollout.request`.
fn request_name(how: Stop) -> String {
    match how {
        Stop::Abort => "abort".into(),
        Stop::Keep => "keep".into(),
        Stop::Emergency { concurrency: None } => "emergency".into(),
        Stop::Emergency {
            concurrency: Some(n),
        } => format!("emergency:{n}"),
    }
}

/// Reads a stored request back (an unknown one is an ordinary abort: it stops, and rolls
/// back within the rollout's concurrency).
fn parse_request(s: &str) -> Stop {
    match s {
        "keep" => Stop::Keep,
        "emergency" => Stop::Emergency { concurrency: None },
        s => match s.strip_prefix("emergency:") {
            Some(n) => Stop::Emergency {
                concurrency: n.parse().ok(),
            },
            None => Stop::Abort,
        },
    }
}

fn is_emergency(request: Option<&str>) -> bool {
    request.is_some_and(|r| matches!(parse_request(r), Stop::Emergency { .. }))
}

fn step_of(v: &serde_json::Value) -> NodeStep {
    serde_json::from_value(v.clone()).unwrap_or(NodeStep::Failed("unreadable step".into()))
}

fn step_json(s: &NodeStep) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn phase_of(s: &str) -> Phase {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap_or(Phase::Frozen)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `2m3s`, `4s`, `1h2m`.
pub fn human_elapsed(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

fn outcome_of(r: &Rollout) -> Option<&'static str> {
    match phase_of(&r.phase) {
        Phase::Completed => Some("succeeded"),
        Phase::Aborted => Some("aborted"),
        Phase::RolledBack | Phase::Frozen if !r.running => Some("failed"),
        _ => None,
    }
}

/// The view of a rollout and its nodes.
pub fn view(r: &Rollout, nodes: &[lockstep_store::RolloutNode]) -> RolloutView {
    let steps: Vec<NodeStep> = nodes.iter().map(|n| step_of(&n.step)).collect();
    let end = r.finished_at.unwrap_or_else(time::OffsetDateTime::now_utc);
    let elapsed = (end - r.created_at).as_seconds_f64().max(0.0);
    let verb = match phase_of(&r.phase) {
        Phase::Completed => "completed",
        Phase::RolledBack => "rolled back",
        Phase::Aborted => "aborted",
        Phase::Frozen => "frozen",
        _ => "running",
    };
    RolloutView {
        id: r.id,
        env: r.env.clone(),
        service: r.service.clone(),
        version_id: r.version_id.clone(),
        previous_version_id: r.previous_version_id.clone(),
        phase: r.phase.clone(),
        running: r.running,
        request: r.request.clone(),
        settings: r.settings.clone(),
        actor: r.actor.clone(),
        created_at: rfc3339(r.created_at),
        finished_at: r.finished_at.map(rfc3339),
        elapsed_secs: elapsed,
        outcome: outcome_of(r).map(str::to_string),
        summary: Summary::of(&steps).line(verb, &human_elapsed(elapsed)),
        nodes: nodes
            .iter()
            .zip(&steps)
            .map(|(n, s)| {
                let v = step_json(s);
                NodeView {
                    instance_id: n.instance_id.clone(),
                    endpoint: n.endpoint.clone(),
                    step: v["step"].as_str().unwrap_or_default().to_string(),
                    reason: v["reason"].as_str().map(str::to_string),
                    attempts: n.attempts,
                    updated_at: rfc3339(n.updated_at),
                }
            })
            .collect(),
    }
}

impl RegistryService {
    /// The coordinator's handle (metrics, agent token, wake-up).
    pub fn rollouts(&self) -> &Arc<Rollouts> {
        &self.rollouts
    }

    /// Starts a rollout: picks the nodes, makes the new release expected with the previous
    /// one accepted, and stores the rollout with its package. `Conflict` when a rollout of
    /// the service runs.
    pub async fn start_rollout(
        &self,
        req: StartRollout,
        package: Vec<u8>,
        signature: Option<Vec<u8>>,
        actor: &str,
    ) -> Result<RolloutView, RegistryError> {
        super::check_scope(&req.env, &req.service)?;
        lockstep_core::validate_version_id(&req.version_id)?;
        for (what, v) in [
            ("poll_secs", req.poll_secs),
            ("timeout_secs", req.timeout_secs),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return Err(RegistryError::BadRequest(format!(
                    "{what} must be between 0 and 86400, got {v}"
                )));
            }
        }
        for (what, v) in [
            ("canary", req.canary),
            ("concurrency", req.concurrency),
            ("max_failures", req.max_failures),
        ] {
            if v > 100_000 {
                return Err(RegistryError::BadRequest(format!(
                    "{what} must be at most 100000, got {v}"
                )));
            }
        }
        if package.is_empty() {
            return Err(RegistryError::BadRequest("the package is empty".into()));
        }
        if let Some(r) = self
            .store
            .rollouts(true, 1000)
            .await?
            .into_iter()
            .find(|r| r.env == req.env && r.service == req.service)
        {
            return Err(StoreError::Conflict(format!(
                "running rollout {} of {}/{}",
                r.id, r.env, r.service
            ))
            .into());
        }
        let nodes: Vec<NewRolloutNode> = if req.agents.is_empty() {
            let now = time::OffsetDateTime::now_utc();
            let ttl = self.config.instance_ttl;
            let mut v: Vec<NewRolloutNode> = self
                .projection
                .instances()
                .unwrap_or_default()
                .into_iter()
                .filter(|i| i.env == req.env && i.service == req.service)
                .filter(|i| now - i.last_seen <= ttl)
                .filter_map(|i| {
                    i.endpoint.clone().map(|e| NewRolloutNode {
                        instance_id: i.instance_id.clone(),
                        endpoint: e,
                    })
                })
                .collect();
            v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            v
        } else {
            req.agents
                .iter()
                .map(|a| NewRolloutNode {
                    instance_id: a.clone(),
                    endpoint: a.trim_end_matches('/').to_string(),
                })
                .collect()
        };
        if nodes.is_empty() {
            // Not a malformed request: the same call succeeds once the service's agents
            // heartbeat with their endpoint.
            return Err(RegistryError::NotFound(format!(
                "no agents to update: no live instance of {}/{} has an endpoint; pass agents",
                req.env, req.service
            )));
        }
        let previous = self.store.expected(&req.env, &req.service).await?;
        let previous_id = previous
            .as_ref()
            .map(|p| p.release.version_id.clone())
            .filter(|p| p != &req.version_id);
        let mut release = Release::new(req.version_id.clone());
        release.version = req.version.clone();
        release.git_sha = req.git_sha.clone();
        release.rollback_safe = req.rollback_safe;
        release.accepts = previous_id.iter().cloned().collect();
        release.reason = Some("rollout started".into());
        self.register(
            &req.env,
            &req.service,
            PutRelease {
                release,
                force: false,
            },
            actor,
        )
        .await?;
        let settings = RolloutSettings {
            plan: Settings {
                canary: req.canary,
                concurrency: req.concurrency.max(1),
                max_failures: req.max_failures,
                rollback_safe: req.rollback_safe,
            },
            poll_ms: (req.poll_secs.max(0.01) * 1000.0) as u64,
            timeout_ms: (req.timeout_secs.max(0.1) * 1000.0) as u64,
        };
        let r = self
            .store
            .create_rollout(NewRollout {
                env: req.env.clone(),
                service: req.service.clone(),
                version_id: req.version_id.clone(),
                previous_version_id: previous_id,
                settings: serde_json::to_value(settings).unwrap_or_default(),
                phase: phase_name(if req.canary > 0 {
                    Phase::Canary
                } else {
                    Phase::Batches
                }),
                actor: actor.into(),
                nodes,
                package,
                signature,
                initial_step: step_json(&NodeStep::Pending),
            })
            .await?;
        let data = serde_json::json!({"previous_version_id": r.previous_version_id,
            "settings": r.settings});
        self.store
            .append_event(operator_event(&r, "rollout_started", actor, data))
            .await?;
        tracing::info!(rollout = r.id, env = %r.env, service = %r.service,
            version = %short_id(&r.version_id), actor, "rollout started");
        self.rollouts.wake();
        self.rollout_view(r.id)
            .await?
            .ok_or_else(|| RegistryError::NotFound("rollout".into()))
    }

    /// Each instance's place in the latest rollout of its service. Kept in memory and read
    /// again from the store (one read) only when the projection has applied an event since
    /// the last read: every change of a node's step or a rollout's phase is written with an
    /// event in the same transaction, so an unchanged event cursor means unchanged marks, and
    /// a status call costs no store read while nothing happens. A store that does not
    /// answer keeps the last marks (status stays served from memory), logged.
    pub async fn rollout_marks(&self) -> Arc<RolloutMarks> {
        // The cursor is taken before the read: anything applied after it makes the next
        // call read again, so a change is never hidden behind a newer stamp.
        let cursor = self.projection.cursors().event_id;
        let cached = self
            .rollouts
            .marks
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|(stamp, m)| (*stamp, m.clone())));
        if let Some((stamp, m)) = &cached
            && *stamp == cursor
        {
            return m.clone();
        }
        match self.store.latest_rollout_nodes().await {
            Ok(nodes) => {
                let m = Arc::new(RolloutMarks::from_nodes(&nodes));
                if let Ok(mut g) = self.rollouts.marks.write() {
                    // Never replace newer marks with older ones (two refreshes racing).
                    if g.as_ref().is_none_or(|(stamp, _)| *stamp <= cursor) {
                        *g = Some((cursor, m.clone()));
                    }
                }
                m
            }
            Err(e) => {
                tracing::warn!(error = %e, "rollout marks: the store does not answer; showing the last known");
                cached.map(|(_, m)| m).unwrap_or_default()
            }
        }
    }

    /// A rollout with its nodes.
    pub async fn rollout_view(&self, id: i64) -> Result<Option<RolloutView>, RegistryError> {
        let Some(r) = self.store.rollout(id).await? else {
            return Ok(None);
        };
        let nodes = self.store.rollout_nodes(id).await?;
        Ok(Some(view(&r, &nodes)))
    }

    /// Recent rollouts (without their nodes' details beyond the summary).
    pub async fn list_rollouts(&self, limit: u32) -> Result<Vec<RolloutView>, RegistryError> {
        let mut out = Vec::new();
        for r in self.store.rollouts(false, limit).await? {
            let nodes = self.store.rollout_nodes(r.id).await?;
            out.push(view(&r, &nodes));
        }
        Ok(out)
    }

    /// Asks the coordinator to stop a running rollout: roll it back (`Stop::Abort`, or
    /// `Stop::Emergency`: every touched node at once, bounded only by its concurrency), or
    /// stop without rolling back (`Stop::Keep`: the updated nodes stay on the new release,
    /// which stays expected with the previous one accepted; no alert). `None` when there is
    /// no such rollout; `Conflict` when it is not running (or, for `Keep`, already rolling
    /// back).
    pub async fn abort_rollout(
        &self,
        id: i64,
        how: Stop,
        actor: &str,
    ) -> Result<Option<RolloutView>, RegistryError> {
        let Some(r) = self.store.rollout(id).await? else {
            return Ok(None);
        };
        if how == Stop::Keep && phase_of(&r.phase) == Phase::RollingBack {
            return Err(RegistryError::Conflict(format!(
                "rollout {id} is already rolling back; abort it without --keep"
            )));
        }
        if !self.store.request_rollout(id, &request_name(how)).await? {
            return Err(RegistryError::Conflict(format!(
                "rollout {id} is not running (phase {})",
                r.phase
            )));
        }
        self.store
            .append_event(operator_event(
                &r,
                "rollout_abort_requested",
                actor,
                abort_data(how, false),
            ))
            .await?;
        tracing::info!(rollout = id, request = %request_name(how), actor, "rollout stop requested");
        self.rollouts.wake();
        self.rollout_view(id).await
    }

    /// `rollback --now` for the rollouts of a service: stops its running rollout the
    /// emergency way; or, when its latest rollout completed and that rollout's release is
    /// still the expected one, runs that rollout again as an emergency rollback of every
    /// node it updated (no canary, no batches). At most `concurrency` rollbacks at once
    /// (`None`: no bound). Answers the rollout's id, `None` when there is nothing to roll
    /// back on the nodes (only the registry changes).
    pub async fn emergency_rollback_rollout(
        &self,
        env: &str,
        service: &str,
        concurrency: Option<usize>,
        actor: &str,
    ) -> Result<Option<i64>, RegistryError> {
        if concurrency == Some(0) {
            return Err(RegistryError::BadRequest(
                "concurrency must be at least 1".into(),
            ));
        }
        let how = Stop::Emergency { concurrency };
        let recent = self.store.rollouts(false, 1000).await?;
        let mut of_service = recent
            .into_iter()
            .filter(|r| r.env == env && r.service == service);
        let Some(latest) = of_service.next() else {
            return Ok(None);
        };
        // A running rollout may be an older one retried: it goes first.
        let running = std::iter::once(latest.clone())
            .chain(of_service)
            .find(|r| r.running);
        if let Some(r) = running {
            self.abort_rollout(r.id, how, actor).await?;
            return Ok(Some(r.id));
        }
        let r = latest;
        let expected = self.store.expected(env, service).await?;
        let still = expected.is_some_and(|e| e.release.version_id == r.version_id);
        if phase_of(&r.phase) != Phase::Completed || !still {
            return Ok(None);
        }
        // Straight into rolling back, the request pending: the previous release is made
        // expected by the caller at once, and the driver tells every updated node.
        if !self
            .store
            .restart_rollout(
                r.id,
                &phase_name(Phase::RollingBack),
                Some(&request_name(how)),
                Vec::new(),
            )
            .await?
        {
            return Ok(None);
        }
        self.store
            .append_event(operator_event(
                &r,
                "rollout_abort_requested",
                actor,
                abort_data(how, true),
            ))
            .await?;
        tracing::warn!(
            rollout = r.id,
            env,
            service,
            actor,
            "emergency rollback of a completed rollout: its nodes are told to roll back"
        );
        self.rollouts.wake();
        Ok(Some(r.id))
    }

    /// Runs a finished (aborted, failed, frozen) rollout again: only the nodes not on its
    /// release; the release becomes expected again with the previous one accepted.
    pub async fn retry_rollout(
        &self,
        id: i64,
        actor: &str,
    ) -> Result<Option<RolloutView>, RegistryError> {
        let Some(r) = self.store.rollout(id).await? else {
            return Ok(None);
        };
        if r.running {
            return Err(RegistryError::Conflict(format!(
                "rollout {id} is still running"
            )));
        }
        if phase_of(&r.phase) == Phase::Completed {
            return Err(RegistryError::Conflict(format!(
                "rollout {id} completed; nothing to retry"
            )));
        }
        let nodes = self.store.rollout_nodes(id).await?;
        let steps: Vec<NodeStep> = nodes.iter().map(|n| step_of(&n.step)).collect();
        let fresh = plan::retry(&steps);
        let changes: Vec<(i64, serde_json::Value)> = nodes
            .iter()
            .zip(&fresh)
            .map(|(n, s)| (n.idx, step_json(s)))
            .collect();
        let settings: RolloutSettings = serde_json::from_value(r.settings.clone())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut release = Release::new(r.version_id.clone());
        release.accepts = r.previous_version_id.iter().cloned().collect();
        release.rollback_safe = settings.plan.rollback_safe;
        release.reason = Some(format!("rollout {id} retried"));
        self.register(
            &r.env,
            &r.service,
            PutRelease {
                release,
                force: true,
            },
            actor,
        )
        .await?;
        // A retry goes straight to batches: the canary ran in the first attempt.
        if !self
            .store
            .restart_rollout(id, &phase_name(Phase::Batches), None, changes)
            .await?
        {
            return Ok(None);
        }
        self.store
            .append_event(operator_event(
                &r,
                "rollout_retried",
                actor,
                serde_json::json!({}),
            ))
            .await?;
        self.rollouts.wake();
        self.rollout_view(id).await
    }
}

/// The coordinator loop: while this replica leads, every running rollout has a driver.
pub async fn run(svc: Arc<RegistryService>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = svc.rollouts.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        if !svc.leadership.is_leader() {
            continue;
        }
        let running = match svc.store.rollouts(true, 1000).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "rollouts: the store does not answer");
                continue;
            }
        };
        for r in running {
            let fresh = svc
                .rollouts
                .driving
                .lock()
                .map(|mut g| g.insert(r.id))
                .unwrap_or(false);
            if fresh {
                let svc = svc.clone();
                let sd = shutdown.clone();
                tokio::spawn(async move {
                    let id = r.id;
                    if let Err(e) = drive(&svc, id, sd).await {
                        tracing::warn!(rollout = id, error = %e, "rollout driver stopped");
                    }
                    if let Ok(mut g) = svc.rollouts.driving.lock() {
                        g.remove(&id);
                    }
                });
            }
        }
    }
}

/// What a finished node task reports (its step is in the store already).
type Done = ();

/// The data of a `rollout_abort_requested` event.
fn abort_data(how: Stop, after_completion: bool) -> serde_json::Value {
    let (emergency, keep, concurrency) = match how {
        Stop::Abort => (false, false, None),
        Stop::Keep => (false, true, None),
        Stop::Emergency { concurrency } => (true, false, concurrency),
    };
    serde_json::json!({"emergency": emergency, "keep": keep,
        "concurrency": concurrency, "after_completion": after_completion})
}

fn event(
    r: &Rollout,
    kind: &str,
    node: &lockstep_store::RolloutNode,
    extra: serde_json::Value,
) -> NewEvent {
    let mut ev = rollout_event(
        r,
        kind,
        serde_json::json!({"node": node.instance_id, "endpoint": node.endpoint}),
    );
    merge(&mut ev.data, extra);
    ev
}

/// An operator's request about rollout `r` (start, stop, retry), as an event by `actor`.
fn operator_event(r: &Rollout, kind: &str, actor: &str, extra: serde_json::Value) -> NewEvent {
    NewEvent {
        actor: Some(actor.into()),
        ..rollout_event(r, kind, extra)
    }
}

/// `extra`'s fields added to the object `data`.
fn merge(data: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(x)) = (data.as_object_mut(), extra) {
        o.extend(x);
    }
}

fn rollout_event(r: &Rollout, kind: &str, extra: serde_json::Value) -> NewEvent {
    let mut data = serde_json::json!({"rollout_id": r.id, "version_id": r.version_id});
    merge(&mut data, extra);
    NewEvent {
        kind: kind.into(),
        env: Some(r.env.clone()),
        service: Some(r.service.clone()),
        actor: None,
        reason: None,
        data,
    }
}

/// Drives one rollout until it is final or this replica stops leading.
async fn drive(
    svc: &Arc<RegistryService>,
    id: i64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RegistryError> {
    let holder = svc.leadership.replica().to_string();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    // Nodes with a task of this driver in flight.
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::new(Mutex::new(HashSet::new()));
    let (package, signature) = svc
        .store
        .rollout_package(id)
        .await?
        .ok_or_else(|| RegistryError::NotFound(format!("package of rollout {id}")))?;
    let package = Bytes::from(package);
    let signature = signature.map(Bytes::from);
    let token = svc.rollouts.token();
    loop {
        if !svc.leadership.is_leader() || *shutdown.borrow() {
            return Ok(());
        }
        let Some(r) = svc.store.rollout(id).await? else {
            return Ok(());
        };
        if !r.running {
            return Ok(());
        }
        let settings: RolloutSettings = serde_json::from_value(r.settings.clone())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let nodes = svc.store.rollout_nodes(id).await?;
        let steps: Vec<NodeStep> = nodes.iter().map(|n| step_of(&n.step)).collect();
        let phase = phase_of(&r.phase);
        let busy: HashSet<i64> = in_flight.lock().map(|g| g.clone()).unwrap_or_default();

        // A step in flight without a task here was left by a previous leader: resume it.
        for (n, s) in nodes.iter().zip(&steps) {
            if busy.contains(&n.idx) {
                continue;
            }
            match s {
                NodeStep::Updating => spawn_node(
                    svc,
                    &r,
                    n,
                    settings,
                    &package,
                    &signature,
                    &token,
                    &holder,
                    true,
                    &in_flight,
                    &done_tx,
                    Task::Update,
                ),
                NodeStep::RollingBack => spawn_node(
                    svc,
                    &r,
                    n,
                    settings,
                    &package,
                    &signature,
                    &token,
                    &holder,
                    true,
                    &in_flight,
                    &done_tx,
                    Task::Rollback,
                ),
                _ => {}
            }
        }

        let request = r.request.as_deref();
        let decision = match request {
            Some(req) => plan::stop(&settings.plan, phase, &steps, parse_request(req)),
            None => plan::next(&settings.plan, phase, &steps),
        };

        if decision.phase != phase {
            let finished = decision.phase.is_final();
            let mut evs = Vec::new();
            if finished {
                let verb = match decision.phase {
                    Phase::Completed => "completed",
                    Phase::RolledBack => "rolled back",
                    Phase::Aborted => "aborted",
                    _ => "frozen",
                };
                let elapsed = (time::OffsetDateTime::now_utc() - r.created_at).as_seconds_f64();
                let line = Summary::of(&steps).line(verb, &human_elapsed(elapsed));
                evs.push(rollout_event(
                    &r,
                    &format!("rollout_{}", phase_name(decision.phase)),
                    serde_json::json!({"summary": line}),
                ));
            } else {
                evs.push(rollout_event(
                    &r,
                    "rollout_phase",
                    serde_json::json!({
                    "phase": phase_name(decision.phase), "from": phase_name(phase)}),
                ));
            }
            if decision.phase == Phase::Completed {
                // The previous release is no longer accepted.
                let mut release = Release::new(r.version_id.clone());
                release.rollback_safe = settings.plan.rollback_safe;
                release.reason = Some(format!("rollout {} completed", r.id));
                svc.register(
                    &r.env,
                    &r.service,
                    PutRelease {
                        release,
                        force: true,
                    },
                    "rollout",
                )
                .await?;
            }
            let clear = decision.phase == Phase::Aborted;
            svc.store
                .set_rollout_phase(
                    &holder,
                    id,
                    &phase_name(decision.phase),
                    !finished,
                    clear,
                    evs,
                )
                .await?;
            if finished {
                let counter = match decision.phase {
                    Phase::Completed => &svc.rollouts.succeeded,
                    Phase::Aborted => &svc.rollouts.aborted,
                    _ => &svc.rollouts.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(rollout = id, phase = %phase_name(decision.phase), "rollout finished");
            }
        }

        for a in &decision.actions {
            match a {
                Action::Update(i) | Action::Rollback(i) => {
                    let n = &nodes[*i];
                    let (step, task, kind, data) = match a {
                        Action::Update(_) => (
                            NodeStep::Updating,
                            Task::Update,
                            "worker_update_started",
                            serde_json::json!({"phase": phase_name(decision.phase)}),
                        ),
                        _ => (
                            NodeStep::RollingBack,
                            Task::Rollback,
                            "worker_rollback_started",
                            serde_json::json!({"emergency": is_emergency(request)}),
                        ),
                    };
                    let update = matches!(task, Task::Update);
                    svc.store
                        .set_rollout_step(
                            &holder,
                            id,
                            n.idx,
                            step_json(&step),
                            update,
                            vec![event(&r, kind, n, data)],
                        )
                        .await?;
                    if !update {
                        svc.rollouts.node_rollbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    spawn_node(
                        svc, &r, n, settings, &package, &signature, &token, &holder, false,
                        &in_flight, &done_tx, task,
                    );
                }
                Action::RestorePreviousRelease => {
                    if let Some(prev) = &r.previous_version_id {
                        let out = svc
                            .rollback(
                                &r.env,
                                &r.service,
                                RollbackRequest {
                                    version_id: Some(prev.clone()),
                                    reason: Some(format!("rollout {} rolled back", r.id)),
                                    force: true,
                                    now: is_emergency(request),
                                    concurrency: None,
                                },
                                "rollout",
                            )
                            .await;
                        if let Err(e) = out {
                            tracing::warn!(rollout = id, error = %e, "restoring the previous release failed");
                        }
                    }
                }
                Action::AlertFrozen => raise_frozen_alert(svc, &holder, &r, &nodes, &steps).await,
            }
        }
        if decision.phase.is_final() {
            return Ok(());
        }
        tokio::select! {
            _ = done_rx.recv() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Raises the `critical` alert of a frozen rollout, naming the release and the nodes.
async fn raise_frozen_alert(
    svc: &RegistryService,
    holder: &str,
    r: &Rollout,
    nodes: &[lockstep_store::RolloutNode],
    steps: &[NodeStep],
) {
    let failed: Vec<&str> = nodes
        .iter()
        .zip(steps)
        .filter(|(_, s)| matches!(s, NodeStep::Failed(_)))
        .map(|(n, _)| n.instance_id.as_str())
        .collect();
    let updated: Vec<&str> = nodes
        .iter()
        .zip(steps)
        .filter(|(_, s)| matches!(s, NodeStep::Updated))
        .map(|(n, _)| n.instance_id.as_str())
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let message = format!(
        "rollout {} of {}/{} froze: release {} is not rollback-safe; failed: {}; updated: {}. \
         Nothing was rolled back: a person must decide (lockstep rollout retry {} or abort)",
        r.id,
        r.env,
        r.service,
        short_id(&r.version_id),
        failed.join(", "),
        updated.join(", "),
        r.id
    );
    let alert = Alert {
        alert_id: String::new(),
        instance_id: format!("rollout-{}", r.id),
        worker_id: format!("rollout-{}", r.id),
        env: r.env.clone(),
        service: r.service.clone(),
        condition: Condition::RolloutFrozen,
        severity: Severity::Critical,
        state: AlertState::Open,
        drift_secs: 0,
        drift_duration: "0s".into(),
        current_version: short_id(&r.version_id).to_string(),
        expected_version: Some(short_id(&r.version_id).to_string()),
        message,
        timestamp: now,
        updated_at: now,
        resolved_at: None,
        acknowledged: false,
        acknowledged_by: None,
        acknowledged_at: None,
    };
    match svc
        .store
        .apply_alerts(holder, vec![AlertWrite::Raise(Box::new(alert))])
        .await
    {
        Ok(_) => svc.alerts.wake_delivery(),
        Err(e) => tracing::warn!(rollout = r.id, error = %e, "raising the freeze alert failed"),
    }
    tracing::error!(rollout = r.id, version = %short_id(&r.version_id), failed = ?failed,
        "rollout frozen: the release is not rollback-safe");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Task {
    Update,
    Rollback,
}

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    svc: &Arc<RegistryService>,
    r: &Rollout,
    n: &lockstep_store::RolloutNode,
    settings: RolloutSettings,
    package: &Bytes,
    signature: &Option<Bytes>,
    token: &Option<String>,
    holder: &str,
    resumed: bool,
    in_flight: &Arc<Mutex<HashSet<i64>>>,
    done: &tokio::sync::mpsc::UnboundedSender<Done>,
    task: Task,
) {
    if let Ok(mut g) = in_flight.lock()
        && !g.insert(n.idx)
    {
        return;
    }
    let svc = svc.clone();
    let r = r.clone();
    let n = n.clone();
    let package = package.clone();
    let signature = signature.clone();
    let client = AgentClient::new(&n.endpoint, token.clone());
    let holder = holder.to_string();
    let in_flight = in_flight.clone();
    let done = done.clone();
    tokio::spawn(async move {
        let (step, mut evs) = match task {
            Task::Update => {
                let started = Instant::now();
                let (step, evs) =
                    update_node(&client, &r, &n, settings, package, signature, resumed).await;
                if step == NodeStep::Updated {
                    svc.rollouts
                        .node_update_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                (step, evs)
            }
            Task::Rollback => rollback_node(&client, &r, &n).await,
        };
        if let NodeStep::Failed(why) | NodeStep::RollbackFailed(why) = &step {
            // Every step change carries an event: status reads the rollout marks again
            // only when the event log moved (`RegistryService::rollout_marks`).
            evs.push(event(
                &r,
                "rollout_node_failed",
                &n,
                serde_json::json!({"step": step_json(&step)["step"], "reason": why}),
            ));
        }
        match svc
            .store
            .set_rollout_step(&holder, r.id, n.idx, step_json(&step), false, evs)
            .await
        {
            Ok(_) => {}
            Err(e) => tracing::warn!(rollout = r.id, node = %n.instance_id, error = %e,
                "recording a node's step failed; the next leader resumes it"),
        }
        if let Ok(mut g) = in_flight.lock() {
            g.remove(&n.idx);
        }
        let _ = done.send(());
    });
}

fn reason(e: &ClientError) -> String {
    match e {
        ClientError::Transport { source, .. } if source.is_timeout() => "agent timed out".into(),
        ClientError::Transport { .. } => "agent unreachable".into(),
        ClientError::Api { code, message, .. } if code == "health_check_failed" => {
            format!("health check failed: {message}")
        }
        other => other.to_string(),
    }
}

/// Updates one node: version and health check, upload, apply, then poll until it reports
/// the release healthy. Answers the final step and the events to record with it.
async fn update_node(
    client: &AgentClient,
    r: &Rollout,
    n: &lockstep_store::RolloutNode,
    settings: RolloutSettings,
    package: Bytes,
    signature: Option<Bytes>,
    resumed: bool,
) -> (NodeStep, Vec<NewEvent>) {
    let mut evs = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(settings.timeout_ms);
    let before = match client.version().await {
        Ok(v) => v,
        Err(e) => return (NodeStep::Failed(reason(&e)), evs),
    };
    evs.push(event(
        r,
        "worker_version_checked",
        n,
        serde_json::json!({
            "current": before.version_id.as_deref().map(short_id),
            "resumed": resumed,
        }),
    ));
    let already = before.version_id.as_deref() == Some(r.version_id.as_str());
    if resumed && before.status == "applying" {
        // The previous leader's apply still runs on the agent: wait for it, never apply again.
    } else if already {
        // Runs the release already (a resumed node whose apply finished): only verify.
    } else {
        if resumed
            && before.last_event.as_ref().is_some_and(|e| {
                e.kind == "self_rollback" && e.version_id.as_deref() == Some(r.version_id.as_str())
            })
        {
            // The apply happened and failed its health check before the crash.
            return (NodeStep::Failed("health check failed".into()), evs);
        }
        match client.health().await {
            Ok(true) => {}
            Ok(false) => tracing::info!(rollout = r.id, node = %n.instance_id,
                "node unhealthy before its update; updating anyway"),
            Err(e) => return (NodeStep::Failed(reason(&e)), evs),
        }
        if let Err(e) = client.upload_bytes(&r.version_id, package, signature).await {
            return (NodeStep::Failed(format!("upload: {}", reason(&e))), evs);
        }
        evs.push(event(
            r,
            "worker_backup_created",
            n,
            serde_json::json!({
                "backup": before.version_id.as_deref().map(short_id),
            }),
        ));
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, client.apply(&r.version_id)).await {
            Err(_) => return (NodeStep::Failed("timeout".into()), evs),
            Ok(Err(e)) => return (NodeStep::Failed(reason(&e)), evs),
            Ok(Ok(_)) => {}
        }
    }
    // Poll until the node reports the release and its health passes.
    let poll = Duration::from_millis(settings.poll_ms.max(10));
    loop {
        if let Ok(v) = client.version().await
            && v.version_id.as_deref() == Some(r.version_id.as_str())
            && v.status != "applying"
            && matches!(client.health().await, Ok(true))
        {
            evs.push(event(
                r,
                "worker_update_completed",
                n,
                serde_json::json!({
                    "from": before.version_id.as_deref().map(short_id),
                }),
            ));
            return (NodeStep::Updated, evs);
        }
        if Instant::now() >= deadline {
            return (NodeStep::Failed("timeout".into()), evs);
        }
        tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Rolls one node back through its agent.
async fn rollback_node(
    client: &AgentClient,
    r: &Rollout,
    n: &lockstep_store::RolloutNode,
) -> (NodeStep, Vec<NewEvent>) {
    match client.rollback().await {
        Ok(o) => (
            NodeStep::RolledBack,
            vec![event(
                r,
                "worker_rollback_completed",
                n,
                serde_json::json!({
                    "status": o.status,
                    "to": o.version_id.as_deref().map(short_id),
                }),
            )],
        ),
        Err(e) => (NodeStep::RollbackFailed(reason(&e)), Vec::new()),
    }
}
