//! The `lockstep` binary end to end: real `serve` processes on port 0, real signals, the
//! commands as an operator or a CI script runs them, and their exit codes.

use lockstep_api::{Heartbeat, PutRelease};
use lockstep_core::{Release, Role};
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

fn serve(dir: &Path) -> ServeProcess {
    ServeProcess::spawn(Path::new(BIN), dir, &[], &[])
}

fn lockstep(url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("LOCKSTEP_REGISTRY", url)
        .env("LOCKSTEP_TOKEN", token)
        .env_remove("LOCKSTEP_ENV")
        .output()
        .expect("run lockstep")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn hb(id: &str, svc: &str, version: &str) -> Heartbeat {
    serde_json::from_value(json!({"instance_id": id, "service": svc, "version_id": version, "started_at": "2026-11-24T10:00:00Z"}))
        .expect("heartbeat")
}

#[test]
fn serve_prints_its_address_and_a_bootstrap_token_only_on_first_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = ServeProcess::spawn(
        Path::new(BIN),
        dir.path(),
        &[],
        &[("LOCKSTEP_ADMIN_TOKEN", "")],
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = s.stdout.lock().map(|s| s.clone()).unwrap_or_default();
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("bootstrap admin token (shown once, store it now): "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no bootstrap token in {out:?}"));
    let o = lockstep(&s.url, &token, &["token", "list"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        !s.logs().contains(&token),
        "the token is printed once on stdout, never logged"
    );
    assert_eq!(
        s.terminate(Duration::from_secs(10)).map(|st| st.success()),
        Some(true)
    );
    let s2 = ServeProcess::spawn(
        Path::new(BIN),
        dir.path(),
        &[],
        &[("LOCKSTEP_ADMIN_TOKEN", "")],
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = s2.stdout.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        !out.contains("bootstrap admin token"),
        "second start prints no token: {out}"
    );
    assert_eq!(
        code(&lockstep(&s2.url, &token, &["token", "list"])),
        0,
        "the first token still works"
    );
}

#[test]
fn verify_exits_0_1_and_3_in_the_right_cases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let run = |args: &[&str]| lockstep(&s.url, ADMIN_TOKEN, args);
    let o = run(&[
        "register",
        "--service",
        "api",
        "--version-id",
        "11111111-aaaa-4bbb-8ccc-000000000001",
        "--git-sha",
        "abcdef1234567",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // A known service with an empty fleet: failure unless allowed.
    let o = run(&["verify", "--service", "api"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("[FAIL]"));
    assert_eq!(
        code(&run(&["verify", "--service", "api", "--allow-empty"])),
        0
    );
    let client = s.client(ADMIN_TOKEN);
    let rt = rt();
    rt.block_on(client.heartbeat(&hb("w-1", "api", "11111111-aaaa-4bbb-8ccc-000000000001")))
        .expect("hb");
    let o = run(&["verify", "--service", "api"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.lines()
            .next()
            .unwrap_or("")
            .starts_with("[OK] api w-1 11111111"),
        "{out}"
    );
    assert!(
        out.lines().last().unwrap_or("").starts_with("[OK]"),
        "{out}"
    );

    rt.block_on(client.heartbeat(&hb("w-2", "api", "00000000-old")))
        .expect("hb");
    let o = run(&["verify", "--service", "api"]);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("[STALE] api w-2 00000000"), "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap_or("")
            .starts_with("[FAIL] 1 of 2"),
        "{out}"
    );
    let o = run(&["verify", "--service", "api", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["ok"].as_bool(), v["failing"].as_u64()),
        (Some(false), Some(1))
    );

    // --expect checks against a given SHA instead of the registry.
    let o = run(&["verify", "--service", "api", "--expect", "00000000-old"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("[OK] api w-2"), "{}", text(&o));

    // Registry unreachable: 3.
    let o = lockstep(
        "http://127.0.0.1:9",
        ADMIN_TOKEN,
        &["verify", "--service", "api"],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(text(&o).contains("could not reach the registry"));
    // Failover: a dead URL first, then the live one.
    let both = format!("http://127.0.0.1:9,{}", s.url);
    assert_eq!(
        code(&lockstep(
            &both,
            ADMIN_TOKEN,
            &["verify", "--service", "api", "--expect", "11111111"]
        )),
        1
    );
}

#[test]
fn verify_reports_missing_instances() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), dir.path(), &["--instance-ttl", "1s"], &[]);
    let client = s.client(ADMIN_TOKEN);
    let rt = rt();
    rt.block_on(client.put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v1"),
            force: false,
        },
    ))
    .expect("register");
    rt.block_on(client.heartbeat(&hb("gone", "jobs", "v1")))
        .expect("hb");
    std::thread::sleep(Duration::from_millis(2200));
    let o = lockstep(&s.url, ADMIN_TOKEN, &["verify", "--service", "jobs"]);
    assert_eq!(code(&o), 1);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("[MISSING] jobs gone v1"),
        "{}",
        text(&o)
    );
}

#[test]
fn deploy_registers_nothing_when_the_deploy_command_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--retries",
            "2",
            "--retry-delay",
            "10ms",
            "--",
            "sh",
            "-c",
            "echo attempt >> \"$0\"; exit 7",
            dir.path().join("attempts").to_str().unwrap_or(""),
        ],
    );
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("nothing was registered"), "{}", text(&o));
    let attempts = std::fs::read_to_string(dir.path().join("attempts")).unwrap_or_default();
    assert_eq!(attempts.lines().count(), 3, "1 try + 2 retries");
    let rel = rt()
        .block_on(s.client(ADMIN_TOKEN).release("production", "api"))
        .expect("read");
    assert!(rel.is_none(), "nothing registered after a failed deploy");
}

