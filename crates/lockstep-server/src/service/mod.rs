//! The registry as a service, with no HTTP in it: the one place that writes to the store
//! and lets the projection catch up. The axum handlers, the background jobs and tests call
//! it; alerts, rollouts and the dashboard will consume the same projection and feed.
//!
//! Every write follows one recipe: validate, write to the store (one transaction, with its
//! event), poke the projector, and wait until the projection has applied what was written
//! — so the caller's next read on this replica sees it, and every other replica sees it
//! through its own projector, never through this handler.

pub mod alerts;
pub mod config;
pub mod drift;
pub mod fleet;
pub mod leader;
pub mod metrics;
pub mod projection;
pub mod rollout;
pub mod tokens;

use lockstep_api::{CreatedToken, Event, Heartbeat, PutRelease, RollbackRequest};
use lockstep_core::{
    CoreError, Instance, Role, Status, StoredRelease, instance_status, short_id, validate_name,
    validate_version_id,
};
use lockstep_store::{Registration, Rollback, Store, StoreError, StoredToken};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

pub use config::Config;
pub use leader::Leadership;
pub use projection::{
    Change, Convergence, Cursors, InstanceSink, InstanceUpdate, Poisoned, Projection,
};
use tokens::{generate_token, hash_token};

/// Name of the bootstrap admin token.
pub const BOOTSTRAP_TOKEN_NAME: &str = "admin";

/// How often pending release changes are checked for convergence.
const CONVERGENCE_CHECK: Duration = Duration::from_millis(250);

