//! Upstream selection, pure: which instances may serve a request, and which one does.
//!
//! The rule, in order (see [`candidates`]):
//! 1. only instances whose status is `current` or `draining`, that passed their last active
//!    health check;
//! 2. a client pinned to a release (cookie `lockstep-version` or header
//!    `X-Lockstep-Version`) that still has such instances goes to them, so a multi-step flow
//!    never crosses versions during a rollout;
//! 3. everyone else goes to `current` instances, and to `draining` ones only while no
//!    current instance exists;
//! 4. passively ejected instances (too many consecutive failures) are skipped unless every
//!    candidate is ejected.
//!
//! Then [`pick`] chooses by power of two choices on outstanding requests. The proxy only
//! calls [`Pool::select`]; a later per-session release choice (staged percentages) changes
//! [`ReleaseChoice`] and [`candidates`], never the proxy.

use lockstep_core::{Status, StoredRelease};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// One instance the gateway may send requests to.
#[derive(Debug)]
pub struct Member {
    /// Instance id.
    pub instance_id: String,
    /// Its endpoint, without a trailing slash (`http://10.0.0.5:8080`).
    pub endpoint: String,
    /// The release it runs.
    pub version_id: String,
    status: AtomicU8,
    outstanding: AtomicU32,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    healthy: AtomicBool,
}

fn status_code(s: Status) -> u8 {
    match s {
        Status::Current => 0,
        Status::Draining => 1,
        Status::Stale => 2,
        Status::Missing => 3,
        Status::Unknown => 4,
    }
}

fn status_from(c: u8) -> Status {
    match c {
        0 => Status::Current,
        1 => Status::Draining,
        2 => Status::Stale,
        3 => Status::Missing,
        _ => Status::Unknown,
    }
}

impl Member {
    /// A member with no history.
    pub fn new(instance_id: &str, endpoint: &str, version_id: &str, status: Status) -> Member {
        Member {
            instance_id: instance_id.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            version_id: version_id.to_string(),
            status: AtomicU8::new(status_code(status)),
            outstanding: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }

    /// Its status against the expected release.
    pub fn status(&self) -> Status {
        status_from(self.status.load(Ordering::Acquire))
    }

    /// Sets its status (the expected release changed).
    pub fn set_status(&self, s: Status) {
        self.status.store(status_code(s), Ordering::Release);
    }

    /// Requests in flight to it.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether its last active health check passed.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records an active health check.
    pub fn set_healthy(&self, ok: bool) -> bool {
        self.healthy.swap(ok, Ordering::Relaxed) != ok
    }

    /// Whether it is ejected at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Whether its status lets it serve at all.
    pub fn servable(&self) -> bool {
        matches!(self.status(), Status::Current | Status::Draining) && self.healthy()
    }

    /// Records the outcome of a request: `failed` for connect errors, timeouts and 5xx.
    /// Returns true when this failure ejected it.
    pub fn record(&self, failed: bool, now_ms: u64, eject: &Ejection) -> bool {
        if !failed {
            // Read first: a store on every success would make every core fight over this
            // cache line.
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= eject.after_failures {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms
                .store(now_ms + eject.for_ms, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Marks a request in flight until the lease drops.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Lease(self.clone())
    }
}

/// A request in flight to a member; dropping it ends the request.
#[derive(Debug)]
pub struct Lease(pub Arc<Member>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Passive health: how many consecutive failures eject an instance, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failures before ejection.
    pub after_failures: u32,
    /// How long an ejection lasts.
    pub for_ms: u64,
}

/// The release a request asks for, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseChoice<'a> {
    /// No preference: the expected release.
    #[default]
    Expected,
    /// Pinned to a release (cookie or header).
    Pinned(&'a str),
}

/// The instances of one service in one environment, as last learned from the registry.
#[derive(Debug, Default)]
pub struct Pool {
    /// Its members (instances with an endpoint), in any order.
    pub members: Vec<Arc<Member>>,
    /// The expected release, if one is registered.
    pub expected: Option<Arc<StoredRelease>>,
}

impl Pool {
    /// Instances that may serve now.
    pub fn servable(&self) -> usize {
        self.members.iter().filter(|m| m.servable()).count()
    }

    /// A member for a request choosing `choice`, avoiding `tried`; `None` when no instance
    /// may serve (answer 503).
    pub fn select(
        &self,
        choice: ReleaseChoice<'_>,
        tried: &[Arc<Member>],
        now_ms: u64,
        seed: u64,
    ) -> Option<Arc<Member>> {
        let c = candidates(&self.members, choice, now_ms);
        if tried.is_empty() {
            return pick(&c, seed).cloned();
        }
        let fresh: Vec<&Arc<Member>> = c
            .iter()
            .copied()
            .filter(|m| !tried.iter().any(|t| Arc::ptr_eq(t, m)))
            .collect();
        pick(&fresh, seed).cloned()
    }
}

/// The members a request may go to (rules 1–4 of the module doc).
pub fn candidates<'a>(
    members: &'a [Arc<Member>],
    choice: ReleaseChoice<'_>,
    now_ms: u64,
) -> Vec<&'a Arc<Member>> {
    let servable: Vec<&Arc<Member>> = members.iter().filter(|m| m.servable()).collect();
    let mut set: Vec<&Arc<Member>> = Vec::new();
    if let ReleaseChoice::Pinned(v) = choice {
        set = servable
            .iter()
            .copied()
            .filter(|m| m.version_id == v)
            .collect();
    }
    if set.is_empty() {
        set = servable
            .iter()
            .copied()
            .filter(|m| m.status() == Status::Current)
            .collect();
    }
    if set.is_empty() {
        set = servable;
    }
    let live: Vec<&Arc<Member>> = set.iter().copied().filter(|m| !m.ejected(now_ms)).collect();
    if live.is_empty() { set } else { live }
}

/// Power of two choices: two members drawn from `seed`, the one with fewer requests in
/// flight wins.
pub fn pick<'a>(set: &[&'a Arc<Member>], seed: u64) -> Option<&'a Arc<Member>> {
    match set.len() {
        0 => None,
        1 => Some(set[0]),
        n => {
            let a = (seed % n as u64) as usize;
            let mut b = ((seed >> 32) % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (ma, mb) = (set[a], set[b]);
            Some(if mb.outstanding() < ma.outstanding() {
                mb
            } else {
                ma
            })
        }
    }
}