#[test]
fn deploy_passes_the_version_to_the_command_retries_and_registers_after_success() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let marker = dir.path().join("env");
    let script = "if [ ! -f \"$0.once\" ]; then touch \"$0.once\"; exit 1; fi; \
                  echo \"$LOCKSTEP_VERSION_ID $CODE_VERSION_UUID $DEPLOY_TIME_UTC\" > \"$0\"";
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--version",
            "v2.0.0",
            "--retries",
            "1",
            "--retry-delay",
            "10ms",
            "--",
            "sh",
            "-c",
            script,
            marker.to_str().unwrap_or(""),
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let id = stdout.lines().last().unwrap_or("").to_string();
    assert!(
        uuid::Uuid::parse_str(&id)
            .map(|u| u.get_version_num() == 4)
            .unwrap_or(false),
        "last line is a UUID v4: {stdout:?}"
    );
    let seen = std::fs::read_to_string(&marker).expect("the command ran");
    let parts: Vec<_> = seen.split_whitespace().collect();
    assert_eq!(parts[0], id);
    assert_eq!(parts[1], id);
    assert!(
        time::OffsetDateTime::parse(parts[2], &time::format_description::well_known::Rfc3339)
            .is_ok()
    );
    let rel = rt()
        .block_on(s.client(ADMIN_TOKEN).release("production", "api"))
        .expect("read")
        .expect("registered");
    assert_eq!(rel.release.version_id, id);
    assert_eq!(rel.release.version.as_deref(), Some("v2.0.0"));
}

#[test]
fn deploy_wait_succeeds_once_every_live_instance_reports_the_new_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let client = s.client(ADMIN_TOKEN);
    let rt = rt();
    rt.block_on(client.heartbeat(&hb("w-1", "api", "old")))
        .expect("hb");
    // A "worker" that restarts onto whatever release becomes expected.
    let url = s.url.clone();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let c =
            lockstep_client::RegistryClient::new(&url, Some(ADMIN_TOKEN.into())).expect("client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(r)) = rt.block_on(c.release("production", "api")) {
                rt.block_on(c.heartbeat(&hb("w-1", "api", &r.release.version_id)))
                    .expect("hb");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--wait",
            "--timeout",
            "20s",
            "--",
            "true",
        ],
    );
    worker.join().expect("worker");
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("every live instance runs"),
        "{}",
        text(&o)
    );
}

#[test]
fn deploy_wait_timeout_rolls_back_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let client = s.client(ADMIN_TOKEN);
    let rt = rt();
    rt.block_on(client.put_release(
        "production",
        "api",
        &PutRelease {
            release: Release::new("good"),
            force: false,
        },
    ))
    .expect("register");
    rt.block_on(client.heartbeat(&hb("w-1", "api", "good")))
        .expect("hb");
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--wait",
            "--timeout",
            "1s",
            "--rollback-on-timeout",
            "--",
            "true",
        ],
    );
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("still on good"), "{}", text(&o));
    let rel = rt
        .block_on(client.release("production", "api"))
        .expect("read")
        .expect("release");
    assert_eq!(
        rel.release.version_id, "good",
        "rolled back to the previous release"
    );
    assert_eq!(rel.kind, lockstep_core::RegistrationKind::Rollback);
}

