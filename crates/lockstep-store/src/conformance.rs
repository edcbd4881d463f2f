//! The behaviour every [`Store`] backend must have. Each backend's test calls [`run`] with a
//! fresh, empty store, and [`run_concurrent`] with two handles on one fresh database (two
//! replicas); a failed expectation panics with what was expected.

use lockstep_core::{Instance, Release, Role};
use std::collections::BTreeMap;
use std::sync::Arc;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::{AlertFilter, AlertWrite, DeliveryOutcome, DeliveryStatus, NewNotification};
use crate::{InstanceChange, NewEvent, Registration, Rollback, Store, StoreError, StoredToken};

fn reg(service: &str, id: &str, built: Option<OffsetDateTime>, force: bool) -> Registration {
    let mut release = Release::new(id);
    release.build_date = built;
    Registration {
        env: "production".into(),
        service: service.into(),
        release,
        force,
        actor: "ci".into(),
        reason: Some(format!("deploy {id}")),
    }
}

fn rb(service: &str, to: Option<&str>) -> Rollback {
    Rollback {
        env: "production".into(),
        service: service.into(),
        to: to.map(str::to_string),
        force: false,
        actor: "oncall".into(),
        reason: Some("bad deploy".into()),
        data: serde_json::json!({}),
    }
}

fn instance(id: &str, version: &str) -> Instance {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(datetime!(2026-01-01 0:00 UTC));
    Instance {
        git_sha: Some("abc".into()),
        host: Some("h".into()),
        pid: Some(42),
        started_at: Some(now),
        ..Instance::new(id, "production", "svc", version, now)
    }
}

/// Runs the whole suite against an empty store.
pub async fn run(store: &dyn Store) {
    registrations_get_increasing_revisions_and_history(store).await;
    reregistering_the_expected_release_is_idempotent(store).await;
    downgrades_are_refused_unless_forced(store).await;
    rollbacks_walk_back_and_are_logged(store).await;
    changes_since_resumes_without_gaps(store).await;
    events_are_appended_in_order(store).await;
    tokens_are_unique_and_revocable(store).await;
    instances_round_trip(store).await;
    leases_elect_one_holder_and_expire(store).await;
    missing_instances_are_reported_once_by_the_leader_only(store).await;
    alerts_open_escalate_ack_and_resolve_once_with_their_events(store).await;
    alert_channels_round_trip_and_are_logged_without_secrets(store).await;
    notifications_are_queued_once_and_delivered_once(store).await;
    rollouts_keep_nodes_steps_and_package_and_one_runs_per_service(store).await;
    store.ping().await.expect("ping");
}

async fn registrations_get_increasing_revisions_and_history(store: &dyn Store) {
    assert!(
        store
            .expected("production", "a")
            .await
            .expect("read")
            .is_none()
    );
    let r1 = store
        .register(reg("a", "a1", None, false))
        .await
        .expect("register a1");
    let r2 = store
        .register(reg("b", "b1", None, false))
        .await
        .expect("register b1");
    let r3 = store
        .register(reg("a", "a2", None, false))
        .await
        .expect("register a2");
    assert!(r1.changed && r2.changed && r3.changed);
    assert!(r1.release.revision < r2.release.revision && r2.release.revision < r3.release.revision);
    assert_eq!(r3.release.release.actor.as_deref(), Some("ci"));
    // Services are independent.
    let a = store
        .expected("production", "a")
        .await
        .expect("read")
        .expect("a has a release");
    let b = store
        .expected("production", "b")
        .await
        .expect("read")
        .expect("b has a release");
    assert_eq!(
        (a.release.version_id.as_str(), b.release.version_id.as_str()),
        ("a2", "b1")
    );
    assert!(
        store
            .expected("staging", "a")
            .await
            .expect("read")
            .is_none()
    );
    let hist = store.history("production", "a", 10).await.expect("history");
    let ids: Vec<_> = hist.iter().map(|r| r.release.version_id.as_str()).collect();
    assert_eq!(ids, ["a2", "a1"], "history is newest first");
    let all = store.all_expected().await.expect("all");
    assert_eq!(all.len(), 2);
}

async fn reregistering_the_expected_release_is_idempotent(store: &dyn Store) {
    let first = store
        .register(reg("idem", "x1", None, false))
        .await
        .expect("register");
    let again = store
        .register(reg("idem", "x1", None, false))
        .await
        .expect("register again");
    assert!(!again.changed && again.event.is_none());
    assert_eq!(first.release.revision, again.release.revision);
    assert_eq!(
        store
            .history("production", "idem", 10)
            .await
            .expect("history")
            .len(),
        1
    );
}

async fn downgrades_are_refused_unless_forced(store: &dyn Store) {
    let newer = Some(datetime!(2026-11-02 0:00 UTC));
    let older = Some(datetime!(2026-11-01 0:00 UTC));
    store
        .register(reg("dg", "new", newer, false))
        .await
        .expect("register new");
    let err = store.register(reg("dg", "old", older, false)).await;
    assert!(
        matches!(
            err,
            Err(StoreError::Rule(lockstep_core::CoreError::Downgrade { .. }))
        ),
        "a downgrade must be refused, got {err:?}"
    );
    let cur = store
        .expected("production", "dg")
        .await
        .expect("read")
        .expect("release");
    assert_eq!(
        cur.release.version_id, "new",
        "a refused registration writes nothing"
    );
    let forced = store
        .register(reg("dg", "old", older, true))
        .await
        .expect("forced");
    assert!(forced.changed);
}

