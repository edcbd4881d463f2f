//! `lockstep guard -- CMD…`: startup guards and a stale-aware supervisor for a worker in
//! any language.
//!
//! It runs the startup guards against the environment (`GIT_SHA`, `EXPECTED_GIT_SHA`,
//! `LOCKSTEP_EXPECTED_VERSION`, and with `--service` the registry's expected release),
//! refusing with exit 78 before CMD starts; then runs CMD with stdio passed through,
//! heartbeats on its behalf, forwards SIGTERM/SIGINT to it, and when the expected release
//! moves away from CMD's version either stops it (SIGTERM, `--grace`, SIGKILL; exit 1, so
//! the supervisor starts the new release) or only reports (`--on-stale=warn`).
//! Otherwise it exits with CMD's own code.

use clap::{Args, ValueEnum};
use lockstep_client::guard::{self, Facts};
use lockstep_client::{HeartbeatTask, Watcher, WatcherConfig};
use lockstep_core::{parse_duration, short_id};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

use crate::RegistryArgs;
use crate::exit::{self, fail};

/// What to do when the child's release stops being the expected one.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStale {
    /// SIGTERM, wait `--grace`, SIGKILL, exit 1.
    Exit,
    /// Log it and keep running.
    Warn,
}

/// `lockstep guard`.
#[derive(Args)]
#[command(after_help = "\
The child's release is --version-id, else $LOCKSTEP_VERSION_ID, else $GIT_SHA.
In production (LOCKSTEP_ENV, APP_ENV or NODE_ENV = production) the guard refuses (exit 78)
when GIT_SHA is unknown or differs from EXPECTED_GIT_SHA / LOCKSTEP_EXPECTED_VERSION, or,
with --service, when the registry expects another release; in development it only warns.

Examples:
  GIT_SHA=$(git rev-parse HEAD) EXPECTED_GIT_SHA=$DEPLOYED lockstep guard -- python worker.py
  lockstep guard --service extractor --version-id $LOCKSTEP_VERSION_ID --grace 30s -- node worker.js
  lockstep guard --service api --on-stale warn -- ./legacy-worker")]
pub struct GuardArgs {
    /// The service CMD belongs to; enables the registry check, heartbeats and the watch.
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    service: Option<String>,
    /// Environment.
    #[arg(long, env = "LOCKSTEP_ENV", default_value = "production")]
    env: String,
    /// The release CMD runs (default: $LOCKSTEP_VERSION_ID, else $GIT_SHA).
    #[arg(long)]
    version_id: Option<String>,
    /// What to do when CMD's release is no longer expected.
    #[arg(long, value_enum, default_value_t = OnStale::Exit)]
    on_stale: OnStale,
    /// How long CMD gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The worker command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn code_of(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => exit::FAILED,
    }
}

fn send_signal(pid: u32, sig: &str) {
    // kill(1) keeps this crate free of unsafe libc calls; signals are rare events.
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Runs the guard and supervises CMD.
pub async fn run(a: GuardArgs) -> anyhow::Result<u8> {
    let version_id = a
        .version_id
        .clone()
        .or_else(|| env("LOCKSTEP_VERSION_ID"))
        .or_else(|| env("GIT_SHA"))
        .unwrap_or_else(|| lockstep_core::detect::UNKNOWN.to_string());
    let facts = Facts {
        production: guard::is_production(),
        // A wrapped program's build profile is not knowable from outside.
        debug_build: false,
        cargo_run: false,
        git_sha: env("GIT_SHA").unwrap_or_else(|| lockstep_core::detect::UNKNOWN.to_string()),
        version_id: Some(version_id.clone()),
        expected_git_sha: env("EXPECTED_GIT_SHA"),
        expected_version: env("LOCKSTEP_EXPECTED_VERSION"),
    };
    if !guard::report(&guard::evaluate(&facts)) {
        return Ok(guard::EXIT_REFUSED as u8);
    }
    if let Some(svc) = &a.service {
        lockstep_core::validate_name("service", svc)
            .map_err(|e| fail(exit::USAGE, e.to_string()))?;
        let client = a.registry.client()?;
        let v = guard::check_registry(&client, &a.env, svc, &version_id, facts.production).await;
        if !guard::report(&v) {
            return Ok(guard::EXIT_REFUSED as u8);
        }
    }
    supervise(a, version_id).await
}

async fn supervise(a: GuardArgs, version_id: String) -> anyhow::Result<u8> {
    let (program, args) = a
        .command
        .split_first()
        .ok_or_else(|| fail(exit::USAGE, "no command given"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("LOCKSTEP_VERSION_ID", &version_id)
        .spawn()
        .map_err(|e| fail(exit::USAGE, format!("cannot start {program:?}: {e}")))?;
    let pid = child.id().unwrap_or(0);
    let (watcher, beats) = match &a.service {
        Some(svc) => {
            let mut cfg = WatcherConfig::new(&a.registry.registry, svc, &version_id);
            cfg.token = a.registry.token.clone();
            cfg.env = a.env.clone();
            let watcher = Watcher::start(cfg)?;
            let hb = lockstep_client::heartbeat_for(
                watcher.config(),
                env("GIT_SHA").as_deref(),
                pid,
                None,
            );
            let beats = HeartbeatTask::spawn(a.registry.client()?, hb, Some(watcher.clone()));
            (Some(watcher), Some(beats))
        }
        None => (None, None),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut warned = false;
    let code = loop {
        let stale = async {
            match &watcher {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break code_of(status?),
            _ = term.recv() => send_signal(pid, "TERM"),
            _ = int.recv() => send_signal(pid, "INT"),
            _ = stale, if !warned => {
                let expected = watcher
                    .as_ref()
                    .and_then(|w| w.expected())
                    .map(|e| short_id(&e.release.version_id).to_string())
                    .unwrap_or_else(|| "-".into());
                eprintln!(
                    "[version] {} runs {} but {} is expected now",
                    program, short_id(&version_id), expected
                );
                if a.on_stale == OnStale::Warn {
                    warned = true;
                    continue;
                }
                eprintln!("[version] stopping it (SIGTERM, then SIGKILL after {:?})", a.grace);
                send_signal(pid, "TERM");
                if tokio::time::timeout(a.grace, child.wait()).await.is_err() {
                    eprintln!("[version] still running after the grace period: SIGKILL");
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                break exit::FAILED;
            }
        }
    };
    if let Some(b) = beats {
        b.shutdown().await;
    }
    Ok(code)
}