#[test]
fn every_acknowledged_registration_survives_kill_9_in_the_middle_of_a_burst() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = serve(dir.path());
    let rt = rt();
    let url = s.url.clone();
    let acked = rt.block_on(async move {
        let mut tasks = Vec::new();
        for w in 0..4 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let c = lockstep_client::RegistryClient::new(&url, Some(ADMIN_TOKEN.into()))
                    .expect("client");
                let mut acked = Vec::new();
                for n in 0.. {
                    let id = format!("w{w}-{n:05}");
                    match c
                        .put_release(
                            "production",
                            &format!("svc-{w}"),
                            &PutRelease {
                                release: Release::new(&id),
                                force: false,
                            },
                        )
                        .await
                    {
                        Ok(r) => acked.push((w, id, r.revision)),
                        Err(_) => break,
                    }
                }
                acked
            }));
        }
        // Let the burst run, then pull the plug while requests are in flight.
        tokio::time::sleep(Duration::from_millis(800)).await;
        tasks
    });
    s.kill9();
    let acked: Vec<_> = rt.block_on(async { futures_join(acked).await });
    assert!(
        acked.len() > 20,
        "the burst got going ({} acknowledged)",
        acked.len()
    );
    let s = serve(dir.path());
    let client = s.client(ADMIN_TOKEN);
    for w in 0..4 {
        let hist = rt
            .block_on(client.history("production", &format!("svc-{w}"), 1000))
            .expect("history");
        let stored: std::collections::HashSet<_> = hist
            .releases
            .iter()
            .map(|r| r.release.version_id.clone())
            .collect();
        for (_, id, _) in acked.iter().filter(|a| a.0 == w) {
            assert!(stored.contains(id), "acknowledged {id} lost after kill -9");
        }
    }
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Vec<(i32, String, i64)>>>,
) -> Vec<(i32, String, i64)> {
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("task"));
    }
    out
}

#[test]
fn sigterm_drains_and_flushes_heartbeats_before_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = serve(dir.path());
    let rt = rt();
    let client = s.client(ADMIN_TOKEN);
    rt.block_on(client.heartbeat(&hb("flushed-on-exit", "api", "v1")))
        .expect("hb");
    let status = s
        .terminate(Duration::from_secs(10))
        .expect("exits within 10 s");
    assert!(status.success(), "{status:?}");
    assert!(s.logs().contains("heartbeats flushed"), "{}", s.logs());
    let s = serve(dir.path());
    let report = rt
        .block_on(s.client(ADMIN_TOKEN).status(None, None))
        .expect("status");
    let ids: Vec<_> = report
        .environments
        .iter()
        .flat_map(|e| &e.services)
        .flat_map(|s| &s.instances)
        .map(|i| i.instance.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["flushed-on-exit"]);
}

