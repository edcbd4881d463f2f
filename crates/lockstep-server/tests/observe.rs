//! What the registry tells those who watch the fleet rather than run in it: the instance
//! push stream that routers follow, and `/metrics` — parsed with a Prometheus text parser
//! and compared with `/v1/status`.

use lockstep_api::{InstanceRemoved, InstanceSnapshot, InstanceStatus, PutRelease};
use lockstep_core::{Release, Role, Status};
use lockstep_server::Config;
use lockstep_testkit::{InProcessRegistry, eventually, next_event};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

fn heartbeat(id: &str, svc: &str, version: &str) -> lockstep_api::Heartbeat {
    serde_json::from_value(json!({
        "instance_id": id, "service": svc, "version_id": version,
        "endpoint": format!("http://127.0.0.1:9/{id}"),
    }))
    .expect("heartbeat")
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

const WITHIN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_instance_stream_sends_a_snapshot_then_changes_and_statuses_after_a_deploy() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    for id in ["a", "b"] {
        admin
            .heartbeat(&heartbeat(id, "api", "v1"))
            .await
            .expect("hb");
    }
    admin
        .heartbeat(&heartbeat("other", "jobs", "j1"))
        .await
        .expect("hb");
    let viewer = reg.client(&reg.token("gw", Role::Viewer).await);
    let mut s = Box::pin(
        viewer
            .watch_instances("production", Some("api"))
            .await
            .expect("watch"),
    );
    let ev = next_event(&mut s, WITHIN).await.expect("snapshot");
    assert_eq!(ev.event, "snapshot");
    let snap: InstanceSnapshot = serde_json::from_str(&ev.data).expect("snapshot json");
    let ids: Vec<_> = snap
        .instances
        .iter()
        .map(|i| i.instance.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b"], "only the service asked for, ordered by id");
    assert!(snap.instances.iter().all(|i| i.status == Status::Current));

    // A plain heartbeat that changes nothing is not news; a new instance is.
    admin
        .heartbeat(&heartbeat("a", "api", "v1"))
        .await
        .expect("hb");
    admin
        .heartbeat(&heartbeat("c", "api", "v2"))
        .await
        .expect("hb");
    let ev = next_event(&mut s, WITHIN).await.expect("instance c");
    assert_eq!(ev.event, "instance");
    let c: InstanceStatus = serde_json::from_str(&ev.data).expect("json");
    assert_eq!(c.instance.instance_id, "c");
    assert_eq!(c.status, Status::Stale);

    // A deploy turns the statuses around at once, for every instance of the service.
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    let mut after = HashMap::new();
    while after.len() < 3 {
        let ev = next_event(&mut s, WITHIN)
            .await
            .expect("status after deploy");
        assert_eq!(ev.event, "instance");
        let i: InstanceStatus = serde_json::from_str(&ev.data).expect("json");
        after.insert(i.instance.instance_id.clone(), i.status);
    }
    assert_eq!(after["a"], Status::Stale);
    assert_eq!(after["b"], Status::Stale);
    assert_eq!(after["c"], Status::Current);

    admin.deregister("b").await.expect("deregister");
    let ev = next_event(&mut s, WITHIN).await.expect("removed");
    assert_eq!(ev.event, "removed");
    let gone: InstanceRemoved = serde_json::from_str(&ev.data).expect("json");
    assert_eq!(gone.instance_id, "b");
    assert_eq!(gone.reason, "deregistered");
}

#[tokio::test]
async fn the_instance_stream_needs_a_viewer_token() {
    let reg = InProcessRegistry::start().await;
    let worker = reg.client(&reg.token("w", Role::Worker).await);
    let err = match worker.watch_instances("production", None).await {
        Ok(_) => panic!("a worker token must not list instances"),
        Err(e) => e,
    };
    assert_eq!(err.status(), Some(403));
}

/// Parses `/metrics` with a Prometheus text parser.
async fn scrape(reg: &InProcessRegistry) -> prometheus_parse::Scrape {
    let text = reqwest::get(format!("{}/metrics", reg.url))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

fn gauge(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.get(k).is_some_and(|l| l == *v))
        })
        .and_then(|x| match x.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[tokio::test]
async fn metrics_parse_and_their_instance_counts_match_the_status_report() {
    let reg = InProcessRegistry::start_with(Config {
        instance_ttl: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let admin = reg.admin();
    let mut accepting = Release::new("v2");
    accepting.accepts = vec!["v1".into()];
    admin
        .put_release(
            "production",
            "api",
            &PutRelease {
                release: accepting,
                force: false,
            },
        )
        .await
        .expect("v2");
    admin
        .put_release("staging", "api", &release("s1"))
        .await
        .expect("s1");
    for (id, v) in [
        ("a", "v2"),
        ("b", "v2"),
        ("c", "v1"),
        ("d", "v0"),
        ("e", "v2"),
    ] {
        admin.heartbeat(&heartbeat(id, "api", v)).await.expect("hb");
    }
    let mut staging = heartbeat("s", "api", "old");
    staging.env = "staging".into();
    admin.heartbeat(&staging).await.expect("hb");
    admin
        .heartbeat(&heartbeat("n", "norelease", "x"))
        .await
        .expect("hb");
    // "e" falls silent and goes missing after its 1 s TTL; the others keep heartbeating.
    let missing = eventually(Duration::from_secs(10), || async {
        for (id, v) in [("a", "v2"), ("b", "v2"), ("c", "v1"), ("d", "v0")] {
            admin.heartbeat(&heartbeat(id, "api", v)).await.ok()?;
        }
        admin.heartbeat(&staging).await.ok()?;
        admin
            .heartbeat(&heartbeat("n", "norelease", "x"))
            .await
            .ok()?;
        let r = admin.status(None, None).await.ok()?;
        let api = r
            .environments
            .iter()
            .find(|e| e.name == "production")?
            .services
            .iter()
            .find(|s| s.name == "api")?;
        (api.counts.missing == 1).then_some(())
    })
    .await;
    assert!(missing.is_some(), "e went missing");

    // Heartbeats stop while both are read, so both see the same fleet.
    let report = admin.status(None, None).await.expect("status");
    let scrape = scrape(&reg).await;
    let mut compared = 0;
    for env in &report.environments {
        for svc in &env.services {
            let c = svc.counts;
            for (status, n) in [
                ("current", c.current),
                ("draining", c.draining),
                ("stale", c.stale),
                ("missing", c.missing),
                ("unknown", c.unknown),
            ] {
                let m = gauge(
                    &scrape,
                    "lockstep_instances",
                    &[
                        ("env", &env.name),
                        ("service", &svc.name),
                        ("status", status),
                    ],
                );
                assert_eq!(
                    m,
                    Some(f64::from(n)),
                    "{}/{} {status}: metrics {m:?}, status {n}",
                    env.name,
                    svc.name
                );
                compared += 1;
            }
        }
    }
    assert_eq!(
        compared,
        3 * 5,
        "production/api, production/norelease, staging/api"
    );
    let api = |s: &str| {
        gauge(
            &scrape,
            "lockstep_instances",
            &[("env", "production"), ("service", "api"), ("status", s)],
        )
    };
    assert_eq!(api("current"), Some(2.0));
    assert_eq!(api("draining"), Some(1.0));
    assert_eq!(api("stale"), Some(1.0));
    assert_eq!(api("missing"), Some(1.0));
    assert_eq!(
        gauge(
            &scrape,
            "lockstep_instances_total",
            &[("status", "unknown")]
        ),
        Some(1.0)
    );
    assert!(
        gauge(
            &scrape,
            "lockstep_drift_seconds",
            &[("env", "production"), ("service", "api")]
        )
        .is_some()
    );
    // Requests are counted by route, never by raw path.
    let heartbeats = gauge(
        &scrape,
        "lockstep_http_requests_total",
        &[
            ("route", "/v1/instances"),
            ("method", "POST"),
            ("status", "200"),
        ],
    );
    assert!(heartbeats.is_some_and(|n| n >= 7.0), "{heartbeats:?}");
    assert!(
        !scrape.samples.iter().any(|x| x
            .labels
            .get("route")
            .is_some_and(|r| r.contains("/production/"))),
        "routes are templates"
    );
}

#[tokio::test]
async fn convergence_is_measured_when_every_live_instance_runs_the_new_release() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    for id in ["a", "b"] {
        admin
            .heartbeat(&heartbeat(id, "api", "v1"))
            .await
            .expect("hb");
    }
    let count = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .find(|x| x.metric == "lockstep_convergence_seconds_count")
            .and_then(|x| match x.value {
                prometheus_parse::Value::Untyped(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v) => Some(v),
                _ => None,
            })
    };
    // v1 converged already (both instances run it).
    let first = eventually(WITHIN, || async {
        count(&scrape(&reg).await).filter(|n| *n >= 1.0)
    })
    .await
    .map(|(n, _)| n);
    assert_eq!(first, Some(1.0));
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    admin
        .heartbeat(&heartbeat("a", "api", "v2"))
        .await
        .expect("hb");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        count(&scrape(&reg).await),
        Some(1.0),
        "half the fleet on v2 is not converged"
    );
    admin
        .heartbeat(&heartbeat("b", "api", "v2"))
        .await
        .expect("hb");
    let second = eventually(WITHIN, || async {
        count(&scrape(&reg).await).filter(|n| *n >= 2.0)
    })
    .await;
    assert!(
        second.is_some(),
        "v2 converged once every live instance ran it"
    );
}
