//! `serve --compat authrim`: the source system's VersionManager routes on a real `serve`,
//! driven as its deploy script and middleware drive them, and what they register seen
//! through lockstep itself (`lockstep status`, a Rust `Watcher`, history).

use lockstep_client::{Watcher, WatcherConfig};
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");
const OLD: &str = "6f1c2a9e-0d3b-4c7a-9e15-3b8d2f4a7c10";
const NEW: &str = "0b7a1e4c-3f6d-4e55-9d1a-2c9b0e8f7a61";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: Value,
}

/// One request as the deploy script's curl makes it: JSON body, bearer token, nothing else.
fn call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    rt().block_on(async {
        let client = reqwest::Client::new();
        let mut req = client.request(method.parse().expect("method"), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let www_authenticate = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.expect("body");
        Answer {
            status,
            www_authenticate,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    })
}

fn token(url: &str, name: &str, role: &str) -> String {
    let o = Command::new(BIN)
        .args([
            "token", "create", "--name", name, "--role", role, "-o", "json",
        ])
        .env("LOCKSTEP_REGISTRY", url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("token create");
    let v: Value = serde_json::from_slice(&o.stdout).expect("token json");
    v["token"].as_str().expect("token").to_string()
}

fn serve(dir: &Path, args: &[&str]) -> ServeProcess {
    ServeProcess::spawn(Path::new(BIN), dir, args, &[])
}

#[test]
fn a_bundle_posted_by_the_deploy_script_is_a_lockstep_release_and_turns_old_workers_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path(), &["--compat", "authrim"]);
    let deployer = token(&s.url, "deploy-script", "deployer");
    let worker = token(&s.url, "edge", "worker");
    let register = format!("{}/api/internal/version/op-auth", s.url);

    let first = format!(r#"{{"uuid":"{OLD}","deployTime":"2026-11-30T10:00:00.000Z"}}"#);
    let a = call("POST", &register, Some(&deployer), Some(&first));
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"success": true, "workerName": "op-auth", "uuid": OLD})
    );

    // A Rust worker of the first bundle watches op-auth.
    let rt = rt();
    let watcher = rt.block_on(async {
        let mut cfg = WatcherConfig::new(&s.url, "op-auth", OLD);
        cfg.token = Some(worker.clone());
        let w = Watcher::start(cfg).expect("watcher");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.is_current() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w
    });
    assert!(watcher.is_current(), "the first bundle is current");

    // The next deploy, through the plural route the script also uses.
    let second = format!(r#"{{"uuid":"{NEW}","deployTime":"2026-11-30T11:00:00.000Z"}}"#);
    let plural = format!("{}/api/internal/versions/op-auth", s.url);
    let a = call("POST", &plural, Some(&deployer), Some(&second));
    assert_eq!(a.status, 200, "{:?}", a.body);
    let stale = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while watcher.is_current() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !watcher.is_current()
    });
    assert!(
        stale,
        "the worker still running the first bundle turns stale"
    );

    // The same POST again (a retried deploy): 2xx, nothing changes.
    let revision_before = watcher.revision();
    let a = call("POST", &plural, Some(&deployer), Some(&second));
    assert_eq!(a.status, 200, "{:?}", a.body);

    // lockstep itself sees a normal release.
    let o = Command::new(BIN)
        .args(["status", "--service", "op-auth", "-o", "json"])
        .env("LOCKSTEP_REGISTRY", &s.url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("status");
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    let svc = &v["environments"][0]["services"][0];
    assert_eq!(v["environments"][0]["name"], "production");
    assert_eq!(svc["name"], "op-auth");
    assert_eq!(svc["expected"]["version_id"], NEW, "{v}");
    assert_eq!(
        svc["expected"]["deployed_at"], "2026-11-30T11:00:00Z",
        "{v}"
    );
    assert_eq!(
        svc["expected"]["revision"].as_i64(),
        Some(revision_before),
        "the repeated POST made no new revision"
    );
    let o = Command::new(BIN)
        .args(["history", "--service", "op-auth", "-o", "json"])
        .env("LOCKSTEP_REGISTRY", &s.url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("history");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(OLD) && text.contains(NEW), "{text}");

    // The status route, with the deploy script's one token.
    let a = call(
        "GET",
        &format!("{}/api/internal/version-manager/status", s.url),
        Some(&deployer),
        None,
    );
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["workerCount"], 1);
    let entry = &a.body["versions"]["op-auth"];
    assert_eq!(entry["uuid"], NEW);
    assert_eq!(entry["deployTime"], "2026-11-30T11:00:00.000Z");
    let registered = entry["registeredAt"]
        .as_i64()
        .expect("registeredAt is an integer");
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    assert!(
        (now_ms - 60_000..=now_ms + 1_000).contains(&registered),
        "registeredAt {registered} is epoch milliseconds (now {now_ms})"
    );
    assert!(a.body["timestamp"].is_string(), "{:?}", a.body);

    // The middleware's read, with a worker token.
    let a = call(
        "GET",
        &format!("{}/version/op-auth", s.url),
        Some(&worker),
        None,
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.body, *entry);
    let a = call(
        "GET",
        &format!("{}/version/nothing-here", s.url),
        Some(&worker),
        None,
    );
    assert_eq!(
        (a.status, a.body),
        (404, json!({"error": "Version not found"}))
    );
}

