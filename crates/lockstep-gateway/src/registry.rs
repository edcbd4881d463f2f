//! What the gateway knows from the registry: the expected release of every service (pushed
//! over `GET /v1/watch`, read with the client library's SSE reader) and the instances of
//! every routed environment (pushed over `GET /v1/instances/watch` when the registry has
//! it, else polled from `GET /v1/status?env=` every second).
//!
//! The status of each instance is computed here, with the rule the registry uses
//! (`lockstep_core::instance_status`), from the newest expected release seen on either
//! source: a release change reaches the pools the moment its watch event arrives, however
//! the instance list is learned. With the registry unreachable the pools stay as they
//! were, for at most `fail_open_for` when set (then nothing is served: 503).

use crate::upstream::{Member, Pool};
use futures_util::StreamExt;
use lockstep_api::{InstanceRemoved, InstanceSnapshot, InstanceStatus};
use lockstep_client::RegistryClient;
use lockstep_core::{Instance, Status, StoredRelease, instance_status, short_id};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

type Key = (String, String);

/// One source of instance membership for an environment (the push stream, or polling).
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceEvent {
    /// Every instance of the environment (replaces what was known), with the expected
    /// releases the source knows of.
    Snapshot {
        /// Environment.
        env: String,
        /// Instances.
        instances: Vec<InstanceStatus>,
        /// Expected releases, when the source carries them.
        expected: Vec<StoredRelease>,
    },
    /// One instance changed or appeared.
    Upsert(Box<InstanceStatus>),
    /// One instance is gone.
    Removed {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Instance.
        instance_id: String,
    },
}

#[derive(Default)]
struct Inner {
    expected: HashMap<Key, Arc<StoredRelease>>,
    instances: HashMap<Key, HashMap<String, (Instance, bool)>>,
    members: HashMap<String, Arc<Member>>,
}

/// The gateway's view of the registry. Cheap to read per request: one map lookup under a
/// read lock and an `Arc` clone.
pub struct Upstreams {
    inner: Mutex<Inner>,
    /// Pools by environment, then service: looked up with the request's `&str`s, no key
    /// to build.
    pools: RwLock<HashMap<String, HashMap<String, Arc<Pool>>>>,
    epoch: Instant,
    last_contact_ms: AtomicU64,
    contacted: AtomicBool,
    reachable: AtomicBool,
    fail_open_ms: AtomicU64,
    /// Whether instances come over the push stream (false: polling).
    pub streaming: AtomicBool,
    envs: Mutex<HashSet<String>>,
    client: Arc<RegistryClient>,
    generation: tokio::sync::watch::Sender<u64>,
}

/// The pools are unavailable because the registry has been silent longer than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage;

impl Upstreams {
    /// A view fed from `registry` (comma-separated URLs) with `token`.
    pub fn new(
        registry: &str,
        token: Option<String>,
    ) -> Result<Arc<Upstreams>, lockstep_client::ClientError> {
        let client = Arc::new(RegistryClient::new(registry, token)?);
        Ok(Arc::new(Upstreams {
            inner: Mutex::new(Inner::default()),
            pools: RwLock::new(HashMap::new()),
            epoch: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            contacted: AtomicBool::new(false),
            reachable: AtomicBool::new(false),
            fail_open_ms: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            envs: Mutex::new(HashSet::new()),
            client,
            generation: tokio::sync::watch::channel(0).0,
        }))
    }

    /// Sets the fail-open bound (`None`: route on the last known state forever).
    pub fn set_fail_open_for(&self, d: Option<Duration>) {
        self.fail_open_ms.store(
            d.map(|d| d.as_millis() as u64).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn contact(&self) {
        self.last_contact_ms.store(self.now_ms(), Ordering::Relaxed);
        self.contacted.store(true, Ordering::Relaxed);
        if !self.reachable.swap(true, Ordering::Relaxed) {
            tracing::info!("registry reachable");
        }
    }

    fn outage(&self, why: &str) {
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %why, "registry unreachable: routing on the last known instances");
        }
    }

    /// Whether the last attempt to reach the registry succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Bumps on every change of any pool (tests and benchmarks wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The pool of `service` in `env`; `Err(Outage)` past the fail-open bound.
    pub fn pool(&self, env: &str, service: &str) -> Result<Option<Arc<Pool>>, Outage> {
        self.check_bound()?;
        let pools = self.pools.read().map_err(|_| Outage)?;
        Ok(pools.get(env).and_then(|p| p.get(service)).cloned())
    }

