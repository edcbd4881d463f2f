//! `lockstep guard` with real child processes: the startup guards, exit-code pass-through,
//! signal forwarding, heartbeats on the child's behalf, and stopping a child that became
//! stale.

use lockstep_api::PutRelease;
use lockstep_core::Release;
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn guard(envs: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("guard").args(args);
    for k in [
        "LOCKSTEP_ENV",
        "APP_ENV",
        "NODE_ENV",
        "GIT_SHA",
        "EXPECTED_GIT_SHA",
        "LOCKSTEP_EXPECTED_VERSION",
        "LOCKSTEP_VERSION_ID",
        "LOCKSTEP_SERVICE",
    ] {
        c.env_remove(k);
    }
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

fn run(envs: &[(&str, &str)], args: &[&str]) -> Output {
    guard(envs, args).output().expect("run guard")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn production_with_equal_shas_runs_the_child_and_passes_its_exit_code_through() {
    let o = run(
        &[
            ("LOCKSTEP_ENV", "production"),
            ("GIT_SHA", SHA),
            ("EXPECTED_GIT_SHA", SHA),
        ],
        &["--", "sh", "-c", "echo child ran; exit 3"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("child ran"));
    let o = run(
        &[
            ("APP_ENV", "production"),
            ("GIT_SHA", SHA),
            ("EXPECTED_GIT_SHA", &SHA[..7]),
        ],
        &["--", "true"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "a short expected SHA matches: {}",
        text(&o)
    );
}

#[test]
fn production_with_a_mismatch_exits_78_before_the_child_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    let o = run(
        &[
            ("NODE_ENV", "production"),
            ("GIT_SHA", SHA),
            ("EXPECTED_GIT_SHA", "ffffffffffff"),
        ],
        &["--", "sh", "-c", &script],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("[version] FATAL:"), "{}", text(&o));
    assert!(!marker.exists(), "the child never ran");
    let o = run(
        &[
            ("LOCKSTEP_ENV", "production"),
            ("LOCKSTEP_VERSION_ID", "v1"),
            ("GIT_SHA", SHA),
            ("LOCKSTEP_EXPECTED_VERSION", "v2"),
        ],
        &["--", "sh", "-c", &script],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(!marker.exists());
}

#[test]
fn production_with_an_unknown_sha_exits_78() {
    let o = run(&[("LOCKSTEP_ENV", "production")], &["--", "true"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("unknown"), "{}", text(&o));
    let o = run(
        &[("LOCKSTEP_ENV", "production"), ("GIT_SHA", "unknown")],
        &["--", "true"],
    );
    assert_eq!(o.status.code(), Some(78));
}

#[test]
fn development_with_a_mismatch_warns_and_runs() {
    let o = run(
        &[("GIT_SHA", SHA), ("EXPECTED_GIT_SHA", "ffffffffffff")],
        &["--", "sh", "-c", "echo child ran"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("[version] WARNING:") && text(&o).contains("child ran"),
        "{}",
        text(&o)
    );
}

#[test]
fn guard_refuses_in_production_when_the_registry_expects_another_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), dir.path(), &[], &[]);
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v2"),
            force: false,
        },
    ))
    .expect("register");
    let o = run(
        &[
            ("LOCKSTEP_ENV", "production"),
            ("GIT_SHA", SHA),
            ("LOCKSTEP_REGISTRY", &s.url),
            ("LOCKSTEP_TOKEN", ADMIN_TOKEN),
        ],
        &["--service", "jobs", "--version-id", "v1", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("is not the expected"), "{}", text(&o));
}

fn start_stale_scenario(
    on_stale: &str,
    child_script: &str,
) -> (tempfile::TempDir, ServeProcess, Child) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), &dir.path().join("data"), &[], &[]);
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v1"),
            force: false,
        },
    ))
    .expect("register v1");
    let child = guard(
        &[
            ("GIT_SHA", SHA),
            ("LOCKSTEP_REGISTRY", &s.url),
            ("LOCKSTEP_TOKEN", ADMIN_TOKEN),
        ],
        &[
            "--service",
            "jobs",
            "--version-id",
            "v1",
            "--on-stale",
            on_stale,
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            child_script,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn guard");
    (dir, s, child)
}

fn instance_count(s: &ServeProcess) -> usize {
    let r = rt()
        .block_on(s.client(ADMIN_TOKEN).status(None, Some("jobs")))
        .expect("status");
    r.environments
        .iter()
        .flat_map(|e| &e.services)
        .map(|s| s.instances.len())
        .sum()
}

fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guard_stops_a_child_that_became_stale_and_exits_1() {
    let (dir, s, mut g) = start_stale_scenario("exit", "exec sleep 30");
    let _ = dir;
    wait_for(
        "the instance heartbeats on the child's behalf",
        Duration::from_secs(10),
        || instance_count(&s) == 1,
    );
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v2"),
            force: false,
        },
    ))
    .expect("register v2");
    let st = wait_exit(&mut g, Duration::from_secs(10)).expect("guard exits after the deploy");
    assert_eq!(st.code(), Some(1));
    wait_for("deregistered", Duration::from_secs(5), || {
        instance_count(&s) == 0
    });
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "trap '' TERM; echo $$ > {}; while true; do sleep 0.1; done",
        pidfile.display()
    );
    let (_d, s, mut g) = start_stale_scenario("exit", &script);
    wait_for("child started", Duration::from_secs(10), || {
        pidfile.exists() && instance_count(&s) == 1
    });
    let child_pid = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .to_string();
    let t0 = Instant::now();
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v2"),
            force: false,
        },
    ))
    .expect("register v2");
    let st = wait_exit(&mut g, Duration::from_secs(10)).expect("guard exits");
    assert_eq!(st.code(), Some(1));
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited the grace period first"
    );
    let alive = Command::new("kill")
        .args(["-0", &child_pid])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(!alive, "the child was killed");
}

