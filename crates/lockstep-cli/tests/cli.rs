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
    // serde_json keeps the last of two equal keys; strict parsers (and jq users) do not.
    serde_json::from_slice::<NoDuplicateKeys>(&o.stdout)
        .expect("verify -o json has no duplicate key");
    for i in v["instances"].as_array().expect("instances") {
        assert_eq!(
            (i["env"].as_str(), i["service"].as_str()),
            (Some("production"), Some("api")),
            "{i}"
        );
    }

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
        "serve",
        "register",
        "deploy",
        "rollback",
        "history",
        "status",
        "verify",
        "forget",
        "detect",
        "guard",
        "demo",
        "completions",
        "man",
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

fn register(url: &str, service: &str, id: &str, version: &str) {
    let o = lockstep(
        url,
        ADMIN_TOKEN,
        &[
            "register",
            "--service",
            service,
            "--version-id",
            id,
            "--version",
            version,
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn verify_and_status_on_an_unknown_service_exit_1_naming_the_known_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    register(&s.url, "api", "v1", "v1.0.0");
    register(&s.url, "extractor", "e1", "v1.0.0");
    let run = |args: &[&str]| lockstep(&s.url, ADMIN_TOKEN, args);
    for args in [
        &["verify", "--service", "apii"][..],
        &["verify", "--service", "apii", "--allow-empty"],
        &["status", "--service", "apii"],
        &["history", "--service", "apii"],
    ] {
        let o = run(args);
        assert_eq!(code(&o), 1, "{args:?}: {}", text(&o));
        assert!(
            stderr(&o).contains("no service named \"apii\"")
                && stderr(&o).contains("api, extractor"),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!text(&o).contains("[OK]"), "{args:?}: {}", text(&o));
    }
    let o = run(&["status", "--env", "prod"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        stderr(&o).contains("known environments: production"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "verify",
        "--env",
        "staging",
        "--service",
        "api",
        "--allow-empty",
    ]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    // LOCKSTEP_SERVICE is honoured like --service.
    let o = Command::new(BIN)
        .args(["verify", "--allow-empty"])
        .env("LOCKSTEP_REGISTRY", &s.url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .env("LOCKSTEP_SERVICE", "apii")
        .env_remove("LOCKSTEP_ENV")
        .output()
        .expect("run");
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(stderr(&o).contains("apii"), "{}", text(&o));
    // A known service with no instance is still a plain empty fleet.
    assert_eq!(
        code(&run(&["verify", "--service", "api", "--allow-empty"])),
        0
    );
    assert_eq!(code(&run(&["status", "--service", "api"])), 0);
}

#[test]
fn deploy_wait_on_an_empty_fleet_answers_within_a_second_and_keeps_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    register(&s.url, "api", "good", "v1.0.0");
    let t0 = Instant::now();
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--wait",
            "--timeout",
            "5m",
            "--rollback-on-timeout",
            "--",
            "true",
        ],
    );
    let took = t0.elapsed();
    assert_eq!(code(&o), 1, "nothing reports the release: {}", text(&o));
    assert!(
        took < Duration::from_secs(3),
        "answered in {took:?}, not after the 5m timeout"
    );
    assert!(
        stderr(&o).contains("no live instance of api"),
        "{}",
        text(&o)
    );
    assert!(!stderr(&o).contains("0/0"), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let rel = rt()
        .block_on(s.client(ADMIN_TOKEN).release("production", "api"))
        .expect("read")
        .expect("release");
    assert_eq!(rel.release.version_id, id, "registered and not rolled back");
}

#[test]
fn register_of_a_lower_semantic_version_is_refused_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    register(&s.url, "api", "11111111-one", "v1.0.0");
    let args = [
        "register",
        "--service",
        "api",
        "--version-id",
        "22222222-two",
        "--version",
        "v0.9.0",
    ];
    let o = lockstep(&s.url, ADMIN_TOKEN, &args);
    assert_eq!(code(&o), 1, "a downgrade is a refusal: {}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("--force") && e.contains("v1.0.0 (11111111)") && e.contains("v0.9.0 (22222222)"),
        "names both releases and the flag: {e}"
    );
    let mut forced = args.to_vec();
    forced.push("--force");
    let o = lockstep(&s.url, ADMIN_TOKEN, &forced);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // A deploy that would be refused is refused before its command runs.
    let marker = dir.path().join("deployed");
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &[
            "deploy",
            "--service",
            "api",
            "--version",
            "v0.1.0",
            "--",
            "touch",
            marker.to_str().unwrap_or(""),
        ],
    );
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(stderr(&o).contains("did not run"), "{}", text(&o));
    assert!(!marker.exists(), "the deploy command never ran");
}

#[test]
fn register_takes_nothing_from_the_current_directory_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let tree = tempfile::tempdir().expect("tempdir");
    std::fs::write(tree.path().join("VERSION"), "4.2.0\n").expect("write");
    // Run from inside this git checkout: its SHA must not end up in the release.
    let run_in = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("LOCKSTEP_REGISTRY", &s.url)
            .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
            .env_remove("LOCKSTEP_ENV")
            .output()
            .expect("run")
    };
    let o = run_in(&[
        "register",
        "--service",
        "api",
        "--version-id",
        "plain",
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    for field in ["git_sha", "build_date", "version"] {
        assert!(v.get(field).is_none(), "{field} was guessed: {v}");
    }
    let o = run_in(&[
        "register",
        "--service",
        "api",
        "--version-id",
        "detected",
        "--detect",
        tree.path().to_str().unwrap_or(""),
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["version"], "4.2.0", "{v}");
}

#[test]
fn history_lists_releases_newest_first_with_the_ids_rollback_to_takes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    register(
        &s.url,
        "api",
        "3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f",
        "v1.0.0",
    );
    register(
        &s.url,
        "api",
        "9d8c7b6a-1111-4222-8333-444455556666",
        "v1.1.0",
    );
    let o = lockstep(&s.url, ADMIN_TOKEN, &["history", "--service", "api"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("VERSION ID"), "{out}");
    assert!(
        lines[1].starts_with('*') && lines[1].contains("9d8c7b6a-1111-4222-8333-444455556666"),
        "the current release first, whole id: {out}"
    );
    assert!(
        lines[2].contains("3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f") && lines[2].contains("v1.0.0"),
        "{out}"
    );
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["history", "--service", "api", "-o", "json"],
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let older = v["releases"][1]["version_id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["rollback", "--service", "api", "--to", &older],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = lockstep(
        &s.url,
        ADMIN_TOKEN,
        &["history", "--service", "api", "--limit", "1"],
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("rollback") && out.contains(&older), "{out}");
}

#[test]
fn forget_removes_a_dead_instance_so_verify_passes_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), dir.path(), &["--instance-ttl", "1s"], &[]);
    register(&s.url, "jobs", "v1", "v1.0.0");
    let client = s.client(ADMIN_TOKEN);
    let rt = rt();
    rt.block_on(client.heartbeat(&hb("dead", "jobs", "v1")))
        .expect("hb");
    std::thread::sleep(Duration::from_millis(2200));
    rt.block_on(client.heartbeat(&hb("alive", "jobs", "v1")))
        .expect("hb");
    let o = lockstep(&s.url, ADMIN_TOKEN, &["verify", "--service", "jobs"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("[MISSING] jobs dead"), "{}", text(&o));
    let operator = rt
        .block_on(client.create_token("ops", Role::Operator))
        .expect("token")
        .token;
    let o = lockstep(
        &s.url,
        &operator,
        &["forget", "--missing", "--service", "jobs"],
    );
    assert_eq!(code(&o), 0, "an operator may forget: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "forgot dead",
        "{}",
        text(&o)
    );
    let o = lockstep(&s.url, ADMIN_TOKEN, &["verify", "--service", "jobs"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = lockstep(&s.url, &operator, &["forget", "no-such-instance"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(stderr(&o).contains("no-such-instance"), "{}", text(&o));
    let o = lockstep(&s.url, &operator, &["forget", "alive", "-o", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["forgotten"][0], "alive", "{v}");
}

/// Something at the registry URL that answers HTTP but is not lockstep.
fn not_a_registry() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten().take(20) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 18\r\nConnection: close\r\n\r\n<h1>Not Found</h1>",
            );
        }
    });
    url
}

