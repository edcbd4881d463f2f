//! Drift alerts end to end: real `lockstep serve` processes, a real HTTP receiver on
//! loopback (webhook signature, Slack body), a real SMTP server (Debian's `python3-aiosmtpd`),
//! a receiver that is down, and two replicas on one PostgreSQL with the leader killed.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{KeyInit, Mac};
use lockstep_api::{AlertChannels, Heartbeat, PutRelease};
use lockstep_client::RegistryClient;
use lockstep_core::Release;
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess, eventually, fresh_pg_url};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");
const SECRET: &str = "hook-secret-0123456789";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: serde_json::Value,
    raw: Bytes,
}

/// A webhook receiver on loopback that records every request and answers `status`.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    url: String,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(listener).await
    }

    async fn serve(listener: tokio::net::TcpListener) -> Receiver {
        let r = Receiver {
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            url: format!("http://{}", listener.local_addr().expect("addr")),
        };
        async fn record(
            State(r): State<Receiver>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            raw: Bytes,
        ) -> StatusCode {
            let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
            r.got.lock().expect("lock").push(Received {
                path: uri.path().to_string(),
                headers,
                body,
                raw,
            });
            StatusCode::from_u16(r.status.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK)
        }
        let app = Router::new()
            .route("/{*path}", post(record))
            .with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

fn serve(dir: &Path, extra: &[&str]) -> ServeProcess {
    let mut args = vec![
        "--leader-lease",
        "2s",
        "--drift-low",
        "0s",
        "--drift-check-interval",
        "200ms",
        "--alert-rate-limit",
        "0s",
    ];
    args.extend_from_slice(extra);
    ServeProcess::spawn(Path::new(BIN), dir, &args, &[])
}

fn heartbeat(id: &str, version: &str) -> Heartbeat {
    serde_json::from_value(serde_json::json!({
        "instance_id": id, "service": "api", "version_id": version, "pid": 7,
    }))
    .expect("heartbeat")
}

async fn register(c: &RegistryClient, version: &str) {
    c.put_release(
        "production",
        "api",
        &PutRelease {
            release: Release::new(version),
            force: true,
        },
    )
    .await
    .expect("register");
}

fn channels(json: serde_json::Value) -> AlertChannels {
    serde_json::from_value(json).expect("channels")
}

fn signature_ok(r: &Received) -> bool {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&r.raw);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    r.headers
        .get("x-lockstep-signature")
        .and_then(|v| v.to_str().ok())
        == Some(want.as_str())
}