#[test]
fn on_stale_warn_keeps_the_child_running() {
    let (_d, s, mut g) = start_stale_scenario("warn", "sleep 3; exit 0");
    wait_for("heartbeating", Duration::from_secs(10), || {
        instance_count(&s) == 1
    });
    rt().block_on(s.client(ADMIN_TOKEN).put_release(
        "production",
        "jobs",
        &PutRelease {
            release: Release::new("v2"),
            force: false,
        },
    ))
    .expect("register v2");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        matches!(g.try_wait(), Ok(None)),
        "still running after the deploy"
    );
    let st = wait_exit(&mut g, Duration::from_secs(10)).expect("child finishes on its own");
    assert_eq!(st.code(), Some(0), "the child's own exit code");
    let mut err = String::new();
    if let Some(mut e) = g.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(err.contains("is expected now"), "{err}");
}

#[test]
fn sigterm_to_the_guard_is_forwarded_to_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("got-term");
    let script = format!(
        "trap 'touch {}; exit 0' TERM; while true; do sleep 0.1; done",
        marker.display()
    );
    let mut g = guard(&[("GIT_SHA", SHA)], &["--", "sh", "-c", &script])
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &g.id().to_string()])
        .status()
        .expect("kill");
    let st = wait_exit(&mut g, Duration::from_secs(10)).expect("exits");
    assert_eq!(
        st.code(),
        Some(0),
        "the child's exit code after it handled TERM"
    );
    assert!(marker.exists(), "the child received SIGTERM");
}

/// A TCP server that answers every request with `response` (a whole HTTP/1.1 answer):
/// something at the registry URL that is not a lockstep registry.
fn not_a_registry(response: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten().take(50) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(response.as_bytes());
        }
    });
    url
}

const HTML_404: &str = "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 22\r\nConnection: close\r\n\r\n<h1>Not Found</h1>\r\n\r\n";

fn registry_with(services: &[(&str, &str)]) -> (tempfile::TempDir, ServeProcess) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ServeProcess::spawn(Path::new(BIN), dir.path(), &[], &[]);
    for (svc, v) in services {
        rt().block_on(s.client(ADMIN_TOKEN).put_release(
            "production",
            svc,
            &PutRelease {
                release: Release::new(*v),
                force: false,
            },
        ))
        .expect("register");
    }
    (dir, s)
}

