//! Headless Chromium driven over WebDriver (Debian's `chromium` + `chromium-driver`), for
//! the dashboard's browser test and its benchmark: chromedriver on a free loopback port, a
//! fresh profile per run, and the flags that keep Chromium from calling home.

use fantoccini::{Client, ClientBuilder};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `name` is on `PATH`, if anywhere.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The Chromium binary: Debian's real one rather than its `/usr/bin` wrapper script (the
/// wrapper reads `/etc/chromium.d` and adds flags of its own).
pub fn chromium() -> Option<PathBuf> {
    let real = PathBuf::from("/usr/lib/chromium/chromium");
    if real.is_file() {
        return Some(real);
    }
    which("chromium").or_else(|| which("chromium-browser"))
}

/// Why the browser cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    match (chromium(), which("chromedriver")) {
        (Some(_), Some(_)) => None,
        (c, d) => Some(format!(
            "needs chromium ({}) and chromedriver ({}); .ci/browser-deps.sh installs both",
            if c.is_some() { "found" } else { "missing" },
            if d.is_some() { "found" } else { "missing" },
        )),
    }
}

/// Whether a missing browser fails the test rather than skipping it.
pub fn required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
        || std::env::var("LOCKSTEP_TEST_BROWSER").is_ok_and(|v| v == "1")
}

/// A headless Chromium session; chromedriver is killed on drop.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> Browser {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let chromium = chromium().expect("chromium");
        let port = free_port();
        let driver = Command::new(which("chromedriver").expect("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let mut builder = ClientBuilder::rustls().expect("rustls connector");
            builder.capabilities(caps.clone());
            match builder.connect(&url).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver did not start a session: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Evaluates `expr` in the page and returns its JSON value.
    pub async fn eval(&self, expr: &str) -> serde_json::Value {
        self.client
            .execute(&format!("return ({expr});"), vec![])
            .await
            .unwrap_or(serde_json::Value::Null)
    }

    /// Polls `expr` every 25 ms until it is `true`; returns how long that took, or `None`
    /// after `within`.
    pub async fn until(&self, expr: &str, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            if self.eval(expr).await == serde_json::Value::Bool(true) {
                return Some(started.elapsed());
            }
            if started.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Ends the session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The workspace's `target/` directory (for screenshots people look at).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}
