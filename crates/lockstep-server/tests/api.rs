//! The registry's HTTP API over real sockets: an in-process registry on 127.0.0.1:0 with a
//! temporary SQLite store, driven with plain HTTP (to see statuses and headers) and with
//! the client library.

use futures_util::StreamExt;
use lockstep_api::{PutRelease, RollbackRequest};
use lockstep_client::ClientError;
use lockstep_core::{Release, Role, Status};
use lockstep_server::Config;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn put(
    reg: &InProcessRegistry,
    token: Option<&str>,
    svc: &str,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = http()
        .put(format!(
            "{}/v1/envs/production/services/{svc}/release",
            reg.url
        ))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

#[tokio::test]
async fn registration_needs_a_deployer_token() {
    let reg = InProcessRegistry::start().await;
    let resp = http()
        .put(format!(
            "{}/v1/envs/production/services/api/release",
            reg.url
        ))
        .json(&json!({"version_id": "v1"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let www = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(www.starts_with("Bearer"), "WWW-Authenticate: {www:?}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "unauthorized");

    let (status, _) = put(
        &reg,
        Some("lst_not_a_real_token"),
        "api",
        json!({"version_id": "v1"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let worker = reg.token("edge", Role::Worker).await;
    let (status, body) = put(&reg, Some(&worker), "api", json!({"version_id": "v1"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "forbidden");
    let viewer = reg.token("dash", Role::Viewer).await;
    assert_eq!(
        put(&reg, Some(&viewer), "api", json!({"version_id": "v1"}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    let deployer = reg.token("ci", Role::Deployer).await;
    let (status, body) = put(&reg, Some(&deployer), "api", json!({"version_id": "v1"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["actor"], "ci", "the actor is the token's name");
    assert_eq!(body["revision"], 1);
    assert!(
        reg.admin()
            .release("production", "api")
            .await
            .expect("read")
            .is_some()
    );
}

#[tokio::test]
async fn worker_role_can_read_and_heartbeat_but_not_register_or_read_status() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "api", &release("v1"))
        .await
        .expect("register");
    let worker = reg.client(&reg.token("edge", Role::Worker).await);
    let got = worker
        .release("production", "api")
        .await
        .expect("read")
        .expect("release");
    assert_eq!(got.release.version_id, "v1");
    let hb = heartbeat("w-1", "api", "v1");
    assert_eq!(
        worker.heartbeat(&hb).await.expect("heartbeat").status,
        Status::Current
    );
    let err = worker
        .put_release("production", "api", &release("v2"))
        .await
        .expect_err("must refuse");
    assert_eq!(err.status(), Some(403));
    let err = worker
        .status(None, None)
        .await
        .expect_err("status needs viewer");
    assert_eq!(err.status(), Some(403));
    let err = worker
        .rollback("production", "api", &RollbackRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.status(), Some(403));
    let err = worker
        .create_token("x", Role::Admin)
        .await
        .expect_err("refused");
    assert_eq!(err.status(), Some(403));
}

#[tokio::test]
async fn bad_input_gets_clear_400_and_413_errors() {
    let reg = InProcessRegistry::start().await;
    let t = Some(ADMIN_TOKEN);
    // Bad names.
    for svc in ["Bad", "-x", "a%20b", &"a".repeat(65)] {
        let (status, body) = put(&reg, t, svc, json!({"version_id": "v1"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{svc}: {body}");
        assert_eq!(body["error"], "bad_request");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("service name"),
            "{body}"
        );
    }
    // Missing version_id.
    let (status, body) = put(&reg, t, "api", json!({"version": "v1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("version_id"),
        "{body}"
    );
    // Empty version_id.
    assert_eq!(
        put(&reg, t, "api", json!({"version_id": ""})).await.0,
        StatusCode::BAD_REQUEST
    );
    // Malformed JSON.
    let resp = http()
        .put(format!(
            "{}/v1/envs/production/services/api/release",
            reg.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"version_id\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("malformed JSON"),
        "{body}"
    );
    // Oversized body.
    let big = json!({"version_id": "v1", "metadata": {"blob": "x".repeat(70 * 1024)}});
    let (status, body) = put(&reg, t, "api", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "payload_too_large");
    // Nothing was written by any of these.
    assert!(
        reg.admin()
            .release("production", "api")
            .await
            .expect("read")
            .is_none()
    );
    // Unknown endpoints answer JSON too.
    let resp = http()
        .get(format!("{}/v2/nothing", reg.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "not_found"
    );
    // Axum's own rejections come back in the same JSON shape.
    let resp = http()
        .post(format!("{}/v1/status", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(resp.headers().contains_key("allow"));
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "method_not_allowed"
    );
    let resp = http()
        .get(format!("{}/v1/events?since=yesterday", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"].as_str().unwrap_or("").contains("since"),
        "{body}"
    );
    // A heartbeat with a bad instance id.
    let resp = http()
        .post(format!("{}/v1/instances", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"instance_id": "a b", "service": "api", "version_id": "v1"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn nothing_registered_is_a_404_no_release() {
    let reg = InProcessRegistry::start().await;
    let resp = http()
        .get(format!(
            "{}/v1/envs/production/services/api/release",
            reg.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "no_release"
    );
}

#[tokio::test]
async fn reregistering_overwrites_and_the_same_id_is_idempotent() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    let a = admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let again = admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1 again");
    assert_eq!(a.revision, again.revision, "same id, same revision");
    let b = admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    assert!(b.revision > a.revision);
    assert_eq!(
        admin
            .release("production", "api")
            .await
            .expect("read")
            .expect("r")
            .release
            .version_id,
        "v2"
    );
    let hist = admin
        .history("production", "api", 10)
        .await
        .expect("history");
    let ids: Vec<_> = hist
        .releases
        .iter()
        .map(|r| r.release.version_id.as_str())
        .collect();
    assert_eq!(ids, ["v2", "v1"]);
}

#[tokio::test]
async fn services_and_environments_are_independent() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "auth", &release("a1"))
        .await
        .expect("auth");
    admin
        .put_release("production", "token", &release("t1"))
        .await
        .expect("token");
    admin
        .put_release("staging", "auth", &release("s1"))
        .await
        .expect("staging auth");
    admin
        .put_release("production", "auth", &release("a2"))
        .await
        .expect("auth v2");
    let get = |env: &'static str, svc: &'static str| {
        let admin = &admin;
        async move {
            admin
                .release(env, svc)
                .await
                .expect("read")
                .map(|r| r.release.version_id)
        }
    };
    assert_eq!(get("production", "auth").await.as_deref(), Some("a2"));
    assert_eq!(get("production", "token").await.as_deref(), Some("t1"));
    assert_eq!(get("staging", "auth").await.as_deref(), Some("s1"));
    assert_eq!(get("staging", "token").await, None);
}

#[tokio::test]
async fn a_downgrade_is_refused_unless_forced_or_a_rollback() {
    let reg = InProcessRegistry::start().await;
    let t = Some(ADMIN_TOKEN);
    let (s, _) = put(
        &reg,
        t,
        "api",
        json!({"version_id": "old", "build_date": "2026-11-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = put(
        &reg,
        t,
        "api",
        json!({"version_id": "new", "build_date": "2026-11-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = put(
        &reg,
        t,
        "api",
        json!({"version_id": "old", "build_date": "2026-11-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(body["error"], "downgrade");
    // A rollback is allowed to go back.
    let back = reg
        .admin()
        .rollback("production", "api", &RollbackRequest::default())
        .await
        .expect("rollback");
    assert_eq!(back.release.version_id, "old");
    assert_eq!(back.kind, lockstep_core::RegistrationKind::Rollback);
    // Forcing is allowed too.
    put(
        &reg,
        t,
        "api",
        json!({"version_id": "new", "build_date": "2026-11-02T00:00:00Z"}),
    )
    .await;
    let (s, body) = put(
        &reg,
        t,
        "api",
        json!({"version_id": "older", "build_date": "2026-10-01T00:00:00Z", "force": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Every registration and rollback is in the event log with its actor.
    let events = reg.admin().events(0, 100).await.expect("events").events;
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "release_registered").count(),
        4
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "release_rolled_back")
            .count(),
        1
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind.starts_with("release_"))
            .all(|e| e.actor.as_deref() == Some("admin"))
    );
}

#[tokio::test]
async fn rollback_without_history_or_to_an_unknown_id_is_refused_clearly() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    let err = admin
        .rollback("production", "api", &RollbackRequest::default())
        .await
        .expect_err("nothing");
    assert!(
        matches!(&err, ClientError::Api { status: 404, body } if body.error == "no_release"),
        "{err}"
    );
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let err = admin
        .rollback("production", "api", &RollbackRequest::default())
        .await
        .expect_err("no previous");
    assert!(
        matches!(&err, ClientError::Api { status: 409, body } if body.error == "no_previous_release"),
        "{err}"
    );
    let to = RollbackRequest {
        version_id: Some("nope".into()),
        ..RollbackRequest::default()
    };
    assert_eq!(
        admin
            .rollback("production", "api", &to)
            .await
            .expect_err("unknown")
            .status(),
        Some(404)
    );
}

fn heartbeat(id: &str, svc: &str, version: &str) -> lockstep_api::Heartbeat {
    serde_json::from_value(json!({"instance_id": id, "service": svc, "version_id": version}))
        .expect("heartbeat")
}

#[tokio::test]
async fn heartbeat_answers_status_and_expected_release() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    let a = admin
        .heartbeat(&heartbeat("i-1", "api", "v1"))
        .await
        .expect("hb");
    assert_eq!((a.status, a.expected.is_none()), (Status::Unknown, true));
    assert_eq!((a.heartbeat_secs, a.ttl_secs), (10, 30));
    let mut v2 = release("v2");
    v2.release.accepts = vec!["v1".into()];
    admin
        .put_release("production", "api", &v2)
        .await
        .expect("v2");
    let a = admin
        .heartbeat(&heartbeat("i-1", "api", "v1"))
        .await
        .expect("hb");
    assert_eq!(a.status, Status::Draining);
    assert_eq!(
        a.expected.map(|e| e.release.version_id).as_deref(),
        Some("v2")
    );
    assert_eq!(
        admin
            .heartbeat(&heartbeat("i-2", "api", "v2"))
            .await
            .expect("hb")
            .status,
        Status::Current
    );
    assert_eq!(
        admin
            .heartbeat(&heartbeat("i-3", "api", "v0"))
            .await
            .expect("hb")
            .status,
        Status::Stale
    );
    let report = admin.status(None, Some("api")).await.expect("status");
    let svc = &report.environments[0].services[0];
    assert_eq!(
        (
            svc.counts.current,
            svc.counts.draining,
            svc.counts.stale,
            svc.counts.missing
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(svc.instances.len(), 3);
    admin.deregister("i-3").await.expect("deregister");
    assert_eq!(
        admin.deregister("i-3").await.expect_err("gone").status(),
        Some(404)
    );
    let report = admin.status(None, Some("api")).await.expect("status");
    assert_eq!(report.environments[0].services[0].instances.len(), 2);
}

#[tokio::test]
async fn an_instance_that_stops_heartbeating_becomes_missing_after_its_ttl() {
    let config = Config {
        instance_ttl: Duration::from_secs(1),
        ..Config::default()
    };
    let reg = InProcessRegistry::start_with(config).await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    admin
        .heartbeat(&heartbeat("quiet", "api", "v1"))
        .await
        .expect("hb");
    admin
        .heartbeat(&heartbeat("chatty", "api", "v1"))
        .await
        .expect("hb");
    let status_of = |report: &lockstep_api::StatusReport, id: &str| {
        report.environments[0].services[0]
            .instances
            .iter()
            .find(|i| i.instance.instance_id == id)
            .map(|i| (i.status, i.drift_secs))
    };
    let r = admin.status(None, None).await.expect("status");
    assert_eq!(status_of(&r, "quiet").map(|s| s.0), Some(Status::Current));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin
            .heartbeat(&heartbeat("chatty", "api", "v1"))
            .await
            .expect("hb");
    }
    let r = admin.status(None, None).await.expect("status");
    assert_eq!(status_of(&r, "quiet").map(|s| s.0), Some(Status::Missing));
    assert!(
        status_of(&r, "quiet").is_some_and(|s| s.1 >= 1),
        "drift counts since the TTL ran out"
    );
    assert_eq!(status_of(&r, "chatty").map(|s| s.0), Some(Status::Current));
    assert_eq!(r.environments[0].services[0].counts.missing, 1);
    let events = admin.events(0, 100).await.expect("events").events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "instance_missing" && e.data["instance_id"] == "quiet"),
        "going missing is logged once"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "instance_missing")
            .count(),
        1
    );
    // A heartbeat brings it back.
    admin
        .heartbeat(&heartbeat("quiet", "api", "v1"))
        .await
        .expect("hb");
    let r = admin.status(None, None).await.expect("status");
    assert_eq!(status_of(&r, "quiet").map(|s| s.0), Some(Status::Current));
}

async fn next_release(
    stream: &mut (impl futures_util::Stream<Item = lockstep_client::sse::SseEvent> + Unpin),
) -> (i64, String) {
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open");
        // Empty events mark chunks that completed nothing (keep-alives, partial events).
        if !ev.event.is_empty() {
            break ev;
        }
    };
    assert_eq!(ev.event, "release");
    let id: i64 = ev
        .id
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("numeric id");
    let body: Value = serde_json::from_str(&ev.data).expect("json data");
    assert_eq!(body["revision"], id, "the SSE id is the revision");
    (id, body["version_id"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn watch_sends_the_current_release_then_every_change() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    admin
        .put_release("production", "other", &release("o1"))
        .await
        .expect("o1");
    let worker = reg.client(&reg.token("w", Role::Worker).await);
    let mut s = Box::pin(
        worker
            .watch(Some("production"), Some("api"), None)
            .await
            .expect("watch"),
    );
    assert_eq!(next_release(&mut s).await.1, "v1");
    admin
        .put_release("production", "other", &release("o2"))
        .await
        .expect("o2");
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    assert_eq!(
        next_release(&mut s).await.1,
        "v2",
        "other services are filtered out"
    );
}

#[tokio::test]
async fn a_watcher_that_reconnects_with_its_last_revision_gets_every_missed_change_once() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let mut s = Box::pin(admin.watch(None, Some("api"), None).await.expect("watch"));
    let (last, _) = next_release(&mut s).await;
    drop(s);
    for v in ["v2", "v3", "v4"] {
        admin
            .put_release("production", "api", &release(v))
            .await
            .expect("register");
        admin
            .put_release("production", "noise", &release(v))
            .await
            .expect("noise");
    }
    let mut s = Box::pin(
        admin
            .watch(None, Some("api"), Some(last))
            .await
            .expect("resume"),
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_release(&mut s).await);
    }
    let ids: Vec<_> = got.iter().map(|g| g.1.as_str()).collect();
    assert_eq!(ids, ["v2", "v3", "v4"]);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    admin
        .put_release("production", "api", &release("v5"))
        .await
        .expect("v5");
    assert_eq!(
        next_release(&mut s).await.1,
        "v5",
        "then live, with no duplicate"
    );
    // Last-Event-ID works like `since`.
    let resp = http()
        .get(format!("{}/v1/watch?service=api", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("Last-Event-ID", got[1].0.to_string())
        .send()
        .await
        .expect("send");
    let mut s = Box::pin(lockstep_client::sse::events(resp.bytes_stream()));
    assert_eq!(next_release(&mut s).await.1, "v4");
    assert_eq!(next_release(&mut s).await.1, "v5");
}

#[tokio::test]
async fn the_event_stream_resumes_and_goes_live() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let mut s = Box::pin(admin.event_stream(Some(0)).await.expect("stream"));
    let bootstrap = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(
        bootstrap.event, "token_bootstrapped",
        "installing the bootstrap admin token is logged"
    );
    assert!(
        !bootstrap.data.contains("lst_"),
        "no secret in the event log"
    );
    let first = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(first.event, "release_registered");
    reg.token("ci", Role::Deployer).await;
    let next = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(next.event, "token_created");
    assert!(!next.data.contains("lst_"), "no secret in the event log");
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_and_revoked_at_once() {
    let reg = InProcessRegistry::start().await;
    let secret = reg.token("ci", Role::Deployer).await;
    let list = reg.admin().list_tokens().await.expect("list");
    let names: Vec<_> = list.tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["admin", "ci"]);
    let raw = http()
        .get(format!("{}/v1/tokens", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert!(!raw.text().await.expect("text").contains(&secret));
    assert_eq!(
        reg.admin()
            .create_token("ci", Role::Viewer)
            .await
            .expect_err("dup")
            .status(),
        Some(409)
    );
    let ci = reg.client(&secret);
    ci.put_release("production", "api", &release("v1"))
        .await
        .expect("works before revoke");
    reg.admin().revoke_token("ci").await.expect("revoke");
    let err = ci
        .put_release("production", "api", &release("v2"))
        .await
        .expect_err("revoked");
    assert_eq!(err.status(), Some(401));
    assert_eq!(
        reg.admin()
            .revoke_token("ci")
            .await
            .expect_err("gone")
            .status(),
        Some(404)
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi_need_no_token() {
    let reg = InProcessRegistry::start().await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let resp = http()
            .get(format!("{}{path}", reg.url))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let doc: Value = http()
        .get(format!("{}/openapi.json", reg.url))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    for path in [
        "/v1/envs/{env}/services/{svc}/release",
        "/v1/envs/{env}/services/{svc}/releases",
        "/v1/envs/{env}/services/{svc}/rollback",
        "/v1/watch",
        "/v1/instances",
        "/v1/instances/{id}",
        "/v1/status",
        "/v1/events",
        "/v1/events/stream",
        "/v1/tokens",
        "/healthz",
        "/readyz",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(doc["paths"]["/v1/envs/{env}/services/{svc}/release"]["put"].is_object());
    assert!(doc["components"]["schemas"]["StoredRelease"].is_object());
}

async fn openapi(reg: &InProcessRegistry) -> Value {
    http()
        .get(format!("{}/openapi.json", reg.url))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn the_openapi_description_declares_query_parameters_in_the_query_and_describes_every_response()
 {
    let reg = InProcessRegistry::start().await;
    let doc = openapi(&reg).await;
    let name_pattern = "^[a-z0-9][a-z0-9._-]{0,63}$";
    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
    };
    for (path, name) in [
        ("/v1/events", "since"),
        ("/v1/events", "limit"),
        ("/v1/events/stream", "since"),
        ("/v1/envs/{env}/services/{svc}/releases", "limit"),
        ("/v1/status", "env"),
        ("/v1/status", "service"),
        ("/v1/watch", "env"),
        ("/v1/watch", "service"),
        ("/v1/watch", "since"),
    ] {
        let p = param(path, "get", name);
        assert_eq!(p["in"], "query", "{path} {name}: {p}");
        assert_ne!(p["required"], true, "{path} {name}: {p}");
    }
    for path in ["/v1/events", "/v1/envs/{env}/services/{svc}/releases"] {
        let limit = param(path, "get", "limit");
        assert_eq!(limit["schema"]["minimum"], 1, "{path}: {limit}");
        assert_eq!(limit["schema"]["maximum"], 1000, "{path}: {limit}");
    }
    for name in ["env", "svc"] {
        let p = param("/v1/envs/{env}/services/{svc}/release", "put", name);
        assert_eq!(p["in"], "path");
        assert_eq!(p["schema"]["pattern"], name_pattern, "{p}");
    }
    let rollback = &doc["paths"]["/v1/envs/{env}/services/{svc}/rollback"]["post"];
    assert_ne!(rollback["requestBody"]["required"], true, "{rollback}");
    let release = &doc["components"]["schemas"]["Release"]["properties"];
    assert_eq!(release["version_id"]["minLength"], 1, "{release}");
    assert_eq!(release["build_date"]["format"], "date-time", "{release}");

    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            operations += 1;
            let responses = op["responses"].as_object().expect("responses");
            for (status, response) in responses {
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status} has no description"
                );
            }
            let has = |status: &str| responses.contains_key(status);
            if op.get("security").is_some() {
                assert!(has("401"), "{method} {path} lacks 401");
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    assert!(has(status), "{method} {path} lacks {status}");
                }
            }
            let params = op["parameters"].as_array().map_or(&[][..], |v| &v[..]);
            if !params.is_empty() {
                assert!(has("400"), "{method} {path} validates input but lacks 400");
            }
        }
    }
    // At least the operations this file knows of (GET /v1/services and the instance
    // stream included); new endpoints add to it.
    assert!(operations >= 18, "only {operations} operations described");
}

#[tokio::test]
async fn limit_out_of_range_is_a_400() {
    let reg = InProcessRegistry::start().await;
    for v in ["v1", "v2", "v3"] {
        let (status, body) = put(&reg, Some(ADMIN_TOKEN), "api", json!({"version_id": v})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let base = reg.url.clone();
    let get = |path: String| {
        let req = http().get(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN);
        async move {
            let resp = req.send().await.expect("send");
            let status = resp.status();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let history = "/v1/envs/production/services/api/releases";
    for path in [history, "/v1/events"] {
        for limit in ["0", "1001", "4294967295"] {
            let (status, body) = get(format!("{path}?limit={limit}")).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{path} limit={limit}: {body}"
            );
            assert_eq!(body["error"], "bad_request");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("between 1 and 1000"),
                "{body}"
            );
        }
        for limit in ["-1", "two"] {
            let (status, _) = get(format!("{path}?limit={limit}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} limit={limit}");
        }
    }
    let (status, body) = get(format!("{history}?limit=1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["releases"].as_array().map(Vec::len), Some(1), "{body}");
    let (status, body) = get(format!("{history}?limit=1000")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["releases"].as_array().map(Vec::len), Some(3), "{body}");
    let (status, body) = get("/v1/events?limit=2".into()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["events"].as_array().map(Vec::len), Some(2), "{body}");
}

#[tokio::test]
async fn what_the_openapi_description_allows_is_accepted_and_what_it_forbids_is_a_400() {
    let reg = InProcessRegistry::start().await;
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http()
            .request(method, format!("{}{path}", reg.url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.expect("send").status() }
    };
    use reqwest::Method;
    // Filters and token names follow the name pattern.
    assert_eq!(send(Method::GET, "/v1/status?env=Prod", None).await, 400);
    assert_eq!(send(Method::GET, "/v1/status?service=", None).await, 400);
    assert_eq!(send(Method::GET, "/v1/status?env=prod", None).await, 200);
    assert_eq!(
        send(Method::DELETE, "/v1/tokens/No%20Such", None).await,
        400
    );
    assert_eq!(send(Method::DELETE, "/v1/tokens/no-such", None).await, 404);
    // Version and instance ids are limited in characters, not bytes.
    let long = "é".repeat(128);
    let hb = |instance: &str, version: &str| json!({"instance_id": instance, "service": "api", "version_id": version, "pid": 42.0});
    assert_eq!(
        send(Method::POST, "/v1/instances", Some(hb(&long, &long))).await,
        200
    );
    let longer = "é".repeat(129);
    assert_eq!(
        send(Method::POST, "/v1/instances", Some(hb(&longer, "v1"))).await,
        400
    );
    assert_eq!(
        send(Method::POST, "/v1/instances", Some(hb("i", &longer))).await,
        400
    );
    // A process id is a JSON integer, whichever way it is written; a fraction is not.
    let mut fraction = hb("i", "v1");
    fraction["pid"] = json!(42.5);
    assert_eq!(
        send(Method::POST, "/v1/instances", Some(fraction)).await,
        400
    );
    // The rollback body is optional: none, `{}` and `null` all mean "the previous release".
    for v in ["v1", "v2", "v3"] {
        let (status, _) = put(&reg, Some(ADMIN_TOKEN), "api", json!({"version_id": v})).await;
        assert_eq!(status, StatusCode::OK);
    }
    let rollback = "/v1/envs/production/services/api/rollback";
    assert_eq!(send(Method::POST, rollback, None).await, 200);
    assert_eq!(send(Method::POST, rollback, Some(Value::Null)).await, 200);
}

#[tokio::test]
async fn state_survives_a_graceful_restart_including_unflushed_heartbeats() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    let secret = reg.token("ci", Role::Deployer).await;
    admin
        .heartbeat(&heartbeat("i-1", "api", "v1"))
        .await
        .expect("hb");
    let dir = reg.stop().await;
    let reg = InProcessRegistry::start_in(dir, Config::default()).await;
    let ci = reg.client(&secret);
    assert_eq!(
        ci.release("production", "api")
            .await
            .expect("read")
            .expect("kept")
            .release
            .version_id,
        "v1"
    );
    let r = reg.admin().status(None, None).await.expect("status");
    assert_eq!(
        r.environments[0].services[0].instances[0]
            .instance
            .instance_id,
        "i-1"
    );
}

#[tokio::test]
async fn any_token_may_list_the_registered_services_by_name() {
    let reg = InProcessRegistry::start().await;
    for (env, svc) in [
        ("production", "extractor"),
        ("production", "api"),
        ("staging", "beta"),
    ] {
        reg.admin()
            .put_release(env, svc, &release("v1"))
            .await
            .expect("register");
    }
    let worker = reg.token("w", Role::Worker).await;
    let index = reg
        .client(&worker)
        .services()
        .await
        .expect("a worker may list");
    assert_eq!(index.services_in("production"), ["api", "extractor"]);
    assert_eq!(index.services_in("staging"), ["beta"]);
    assert!(index.services_in("nowhere").is_empty());
    let err = reg.client("lst_nope").services().await.expect_err("401");
    assert_eq!(err.status(), Some(401));
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_a_400_even_where_every_field_is_optional() {
    let reg = InProcessRegistry::start().await;
    let admin = reg.admin();
    admin
        .put_release("production", "api", &release("v1"))
        .await
        .expect("v1");
    admin
        .put_release("production", "api", &release("v2"))
        .await
        .expect("v2");
    for body in ["[]", "[1]", "\"x\"", "7"] {
        let resp = http()
            .post(format!(
                "{}/v1/envs/production/services/api/rollback",
                reg.url
            ))
            .bearer_auth(lockstep_testkit::ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    let still = admin.release("production", "api").await.expect("release");
    assert_eq!(
        still.map(|s| s.release.version_id).as_deref(),
        Some("v2"),
        "nothing was rolled back"
    );
}
