//! Several `lockstep serve` replicas on one PostgreSQL database, and the Redis mirror:
//! real processes, real sockets, the machine's PostgreSQL and Redis, `kill -9`.
//!
//! Each test runs in its own fresh schema, so tests never see each other's rows. They skip
//! (with the reason printed) when `LOCKSTEP_TEST_PG` / `LOCKSTEP_TEST_REDIS` are unset;
//! `.ci/run` sets both.

use futures_util::StreamExt;
use lockstep_api::{Heartbeat, PutRelease};
use lockstep_client::{RegistryClient, Watcher, WatcherConfig};
use lockstep_core::{Release, Role, Status};
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess, eventually, fresh_pg_url, redis_url};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

/// A replica named `name` on the store `url`, with short TTLs so missing instances and
/// leader failover happen within a test's patience.
fn replica(url: &str, name: &str, extra: &[&str]) -> ServeProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec![
        "--store",
        url,
        "--replica-id",
        name,
        "--leader-lease",
        "2s",
        "--heartbeat-interval",
        "1s",
    ];
    if !extra.contains(&"--instance-ttl") {
        args.extend(["--instance-ttl", "2s"]);
    }
    args.extend_from_slice(extra);
    ServeProcess::spawn(Path::new(BIN), dir.path(), &args, &[])
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

fn heartbeat(id: &str, service: &str, version: &str) -> Heartbeat {
    serde_json::from_value(serde_json::json!({
        "instance_id": id, "service": service, "version_id": version,
        "git_sha": format!("sha-{version}"), "pid": 4242,
        "build_date": "2026-11-30T10:00:00Z", "started_at": "2026-11-30T11:00:00Z",
    }))
    .expect("heartbeat")
}

async fn leader_seen_by(client: &RegistryClient) -> Option<String> {
    client
        .status(None, None)
        .await
        .ok()
        .and_then(|r| r.registry)
        .and_then(|r| r.leader)
}

async fn events_of_kind(client: &RegistryClient, kind: &str) -> Vec<lockstep_api::Event> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = client.events(since, 1000).await.expect("events").events;
        let Some(last) = page.last() else {
            return out;
        };
        since = last.id;
        out.extend(page.into_iter().filter(|e| e.kind == kind));
    }
}

