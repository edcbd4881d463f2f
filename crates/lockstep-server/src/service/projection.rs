//! What a replica keeps in memory, derived only from what the store committed: expected
//! releases (pre-serialised for the hot `GET …/release`), the token set, instances, and the
//! broadcast hubs of the watch and event streams.
//!
//! One task, the projector, feeds it: woken by the store's change feed (and by a timer, so
//! a lost wake-up only costs latency), it reads everything after its cursors — revisions,
//! event ids, the instance feed — and applies them in order. Handlers never write here
//! directly (heartbeats aside: they are soft state, see `service::heartbeats`), so every
//! replica on one database converges on the same state, and a write answered by this
//! replica is visible here before its answer (the writer waits for the cursor).
//!
//! **Invariant:** items go into the map before they are broadcast, and both happen in
//! cursor order from a single task; a stream that subscribes first and then reads the map
//! or the store misses nothing and deduplicates by id.

use bytes::Bytes;
use lockstep_api::Event;
use lockstep_core::{Instance, StoredRelease};
use lockstep_store::{InstanceChange, Store, StoreError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, watch};

use super::fleet::Fleet;
use super::tokens::{Principal, TokenSet};

/// How many items one catch-up read fetches.
pub(crate) const PAGE: u32 = 1000;

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

/// A lock was poisoned by a panic: the state behind it cannot be trusted, so callers
/// answer 503 rather than guess (never "no release", which would make workers serve).
#[derive(Debug, thiserror::Error)]
#[error("in-memory state is unavailable after an internal failure")]
pub struct Poisoned;

/// How far the projection has applied each feed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursors {
    /// Last revision applied.
    pub revision: i64,
    /// Last event id applied.
    pub event_id: i64,
    /// Last instance-feed position applied.
    pub instance_seq: i64,
}

/// What the projector tells interested parties (the leader's Redis mirror) about instances.
pub trait InstanceSink: Send + Sync {
    /// An instance row was written (heartbeat flushed by any replica).
    fn upserted(&self, instance: &Instance);
    /// An instance was deregistered, forgotten or reported missing.
    fn removed(&self, instance: &Instance);
}

/// A change of the instance set that matters to someone routing or watching: a new
/// instance, a changed version, endpoint, health or components, one back after being
/// silent — or one gone. Plain heartbeats that change nothing else are not reported.
#[derive(Debug, Clone)]
pub enum InstanceUpdate {
    /// Added or changed.
    Upserted(Instance),
    /// Gone: `deregistered`, `missing` or `forgotten`.
    Removed {
        /// The instance as last known.
        instance: Instance,
        /// Why.
        reason: &'static str,
    },
}

impl InstanceUpdate {
    /// The instance concerned.
    pub fn instance(&self) -> &Instance {
        match self {
            InstanceUpdate::Upserted(i) | InstanceUpdate::Removed { instance: i, .. } => i,
        }
    }
}

/// Whether the change from `prev` to `next` is worth an [`InstanceUpdate`].
fn matters(prev: Option<&Instance>, next: &Instance, ttl: Duration) -> bool {
    let Some(p) = prev else {
        return true;
    };
    let silent = (next.last_seen - p.last_seen) > ttl;
    silent
        || p.version_id != next.version_id
        || p.env != next.env
        || p.service != next.service
        || p.endpoint != next.endpoint
        || p.health != next.health
        || p.components != next.components
}

/// A release change and when its service converged on it (every live instance current).
#[derive(Debug, Clone, PartialEq)]
pub struct Convergence {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The release.
    pub version_id: String,
    /// Its revision.
    pub revision: i64,
    /// When it became expected.
    pub registered_at: time::OffsetDateTime,
    /// When every live instance of the service ran it; `None` while some do not (or it was
    /// replaced before that).
    pub converged_at: Option<time::OffsetDateTime>,
    /// Replaced by a newer release before converging.
    pub superseded: bool,
}

/// How many release changes the convergence record keeps.
const CONVERGENCE_KEPT: usize = 100;