async fn rollbacks_walk_back_and_are_logged(store: &dyn Store) {
    for id in ["r1", "r2", "r3"] {
        store
            .register(reg("rb", id, None, false))
            .await
            .expect("register");
    }
    let back = store.rollback(rb("rb", None)).await.expect("rollback");
    assert_eq!(back.release.release.version_id, "r2");
    assert_eq!(back.release.kind, lockstep_core::RegistrationKind::Rollback);
    assert_eq!(back.release.release.actor.as_deref(), Some("oncall"));
    let ev = back.event.expect("rollback event");
    assert_eq!(ev.kind, "release_rolled_back");
    assert_eq!(ev.data["previous_version_id"], "r3");
    let back = store
        .rollback(rb("rb", None))
        .await
        .expect("rollback again");
    assert_eq!(back.release.release.version_id, "r1");
    assert!(matches!(
        store.rollback(rb("rb", None)).await,
        Err(StoreError::Rule(
            lockstep_core::CoreError::NoPreviousRelease
        ))
    ));
    let to = store
        .rollback(rb("rb", Some("r3")))
        .await
        .expect("rollback to r3");
    assert_eq!(to.release.release.version_id, "r3");
    assert!(matches!(
        store.rollback(rb("nothing-here", None)).await,
        Err(StoreError::NoRelease { .. })
    ));
    let mut unsafe_rel = reg("rb", "r4", None, false);
    unsafe_rel.release.rollback_safe = false;
    store.register(unsafe_rel).await.expect("register r4");
    assert!(matches!(
        store.rollback(rb("rb", None)).await,
        Err(StoreError::Rule(lockstep_core::CoreError::NotRollbackSafe))
    ));
    let mut forced = rb("rb", None);
    forced.force = true;
    assert_eq!(
        store
            .rollback(forced)
            .await
            .expect("forced")
            .release
            .release
            .version_id,
        "r3"
    );
}

async fn changes_since_resumes_without_gaps(store: &dyn Store) {
    let all = store.changes_since(0, 10_000).await.expect("changes");
    assert!(
        all.windows(2).all(|w| w[0].revision < w[1].revision),
        "oldest first"
    );
    let mid = all[all.len() / 2].revision;
    let tail = store.changes_since(mid, 10_000).await.expect("changes");
    assert_eq!(tail.len(), all.iter().filter(|r| r.revision > mid).count());
    assert!(tail.iter().all(|r| r.revision > mid));
    let limited = store.changes_since(0, 2).await.expect("changes");
    assert_eq!(limited.len(), 2);
}

async fn events_are_appended_in_order(store: &dyn Store) {
    let before = store.events_since(0, 10_000).await.expect("events");
    assert!(
        before.iter().any(|e| e.kind == "release_registered"),
        "registrations are logged"
    );
    let last = before.last().map(|e| e.id).unwrap_or(0);
    let e = store
        .append_event(NewEvent {
            kind: "token_created".into(),
            actor: Some("admin".into()),
            data: serde_json::json!({"name": "ci"}),
            ..NewEvent::default()
        })
        .await
        .expect("append");
    assert!(e.id > last);
    let after = store.events_since(last, 10).await.expect("events");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].data["name"], "ci");
    assert_eq!(after[0].actor.as_deref(), Some("admin"));
}

async fn tokens_are_unique_and_revocable(store: &dyn Store) {
    let t = |name: &str, hash: &str, role| StoredToken {
        name: name.into(),
        role,
        hash: hash.into(),
        created_at: datetime!(2026-11-01 0:00 UTC),
    };
    let created = store
        .create_token(t("ci", "h1", Role::Deployer), "root")
        .await
        .expect("create");
    assert_eq!(created.kind, "token_created");
    assert_eq!(created.actor.as_deref(), Some("root"));
    assert_eq!(created.data["name"], "ci");
    assert!(matches!(
        store
            .create_token(t("ci", "h2", Role::Viewer), "root")
            .await,
        Err(StoreError::Conflict(_))
    ));
    let first = store
        .upsert_token(t("admin", "h3", Role::Admin))
        .await
        .expect("upsert");
    assert!(first.is_some(), "a new bootstrap token is logged");
    let same = store
        .upsert_token(t("admin", "h3", Role::Admin))
        .await
        .expect("upsert same");
    assert!(same.is_none(), "an unchanged bootstrap token is not logged");
    store
        .upsert_token(t("admin", "h4", Role::Admin))
        .await
        .expect("upsert again")
        .expect("a changed bootstrap token is logged");
    let all = store.tokens().await.expect("tokens");
    assert_eq!(all.len(), 2);
    assert!(all.iter().any(|x| x.name == "admin" && x.hash == "h4"));
    let revoked = store
        .revoke_token("ci", "root")
        .await
        .expect("revoke")
        .expect("revoked");
    assert_eq!(revoked.kind, "token_revoked");
    assert!(revoked.id > created.id);
    assert!(
        store
            .revoke_token("ci", "root")
            .await
            .expect("revoke twice")
            .is_none()
    );
    assert_eq!(store.tokens().await.expect("tokens").len(), 1);

    // The last admin token cannot be revoked; with a second admin it can.
    assert!(matches!(
        store.revoke_token("admin", "root").await,
        Err(StoreError::LastAdmin)
    ));
    assert_eq!(
        store.tokens().await.expect("tokens").len(),
        1,
        "nothing changed"
    );
    store
        .create_token(t("second-admin", "h5", Role::Admin), "root")
        .await
        .expect("second admin");
    store
        .revoke_token("admin", "second-admin")
        .await
        .expect("revoke")
        .expect("revoked");
    // A revoked secret stays revoked when it is set again as the bootstrap token...
    assert!(matches!(
        store.upsert_token(t("admin", "h4", Role::Admin)).await,
        Err(StoreError::Revoked(_))
    ));
    assert!(
        !store
            .tokens()
            .await
            .expect("tokens")
            .iter()
            .any(|x| x.name == "admin")
    );
    // ...and a new secret restores admin access under the bootstrap name.
    store
        .upsert_token(t("admin", "h6", Role::Admin))
        .await
        .expect("new bootstrap secret")
        .expect("logged");
    assert!(
        store
            .tokens()
            .await
            .expect("tokens")
            .iter()
            .any(|x| x.name == "admin" && x.hash == "h6")
    );
}