#[test]
fn errors_say_what_to_do_in_an_operators_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = serve(dir.path());
    let check = |o: Output, exit: i32, says: &str| {
        assert_eq!(code(&o), exit, "{}", text(&o));
        assert!(
            stderr(&o).contains(says),
            "expected {says:?} in {}",
            text(&o)
        );
        for http in ["registry answered", "(http_error)", "error sending request"] {
            assert!(
                !stderr(&o).contains(http),
                "HTTP talk {http:?}: {}",
                text(&o)
            );
        }
    };
    let reg = ["register", "--service", "api", "--version-id", "x"];
    check(
        lockstep(&s.url, "", &reg),
        2,
        "set LOCKSTEP_TOKEN or pass --token",
    );
    check(
        lockstep(&s.url, "lst_wrong", &reg),
        2,
        "does not accept this token",
    );
    let viewer = rt()
        .block_on(s.client(ADMIN_TOKEN).create_token("dash", Role::Viewer))
        .expect("token")
        .token;
    check(
        lockstep(&s.url, &viewer, &reg),
        2,
        "needs the deployer role",
    );
    check(
        lockstep(&not_a_registry(), ADMIN_TOKEN, &["status"]),
        2,
        "does not answer like a lockstep registry",
    );
    check(
        lockstep("http://127.0.0.1:9", ADMIN_TOKEN, &["status"]),
        3,
        "connection refused",
    );
    check(
        lockstep("not a url", ADMIN_TOKEN, &["status"]),
        2,
        "invalid registry URL",
    );
}

