//! The axum example as a real process against a real registry: it serves while current,
//! answers 503 within milliseconds of a deploy, never leaks a version id, advertises its
//! endpoint, deregisters on SIGTERM, and refuses to start as a debug build in production.

use lockstep_api::PutRelease;
use lockstep_core::{Release, Role};
use lockstep_testkit::InProcessRegistry;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_axum-worker");
const V1: &str = "3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f";
const V2: &str = "9d8c7b6a-1111-4222-8333-444455556666";

struct Worker {
    child: Child,
    url: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(reg: &InProcessRegistry, token: &str, service: &str, version: &str) -> Worker {
    let mut child = Command::new(WORKER)
        .env("LOCKSTEP_REGISTRY", &reg.url)
        .env("LOCKSTEP_TOKEN", token)
        .env("LOCKSTEP_SERVICE", service)
        .env("LOCKSTEP_VERSION_ID", version)
        .env_remove("LOCKSTEP_ENV")
        .env_remove("APP_ENV")
        .env_remove("NODE_ENV")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn axum-worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    Worker { child, url }
}

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

async fn instances(reg: &InProcessRegistry, service: &str) -> Vec<lockstep_api::InstanceStatus> {
    let r = reg
        .admin()
        .status(None, Some(service))
        .await
        .expect("status");
    r.environments
        .into_iter()
        .flat_map(|e| e.services)
        .flat_map(|s| s.instances)
        .collect()
}

async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_running_worker_answers_503_within_250_ms_of_a_deploy() {
    let reg = InProcessRegistry::start().await;
    let token = reg.token("workers", Role::Worker).await;
    reg.admin()
        .put_release("production", "api", &release(V1))
        .await
        .expect("v1");
    let w = spawn(&reg, &token, "api", V1);
    let http = reqwest::Client::new();
    until(
        "heartbeating as current",
        Duration::from_secs(10),
        async || {
            instances(&reg, "api")
                .await
                .iter()
                .any(|i| i.status == lockstep_core::Status::Current)
        },
    )
    .await;
    let resp = http.get(&w.url).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let who: serde_json::Value = http
        .get(format!("{}/whoami", w.url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(who["version_id"], V1);
    let listed = instances(&reg, "api").await;
    assert_eq!(
        listed[0].instance.endpoint.as_deref(),
        Some(w.url.as_str()),
        "the heartbeat advertises the URL"
    );

    reg.admin()
        .put_release("production", "api", &release(V2))
        .await
        .expect("v2");
    let answered = Instant::now();
    let resp = loop {
        let resp = http.get(&w.url).send().await.expect("get");
        if resp.status() == 503 {
            break resp;
        }
        assert!(
            answered.elapsed() < Duration::from_millis(250),
            "still serving 250 ms after the deploy"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    eprintln!("first 503 after {:?}", answered.elapsed());
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.expect("body");
    assert_eq!(body, r#"{"error":"service_unavailable"}"#);
    for id in [&V1[..8], &V2[..8]] {
        assert!(
            !body.contains(id) && !headers.contains(id),
            "a 503 reveals no version id"
        );
    }
    let whoami = http
        .get(format!("{}/whoami", w.url))
        .send()
        .await
        .expect("get");
    assert_eq!(whoami.status(), 503, "every route behind the layer refuses");
    assert_eq!(
        http.get(format!("{}/healthz", w.url))
            .send()
            .await
            .expect("get")
            .status(),
        200,
        "health is exempt"
    );
}

#[tokio::test]
async fn another_services_deploy_does_not_touch_this_worker() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "auth", &release(V1))
        .await
        .expect("auth v1");
    reg.admin()
        .put_release("production", "token", &release(V1))
        .await
        .expect("token v1");
    let w = spawn(&reg, lockstep_testkit::ADMIN_TOKEN, "auth", V1);
    until("registered", Duration::from_secs(10), async || {
        !instances(&reg, "auth").await.is_empty()
    })
    .await;
    reg.admin()
        .put_release("production", "token", &release(V2))
        .await
        .expect("token v2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = reqwest::get(&w.url).await.expect("get");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_the_worker() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "api", &release(V1))
        .await
        .expect("v1");
    let mut w = spawn(&reg, lockstep_testkit::ADMIN_TOKEN, "api", V1);
    until("registered", Duration::from_secs(10), async || {
        instances(&reg, "api").await.len() == 1
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &w.child.id().to_string()])
        .status()
        .expect("kill");
    // Waiting blocks; the registry in this runtime must keep answering the deregistration.
    let status = tokio::task::spawn_blocking(move || {
        let st = w.child.wait();
        drop(w);
        st
    })
    .await
    .expect("join")
    .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        instances(&reg, "api").await.is_empty(),
        "deregistered, not left to go missing"
    );
}

#[test]
fn a_debug_build_refuses_to_start_in_production() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: this test binary and the worker are release builds");
        return;
    }
    let o = Command::new(WORKER)
        .env("LOCKSTEP_ENV", "production")
        .env("LOCKSTEP_SERVICE", "api")
        .env("LOCKSTEP_REGISTRY", "http://127.0.0.1:9")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    if cfg!(debug_assertions) {
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(
            err.contains("[version] FATAL: this is a debug build"),
            "{err}"
        );
        assert!(o.stdout.is_empty(), "it never got as far as listening");
    }
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    // An unreachable registry makes the worker log warnings at once.
    let mut child = Command::new(WORKER)
        .env("LOCKSTEP_SERVICE", "api")
        .env("LOCKSTEP_VERSION_ID", V1)
        .env("LOCKSTEP_REGISTRY", "http://127.0.0.1:9")
        .env("RUST_LOG", "info")
        .env_remove("LOCKSTEP_ENV")
        .env_remove("APP_ENV")
        .env_remove("NODE_ENV")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn axum-worker");
    std::thread::sleep(Duration::from_millis(800));
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INFO") || err.contains("WARN"),
        "it logged: {err}"
    );
    assert!(!err.contains('\u{1b}'), "no ANSI escape codes: {err:?}");
}
