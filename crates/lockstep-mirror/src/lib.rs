//! Best-effort mirror of live instances into Redis, for fleets whose tooling already reads
//! worker versions there (`<prefix>:worker:<service>:version`).
//!
//! Callers (heartbeat handlers, the leader's missing-instance sweep) only queue the latest
//! state of each instance and return; one background task writes the queue as pipelines,
//! retries with backoff and reconnects by itself. Redis being slow or down therefore never
//! slows or fails a registry call — the mirror just lags and catches up.
//!
//! Keys, for the configured environment only:
//! - `<prefix>:worker:<service>:version`: the most recently heartbeated live instance;
//! - `<prefix>:worker:<service>:<instance_id>:version`: one per instance while the service
//!   has two or more live instances;
//!
//! each a hash of `gitSha`, `buildDate`, `startedAt`, `pid`, `instanceId`, expiring with the
//! instance's TTL. `gitSha` is the instance's git SHA, or its release id when that is a SHA;
//! a field the instance did not report is left out (never an empty string), except `gitSha`,
//! which then says `unknown` as the source system wrote it.
//!
//! **Ownership.** Every hash the mirror writes carries the marker field
//! `lockstepMirror = "1"` ([`MARKER_FIELD`], [`MARKER_VALUE`]). The mirror deletes or
//! overwrites a key only when it holds that marker (or, for a write, does not exist), checked
//! and applied inside Redis by one Lua script per key, so there is no window between the check
//! and the change. A key of the prefix written by anyone else — a worker that still registers
//! itself during a migration — is never deleted, overwritten or re-expired, resync included;
//! the source system's tooling ignores the extra field.

mod plan;
mod writer;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lockstep_core::Instance;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::plan::{Op, Seen};
use crate::writer::Shared;

/// The hash field that marks a key as written by the mirror (see the crate docs).
pub const MARKER_FIELD: &str = "lockstepMirror";
/// The value of [`MARKER_FIELD`] in every hash the mirror writes.
pub const MARKER_VALUE: &str = "1";

/// How long `shutdown` lets the last flush run before giving up on it.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// The key holding one service's most recently heartbeated instance.
pub fn version_key(prefix: &str, service: &str) -> String {
    format!("{prefix}:worker:{service}:version")
}

/// The key holding one instance, written while its service has two or more live instances.
pub fn instance_key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}:worker:{service}:{instance_id}:version")
}

/// Where and what to mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Redis URL (`redis://[user:password@]host[:port][/db]`, or `unix://`/`redis+unix://`).
    pub url: String,
    /// Key prefix; `lockstep` by default, the source system's name to replace it.
    pub prefix: String,
    /// The one environment mirrored; instances of other environments are ignored.
    pub env: String,
}

/// Why a mirror could not start. Only configuration errors: connecting happens later, in the
/// background, and its failures show in [`MirrorStats`].
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The URL does not parse or is not a Redis URL this build can use (`rediss://` needs TLS,
    /// which is not compiled in). The URL itself is left out: it may hold a password.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// The key prefix is empty or contains whitespace.
    #[error("invalid Redis key prefix {0:?}: it must be non-empty and without whitespace")]
    InvalidPrefix(String),
    /// `start` was called outside a tokio runtime, so the writer task has nowhere to run.
    #[error("the Redis mirror must be started inside a tokio runtime")]
    NoRuntime,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Redis commands applied (DEL, HSET, PEXPIRE; not SCAN), since start.
    pub writes: u64,
    /// Failed write attempts (connect, SCAN or pipeline), since start.
    pub errors: u64,
    /// Instance states queued or being written, not yet in Redis.
    pub pending: u64,
    /// The last write attempt succeeded (false until the first one does).
    pub up: bool,
    /// Resyncs completed, since start.
    pub resyncs: u64,
}

