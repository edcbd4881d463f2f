//! What the registry must hold up to from clients it did not write: revoked tokens with open
//! streams, an admin locking everyone out, connections that never finish their headers,
//! requests without `Host`, and the small inconsistencies a third-party tool finds.

use futures_util::StreamExt;
use lockstep_api::PutRelease;
use lockstep_core::{Release, Role};
use lockstep_server::Config;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

/// Reads a stream until it ends, returning how long that took (or `None` after `within`).
async fn ends_within(
    stream: &mut (impl futures_util::Stream<Item = lockstep_client::sse::SseEvent> + Unpin),
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(within, async { while stream.next().await.is_some() {} })
        .await
        .ok()
        .map(|()| start.elapsed())
}

#[tokio::test]
async fn watch_and_event_streams_end_within_a_second_of_their_token_being_revoked() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let worker = reg.client(&reg.token("edge", Role::Worker).await);
    let viewer = reg.client(&reg.token("dash", Role::Viewer).await);
    let mut watch = Box::pin(
        worker
            .watch(Some("production"), Some("api"), None)
            .await
            .expect("watch"),
    );
    let mut events = Box::pin(viewer.event_stream(None).await.expect("events"));
    // Both are live: the current release arrives on the watch.
    assert!(watch.next().await.is_some());

    admin.revoke_token("edge").await.expect("revoke edge");
    let took = ends_within(&mut watch, Duration::from_secs(1))
        .await
        .expect("the watch stream ends within 1 s of the revocation");
    println!("watch ended after {took:?}");

    admin.revoke_token("dash").await.expect("revoke dash");
    // The event stream may deliver events logged before the revocation took effect, but
    // never outlives it.
    let took = ends_within(&mut events, Duration::from_secs(1))
        .await
        .expect("the event stream ends within 1 s of the revocation");
    println!("event stream ended after {took:?}");

    // A stream of another, still valid token is unaffected.
    let mut admin_watch = Box::pin(admin.watch(None, None, None).await.expect("watch"));
    assert!(admin_watch.next().await.is_some());
    reg.token("other", Role::Viewer).await;
    admin.revoke_token("other").await.expect("revoke other");
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), admin_watch.next())
            .await
            .expect("still streaming")
            .expect("open");
        if !ev.event.is_empty() {
            break ev;
        }
    };
    assert!(ev.data.contains("\"v2\""));
}

#[tokio::test]
async fn revoking_the_last_admin_token_is_refused() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    let err = admin
        .revoke_token("admin")
        .await
        .expect_err("the last admin cannot be revoked");
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("last admin"), "{err}");
    // Still works.
    admin.list_tokens().await.expect("admin still valid");
    // With a second admin, the first can go.
    let ops = reg.client(&reg.token("ops", Role::Admin).await);
    ops.revoke_token("admin")
        .await
        .expect("revoke with another admin");
    assert_eq!(
        admin.list_tokens().await.expect_err("revoked").status(),
        Some(401)
    );
    assert_eq!(
        ops.revoke_token("ops")
            .await
            .expect_err("ops is the last")
            .status(),
        Some(409)
    );
}

/// Opens a raw connection and sends `bytes`.
async fn raw(url: &str, bytes: &[u8]) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s
}

/// Whether the server closed the connection (EOF) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stuck_mid_headers_are_closed_while_idle_watch_streams_stay_open() {
    let config = Config {
        header_read_timeout: Duration::from_secs(3),
        keepalive: Duration::from_secs(1),
        ..Config::default()
    };
    let reg = InProcessRegistry::start_with(config).await;
    reg.admin()
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let host = reg.url.trim_start_matches("http://").to_string();
    let mut watchers = Vec::new();
    for _ in 0..1000 {
        let req = format!(
            "GET /v1/watch?service=api HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        );
        let mut s = raw(&reg.url, req.as_bytes()).await;
        let mut buf = [0u8; 2048];
        let n = s.read(&mut buf).await.expect("watch answer");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "the watch is accepted"
        );
        watchers.push(s);
    }
    let mut stuck = Vec::new();
    for _ in 0..300 {
        stuck.push(
            raw(
                &reg.url,
                format!("GET /v1/status HTTP/1.1\r\nHost: {host}\r\n").as_bytes(),
            )
            .await,
        );
    }
    let start = Instant::now();
    for s in &mut stuck {
        let left = Duration::from_secs(30).saturating_sub(start.elapsed());
        assert!(
            closed_within(s, left).await,
            "a connection stuck mid-headers is closed within 30 s"
        );
    }
    println!("300 stuck connections closed after {:?}", start.elapsed());
    // The watch streams outlived the header timeout: each still gets the next release.
    reg.admin()
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    let mut open = 0;
    for s in &mut watchers {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&got).contains("\"v2\"") && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        if String::from_utf8_lossy(&got).contains("\"v2\"") {
            open += 1;
        }
    }
    assert_eq!(open, 1000, "every idle watch stream stayed open");
}

#[tokio::test]
async fn a_request_without_host_is_a_400() {
    let reg = InProcessRegistry::start().await;
    let mut s = raw(&reg.url, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("answer");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("Host"), "{text}");
    // HTTP/1.0 has no Host requirement.
    let mut s = raw(&reg.url, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    let n = s.read(&mut buf).await.expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.0 200"));
}

#[tokio::test]
async fn an_instance_without_an_expected_release_counts_as_unknown_in_status_and_metrics() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    let hb: lockstep_api::Heartbeat = serde_json::from_value(serde_json::json!({
        "instance_id": "orphan-1", "service": "nothing-registered", "version_id": "v1"
    }))
    .expect("hb");
    admin.heartbeat(&hb).await.expect("heartbeat");
    let r = admin
        .status(None, Some("nothing-registered"))
        .await
        .expect("status");
    let c = r.environments[0].services[0].counts;
    assert_eq!((c.unknown, c.stale), (1, 0), "unknown, not stale: {c:?}");
    let metrics = reqwest::get(format!("{}/metrics", reg.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains(
        "lockstep_instances{env=\"production\",service=\"nothing-registered\",status=\"unknown\"} 1"
    ));
    assert!(metrics.contains(
        "lockstep_instances{env=\"production\",service=\"nothing-registered\",status=\"stale\"} 0"
    ));
    assert!(metrics.contains("lockstep_instances_total{status=\"unknown\"} 1"));
}

#[tokio::test]
async fn missing_instance_events_carry_last_seen_as_rfc3339() {
    let config = Config {
        instance_ttl: Duration::from_secs(1),
        lease_renew: Duration::from_millis(200),
        ..Config::default()
    };
    let reg = InProcessRegistry::start_with(config).await;
    let admin = reg.admin();
    let hb: lockstep_api::Heartbeat = serde_json::from_value(serde_json::json!({
        "instance_id": "quiet-1", "service": "api", "version_id": "v1"
    }))
    .expect("hb");
    admin.heartbeat(&hb).await.expect("heartbeat");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let evs = admin.events(0, 100).await.expect("events").events;
        if let Some(e) = evs.into_iter().find(|e| e.kind == "instance_missing") {
            break e;
        }
        assert!(Instant::now() < deadline, "no instance_missing event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last_seen = ev.data["last_seen"].as_str().expect("a string");
    time::OffsetDateTime::parse(last_seen, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339, like every other time in the API");
}