/// The in-memory projection of the store.
pub struct Projection {
    releases: RwLock<HashMap<String, HashMap<String, Arc<Change>>>>,
    /// Valid tokens.
    pub tokens: TokenSet,
    instances: Mutex<Fleet>,
    /// Instance ids changed by local heartbeats since the last flush.
    dirty: Mutex<HashSet<String>>,
    /// Instance ids this replica is writing or wrote to the feed, with the last feed
    /// position of that write (`i64::MAX` while it is in flight), until the cursor passes
    /// it. An older tombstone read meanwhile must not remove what the write brought back.
    unsettled: Mutex<HashMap<String, i64>>,
    changes: broadcast::Sender<Arc<Change>>,
    events: broadcast::Sender<Arc<Event>>,
    cursors: watch::Sender<Cursors>,
    /// Bumped after every reload of the token set (streams re-check their token).
    token_epoch: watch::Sender<u64>,
    /// Wakes the projector after a local write, without waiting for the store's feed.
    poke: Notify,
    sink: RwLock<Option<Arc<dyn InstanceSink>>>,
    instance_updates: broadcast::Sender<Arc<InstanceUpdate>>,
    /// An instance silent longer than this is missing (milliseconds).
    ttl_ms: AtomicU64,
    convergence: Mutex<VecDeque<Convergence>>,
    /// Release changes applied (for /metrics).
    pub changes_applied: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, Poisoned> {
    m.lock().map_err(|_| Poisoned)
}

impl Projection {
    /// Loads the starting state. Cursors are read *before* the snapshots, so anything
    /// committed in between is applied again by the first catch-up (idempotently).
    pub async fn load(store: &dyn Store) -> Result<Arc<Projection>, StoreError> {
        let revision = store.last_revision().await?;
        let event_id = store.last_event_id().await?;
        let p = Projection {
            releases: RwLock::new(HashMap::new()),
            tokens: TokenSet::default(),
            instances: Mutex::new(Fleet::default()),
            dirty: Mutex::new(HashSet::new()),
            unsettled: Mutex::new(HashMap::new()),
            changes: broadcast::channel(1024).0,
            events: broadcast::channel(1024).0,
            cursors: watch::channel(Cursors {
                revision,
                event_id,
                instance_seq: 0,
            })
            .0,
            token_epoch: watch::channel(0).0,
            poke: Notify::new(),
            sink: RwLock::new(None),
            instance_updates: broadcast::channel(4096).0,
            ttl_ms: AtomicU64::new(30_000),
            convergence: Mutex::new(VecDeque::new()),
            changes_applied: AtomicU64::new(0),
        };
        for r in store.all_expected().await? {
            p.put_release(Change::new(r));
        }
        p.reload_tokens(store).await?;
        p.catch_up_instances(store).await?;
        Ok(Arc::new(p))
    }

    /// The expected release of a service.
    pub fn expected(&self, env: &str, service: &str) -> Result<Option<Arc<Change>>, Poisoned> {
        let g = self.releases.read().map_err(|_| Poisoned)?;
        Ok(g.get(env).and_then(|m| m.get(service)).cloned())
    }

    /// Every expected release, oldest revision first.
    pub fn all_expected(&self) -> Result<Vec<Arc<Change>>, Poisoned> {
        let g = self.releases.read().map_err(|_| Poisoned)?;
        let mut v: Vec<_> = g.values().flat_map(|m| m.values().cloned()).collect();
        v.sort_by_key(|c| c.release.revision);
        Ok(v)
    }

    /// A copy of every known instance.
    pub fn instances(&self) -> Result<Vec<Instance>, Poisoned> {
        Ok(lock(&self.instances)?.values().cloned().collect())
    }

    /// Runs `f` on the indexed instance set (under its lock: keep `f` short and never
    /// await in it).
    pub fn with_fleet<R>(&self, f: impl FnOnce(&Fleet) -> R) -> Result<R, Poisoned> {
        let g = lock(&self.instances)?;
        Ok(f(&g))
    }

    /// A copy of one service's instances, ordered by id.
    pub fn instances_of(&self, env: &str, service: &str) -> Result<Vec<Instance>, Poisoned> {
        Ok(lock(&self.instances)?
            .of_service(env, service)
            .cloned()
            .collect())
    }

    /// Sets the TTL after which a silent instance counts as missing.
    pub fn set_instance_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// The TTL after which a silent instance counts as missing.
    pub fn instance_ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Subscribes to instance changes that matter (see [`InstanceUpdate`]).
    pub fn subscribe_instances(&self) -> broadcast::Receiver<Arc<InstanceUpdate>> {
        self.instance_updates.subscribe()
    }

