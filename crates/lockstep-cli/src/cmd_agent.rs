//! `lockstep agent`: the update agent on a worker node. Behaviour is `lockstep_agent`'s;
//! this file turns flags into its configuration.

use clap::Args;
use lockstep_agent::{AgentConfig, CRASH_ENV, RegistrySettings, WorkerMode};
use lockstep_core::parse_duration;
use std::path::PathBuf;
use std::time::Duration;

use crate::cmd_package::parse_component;
use crate::exit::{self, fail};

/// `lockstep agent`.
#[derive(Args)]
#[command(after_help = "\
Endpoints: GET /health (open), GET /api/v1/version, POST /api/v1/update/upload (multipart
`update_package` + `signature`, or a raw application/octet-stream body; X-Update-Version),
POST /api/v1/update/apply (X-Update-Version), POST /api/v1/update/rollback. Everything under
/api/v1 needs `Authorization: Bearer <--token>` unless --allow-unauthenticated.

Layout under --root: releases/<version_id>/, current -> releases/<version_id>, uploads/,
staging/, state.json. The worker runs with its working directory in <root>/current.

Examples:
  lockstep agent --root /srv/api --listen 0.0.0.0:7071 --trusted-key /etc/lockstep/release.pub \\
      --token \"$AGENT_TOKEN\" --health-url http://127.0.0.1:8080/health --run -- ./bin/api
  lockstep agent --root /srv/api --trusted-key release.pub --restart-command 'systemctl restart api' \\
      --service api --registry http://registry:7070 --registry-token \"$WORKER_TOKEN\"
  # the source system's coordinator, unchanged (unsigned legacy packages, no auth):
  lockstep agent --root /srv/worker --allow-unsigned --allow-unauthenticated \\
      --component translator=1.2.0 --component api=1.2.0 --run -- ./bin/worker")]
pub struct AgentArgs {
    /// The agent's directory (releases, current, uploads, state).
    #[arg(long, env = "LOCKSTEP_AGENT_ROOT", value_name = "DIR")]
    root: PathBuf,
    /// Address to listen on; port 0 picks one (printed as `listening on http://ADDR`).
    #[arg(long, env = "LOCKSTEP_AGENT_LISTEN", default_value = "127.0.0.1:7071")]
    listen: String,
    /// A public key (SPKI PEM) whose signatures are accepted; repeat for several.
    #[arg(long = "trusted-key", value_name = "KEY.pub")]
    trusted_keys: Vec<PathBuf>,
    /// The bearer token callers must present.
    #[arg(long, env = "LOCKSTEP_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Accept unsigned packages, including manifest-less tar.gz (logged loudly).
    #[arg(long)]
    allow_unsigned: bool,
    /// Accept calls without a token (logged loudly).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Run the worker as the agent's child: `--run -- CMD…`, restarted on every switch.
    #[arg(long, requires = "command")]
    run: bool,
    /// Instead of a child: a shell command that restarts the worker (must exit 0).
    #[arg(long, value_name = "CMD", conflicts_with = "run")]
    restart_command: Option<String>,
    /// The worker's health URL; a new release must answer 2xx or it is rolled back.
    #[arg(long, value_name = "URL")]
    health_url: Option<String>,
    /// How long a new release may take to become healthy.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    health_timeout: Duration,
    /// How long the child gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    /// How long previous releases are kept (the last good one always is).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    retention: Duration,
    /// The largest package accepted (bytes, or with K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    max_package_size: u64,
    /// A component version reported when the manifest has none, NAME=VERSION; repeatable.
    #[arg(long = "component", value_name = "NAME=VERSION", value_parser = parse_component)]
    components: Vec<(String, String)>,
    /// The service this node runs; enables heartbeats to the registry.
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    service: Option<String>,
    /// Environment of the heartbeats.
    #[arg(
        long,
        env = "LOCKSTEP_ENV",
        default_value = "production",
        value_name = "NAME"
    )]
    env: String,
    /// Registry URL for heartbeats; several comma-separated URLs fail over in order.
    #[arg(
        long,
        env = "LOCKSTEP_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    registry: String,
    /// The token heartbeats present to the registry (a worker token).
    #[arg(long, env = "LOCKSTEP_TOKEN", hide_env_values = true)]
    registry_token: Option<String>,
    /// The URL the registry records as this agent's endpoint [default: http://<listen address>].
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The worker command (after `--`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `512`, `100K`, `100M`, `1G` (binary multiples; a trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: a size such as 500M or 2G"))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(a: AgentArgs) -> anyhow::Result<u8> {
    let mut cfg = AgentConfig::new(a.root.clone());
    for p in &a.trusted_keys {
        let key = lockstep_package::sign::read_verifying_key(p)
            .map_err(|e| fail(exit::USAGE, e.to_string()))?;
        cfg.trusted_keys.push(key);
    }
    cfg.token = a.token.filter(|t| !t.is_empty());
    cfg.allow_unsigned = a.allow_unsigned;
    cfg.allow_unauthenticated = a.allow_unauthenticated;
    cfg.worker = match (a.run, a.restart_command) {
        (true, _) => WorkerMode::Child(a.command),
        (false, Some(c)) => WorkerMode::Command(c),
        (false, None) if !a.command.is_empty() => {
            return Err(fail(exit::USAGE, "a command after `--` needs --run"));
        }
        _ => WorkerMode::None,
    };
    cfg.health_url = a.health_url;
    cfg.health_timeout = a.health_timeout;
    cfg.grace = a.grace;
    cfg.retention = a.retention;
    cfg.max_package_size = a.max_package_size;
    cfg.components = a.components.into_iter().collect();
    cfg.endpoint = a.endpoint;
    cfg.registry = a.service.map(|service| RegistrySettings {
        urls: a.registry,
        token: a.registry_token,
        env: a.env,
        service,
    });
    cfg.crash_at = std::env::var(CRASH_ENV).ok().filter(|s| !s.is_empty());
    match lockstep_agent::run(cfg, &a.listen).await {
        Ok(()) => Ok(exit::OK),
        Err(e @ lockstep_agent::AgentError::Config(_)) => Err(fail(exit::USAGE, e.to_string())),
        Err(e) => Err(fail(exit::FAILED, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10kb"), Ok(10 << 10));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }
}