async fn metric(url: &str, line_prefix: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_instance_reaches_a_signed_webhook_and_slack_then_resolves_when_current() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = serve(dir.path(), &[]);
    let admin = srv.client(ADMIN_TOKEN);
    let set = channels(serde_json::json!({"channels": [
        {"name": "ops-hook", "type": "webhook", "url": format!("{}/hook", rx.url),
         "headers": {"X-Source": "lockstep"}, "secret": SECRET, "min_severity": "low"},
        {"name": "ops-slack", "type": "slack", "webhook_url": format!("{}/slack", rx.url),
         "channel": "#version-alerts", "username": "lockstep", "min_severity": "low"},
        {"name": "pager", "type": "webhook", "url": format!("{}/pager", rx.url),
         "min_severity": "critical"},
    ]}));
    let shown = admin.put_alert_channels(&set).await.expect("put channels");
    assert_eq!(
        shown.channels[0].secret.as_deref(),
        Some(lockstep_api::MASK)
    );
    let got = admin.alert_channels().await.expect("get channels");
    let text = serde_json::to_string(&got).expect("json");
    assert!(!text.contains(SECRET), "secret masked: {text}");
    assert!(!text.contains("/slack"), "slack URL masked: {text}");
    // PUT back what GET showed: the secrets stay.
    admin.put_alert_channels(&got).await.expect("round trip");

    register(&admin, "v1-aaaaaaaa").await;
    admin
        .heartbeat(&heartbeat("i-1", "v1-aaaaaaaa"))
        .await
        .expect("hb");
    register(&admin, "v2-bbbbbbbb").await;

    let (hooks, _) = eventually(Duration::from_secs(10), || async {
        let h = rx.on("/hook");
        (!h.is_empty()).then_some(h)
    })
    .await
    .unwrap_or_else(|| panic!("no webhook; logs:\n{}", srv.logs()));
    let hook = &hooks[0];
    assert!(signature_ok(hook), "signature verifies: {:?}", hook.headers);
    assert_eq!(
        hook.headers.get("x-source").and_then(|v| v.to_str().ok()),
        Some("lockstep")
    );
    assert!(hook.headers.get("x-lockstep-delivery").is_some());
    let b = &hook.body;
    assert_eq!(b["event"], "alert_opened");
    assert_eq!(b["instance_id"], "i-1");
    assert_eq!(b["worker_id"], "i-1");
    assert_eq!(b["service"], "api");
    assert_eq!(b["env"], "production");
    assert_eq!(b["severity"], "low");
    assert_eq!(b["current_version"], "v1-aaaaa");
    assert_eq!(b["expected_version"], "v2-bbbbb");
    assert_eq!(b["acknowledged"], false);
    assert!(
        b["drift_duration"].is_string() && b["timestamp"].is_string() && b["message"].is_string()
    );
    let (slack, _) = eventually(Duration::from_secs(5), || async {
        let s = rx.on("/slack");
        (!s.is_empty()).then_some(s)
    })
    .await
    .expect("slack message");
    let s = &slack[0].body;
    assert_eq!(s["channel"], "#version-alerts");
    assert_eq!(s["username"], "lockstep");
    assert!(s["text"].as_str().is_some_and(|t| t.contains("i-1")), "{s}");
    assert_eq!(s["attachments"][0]["color"], "#439FE0");
    assert!(
        rx.on("/pager").is_empty(),
        "below the pager's minimum severity"
    );

    // The API and the CLI see it; an operator acknowledges it from the CLI.
    let list = admin.alerts("open", None, None, 100).await.expect("alerts");
    assert_eq!(list.alerts.len(), 1, "one alert: {list:?}");
    let id = list.alerts[0].alert_id.clone();
    let op = admin
        .create_token("oncall", lockstep_core::Role::Operator)
        .await
        .expect("token")
        .token;
    let out = Command::new(BIN)
        .args([
            "alerts",
            "ack",
            &id,
            "--reason",
            "on it",
            "-o",
            "json",
            "--registry",
            &srv.url,
        ])
        .env("LOCKSTEP_TOKEN", &op)
        .stderr(Stdio::inherit())
        .output()
        .expect("run ack");
    assert!(out.status.success());
    let acked: lockstep_api::Alert = serde_json::from_slice(&out.stdout).expect("alert json");
    assert!(acked.acknowledged);
    assert_eq!(acked.acknowledged_by.as_deref(), Some("oncall"));
    let viewer = admin
        .create_token("watcher", lockstep_core::Role::Viewer)
        .await
        .expect("token")
        .token;
    let denied = srv.client(&viewer).ack_alert(&id, None).await;
    assert_eq!(denied.expect_err("viewer may not ack").status(), Some(403));
    let out = Command::new(BIN)
        .args(["alerts", "list", "--registry", &srv.url])
        .env("LOCKSTEP_TOKEN", &viewer)
        .output()
        .expect("run list");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("i-1") && table.contains("oncall"), "{table}");

    // Current again: resolved by itself, and the channels hear it.
    admin
        .heartbeat(&heartbeat("i-1", "v2-bbbbbbbb"))
        .await
        .expect("hb");
    eventually(Duration::from_secs(10), || async {
        let l = admin.alerts("resolved", None, None, 100).await.ok()?;
        (l.alerts.len() == 1).then_some(())
    })
    .await
    .expect("resolved");
    eventually(Duration::from_secs(5), || async {
        rx.on("/hook")
            .iter()
            .any(|h| h.body["event"] == "alert_resolved")
            .then_some(())
    })
    .await
    .expect("resolution sent");
    let kinds: Vec<String> = admin
        .events(0, 1000)
        .await
        .expect("events")
        .events
        .into_iter()
        .filter(|e| e.kind.starts_with("alert_"))
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "alert_channels_changed",
            "alert_channels_changed",
            "alert_opened",
            "alert_acknowledged",
            "alert_resolved"
        ]
    );
    let opened = rx
        .on("/hook")
        .iter()
        .filter(|h| h.body["event"] == "alert_opened")
        .count();
    assert_eq!(opened, 1, "sent once");
    assert_eq!(
        metric(
            &srv.url,
            "lockstep_alert_deliveries_total{channel=\"ops-hook\"}"
        )
        .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_gets_retries_and_a_recorded_failure_and_no_alert_is_lost() {
    // Two ports with nobody listening: `down` stays down, `late` comes up after a failure.
    let down = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let late = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (down_addr, late_addr) = (down.local_addr().expect("a"), late.local_addr().expect("a"));
    drop((down, late));
    let dir = tempfile::tempdir().expect("tempdir");
    let chans = serde_json::json!({"channels": [
        {"name": "down", "type": "webhook", "url": format!("http://{down_addr}/hook")},
        {"name": "late", "type": "webhook", "url": format!("http://{late_addr}/hook")},
    ]})
    .to_string();
    let srv = serve(
        dir.path(),
        &[
            "--alert-max-attempts",
            "5",
            "--alert-retry-base",
            "200ms",
            "--alert-channels",
            &chans,
        ],
    );
    let admin = srv.client(ADMIN_TOKEN);
    register(&admin, "v1").await;
    admin.heartbeat(&heartbeat("i-1", "v1")).await.expect("hb");
    register(&admin, "v2").await;
    eventually(Duration::from_secs(10), || async {
        let n = metric(
            &srv.url,
            "lockstep_alert_delivery_failures_total{channel=\"late\"}",
        )
        .await?;
        (n >= 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("a failed attempt; logs:\n{}", srv.logs()));
    let rx = Receiver::serve(
        tokio::net::TcpListener::bind(late_addr)
            .await
            .expect("rebind"),
    )
    .await;
    let (got, _) = eventually(Duration::from_secs(10), || async {
        let h = rx.on("/hook");
        (!h.is_empty()).then_some(h)
    })
    .await
    .expect("delivered once the receiver is up");
    assert_eq!(got[0].body["instance_id"], "i-1");
    eventually(Duration::from_secs(15), || async {
        let n = metric(
            &srv.url,
            "lockstep_alert_deliveries_failed_total{channel=\"down\"}",
        )
        .await?;
        (n >= 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the down channel's delivery is recorded as failed; logs:\n{}",
            srv.logs()
        )
    });
    assert_eq!(
        metric(
            &srv.url,
            "lockstep_alert_delivery_failures_total{channel=\"down\"}"
        )
        .await,
        Some(5.0),
        "every attempt made"
    );
    // The alert itself is still there, open.
    let open = admin.alerts("open", None, None, 10).await.expect("alerts");
    assert_eq!(open.alerts.len(), 1);
    assert!(srv.logs().contains("alert delivery failed for good"));
}

/// A Python with aiosmtpd (Debian's `python3-aiosmtpd`), or `None` with the reason.
fn aiosmtpd_python() -> Option<&'static str> {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    println!(
        "skipping: no python3 with aiosmtpd (apt-get install python3-aiosmtpd; .ci/alerts-deps.sh)"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_email_reaches_a_real_smtp_server() {
    let Some(py) = aiosmtpd_python() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let maildir = tempfile::tempdir().expect("maildir");
    let mail = maildir.path().join("mail");
    let mut smtpd = Command::new(py)
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ])
        .arg(&mail)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start aiosmtpd");
    eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await
    .expect("smtp server up");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lockstep.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[drift]
low = "0s"
check_interval = "200ms"

[alerts]
rate_limit = "0s"

[[channels]]
name = "ops-mail"
type = "email"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_security = "plain"
from_address = "lockstep@example.com"
to_addresses = ["ops@example.com"]
min_severity = "low"
"#
        ),
    )
    .expect("write config");
    let data = tempfile::tempdir().expect("tempdir");
    let srv = ServeProcess::spawn(
        Path::new(BIN),
        data.path(),
        &["--config", config.to_str().expect("utf-8")],
        &[],
    );
    let admin = srv.client(ADMIN_TOKEN);
    register(&admin, "v1").await;
    admin
        .heartbeat(&heartbeat("mail-1", "v1"))
        .await
        .expect("hb");
    register(&admin, "v2").await;
    let found = eventually(Duration::from_secs(15), || async {
        let new = mail.join("new");
        let entry = std::fs::read_dir(&new).ok()?.flatten().next()?;
        std::fs::read_to_string(entry.path()).ok()
    })
    .await;
    let _ = smtpd.kill();
    let _ = smtpd.wait();
    let (msg, _) = found.unwrap_or_else(|| panic!("no mail; logs:\n{}", srv.logs()));
    assert!(msg.contains("To: ops@example.com"), "{msg}");
    assert!(msg.contains("From: lockstep@example.com"), "{msg}");
    assert!(msg.contains("Subject: [LOW] opened"), "{msg}");
    assert!(msg.contains("mail-1"), "{msg}");
}

