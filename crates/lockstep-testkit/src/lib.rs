//! Test support: a registry started in-process on `127.0.0.1:0` with a temporary SQLite
//! store ([`InProcessRegistry`]), and the real `lockstep serve` binary as a child process
//! ([`ServeProcess`]) for tests that need restarts, signals and `kill -9`.
//!
//! Nothing here is a mock: both run the production code over real sockets and real files.

use lockstep_client::RegistryClient;
use lockstep_core::Role;
use lockstep_server::{Config, Registry};
use lockstep_store::SqliteStore;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The admin token every test registry starts with.
pub const ADMIN_TOKEN: &str = "lst_test_admin_token_0123456789abcdef0123456789abcdef01234567";

/// A registry running inside the test process.
pub struct InProcessRegistry {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory (kept until drop).
    pub dir: tempfile::TempDir,
    /// The registry service behind it (to configure alerts, read state directly).
    pub service: Arc<lockstep_server::RegistryService>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessRegistry {
    /// Starts one with the default configuration.
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    /// Starts one with `config`, in a fresh temporary directory.
    pub async fn start_with(config: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, config).await
    }

    /// Starts one over an existing data directory (to test restarts in-process).
    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> Self {
        Self::start_at(dir, config, "127.0.0.1:0").await
    }

    /// Starts one over `dir` listening on `addr` (a restart on the same port).
    pub async fn start_at(dir: tempfile::TempDir, config: Config, addr: &str) -> Self {
        let store = SqliteStore::open(dir.path()).await.expect("open store");
        let registry = Registry::open(Arc::new(store), config, Some(ADMIN_TOKEN))
            .await
            .expect("open registry");
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let service = registry.service().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = registry
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await;
        });
        InProcessRegistry {
            url,
            dir,
            service,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A client presenting `token`.
    pub fn client(&self, token: &str) -> RegistryClient {
        RegistryClient::new(&self.url, Some(token.to_string())).expect("client")
    }

    /// A client with the admin token.
    pub fn admin(&self) -> RegistryClient {
        self.client(ADMIN_TOKEN)
    }

    /// Creates a token with `role` and returns its secret.
    pub async fn token(&self, name: &str, role: Role) -> String {
        self.admin()
            .create_token(name, role)
            .await
            .expect("create token")
            .token
    }

    /// Shuts down gracefully and returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for InProcessRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// `lockstep serve` as a child process.
pub struct ServeProcess {
    /// The child.
    pub child: Child,
    /// Base URL parsed from its first line of stdout.
    pub url: String,
    /// Everything it wrote on stdout so far (after the first line).
    pub stdout: Arc<Mutex<String>>,
    /// Everything it logged on stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

/// Where the `lockstep` binary is: `$LOCKSTEP_BIN`, else next to the test executable's
/// `deps/` directory (how cargo lays out `target/<profile>/`).
pub fn lockstep_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    profile_dir.join(format!("lockstep{}", std::env::consts::EXE_SUFFIX))
}

/// Copies everything `r` gives (a child's stdout or stderr) into `into`, on a thread of its
/// own, until the end of the stream; join the handle to know everything has arrived.
pub fn pump(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = into.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    })
}

impl ServeProcess {
    /// Starts `bin serve --listen 127.0.0.1:0 --data-dir DIR ARGS…` with the test admin token
    /// and waits for its `listening on` line.
    pub fn spawn(bin: &Path, data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("LOCKSTEP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn lockstep serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stderr.take().expect("stderr"), stderr.clone());
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let rest = stdout.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out);
            let mut first = String::new();
            let _ = lines.read_line(&mut first);
            let _ = tx.send(first);
            let mut buf = String::new();
            while lines.read_line(&mut buf).map(|n| n > 0).unwrap_or(false) {
                if let Ok(mut s) = rest.lock() {
                    s.push_str(&buf);
                }
                buf.clear();
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let log = stderr.lock().map(|s| s.clone()).unwrap_or_default();
                panic!("serve did not print its address; first line {first:?}; stderr:\n{log}")
            })
            .to_string();
        ServeProcess {
            child,
            url,
            stdout,
            stderr,
        }
    }

    /// A client presenting `token`.
    pub fn client(&self, token: &str) -> RegistryClient {
        RegistryClient::new(&self.url, Some(token.to_string())).expect("client")
    }

    /// Sends a signal by name (`TERM`, `KILL`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name} failed");
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (at most `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything logged on stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh, empty PostgreSQL schema on `$LOCKSTEP_TEST_PG`, as a store URL that selects
/// it (for `PgStore::connect` and `lockstep serve --store`). `None`, with the reason
/// printed, when the variable is unset: tests that need PostgreSQL then skip.
pub async fn fresh_pg_url() -> Option<String> {
    let Ok(base) = std::env::var("LOCKSTEP_TEST_PG") else {
        println!("skipping: LOCKSTEP_TEST_PG is not set");
        return None;
    };
    Some(
        lockstep_store::postgres::fresh_schema_url(&base)
            .await
            .expect("create a fresh schema on LOCKSTEP_TEST_PG"),
    )
}

/// `$LOCKSTEP_TEST_REDIS`, or `None` with the reason printed.
pub fn redis_url() -> Option<String> {
    match std::env::var("LOCKSTEP_TEST_REDIS") {
        Ok(u) => Some(u),
        Err(_) => {
            println!("skipping: LOCKSTEP_TEST_REDIS is not set");
            None
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `within`; returns the
/// value and how long it took, or `None` when time ran out.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next named event of an SSE stream (skipping the empty items that mark keep-alives
/// and partial chunks), or `None` when the stream ends or nothing arrives `within`.
pub async fn next_event<S>(
    stream: &mut S,
    within: Duration,
) -> Option<lockstep_client::sse::SseEvent>
where
    S: futures_util::Stream<Item = lockstep_client::sse::SseEvent> + Unpin,
{
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .ok()??;
        if !ev.event.is_empty() {
            return Some(ev);
        }
    }
}