    fn check_bound(&self) -> Result<(), Outage> {
        let bound = self.fail_open_ms.load(Ordering::Relaxed);
        if bound > 0
            && !self.reachable()
            && self.contacted.load(Ordering::Relaxed)
            && self
                .now_ms()
                .saturating_sub(self.last_contact_ms.load(Ordering::Relaxed))
                > bound
        {
            return Err(Outage);
        }
        Ok(())
    }

    /// Every known service of `env` with its pool, by name.
    pub fn services(&self, env: &str) -> Result<Vec<(String, Arc<Pool>)>, Outage> {
        self.check_bound()?;
        let pools = self.pools.read().map_err(|_| Outage)?;
        let mut v: Vec<(String, Arc<Pool>)> = pools
            .get(env)
            .into_iter()
            .flatten()
            .map(|(s, p)| (s.clone(), p.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// Every member of every pool (for active health checks).
    pub fn all_members(&self) -> Vec<Arc<Member>> {
        self.inner
            .lock()
            .map(|i| i.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Learns an expected release (ignored when older than the one known).
    pub fn on_release(&self, r: StoredRelease) {
        let key = (r.env.clone(), r.service.clone());
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner
            .expected
            .get(&key)
            .is_some_and(|old| old.revision >= r.revision)
        {
            return;
        }
        tracing::info!(env = %r.env, service = %r.service, expected = %short_id(&r.release.version_id),
            revision = r.revision, "expected release");
        inner.expected.insert(key.clone(), Arc::new(r));
        self.rebuild(&mut inner, &[key]);
    }

    /// Applies an instance event.
    pub fn on_instances(&self, ev: InstanceEvent) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let mut touched: Vec<Key> = Vec::new();
        match ev {
            InstanceEvent::Snapshot {
                env,
                instances,
                expected,
            } => {
                for r in expected {
                    let key = (r.env.clone(), r.service.clone());
                    if inner
                        .expected
                        .get(&key)
                        .is_none_or(|old| old.revision < r.revision)
                    {
                        inner.expected.insert(key.clone(), Arc::new(r));
                        touched.push(key);
                    }
                }
                let old: Vec<Key> = inner
                    .instances
                    .keys()
                    .filter(|(e, _)| *e == env)
                    .cloned()
                    .collect();
                for k in &old {
                    inner.instances.remove(k);
                }
                touched.extend(old);
                for i in instances {
                    let key = (i.instance.env.clone(), i.instance.service.clone());
                    let missing = i.status == Status::Missing;
                    inner
                        .instances
                        .entry(key.clone())
                        .or_default()
                        .insert(i.instance.instance_id.clone(), (i.instance, missing));
                    touched.push(key);
                }
            }
            InstanceEvent::Upsert(i) => {
                let key = (i.instance.env.clone(), i.instance.service.clone());
                let missing = i.status == Status::Missing;
                inner
                    .instances
                    .entry(key.clone())
                    .or_default()
                    .insert(i.instance.instance_id.clone(), (i.instance, missing));
                touched.push(key);
            }
            InstanceEvent::Removed {
                env,
                service,
                instance_id,
            } => {
                let key = (env, service);
                if let Some(m) = inner.instances.get_mut(&key) {
                    m.remove(&instance_id);
                }
                touched.push(key);
            }
        }
        touched.sort();
        touched.dedup();
        self.rebuild(&mut inner, &touched);
    }

    /// Recomputes the pools of `keys` and publishes them.
    fn rebuild(&self, inner: &mut Inner, keys: &[Key]) {
        let mut fresh: Vec<(Key, Arc<Pool>)> = Vec::new();
        for key in keys {
            let expected = inner.expected.get(key).cloned();
            let mut members = Vec::new();
            let list: Vec<(Instance, bool)> = inner
                .instances
                .get(key)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            for (inst, missing) in list {
                let Some(endpoint) = inst
                    .endpoint
                    .as_deref()
                    .filter(|e| e.starts_with("http://"))
                else {
                    continue;
                };
                let status = instance_status(
                    expected.as_ref().map(|e| &e.release),
                    &inst.version_id,
                    &inst.components,
                    missing,
                );
                let endpoint = endpoint.trim_end_matches('/');
                let member = match inner.members.get(&inst.instance_id) {
                    Some(m) if m.endpoint == endpoint && m.version_id == inst.version_id => {
                        m.set_status(status);
                        m.clone()
                    }
                    _ => {
                        let m = Arc::new(Member::new(
                            &inst.instance_id,
                            endpoint,
                            &inst.version_id,
                            status,
                        ));
                        inner.members.insert(inst.instance_id.clone(), m.clone());
                        m
                    }
                };
                members.push(member);
            }
            fresh.push((key.clone(), Arc::new(Pool { members, expected })));
        }
        let live: HashSet<String> = inner
            .instances
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect();
        inner.members.retain(|id, _| live.contains(id));
        if let Ok(mut pools) = self.pools.write() {
            for ((env, service), p) in fresh {
                pools.entry(env).or_default().insert(service, p);
            }
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Starts following the registry: the release watch (once) and an instance source per
    /// environment in `envs` not followed yet. Call again after a reload.
    pub fn follow(self: &Arc<Self>, envs: &[String]) {
        let mut known = match self.envs.lock() {
            Ok(k) => k,
            Err(_) => return,
        };
        if known.is_empty() {
            let me = Arc::downgrade(self);
            tokio::spawn(watch_releases(me));
        }
        for e in envs {
            if known.insert(e.clone()) {
                tokio::spawn(follow_instances(Arc::downgrade(self), e.clone()));
            }
        }
    }
}

async fn watch_releases(me: std::sync::Weak<Upstreams>) {
    let mut since: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(up) = me.upgrade() else { return };
        let client = up.client.clone();
        drop(up);
        match client.watch(None, None, since).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let next = tokio::time::timeout(Duration::from_secs(45), stream.next()).await;
                    let Some(up) = me.upgrade() else { return };
                    match next {
                        Ok(Some(ev)) => {
                            up.contact();
                            backoff = Duration::from_millis(100);
                            if ev.event == "release" {
                                match serde_json::from_str::<StoredRelease>(&ev.data) {
                                    Ok(r) => {
                                        since = Some(since.unwrap_or(0).max(r.revision));
                                        up.on_release(r);
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "ignoring an unreadable watch event")
                                    }
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            Err(e) => {
                if let Some(up) = me.upgrade() {
                    up.outage(&e.to_string());
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why the push stream could not be used.
enum StreamEnd {
    /// The registry does not have it (404/405): poll.
    Unsupported,
    /// It broke or could not connect: retry soon.
    Broken(String),
}

async fn follow_instances(me: std::sync::Weak<Upstreams>, env: String) {
    let mut next_stream_try = Instant::now();
    loop {
        if Instant::now() >= next_stream_try {
            let Some(up) = me.upgrade() else { return };
            match stream_instances(&up, &env).await {
                StreamEnd::Unsupported => {
                    if up.streaming.swap(false, Ordering::Relaxed) {
                        tracing::warn!(%env, "instance push stream gone; polling");
                    } else {
                        tracing::info!(%env, "the registry has no instance push stream; polling /v1/status every second");
                    }
                    next_stream_try = Instant::now() + Duration::from_secs(30);
                }
                StreamEnd::Broken(why) => {
                    up.streaming.store(false, Ordering::Relaxed);
                    up.outage(&why);
                    next_stream_try = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        let Some(up) = me.upgrade() else { return };
        match up.client.status(Some(&env), None).await {
            Ok(report) => {
                up.contact();
                let mut instances = Vec::new();
                let mut expected = Vec::new();
                for e in report.environments.into_iter().filter(|e| e.name == env) {
                    for s in e.services {
                        expected.extend(s.expected);
                        instances.extend(s.instances);
                    }
                }
                up.on_instances(InstanceEvent::Snapshot {
                    env: env.clone(),
                    instances,
                    expected,
                });
            }
            // A scope the registry has never heard of is an empty one, not an outage.
            Err(e) if e.status() == Some(404) => {
                up.contact();
                up.on_instances(InstanceEvent::Snapshot {
                    env: env.clone(),
                    instances: Vec::new(),
                    expected: Vec::new(),
                });
            }
            Err(e) => up.outage(&e.to_string()),
        }
        drop(up);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Follows `GET /v1/instances/watch?env=` (the client library's reader) until it ends.
async fn stream_instances(up: &Upstreams, env: &str) -> StreamEnd {
    let events = match up.client.watch_instances(env, None).await {
        Ok(s) => s,
        // An older registry without the stream: poll instead.
        Err(e) if matches!(e.status(), Some(404 | 405)) => return StreamEnd::Unsupported,
        Err(e) => return StreamEnd::Broken(e.to_string()),
    };
    up.contact();
    if !up.streaming.swap(true, Ordering::Relaxed) {
        tracing::info!(%env, "following the instance push stream");
    }
    let mut events = std::pin::pin!(events);
    loop {
        match tokio::time::timeout(Duration::from_secs(45), events.next()).await {
            Ok(Some(ev)) => {
                up.contact();
                let parsed = match ev.event.as_str() {
                    "snapshot" => serde_json::from_str::<InstanceSnapshot>(&ev.data).map(|s| {
                        Some(InstanceEvent::Snapshot {
                            env: env.to_string(),
                            instances: s.instances,
                            expected: Vec::new(),
                        })
                    }),
                    "instance" => serde_json::from_str::<InstanceStatus>(&ev.data)
                        .map(|i| Some(InstanceEvent::Upsert(Box::new(i)))),
                    "removed" => serde_json::from_str::<InstanceRemoved>(&ev.data).map(|r| {
                        Some(InstanceEvent::Removed {
                            env: r.env,
                            service: r.service,
                            instance_id: r.instance_id,
                        })
                    }),
                    _ => Ok(None),
                };
                match parsed {
                    Ok(Some(e)) => up.on_instances(e),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring an unreadable instance event"),
                }
            }
            Ok(None) => return StreamEnd::Broken("instance stream ended".into()),
            Err(_) => return StreamEnd::Broken("instance stream idle too long".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_core::Release;

    fn inst(id: &str, svc: &str, version: &str, status: Status) -> InstanceStatus {
        let now = time::OffsetDateTime::now_utc();
        InstanceStatus {
            instance: Instance {
                endpoint: Some(format!("http://{id}.local:80/")),
                ..Instance::new(id, "production", svc, version, now)
            },
            status,
            drift_secs: 0,
            rollout: None,
        }
    }

    fn release(svc: &str, version: &str, revision: i64, accepts: &[&str]) -> StoredRelease {
        let mut r = Release::new(version);
        r.accepts = accepts.iter().map(|s| s.to_string()).collect();
        StoredRelease {
            env: "production".into(),
            service: svc.into(),
            revision,
            kind: lockstep_core::RegistrationKind::Register,
            registered_at: time::OffsetDateTime::now_utc(),
            release: r,
        }
    }

    fn statuses(up: &Upstreams, svc: &str) -> Vec<(String, Status)> {
        let pool = up
            .pool("production", svc)
            .expect("no outage")
            .expect("pool");
        let mut v: Vec<_> = pool
            .members
            .iter()
            .map(|m| (m.instance_id.clone(), m.status()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[tokio::test]
    async fn a_release_change_recomputes_every_status_at_once() {
        let up = Upstreams::new("http://127.0.0.1:9", None).expect("upstreams");
        up.on_instances(InstanceEvent::Snapshot {
            env: "production".into(),
            instances: vec![
                inst("a", "api", "v1", Status::Current),
                inst("b", "api", "v2", Status::Stale),
                inst("c", "api", "v2", Status::Missing),
            ],
            expected: vec![release("api", "v1", 1, &[])],
        });
        use Status::*;
        assert_eq!(
            statuses(&up, "api"),
            [
                ("a".into(), Current),
                ("b".into(), Stale),
                ("c".into(), Missing)
            ]
        );
        up.on_release(release("api", "v2", 2, &["v1"]));
        assert_eq!(
            statuses(&up, "api"),
            [
                ("a".into(), Draining),
                ("b".into(), Current),
                ("c".into(), Missing)
            ]
        );
        up.on_release(release("api", "v1", 1, &[]));
        assert_eq!(
            statuses(&up, "api")[1].1,
            Current,
            "an older revision is ignored"
        );
        let before = up
            .pool("production", "api")
            .expect("ok")
            .expect("pool")
            .members
            .iter()
            .find(|m| m.instance_id == "b")
            .cloned()
            .expect("b");
        up.on_instances(InstanceEvent::Removed {
            env: "production".into(),
            service: "api".into(),
            instance_id: "a".into(),
        });
        let after = up.pool("production", "api").expect("ok").expect("pool");
        assert_eq!(after.members.len(), 2);
        assert!(
            after.members.iter().any(|m| Arc::ptr_eq(m, &before)),
            "unchanged members keep their counters"
        );
    }
}
