//! The watcher and the layer against real registries over real sockets: a lockstep registry
//! in-process for the normal paths, and small deliberately broken HTTP servers for the
//! failure modes (500, garbage JSON, a stream cut in the middle of an event).

use axum::Router;
use axum::routing::get;
use lockstep_api::PutRelease;
use lockstep_client::{STALE_BODY, VersionCheckLayer, Watcher, WatcherConfig};
use lockstep_core::{Release, Role, Status};
use lockstep_server::Config;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use std::time::{Duration, Instant};

fn cfg(url: &str, service: &str, version: &str) -> WatcherConfig {
    let mut c = WatcherConfig::new(url, service, version);
    c.token = Some(ADMIN_TOKEN.into());
    c.cache_ttl = Duration::from_millis(100);
    c
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

/// Waits until `f` holds, at most `within`; returns how long it took.
async fn eventually(within: Duration, what: &str, f: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Serves `router` on 127.0.0.1:0 and returns its URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    url
}

/// A worker app: `/` and `/healthz` behind the layer.
async fn app(watcher: Watcher) -> String {
    serve(
        Router::new()
            .route("/", get(|| async { "hello" }))
            .route("/healthz", get(|| async { "ok" }))
            .layer(VersionCheckLayer::new(watcher).exempt("/healthz")),
    )
    .await
}

#[tokio::test]
async fn matching_version_passes_and_a_new_release_makes_the_worker_answer_503() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("3f2a9c1e-aaaa-4bbb-8ccc-v1"))
        .await
        .expect("v1");
    let w = Watcher::start(cfg(&reg.url, "api", "3f2a9c1e-aaaa-4bbb-8ccc-v1")).expect("watcher");
    eventually(Duration::from_secs(5), "learns it is current", || {
        w.status() == Status::Current
    })
    .await;
    let url = app(w.clone()).await;
    let http = reqwest::Client::new();
    let resp = http.get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "hello");

    admin
        .put_release("production", "api", &release("9d8c7b6a-dddd-4eee-8fff-v2"))
        .await
        .expect("v2");
    let took = eventually(Duration::from_millis(250), "503 after the PUT", || {
        !w.is_current()
    })
    .await;
    eprintln!("stale after {took:?}");
    let resp = http.get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.expect("text");
    assert_eq!(body, STALE_BODY);
    assert_eq!(body, r#"{"error":"service_unavailable"}"#);
    for id in ["3f2a9c1e", "9d8c7b6a", "v1", "v2"] {
        assert!(
            !headers.contains(id) && !body.contains(id),
            "a 503 reveals no version id"
        );
    }
    // Health checks are exempt.
    assert_eq!(
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    // Rolling back makes it current again.
    admin
        .rollback("production", "api", &Default::default())
        .await
        .expect("rollback");
    eventually(Duration::from_secs(2), "current after rollback", || {
        w.is_current()
    })
    .await;
    assert_eq!(http.get(&url).send().await.expect("get").status(), 200);
}

#[tokio::test]
async fn services_are_checked_independently_and_draining_serves() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "auth", &release("a1"))
        .await
        .expect("a1");
    admin
        .put_release("production", "token", &release("t1"))
        .await
        .expect("t1");
    let auth = Watcher::start(cfg(&reg.url, "auth", "a1")).expect("watcher");
    let token = Watcher::start(cfg(&reg.url, "token", "t1")).expect("watcher");
    eventually(Duration::from_secs(5), "both current", || {
        auth.status() == Status::Current && token.status() == Status::Current
    })
    .await;
    let mut v2 = release("a2");
    v2.release.accepts = vec!["a1".into()];
    admin
        .put_release("production", "auth", &v2)
        .await
        .expect("a2");
    eventually(Duration::from_secs(2), "auth draining", || {
        auth.status() == Status::Draining
    })
    .await;
    assert!(auth.is_current(), "a draining instance serves");
    admin
        .put_release("production", "auth", &release("a3"))
        .await
        .expect("a3");
    eventually(Duration::from_secs(2), "auth stale", || !auth.is_current()).await;
    assert!(
        token.is_current(),
        "another service's deploy does not touch this one"
    );
}

#[tokio::test]
async fn nothing_registered_means_pass() {
    let reg = InProcessRegistry::start().await;
    let w = Watcher::start(cfg(&reg.url, "api", "v1")).expect("watcher");
    eventually(Duration::from_secs(5), "reaches the registry", || {
        w.registry_reachable()
    })
    .await;
    assert!(w.is_current());
    assert_eq!(w.status(), Status::Unknown);
}

#[tokio::test]
async fn an_unreachable_registry_fails_open_and_then_closed_after_fail_open_for() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let open = Watcher::start(cfg(&dead, "api", "v1")).expect("watcher");
    let mut bounded_cfg = cfg(&dead, "api", "v1");
    bounded_cfg.fail_open_for = Some(Duration::from_millis(800));
    let bounded = Watcher::start(bounded_cfg).expect("watcher");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        open.is_current() && bounded.is_current(),
        "fail open at first"
    );
    eventually(
        Duration::from_secs(3),
        "fails closed after the bound",
        || !bounded.is_current(),
    )
    .await;
    assert!(open.is_current(), "unbounded stays open");
    assert!(open.outage_secs() < 60 && !open.registry_reachable());
}

