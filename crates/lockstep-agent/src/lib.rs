//! The update agent on a worker node (`lockstep agent`): receives packages, verifies them
//! (size, trusted signature, every checksum) before anything is unpacked, installs each as
//! `releases/<version_id>/`, switches `current` atomically, restarts and health-checks the
//! worker, rolls back by itself when the check fails, keeps previous releases as backups
//! for the retention, and heartbeats to the registry as an instance with its endpoint.
//!
//! - [`Agent`]: the behaviour, with the apply as named [`Step`]s and [`Agent::recover`].
//! - [`router`]: the HTTP API of the contract (and the source system's coordinator).
//! - [`AgentClient`]: what a coordinator uses to drive agents.
//! - [`run`]: bind, print `listening on http://ADDR`, serve until SIGTERM/SIGINT.

mod agent;
mod client;
mod error;
mod fsutil;
mod server;
mod state;
mod worker;

pub use agent::{Agent, AgentConfig, CRASH_ENV, Outcome, RegistrySettings, UploadMeta};
pub use client::{AgentClient, ClientError};
pub use error::AgentError;
pub use server::router;
pub use state::{AgentEvent, ApplyProgress, ReleaseMeta, State, Step};
pub use worker::WorkerMode;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The first 8 characters of a version id, as logs show them.
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// `GET /api/v1/version`: the contract's fields, the source coordinator's (`build_time`),
/// and what the agent itself knows (last event, apply in progress).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// The release `current` points at (null before the first apply).
    pub version_id: Option<String>,
    /// Its label.
    pub codebase_version: String,
    /// When its package was built (RFC 3339), or empty.
    pub build_time: String,
    /// Its commit.
    pub git_commit: String,
    /// Component versions (manifest, completed by `--component`).
    pub components: BTreeMap<String, String>,
    /// When `current` last changed (RFC 3339), or empty.
    pub last_updated: String,
    /// The service from the manifest (may be empty).
    #[serde(default)]
    pub service: String,
    /// What a rollback returns to.
    #[serde(default)]
    pub last_good: Option<String>,
    /// `idle`, or `applying` while an apply runs.
    #[serde(default)]
    pub status: String,
    /// The latest event (`applied`, `self_rollback`, …).
    #[serde(default)]
    pub last_event: Option<AgentEvent>,
    /// Installed releases (the backups and current), by id.
    #[serde(default)]
    pub releases: Vec<String>,
}

impl VersionInfo {
    /// From the agent's state.
    pub fn of(agent: &Agent) -> VersionInfo {
        let st = agent.state();
        let meta = st
            .current
            .as_ref()
            .and_then(|c| st.releases.get(c))
            .cloned()
            .unwrap_or_default();
        VersionInfo {
            version_id: st.current.clone(),
            codebase_version: meta.version.clone(),
            build_time: meta.build_time.clone(),
            git_commit: if meta.git_sha.is_empty() {
                "unknown".into()
            } else {
                meta.git_sha.clone()
            },
            components: agent.components_of(&meta),
            last_updated: st.last_updated.clone().unwrap_or_default(),
            service: meta.service,
            last_good: st.last_good.clone(),
            status: if st.apply.is_some() {
                "applying"
            } else {
                "idle"
            }
            .into(),
            last_event: st.events.last().cloned(),
            releases: st.releases.keys().cloned().collect(),
        }
    }
}

/// Opens the agent (recovering), binds `listen`, prints `listening on http://ADDR` on
/// stdout, heartbeats, and serves until SIGTERM or SIGINT; then stops the worker and
/// deregisters.
pub async fn run(mut cfg: AgentConfig, listen: &str) -> Result<(), AgentError> {
    if cfg.token.is_none() && !cfg.allow_unauthenticated {
        return Err(AgentError::Config(
            "no token: set --token (or LOCKSTEP_AGENT_TOKEN), or pass --allow-unauthenticated to accept anyone on the network".into(),
        ));
    }
    if cfg.trusted_keys.is_empty() && !cfg.allow_unsigned {
        return Err(AgentError::Config(
            "no trusted key: pass --trusted-key KEY.pub, or --allow-unsigned to accept unsigned packages".into(),
        ));
    }
    if cfg.allow_unauthenticated {
        tracing::warn!(
            "--allow-unauthenticated: ANYONE who can reach this port can install and roll back releases"
        );
    }
    if cfg.allow_unsigned {
        tracing::warn!("--allow-unsigned: UNSIGNED packages without a manifest will be installed");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| AgentError::io(format!("binding {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::io("reading the bound address", e))?;
    if cfg.endpoint.is_none() {
        cfg.endpoint = Some(format!("http://{addr}"));
    }
    let agent = Agent::open(cfg).await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    }
    let st = agent.state();
    tracing::info!(
        %addr,
        version = %st.current.as_deref().map(short_id).unwrap_or_default(),
        "agent ready"
    );
    agent.start_background().await;
    let app = router(agent.clone());
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| AgentError::io("serving", e))?;
    agent.shutdown().await;
    Ok(())
}
