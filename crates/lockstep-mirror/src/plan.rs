//! The mirror's rules without I/O: what callers queued, what the writer believes Redis holds,
//! and the Redis commands that turn one into the other.
//!
//! Keeping this pure lets every rule (which instance the per-service hash holds, when
//! per-instance hashes appear and disappear, what a resync deletes) be tested without Redis,
//! and lets the writer retry a failed batch by simply planning it again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use lockstep_core::Instance;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use lockstep_core::is_git_sha;

use crate::{MARKER_FIELD, MARKER_VALUE, instance_key, version_key};

/// What the mirror keeps of an instance: only what the hash fields and the expiry need, so a
/// queued operation stays small and cheap to record on the caller's thread.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Seen {
    pub(crate) service: String,
    pub(crate) instance_id: String,
    git_sha: Option<String>,
    version_id: String,
    build_date: Option<OffsetDateTime>,
    started_at: Option<OffsetDateTime>,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
    pid: Option<u32>,
    ttl: Duration,
}

impl Seen {
    /// Copies what the mirror needs; formatting waits for the writer so callers never pay it.
    pub(crate) fn new(instance: &Instance, ttl: Duration) -> Self {
        Seen {
            service: instance.service.clone(),
            instance_id: instance.instance_id.clone(),
            git_sha: instance.git_sha.clone(),
            version_id: instance.version_id.clone(),
            build_date: instance.build_date,
            started_at: instance.started_at,
            first_seen: instance.first_seen,
            last_seen: instance.last_seen,
            pid: instance.pid,
            ttl,
        }
    }

    /// Milliseconds of life left at `now`: `ttl - (now - last_seen)`. Computed in i128 so no
    /// TTL or clock value can overflow; a `last_seen` in the future (clock skew between
    /// replicas) counts as "just now" rather than extending the TTL.
    fn remaining_ms(&self, now: OffsetDateTime) -> i128 {
        let elapsed = (now - self.last_seen).whole_milliseconds().max(0);
        let ttl = i128::try_from(self.ttl.as_millis()).unwrap_or(i128::MAX);
        ttl.saturating_sub(elapsed)
    }

    fn expired(&self, now: OffsetDateTime) -> bool {
        self.remaining_ms(now) <= 0
    }

    /// The PEXPIRE argument: never 0 or negative, which Redis would treat as "delete now".
    fn pexpire_ms(&self, now: OffsetDateTime) -> i64 {
        i64::try_from(self.remaining_ms(now).max(1)).unwrap_or(i64::MAX)
    }

    /// The hash fields, spelled as the source system's verify script reads them, plus the
    /// ownership marker ([`MARKER_FIELD`]). A value the instance did not report is left out
    /// rather than written as an empty string (which a verify script would compare and fail);
    /// only `gitSha` says `unknown`, as the source system wrote it.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let rfc3339 = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        let git_sha = self
            .git_sha
            .clone()
            .or_else(|| is_git_sha(&self.version_id).then(|| self.version_id.clone()))
            .unwrap_or_else(|| "unknown".to_owned());
        let mut fields = vec![(MARKER_FIELD, MARKER_VALUE.to_owned()), ("gitSha", git_sha)];
        if let Some(b) = self.build_date {
            fields.push(("buildDate", rfc3339(b)));
        }
        fields.push((
            "startedAt",
            rfc3339(self.started_at.unwrap_or(self.first_seen)),
        ));
        if let Some(pid) = self.pid {
            fields.push(("pid", pid.to_string()));
        }
        fields.push(("instanceId", self.instance_id.clone()));
        fields
    }

    /// Orders "most recently heartbeated"; the id breaks ties so the choice is deterministic.
    fn recency(&self) -> (OffsetDateTime, &str) {
        (self.last_seen, &self.instance_id)
    }
}

/// A queued change for one instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Upsert(Seen),
    Remove,
}

/// Operations are keyed by (service, instance id): the latest one for an instance replaces
/// the earlier ones, which bounds the queue by the number of instances.
pub(crate) type OpKey = (String, String);

