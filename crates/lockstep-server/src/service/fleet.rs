//! The instances a replica knows, indexed so that the questions asked often cost what
//! they concern rather than the whole fleet: one service's instances (a per-service sorted
//! id set), and status counts per service kept as instances change.
//!
//! Counts cannot be stored as plain numbers, because two inputs move without any instance
//! changing: the expected release (a deploy turns every instance of a service stale at
//! once) and the clock (an instance goes missing by *not* heartbeating). So each service
//! keeps its instances grouped by what they run (version id + components): a status is
//! computed once per group at read time, against the expected release of that moment, and
//! the few instances whose `last_seen` is older than the TTL are taken from an ordered
//! index and moved to `missing`. A read then costs O(groups + missing instances), a few
//! dozen operations for a healthy service of any size.
//!
//! **Invariant:** every change of `by_id` goes through [`Fleet::insert`] or
//! [`Fleet::remove`], which keep the index in step; counts computed here equal those of
//! walking every instance with `instance_status` (a test checks it).

use lockstep_core::{Instance, Release, Status, StatusCounts, instance_status};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use time::OffsetDateTime;

/// An (environment, service) pair.
pub type Scope = (String, String);

/// Milliseconds since the epoch.
fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// What an instance runs, as far as its status is concerned.
fn run_key(i: &Instance) -> String {
    let mut k = i.version_id.clone();
    for (name, v) in &i.components {
        k.push('\n');
        k.push_str(name);
        k.push('=');
        k.push_str(v);
    }
    k
}

/// Instances of one service that run the same thing.
#[derive(Debug, Default)]
struct Group {
    version_id: String,
    components: BTreeMap<String, String>,
    count: u32,
    /// `first_seen` (ms) → how many: the oldest gives the group's longest drift.
    first_seen: BTreeMap<i64, u32>,
}

/// The index of one service.
#[derive(Debug, Default)]
struct ServiceIndex {
    ids: BTreeSet<String>,
    groups: HashMap<String, Group>,
    /// (last_seen ms, id): the instances past their TTL are a prefix of this set.
    seen: BTreeSet<(i64, String)>,
}

/// Counts of one service at one moment, with the longest drift among its instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounts {
    /// Instances per status.
    pub counts: StatusCounts,
    /// The longest drift (stale, draining or missing) in seconds; 0 when none drifts.
    pub max_drift_secs: u64,
}

/// Every instance known to a replica, with its per-service index.
#[derive(Debug, Default)]
pub struct Fleet {
    by_id: HashMap<String, Instance>,
    services: HashMap<Scope, ServiceIndex>,
}