/// Every instance change after `since`, paged.
async fn all_instance_changes(store: &dyn Store, since: i64) -> Vec<InstanceChange> {
    let mut out: Vec<InstanceChange> = Vec::new();
    let mut cursor = since;
    loop {
        let page = store.instances_since(cursor, 2).await.expect("instances");
        let Some(last) = page.last() else {
            return out;
        };
        cursor = last.seq;
        out.extend(page);
    }
}

/// The live instances as a projection sees them: the last change per id.
async fn live_instances(store: &dyn Store) -> BTreeMap<String, Instance> {
    let mut live = BTreeMap::new();
    for c in all_instance_changes(store, 0).await {
        match c.instance {
            Some(i) => live.insert(c.instance_id, i),
            None => live.remove(&c.instance_id),
        };
    }
    live
}

async fn instances_round_trip(store: &dyn Store) {
    let start = all_instance_changes(store, 0)
        .await
        .last()
        .map_or(0, |c| c.seq);
    let a = instance("i-a", "v1");
    let mut b = instance("i-b", "v1");
    store
        .save_instances(&[a.clone(), b.clone()])
        .await
        .expect("save");
    b.version_id = "v2".into();
    b.last_seen += Duration::seconds(1);
    store
        .save_instances(std::slice::from_ref(&b))
        .await
        .expect("update");
    let changes = all_instance_changes(store, start).await;
    assert!(
        changes.windows(2).all(|w| w[0].seq < w[1].seq),
        "the instance feed is ordered"
    );
    assert_eq!(
        changes.len(),
        2,
        "one row per instance, at the position of its latest write: {changes:?}"
    );
    assert_eq!(changes[1].instance_id, "i-b", "the update moved i-b last");
    let live = live_instances(store).await;
    assert_eq!(live.get("i-a"), Some(&a));
    assert_eq!(live.get("i-b"), Some(&b));

    // A flush from a replica holding an older heartbeat never overwrites a newer one.
    let mut older = b.clone();
    older.version_id = "v0".into();
    older.last_seen -= Duration::seconds(5);
    store.save_instances(&[older]).await.expect("stale flush");
    assert_eq!(
        live_instances(store).await.get("i-b"),
        Some(&b),
        "an older heartbeat is ignored"
    );

    let (gone, ev) = store
        .deregister_instance("i-a", "worker")
        .await
        .expect("deregister")
        .expect("was registered");
    assert_eq!(gone.instance_id, "i-a");
    assert_eq!(ev.kind, "instance_deregistered");
    assert_eq!(ev.actor.as_deref(), Some("worker"));
    assert!(
        store
            .deregister_instance("i-a", "worker")
            .await
            .expect("deregister twice")
            .is_none()
    );
    assert!(!live_instances(store).await.contains_key("i-a"));
    // A heartbeat flushed late, older than the deregistration, does not bring it back...
    store
        .save_instances(std::slice::from_ref(&a))
        .await
        .expect("late flush");
    assert!(!live_instances(store).await.contains_key("i-a"));
    // ...a new heartbeat does.
    let mut back = a.clone();
    back.last_seen = OffsetDateTime::now_utc() + Duration::seconds(2);
    store.save_instances(&[back.clone()]).await.expect("back");
    assert_eq!(live_instances(store).await.get("i-a"), Some(&back));
}

async fn leases_elect_one_holder_and_expire(store: &dyn Store) {
    let ttl = std::time::Duration::from_millis(400);
    let a = store
        .acquire_lease("conf-lease", "replica-a", ttl)
        .await
        .expect("acquire");
    assert!(a.held && a.holder == "replica-a");
    let b = store
        .acquire_lease("conf-lease", "replica-b", ttl)
        .await
        .expect("contend");
    assert!(!b.held, "a held lease is not taken");
    assert_eq!(b.holder, "replica-a");
    let renewed = store
        .acquire_lease("conf-lease", "replica-a", ttl)
        .await
        .expect("renew");
    assert!(renewed.held && renewed.expires_at >= a.expires_at);
    tokio::time::sleep(ttl + std::time::Duration::from_millis(100)).await;
    let b = store
        .acquire_lease("conf-lease", "replica-b", ttl)
        .await
        .expect("take over");
    assert!(b.held, "an expired lease is taken over");
    store
        .release_lease("conf-lease", "replica-a")
        .await
        .expect("release by a non-holder is a no-op");
    assert!(
        !store
            .acquire_lease("conf-lease", "replica-a", ttl)
            .await
            .expect("contend")
            .held
    );
    store
        .release_lease("conf-lease", "replica-b")
        .await
        .expect("release");
    assert!(
        store
            .acquire_lease("conf-lease", "replica-a", ttl)
            .await
            .expect("after release")
            .held,
        "a released lease is free at once"
    );
}

