//! `lockstep demo` end to end, as someone who installed only the `lockstep` binary runs it:
//! a copy of the binary alone in an empty directory, started from another one.

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

#[test]
fn the_demo_runs_with_only_the_lockstep_binary_and_shows_a_stale_worker_refused_and_recovered() {
    let alone = tempfile::tempdir().expect("tempdir");
    let bin = alone.path().join("lockstep");
    std::fs::copy(BIN, &bin).expect("copy the binary");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let o = Command::new(&bin)
        .arg("demo")
        .current_dir(elsewhere.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("run demo");
    let took = t0.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        out.starts_with("\n1. A registry on http://127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("GET worker-c → 503 Service Unavailable (Retry-After: 5) {\"error\":\"service_unavailable\"}"), "{out}");
    assert!(out.contains("[STALE] demo-api worker-c"), "{out}");
    let recovery = out.split("Recover").nth(1).unwrap_or("");
    assert!(
        recovery.contains("GET worker-c → 200 OK") && !recovery.contains("[STALE]"),
        "{out}"
    );
    assert!(err.trim().is_empty(), "nothing on stderr: {err}");
    assert_eq!(
        std::fs::read_dir(alone.path())
            .map(|d| d.count())
            .unwrap_or(0),
        1,
        "nothing but the binary was needed or left behind"
    );
}