/// How long a write waits for its own replica's projection before answering anyway.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a registry operation failed. HTTP mapping lives at the server edge.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A domain rule refused it (invalid name, downgrade, not rollback-safe, …).
    #[error(transparent)]
    Rule(#[from] CoreError),
    /// The input is malformed in a way no domain rule names.
    #[error("{0}")]
    BadRequest(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The call conflicts with the current state (e.g. a rollout that is not running).
    #[error("{0}")]
    Conflict(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// In-memory state cannot be trusted after an internal failure.
    #[error(transparent)]
    Unavailable(#[from] Poisoned),
}

/// Checks an instance id: 1–128 characters, no whitespace, control characters or `/`.
pub fn check_instance_id(id: &str) -> Result<(), RegistryError> {
    if id.is_empty()
        || id.chars().count() > 128
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(RegistryError::BadRequest(
            "instance_id must be 1-128 characters without whitespace or '/'".into(),
        ));
    }
    Ok(())
}

/// Checks an environment and a service name.
pub fn check_scope(env: &str, service: &str) -> Result<(), RegistryError> {
    validate_name("environment", env)?;
    validate_name("service", service)?;
    Ok(())
}

/// The answer to a heartbeat.
pub struct HeartbeatOutcome {
    /// The instance's status against the expected release.
    pub status: Status,
    /// The expected release, if any.
    pub expected: Option<Arc<Change>>,
    /// First heartbeat of this id on this replica, or back after being missing.
    pub news: Option<&'static str>,
}

/// The registry service.
pub struct RegistryService {
    store: Arc<dyn Store>,
    projection: Arc<Projection>,
    config: Config,
    leadership: Arc<Leadership>,
    mirror: Option<lockstep_mirror::Mirror>,
    alerts: Arc<alerts::Alerts>,
    rollouts: Arc<rollout::Rollouts>,
    /// Heartbeats accepted by this replica.
    pub heartbeats: AtomicU64,
    /// Release registered → every live instance current, in seconds.
    pub convergence: metrics::Histogram,
}

impl RegistryService {
    /// Opens the service over `store`: installs the bootstrap admin token (`admin_token`,
    /// or a generated one when the store has no token at all — returned to print once)
    /// and loads the projection.
    pub async fn open(
        store: Arc<dyn Store>,
        config: Config,
        admin_token: Option<&str>,
        mirror: Option<lockstep_mirror::Mirror>,
    ) -> Result<(Arc<RegistryService>, Option<String>), StoreError> {
        let mut generated = None;
        let bootstrap = match admin_token {
            Some(t) => Some(t.to_string()),
            None if store.tokens().await?.is_empty() => {
                let t = generate_token();
                generated = Some(t.clone());
                Some(t)
            }
            None => None,
        };
        if let Some(t) = bootstrap {
            let had_admin = store.tokens().await?.iter().any(|t| t.role == Role::Admin);
            match store
                .upsert_token(StoredToken {
                    name: BOOTSTRAP_TOKEN_NAME.into(),
                    role: Role::Admin,
                    hash: hex::encode(hash_token(&t)),
                    created_at: OffsetDateTime::now_utc(),
                })
                .await
            {
                Ok(Some(_)) if generated.is_some() => {
                    tracing::info!(
                        name = BOOTSTRAP_TOKEN_NAME,
                        "first start: generated a bootstrap admin token (printed once on stdout)"
                    );
                }
                Ok(Some(_)) if !had_admin => {
                    tracing::warn!(
                        name = BOOTSTRAP_TOKEN_NAME,
                        "admin access installed from the bootstrap token (LOCKSTEP_ADMIN_TOKEN)"
                    );
                }
                Ok(Some(_)) => {
                    tracing::info!(
                        name = BOOTSTRAP_TOKEN_NAME,
                        "bootstrap admin token installed"
                    );
                }
                Ok(None) => {}
                Err(StoreError::Revoked(_)) => {
                    // A revoked secret must not come back by a restart. Recovery is a new
                    // secret, which is logged when it is installed.
                    tracing::warn!(
                        "the bootstrap admin token (LOCKSTEP_ADMIN_TOKEN) was revoked and stays \
                         revoked; to recover admin access, set LOCKSTEP_ADMIN_TOKEN to a new \
                         secret and restart"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let projection = Projection::load(store.as_ref()).await?;
        projection.set_instance_ttl(config.instance_ttl);
        let leadership = Arc::new(Leadership::new(config.replica_id.clone()));
        Ok((
            Arc::new(RegistryService {
                store,
                projection,
                config,
                leadership,
                mirror,
                alerts: Arc::new(alerts::Alerts::new()),
                rollouts: Arc::new(rollout::Rollouts::new()),
                heartbeats: AtomicU64::new(0),
                convergence: metrics::Histogram::new(metrics::CONVERGENCE_BOUNDS),
            }),
            generated,
        ))
    }

    /// The store (for reads that go to the source of truth: history, backlogs).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The in-memory projection.
    pub fn projection(&self) -> &Arc<Projection> {
        &self.projection
    }

    /// Tunables.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Who leads background work.
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    /// Drift alerts: settings, open counts, last check, metrics.
    pub fn alerts(&self) -> &Arc<alerts::Alerts> {
        &self.alerts
    }

    /// The Redis mirror, when configured.
    pub fn mirror(&self) -> Option<&lockstep_mirror::Mirror> {
        self.mirror.as_ref()
    }

    async fn settle(&self, revision: i64, event_id: i64) {
        if !self
            .projection
            .wait_for(revision, event_id, CATCH_UP_TIMEOUT)
            .await
        {
            tracing::warn!(
                revision,
                event_id,
                "the projection did not catch up with a committed write in time"
            );
        }
    }

    /// Registers a release and makes it expected.
    pub async fn register(
        &self,
        env: &str,
        service: &str,
        body: PutRelease,
        actor: &str,
    ) -> Result<StoredRelease, RegistryError> {
        check_scope(env, service)?;
        validate_version_id(&body.release.version_id)?;
        for a in &body.release.accepts {
            validate_version_id(a)?;
        }
        let mut release = body.release;
        if release.deployed_at.is_none() {
            release.deployed_at = Some(OffsetDateTime::now_utc());
        }
        let reason = release.reason.take();
        let out = self
            .store
            .register(Registration {
                env: env.into(),
                service: service.into(),
                release,
                force: body.force,
                actor: actor.into(),
                reason,
            })
            .await
            .inspect_err(|e| {
                tracing::warn!(env, service, actor, error = %e, "registration refused");
            })?;
        if out.changed {
            tracing::info!(env, service, version = %short_id(&out.release.release.version_id),
                revision = out.release.revision, actor, "release registered");
            self.settle(out.release.revision, out.event.map_or(0, |e| e.id))
                .await;
        }
        Ok(out.release)
    }

    /// Makes the previous release (or the one named) expected again.
    pub async fn rollback(
        &self,
        env: &str,
        service: &str,
        body: RollbackRequest,
        actor: &str,
    ) -> Result<StoredRelease, RegistryError> {
        check_scope(env, service)?;
        if let Some(v) = &body.version_id {
            validate_version_id(v)?;
        }
        let out = self
            .store
            .rollback(Rollback {
                env: env.into(),
                service: service.into(),
                to: body.version_id,
                force: body.force,
                actor: actor.into(),
                reason: body.reason,
                data: serde_json::json!({ "now": body.now, "force": body.force }),
            })
            .await
            .inspect_err(|e| {
                tracing::warn!(env, service, actor, error = %e, "rollback refused");
            })?;
        if out.changed {
            tracing::warn!(env, service, version = %short_id(&out.release.release.version_id),
                revision = out.release.revision, actor, "rolled back");
            self.settle(out.release.revision, out.event.map_or(0, |e| e.id))
                .await;
        }
        Ok(out.release)
    }

    /// Creates a token; the secret is in the answer only.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        actor: &str,
    ) -> Result<CreatedToken, RegistryError> {
        validate_name("token", name)?;
        let token = generate_token();
        let ev = self
            .store
            .create_token(
                StoredToken {
                    name: name.into(),
                    role,
                    hash: hex::encode(hash_token(&token)),
                    created_at: OffsetDateTime::now_utc(),
                },
                actor,
            )
            .await?;
        self.settle(0, ev.id).await;
        tracing::info!(name, role = %role, actor, "token created");
        Ok(CreatedToken {
            name: name.into(),
            role,
            token,
        })
    }

    /// Revokes a token by name: refused on this replica once this answers, and on every
    /// other replica once its projector applies the event.
    pub async fn revoke_token(&self, name: &str, actor: &str) -> Result<Event, RegistryError> {
        let ev = self
            .store
            .revoke_token(name, actor)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("no token named {name:?}")))?;
        self.settle(0, ev.id).await;
        tracing::info!(name, actor, "token revoked");
        Ok(ev)
    }

    /// Records a heartbeat (soft state: memory now, the store within a flush interval)
    /// and answers with the instance's status.
    pub fn heartbeat(&self, hb: Heartbeat) -> Result<HeartbeatOutcome, RegistryError> {
        check_scope(&hb.env, &hb.service)?;
        check_instance_id(&hb.instance_id)?;
        validate_version_id(&hb.version_id)?;
        let now = OffsetDateTime::now_utc();
        let expected = self.projection.expected(&hb.env, &hb.service)?;
        let status = instance_status(
            expected.as_ref().map(|c| &c.release.release),
            &hb.version_id,
            &hb.components,
            false,
        );
        let ttl = self.config.instance_ttl;
        let id = hb.instance_id.clone();
        let news = self.projection.heartbeat(&id, |prev| {
            let (first_seen, news) = match prev {
                Some(p) => {
                    let moved =
                        p.version_id != hb.version_id || p.service != hb.service || p.env != hb.env;
                    let back = now - p.last_seen > ttl;
                    (
                        if moved { now } else { p.first_seen },
                        back.then_some("is back"),
                    )
                }
                None => (now, Some("registered")),
            };
            let inst = Instance {
                instance_id: hb.instance_id,
                env: hb.env,
                service: hb.service,
                version_id: hb.version_id,
                git_sha: hb.git_sha,
                build_date: hb.build_date,
                components: hb.components,
                host: hb.host,
                pid: hb.pid,
                started_at: hb.started_at,
                first_seen,
                last_seen: now,
                endpoint: hb.endpoint,
                health: hb.health,
            };
            if let Some(what) = news {
                tracing::info!(instance = %inst.instance_id, service = %inst.service,
                    status = status.as_str(), version = %short_id(&inst.version_id), "instance {what}");
            }
            (inst, news)
        })?;
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(HeartbeatOutcome {
            status,
            expected,
            news,
        })
    }

    /// Deregisters an instance (clean shutdown of a worker).
    pub async fn deregister(&self, id: &str, actor: &str) -> Result<Instance, RegistryError> {
        check_instance_id(id)?;
        // Local heartbeats not yet flushed must reach the store first, or the flush
        // after the deregistration would look like a newer heartbeat.
        self.flush().await;
        let (inst, ev) = self
            .store
            .deregister_instance(id, actor)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("no instance {id:?} is registered")))?;
        // The store lets a heartbeat replace the tombstone only when it is newer, compared
        // in milliseconds. A worker that re-registers at once after this answer (the
        // agent does, after each apply) could land in the tombstone's own millisecond and
        // be dropped until its next heartbeat; answering only once that millisecond has
        // passed makes every heartbeat caused by the answer count as newer. Bounded, so a
        // `last_seen` from a replica whose clock runs ahead costs at most a few ms.
        let tombstone_ms = lockstep_store::millis(OffsetDateTime::now_utc())
            .max(lockstep_store::millis(inst.last_seen));
        for _ in 0..5 {
            if lockstep_store::millis(OffsetDateTime::now_utc()) > tombstone_ms {
                break;
            }
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
        self.settle(0, ev.id).await;
        tracing::info!(instance = %id, service = %inst.service, "instance deregistered");
        Ok(inst)
    }

    /// Writes heartbeats received by this replica to the store. Returns how many.
    pub async fn flush(&self) -> usize {
        let batch = match self.projection.take_dirty() {
            Ok(b) => b,
            Err(_) => return 0,
        };
        if batch.is_empty() {
            return 0;
        }
        match self.store.save_instances(&batch).await {
            Ok(range) => {
                if let Some((first, last)) = range {
                    self.projection.wrote_instances(first, last, &batch);
                }
                batch.len()
            }
            Err(e) => {
                tracing::error!(error = %e, count = batch.len(), "flushing heartbeats failed; will retry");
                self.projection
                    .restore_dirty(batch.into_iter().map(|i| i.instance_id));
                0
            }
        }
    }

    /// Starts the background work: the projector, the heartbeat flusher and the leader
    /// election (whose leader runs the TTL scan and the Redis mirror). All end when
    /// `shutdown` flips; the caller then calls [`RegistryService::stop`].
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let proj = tokio::spawn(projection::run_projector(
            self.projection.clone(),
            self.store.clone(),
            shutdown.clone(),
            self.config.log_poll,
            self.config.instance_poll,
        ));
        let me = self.clone();
        let mut sd = shutdown.clone();
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.config.flush_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { me.flush().await; }
                    _ = sd.changed() => return,
                }
            }
        });
        let me = self.clone();
        let mut sd = shutdown.clone();
        let converge = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CONVERGENCE_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => me.observe_convergence(),
                    _ = sd.changed() => return,
                }
            }
        });
        let alert_tasks = alerts::spawn(self, shutdown.clone());
        let coordinator = tokio::spawn(rollout::run(self.clone(), shutdown.clone()));
        let leader = tokio::spawn(leader::run(self.clone(), shutdown));
        let mut tasks = vec![proj, flusher, converge, leader, coordinator];
        tasks.extend(alert_tasks);
        tasks
    }

    /// Records the release changes whose service converged since the last call.
    fn observe_convergence(&self) {
        let Ok(done) = self.projection.check_convergence(OffsetDateTime::now_utc()) else {
            return;
        };
        for c in done {
            if let Some(at) = c.converged_at {
                let secs = (at - c.registered_at).as_seconds_f64().max(0.0);
                self.convergence.observe(secs);
                tracing::info!(env = %c.env, service = %c.service,
                    version = %short_id(&c.version_id), seconds = secs,
                    "every live instance runs the expected release");
            }
        }
    }

    /// After the background tasks ended: flush heartbeats, give the lease up so another
    /// replica leads at once, and flush the mirror.
    pub async fn stop(&self) -> usize {
        let n = self.flush().await;
        self.leadership.resign(self.store.as_ref()).await;
        if let Some(m) = &self.mirror {
            m.shutdown().await;
        }
        n
    }
}
