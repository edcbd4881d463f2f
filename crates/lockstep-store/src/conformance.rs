//! The behaviour every [`Store`] backend must have. Each backend's test calls [`run`] with a
//! fresh, empty store; a failed expectation panics with what was expected.

use lockstep_core::{Instance, Release, Role};
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::macros::datetime;

use crate::{NewEvent, Registration, Rollback, Store, StoreError, StoredToken};

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
        instance_id: id.into(),
        env: "production".into(),
        service: "svc".into(),
        version_id: version.into(),
        git_sha: Some("abc".into()),
        build_date: None,
        components: BTreeMap::new(),
        host: Some("h".into()),
        pid: Some(42),
        started_at: Some(now),
        first_seen: now,
        last_seen: now,
        endpoint: None,
        health: None,
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
            Err(StoreError::Rule(lockstep_core::CoreError::Downgrade))
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
    store
        .create_token(t("ci", "h1", Role::Deployer))
        .await
        .expect("create");
    assert!(matches!(
        store.create_token(t("ci", "h2", Role::Viewer)).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .upsert_token(t("admin", "h3", Role::Admin))
        .await
        .expect("upsert");
    store
        .upsert_token(t("admin", "h4", Role::Admin))
        .await
        .expect("upsert again");
    let all = store.tokens().await.expect("tokens");
    assert_eq!(all.len(), 2);
    assert!(all.iter().any(|x| x.name == "admin" && x.hash == "h4"));
    assert!(store.revoke_token("ci").await.expect("revoke"));
    assert!(!store.revoke_token("ci").await.expect("revoke twice"));
    assert_eq!(store.tokens().await.expect("tokens").len(), 1);
}

async fn instances_round_trip(store: &dyn Store) {
    let a = instance("i-a", "v1");
    let mut b = instance("i-b", "v1");
    store
        .save_instances(&[a.clone(), b.clone()])
        .await
        .expect("save");
    b.version_id = "v2".into();
    store
        .save_instances(std::slice::from_ref(&b))
        .await
        .expect("update");
    let mut got = store.load_instances().await.expect("load");
    got.sort_by(|x, y| x.instance_id.cmp(&y.instance_id));
    assert_eq!(got, vec![a, b]);
    store
        .delete_instances(&["i-a".to_string()])
        .await
        .expect("delete");
    assert_eq!(store.load_instances().await.expect("load").len(), 1);
}