    fn announce(&self, update: InstanceUpdate) {
        // No receivers is fine: nobody is watching instances.
        let _ = self.instance_updates.send(Arc::new(update));
    }

    /// The recent release changes and their convergence, newest first.
    pub fn convergence(&self) -> Result<Vec<Convergence>, Poisoned> {
        Ok(lock(&self.convergence)?.iter().rev().cloned().collect())
    }

    /// Marks the pending release changes whose service now runs them everywhere (at
    /// least one live instance, none stale, draining or unknown). Returns the newly
    /// converged, for the convergence histogram.
    pub fn check_convergence(
        &self,
        now: time::OffsetDateTime,
    ) -> Result<Vec<Convergence>, Poisoned> {
        let pending: Vec<(String, String, i64)> = lock(&self.convergence)?
            .iter()
            .filter(|c| c.converged_at.is_none() && !c.superseded)
            .map(|c| (c.env.clone(), c.service.clone(), c.revision))
            .collect();
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.instance_ttl();
        let mut done = Vec::new();
        for (env, service, revision) in pending {
            let Some(exp) = self.expected(&env, &service)? else {
                continue;
            };
            if exp.release.revision != revision {
                continue;
            }
            let c = lock(&self.instances)?.counts(
                &env,
                &service,
                Some((&exp.release.release, exp.release.registered_at)),
                now,
                ttl,
            );
            let n = c.counts;
            if n.current > 0 && n.stale == 0 && n.draining == 0 && n.unknown == 0 {
                done.push(revision);
            }
        }
        let mut out = Vec::new();
        let mut g = lock(&self.convergence)?;
        for c in g.iter_mut() {
            if done.contains(&c.revision) && c.converged_at.is_none() {
                c.converged_at = Some(now);
                out.push(c.clone());
            }
        }
        Ok(out)
    }

    fn record_release(&self, r: &StoredRelease) {
        let Ok(mut g) = lock(&self.convergence) else {
            return;
        };
        if g.iter().any(|c| c.revision == r.revision) {
            return;
        }
        for c in g.iter_mut() {
            if c.env == r.env && c.service == r.service && c.converged_at.is_none() {
                c.superseded = true;
            }
        }
        g.push_back(Convergence {
            env: r.env.clone(),
            service: r.service.clone(),
            version_id: r.release.version_id.clone(),
            revision: r.revision,
            registered_at: r.registered_at,
            converged_at: None,
            superseded: false,
        });
        while g.len() > CONVERGENCE_KEPT {
            g.pop_front();
        }
    }

    /// Subscribes to release changes.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Subscribes to the event log.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Changes after every reload of the token set.
    pub fn subscribe_tokens(&self) -> watch::Receiver<u64> {
        self.token_epoch.subscribe()
    }

    /// How far the projection has applied the store.
    pub fn cursors(&self) -> Cursors {
        *self.cursors.borrow()
    }

    /// Installs what is told about instance changes (the leader's mirror), or removes it.
    pub fn set_sink(&self, sink: Option<Arc<dyn InstanceSink>>) {
        if let Ok(mut g) = self.sink.write() {
            *g = sink;
        }
    }

    fn sink(&self) -> Option<Arc<dyn InstanceSink>> {
        self.sink.read().ok().and_then(|g| g.clone())
    }

    /// Wakes the projector now (after a local write).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Waits until the projection has applied `revision` and `event_id` (0: don't care),
    /// at most `timeout`. Returns whether it got there.
    pub async fn wait_for(&self, revision: i64, event_id: i64, timeout: Duration) -> bool {
        self.poke();
        let mut rx = self.cursors.subscribe();
        let reached = |c: &Cursors| c.revision >= revision && c.event_id >= event_id;
        tokio::time::timeout(timeout, rx.wait_for(reached))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn put_release(&self, change: Arc<Change>) -> bool {
        let Ok(mut g) = self.releases.write() else {
            return false;
        };
        let slot = g
            .entry(change.release.env.clone())
            .or_default()
            .entry(change.release.service.clone());
        match slot {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if o.get().release.revision >= change.release.revision {
                    return false;
                }
                o.insert(change);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(change);
            }
        }
        true
    }

