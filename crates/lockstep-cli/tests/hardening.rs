//! The real `lockstep serve` under conditions a single request cannot show: restarts with a
//! revoked bootstrap token, and the bound on open connections.

use lockstep_core::Role;
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_bootstrap_token_stays_revoked_across_restarts_until_a_new_one_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = ServeProcess::spawn(Path::new(BIN), dir.path(), &[], &[]);
    let ops_token = serve
        .client(ADMIN_TOKEN)
        .create_token("ops", Role::Admin)
        .await
        .expect("second admin")
        .token;
    serve
        .client(&ops_token)
        .revoke_token("admin")
        .await
        .expect("revoke the bootstrap token");
    assert!(serve.terminate(Duration::from_secs(10)).is_some());

    // Same LOCKSTEP_ADMIN_TOKEN on restart: it stays revoked, and the log says how to recover.
    let mut serve = ServeProcess::spawn(Path::new(BIN), dir.path(), &[], &[]);
    assert_eq!(
        serve
            .client(ADMIN_TOKEN)
            .list_tokens()
            .await
            .expect_err("revoked")
            .status(),
        Some(401)
    );
    serve
        .client(&ops_token)
        .list_tokens()
        .await
        .expect("ops works");
    let logs = serve.logs();
    assert!(
        logs.contains("stays revoked") && logs.contains("set LOCKSTEP_ADMIN_TOKEN to a new"),
        "{logs}"
    );
    assert!(serve.terminate(Duration::from_secs(10)).is_some());

    // A new secret is the documented recovery, and it is logged.
    let fresh = "lst_recovered_admin_token_00000000000000000000000000000000000000";
    let serve = ServeProcess::spawn(
        Path::new(BIN),
        dir.path(),
        &[],
        &[("LOCKSTEP_ADMIN_TOKEN", fresh)],
    );
    serve.client(fresh).list_tokens().await.expect("recovered");
    assert!(serve.logs().contains("bootstrap admin token installed"));
}

/// Sends a request on a new connection and waits at most `within` for the status line.
fn status_line(addr: &str, within: Duration) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()?
            .to_string(),
    )
}

#[test]
fn at_the_connection_limit_new_connections_wait_and_the_log_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = ServeProcess::spawn(
        Path::new(BIN),
        dir.path(),
        &["--max-connections", "20"],
        &[],
    );
    let addr = serve.url.trim_start_matches("http://").to_string();
    // 20 idle connections (a request's headers never sent) take every slot.
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        status_line(&addr, Duration::from_secs(1)),
        None,
        "the 21st connection is not served while 20 are open"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serve.logs().contains("connection limit reached") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        serve.logs().contains("connection limit reached"),
        "{}",
        serve.logs()
    );
    drop(held);
    let line = status_line(&addr, Duration::from_secs(5)).expect("served once slots free up");
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
}
