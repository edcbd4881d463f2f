//! What the agent knows, on disk in `<root>/state.json` (written atomically after every
//! step): the release it runs, the last good one, every installed release, the apply in
//! progress and the step it reached, and recent events.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

use crate::AgentError;

/// The named steps of an apply. The state file records the last one completed; recovery
/// on start reads it (see `Agent::recover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The apply was recorded; nothing else happened yet.
    Started,
    /// Size and signature checked against the trusted keys.
    Verified,
    /// The archive is unpacked into `staging/<id>`, every checksum matched, synced to disk.
    Unpacked,
    /// `staging/<id>` renamed to `releases/<id>` (complete, durable).
    Installed,
    /// `current` points at the new release.
    Switched,
    /// The worker was restarted on the new release.
    Restarted,
    /// The health check passed; the apply is complete.
    Healthy,
}

impl Step {
    /// Its name as written in the state file and accepted by `LOCKSTEP_AGENT_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Verified => "verified",
            Step::Unpacked => "unpacked",
            Step::Installed => "installed",
            Step::Switched => "switched",
            Step::Restarted => "restarted",
            Step::Healthy => "healthy",
        }
    }
}

/// What is known about an installed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReleaseMeta {
    /// Its identity (the directory name).
    pub version_id: String,
    /// The human label.
    pub version: String,
    /// The service (from the manifest; empty for a legacy package).
    #[serde(default)]
    pub service: String,
    /// The commit.
    pub git_sha: String,
    /// When its package was built (RFC 3339), or empty.
    pub build_time: String,
    /// Component versions.
    pub components: BTreeMap<String, String>,
    /// When it was installed here (RFC 3339).
    pub installed_at: String,
    /// Whether its package carried a valid signature.
    pub signed: bool,
}

/// An apply in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyProgress {
    /// The release being applied.
    pub version_id: String,
    /// The upload it comes from (the `X-Update-Version` it was uploaded with).
    pub upload: String,
    /// What `current` pointed at when it started.
    pub previous: Option<String>,
    /// The last step completed.
    pub step: Step,
    /// Whether this is a rollback (health failure or requested) rather than an update.
    #[serde(default)]
    pub rollback: bool,
}

/// Something that happened, for the log, the state file and the version endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// `applied`, `self_rollback`, `rolled_back`, `rollback_noop`, `apply_failed`,
    /// `apply_interrupted`, `recovered`, `backup_removed`.
    pub kind: String,
    /// The release concerned.
    pub version_id: Option<String>,
    /// When (RFC 3339).
    pub at: String,
    /// In words.
    pub message: String,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    /// Stable instance id for heartbeats, generated once.
    #[serde(default)]
    pub instance_id: String,
    /// The release `current` points at.
    pub current: Option<String>,
    /// The release a rollback returns to: what ran when the latest update attempt began.
    pub last_good: Option<String>,
    /// When `current` last changed (RFC 3339).
    pub last_updated: Option<String>,
    /// Installed releases by id.
    #[serde(default)]
    pub releases: BTreeMap<String, ReleaseMeta>,
    /// The apply in progress, if any.
    pub apply: Option<ApplyProgress>,
    /// The most recent events, newest last (at most 50).
    #[serde(default)]
    pub events: Vec<AgentEvent>,
}

/// RFC 3339 now.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl State {
    /// Reads `path`, or a fresh state when it does not exist.
    pub fn load(path: &Path) -> Result<State, AgentError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                AgentError::Config(format!(
                    "{}: unreadable state ({e}); move it aside to start afresh",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(AgentError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| AgentError::Config(format!("encoding state: {e}")))?;
        crate::fsutil::write_atomic(path, &bytes)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
    }

    /// Records an event and logs it.
    pub fn event(&mut self, kind: &str, version_id: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        let short = version_id.map(crate::short_id).unwrap_or_default();
        match kind {
            "self_rollback" | "apply_failed" | "apply_interrupted" => {
                tracing::warn!(event = kind, version = %short, "{message}")
            }
            _ => tracing::info!(event = kind, version = %short, "{message}"),
        }
        self.events.push(AgentEvent {
            kind: kind.to_string(),
            version_id: version_id.map(str::to_string),
            at: now(),
            message,
        });
        let excess = self.events.len().saturating_sub(50);
        self.events.drain(..excess);
    }
}