/// The next named SSE event of a stream (skipping keep-alive chunks).
async fn next_event(
    stream: &mut (impl futures_util::Stream<Item = lockstep_client::sse::SseEvent> + Unpin),
) -> lockstep_client::sse::SseEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open");
        if !ev.event.is_empty() {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_database_agree_on_releases_tokens_and_events() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let a = replica(&url, "replica-a", &[]);
    let b = replica(&url, "replica-b", &[]);
    let (admin_a, admin_b) = (a.client(ADMIN_TOKEN), b.client(ADMIN_TOKEN));

    // A token created through A works on B (B's token set is a projection of the store).
    let worker = admin_a
        .create_token("workers", Role::Worker)
        .await
        .expect("token")
        .token;
    let worker_b = b.client(&worker);
    eventually(Duration::from_secs(2), || async {
        // Ok(None): authenticated, no release yet.
        worker_b.release("production", "api").await.ok()
    })
    .await
    .expect("B accepts a token created through A within 2 s");

    let mut watch_b = Box::pin(
        worker_b
            .watch(Some("production"), Some("api"), None)
            .await
            .expect("watch on B"),
    );
    let mut events_b = Box::pin(admin_b.event_stream(None).await.expect("events on B"));

    let put = admin_a
        .put_release("production", "api", &release("v1"))
        .await
        .expect("PUT through A");
    let ev = next_event(&mut watch_b).await;
    assert_eq!(ev.event, "release");
    assert_eq!(
        ev.id.as_deref(),
        Some(put.revision.to_string().as_str()),
        "the watcher on B gets A's change with the same revision"
    );
    let via_b = admin_b
        .release("production", "api")
        .await
        .expect("GET through B")
        .expect("a release");
    assert_eq!(via_b.revision, put.revision, "revisions agree through both");
    assert_eq!(via_b.release.version_id, "v1");
    let ev = next_event(&mut events_b).await;
    assert_eq!(
        ev.event, "release_registered",
        "A's event reaches B's stream"
    );

    // Revocation through A is in force on B within 2 s.
    let ci = admin_a
        .create_token("ci", Role::Deployer)
        .await
        .expect("ci")
        .token;
    let ci_b = b.client(&ci);
    eventually(Duration::from_secs(2), || async {
        ci_b.put_release("production", "web", &release("w1"))
            .await
            .ok()
    })
    .await
    .expect("the new token works on B");
    admin_a.revoke_token("ci").await.expect("revoke through A");
    let revoked_at = Instant::now();
    let (_, took) = eventually(Duration::from_secs(2), || async {
        ci_b.status(None, None)
            .await
            .err()?
            .status()
            .filter(|s| *s == 401)
    })
    .await
    .expect("B refuses a token revoked through A within 2 s");
    assert!(took <= Duration::from_secs(2) && revoked_at.elapsed() < Duration::from_secs(3));

    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        kinds.push(next_event(&mut events_b).await.event);
    }
    assert_eq!(
        kinds,
        ["token_created", "release_registered", "token_revoked"],
        "every event written through A (and B) appears on B's stream, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registrations_racing_through_both_replicas_apply_once_and_are_watched_in_order() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let a = replica(&url, "race-a", &[]);
    let b = replica(&url, "race-b", &[]);
    let watcher = b.client(ADMIN_TOKEN);
    let mut stream = Box::pin(watcher.watch(None, None, Some(0)).await.expect("watch all"));

    let mut tasks = Vec::new();
    for w in 0..6 {
        let client = if w % 2 == 0 {
            a.client(ADMIN_TOKEN)
        } else {
            b.client(ADMIN_TOKEN)
        };
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..15 {
                // Three services, each written through both replicas at once.
                let svc = format!("svc-{}", w % 3);
                let r = client
                    .put_release("production", &svc, &release(&format!("w{w}-{i}")))
                    .await
                    .expect("registration");
                acked.push((r.revision, svc, r.release.version_id));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("join"));
    }
    acked.sort();
    let revisions: Vec<i64> = acked.iter().map(|x| x.0).collect();
    assert_eq!(
        revisions.iter().collect::<BTreeSet<_>>().len(),
        90,
        "90 distinct revisions"
    );

    let mut seen = Vec::new();
    while seen.len() < 90 {
        let ev = next_event(&mut stream).await;
        seen.push(ev.id.and_then(|s| s.parse::<i64>().ok()).expect("id"));
    }
    assert_eq!(
        seen, revisions,
        "a watcher of every service sees every revision exactly once, in order"
    );
    let admin = a.client(ADMIN_TOKEN);
    for svc in ["svc-0", "svc-1", "svc-2"] {
        let hist = admin
            .history("production", svc, 1000)
            .await
            .expect("history");
        let mut ids: Vec<_> = hist
            .releases
            .iter()
            .map(|r| r.release.version_id.clone())
            .collect();
        let mut expect: Vec<_> = acked
            .iter()
            .filter(|x| x.1 == svc)
            .map(|x| x.2.clone())
            .collect();
        ids.sort();
        expect.sort();
        assert_eq!(
            ids, expect,
            "{svc}: every acknowledged registration, exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_through_one_replica_shows_in_status_and_metrics_of_the_other_within_2s() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let a = replica(&url, "hb-a", &["--instance-ttl", "30s"]);
    let b = replica(&url, "hb-b", &["--instance-ttl", "30s"]);
    let admin_b = b.client(ADMIN_TOKEN);
    a.client(ADMIN_TOKEN)
        .put_release("production", "api", &release("v1"))
        .await
        .expect("PUT");
    a.client(ADMIN_TOKEN)
        .heartbeat(&heartbeat("i-1", "api", "v1"))
        .await
        .expect("heartbeat through A");
    let (_, took) = eventually(Duration::from_secs(2), || async {
        let r = admin_b.status(None, Some("api")).await.ok()?;
        let svc = r.environments.first()?.services.first()?;
        (svc.counts.current == 1).then_some(())
    })
    .await
    .expect("B's status shows the instance within 2 s");
    println!("visible through B after {took:?}");
    let metrics_url = format!("{}/metrics", b.url);
    eventually(Duration::from_secs(2), || async {
        let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        text.contains("lockstep_instances_total{status=\"current\"} 1")
            .then_some(())
    })
    .await
    .expect("B's /metrics counts it");
    // And `lockstep verify` through B says so.
    let out = std::process::Command::new(BIN)
        .args(["verify", "--service", "api"])
        .env("LOCKSTEP_REGISTRY", &b.url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .env_remove("LOCKSTEP_ENV")
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_leader_is_killed_another_takes_over_and_missing_instances_are_reported_once() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let mut a = replica(&url, "lead-a", &[]);
    let admin_a = a.client(ADMIN_TOKEN);
    eventually(Duration::from_secs(5), || async {
        (leader_seen_by(&admin_a).await.as_deref() == Some("lead-a")).then_some(())
    })
    .await
    .expect("the first replica leads");
    let b = replica(&url, "lead-b", &[]);
    let admin_b = b.client(ADMIN_TOKEN);
    eventually(Duration::from_secs(3), || async {
        (leader_seen_by(&admin_b).await.as_deref() == Some("lead-a")).then_some(())
    })
    .await
    .expect("B knows A leads");
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", b.url))
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["registry"]["leader"], "lead-a");
    assert_eq!(health["registry"]["replica"], "lead-b");

    // One instance goes silent while A leads: A reports it.
    admin_b
        .heartbeat(&heartbeat("early", "api", "v1"))
        .await
        .expect("heartbeat");
    eventually(Duration::from_secs(8), || async {
        (!events_of_kind(&admin_b, "instance_missing")
            .await
            .is_empty())
        .then_some(())
    })
    .await
    .expect("A reports the silent instance");

    // Kill the leader; a second instance goes silent while nobody leads.
    admin_b
        .heartbeat(&heartbeat("late", "api", "v1"))
        .await
        .expect("heartbeat");
    a.kill9();
    let killed = Instant::now();
    let (_, took) = eventually(Duration::from_secs(10), || async {
        (leader_seen_by(&admin_b).await.as_deref() == Some("lead-b")).then_some(())
    })
    .await
    .expect("B takes the lease within 10 s of kill -9");
    println!("takeover after {took:?}");
    assert!(killed.elapsed() < Duration::from_secs(10));
    eventually(Duration::from_secs(8), || async {
        let evs = events_of_kind(&admin_b, "instance_missing").await;
        evs.iter()
            .any(|e| e.data["instance_id"] == "late")
            .then_some(())
    })
    .await
    .expect("the new leader reports the instance that went silent");
    // A few more scans: nothing is reported twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let evs = events_of_kind(&admin_b, "instance_missing").await;
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for e in &evs {
        *per_instance
            .entry(
                e.data["instance_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default() += 1;
    }
    assert_eq!(
        per_instance,
        BTreeMap::from([("early".to_string(), 1), ("late".to_string(), 1)]),
        "each silent instance is reported exactly once across the failover"
    );
    assert!(b.logs().contains("this replica is now the leader"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_whose_replica_is_killed_resumes_on_the_next_one_missing_nothing() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let mut a = replica(&url, "fo-a", &[]);
    let b = replica(&url, "fo-b", &[]);
    let admin_b = b.client(ADMIN_TOKEN);
    let v0 = admin_b
        .put_release("production", "api", &release("v0"))
        .await
        .expect("v0");
    let mut cfg = WatcherConfig::new(&format!("{},{}", a.url, b.url), "api", "v0");
    cfg.token = Some(ADMIN_TOKEN.into());
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(200);
    cfg.cache_ttl = Duration::from_secs(60);
    let watcher = Watcher::start(cfg).expect("watcher");
    // Subscribing races with the first push; the revision tells when the stream is up.
    let mut pushed = watcher.subscribe();
    eventually(Duration::from_secs(5), || async {
        (watcher.revision() >= v0.revision).then_some(())
    })
    .await
    .expect("the watcher is connected");
    // Connected to A (first URL): one change through A, then A dies.
    let v1 = a
        .client(ADMIN_TOKEN)
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let got = loop {
        let r = tokio::time::timeout(Duration::from_secs(5), pushed.recv())
            .await
            .expect("v1 pushed")
            .expect("open");
        if r.revision >= v1.revision {
            break r;
        }
    };
    assert_eq!(got.revision, v1.revision);
    a.kill9();
    let mut acked = Vec::new();
    for i in 2..6 {
        let r = admin_b
            .put_release("production", "api", &release(&format!("v{i}")))
            .await
            .expect("PUT through B");
        acked.push(r.revision);
    }
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), pushed.recv())
            .await
            .expect("the watcher moves to B and gets the changes")
            .expect("open");
        seen.push(r.revision);
    }
    assert_eq!(
        seen, acked,
        "every revision after the failover, once, in order"
    );
    assert_eq!(watcher.status(), Status::Stale, "v0 is no longer expected");
}

/// Hashes under `<prefix>:worker:*:version`, read as the source system's verify script
/// reads them: SCAN, then HGETALL.
async fn beat(c: &RegistryClient, svc: &str, id: &str) {
    c.heartbeat(&heartbeat(id, svc, "v1"))
        .await
        .expect("heartbeat");
}

async fn mirrored(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:worker:*:version"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        for k in keys {
            let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(&k)
                .query_async(conn)
                .await
                .expect("hgetall");
            out.insert(k, h);
        }
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_mirror_holds_exactly_the_live_instances_under_the_fiskai_prefix() {
    let (Some(url), Some(redis)) = (fresh_pg_url().await, redis_url()) else {
        return;
    };
    let mirror = ["--redis-mirror", redis.as_str(), "--redis-prefix", "fiskai"];
    let a = replica(&url, "mir-a", &mirror);
    let b = replica(&url, "mir-b", &mirror);
    let mut conn = redis::Client::open(redis.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let (wa, wb) = (a.client(ADMIN_TOKEN), b.client(ADMIN_TOKEN));
    // Heartbeats through both replicas; "gone" deregisters, "silent" stops heartbeating.
    let live = [("api", "api-1"), ("api", "api-2"), ("extractor", "ex-1")];
    beat(&wb, "billing", "gone").await;
    beat(&wa, "billing", "silent").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deregistered = false;
    let expected: BTreeSet<String> = [
        "fiskai:worker:api:version",
        "fiskai:worker:api:api-1:version",
        "fiskai:worker:api:api-2:version",
        "fiskai:worker:extractor:version",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut last = BTreeMap::new();
    while Instant::now() < deadline {
        for (i, (svc, id)) in live.iter().enumerate() {
            beat(if i % 2 == 0 { &wa } else { &wb }, svc, id).await;
        }
        // Deregistered through the other replica once that one has heard of it.
        if !deregistered && wa.deregister("gone").await.is_ok() {
            deregistered = true;
        }
        last = mirrored(&mut conn, "fiskai").await;
        if last.keys().cloned().collect::<BTreeSet<_>>() == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        last.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the mirror shows the live instances and none that deregistered or went missing"
    );
    for h in last.values() {
        assert_eq!(h["gitSha"], "sha-v1");
        assert_eq!(h["pid"], "4242");
        assert!(
            h.get("startedAt")
                .is_some_and(|v| v.starts_with("2026-11-30T11:00:00"))
                && h.get("buildDate")
                    .is_some_and(|v| v.starts_with("2026-11-30T10:00:00")),
            "{h:?}"
        );
    }
    let metrics = reqwest::get(format!("{}/metrics", a.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("lockstep_redis_mirror_up"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_stopped_registrations_and_heartbeats_still_answer_at_once() {
    let Some(_) = redis_url() else {
        return;
    };
    // A private Redis we may stop, and a "black hole" that accepts and never answers:
    // the two ways a mirror target fails.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let Ok(mut redis_server) = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        println!("skipping: redis-server is not on PATH");
        return;
    };
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_url = format!("redis://{}", hole.local_addr().expect("addr"));
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for s in hole.incoming().flatten() {
                if let Ok(mut h) = held.lock() {
                    h.push(s);
                }
            }
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let down_url = format!("redis://127.0.0.1:{port}");
    for target in [down_url.as_str(), hole_url.as_str()] {
        let dir = tempfile::tempdir_in(dir.path()).expect("tempdir");
        let serve = ServeProcess::spawn(
            Path::new(BIN),
            dir.path(),
            &["--redis-mirror", target, "--redis-prefix", "lstest-down"],
            &[],
        );
        let c = serve.client(ADMIN_TOKEN);
        c.heartbeat(&heartbeat("warm", "api", "v1"))
            .await
            .expect("hb");
        if target == down_url {
            let _ = redis_server.kill();
            let _ = redis_server.wait();
        }
        // Give the mirror time to notice and start failing.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut slowest = Duration::ZERO;
        for i in 0..200 {
            let t = Instant::now();
            c.heartbeat(&heartbeat(&format!("i-{i}"), "api", "v1"))
                .await
                .expect("heartbeat answers");
            slowest = slowest.max(t.elapsed());
        }
        for i in 0..20 {
            let t = Instant::now();
            c.put_release("production", "api", &release(&format!("r{i}")))
                .await
                .expect("registration answers");
            slowest = slowest.max(t.elapsed());
        }
        // A Redis timeout is a second or more; a call that waited on Redis would show it.
        assert!(
            slowest < Duration::from_millis(500),
            "slowest call {slowest:?} with the mirror target {target} failing"
        );
        let metrics = reqwest::get(format!("{}/metrics", serve.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            metrics.contains("lockstep_redis_mirror_up 0"),
            "the outage is visible in /metrics: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_on_one_replica_ends_within_a_second_of_its_token_being_revoked_through_the_other()
{
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let a = replica(&url, "rev-a", &[]);
    let b = replica(&url, "rev-b", &[]);
    let admin_a = a.client(ADMIN_TOKEN);
    admin_a
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let secret = admin_a
        .create_token("edge", Role::Worker)
        .await
        .expect("token")
        .token;
    let edge_b = b.client(&secret);
    let mut watch = eventually(Duration::from_secs(2), || async {
        edge_b
            .watch(Some("production"), Some("api"), None)
            .await
            .ok()
            .map(Box::pin)
    })
    .await
    .expect("B accepts the token")
    .0;
    assert_eq!(next_event(&mut watch).await.event, "release");
    admin_a
        .revoke_token("edge")
        .await
        .expect("revoke through A");
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), async {
        while watch.next().await.is_some() {}
    })
    .await
    .expect("B's stream ends within 1 s of the revocation through A");
    println!("ended after {:?}", start.elapsed());
}
