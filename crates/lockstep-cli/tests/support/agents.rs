//! The update-agent harness the agent and rollout tests share: real `lockstep agent`
//! processes on loopback, each supervising a trivial Python worker shipped inside every
//! release; signed packages of such releases; byte-for-byte snapshots of a release tree.
//!
//! Each test binary uses part of it, so unused items are expected here.
#![allow(dead_code)]

use lockstep_agent::AgentClient;
use lockstep_package::{CreateOptions, SigningKey, sign};
use lockstep_testkit::lockstep_bin;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub const TOKEN: &str = "agent-test-token-0123456789";

/// Healthy when the release has a `healthy` file and the node's root has no
/// `sick-<VERSION>` file (so one package can fail on chosen nodes only).
pub const WORKER: &str = r#"
import http.server, os, sys, threading, time
port = int(sys.argv[1]); parent = os.getppid()
version = open('VERSION').read().strip()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path != '/health' or (os.path.exists('healthy') and not os.path.exists('../../sick-' + version))
        self.send_response(200 if ok else 500); self.end_headers()
        self.wfile.write(version.encode() if ok else b'sick')
    def log_message(self, *a): pass
http.server.HTTPServer.allow_reuse_address = True
srv = http.server.HTTPServer(('127.0.0.1', port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
# Exit with the agent, even when it was killed with SIGKILL — also when that happened
# before this line ran (then the parent is already whoever adopts orphans).
def agent_alive():
    try: return os.getppid() == parent and open('/proc/%d/comm' % parent).read().strip() == 'lockstep'
    except OSError: return False
while agent_alive(): time.sleep(0.05)
"#;

pub struct AgentProc {
    pub child: Child,
    pub url: String,
    pub stderr: Arc<Mutex<String>>,
    /// The thread copying standard error; done once every writer of it has exited.
    pump: std::thread::JoinHandle<()>,
}

impl AgentProc {
    pub fn spawn(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> AgentProc {
        let mut cmd = Command::new(lockstep_bin());
        cmd.arg("agent")
            .arg("--root")
            .arg(root)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("LOCKSTEP_AGENT_TOKEN")
            .env_remove(lockstep_agent::CRASH_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn lockstep agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pump = lockstep_testkit::pump(child.stderr.take().expect("stderr"), stderr.clone());
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(out).read_line(&mut first);
            let _ = tx.send(first);
        });
        let first = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(url) = first.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let log = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            panic!("agent did not start; first line {first:?}; stderr:\n{log}");
        };
        AgentProc {
            url: url.to_string(),
            child,
            stderr,
            pump,
        }
    }

    pub fn client(&self) -> AgentClient {
        AgentClient::new(&self.url, Some(TOKEN.into()))
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL if it is still there after 6 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself (the crash hook) and returns its signal.
    pub fn wait_dead(&mut self) -> Option<i32> {
        for _ in 0..1500 {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Its last lines may still be in the pipe: wait for the copy to reach
                // the end (the worker it supervised holds the pipe too, for ≤ 50 ms).
                let mut copied = false;
                for _ in 0..250 {
                    if self.pump.is_finished() {
                        copied = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !copied {
                    // Not fatal here (the caller's assertions on the logs will tell), but a
                    // test that then fails on a missing line should say why.
                    eprintln!(
                        "the agent's stderr was still open 5 s after it died: its last lines may be missing"
                    );
                }
                return st.signal();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent did not die; logs:\n{}", self.logs());
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port for a worker, never handed out twice in this process and below the kernel's
/// ephemeral range. Why: a port taken from `127.0.0.1:0` and released can be handed out
/// again while a worker restarts; then two fleets' workers share a port, and one node's
/// health check is answered by another test's healthy worker (a sick node "passed").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        // Offset by the pid: test processes that run one after another start apart.
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id();
        let port = u16::try_from(20_000 + n % 12_000).expect("port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A release tree: the worker, its VERSION, `healthy` unless told otherwise, an executable
/// and enough files that "half unpacked" is a real state.
pub fn release_tree(dir: &Path, version: &str, healthy: bool) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    std::fs::write(dir.join("worker.py"), WORKER).expect("write");
    std::fs::write(dir.join("VERSION"), version).expect("write");
    if healthy {
        std::fs::write(dir.join("healthy"), "yes").expect("write");
    }
    std::fs::write(dir.join("bin/tool"), format!("#!/bin/sh\necho {version}\n")).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    for i in 0..20 {
        std::fs::write(
            dir.join(format!("data/file-{i:02}")),
            format!("{version} {i} ").repeat(200),
        )
        .expect("write");
    }
}

pub struct Pkg {
    pub src: PathBuf,
    pub file: PathBuf,
    pub sig: PathBuf,
}

pub fn package(work: &Path, key: &SigningKey, version: &str, healthy: bool) -> Pkg {
    let src = work.join(format!("src-{version}"));
    release_tree(&src, version, healthy);
    let file = work.join(format!("{version}.tar.gz"));
    let opts = CreateOptions {
        service: "api".into(),
        version: version.into(),
        version_id: Some(format!("id-{version}")),
        git_sha: Some(format!("sha-{version}")),
        components: [("translator".to_string(), version.to_string())].into(),
        ..CreateOptions::default()
    };
    lockstep_package::create(&src, &opts, &file).expect("create");
    let sig = sign::sign_file(key, &file).expect("sign");
    let sig_path = sign::sig_path(&file);
    std::fs::write(&sig_path, sig.to_bytes()).expect("sig");
    Pkg {
        src,
        file,
        sig: sig_path,
    }
}

pub fn keypair(work: &Path) -> (SigningKey, PathBuf) {
    let key = sign::generate().expect("key");
    let path = work.join("release-key");
    let public = sign::write_keypair(&key, &path).expect("write");
    (key, public)
}

/// Every file (contents) and link (target) under `dir`, without the manifest.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(base).expect("rel").display().to_string();
            let meta = p.symlink_metadata().expect("meta");
            if meta.is_dir() {
                walk(base, &p, out);
            } else if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).expect("link");
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else if rel != "lockstep-manifest.json" {
                use std::os::unix::fs::PermissionsExt;
                let mut body = std::fs::read(&p).expect("read");
                body.extend(format!(" mode {:o}", meta.permissions().mode() & 0o111).bytes());
                out.insert(rel, body);
            }
        }
    }
    let mut out = BTreeMap::new();
    let real = std::fs::canonicalize(dir).expect("canonical");
    walk(&real, &real, &mut out);
    out
}

pub fn current_id(root: &Path) -> String {
    std::fs::read_link(root.join("current"))
        .expect("current is a symlink")
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned()
}