impl Fleet {
    /// How many instances are known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no instance is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// One instance by id.
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.by_id.get(id)
    }

    /// Every instance, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.by_id.values()
    }

    /// Every (environment, service) that has instances.
    pub fn scopes(&self) -> impl Iterator<Item = &Scope> {
        self.services.keys()
    }

    /// The instances of one service, ordered by id.
    pub fn of_service<'a>(
        &'a self,
        env: &str,
        service: &str,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.services
            .get(&(env.to_string(), service.to_string()))
            .into_iter()
            .flat_map(|s| s.ids.iter())
            .filter_map(|id| self.by_id.get(id))
    }

    /// How many instances one service has.
    pub fn service_len(&self, env: &str, service: &str) -> usize {
        self.services
            .get(&(env.to_string(), service.to_string()))
            .map_or(0, |s| s.ids.len())
    }

    /// Inserts or replaces an instance; returns the one it replaced.
    pub fn insert(&mut self, inst: Instance) -> Option<Instance> {
        let prev = self.remove(&inst.instance_id.clone());
        let scope = (inst.env.clone(), inst.service.clone());
        let idx = self.services.entry(scope).or_default();
        idx.ids.insert(inst.instance_id.clone());
        idx.seen
            .insert((ms(inst.last_seen), inst.instance_id.clone()));
        let g = idx.groups.entry(run_key(&inst)).or_insert_with(|| Group {
            version_id: inst.version_id.clone(),
            components: inst.components.clone(),
            ..Group::default()
        });
        g.count += 1;
        *g.first_seen.entry(ms(inst.first_seen)).or_default() += 1;
        self.by_id.insert(inst.instance_id.clone(), inst);
        prev
    }

    /// Removes an instance; returns it.
    pub fn remove(&mut self, id: &str) -> Option<Instance> {
        let inst = self.by_id.remove(id)?;
        let scope = (inst.env.clone(), inst.service.clone());
        if let Some(idx) = self.services.get_mut(&scope) {
            idx.ids.remove(id);
            idx.seen.remove(&(ms(inst.last_seen), id.to_string()));
            let key = run_key(&inst);
            if let Some(g) = idx.groups.get_mut(&key) {
                g.count = g.count.saturating_sub(1);
                let fs = ms(inst.first_seen);
                if let Some(n) = g.first_seen.get_mut(&fs) {
                    *n -= 1;
                    if *n == 0 {
                        g.first_seen.remove(&fs);
                    }
                }
                if g.count == 0 {
                    idx.groups.remove(&key);
                }
            }
            if idx.ids.is_empty() {
                self.services.remove(&scope);
            }
        }
        Some(inst)
    }

    /// Counts of one service against `expected` at `now`: an instance whose last heartbeat
    /// is older than `ttl` is missing.
    pub fn counts(
        &self,
        env: &str,
        service: &str,
        expected: Option<(&Release, OffsetDateTime)>,
        now: OffsetDateTime,
        ttl: std::time::Duration,
    ) -> ServiceCounts {
        let Some(idx) = self.services.get(&(env.to_string(), service.to_string())) else {
            return ServiceCounts::default();
        };
        let mut out = ServiceCounts::default();
        let now_ms = ms(now);
        let ttl_ms = ttl.as_millis() as i64;
        let cutoff = now_ms - ttl_ms;
        // Missing instances come off their group's count; the oldest silent one drifts longest.
        let mut missing_by_group: HashMap<String, u32> = HashMap::new();
        for (last_seen, id) in idx.seen.iter() {
            // Missing is "strictly older than the TTL", as `status::report` computes it.
            if *last_seen >= cutoff {
                break;
            }
            if let Some(inst) = self.by_id.get(id) {
                *missing_by_group.entry(run_key(inst)).or_default() += 1;
                out.counts.add(Status::Missing);
                let drift = (now_ms - (last_seen + ttl_ms)).max(0) as u64 / 1000;
                out.max_drift_secs = out.max_drift_secs.max(drift);
            }
        }
        for (key, g) in &idx.groups {
            let live = g.count - missing_by_group.get(key).copied().unwrap_or(0).min(g.count);
            if live == 0 {
                continue;
            }
            let status = instance_status(
                expected.map(|(r, _)| r),
                &g.version_id,
                &g.components,
                false,
            );
            match status {
                Status::Current => out.counts.current += live,
                Status::Draining => out.counts.draining += live,
                Status::Stale => out.counts.stale += live,
                Status::Unknown => out.counts.unknown += live,
                Status::Missing => out.counts.missing += live,
            }
            if matches!(status, Status::Stale | Status::Draining)
                && let (Some(oldest), Some((_, since))) = (g.first_seen.keys().next(), expected)
            {
                let from = (*oldest).max(ms(since));
                out.max_drift_secs = out.max_drift_secs.max((now_ms - from).max(0) as u64 / 1000);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_core::drift_secs;
    use std::time::Duration;
    use time::macros::datetime;

    fn inst(id: &str, svc: &str, version: &str, last_seen: OffsetDateTime) -> Instance {
        let mut i = Instance {
            first_seen: last_seen - time::Duration::minutes(5),
            ..Instance::new(id, "production", svc, version, last_seen)
        };
        if id.ends_with("-c") {
            i.components.insert("api".into(), "2".into());
        }
        i
    }

    /// Counts and drift the slow way: every instance, one by one.
    fn walk(
        f: &Fleet,
        svc: &str,
        exp: Option<(&Release, OffsetDateTime)>,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> ServiceCounts {
        let mut out = ServiceCounts::default();
        for i in f.values().filter(|i| i.service == svc) {
            let missing = now - i.last_seen > ttl;
            let s = instance_status(exp.map(|e| e.0), &i.version_id, &i.components, missing);
            out.counts.add(s);
            let d = drift_secs(s, now, i, exp.map(|e| e.1), ttl.as_secs());
            out.max_drift_secs = out.max_drift_secs.max(d);
        }
        out
    }

    #[test]
    fn indexed_counts_equal_walking_every_instance() {
        let now = datetime!(2026-11-30 12:00 UTC);
        let ttl = Duration::from_secs(30);
        let mut f = Fleet::default();
        let versions = ["v1", "v2", "v3"];
        for n in 0..60 {
            let ago = time::Duration::seconds((n * 7 % 50) as i64);
            let id = if n % 5 == 0 {
                format!("i{n}-c")
            } else {
                format!("i{n}")
            };
            let svc = if n % 2 == 0 { "api" } else { "jobs" };
            f.insert(inst(&id, svc, versions[n % 3], now - ago));
        }
        // Moves, re-heartbeats and removals keep the index in step.
        f.insert(inst("i1", "api", "v2", now));
        f.insert(inst("i2", "api", "v2", now - time::Duration::seconds(45)));
        f.remove("i3");
        f.remove("nope");
        let mut exp = Release::new("v2");
        exp.accepts = vec!["v1".into()];
        let since = now - time::Duration::minutes(2);
        for svc in ["api", "jobs", "none"] {
            for e in [None, Some((&exp, since))] {
                assert_eq!(
                    f.counts("production", svc, e, now, ttl),
                    walk(&f, svc, e, now, ttl),
                    "{svc} with expected {:?}",
                    e.map(|x| &x.0.version_id)
                );
            }
        }
        let api: Vec<_> = f
            .of_service("production", "api")
            .map(|i| &i.instance_id)
            .collect();
        let mut sorted = api.clone();
        sorted.sort();
        assert_eq!(api, sorted, "one service's instances come ordered by id");
        assert!(
            api.iter().any(|i| *i == "i1"),
            "a moved instance is indexed where it moved"
        );
        assert_eq!(
            f.service_len("production", "api") + f.service_len("production", "jobs"),
            f.len()
        );
    }

    #[test]
    fn removing_every_instance_of_a_service_forgets_the_service() {
        let now = datetime!(2026-11-30 12:00 UTC);
        let mut f = Fleet::default();
        f.insert(inst("a", "api", "v1", now));
        assert_eq!(f.scopes().count(), 1);
        assert!(f.remove("a").is_some());
        assert_eq!(f.scopes().count(), 0);
        assert!(f.is_empty());
    }
}
