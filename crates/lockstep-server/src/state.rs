//! The registry's shared state: the store, an in-memory copy of every expected release
//! (pre-serialised, so the hot `GET …/release` is a map lookup and a byte copy), the soft
//! state of instances with their dirty set, the token set, and the broadcast hubs for watch
//! and event streams.
//!
//! **Invariant:** a change is written to the store, then put in the cache, then broadcast,
//! all under `write_lock`; so a watcher that subscribes before reading the store or the cache
//! can never miss a revision, and broadcasts arrive in revision order.

use bytes::Bytes;
use lockstep_api::Event;
use lockstep_core::{Instance, StoredRelease};
use lockstep_store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

use crate::auth::TokenSet;

/// Tunables of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often instances are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// After this long without a heartbeat an instance is `missing`.
    pub instance_ttl: Duration,
    /// Missing instances are forgotten after this long.
    pub instance_retention: Duration,
    /// How often the heartbeat state is flushed to the store (at most 1 s).
    pub flush_interval: Duration,
    /// Interval of the SSE keep-alive comment.
    pub keepalive: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(10),
            instance_ttl: Duration::from_secs(30),
            instance_retention: Duration::from_secs(24 * 3600),
            flush_interval: Duration::from_millis(500),
            keepalive: Duration::from_secs(15),
        }
    }
}

/// A release change as broadcast to watchers.
#[derive(Debug)]
pub struct Change {
    /// The stored release.
    pub release: StoredRelease,
    /// Its JSON, serialised once for every watcher.
    pub json: Bytes,
}

impl Change {
    /// Wraps a stored release, serialising it once.
    pub fn new(release: StoredRelease) -> Arc<Self> {
        let json = serde_json::to_vec(&release)
            .map(Bytes::from)
            .unwrap_or_default();
        Arc::new(Change { release, json })
    }
}

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Heartbeats accepted.
    pub heartbeats: AtomicU64,
    /// Registrations and rollbacks that changed the expected release.
    pub changes: AtomicU64,
    /// Watch streams open now.
    pub watchers: AtomicI64,
    /// Event streams open now.
    pub event_streams: AtomicI64,
}

/// An instance's soft state plus what the TTL scanner has already reported.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// What its heartbeats said.
    pub instance: Instance,
    /// Whether the `instance_missing` event was already written.
    pub reported_missing: bool,
}

/// Shared by every handler and background task.
pub struct AppState {
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Tunables.
    pub config: Config,
    /// Expected release per environment, then service (nested so lookups borrow `&str`).
    pub releases: RwLock<HashMap<String, HashMap<String, Arc<Change>>>>,
    /// Instances by id.
    pub instances: Mutex<HashMap<String, Tracked>>,
    /// Instance ids changed since the last flush.
    pub dirty: Mutex<HashSet<String>>,
    /// Valid tokens.
    pub tokens: TokenSet,
    /// Release changes, for watchers.
    pub changes: broadcast::Sender<Arc<Change>>,
    /// Event log entries, for event streams.
    pub events: broadcast::Sender<Arc<Event>>,
    /// Serialises writes so that broadcasts go out in revision order.
    pub write_lock: tokio::sync::Mutex<()>,
    /// Flips to true when the server shuts down; ends every stream.
    pub shutdown: watch::Receiver<bool>,
    /// Metrics.
    pub counters: Counters,
}

impl AppState {
    /// The cached expected release of a service.
    pub fn expected(&self, env: &str, service: &str) -> Option<Arc<Change>> {
        let g = self.releases.read().ok()?;
        g.get(env)?.get(service).cloned()
    }

    /// Puts a change into the cache and broadcasts it. Call with `write_lock` held.
    pub fn publish(&self, change: Arc<Change>) {
        if let Ok(mut g) = self.releases.write() {
            g.entry(change.release.env.clone())
                .or_default()
                .insert(change.release.service.clone(), change.clone());
        }
        self.counters.changes.fetch_add(1, Ordering::Relaxed);
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
    }

    /// Broadcasts logged events to event streams.
    pub fn publish_events(&self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            let _ = self.events.send(Arc::new(e));
        }
    }

    /// Drops an instance id from the dirty set (it was deleted).
    pub fn mark_dirty_removed(&self, id: &str) {
        if let Ok(mut d) = self.dirty.lock() {
            d.remove(id);
        }
    }

    /// Instance ids with a heartbeat not yet flushed.
    pub fn mark_dirty(&self, id: &str) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(id.to_string());
        }
    }
}