#[test]
fn explicit_env_production_with_a_mismatched_sha_exits_78_and_never_starts_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    // No LOCKSTEP_ENV, APP_ENV or NODE_ENV: only the flag says production.
    let o = run(
        &[
            ("GIT_SHA", "abc1234"),
            ("EXPECTED_GIT_SHA", "def5678"),
            ("LOCKSTEP_REGISTRY", "http://127.0.0.1:9"),
        ],
        &[
            "--env",
            "production",
            "--service",
            "extractor",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(
        text(&o).contains("differs from EXPECTED_GIT_SHA") && text(&o).contains("--env production"),
        "{}",
        text(&o)
    );
    assert!(!marker.exists(), "the child never ran");
    // The same through LOCKSTEP_ENV, which fills --env.
    let o = run(
        &[
            ("GIT_SHA", "abc1234"),
            ("EXPECTED_GIT_SHA", "def5678"),
            ("LOCKSTEP_ENV", "production"),
        ],
        &["--", "sh", "-c", &script],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(!marker.exists());
}

#[test]
fn version_id_without_git_sha_runs_in_production() {
    let o = run(
        &[],
        &[
            "--env",
            "production",
            "--version-id",
            "3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f",
            "--",
            "sh",
            "-c",
            "echo \"child ran as $LOCKSTEP_VERSION_ID\"",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("child ran as 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("FATAL"), "{}", text(&o));
}

#[test]
fn an_unknown_release_is_explained_for_any_language() {
    let o = run(&[], &["--env", "production", "--", "true"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("GIT_SHA") && t.contains("--version-id"), "{t}");
    assert!(
        !t.contains("lockstep_build"),
        "no Rust build advice for a wrapped worker: {t}"
    );
    // Outside production the same finding warns, says so, and the worker runs.
    let o = run(&[], &["--", "sh", "-c", "echo child ran"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("(allowed outside production)") && text(&o).contains("child ran"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_registry_that_refuses_the_token_refuses_in_production_and_warns_in_development() {
    let (_d, s) = registry_with(&[("jobs", "v1")]);
    let args = [
        "--service",
        "jobs",
        "--version-id",
        "v1",
        "--",
        "sh",
        "-c",
        "echo child ran",
    ];
    for (token, says) in [
        ("", "LOCKSTEP_TOKEN"),
        ("lst_not_a_token", "does not accept this token"),
    ] {
        let mut envs = vec![
            ("LOCKSTEP_REGISTRY", s.url.as_str()),
            ("LOCKSTEP_ENV", "production"),
        ];
        if !token.is_empty() {
            envs.push(("LOCKSTEP_TOKEN", token));
        }
        let o = run(&envs, &args);
        assert_eq!(o.status.code(), Some(78), "{}", text(&o));
        assert!(text(&o).contains(says), "{}", text(&o));
        assert!(!text(&o).contains("child ran"), "{}", text(&o));
        assert!(!text(&o).contains("starting anyway"), "{}", text(&o));
        // Development: a warning, and the worker runs.
        envs.retain(|(k, _)| *k != "LOCKSTEP_ENV");
        let o = run(&envs, &args);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(
            text(&o).contains("[version] WARNING:") && text(&o).contains("child ran"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn a_misspelled_service_is_refused_in_production_naming_the_known_ones() {
    let (_d, s) = registry_with(&[("extractor", "v1"), ("api", "v7")]);
    let worker = rt()
        .block_on(
            s.client(ADMIN_TOKEN)
                .create_token("workers", lockstep_core::Role::Worker),
        )
        .expect("token")
        .token;
    let envs = [
        ("LOCKSTEP_REGISTRY", s.url.as_str()),
        ("LOCKSTEP_TOKEN", worker.as_str()),
        ("LOCKSTEP_ENV", "production"),
    ];
    let args = [
        "--service",
        "extractr",
        "--version-id",
        "v1",
        "--",
        "sh",
        "-c",
        "echo child ran",
    ];
    let o = run(&envs, &args);
    assert_eq!(
        o.status.code(),
        Some(78),
        "a worker token is enough to tell: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("extractr") && text(&o).contains("api, extractor"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("child ran"));
    // Outside production: said loudly, with the names, and the worker runs.
    let o = run(&envs[..2], &args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("[version] WARNING:") && text(&o).contains("api, extractor"),
        "{}",
        text(&o)
    );
    // The right name passes.
    let o = run(
        &envs,
        &["--service", "extractor", "--version-id", "v1", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn an_unreachable_registry_does_not_block_the_worker_even_in_production() {
    let o = run(
        &[
            ("LOCKSTEP_ENV", "production"),
            ("LOCKSTEP_REGISTRY", "http://127.0.0.1:9"),
            ("LOCKSTEP_TOKEN", ADMIN_TOKEN),
        ],
        &[
            "--service",
            "jobs",
            "--version-id",
            "v1",
            "--",
            "sh",
            "-c",
            "exit 5",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(5),
        "the child's own code: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("connection refused") && text(&o).contains("starting anyway"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_url_that_is_not_a_registry_refuses_in_production() {
    let url = not_a_registry(HTML_404);
    let o = run(
        &[
            ("LOCKSTEP_ENV", "production"),
            ("LOCKSTEP_REGISTRY", &url),
            ("LOCKSTEP_TOKEN", ADMIN_TOKEN),
        ],
        &["--service", "jobs", "--version-id", "v1", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(
        text(&o).contains("does not answer like a lockstep registry"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_missing_command_exits_127_and_a_non_executable_one_126() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(&[("GIT_SHA", SHA)], &["--", "./missing-worker"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(
        text(&o).contains("./missing-worker: not found"),
        "{}",
        text(&o)
    );
    let plain = dir.path().join("worker.sh");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").expect("write");
    let o = run(&[("GIT_SHA", SHA)], &["--", plain.to_str().unwrap_or("")]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
}

#[test]
fn a_development_runner_in_production_exits_78_before_the_child_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("child-ran");
    let touch = format!("touch {}", marker.display());
    let runners: &[&[&str]] = &[
        &["npx", "tsx", "worker.ts"],
        &["npx", "--yes", "ts-node", "worker.ts"],
        &["npm", "exec", "--", "nodemon", "worker.js"],
        &["pnpm", "dlx", "vite-node", "worker.ts"],
        &["tsx", "worker.ts"],
        &["cargo", "run", "--release"],
        &["go", "run", "./cmd/worker"],
        &["node", "--import", "tsx", "worker.ts"],
        &["sh", "-c", &format!("{touch}; exec npx tsx worker.ts")],
    ];
    for cmd in runners {
        let mut args = vec!["--env", "production", "--version-id", SHA, "--"];
        args.extend_from_slice(cmd);
        let o = run(&[], &args);
        assert_eq!(o.status.code(), Some(78), "{cmd:?}: {}", text(&o));
        assert!(
            text(&o).contains("[version] FATAL:") && text(&o).contains("development runner"),
            "{cmd:?}: {}",
            text(&o)
        );
        assert!(!marker.exists(), "{cmd:?}: the child started");
    }
    // Outside production it only warns, and the child runs.
    let o = run(
        &[],
        &[
            "--version-id",
            SHA,
            "--",
            "sh",
            "-c",
            &format!("{touch}; true || npx tsx w.ts"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("[version] WARNING:"), "{}", text(&o));
    assert!(marker.exists());
}

#[test]
fn allow_dev_runner_runs_the_child_in_production_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A stand-in named like the runner, so nothing is fetched or compiled.
    let tsx = dir.path().join("tsx");
    std::fs::write(&tsx, "#!/bin/sh\necho fake tsx ran \"$@\"\n").expect("write");
    std::fs::set_permissions(&tsx, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let tsx = tsx.display().to_string();
    let refused = run(
        &[],
        &[
            "--env",
            "production",
            "--version-id",
            SHA,
            "--",
            &tsx,
            "w.ts",
        ],
    );
    assert_eq!(refused.status.code(), Some(78), "{}", text(&refused));
    assert!(!text(&refused).contains("fake tsx ran"));
    let o = run(
        &[],
        &[
            "--env",
            "production",
            "--version-id",
            SHA,
            "--allow-dev-runner",
            "--",
            &tsx,
            "w.ts",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("fake tsx ran w.ts"), "{}", text(&o));
    assert!(
        text(&o).contains("allowed by --allow-dev-runner"),
        "the override is logged: {}",
        text(&o)
    );
}

#[test]
fn a_worker_guarded_with_a_sha_version_id_and_build_date_is_mirrored_with_them() {
    let Some(redis) = lockstep_testkit::redis_url() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("lsguard{}", std::process::id());
    let s = ServeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--redis-mirror", &redis, "--redis-prefix", &prefix],
        &[],
    );
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let mut g = guard(
        &[
            ("BUILD_DATE", "2026-11-01T12:00:00Z"),
            ("LOCKSTEP_REGISTRY", &s.url),
            ("LOCKSTEP_TOKEN", ADMIN_TOKEN),
        ],
        &[
            "--service",
            "jobs",
            "--version-id",
            SHA,
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn guard");
    let key = format!("{prefix}:worker:jobs:version");
    let read = || -> std::collections::BTreeMap<String, String> {
        rt().block_on(async {
            let client = redis::Client::open(redis.as_str()).expect("url");
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut c)
                .await
                .expect("hgetall")
        })
    };
    wait_for(
        "the guarded worker is mirrored",
        Duration::from_secs(15),
        || pid_file.exists() && read().contains_key("gitSha"),
    );
    let fields = read();
    let child_pid = std::fs::read_to_string(&pid_file).expect("pid");
    let _ = g.kill();
    let _ = g.wait();
    assert_eq!(fields["gitSha"], SHA, "{fields:?}");
    assert_eq!(fields["buildDate"], "2026-11-01T12:00:00Z", "{fields:?}");
    assert_eq!(fields["pid"], child_pid.trim(), "{fields:?}");
    rt().block_on(async {
        let client = redis::Client::open(redis.as_str()).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut c)
            .await
            .expect("del");
    });
}