async fn missing_instances_are_reported_once_by_the_leader_only(store: &dyn Store) {
    let ttl = std::time::Duration::from_secs(30);
    let now = OffsetDateTime::now_utc();
    let mut old = instance("m-old", "v1");
    old.last_seen = now - Duration::seconds(60);
    let fresh = instance("m-fresh", "v1");
    store
        .save_instances(&[old.clone(), fresh.clone()])
        .await
        .expect("save");
    assert!(matches!(
        store
            .mark_missing("nobody", now - Duration::seconds(30))
            .await,
        Err(StoreError::NotLeader)
    ));
    assert!(
        store
            .acquire_lease(crate::LEADER_LEASE, "leader-1", ttl)
            .await
            .expect("lease")
            .held
    );
    let evs = store
        .mark_missing("leader-1", now - Duration::seconds(30))
        .await
        .expect("mark");
    let ids: Vec<_> = evs
        .iter()
        .filter(|e| {
            e.data["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("m-"))
        })
        .map(|e| {
            e.data["instance_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["m-old"], "only the silent instance is missing");
    assert_eq!(evs[0].kind, "instance_missing");
    assert!(
        evs[0].data["last_seen"]
            .as_str()
            .is_some_and(|s| s.contains('T')),
        "last_seen is RFC 3339"
    );
    let again = store
        .mark_missing("leader-1", now - Duration::seconds(30))
        .await
        .expect("mark again");
    assert!(again.is_empty(), "reported once: {again:?}");
    // It heartbeats again, then goes silent again: reported a second time.
    let mut back = old.clone();
    back.last_seen = now - Duration::seconds(40);
    store.save_instances(&[back]).await.expect("back");
    let evs = store
        .mark_missing("leader-1", now - Duration::seconds(30))
        .await
        .expect("mark after return");
    assert_eq!(evs.len(), 1);
    // Retention: forgotten instances become tombstones in the feed.
    let forgotten = store
        .expire_instances(
            "leader-1",
            now - Duration::seconds(35),
            now - Duration::hours(1),
        )
        .await
        .expect("expire");
    assert!(forgotten.contains(&"m-old".to_string()));
    assert!(!forgotten.contains(&"m-fresh".to_string()));
    let live = live_instances(store).await;
    assert!(!live.contains_key("m-old") && live.contains_key("m-fresh"));
    assert!(matches!(
        store.expire_instances("nobody", now, now).await,
        Err(StoreError::NotLeader)
    ));
    store
        .release_lease(crate::LEADER_LEASE, "leader-1")
        .await
        .expect("release");
}

/// The concurrency cases: `a` and `b` are two handles on one database (two replicas).
pub async fn run_concurrent(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    racing_registrations_each_apply_once_on_a_distinct_previous(a.clone(), b.clone()).await;
    a_reader_sees_revisions_without_gaps_while_writers_race(a.clone(), b.clone()).await;
    the_feed_wakes_the_other_handle_and_catch_up_sees_every_revision_once(a.clone(), b.clone())
        .await;
    only_one_handle_holds_the_leader_lease(a.clone(), b.clone()).await;
    racing_replicas_open_one_alert_per_condition(a.clone(), b.clone()).await;
    racing_replicas_start_one_rollout_per_service(a, b).await;
}

async fn racing_registrations_each_apply_once_on_a_distinct_previous(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .register(reg("race", &format!("race-{i}"), None, false))
                .await
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        let r = t.await.expect("join").expect("every registration succeeds");
        let ev = r
            .event
            .expect("each registration changed the expected release");
        acked.push((r.release.revision, r.release.release.version_id, ev));
    }
    let hist = a
        .history("production", "race", 1000)
        .await
        .expect("history");
    assert_eq!(
        hist.len(),
        40,
        "every acknowledged registration is in the history once"
    );
    let mut revs: Vec<i64> = acked.iter().map(|x| x.0).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 40, "distinct revisions");
    // Each one was applied on top of the one just before it: the chain of
    // previous_version_id is exactly the history, so no two applied on the same previous.
    let mut by_rev: Vec<_> = acked.iter().collect();
    by_rev.sort_by_key(|x| x.0);
    for w in by_rev.windows(2) {
        assert_eq!(
            w[1].2.data["previous_version_id"].as_str(),
            Some(w[0].1.as_str()),
            "revision {} applied on top of revision {}",
            w[1].0,
            w[0].0
        );
    }
}

async fn a_reader_sees_revisions_without_gaps_while_writers_race(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let start = a.last_revision().await.expect("last");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..25 {
                    let r = store
                        .register(reg(
                            &format!("order-{w}"),
                            &format!("o{w}-{i}"),
                            None,
                            false,
                        ))
                        .await
                        .expect("register");
                    revs.push(r.release.revision);
                }
                revs
            })
        })
        .collect();
    // A reader that resumes by "revision > last seen" while the writers run.
    let reader = {
        let store = b.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = start;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while seen.len() < 100 && tokio::time::Instant::now() < deadline {
                let page = store.changes_since(cursor, 7).await.expect("changes");
                for r in &page {
                    seen.push(r.revision);
                    cursor = r.revision;
                }
                if page.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
            seen
        })
    };
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("join"));
    }
    let seen = reader.await.expect("join");
    acked.sort_unstable();
    assert_eq!(
        seen, acked,
        "a reader resuming by revision sees every acknowledged revision once, in order"
    );
}

