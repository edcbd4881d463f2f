//! `lockstep gateway` as a process: `--check-config`, the address printed first, SIGHUP
//! reloads that refuse a bad file and keep serving, SIGTERM ends it cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

const GOOD: &str = r#"registry = "http://127.0.0.1:1"
[[routes]]
path = "/api"
service = "api"
[fallback]
status = 418
"#;

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("gateway.toml");
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn gateway_check_config_exits_0_for_a_good_file_and_2_naming_the_fault() {
    let dir = tempfile::tempdir().expect("dir");
    let p = write(dir.path(), GOOD);
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&p)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok: 1 routes"));
    let p = write(dir.path(), &GOOD.replace("\"/api\"", "\"api\""));
    let out = Command::new(BIN)
        .args(["gateway", "--check-config", "--config"])
        .arg(&p)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0].path"), "{err}");
}

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn gateway_prints_its_address_first_and_a_bad_reload_keeps_the_old_config() {
    let dir = tempfile::tempdir().expect("dir");
    let p = write(dir.path(), GOOD);
    let mut child = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0", "--config"])
        .arg(&p)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("stderr");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    assert!(get(&addr, "/nothing").starts_with("HTTP/1.1 418"));
    write(
        dir.path(),
        "registry = \"http://127.0.0.1:1\"\n[fallback]\nstatus = 99\n",
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stderr
        .lock()
        .expect("lock")
        .contains("configuration refused")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            stderr.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stderr
            .lock()
            .expect("lock")
            .contains("fallback.status = 99")
    );
    assert!(
        get(&addr, "/nothing").starts_with("HTTP/1.1 418"),
        "the old configuration serves"
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn access_lines_are_written_within_a_moment_in_order_and_none_is_lost_at_exit() {
    let dir = tempfile::tempdir().expect("dir");
    let p = write(dir.path(), GOOD);
    let mut child = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0", "--config"])
        .arg(&p)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("stderr");
    let sink = stderr.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    let access = |s: &str| s.matches("lockstep_gateway::access").count();
    for _ in 0..3 {
        assert!(get(&addr, "/first").starts_with("HTTP/1.1 418"));
    }
    // Buffered, but written by the flusher without any further traffic.
    let deadline = Instant::now() + Duration::from_secs(3);
    while access(&stderr.lock().expect("lock")) < 3 {
        assert!(
            Instant::now() < deadline,
            "access lines not written: {}",
            stderr.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A line that is not an access line goes out at once, after the access lines before it.
    assert!(get(&addr, "/second").starts_with("HTTP/1.1 418"));
    write(dir.path(), "registry = 1\n");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stderr
        .lock()
        .expect("lock")
        .contains("configuration refused")
    {
        assert!(Instant::now() < deadline, "no refusal logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let s = stderr.lock().expect("lock");
        let second = s
            .find("/second")
            .unwrap_or_else(|| panic!("no access line for /second: {s}"));
        assert!(second < s.find("configuration refused").expect("refusal"));
    }
    // Requests answered just before a clean exit are all in the log.
    for _ in 0..5 {
        assert!(get(&addr, "/last").starts_with("HTTP/1.1 418"));
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert!(child.wait().expect("wait").success());
    reader.join().expect("reader");
    let s = stderr.lock().expect("lock");
    assert_eq!(s.matches("/last").count(), 5, "{s}");
}
