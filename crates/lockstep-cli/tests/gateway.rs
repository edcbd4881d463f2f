//! `lockstep gateway` as a process: `--check-config`, the address printed first, SIGHUP
//! reloads that refuse a bad file and keep serving, the buffered access log (written within
//! a moment, in order with other lines, all of it at exit), SIGTERM ends it cleanly.

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

/// A `lockstep gateway` process on a free port, its stderr collected as it comes.
struct Gateway {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(config: &std::path::Path, rust_log: Option<&str>) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.args(["gateway", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        let mut child = cmd.spawn().expect("spawn");
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = lockstep_testkit::pump(child.stderr.take().expect("stderr"), stderr.clone());
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .to_string();
        Gateway {
            child,
            addr,
            stderr,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill")
                .success()
        );
    }

    /// Waits (at most `within`) until the log holds `text`.
    fn wait_for_log(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} not logged: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status and the whole log.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(r) = self.reader.take() {
            r.join().expect("reader");
        }
        (status, self.log())
    }
}

#[test]
fn gateway_prints_its_address_first_and_a_bad_reload_keeps_the_old_config() {
    let dir = tempfile::tempdir().expect("dir");
    let p = write(dir.path(), GOOD);
    let gw = Gateway::start(&p, None);
    assert!(get(&gw.addr, "/nothing").starts_with("HTTP/1.1 418"));
    write(
        dir.path(),
        "registry = \"http://127.0.0.1:1\"\n[fallback]\nstatus = 99\n",
    );
    gw.signal("-HUP");
    gw.wait_for_log("configuration refused", Duration::from_secs(5));
    assert!(gw.log().contains("fallback.status = 99"));
    assert!(
        get(&gw.addr, "/nothing").starts_with("HTTP/1.1 418"),
        "the old configuration serves"
    );
    let (status, _) = gw.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn access_lines_are_written_within_a_moment_in_order_and_none_is_lost_at_exit() {
    let dir = tempfile::tempdir().expect("dir");
    let p = write(dir.path(), GOOD);
    let gw = Gateway::start(&p, Some("info"));
    let access = |s: &str| s.matches("lockstep_gateway::access").count();
    for _ in 0..3 {
        assert!(get(&gw.addr, "/first").starts_with("HTTP/1.1 418"));
    }
    // Buffered, but written by the flusher without any further traffic.
    let deadline = Instant::now() + Duration::from_secs(3);
    while access(&gw.log()) < 3 {
        assert!(
            Instant::now() < deadline,
            "access lines not written: {}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A line that is not an access line goes out at once, after the access lines before it.
    assert!(get(&gw.addr, "/second").starts_with("HTTP/1.1 418"));
    write(dir.path(), "registry = 1\n");
    gw.signal("-HUP");
    gw.wait_for_log("configuration refused", Duration::from_secs(5));
    let log = gw.log();
    let second = log
        .find("/second")
        .unwrap_or_else(|| panic!("no access line for /second: {log}"));
    assert!(second < log.find("configuration refused").expect("refusal"));
    // Requests answered just before a clean exit are all in the log.
    for _ in 0..5 {
        assert!(get(&gw.addr, "/last").starts_with("HTTP/1.1 418"));
    }
    let (status, log) = gw.stop();
    assert!(status.success(), "{status}");
    assert_eq!(log.matches("/last").count(), 5, "{log}");
}