#[tokio::test]
async fn a_registry_answering_500_or_garbage_fails_open() {
    let broken = serve(
        Router::new()
            .route(
                "/v1/watch",
                get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route(
                "/v1/envs/production/services/api/release",
                get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route(
                "/v1/envs/production/services/garbage/release",
                get(|| async { ([("content-type", "application/json")], "{not json") }),
            ),
    )
    .await;
    let w500 = Watcher::start(cfg(&broken, "api", "v1")).expect("watcher");
    let wgarbage = Watcher::start(cfg(&broken, "garbage", "v1")).expect("watcher");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(w500.is_current() && wgarbage.is_current());
    assert_eq!(
        (w500.status(), wgarbage.status()),
        (Status::Unknown, Status::Unknown)
    );
    let mut bounded = cfg(&broken, "api", "v1");
    bounded.fail_open_for = Some(Duration::from_millis(200));
    let b = Watcher::start(bounded).expect("watcher");
    eventually(
        Duration::from_secs(3),
        "a 500 is no answer: fails closed after the bound",
        || !b.is_current(),
    )
    .await;
}

#[tokio::test]
async fn a_stream_cut_in_the_middle_of_an_event_changes_nothing() {
    let current = r#"{"env":"production","service":"api","revision":1,"kind":"register","registered_at":"2026-11-24T00:00:00Z","version_id":"v1"}"#;
    let cut = format!(
        "id: 1\nevent: release\ndata: {current}\n\nid: 2\nevent: release\ndata: {{\"env\":\"production\",\"service\":\"api\",\"revi"
    );
    let broken = serve(Router::new().route(
        "/v1/watch",
        get(move || {
            let body = cut.clone();
            async move { ([("content-type", "text/event-stream")], body) }
        }),
    ))
    .await;
    let w = Watcher::start(cfg(&broken, "api", "v1")).expect("watcher");
    eventually(Duration::from_secs(3), "reads the complete event", || {
        w.status() == Status::Current
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.is_current(), "the half event is ignored");
    assert_eq!(w.revision(), 1);
}

#[tokio::test]
async fn the_kill_switch_disables_the_check() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    let mut c = cfg(&reg.url, "api", "v1");
    c.enabled = false;
    let w = Watcher::start(c).expect("watcher");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.is_current(), "LOCKSTEP_CHECK=off: never stale");
    let on = Watcher::start(cfg(&reg.url, "api", "v1")).expect("watcher");
    eventually(
        Duration::from_secs(3),
        "the same setup with the check on is stale",
        || !on.is_current(),
    )
    .await;
}

#[tokio::test]
async fn the_watcher_misses_no_revision_across_a_registry_restart() {
    let reg = InProcessRegistry::start().await;
    let addr = reg.url.trim_start_matches("http://").to_string();
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let w = Watcher::start(cfg(&reg.url, "api", "v9")).expect("watcher");
    let mut rx = w.subscribe();
    eventually(Duration::from_secs(5), "first release", || {
        w.revision() == 1
    })
    .await;
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    eventually(Duration::from_secs(5), "second release", || {
        w.revision() == 2
    })
    .await;
    let dir = reg.stop().await;
    // Down for a moment; then back on the same address with two changes made before the
    // watcher has reconnected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reg = InProcessRegistry::start_at(dir, Config::default(), &addr).await;
    let admin = reg.admin();
    for v in ["v3", "v4"] {
        admin
            .put_release("production", "api", &release(v))
            .await
            .expect("register");
    }
    // Read the stream until revision 4 arrives, rather than waiting for `revision()`: a
    // heartbeat answer can tell the watcher about revision 4 before the stream, replaying
    // from its cursor, has pushed 3 and 4.
    let mut seen = Vec::new();
    let caught_up = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(r) = rx.recv().await {
            seen.push(r.revision);
            if r.revision >= 4 {
                break;
            }
        }
    })
    .await;
    assert!(caught_up.is_ok(), "no revision 4 pushed: {seen:?}");
    assert_eq!(w.revision(), 4);
    seen.dedup();
    assert_eq!(seen, [1, 2, 3, 4], "every revision, in order, once");
}

#[tokio::test]
async fn the_watcher_fails_over_to_the_next_registry_url() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    let both = format!("http://127.0.0.1:9,{}", reg.url);
    let w = Watcher::start(cfg(&both, "api", "v1")).expect("watcher");
    eventually(
        Duration::from_secs(5),
        "learns it is stale through the second URL",
        || !w.is_current(),
    )
    .await;
}

#[tokio::test]
async fn changed_resolves_when_the_release_moves_away() {
    let reg = InProcessRegistry::start().await;
    let worker_token = reg.token("w", Role::Worker).await;
    reg.admin()
        .put_release("production", "jobs", &release("v1"))
        .await
        .expect("v1");
    let mut c = cfg(&reg.url, "jobs", "v1");
    c.token = Some(worker_token);
    let w = Watcher::start(c).expect("watcher");
    eventually(Duration::from_secs(5), "current", || {
        w.status() == Status::Current
    })
    .await;
    let waiter = tokio::spawn({
        let w = w.clone();
        async move { w.changed().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "nothing changed yet");
    reg.admin()
        .put_release("production", "jobs", &release("v2"))
        .await
        .expect("v2");
    tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("changed() resolves")
        .expect("task");
}

#[tokio::test]
async fn a_registry_that_vanishes_mid_answer_counts_as_unreachable() {
    // Promises 1,000 bytes, sends 10, hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 2048];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"environm")
                .await;
        }
    });
    let client =
        lockstep_client::RegistryClient::new(&url, Some(ADMIN_TOKEN.into())).expect("client");
    let err = client
        .status(None, None)
        .await
        .expect_err("a cut answer is an error");
    assert!(
        matches!(err, lockstep_client::ClientError::Unreachable { .. }),
        "{err}"
    );
}
