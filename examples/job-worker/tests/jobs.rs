//! The job-worker example as a real process: it checks its release before every job and,
//! once it learns a deploy moved past it, processes nothing more and exits to be replaced.

use lockstep_api::PutRelease;
use lockstep_core::Release;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_job-worker");

fn release(id: &str) -> PutRelease {
    PutRelease {
        release: Release::new(id),
        force: false,
    }
}

fn command(reg: &InProcessRegistry, version: &str) -> Command {
    let mut c = Command::new(WORKER);
    c.env("LOCKSTEP_REGISTRY", &reg.url)
        .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
        .env("LOCKSTEP_SERVICE", "extractor")
        .env("LOCKSTEP_VERSION_ID", version)
        .env_remove("LOCKSTEP_ENV")
        .stderr(Stdio::null());
    c
}

#[tokio::test]
async fn the_job_worker_processes_no_job_after_it_learned_it_is_stale() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "extractor", &release("v1"))
        .await
        .expect("v1");
    let mut child = command(&reg, "v1")
        .args(["--jobs", "100000", "--interval", "5ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 20 {
        lines.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("jobs are processed"),
        );
    }
    reg.admin()
        .put_release("production", "extractor", &release("v2"))
        .await
        .expect("v2");
    let deployed = Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    lines.extend(rx.try_iter());
    let drain_at = lines
        .iter()
        .position(|(_, l)| l.starts_with("draining"))
        .expect("a draining line");
    assert_eq!(
        drain_at,
        lines.len() - 1,
        "nothing after draining: {:?}",
        &lines[drain_at..]
    );
    let after_deploy = lines[..drain_at]
        .iter()
        .filter(|(t, _)| *t > deployed)
        .count();
    assert!(
        after_deploy <= 50,
        "{after_deploy} jobs after the deploy (5 ms each): it should stop within ~250 ms"
    );
    assert!(
        lines[..drain_at]
            .iter()
            .all(|(_, l)| l.starts_with("processed job-") && l.ends_with(" on v1"))
    );
    let r = reg
        .admin()
        .status(None, Some("extractor"))
        .await
        .expect("status");
    assert!(
        r.environments[0].services[0].instances.is_empty(),
        "it deregistered on the way out"
    );
}

#[tokio::test]
async fn a_job_worker_started_on_a_stale_release_takes_no_job_at_all() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "extractor", &release("v2"))
        .await
        .expect("v2");
    let mut child = command(&reg, "v1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    // Give it time to learn, then offer work.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = writeln!(stdin, "job-a\njob-b");
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("processed"), "{text}");
    assert!(text.contains("draining"), "{text}");
}

#[tokio::test]
async fn a_current_job_worker_processes_its_queue_from_stdin() {
    let reg = InProcessRegistry::start().await;
    reg.admin()
        .put_release("production", "extractor", &release("v1"))
        .await
        .expect("v1");
    let mut child = command(&reg, "v1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = writeln!(stdin, "a\nb\nc");
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "processed a on v1",
            "processed b on v1",
            "processed c on v1"
        ]
    );
}