#[test]
fn a_bad_config_file_is_refused_at_start_with_its_line_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lockstep.toml");
    std::fs::write(&config, "[drift]\nlow = \"1m\"\nhigh = \"soon\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("LOCKSTEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("soon"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "refused before opening the store"
    );
}

/// Every alert change the receiver got on `/hook`, digests unpacked.
fn items(rx: &Receiver) -> Vec<serde_json::Value> {
    rx.on("/hook")
        .into_iter()
        .flat_map(|h| match h.body["alerts"].as_array() {
            Some(list) => list.clone(),
            None => vec![h.body],
        })
        .collect()
}

fn replica(url: &str, name: &str, extra: &[&str]) -> ServeProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec![
        "--store",
        url,
        "--replica-id",
        name,
        "--instance-ttl",
        "60s",
    ];
    args.extend_from_slice(extra);
    serve(dir.path(), &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_send_one_alert_per_condition_also_across_a_leader_change() {
    let Some(url) = fresh_pg_url().await else {
        return;
    };
    let rx = Receiver::start().await;
    let chans = serde_json::json!({"channels": [
        {"name": "hook", "type": "webhook", "url": format!("{}/hook", rx.url), "secret": SECRET},
    ]})
    .to_string();
    let mut a = replica(&url, "alert-a", &["--alert-channels", &chans]);
    let admin_a = a.client(ADMIN_TOKEN);
    eventually(Duration::from_secs(10), || async {
        let s = admin_a.status(None, None).await.ok()?;
        (s.registry?.leader.as_deref() == Some("alert-a")).then_some(())
    })
    .await
    .expect("a leads");
    let b = replica(&url, "alert-b", &["--alert-channels", &chans]);
    let admin_b = b.client(ADMIN_TOKEN);
    register(&admin_b, "v1").await;
    admin_a
        .heartbeat(&heartbeat("r-1", "v1"))
        .await
        .expect("hb");
    admin_b
        .heartbeat(&heartbeat("r-2", "v1"))
        .await
        .expect("hb");
    tokio::time::sleep(Duration::from_secs(1)).await; // both heartbeats flushed
    register(&admin_b, "v2").await;
    eventually(Duration::from_secs(10), || async {
        (items(&rx).len() >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("two alerts delivered; a:\n{}\nb:\n{}", a.logs(), b.logs()));
    // Once the leader has recorded the delivery (a crash between a receiver's answer and
    // that record is the one window where a message is sent again, with the same
    // X-Lockstep-Delivery id), kill it; the other replica takes over and a new condition is
    // alerted once.
    eventually(Duration::from_secs(10), || async {
        let n = metric(&a.url, "lockstep_alert_deliveries_total{channel=\"hook\"}").await?;
        (n >= 1.0).then_some(())
    })
    .await
    .expect("delivery recorded");
    a.kill9();
    eventually(Duration::from_secs(15), || async {
        let s = admin_b.status(None, None).await.ok()?;
        (s.registry?.leader.as_deref() == Some("alert-b")).then_some(())
    })
    .await
    .expect("b leads");
    admin_b
        .heartbeat(&heartbeat("r-3", "v1"))
        .await
        .expect("hb");
    eventually(Duration::from_secs(10), || async {
        items(&rx)
            .iter()
            .any(|i| i["instance_id"] == "r-3")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("r-3 alerted by the new leader; b:\n{}", b.logs()));
    // Let any duplicate arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.on("/hook").iter().all(signature_ok));
    let mut seen = std::collections::BTreeMap::new();
    for i in items(&rx) {
        let key = (
            i["instance_id"].as_str().unwrap_or_default().to_string(),
            i["event"].as_str().unwrap_or_default().to_string(),
        );
        *seen.entry(key).or_insert(0) += 1;
    }
    let opened: Vec<_> = seen
        .iter()
        .filter(|((_, e), _)| e == "alert_opened")
        .collect();
    assert_eq!(opened.len(), 3, "{seen:?}");
    let notes = |l: String| -> String {
        l.lines()
            .filter(|l| l.contains("lockstep_notify") || l.contains("leader"))
            .filter(|l| !l.contains("sqlx"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        seen.values().all(|n| *n == 1),
        "each sent once: {seen:?}\na:\n{}\nb:\n{}",
        notes(a.logs()),
        notes(b.logs())
    );
    let alerts = admin_b
        .alerts("all", None, None, 100)
        .await
        .expect("alerts");
    assert_eq!(
        alerts.alerts.len(),
        3,
        "one alert per condition: {alerts:?}"
    );
}