async fn the_feed_wakes_the_other_handle_and_catch_up_sees_every_revision_once(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let start = b.last_revision().await.expect("last");
    let mut feed = b.feed();
    let consumer = {
        let store = b.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = start;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while seen.len() < 30 {
                // Only the wake-up, never a timer: proves the feed reaches this handle.
                tokio::select! {
                    r = feed.changed() => r.expect("feed open"),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
                loop {
                    let page = store.changes_since(cursor, 1000).await.expect("changes");
                    if page.is_empty() {
                        break;
                    }
                    for r in page {
                        cursor = r.revision;
                        seen.push(r.revision);
                    }
                }
            }
            seen
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let r = a
            .register(reg("feed", &format!("f-{i}"), None, false))
            .await
            .expect("register");
        acked.push(r.release.revision);
    }
    let seen = consumer.await.expect("join");
    assert_eq!(seen, acked, "every revision exactly once, in order");
}

async fn only_one_handle_holds_the_leader_lease(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let ttl = std::time::Duration::from_secs(5);
    let (x, y) = tokio::join!(
        a.acquire_lease("conc-lease", "a", ttl),
        b.acquire_lease("conc-lease", "b", ttl)
    );
    let (x, y) = (x.expect("a"), y.expect("b"));
    assert!(x.held ^ y.held, "exactly one holder: {x:?} {y:?}");
    assert_eq!(x.holder, y.holder);
}

/// An alert as the detector would raise it.
pub fn sample_alert(
    instance_id: &str,
    condition: lockstep_core::Condition,
    severity: lockstep_core::Severity,
) -> lockstep_api::Alert {
    let now = OffsetDateTime::now_utc();
    lockstep_api::Alert {
        alert_id: String::new(),
        instance_id: instance_id.into(),
        worker_id: instance_id.into(),
        env: "production".into(),
        service: "svc".into(),
        condition,
        severity,
        state: lockstep_api::AlertState::Open,
        drift_secs: 60,
        drift_duration: "1m".into(),
        current_version: "aaaaaaaa".into(),
        expected_version: Some("bbbbbbbb".into()),
        message: format!("{instance_id} is {}", condition.as_str()),
        timestamp: now,
        updated_at: now,
        resolved_at: None,
        acknowledged: false,
        acknowledged_by: None,
        acknowledged_at: None,
    }
}

async fn take_lease(store: &dyn Store, holder: &str) {
    assert!(
        store
            .acquire_lease(
                crate::LEADER_LEASE,
                holder,
                std::time::Duration::from_secs(30)
            )
            .await
            .expect("lease")
            .held,
        "{holder} takes the lease"
    );
}

async fn alerts_open_escalate_ack_and_resolve_once_with_their_events(store: &dyn Store) {
    use lockstep_core::{Condition, Severity};
    let raise = |s| AlertWrite::Raise(Box::new(sample_alert("al-1", Condition::Stale, s)));
    assert!(matches!(
        store
            .apply_alerts("nobody", vec![raise(Severity::Low)])
            .await,
        Err(StoreError::NotLeader)
    ));
    take_lease(store, "alert-leader").await;
    let opened = store
        .apply_alerts("alert-leader", vec![raise(Severity::Low)])
        .await
        .expect("open");
    assert_eq!(opened.len(), 1);
    let (alert, ev) = &opened[0];
    assert_eq!(ev.kind, "alert_opened");
    assert_eq!(ev.data["alert_id"], alert.alert_id.as_str());
    assert_eq!(ev.data["severity"], "low");
    let id: i64 = alert.alert_id.parse().expect("integer id");
    // The same condition again: no duplicate; a lower or equal severity changes nothing.
    let again = store
        .apply_alerts("alert-leader", vec![raise(Severity::Low)])
        .await
        .expect("again");
    assert!(again.is_empty(), "no duplicate: {again:?}");
    let esc = store
        .apply_alerts("alert-leader", vec![raise(Severity::High)])
        .await
        .expect("escalate");
    assert_eq!(esc.len(), 1);
    assert_eq!(esc[0].1.kind, "alert_escalated");
    assert_eq!(esc[0].0.alert_id, alert.alert_id, "escalated in place");
    assert_eq!(esc[0].0.severity, Severity::High);
    let lower = store
        .apply_alerts("alert-leader", vec![raise(Severity::Medium)])
        .await
        .expect("lower");
    assert!(lower.is_empty(), "never de-escalates");
    // Acknowledge: once, with actor and reason.
    let (acked, ev) = store
        .ack_alert(id, "oncall", Some("looking".into()))
        .await
        .expect("ack")
        .expect("exists");
    assert!(acked.acknowledged);
    assert_eq!(acked.acknowledged_by.as_deref(), Some("oncall"));
    let ev = ev.expect("event");
    assert_eq!(ev.kind, "alert_acknowledged");
    assert_eq!(ev.actor.as_deref(), Some("oncall"));
    let (_, none) = store
        .ack_alert(id, "oncall", None)
        .await
        .expect("ack again")
        .expect("exists");
    assert!(none.is_none(), "a second ack logs nothing");
    assert!(
        store
            .ack_alert(999_999, "x", None)
            .await
            .expect("ack")
            .is_none()
    );
    // Open list and filters.
    let open = store
        .alerts(AlertFilter {
            state: Some(lockstep_api::AlertState::Open),
            limit: 100,
            ..AlertFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].severity, Severity::High);
    assert!(open[0].acknowledged);
    let other = store
        .alerts(AlertFilter {
            env: Some("staging".into()),
            limit: 100,
            ..AlertFilter::default()
        })
        .await
        .expect("list");
    assert!(other.is_empty());
    // Resolve; a second resolve is a no-op; a new occurrence is a new alert.
    let resolve = || AlertWrite::Resolve {
        instance_id: "al-1".into(),
        condition: Condition::Stale,
        at: OffsetDateTime::now_utc(),
    };
    let res = store
        .apply_alerts("alert-leader", vec![resolve()])
        .await
        .expect("resolve");
    assert_eq!(res.len(), 1);
    assert_eq!(res[0].1.kind, "alert_resolved");
    assert_eq!(res[0].0.state, lockstep_api::AlertState::Resolved);
    assert!(res[0].0.resolved_at.is_some());
    assert!(
        store
            .apply_alerts("alert-leader", vec![resolve()])
            .await
            .expect("resolve again")
            .is_empty()
    );
    let reopened = store
        .apply_alerts("alert-leader", vec![raise(Severity::Low)])
        .await
        .expect("reopen");
    assert_eq!(reopened.len(), 1);
    assert_ne!(reopened[0].0.alert_id, alert.alert_id);
    let history: Vec<String> = store
        .alert_history(id)
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        history,
        [
            "alert_opened",
            "alert_escalated",
            "alert_acknowledged",
            "alert_resolved"
        ]
    );
    let all = store
        .alerts(AlertFilter {
            limit: 100,
            ..AlertFilter::default()
        })
        .await
        .expect("all");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].alert_id, reopened[0].0.alert_id, "newest first");
    store
        .apply_alerts(
            "alert-leader",
            vec![AlertWrite::Resolve {
                instance_id: "al-1".into(),
                condition: Condition::Stale,
                at: OffsetDateTime::now_utc(),
            }],
        )
        .await
        .expect("cleanup");
    store
        .release_lease(crate::LEADER_LEASE, "alert-leader")
        .await
        .expect("release");
}

