//! `lockstep demo` end to end: it needs the example worker binary next to `lockstep`, so the
//! test builds it first (cargo does not build other packages' binaries for this one's tests).

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

#[test]
fn the_demo_shows_a_stale_worker_refused_and_recovered_in_under_30_seconds() {
    let built = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "axum-worker"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(built.success(), "building the example worker");
    let t0 = Instant::now();
    let o = Command::new(BIN).arg("demo").output().expect("run demo");
    let took = t0.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(out.contains("GET worker-c → 503 Service Unavailable (Retry-After: 5) {\"error\":\"service_unavailable\"}"), "{out}");
    assert!(out.contains("[STALE] demo-api worker-c"), "{out}");
    let recovery = out.split("Recover").nth(1).unwrap_or("");
    assert!(
        recovery.contains("GET worker-c → 200 OK") && !recovery.contains("[STALE]"),
        "{out}"
    );
}