#[test]
fn no_log_line_contains_a_whole_version_id_or_any_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let id = "9f8e7d6c-5b4a-4321-8fed-cba987654321";
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "token", "create", "--name", "ci", "--role", "deployer", "--output", "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let created: Value = serde_json::from_slice(&o.stdout).expect("json");
    let ci = created["token"].as_str().expect("token").to_string();
    assert_eq!(created["role"], "deployer");
    for args in [
        vec!["register", "--service", "api", "--version-id", id],
        vec![
            "register",
            "--service",
            "api",
            "--version-id",
            "0123456789abcdef-older",
            "--build-date",
            "2020-01-01T00:00:00Z",
        ],
        vec!["status"],
        vec!["verify"],
    ] {
        lockstep(&s.url, &ci, &args);
    }
    let rt = rt();
    rt.block_on(s.client(&ci).heartbeat(&hb("w-1", "api", id)))
        .expect("hb");
    rt.block_on(
        s.client(&ci)
            .heartbeat(&hb("w-2", "api", "abcdefabcdef-stale-version")),
    )
    .expect("hb");
    lockstep(
        &s.url,
        "lst_wrong_token_value_for_the_log_check",
        &["status"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let logs = s.logs();
    assert!(
        logs.contains("9f8e7d6c"),
        "the 8-character prefix is logged: {logs}"
    );
    for secret in [
        id,
        "abcdefabcdef-stale-version",
        "0123456789abcdef-older",
        &ci,
        ADMIN_TOKEN,
        "lst_wrong_token_value_for_the_log_check",
    ] {
        assert!(!logs.contains(secret), "log contains {secret}:\n{logs}");
    }
}

#[test]
fn register_exit_codes_tell_rejection_from_configuration_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "register",
            "--service",
            "api",
            "--version-id",
            "new",
            "--build-date",
            "2026-11-02T00:00:00Z",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "register",
            "--service",
            "api",
            "--version-id",
            "old",
            "--build-date",
            "2026-11-01T00:00:00Z",
        ],
    );
    assert_eq!(code(&o), 1, "a downgrade is a rejection: {}", text(&o));
    assert!(text(&o).contains("downgrade"));
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "register",
            "--service",
            "api",
            "--version-id",
            "old",
            "--build-date",
            "2026-11-01T00:00:00Z",
            "--force",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = lockstep(
        &s.url,
        "",
        &["register", "--service", "api", "--version-id", "x"],
    );
    assert_eq!(
        code(&o),
        2,
        "no token is a configuration error: {}",
        text(&o)
    );
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["register", "--service", "Not Valid", "--version-id", "x"],
    );
    assert_eq!(code(&o), 2, "{}", text(&o));
    let o = lockstep(&s.url, ADMIN_TOKEN, &["register", "--service", "api"]);
    assert_eq!(code(&o), 2, "missing flag is a usage error");
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["rollback", "--service", "api", "--reason", "test"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("rolled back to production/api new"),
        "{}",
        text(&o)
    );
    let o = lockstep(&s.url, ADMIN_TOKEN, &["status", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(
        v["environments"][0]["services"][0]["expected"]["version_id"],
        "new"
    );
    let o = lockstep(&s.url, ADMIN_TOKEN, &["status"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("production  api"),
        "{}",
        text(&o)
    );
}

#[test]
fn tokens_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["token", "create", "--name", "edge", "--role", "worker"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let secret = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(secret.starts_with("lst_"));
    let o = lockstep(&s.url, ADMIN_TOKEN, &["token", "list", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["tokens"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["name"] == "edge" && t["role"] == "worker")
    }));
    assert!(!text(&o).contains(&secret));
    let o = lockstep(&s.url, &secret, &["status"]);
    assert_eq!(
        code(&o),
        2,
        "a worker token may not read status, a configuration error: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("viewer"),
        "names the role needed: {}",
        text(&o)
    );
    assert_eq!(
        code(&lockstep(
            &s.url,
            ADMIN_TOKEN,
            &["token", "revoke", "--name", "edge"]
        )),
        0
    );
    let o = lockstep(&s.url, &secret, &["verify"]);
    assert_eq!(code(&o), 2, "revoked token: {}", text(&o));
    let _ = Role::Worker;
}

#[test]
fn detect_prints_the_version_of_a_source_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("VERSION"), "3.1.4\n").expect("write");
    std::fs::write(
        dir.path().join("lockstep.toml"),
        "[components]\nparser = \"2.0\"\n",
    )
    .expect("write");
    let o = Command::new(BIN)
        .args(["detect", dir.path().to_str().unwrap_or("")])
        .output()
        .expect("run");
    assert_eq!(code(&o), 0);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "3.1.4");
    let o = Command::new(BIN)
        .args([
            "detect",
            "--output",
            "json",
            dir.path().to_str().unwrap_or(""),
        ])
        .output()
        .expect("run");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (
            v["version"].as_str(),
            v["source"].as_str(),
            v["components"]["parser"].as_str()
        ),
        (Some("3.1.4"), Some("version_file"), Some("2.0"))
    );
    let o = Command::new(BIN)
        .args(["detect", "/nonexistent/dir"])
        .output()
        .expect("run");
    assert_eq!(code(&o), 2);
}

#[test]
fn every_command_explains_itself_with_an_example() {
    for cmd in [
        "serve", "register", "deploy", "rollback", "status", "verify", "detect", "guard", "demo",
    ] {
        let o = Command::new(BIN)
            .args([cmd, "--help"])
            .output()
            .expect("run");
        assert_eq!(code(&o), 0);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains("Example"),
            "{cmd} --help has no example:\n{help}"
        );
    }
    let o = Command::new(BIN)
        .args(["token", "create", "--help"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&o.stdout).contains("Example"));
    let o = Command::new(BIN)
        .args(["frobnicate"])
        .output()
        .expect("run");
    assert_eq!(code(&o), 2, "unknown subcommand is a usage error");
}