#[test]
fn a_second_serve_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = serve(dir.path());
    let t0 = Instant::now();
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("LOCKSTEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run");
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        stderr(&o).contains("another lockstep serve is already using"),
        "{}",
        text(&o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("listening on"),
        "{}",
        text(&o)
    );
}

/// `--help` split into option blocks: each starts at a line beginning with `-` (after
/// indentation) and holds its description.
fn option_blocks(help: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.starts_with("Options:") {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        let indent = line.len() - line.trim_start().len();
        if line.trim_start().starts_with('-') && indent <= 6 {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

fn help(args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(code(&o), 0, "{args:?}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn every_serve_flag_has_an_environment_variable() {
    let blocks = option_blocks(&help(&["serve"]));
    assert!(blocks.len() > 10, "{blocks:?}");
    for b in blocks {
        if b.contains("--help") {
            continue;
        }
        assert!(b.contains("[env: LOCKSTEP_"), "no env var: {b}");
    }
}

#[test]
fn flags_are_consistent_across_subcommands() {
    for cmd in [
        &["register"][..],
        &["deploy"],
        &["rollback"],
        &["history"],
        &["status"],
        &["verify"],
        &["forget"],
        &["detect"],
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke"],
    ] {
        let h = help(cmd);
        assert!(h.contains("-o, --output"), "{cmd:?} has no -o/--output");
        assert!(h.contains("--log-format"), "{cmd:?} has no --log-format");
    }
    for cmd in ["status", "verify", "history", "register", "deploy", "guard"] {
        assert!(
            help(&[cmd]).contains("[env: LOCKSTEP_SERVICE"),
            "{cmd} ignores LOCKSTEP_SERVICE"
        );
    }
    let rollback = help(&["rollback"]);
    // --now is the emergency path over a rollout's nodes, bounded by --concurrency.
    assert!(rollback.contains("no canary and no batches"), "{rollback}");
    assert!(rollback.contains("--concurrency"), "{rollback}");
    // --log-format is global: accepted before or after the subcommand.
    let o = lockstep(
        "http://127.0.0.1:9",
        ADMIN_TOKEN,
        &["--log-format", "json", "status"],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
    let o = lockstep(
        "http://127.0.0.1:9",
        ADMIN_TOKEN,
        &["status", "--log-format", "json"],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
}

#[test]
fn version_shows_the_git_sha_and_the_build_date() {
    let o = Command::new(BIN).arg("--version").output().expect("run");
    assert_eq!(code(&o), 0);
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let rest = v
        .strip_prefix(concat!("lockstep ", env!("CARGO_PKG_VERSION"), " (git "))
        .unwrap_or_else(|| panic!("{v}"));
    let (sha, date) = rest
        .trim_end_matches(')')
        .split_once(", built ")
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        sha == "unknown" || (sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit())),
        "{v}"
    );
    assert!(
        time::OffsetDateTime::parse(date, &time::format_description::well_known::Rfc3339).is_ok(),
        "{v}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for (shell, marker) in [
        ("bash", "_lockstep()"),
        ("zsh", "#compdef lockstep"),
        ("fish", "complete -c lockstep"),
    ] {
        let o = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("run");
        assert_eq!(code(&o), 0, "{shell}");
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains(marker), "{shell}: {script:.200}");
        assert!(
            script.contains("history") && script.contains("rollback-on-timeout"),
            "{shell}"
        );
    }
    let o = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(code(&o), 2, "an unknown shell is a usage error");
    let o = Command::new(BIN).arg("man").output().expect("run");
    assert_eq!(code(&o), 0);
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH lockstep"),
        "{page:.300}"
    );
    assert!(
        page.contains("verify") && page.contains("LOCKSTEP_REGISTRY"),
        "{page:.300}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(code(&o), 0, "{}", text(&o));
    for page in [
        "lockstep.1",
        "lockstep-serve.1",
        "lockstep-guard.1",
        "lockstep-token-create.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page} missing");
    }
}

#[test]
fn no_colour_codes_when_output_is_redirected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), dir.path(), &[], &[("NO_COLOR", "")]);
    let o = lockstep(&s.url, ADMIN_TOKEN, &["verify", "--service", "nope"]);
    std::thread::sleep(Duration::from_millis(200));
    let logs = s.logs();
    assert!(logs.contains("INFO"), "{logs}");
    for out in [logs, text(&o)] {
        assert!(
            !out.contains('\u{1b}'),
            "ANSI escape in redirected output: {out:?}"
        );
    }
}

/// Parses any JSON and fails on an object holding one key twice.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
}
