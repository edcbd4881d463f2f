//! The worker the agent updates: either its own supervised child (`--run -- CMD…`, working
//! directory `<root>/current`) or a configured restart command (`--restart-command`, for a
//! worker managed by systemd or similar), and the health check that decides whether a new
//! release stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::AgentError;

/// How the worker is (re)started.
#[derive(Debug, Clone, Default)]
pub enum WorkerMode {
    /// Nothing to restart (the agent only lays releases out).
    #[default]
    None,
    /// A child the agent runs itself: program and arguments.
    Child(Vec<String>),
    /// A shell command run (via `sh -c`) after each switch; it must exit 0.
    Command(String),
}

/// The running child, if any.
pub struct Worker {
    mode: WorkerMode,
    current_dir: PathBuf,
    pidfile: PathBuf,
    grace: Duration,
    running: Option<Running>,
}

struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

fn send_signal(pid: u32, sig: &str) {
    if pid == 0 {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Worker {
    /// A worker run from `<root>/current`, its pid kept in `<root>/worker.pid`.
    pub fn new(mode: WorkerMode, root: &Path, grace: Duration) -> Worker {
        Worker {
            mode,
            current_dir: root.join("current"),
            pidfile: root.join("worker.pid"),
            grace,
            running: None,
        }
    }

    /// Stops the child (SIGTERM, the grace period, SIGKILL).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.done.await;
            let _ = std::fs::remove_file(&self.pidfile);
        }
    }

    /// Stops a child left behind by an agent that was killed (its pid is in
    /// `worker.pid` and it still runs from a release under `root`), so the new child does
    /// not find its port taken and the health check does not reach the old process.
    pub async fn stop_orphan(&self, root: &Path) {
        let Some(pid) = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            return;
        };
        let _ = std::fs::remove_file(&self.pidfile);
        let ours = |pid: u32| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            let root = std::fs::canonicalize(root).ok();
            matches!((cwd, root), (Some(c), Some(r)) if c.starts_with(&r))
        };
        if pid == 0 || !ours(pid) {
            return;
        }
        tracing::warn!(pid, "stopping the worker a previous agent run left behind");
        send_signal(pid, "TERM");
        let deadline = Instant::now() + self.grace;
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if ours(pid) {
            send_signal(pid, "KILL");
            for _ in 0..250 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Stops the old worker and starts release `version_id` (child mode), or runs the
    /// restart command.
    pub async fn restart(&mut self, version_id: &str) -> Result<(), AgentError> {
        match self.mode.clone() {
            WorkerMode::None => Ok(()),
            WorkerMode::Command(cmd) => {
                let status = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .current_dir(&self.current_dir)
                    .env("LOCKSTEP_VERSION_ID", version_id)
                    .env("LOCKSTEP_RELEASE_DIR", &self.current_dir)
                    .status()
                    .await
                    .map_err(|e| AgentError::Restart(format!("{cmd}: {e}")))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(AgentError::Restart(format!("{cmd}: {status}")))
                }
            }
            WorkerMode::Child(argv) => {
                self.stop().await;
                self.spawn(&argv, version_id)
            }
        }
    }

    fn spawn(&mut self, argv: &[String], version_id: &str) -> Result<(), AgentError> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| AgentError::Restart("empty --run command".into()))?;
        // The release directory, resolved now: the child keeps running from the release it
        // was started on even after `current` moves.
        let cwd =
            std::fs::canonicalize(&self.current_dir).unwrap_or_else(|_| self.current_dir.clone());
        let program = resolve(&cwd, program);
        let mut child = tokio::process::Command::new(&program)
            .args(args)
            .current_dir(&cwd)
            .env("LOCKSTEP_VERSION_ID", version_id)
            .env("LOCKSTEP_RELEASE_DIR", &cwd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                AgentError::Restart(format!(
                    "cannot start {} (exit code {} in a shell): {e}",
                    program.display(),
                    lockstep_client::supervise::spawn_exit_code(&e)
                ))
            })?;
        let pid = child.id().unwrap_or(0);
        if let Err(e) = crate::fsutil::write_atomic(&self.pidfile, pid.to_string().as_bytes()) {
            tracing::warn!(error = %e, "cannot record the worker's pid");
        }
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let grace = self.grace;
        let short = crate::short_id(version_id);
        tracing::info!(pid, version = %short, "worker started");
        let done = tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let code = status.map(lockstep_client::supervise::exit_code).unwrap_or(1);
                    tracing::warn!(pid, version = %short, code, "worker exited by itself");
                }
                _ = &mut stop_rx => {
                    send_signal(pid, "TERM");
                    if tokio::time::timeout(grace, child.wait()).await.is_err() {
                        tracing::warn!(pid, "worker outlived its grace period; SIGKILL");
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    tracing::info!(pid, version = %short, "worker stopped");
                }
            }
        });
        self.running = Some(Running { stop, done });
        Ok(())
    }
}

/// `./bin/x` relative to the release directory; a bare name goes through `PATH`.
fn resolve(cwd: &Path, program: &str) -> PathBuf {
    if program.contains('/') && !program.starts_with('/') {
        cwd.join(program)
    } else {
        PathBuf::from(program)
    }
}

/// Polls `url` until it answers 2xx or `timeout` passes.
pub async fn health_check(client: &reqwest::Client, url: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