/// Everything queued since the last successful write.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// A full live set to reconcile with; every op in `ops` was queued after it.
    pub(crate) resync: Option<Vec<Seen>>,
    pub(crate) ops: HashMap<OpKey, Op>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.resync.is_none() && self.ops.is_empty()
    }

    /// How many instance states are waiting, for `MirrorStats::pending`.
    pub(crate) fn len(&self) -> usize {
        self.resync.as_ref().map_or(0, Vec::len) + self.ops.len()
    }

    pub(crate) fn record(&mut self, key: OpKey, op: Op) {
        self.ops.insert(key, op);
    }

    /// A resync supersedes whatever was queued before it.
    pub(crate) fn record_resync(&mut self, live: Vec<Seen>) {
        self.ops.clear();
        self.resync = Some(live);
    }

    /// Puts a batch that failed to write back under what was queued meanwhile (`self`), so the
    /// newer state of an instance wins and nothing older is lost.
    pub(crate) fn merge_older(&mut self, older: Batch) {
        if self.resync.is_some() {
            // A newer resync already replaces everything the failed batch said.
            return;
        }
        self.resync = older.resync;
        for (key, op) in older.ops {
            self.ops.entry(key).or_insert(op);
        }
    }
}

/// What the writer believes one service's keys hold after its last successful write.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ServiceState {
    instances: HashMap<String, Seen>,
    /// Whether per-instance hashes were written, i.e. the service had 2+ live instances.
    per_instance: bool,
}

/// The writer's picture of Redis, by service. Only committed after a write succeeded, so a
/// failed batch is planned again against the state Redis really has.
#[derive(Debug, Default)]
pub(crate) struct Model {
    services: HashMap<String, ServiceState>,
}

impl Model {
    /// Whether some instance outlived its TTL without a `remove`: its service needs a new plan
    /// (another instance may take over the per-service hash).
    pub(crate) fn has_expired(&self, now: OffsetDateTime) -> bool {
        self.services
            .values()
            .any(|s| s.instances.values().any(|i| i.expired(now)))
    }

    /// Number of instances the mirror tracks; used by tests.
    #[cfg(test)]
    fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }

    pub(crate) fn commit(&mut self, plan: Plan) {
        if plan.reset {
            self.services.clear();
        }
        for (service, state) in plan.services {
            match state {
                Some(state) => self.services.insert(service, state),
                None => self.services.remove(&service),
            };
        }
    }
}

/// One change to Redis, applied only to keys the mirror owns (see the crate docs): a `Del`
/// deletes a key holding the marker; a `Write` replaces such a key (or creates a missing one)
/// with exactly `fields` and the expiry. Both are Lua scripts, so a key of another writer —
/// of any type — is skipped, never an error that would make the batch fail forever.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    Del(String),
    Write {
        key: String,
        fields: Vec<(&'static str, String)>,
        pexpire_ms: i64,
    },
}

impl Command {
    /// Redis commands this stands for, for `MirrorStats::writes`.
    pub(crate) fn redis_commands(&self) -> u64 {
        match self {
            Command::Del(_) => 1,
            Command::Write { .. } => 3,
        }
    }
}

/// The commands for one batch and the model they lead to.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Deletions first, then writes: a key is never both.
    pub(crate) commands: Vec<Command>,
    /// The batch was a resync: the model is rebuilt from `services` alone.
    pub(crate) reset: bool,
    /// New state per touched service (`None`: the service has no live instance left).
    services: BTreeMap<String, Option<ServiceState>>,
}

/// Escapes the glob characters of a SCAN pattern so a prefix like `a*` matches only itself.
pub(crate) fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The SCAN pattern a resync cleans up: every key under `<prefix>:worker:`.
pub(crate) fn scan_pattern(prefix: &str) -> String {
    // Only keys shaped like the mirror's own: a fleet may keep other things (queues,
    // locks) under `<prefix>:worker:`, and a resync must never delete those.
    format!("{}:worker:*:version", escape_glob(prefix))
}

/// Accumulates commands, keeping deletions apart so a key that is also written is not deleted.
#[derive(Default)]
struct Out {
    dels: BTreeSet<String>,
    writes: Vec<Command>,
    written: HashSet<String>,
}

impl Out {
    fn del(&mut self, key: String) {
        self.dels.insert(key);
    }

    fn write(&mut self, key: String, seen: &Seen, now: OffsetDateTime) {
        self.written.insert(key.clone());
        self.writes.push(Command::Write {
            key,
            fields: seen.fields(),
            pexpire_ms: seen.pexpire_ms(now),
        });
    }

    fn finish(self) -> Vec<Command> {
        let Out {
            dels,
            writes,
            written,
        } = self;
        dels.into_iter()
            .filter(|k| !written.contains(k))
            .map(Command::Del)
            .chain(writes)
            .collect()
    }
}