/// Handle to a running mirror. Cheap to clone; the writer task stops after a last flush when
/// [`Mirror::shutdown`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    env: String,
    prefix: String,
    /// Dropping it (with the last handle) also stops the task.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Mirror {
    // The URL is left out on purpose: it may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("prefix", &self.inner.prefix)
            .field("env", &self.inner.env)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Mirror {
    /// Validates the URL and prefix and spawns the writer task on the current tokio runtime.
    /// Does not connect: Redis may come up later, and start-up must not wait for it.
    pub fn start(config: MirrorConfig) -> Result<Mirror, MirrorError> {
        if config.prefix.is_empty() || config.prefix.chars().any(char::is_whitespace) {
            return Err(MirrorError::InvalidPrefix(config.prefix));
        }
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| MirrorError::InvalidUrl(e.to_string()))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MirrorError::NoRuntime)?;
        let shared = Arc::new(Shared::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = runtime.spawn(writer::run(
            shared.clone(),
            client,
            config.prefix.clone(),
            stop_rx,
            FINAL_FLUSH,
        ));
        tracing::info!(prefix = %config.prefix, env = %config.env, "redis mirror started");
        Ok(Mirror {
            inner: Arc::new(Inner {
                shared,
                env: config.env,
                prefix: config.prefix,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// An instance heartbeated (or was seen in the store): mirror it, expiring `ttl` after its
    /// `last_seen`. Returns at once; the write happens in the background.
    pub fn upsert(&self, instance: &Instance, ttl: Duration) {
        if instance.env != self.inner.env {
            return;
        }
        let seen = Seen::new(instance, ttl);
        let key = (seen.service.clone(), seen.instance_id.clone());
        self.inner.shared.queue(|b| b.record(key, Op::Upsert(seen)));
    }

    /// An instance deregistered or went missing: delete its keys (and hand the per-service
    /// key to another live instance of the service, if any). Returns at once.
    pub fn remove(&self, instance: &Instance) {
        if instance.env != self.inner.env {
            return;
        }
        let key = (instance.service.clone(), instance.instance_id.clone());
        self.inner.shared.queue(|b| b.record(key, Op::Remove));
    }

    /// Full reconciliation: Redis ends up holding exactly `live` (filtered to the mirrored
    /// environment) among the mirror's own keys; every other key the mirror wrote under
    /// `<prefix>:worker:` is deleted, and keys of other writers are left alone. Call it when this
    /// replica becomes the leader and periodically. Returns at once.
    pub fn resync(&self, live: Vec<Instance>, ttl: Duration) {
        let live: Vec<Seen> = live
            .iter()
            .filter(|i| i.env == self.inner.env)
            .map(|i| Seen::new(i, ttl))
            .collect();
        self.inner.shared.queue(|b| b.record_resync(live));
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> MirrorStats {
        let shared = &self.inner.shared;
        let queued = u64::try_from(shared.pending().len()).unwrap_or(u64::MAX);
        MirrorStats {
            writes: shared.writes.load(Ordering::Relaxed),
            errors: shared.errors.load(Ordering::Relaxed),
            pending: queued.saturating_add(shared.in_flight.load(Ordering::Relaxed)),
            up: shared.up.load(Ordering::Relaxed),
            resyncs: shared.resyncs.load(Ordering::Relaxed),
        }
    }

    /// Stops the writer after a last best-effort flush bounded by about a second. Later calls
    /// (on any clone) return at once; operations queued afterwards are not written.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut task) = task else {
            return;
        };
        // The task bounds its own last flush; this margin only guards against a bug there.
        let bound = FINAL_FLUSH + Duration::from_millis(500);
        if tokio::time::timeout(bound, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("redis mirror: writer did not stop in time; aborted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, prefix: &str) -> MirrorConfig {
        MirrorConfig {
            url: url.into(),
            prefix: prefix.into(),
            env: "production".into(),
        }
    }

    #[test]
    fn keys_follow_the_source_system_layout() {
        assert_eq!(version_key("fiskai", "api"), "fiskai:worker:api:version");
        assert_eq!(
            instance_key("fiskai", "api", "i-1"),
            "fiskai:worker:api:i-1:version"
        );
    }

    #[test]
    fn start_rejects_urls_that_are_not_usable_redis_urls_without_echoing_them() {
        for url in [
            "http://user:secret@localhost:6379",
            "not a url",
            "rediss://user:secret@localhost:6379",
        ] {
            match Mirror::start(config(url, "lockstep")) {
                Err(MirrorError::InvalidUrl(msg)) => assert!(!msg.contains("secret"), "{msg}"),
                other => panic!("{url}: expected InvalidUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn start_rejects_an_empty_prefix() {
        assert!(matches!(
            Mirror::start(config("redis://127.0.0.1:6379", "")),
            Err(MirrorError::InvalidPrefix(_))
        ));
    }

    #[test]
    fn start_outside_a_runtime_is_an_error_not_a_panic() {
        assert!(matches!(
            Mirror::start(config("redis://127.0.0.1:6379", "lockstep")),
            Err(MirrorError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn calls_for_other_environments_queue_nothing() {
        let mirror = Mirror::start(config("redis://127.0.0.1:1", "lockstep")).expect("start");
        let now = time::OffsetDateTime::now_utc();
        let staging = Instance::new("i1", "staging", "api", "v1", now);
        mirror.upsert(&staging, Duration::from_secs(30));
        mirror.remove(&staging);
        assert_eq!(mirror.stats().pending, 0);
        mirror.shutdown().await;
    }
}
