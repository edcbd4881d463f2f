//! One leader for the work that must not run twice: marking instances `missing` (and
//! forgetting them after the retention), and the Redis mirror — later also drift
//! detection, alert delivery and the rollout coordinator.
//!
//! The leader holds a lease row in the store, renewed every `lease_renew`; a replica that
//! dies stops renewing and another takes the lease once it expires (`lease_ttl`). The
//! leader-only writes are fenced in the store itself (`mark_missing` checks the lease in
//! its transaction), so even a leader paused past its lease cannot report twice.

use lockstep_core::Instance;
use lockstep_store::{LEADER_LEASE, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::RegistryService;
use super::projection::InstanceSink;

/// How long forgotten instances stay as tombstones in the instance feed, so that every
/// replica's projector sees them go.
const TOMBSTONE_RETENTION: time::Duration = time::Duration::hours(1);

/// How often the leader reconciles the Redis mirror with the live instances.
const MIRROR_RESYNC: Duration = Duration::from_secs(30);

/// Who leads, as this replica knows it.
pub struct Leadership {
    replica: String,
    is_leader: AtomicBool,
    holder: RwLock<Option<String>>,
}

impl Leadership {
    /// Not leading yet.
    pub fn new(replica: String) -> Leadership {
        Leadership {
            replica,
            is_leader: AtomicBool::new(false),
            holder: RwLock::new(None),
        }
    }

    /// This replica's id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire)
    }

    /// The replica holding the lease at the last check, if any.
    pub fn leader(&self) -> Option<String> {
        self.holder.read().ok().and_then(|g| g.clone())
    }

    fn set(&self, leading: bool, holder: Option<String>) {
        self.is_leader.store(leading, Ordering::Release);
        if let Ok(mut g) = self.holder.write() {
            *g = holder;
        }
    }

    /// Gives the lease up (clean shutdown).
    pub async fn resign(&self, store: &dyn Store) {
        if self.is_leader() {
            if let Err(e) = store.release_lease(LEADER_LEASE, &self.replica).await {
                tracing::warn!(error = %e, "could not release the leader lease; it will expire");
            } else {
                tracing::info!(replica = %self.replica, "leader lease released");
            }
            self.set(false, None);
        }
    }
}

/// Feeds the Redis mirror from the projection while this replica leads.
struct MirrorSink {
    mirror: lockstep_mirror::Mirror,
    ttl: Duration,
}

impl InstanceSink for MirrorSink {
    fn upserted(&self, instance: &Instance) {
        self.mirror.upsert(instance, self.ttl);
    }
    fn removed(&self, instance: &Instance) {
        self.mirror.remove(instance);
    }
}

fn live_instances(svc: &RegistryService) -> Vec<Instance> {
    let now = OffsetDateTime::now_utc();
    let ttl = svc.config.instance_ttl;
    svc.projection
        .instances()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| now - i.last_seen <= ttl)
        .collect()
}

/// The election loop and, while leading, the leader's jobs; ends on shutdown.
pub async fn run(svc: Arc<RegistryService>, mut shutdown: watch::Receiver<bool>) {
    let cfg = svc.config.clone();
    let lead = svc.leadership.clone();
    let mut tick = tokio::time::interval(cfg.lease_renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Until when this replica may act as leader without another successful renewal.
    let mut held_until: Option<Instant> = None;
    let mut first_scan_pending = false;
    let mut last_resync = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let attempt = Instant::now();
        match svc
            .store
            .acquire_lease(LEADER_LEASE, &lead.replica, cfg.lease_ttl)
            .await
        {
            Ok(l) => {
                let was = lead.is_leader();
                lead.set(l.held, Some(l.holder.clone()));
                held_until = l.held.then(|| attempt + cfg.lease_ttl);
                if l.held && !was {
                    tracing::info!(replica = %lead.replica, "this replica is now the leader");
                    first_scan_pending = true;
                    if let Some(m) = &svc.mirror {
                        svc.projection.set_sink(Some(Arc::new(MirrorSink {
                            mirror: m.clone(),
                            ttl: cfg.instance_ttl,
                        })));
                        m.resync(live_instances(&svc), cfg.instance_ttl);
                        last_resync = Instant::now();
                    }
                } else if !l.held && was {
                    tracing::warn!(replica = %lead.replica, leader = %l.holder, "lost the leader lease");
                    svc.projection.set_sink(None);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader lease: the store does not answer");
                if held_until.is_some_and(|t| Instant::now() >= t) && lead.is_leader() {
                    tracing::warn!(replica = %lead.replica, "leader lease expired without renewal; stepping down");
                    lead.set(false, None);
                    svc.projection.set_sink(None);
                    held_until = None;
                }
            }
        }
        if !lead.is_leader() {
            continue;
        }
        scan(&svc, first_scan_pending).await;
        first_scan_pending = false;
        if let Some(m) = &svc.mirror
            && last_resync.elapsed() >= MIRROR_RESYNC
        {
            m.resync(live_instances(&svc), cfg.instance_ttl);
            last_resync = Instant::now();
        }
    }
}

/// The TTL scan: report silent instances once, forget those past the retention.
async fn scan(svc: &RegistryService, first: bool) {
    let cfg = &svc.config;
    let now = OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(cfg.instance_ttl).unwrap_or(time::Duration::seconds(30));
    let retention =
        time::Duration::try_from(cfg.instance_retention).unwrap_or(time::Duration::days(1));
    let replica = svc.leadership.replica();
    match svc.store.mark_missing(replica, now - ttl).await {
        Ok(evs) => {
            for e in &evs {
                tracing::warn!(instance = %e.data["instance_id"].as_str().unwrap_or_default(),
                    env = %e.env.as_deref().unwrap_or_default(),
                    service = %e.service.as_deref().unwrap_or_default(),
                    version = %e.data["version"].as_str().unwrap_or_default(),
                    "instance missing: no heartbeat within its TTL");
            }
            if !evs.is_empty() {
                svc.projection.poke();
            }
        }
        Err(e) => tracing::warn!(error = %e, "TTL scan failed"),
    }
    match svc
        .store
        .expire_instances(replica, now - ttl - retention, now - TOMBSTONE_RETENTION)
        .await
    {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(
                count = ids.len(),
                "forgot instances missing longer than the retention"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "forgetting expired instances failed"),
    }
    if first {
        tracing::info!(replica = %replica, "leader: first TTL scan done");
    }
}