/// Plans `batch` against `model`. `scanned` holds the keys found under the prefix and is
/// given only for a resync.
pub(crate) fn plan(
    model: &Model,
    batch: &Batch,
    scanned: Option<&[String]>,
    now: OffsetDateTime,
    prefix: &str,
) -> Plan {
    match &batch.resync {
        Some(live) => plan_resync(live, &batch.ops, scanned.unwrap_or_default(), now, prefix),
        None => plan_incremental(model, &batch.ops, now, prefix),
    }
}

/// A touched service while planning: where it started and what changed.
#[derive(Default)]
struct Touched {
    old_per_instance: bool,
    old_ids: Vec<String>,
    state: ServiceState,
    upserted: HashSet<String>,
    removed: HashSet<String>,
}

fn plan_incremental(
    model: &Model,
    ops: &HashMap<OpKey, Op>,
    now: OffsetDateTime,
    prefix: &str,
) -> Plan {
    let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
    let touch = |touched: &mut BTreeMap<String, Touched>, service: &str| {
        if !touched.contains_key(service) {
            let old = model.services.get(service).cloned().unwrap_or_default();
            touched.insert(
                service.to_owned(),
                Touched {
                    old_per_instance: old.per_instance,
                    old_ids: old.instances.keys().cloned().collect(),
                    state: old,
                    ..Touched::default()
                },
            );
        }
    };

    for ((service, id), op) in ops {
        touch(&mut touched, service);
        let Some(t) = touched.get_mut(service) else {
            continue;
        };
        match op {
            Op::Upsert(seen) => {
                t.removed.remove(id);
                t.upserted.insert(id.clone());
                t.state.instances.insert(id.clone(), seen.clone());
            }
            Op::Remove => {
                t.upserted.remove(id);
                t.removed.insert(id.clone());
                t.state.instances.remove(id);
            }
        }
    }
    // Instances that outlived their TTL without a `remove` leave like removed ones, so the
    // per-service hash moves to a live instance instead of vanishing with the dead one.
    for (service, state) in &model.services {
        if state.instances.values().any(|i| i.expired(now)) {
            touch(&mut touched, service);
        }
    }

    let mut out = Out::default();
    let mut services = BTreeMap::new();
    for (service, mut t) in touched {
        let expired: Vec<String> = t
            .state
            .instances
            .iter()
            .filter(|(_, i)| i.expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            t.state.instances.remove(&id);
            t.upserted.remove(&id);
            t.removed.insert(id);
        }

        // A removed instance's own hash goes whatever the mode: it may be left over from a
        // time the writer does not know about (another leader, a lost model).
        for id in &t.removed {
            out.del(instance_key(prefix, &service, id));
        }

        let live = &t.state.instances;
        let Some(holder) = live.values().max_by(|a, b| a.recency().cmp(&b.recency())) else {
            out.del(version_key(prefix, &service));
            if t.old_per_instance {
                for id in &t.old_ids {
                    out.del(instance_key(prefix, &service, id));
                }
            }
            services.insert(service, None);
            continue;
        };
        out.write(version_key(prefix, &service), holder, now);

        if live.len() >= 2 {
            for (id, seen) in live {
                // Entering per-instance mode writes every instance; after that only the
                // ones that heartbeated, which keeps a batch proportional to the changes.
                if !t.old_per_instance || t.upserted.contains(id) {
                    out.write(instance_key(prefix, &service, id), seen, now);
                }
            }
            t.state.per_instance = true;
        } else {
            if t.old_per_instance {
                for id in t.old_ids.iter().chain(live.keys()) {
                    out.del(instance_key(prefix, &service, id));
                }
            }
            t.state.per_instance = false;
        }
        services.insert(service, Some(t.state));
    }

    Plan {
        commands: out.finish(),
        reset: false,
        services,
    }
}