async fn alert_channels_round_trip_and_are_logged_without_secrets(store: &dyn Store) {
    let hook: lockstep_api::ChannelConfig = serde_json::from_value(serde_json::json!({
        "name": "ops-hook", "type": "webhook", "url": "http://127.0.0.1:9/hook",
        "secret": "s3cret", "headers": {"X-Source": "lockstep"}, "min_severity": "medium"
    }))
    .expect("channel");
    let mail: lockstep_api::ChannelConfig = serde_json::from_value(serde_json::json!({
        "name": "ops-mail", "type": "email", "smtp_host": "127.0.0.1", "smtp_port": 2525,
        "password": "pw", "from_address": "a@example.com", "to_addresses": ["b@example.com"]
    }))
    .expect("channel");
    let ev = store
        .put_alert_channels(vec![hook.clone(), mail.clone()], "admin")
        .await
        .expect("put");
    assert_eq!(ev.kind, "alert_channels_changed");
    let logged = ev.data.to_string();
    assert!(
        !logged.contains("s3cret") && !logged.contains("pw\""),
        "{logged}"
    );
    assert_eq!(
        store.alert_channels().await.expect("get"),
        vec![hook.clone(), mail]
    );
    store
        .put_alert_channels(vec![hook.clone()], "admin")
        .await
        .expect("replace");
    assert_eq!(store.alert_channels().await.expect("get"), vec![hook]);
    store
        .put_alert_channels(Vec::new(), "admin")
        .await
        .expect("clear");
}