/// A cheap per-call random number (a mix of a per-thread counter): enough to spread load,
/// not for secrets. Per thread, so that threads do not take turns on one cache line.
pub fn seed() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let mut x = STATE.with(|s| {
        let mut v = s.get();
        if v == 0 {
            // A distinct start per thread.
            v = THREADS.fetch_add(1, Ordering::Relaxed).wrapping_add(1) << 40;
        }
        v = v.wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(v);
        v
    });
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, version: &str, s: Status) -> Arc<Member> {
        Arc::new(Member::new(id, &format!("http://{id}"), version, s))
    }

    fn ids(v: Vec<&Arc<Member>>) -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().map(|m| m.instance_id.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn only_current_and_draining_instances_are_candidates() {
        use Status::*;
        type Case<'a> = (Vec<Arc<Member>>, ReleaseChoice<'a>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                vec![
                    m("a", "v2", Current),
                    m("b", "v1", Draining),
                    m("c", "v0", Stale),
                ],
                ReleaseChoice::Expected,
                vec!["a"],
            ),
            (
                vec![
                    m("b", "v1", Draining),
                    m("c", "v0", Stale),
                    m("d", "v2", Missing),
                ],
                ReleaseChoice::Expected,
                vec!["b"],
            ),
            (
                vec![m("c", "v0", Stale), m("u", "v9", Unknown)],
                ReleaseChoice::Expected,
                vec![],
            ),
            (
                vec![m("a", "v2", Current), m("b", "v1", Draining)],
                ReleaseChoice::Pinned("v1"),
                vec!["b"],
            ),
            (
                vec![m("a", "v2", Current), m("c", "v0", Stale)],
                ReleaseChoice::Pinned("v0"),
                vec!["a"],
            ),
            (
                vec![m("a", "v2", Current), m("b", "v2", Current)],
                ReleaseChoice::Pinned("gone"),
                vec!["a", "b"],
            ),
        ];
        for (i, (members, choice, want)) in cases.iter().enumerate() {
            assert_eq!(ids(candidates(members, *choice, 0)), *want, "case {i}");
        }
    }

    #[test]
    fn unhealthy_and_ejected_instances_are_skipped_unless_all_are_ejected() {
        let e = Ejection {
            after_failures: 2,
            for_ms: 1000,
        };
        let members = vec![
            m("a", "v", Status::Current),
            m("b", "v", Status::Current),
            m("c", "v", Status::Current),
        ];
        members[2].set_healthy(false);
        assert!(!members[0].record(true, 0, &e));
        assert!(members[0].record(true, 0, &e), "second failure ejects");
        assert_eq!(
            ids(candidates(&members, ReleaseChoice::Expected, 10)),
            ["b"]
        );
        assert!(members[1].record(true, 0, &e) || members[1].record(true, 0, &e));
        assert_eq!(
            ids(candidates(&members, ReleaseChoice::Expected, 10)),
            ["a", "b"],
            "all ejected: try them anyway"
        );
        assert_eq!(
            ids(candidates(&members, ReleaseChoice::Expected, 1_000)),
            ["a", "b"],
            "ejection over"
        );
        members[0].record(false, 0, &e);
        assert!(
            !members[0].record(true, 2_000, &e),
            "success resets the count"
        );
    }

    #[test]
    fn two_choices_prefer_fewer_outstanding_and_skip_tried_members() {
        let pool = Pool {
            members: vec![m("a", "v", Status::Current), m("b", "v", Status::Current)],
            expected: None,
        };
        let _busy = pool.members[0].lease();
        for s in 0..20 {
            let got = pool.select(ReleaseChoice::Expected, &[], 0, seed() ^ s);
            assert_eq!(got.map(|m| m.instance_id.clone()).as_deref(), Some("b"));
        }
        let tried = vec![pool.members[1].clone()];
        let got = pool.select(ReleaseChoice::Expected, &tried, 0, 7);
        assert_eq!(got.map(|m| m.instance_id.clone()).as_deref(), Some("a"));
        let tried = pool.members.clone();
        assert!(pool.select(ReleaseChoice::Expected, &tried, 0, 7).is_none());
    }
}