fn plan_resync(
    live: &[Seen],
    ops: &HashMap<OpKey, Op>,
    scanned: &[String],
    now: OffsetDateTime,
    prefix: &str,
) -> Plan {
    let mut states: BTreeMap<String, ServiceState> = BTreeMap::new();
    for seen in live {
        states
            .entry(seen.service.clone())
            .or_default()
            .instances
            .insert(seen.instance_id.clone(), seen.clone());
    }
    for ((service, id), op) in ops {
        match op {
            Op::Upsert(seen) => {
                states
                    .entry(service.clone())
                    .or_default()
                    .instances
                    .insert(id.clone(), seen.clone());
            }
            Op::Remove => {
                if let Some(s) = states.get_mut(service) {
                    s.instances.remove(id);
                }
            }
        }
    }

    let mut out = Out::default();
    let mut services = BTreeMap::new();
    for (service, mut state) in states {
        state.instances.retain(|_, i| !i.expired(now));
        let Some(holder) = state
            .instances
            .values()
            .max_by(|a, b| a.recency().cmp(&b.recency()))
        else {
            continue;
        };
        out.write(version_key(prefix, &service), holder, now);
        state.per_instance = state.instances.len() >= 2;
        if state.per_instance {
            for (id, seen) in &state.instances {
                out.write(instance_key(prefix, &service, id), seen, now);
            }
        }
        services.insert(service, Some(state));
    }
    for key in scanned {
        if !out.written.contains(key) {
            out.del(key.clone());
        }
    }

    Plan {
        commands: out.finish(),
        reset: true,
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2025-06-01 12:00:00 UTC);
    const TTL: Duration = Duration::from_secs(30);

    fn seen(service: &str, id: &str, secs_ago: i64) -> Seen {
        let last_seen = NOW - time::Duration::seconds(secs_ago);
        Seen::new(
            &Instance {
                git_sha: Some(format!("sha-{id}")),
                pid: Some(42),
                first_seen: last_seen - time::Duration::minutes(5),
                ..Instance::new(id, "production", service, "v1", last_seen)
            },
            TTL,
        )
    }

    fn upsert(batch: &mut Batch, s: Seen) {
        batch.record((s.service.clone(), s.instance_id.clone()), Op::Upsert(s));
    }

    fn remove(batch: &mut Batch, service: &str, id: &str) {
        batch.record((service.into(), id.into()), Op::Remove);
    }

    /// Plans and commits, returning (deleted keys, written key -> instanceId).
    fn step(
        model: &mut Model,
        batch: &Batch,
        scanned: Option<&[String]>,
    ) -> (Vec<String>, BTreeMap<String, String>) {
        let plan = plan(model, batch, scanned, NOW, "p");
        let mut dels = Vec::new();
        let mut writes = BTreeMap::new();
        for c in &plan.commands {
            match c {
                Command::Del(k) => dels.push(k.clone()),
                Command::Write { key, fields, .. } => {
                    let id = fields
                        .iter()
                        .find(|(f, _)| *f == "instanceId")
                        .map(|(_, v)| v.clone());
                    writes.insert(key.clone(), id.unwrap_or_default());
                }
            }
        }
        model.commit(plan);
        (dels, writes)
    }

    #[test]
    fn fields_follow_the_source_system_spelling_and_defaults() {
        let mut s = seen("api", "i1", 0);
        s.git_sha = None;
        s.pid = None;
        let f: BTreeMap<_, _> = s.fields().into_iter().collect();
        assert_eq!(f["gitSha"], "unknown");
        assert!(!f.contains_key("buildDate"), "absent, not an empty string");
        assert!(!f.contains_key("pid"), "absent, not an empty string");
        assert_eq!(f["startedAt"], "2025-06-01T11:55:00Z");
        assert_eq!(f["instanceId"], "i1");
        assert_eq!(f[crate::MARKER_FIELD], crate::MARKER_VALUE);
    }

    #[test]
    fn a_release_id_that_is_a_git_sha_is_the_mirrored_git_sha() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let mut s = seen("api", "i1", 0);
        s.git_sha = None;
        s.version_id = sha.into();
        let f: BTreeMap<_, _> = s.fields().into_iter().collect();
        assert_eq!(f["gitSha"], sha);
        // A reported SHA wins; a release id that is no SHA never poses as one.
        s.git_sha = Some("abcdef1".into());
        assert_eq!(s.fields()[1], ("gitSha", "abcdef1".to_owned()));
        s.git_sha = None;
        s.version_id = "2025-06-01-release".into();
        assert_eq!(s.fields()[1], ("gitSha", "unknown".to_owned()));
    }

    #[test]
    fn pexpire_is_the_ttl_left_and_never_below_one_millisecond() {
        assert_eq!(seen("api", "i1", 10).pexpire_ms(NOW), 20_000);
        assert_eq!(seen("api", "i1", 300).pexpire_ms(NOW), 1);
        let mut future = seen("api", "i1", 0);
        future.last_seen = NOW + time::Duration::seconds(60);
        assert_eq!(future.pexpire_ms(NOW), 30_000);
    }

    #[test]
    fn per_instance_keys_appear_with_a_second_instance_and_go_with_it() {
        let mut model = Model::default();
        let mut b = Batch::default();
        upsert(&mut b, seen("api", "a", 2));
        let (dels, writes) = step(&mut model, &b, None);
        assert_eq!(writes.keys().collect::<Vec<_>>(), ["p:worker:api:version"]);
        assert!(dels.is_empty());

        let mut b = Batch::default();
        upsert(&mut b, seen("api", "b", 1));
        let (_, writes) = step(&mut model, &b, None);
        assert_eq!(writes["p:worker:api:version"], "b");
        assert_eq!(writes["p:worker:api:a:version"], "a");
        assert_eq!(writes["p:worker:api:b:version"], "b");

        // Once in per-instance mode, a heartbeat rewrites only its own hash.
        let mut b = Batch::default();
        upsert(&mut b, seen("api", "a", 0));
        let (_, writes) = step(&mut model, &b, None);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes["p:worker:api:version"], "a");

        let mut b = Batch::default();
        remove(&mut b, "api", "a");
        let (mut dels, writes) = step(&mut model, &b, None);
        dels.sort();
        assert_eq!(dels, ["p:worker:api:a:version", "p:worker:api:b:version"]);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes["p:worker:api:version"], "b");

        let mut b = Batch::default();
        remove(&mut b, "api", "b");
        let (mut dels, writes) = step(&mut model, &b, None);
        dels.sort();
        assert_eq!(dels, ["p:worker:api:b:version", "p:worker:api:version"]);
        assert!(writes.is_empty());
        assert_eq!(model.instance_count(), 0);
    }

    #[test]
    fn an_expired_holder_hands_the_service_hash_to_the_remaining_instance() {
        let mut model = Model::default();
        let mut b = Batch::default();
        upsert(&mut b, seen("api", "old", 25));
        upsert(&mut b, seen("api", "new", 5));
        step(&mut model, &b, None);
        // Move the holder's last heartbeat past its TTL.
        let mut b = Batch::default();
        upsert(&mut b, seen("api", "old", 31));
        let (dels, writes) = step(&mut model, &b, None);
        assert!(dels.contains(&"p:worker:api:old:version".to_owned()));
        assert!(dels.contains(&"p:worker:api:new:version".to_owned()));
        assert_eq!(writes.len(), 1);
        assert_eq!(writes["p:worker:api:version"], "new");
        assert!(!model.has_expired(NOW));
    }

    #[test]
    fn resync_writes_the_live_set_and_deletes_every_other_scanned_key() {
        let mut model = Model::default();
        let mut b = Batch::default();
        upsert(&mut b, seen("gone", "x", 1));
        step(&mut model, &b, None);

        let mut b = Batch::default();
        b.record_resync(vec![
            seen("api", "a", 1),
            seen("api", "b", 2),
            seen("web", "w", 1),
        ]);
        remove(&mut b, "web", "w");
        let scanned: Vec<String> = [
            "p:worker:api:version",
            "p:worker:gone:version",
            "p:worker:junk",
            "p:worker:web:version",
        ]
        .map(String::from)
        .to_vec();
        let (mut dels, writes) = step(&mut model, &b, Some(&scanned));
        dels.sort();
        assert_eq!(
            dels,
            [
                "p:worker:gone:version",
                "p:worker:junk",
                "p:worker:web:version"
            ]
        );
        assert_eq!(
            writes.keys().collect::<Vec<_>>(),
            [
                "p:worker:api:a:version",
                "p:worker:api:b:version",
                "p:worker:api:version"
            ]
        );
        assert_eq!(model.instance_count(), 2);
    }

    #[test]
    fn a_failed_batch_goes_back_under_newer_operations() {
        let mut older = Batch::default();
        upsert(&mut older, seen("api", "a", 5));
        upsert(&mut older, seen("api", "b", 5));
        let mut newer = Batch::default();
        remove(&mut newer, "api", "a");
        newer.merge_older(older);
        assert_eq!(newer.ops[&("api".into(), "a".into())], Op::Remove);
        assert!(matches!(
            newer.ops[&("api".into(), "b".into())],
            Op::Upsert(_)
        ));

        let mut older = Batch::default();
        older.record_resync(vec![seen("api", "a", 1)]);
        let mut newer = Batch::default();
        newer.record_resync(vec![]);
        newer.merge_older(older);
        assert_eq!(newer.resync.as_deref(), Some(&[][..]));
    }

    #[test]
    fn scan_patterns_escape_glob_characters_in_the_prefix() {
        assert_eq!(scan_pattern("fiskai"), "fiskai:worker:*:version");
        assert_eq!(
            scan_pattern("a*b?[c]\\"),
            "a\\*b\\?\\[c\\]\\\\:worker:*:version"
        );
    }
}