async fn notifications_are_queued_once_and_delivered_once(store: &dyn Store) {
    use lockstep_core::{Condition, Severity};
    let alert = sample_alert("nt-1", Condition::Stale, Severity::Low);
    let item = |ev: i64| NewNotification {
        channel: "ops-hook".into(),
        event_id: ev,
        kind: "alert_opened".into(),
        alert: alert.clone(),
    };
    let from = store.notify_cursor().await.expect("cursor");
    assert!(matches!(
        store
            .enqueue_notifications("nobody", from, from + 2, vec![item(from + 1)])
            .await,
        Err(StoreError::NotLeader)
    ));
    take_lease(store, "notify-leader").await;
    assert!(
        store
            .enqueue_notifications(
                "notify-leader",
                from,
                from + 2,
                vec![item(from + 1), item(from + 2)]
            )
            .await
            .expect("enqueue")
    );
    // A second planner that read the old cursor writes nothing.
    assert!(
        !store
            .enqueue_notifications("notify-leader", from, from + 2, vec![item(from + 1)])
            .await
            .expect("stale cursor")
    );
    assert_eq!(store.notify_cursor().await.expect("cursor"), from + 2);
    let pending = store.pending_notifications().await.expect("pending");
    assert_eq!(pending.len(), 2);
    let ids: Vec<i64> = pending.iter().map(|n| n.id).collect();
    let d = store
        .create_delivery("notify-leader", "ops-hook", "digest", "[]", &ids)
        .await
        .expect("create")
        .expect("created");
    assert_eq!(
        (d.alerts, d.status, d.attempts),
        (2, DeliveryStatus::Pending, 0)
    );
    assert!(
        store
            .create_delivery("notify-leader", "ops-hook", "digest", "[]", &ids)
            .await
            .expect("create again")
            .is_none(),
        "a notification belongs to one delivery"
    );
    assert!(
        store
            .pending_notifications()
            .await
            .expect("pending")
            .is_empty()
    );
    let now = OffsetDateTime::now_utc() + Duration::seconds(1);
    assert_eq!(store.due_deliveries(now).await.expect("due").len(), 1);
    assert!(
        store
            .record_delivery(
                "notify-leader",
                d.id,
                DeliveryOutcome::Retry {
                    error: "connection refused".into(),
                    at: now + Duration::seconds(60),
                },
            )
            .await
            .expect("retry")
    );
    assert!(
        store.due_deliveries(now).await.expect("due").is_empty(),
        "not due yet"
    );
    assert!(
        store
            .record_delivery("notify-leader", d.id, DeliveryOutcome::Sent)
            .await
            .expect("sent")
    );
    assert!(
        !store
            .record_delivery("notify-leader", d.id, DeliveryOutcome::Sent)
            .await
            .expect("sent twice"),
        "settled once"
    );
    let log = store.deliveries(10).await.expect("log");
    assert_eq!(log[0].id, d.id);
    assert_eq!(log[0].status, DeliveryStatus::Sent);
    assert_eq!(log[0].attempts, 2);
    assert_eq!(log[0].last_error.as_deref(), Some("connection refused"));
    let last = store.last_deliveries().await.expect("last");
    assert!(last.iter().any(|(c, _)| c == "ops-hook"));
    store
        .release_lease(crate::LEADER_LEASE, "notify-leader")
        .await
        .expect("release");
}

async fn racing_replicas_open_one_alert_per_condition(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    use lockstep_core::{Condition, Severity};
    let ttl = std::time::Duration::from_secs(30);
    assert!(
        a.acquire_lease(crate::LEADER_LEASE, "race", ttl)
            .await
            .expect("lease")
            .held
    );
    // Two handles acting for one holder (a leader paused past its lease and its
    // successor look like this to the store): they race to open and escalate.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let sev = if i < 10 {
            Severity::Low
        } else {
            Severity::Critical
        };
        tasks.push(tokio::spawn(async move {
            s.apply_alerts(
                "race",
                vec![AlertWrite::Raise(Box::new(sample_alert(
                    "race-1",
                    Condition::Missing,
                    sev,
                )))],
            )
            .await
            .expect("raise")
        }));
    }
    let mut kinds = Vec::new();
    for t in tasks {
        kinds.extend(t.await.expect("join").into_iter().map(|(_, e)| e.kind));
    }
    assert_eq!(
        kinds.iter().filter(|k| *k == "alert_opened").count(),
        1,
        "{kinds:?}"
    );
    assert!(
        kinds.iter().filter(|k| *k == "alert_escalated").count() <= 1,
        "{kinds:?}"
    );
    let open: Vec<_> = a
        .alerts(AlertFilter {
            state: Some(lockstep_api::AlertState::Open),
            limit: 100,
            ..AlertFilter::default()
        })
        .await
        .expect("list")
        .into_iter()
        .filter(|x| x.instance_id == "race-1")
        .collect();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].severity, Severity::Critical);
    // The other handle, under another name, is fenced out.
    assert!(matches!(
        b.apply_alerts(
            "not-the-leader",
            vec![AlertWrite::Raise(Box::new(sample_alert(
                "race-2",
                Condition::Stale,
                Severity::Low
            )))]
        )
        .await,
        Err(StoreError::NotLeader)
    ));
    a.release_lease(crate::LEADER_LEASE, "race")
        .await
        .expect("release");
}

fn new_rollout(service: &str, nodes: usize) -> crate::NewRollout {
    crate::NewRollout {
        env: "production".into(),
        service: service.into(),
        version_id: "v2".into(),
        previous_version_id: Some("v1".into()),
        settings: serde_json::json!({"canary": 1, "concurrency": 2}),
        phase: "canary".into(),
        actor: "ci".into(),
        nodes: (0..nodes)
            .map(|i| crate::NewRolloutNode {
                instance_id: format!("{service}-{i}"),
                endpoint: format!("http://127.0.0.1:{}", 9000 + i),
            })
            .collect(),
        // Every byte value, and a NUL first: the package is kept byte for byte.
        package: (0..=255u8).rev().chain(0..=255u8).collect(),
        signature: Some(vec![0, 1, 2, 255]),
        initial_step: serde_json::json!({"step": "pending"}),
    }
}