    async fn reload_tokens(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut entries = Vec::new();
        for t in store.tokens().await? {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&t.hash, &mut hash).is_ok() {
                entries.push((
                    hash,
                    Principal {
                        name: t.name,
                        role: t.role,
                        hash,
                    },
                ));
            }
        }
        self.tokens.replace(entries);
        self.token_epoch.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Applies every committed release change and event after the cursors, in order.
    pub async fn catch_up_log(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut cur = self.cursors();
        loop {
            let page = store.changes_since(cur.revision, PAGE).await?;
            let n = page.len();
            for r in page {
                cur.revision = r.revision;
                let change = Change::new(r);
                if self.put_release(change.clone()) {
                    self.changes_applied.fetch_add(1, Ordering::Relaxed);
                    self.record_release(&change.release);
                }
                // No receivers is fine: nobody is watching.
                let _ = self.changes.send(change);
            }
            self.cursors.send_modify(|c| c.revision = cur.revision);
            if n < PAGE as usize {
                break;
            }
        }
        loop {
            let page = store.events_since(cur.event_id, PAGE).await?;
            let n = page.len();
            if page.iter().any(|e| e.kind.starts_with("token_")) {
                // Before the cursor moves: a revocation answered by any replica is in
                // force here once this replica reports the event applied.
                self.reload_tokens(store).await?;
            }
            for e in page {
                cur.event_id = e.id;
                self.apply_event(&e);
                let _ = self.events.send(Arc::new(e));
            }
            self.cursors.send_modify(|c| c.event_id = cur.event_id);
            if n < PAGE as usize {
                break;
            }
        }
        Ok(())
    }

    fn apply_event(&self, e: &Event) {
        let Some(id) = e.data.get("instance_id").and_then(|v| v.as_str()) else {
            return;
        };
        match e.kind.as_str() {
            "instance_deregistered" => {
                let removed = lock(&self.instances).ok().and_then(|mut m| m.remove(id));
                if let Ok(mut d) = lock(&self.dirty) {
                    d.remove(id);
                }
                if let Some(t) = removed {
                    if let Some(sink) = self.sink() {
                        sink.removed(&t);
                    }
                    self.announce(InstanceUpdate::Removed {
                        instance: t,
                        reason: "deregistered",
                    });
                }
            }
            "instance_missing" => {
                let inst = lock(&self.instances).ok().and_then(|m| m.get(id).cloned());
                if let Some(i) = inst {
                    if let Some(sink) = self.sink() {
                        sink.removed(&i);
                    }
                    self.announce(InstanceUpdate::Removed {
                        instance: i,
                        reason: "missing",
                    });
                }
            }
            _ => {}
        }
    }

    /// Applies every instance row written after the cursor (heartbeats flushed by any
    /// replica): a newer `last_seen` wins; a tombstone removes unless a newer local
    /// heartbeat is waiting to be flushed.
    pub async fn catch_up_instances(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut seq = self.cursors().instance_seq;
        loop {
            let page = store.instances_since(seq, PAGE * 5).await?;
            let n = page.len();
            if let Some(last) = page.last() {
                seq = last.seq;
            }
            self.merge_instances(page);
            // Never backwards: a local flush may have moved the cursor past its own rows.
            self.cursors
                .send_modify(|c| c.instance_seq = c.instance_seq.max(seq));
            self.settle_unsettled();
            if n < (PAGE * 5) as usize {
                return Ok(());
            }
        }
    }

