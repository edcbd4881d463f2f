//! The drift detector against time the test controls: a real registry (SQLite, its leader
//! loop, its projection), with `service::drift::check(svc, now)` called at chosen instants
//! so thresholds are crossed without sleeping. The background detector is slowed to once an
//! hour so it does not act in between.

use lockstep_api::{AlertState, PutRelease};
use lockstep_core::{Condition, Release, Severity};
use lockstep_server::service::alerts::AlertSettings;
use lockstep_server::service::drift::check;
use lockstep_server::{Config, Registry, RegistryService};
use lockstep_store::{AlertFilter, SqliteStore};
use lockstep_testkit::eventually;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

fn heartbeat(id: &str, version: &str) -> lockstep_api::Heartbeat {
    serde_json::from_value(serde_json::json!({
        "instance_id": id, "service": "api", "version_id": version,
    }))
    .expect("heartbeat")
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: true,
    }
}

async fn open_alerts(svc: &RegistryService) -> Vec<lockstep_api::Alert> {
    svc.list_alerts(AlertFilter {
        state: Some(AlertState::Open),
        limit: 100,
        ..AlertFilter::default()
    })
    .await
    .expect("alerts")
}

async fn leading_registry(
    dir: &std::path::Path,
    instance_ttl: Duration,
) -> (Arc<RegistryService>, tokio::sync::oneshot::Sender<()>) {
    let store = SqliteStore::open(dir).await.expect("store");
    let config = Config {
        instance_ttl,
        ..Config::default()
    };
    let registry = Registry::open(Arc::new(store), config, Some("lst_drift_test"))
        .await
        .expect("registry");
    let svc = registry.service().clone();
    svc.alerts().configure(AlertSettings {
        check_interval: Duration::from_secs(3600),
        ..AlertSettings::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = registry
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await;
    });
    eventually(Duration::from_secs(10), || async {
        svc.leadership().is_leader().then_some(())
    })
    .await
    .expect("leads");
    (svc, tx)
}

#[tokio::test]
async fn thresholds_open_escalate_and_resolve_one_alert_against_test_controlled_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A TTL longer than the test's clock jumps: the instance is stale, never missing.
    let (svc, _stop) = leading_registry(dir.path(), Duration::from_secs(48 * 3600)).await;
    svc.register("production", "api", release("v1"), "ci")
        .await
        .expect("v1");
    svc.heartbeat(heartbeat("i-1", "v1")).expect("hb");
    svc.register("production", "api", release("v2"), "ci")
        .await
        .expect("v2");
    let t0 = OffsetDateTime::now_utc();
    let min = time::Duration::minutes(1);

    // (offset from t0, severity of the one open alert afterwards, alerts changed)
    let steps: [(time::Duration, Option<Severity>, usize); 6] = [
        (time::Duration::seconds(30), None, 0),
        (min * 2, Some(Severity::Low), 1),
        (min * 3, Some(Severity::Low), 0),
        (min * 15, Some(Severity::Medium), 1),
        (min * 61, Some(Severity::High), 1),
        (min * 60 * 25, Some(Severity::Critical), 1),
    ];
    let mut id = None;
    for (at, want, changed) in steps {
        let n = check(&svc, t0 + at).await.expect("check");
        assert_eq!(n, changed, "at +{at}");
        let open = open_alerts(&svc).await;
        assert_eq!(
            open.iter().map(|a| a.severity).collect::<Vec<_>>(),
            want.into_iter().collect::<Vec<_>>(),
            "at +{at}"
        );
        if let Some(a) = open.first() {
            assert_eq!(a.condition, Condition::Stale);
            assert_eq!(a.current_version, "v1");
            assert_eq!(a.expected_version.as_deref(), Some("v2"));
            assert_eq!(
                *id.get_or_insert(a.alert_id.clone()),
                a.alert_id,
                "escalated in place"
            );
        }
    }
    let id = id.expect("an alert");
    assert_eq!(svc.alerts().open_total(), 1);
    let acked = svc.ack_alert(&id, "oncall", None).await.expect("ack");
    assert!(acked.acknowledged);
    // Current again: resolved, and only that.
    svc.heartbeat(heartbeat("i-1", "v2")).expect("hb");
    assert_eq!(check(&svc, t0 + min * 60 * 26).await.expect("check"), 1);
    assert!(open_alerts(&svc).await.is_empty());
    let history: Vec<String> = svc
        .store()
        .alert_history(id.parse().expect("id"))
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
            "alert_escalated",
            "alert_escalated",
            "alert_acknowledged",
            "alert_resolved"
        ]
    );
    eventually(Duration::from_secs(5), || async {
        (svc.alerts().open_total() == 0).then_some(())
    })
    .await
    .expect("the open count follows the event log");
    assert!(svc.alerts().last_drift_check().is_some());
}

#[tokio::test]
async fn a_missing_instance_is_critical_at_once_and_resolves_when_deregistered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, _stop) = leading_registry(dir.path(), Duration::from_secs(30)).await;
    svc.register("production", "api", release("v1"), "ci")
        .await
        .expect("v1");
    svc.heartbeat(heartbeat("gone-1", "v1")).expect("hb");
    let t0 = OffsetDateTime::now_utc();
    assert_eq!(check(&svc, t0).await.expect("check"), 0, "current: nothing");
    let ttl = time::Duration::try_from(svc.config().instance_ttl).expect("ttl");
    assert_eq!(
        check(&svc, t0 + ttl + time::Duration::seconds(1))
            .await
            .expect("check"),
        1
    );
    let open = open_alerts(&svc).await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].condition, Condition::Missing);
    assert_eq!(open[0].severity, Severity::Critical);
    assert_eq!(
        check(&svc, t0 + ttl * 2).await.expect("again"),
        0,
        "no duplicate"
    );
    svc.deregister("gone-1", "worker")
        .await
        .expect("deregister");
    // The detector's own task may get there first (a deregistration wakes it), so the
    // outcome is what counts, not which check resolved it.
    check(&svc, t0 + ttl * 3).await.expect("check");
    assert!(open_alerts(&svc).await.is_empty());
}