async fn rollouts_keep_nodes_steps_and_package_and_one_runs_per_service(store: &dyn Store) {
    let r = store
        .create_rollout(new_rollout("ro", 3))
        .await
        .expect("create");
    assert!(r.running);
    assert_eq!(r.phase, "canary");
    assert_eq!(r.package_size, 512);
    assert_eq!(r.previous_version_id.as_deref(), Some("v1"));
    let (pkg, sig) = store
        .rollout_package(r.id)
        .await
        .expect("package")
        .expect("stored");
    assert_eq!(pkg, new_rollout("ro", 0).package, "package byte for byte");
    assert_eq!(sig, Some(vec![0, 1, 2, 255]));
    match store.create_rollout(new_rollout("ro", 1)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a second running rollout of one service must conflict: {other:?}"),
    }
    let other = store
        .create_rollout(new_rollout("ro-other", 1))
        .await
        .expect("another service runs side by side");

    // Steps are leader-fenced.
    let step = serde_json::json!({"step": "updating"});
    match store
        .set_rollout_step("nobody", r.id, 0, step.clone(), true, vec![])
        .await
    {
        Err(StoreError::NotLeader) => {}
        other => panic!("a step without the lease must be refused: {other:?}"),
    }
    take_lease(store, "ro-leader").await;
    let ev = NewEvent {
        kind: "worker_update_started".into(),
        data: serde_json::json!({"rollout_id": r.id, "node": "ro-0"}),
        ..NewEvent::default()
    };
    let evs = store
        .set_rollout_step("ro-leader", r.id, 0, step.clone(), true, vec![ev])
        .await
        .expect("step");
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].kind, "worker_update_started");
    let nodes = store.rollout_nodes(r.id).await.expect("nodes");
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0].step, step);
    assert_eq!(nodes[0].attempts, 1);
    assert_eq!(nodes[1].step, serde_json::json!({"step": "pending"}));
    assert_eq!(nodes[2].instance_id, "ro-2");
    assert_eq!(nodes[2].endpoint, "http://127.0.0.1:9002");

    // A request is picked up; finishing frees the service.
    assert!(store.request_rollout(r.id, "abort").await.expect("request"));
    let got = store.rollout(r.id).await.expect("get").expect("some");
    assert_eq!(got.request.as_deref(), Some("abort"));
    match store
        .set_rollout_phase("nobody", r.id, "aborted", false, true, vec![])
        .await
    {
        Err(StoreError::NotLeader) => {}
        other => panic!("a phase without the lease must be refused: {other:?}"),
    }
    store
        .set_rollout_phase("ro-leader", r.id, "aborted", false, true, vec![])
        .await
        .expect("phase");
    let got = store.rollout(r.id).await.expect("get").expect("some");
    assert!(!got.running);
    assert!(got.finished_at.is_some());
    assert_eq!(got.request, None);
    assert!(!store.request_rollout(r.id, "abort").await.expect("request"));
    let running = store.rollouts(true, 10).await.expect("list");
    assert_eq!(
        running.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![other.id]
    );
    let all = store.rollouts(false, 10).await.expect("list");
    assert_eq!(
        all.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![other.id, r.id]
    );

    // Retry: a new rollout of the service blocks it; once that finishes, it restarts.
    let blocker = store
        .create_rollout(new_rollout("ro", 1))
        .await
        .expect("the service is free again");
    match store
        .restart_rollout(
            r.id,
            "batches",
            None,
            vec![(1, serde_json::json!({"step": "pending"}))],
        )
        .await
    {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a retry while another rollout runs must conflict: {other:?}"),
    }
    store
        .set_rollout_phase("ro-leader", blocker.id, "completed", false, false, vec![])
        .await
        .expect("phase");
    assert!(
        store
            .restart_rollout(
                r.id,
                "batches",
                None,
                vec![(0, serde_json::json!({"step": "pending"}))]
            )
            .await
            .expect("restart")
    );
    let got = store.rollout(r.id).await.expect("get").expect("some");
    assert!(got.running);
    assert_eq!(got.phase, "batches");
    assert_eq!(got.finished_at, None);
    let nodes = store.rollout_nodes(r.id).await.expect("nodes");
    assert_eq!(nodes[0].step, serde_json::json!({"step": "pending"}));
    assert_eq!(nodes[0].attempts, 1, "attempts are kept across a retry");
    // The latest rollout of a service is its running one (the retried r, older than the
    // blocker), else its newest; nodes in rollout order.
    let latest = store.latest_rollout_nodes().await.expect("latest");
    let of = |svc: &str| -> Vec<(i64, bool, String)> {
        latest
            .iter()
            .filter(|n| n.service == svc)
            .map(|n| (n.rollout_id, n.running, n.instance_id.clone()))
            .collect()
    };
    assert_eq!(
        of("ro"),
        (0..3)
            .map(|i| (r.id, true, format!("ro-{i}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(of("ro-other"), vec![(other.id, true, "ro-other-0".into())]);
    let first = latest.iter().find(|n| n.service == "ro").expect("ro");
    assert_eq!(first.step, serde_json::json!({"step": "pending"}));
    assert_eq!(first.endpoint, "http://127.0.0.1:9000");
    assert!(
        !store
            .restart_rollout(9_999_999, "batches", None, vec![])
            .await
            .expect("restart")
    );
    store
        .release_lease(crate::LEADER_LEASE, "ro-leader")
        .await
        .expect("release");
}

async fn racing_replicas_start_one_rollout_per_service(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.create_rollout(new_rollout("race-ro", 1)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("racing rollouts: unexpected {e}"),
        }
    }
    assert_eq!(
        ok, 1,
        "exactly one running rollout per service, whatever the races"
    );
    assert_eq!(b.rollouts(true, 100).await.expect("list").len(), 1);
}