    fn merge_instances(&self, page: Vec<InstanceChange>) {
        let sink = self.sink();
        let Ok(mut map) = lock(&self.instances) else {
            return;
        };
        // Held while merging (instances, then dirty, then unsettled: the order every
        // other path uses or never nests), rather than copying the whole dirty set every
        // poll.
        let Ok(dirty) = lock(&self.dirty) else {
            return;
        };
        let Ok(unsettled) = lock(&self.unsettled) else {
            return;
        };
        let ttl = self.instance_ttl();
        for c in page {
            match c.instance {
                Some(inst) => {
                    let prev = map.get(&c.instance_id);
                    let newer = prev.is_none_or(|t| inst.last_seen >= t.last_seen);
                    if newer {
                        if let Some(s) = &sink {
                            s.upserted(&inst);
                        }
                        let news = matters(prev, &inst, ttl);
                        let announced = news.then(|| inst.clone());
                        map.insert(inst);
                        if let Some(i) = announced {
                            self.announce(InstanceUpdate::Upserted(i));
                        }
                    }
                }
                None => {
                    // A local heartbeat waiting for its flush, or written after this
                    // tombstone, is newer than the deregistration or the forgetting.
                    let superseded = dirty.contains(&c.instance_id)
                        || unsettled
                            .get(&c.instance_id)
                            .is_some_and(|&written| written > c.seq);
                    if !superseded && let Some(t) = map.remove(&c.instance_id) {
                        if let Some(s) = &sink {
                            s.removed(&t);
                        }
                        self.announce(InstanceUpdate::Removed {
                            instance: t,
                            reason: "forgotten",
                        });
                    }
                }
            }
        }
    }

    /// Records a heartbeat received by this replica (soft state, flushed in batches).
    /// `update` gets the previous state, if any, and returns the new one.
    pub fn heartbeat<R>(
        &self,
        id: &str,
        update: impl FnOnce(Option<&Instance>) -> (Instance, R),
    ) -> Result<R, Poisoned> {
        let mut map = lock(&self.instances)?;
        let prev = map.get(id);
        let (inst, r) = update(prev);
        let announced = matters(prev, &inst, self.instance_ttl()).then(|| inst.clone());
        map.insert(inst);
        // Marked dirty under the instance lock: a merge in between would see a fresh
        // instance nobody will flush and let an older tombstone remove it.
        lock(&self.dirty)?.insert(id.to_string());
        drop(map);
        if let Some(i) = announced {
            self.announce(InstanceUpdate::Upserted(i));
        }
        Ok(r)
    }

    /// This replica wrote instance-feed positions `first..=last` (its own heartbeats, which
    /// memory already holds, as new or newer). When everything before them is applied,
    /// the cursor moves past them without reading them back: with one replica the
    /// instance feed then costs no read at all.
    pub fn wrote_instances(&self, first: i64, last: i64, written: &[Instance]) {
        if let Ok(mut u) = lock(&self.unsettled) {
            for i in written {
                u.insert(i.instance_id.clone(), last);
            }
        }
        let mut skipped = false;
        self.cursors.send_modify(|c| {
            if c.instance_seq == first - 1 {
                c.instance_seq = last;
                skipped = true;
            }
        });
        self.settle_unsettled();
        // What the projector would have told the sink had it read them back.
        if skipped && let Some(sink) = self.sink() {
            for i in written {
                sink.upserted(i);
            }
        }
    }

    /// Takes the instances changed by local heartbeats since the last call.
    /// They count as in flight (see `unsettled`) until [`Projection::wrote_instances`] or
    /// [`Projection::restore_dirty`].
    pub fn take_dirty(&self) -> Result<Vec<Instance>, Poisoned> {
        let ids: Vec<String> = {
            let mut dirty = lock(&self.dirty)?;
            // Moved under the dirty lock, so a merge always sees them in one set or the other.
            let mut unsettled = lock(&self.unsettled)?;
            dirty
                .drain()
                .inspect(|id| {
                    unsettled.insert(id.clone(), i64::MAX);
                })
                .collect()
        };
        let map = lock(&self.instances)?;
        Ok(ids.iter().filter_map(|id| map.get(id).cloned()).collect())
    }

    /// Puts back instances whose flush failed, unless they were replaced meanwhile.
    pub fn restore_dirty(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut d) = lock(&self.dirty) {
            let ids: Vec<String> = ids.into_iter().collect();
            if let Ok(mut u) = lock(&self.unsettled) {
                for id in &ids {
                    u.remove(id);
                }
            }
            d.extend(ids);
        }
    }

    /// Forgets the local writes the instance cursor has passed.
    fn settle_unsettled(&self) {
        let cursor = self.cursors.borrow().instance_seq;
        if let Ok(mut u) = lock(&self.unsettled) {
            u.retain(|_, &mut written| written > cursor);
        }
    }
}

