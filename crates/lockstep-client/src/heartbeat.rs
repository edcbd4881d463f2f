//! The heartbeat task: registers the instance, heartbeats at the interval the registry asks
//! for (default 10 s), feeds the answer's expected release to the watcher, and deregisters
//! on shutdown so a clean exit never shows up as `missing`.

use lockstep_api::Heartbeat;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::{RegistryClient, Watcher};

/// A running heartbeat task.
pub struct HeartbeatTask {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A unique-enough instance id: `<host>-<pid>-<4 hex>`.
pub fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..4])
}

/// The heartbeat of a process described by `cfg`: its instance id, service, release, pid
/// and start time, plus what the caller knows (baked SHA, endpoint).
pub fn heartbeat_for(
    cfg: &crate::WatcherConfig,
    git_sha: Option<&str>,
    pid: u32,
    endpoint: Option<String>,
) -> Heartbeat {
    Heartbeat {
        instance_id: default_instance_id(),
        env: cfg.env.clone(),
        service: cfg.service.clone(),
        version_id: cfg.version_id.clone(),
        git_sha: git_sha.map(str::to_string),
        build_date: None,
        components: cfg.components.clone(),
        host: None,
        pid: Some(pid),
        started_at: Some(time::OffsetDateTime::now_utc()),
        endpoint,
        health: None,
    }
}

impl HeartbeatTask {
    /// Starts heartbeating `hb` (its `last_seen` is the registry's business) to `client`.
    pub fn spawn(client: RegistryClient, hb: Heartbeat, watcher: Option<Watcher>) -> HeartbeatTask {
        let (tx, mut rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut interval = Duration::from_secs(10);
            loop {
                match client.heartbeat(&hb).await {
                    Ok(answer) => {
                        interval = Duration::from_secs(answer.heartbeat_secs.clamp(1, 3600));
                        if let Some(w) = &watcher {
                            w.observe(answer.expected.as_ref());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat failed; retrying");
                        interval = Duration::from_secs(2).min(interval);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = &mut rx => break,
                }
            }
            if let Err(e) = client.deregister(&hb.instance_id).await {
                tracing::warn!(error = %e, "deregistering failed; the registry will mark this instance missing");
            } else {
                tracing::info!(instance = %hb.instance_id, "deregistered");
            }
        });
        HeartbeatTask {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops heartbeating and deregisters (waits for the deregistration, at most 5 s).
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
