//! The registry's tunables. They live in `service/` because the service (and every
//! background job under it) reads them; the HTTP side gets them from here, never the reverse.

use std::time::Duration;

/// Tunables of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often instances are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// After this long without a heartbeat an instance is `missing`.
    pub instance_ttl: Duration,
    /// Missing instances are forgotten after this long.
    pub instance_retention: Duration,
    /// How often heartbeats received here are flushed to the store.
    pub flush_interval: Duration,
    /// Interval of the SSE keep-alive comment.
    pub keepalive: Duration,
    /// This replica's id (shown in `/v1/status` and `/healthz`, holder of the lease).
    pub replica_id: String,
    /// How long the leader lease lasts without renewal (failover time after a crash).
    pub lease_ttl: Duration,
    /// How often the lease is renewed (or tried for) and the TTL scan runs.
    pub lease_renew: Duration,
    /// Safety-net poll of the store's log when no wake-up arrives.
    pub log_poll: Duration,
    /// How often heartbeats flushed by other replicas are read.
    pub instance_poll: Duration,
    /// A connection that does not deliver a request's headers within this long (a stuck
    /// client, or an idle keep-alive connection) is closed.
    pub header_read_timeout: Duration,
    /// At most this many open connections (watch streams included).
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(10),
            instance_ttl: Duration::from_secs(30),
            instance_retention: Duration::from_secs(24 * 3600),
            flush_interval: Duration::from_millis(500),
            keepalive: Duration::from_secs(15),
            replica_id: default_replica_id(),
            lease_ttl: Duration::from_secs(5),
            lease_renew: Duration::from_secs(1),
            log_poll: Duration::from_secs(1),
            instance_poll: Duration::from_millis(500),
            header_read_timeout: Duration::from_secs(20),
            max_connections: 25_000,
        }
    }
}

/// `<hostname>-<pid>`: unique per process, readable in a status page.
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "lockstep".into());
    format!("{host}-{}", std::process::id())
}