#[test]
fn compat_routes_answer_in_the_source_systems_error_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path(), &["--compat", "authrim", "--compat-env", "edge"]);
    let deployer = token(&s.url, "deploy-script", "deployer");
    let worker = token(&s.url, "edge", "worker");
    let register = format!("{}/api/internal/version/op-auth", s.url);
    let ok = format!(r#"{{"uuid":"{NEW}","deployTime":"2026-11-30T11:00:00Z"}}"#);

    for t in [None, Some("lst_not-a-token")] {
        let a = call("POST", &register, t, Some(&ok));
        assert_eq!(a.status, 401);
        assert_eq!(a.body, json!({"error": "Unauthorized"}));
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("Bearer realm=\"VersionManager\"")
        );
    }
    let a = call("GET", &format!("{}/version/op-auth", s.url), None, None);
    assert_eq!((a.status, a.body), (401, json!({"error": "Unauthorized"})));
    // A worker token reads, but does not register.
    let a = call("POST", &register, Some(&worker), Some(&ok));
    assert_eq!(a.status, 403, "{:?}", a.body);

    for bad in [
        r#"{"deployTime":"2026-11-30T11:00:00Z"}"#.to_string(),
        format!(r#"{{"uuid":"{NEW}"}}"#),
        format!(r#"{{"uuid":"{NEW}","deployTime":""}}"#),
        format!(r#"{{"uuid":"{NEW}","deployTime":"yesterday"}}"#),
        r#"{"uuid":"has space","deployTime":"2026-11-30T11:00:00Z"}"#.to_string(),
        "not json".to_string(),
    ] {
        let a = call("POST", &register, Some(&deployer), Some(&bad));
        assert_eq!(
            (a.status, a.body),
            (400, json!({"error": "Bad Request"})),
            "{bad}"
        );
    }

    // --compat-env: the registration lands in that environment.
    let a = call("POST", &register, Some(&deployer), Some(&ok));
    assert_eq!(a.status, 200, "{:?}", a.body);
    let got = rt()
        .block_on(s.client(ADMIN_TOKEN).release("edge", "op-auth"))
        .expect("release");
    assert_eq!(got.map(|r| r.release.version_id).as_deref(), Some(NEW));
}

#[test]
fn a_registration_over_a_newer_release_overwrites_it_and_is_never_a_409() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path(), &["--compat", "authrim"]);
    let deployer = token(&s.url, "deploy-script", "deployer");
    // Expected now: a release built later than anything the deploy script will send.
    let mut release = lockstep_core::Release::new(NEW);
    release.version = Some("9.0.0".into());
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "op-auth",
        &lockstep_api::PutRelease {
            release,
            force: false,
        },
    ))
    .expect("register 9.0.0");
    // Plain lockstep refuses an older version as a downgrade…
    let mut older = lockstep_core::Release::new(OLD);
    older.version = Some("1.0.0".into());
    let refused = rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "op-auth",
        &lockstep_api::PutRelease {
            release: older,
            force: false,
        },
    ));
    assert!(refused.is_err(), "lockstep itself refuses the downgrade");

    // …the compat route overwrites, as the source system did.
    let body = format!(r#"{{"uuid":"{OLD}","deployTime":"2026-11-30T12:00:00Z"}}"#);
    let a = call(
        "POST",
        &format!("{}/api/internal/version/op-auth", s.url),
        Some(&deployer),
        Some(&body),
    );
    assert_eq!(a.status, 200, "{:?}", a.body);
    let got = rt()
        .block_on(s.client(ADMIN_TOKEN).release("production", "op-auth"))
        .expect("release");
    assert_eq!(got.map(|r| r.release.version_id).as_deref(), Some(OLD));
}

#[test]
fn compat_routes_are_off_unless_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path(), &[]);
    let a = call(
        "POST",
        &format!("{}/api/internal/version/op-auth", s.url),
        Some(ADMIN_TOKEN),
        Some(r#"{"uuid":"x","deployTime":"2026-11-30T12:00:00Z"}"#),
    );
    assert_eq!(a.status, 404, "{:?}", a.body);
}