/// Runs the projector until `shutdown` flips: wakes on the store's feed, on a local poke,
/// or on a timer (`log_poll` for releases/events, `instance_poll` for instances).
pub async fn run_projector(
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    mut shutdown: watch::Receiver<bool>,
    log_poll: Duration,
    instance_poll: Duration,
) {
    let mut feed = Some(store.feed());
    let mut log_tick = tokio::time::interval(log_poll);
    log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inst_tick = tokio::time::interval(instance_poll);
    inst_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let instances = tokio::select! {
            r = async {
                match feed.as_mut() {
                    Some(f) => f.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if r.is_err() {
                    // The store dropped its feed: fall back to the timers alone.
                    feed = None;
                }
                false
            }
            _ = projection.poke.notified() => false,
            _ = log_tick.tick() => false,
            _ = inst_tick.tick() => true,
            _ = shutdown.changed() => return,
        };
        let res = if instances {
            projection.catch_up_instances(store.as_ref()).await
        } else {
            projection.catch_up_log(store.as_ref()).await
        };
        match res {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("projector: the store answers again; caught up");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                super::metrics::store_error();
                failing = true;
                tracing::error!(error = %e, "projector: reading the store failed; retrying");
            }
            Err(_) => super::metrics::store_error(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, version: &str) -> Instance {
        Instance::new(
            id,
            "production",
            "api",
            version,
            time::OffsetDateTime::now_utc(),
        )
    }

    fn beat(p: &Projection, id: &str, version: &str) {
        p.heartbeat(id, |_| (instance(id, version), ()))
            .expect("heartbeat");
    }

    async fn flush(p: &Projection, store: &dyn Store, batch: Vec<Instance>) {
        let (first, last) = store
            .save_instances(&batch)
            .await
            .expect("save")
            .expect("written");
        p.wrote_instances(first, last, &batch);
    }

    /// The agent deregisters its worker and the new one heartbeats at once. The poll that
    /// read the tombstone before the new heartbeat's flush must not remove it after,
    /// or the instance vanishes until its next heartbeat.
    #[tokio::test]
    async fn a_tombstone_read_before_a_local_flush_does_not_remove_what_the_flush_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = lockstep_store::SqliteStore::open(dir.path())
            .await
            .expect("store");
        let p = Projection::load(&store).await.expect("load");
        beat(&p, "n-1", "v1");
        let batch = p.take_dirty().expect("dirty");
        flush(&p, &store, batch).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        store
            .deregister_instance("n-1", "worker")
            .await
            .expect("deregister")
            .expect("registered");
        p.catch_up_log(&store).await.expect("events");
        assert!(p.instances_of("production", "api").expect("map").is_empty());

        // The projector reads the feed (the tombstone) …
        let page = store
            .instances_since(p.cursors().instance_seq, 100)
            .await
            .expect("feed");
        assert!(page.iter().all(|c| c.instance.is_none()));
        // … the worker comes back and the flusher takes it …
        tokio::time::sleep(Duration::from_millis(2)).await;
        beat(&p, "n-1", "v2");
        let batch = p.take_dirty().expect("dirty");
        // … the projector applies what it read, then the flush lands.
        p.merge_instances(page);
        p.cursors.send_modify(|c| c.instance_seq += 1);
        flush(&p, &store, batch).await;

        let here = |p: &Projection| {
            p.instances_of("production", "api")
                .expect("map")
                .into_iter()
                .map(|i| i.version_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(here(&p), vec!["v2".to_string()]);
        p.catch_up_instances(&store).await.expect("catch up");
        assert_eq!(here(&p), vec!["v2".to_string()]);
        // Once the cursor passed the write, nothing is kept for it.
        assert!(lock(&p.unsettled).expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_poisoned_release_map_reads_as_unavailable_never_as_no_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = lockstep_store::SqliteStore::open(dir.path())
            .await
            .expect("store");
        let p = Projection::load(&store).await.expect("load");
        let p2 = p.clone();
        let _ = std::thread::spawn(move || {
            let _guard = p2.releases.write();
            panic!("poisoning the release map on purpose");
        })
        .join();
        assert!(
            p.expected("production", "api").is_err(),
            "a failure must not read as \"no release\" (which makes workers serve)"
        );
        assert!(p.all_expected().is_err());
    }
}
