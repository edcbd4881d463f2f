//! The watcher: keeps the expected release of one service in memory and answers "am I
//! current?" with one atomic load.
//!
//! It is pushed changes over `/v1/watch` (SSE) and resumes after the last revision it saw,
//! so a registry restart loses nothing; while the stream is down it polls every `cache_ttl`
//! and retries the stream with exponential backoff and jitter; it tries every registry URL
//! in order. When no registry answers it fails open (keeps serving), for at most
//! `fail_open_for` when that is set, after which it fails closed. `LOCKSTEP_CHECK=off`
//! switches the whole check off.

use futures_util::StreamExt;
use lockstep_core::{Status, StoredRelease, instance_status, short_id};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

use crate::{ClientError, RegistryClient};

const SERVE: u8 = 0;
const STALE: u8 = 1;
const FAIL_CLOSED: u8 = 2;

/// How the watcher is set up. [`WatcherConfig::from_env`] reads the standard variables.
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    /// Registry URLs, comma-separated, in order of preference.
    pub registry: String,
    /// Bearer token (a worker token is enough).
    pub token: Option<String>,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The release this process runs.
    pub version_id: String,
    /// Component versions this process runs.
    pub components: BTreeMap<String, String>,
    /// Polling interval while the push stream is unavailable.
    pub cache_ttl: Duration,
    /// Fail closed after this long without any answer from a registry (default: never).
    pub fail_open_for: Option<Duration>,
    /// False when `LOCKSTEP_CHECK=off`: `is_current()` is always true and nothing connects.
    pub enabled: bool,
    /// First reconnect delay (doubles up to `reconnect_max`, with jitter).
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Reconnect when a stream has sent nothing (not even a keep-alive) for this long.
    pub idle_timeout: Duration,
}

/// A configuration variable with a value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// What is wrong.
    pub message: String,
}

fn var(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn duration_var(k: &'static str) -> Result<Option<Duration>, ConfigError> {
    var(k)
        .map(|v| {
            lockstep_core::parse_duration(&v).map_err(|message| ConfigError { var: k, message })
        })
        .transpose()
}

impl WatcherConfig {
    /// A configuration with defaults for everything but the identity.
    pub fn new(registry: &str, service: &str, version_id: &str) -> Self {
        WatcherConfig {
            registry: registry.to_string(),
            token: None,
            env: lockstep_core::DEFAULT_ENV.to_string(),
            service: service.to_string(),
            version_id: version_id.to_string(),
            components: BTreeMap::new(),
            cache_ttl: Duration::from_secs(5),
            fail_open_for: None,
            enabled: true,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(45),
        }
    }

    /// Reads `LOCKSTEP_REGISTRY`, `LOCKSTEP_TOKEN`, `LOCKSTEP_ENV`, `LOCKSTEP_SERVICE`,
    /// `LOCKSTEP_VERSION_ID` (default `default_version_id`, usually the baked SHA),
    /// `LOCKSTEP_CACHE_TTL`, `LOCKSTEP_FAIL_OPEN_FOR` and `LOCKSTEP_CHECK`.
    pub fn from_env(default_version_id: &str) -> Result<Self, ConfigError> {
        let service = var("LOCKSTEP_SERVICE").ok_or(ConfigError {
            var: "LOCKSTEP_SERVICE",
            message: "must name the service this worker belongs to".into(),
        })?;
        lockstep_core::validate_name("service", &service).map_err(|e| ConfigError {
            var: "LOCKSTEP_SERVICE",
            message: e.to_string(),
        })?;
        let registry = var("LOCKSTEP_REGISTRY").unwrap_or_else(|| "http://127.0.0.1:7070".into());
        let version_id =
            var("LOCKSTEP_VERSION_ID").unwrap_or_else(|| default_version_id.to_string());
        let mut c = WatcherConfig::new(&registry, &service, &version_id);
        c.token = var("LOCKSTEP_TOKEN");
        if let Some(e) = var("LOCKSTEP_ENV") {
            c.env = e;
        }
        if let Some(d) = duration_var("LOCKSTEP_CACHE_TTL")? {
            c.cache_ttl = d.max(Duration::from_millis(10));
        }
        c.fail_open_for = duration_var("LOCKSTEP_FAIL_OPEN_FOR")?;
        c.enabled = !var("LOCKSTEP_CHECK").is_some_and(|v| v.eq_ignore_ascii_case("off"));
        Ok(c)
    }
}

struct Shared {
    config: WatcherConfig,
    verdict: AtomicU8,
    status: AtomicU8,
    revision: AtomicI64,
    /// The last revision received over the push stream: where a reconnect resumes. Polls
    /// do not move it, so a resume replays every change the stream has not delivered.
    cursor: AtomicI64,
    /// Milliseconds since `epoch` of the last answer from any registry.
    last_contact_ms: AtomicU64,
    reachable: AtomicBool,
    epoch: Instant,
    expected: Mutex<Option<Arc<StoredRelease>>>,
    generation: watch::Sender<u64>,
    releases: broadcast::Sender<Arc<StoredRelease>>,
}

/// A handle to the watcher; cheap to clone. Dropping the last one stops the task.
#[derive(Clone)]
pub struct Watcher {
    shared: Arc<Shared>,
    _task: Arc<TaskGuard>,
}

struct TaskGuard(Option<tokio::task::JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

fn status_code(s: Status) -> u8 {
    match s {
        Status::Current => 0,
        Status::Draining => 1,
        Status::Stale => 2,
        Status::Missing => 3,
        Status::Unknown => 4,
    }
}

fn status_from(c: u8) -> Status {
    match c {
        0 => Status::Current,
        1 => Status::Draining,
        2 => Status::Stale,
        3 => Status::Missing,
        _ => Status::Unknown,
    }
}

impl Watcher {
    /// Starts watching (spawns a task on the current tokio runtime).
    pub fn start(config: WatcherConfig) -> Result<Watcher, ClientError> {
        let client = RegistryClient::new(&config.registry, config.token.clone())?;
        let enabled = config.enabled;
        let shared = Arc::new(Shared {
            config,
            verdict: AtomicU8::new(SERVE),
            status: AtomicU8::new(status_code(Status::Unknown)),
            revision: AtomicI64::new(0),
            cursor: AtomicI64::new(0),
            last_contact_ms: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            epoch: Instant::now(),
            expected: Mutex::new(None),
            generation: watch::channel(0).0,
            releases: broadcast::channel(256).0,
        });
        let task = if enabled {
            Some(tokio::spawn(run(shared.clone(), client)))
        } else {
            tracing::warn!("LOCKSTEP_CHECK=off: the version check is disabled");
            None
        };
        Ok(Watcher {
            shared,
            _task: Arc::new(TaskGuard(task)),
        })
    }

    /// Whether this process may serve: it runs the expected release (or one it accepts),
    /// or nothing is registered, or the registry is unreachable within the fail-open bound,
    /// or the check is off. One relaxed atomic load.
    #[inline]
    pub fn is_current(&self) -> bool {
        self.shared.verdict.load(Ordering::Relaxed) == SERVE
    }

    /// The last status learned (`unknown` before the first answer).
    pub fn status(&self) -> Status {
        status_from(self.shared.status.load(Ordering::Relaxed))
    }

    /// The expected release as last seen.
    pub fn expected(&self) -> Option<Arc<StoredRelease>> {
        self.shared.expected.lock().ok().and_then(|g| g.clone())
    }

    /// The last revision seen.
    pub fn revision(&self) -> i64 {
        self.shared.revision.load(Ordering::Relaxed)
    }

    /// Whether the last attempt to reach a registry succeeded.
    pub fn registry_reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }

    /// Seconds since a registry last answered (0 while connected); export it as a metric.
    pub fn outage_secs(&self) -> u64 {
        if self.registry_reachable() {
            return 0;
        }
        let last = self.shared.last_contact_ms.load(Ordering::Relaxed);
        (self.shared.epoch.elapsed().as_millis() as u64).saturating_sub(last) / 1000
    }

    /// The configuration in use.
    pub fn config(&self) -> &WatcherConfig {
        &self.shared.config
    }

    /// Every release pushed over the watch stream, in revision order, each once — across
    /// reconnects and registry restarts (for tests, audits and dashboards).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredRelease>> {
        self.shared.releases.subscribe()
    }

    /// Resolves when this process should stop taking work: the expected release moved away
    /// from what it runs (or the fail-open bound ran out). Job workers `select!` on it to
    /// drain and exit. Never resolves while the check is off.
    pub async fn changed(&self) {
        let mut rx = self.shared.generation.subscribe();
        loop {
            if !self.is_current() {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Feeds a release learned elsewhere (a heartbeat answer) into the watcher.
    pub fn observe(&self, release: Option<&StoredRelease>) {
        observe(&self.shared, release.cloned(), false);
    }
}

fn observe(sh: &Shared, release: Option<StoredRelease>, pushed: bool) {
    contact(sh);
    if let Some(r) = &release {
        if pushed {
            if r.revision <= sh.cursor.load(Ordering::Relaxed) {
                return;
            }
            sh.cursor.store(r.revision, Ordering::Relaxed);
            let _ = sh.releases.send(Arc::new(r.clone()));
        }
        // Never go backwards: a late answer must not undo a newer change.
        if r.revision < sh.revision.load(Ordering::Relaxed) {
            return;
        }
        sh.revision.store(r.revision, Ordering::Relaxed);
    }
    let status = instance_status(
        release.as_ref().map(|r| &r.release),
        &sh.config.version_id,
        &sh.config.components,
        false,
    );
    let verdict = match status {
        Status::Stale => STALE,
        _ => SERVE,
    };
    let old_status = status_from(sh.status.swap(status_code(status), Ordering::Relaxed));
    let old = sh.verdict.swap(verdict, Ordering::Relaxed);
    if let Ok(mut g) = sh.expected.lock() {
        *g = release.clone().map(Arc::new);
    }
    if old != verdict || old_status != status {
        let expected = sh.expected.lock().ok().and_then(|g| g.clone());
        let exp = expected
            .as_ref()
            .map(|e| short_id(&e.release.version_id).to_string())
            .unwrap_or_default();
        match status {
            Status::Stale => {
                tracing::warn!(service = %sh.config.service, running = %short_id(&sh.config.version_id),
                expected = %exp, "this instance is stale: refusing work")
            }
            s => {
                tracing::info!(service = %sh.config.service, running = %short_id(&sh.config.version_id),
                expected = %exp, status = s.as_str(), "version check")
            }
        }
        sh.generation.send_modify(|g| *g += 1);
    }
}

fn contact(sh: &Shared) {
    sh.last_contact_ms
        .store(sh.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    if !sh.reachable.swap(true, Ordering::Relaxed) {
        tracing::info!(service = %sh.config.service, "registry reachable");
    }
    if sh.verdict.load(Ordering::Relaxed) == FAIL_CLOSED {
        // Back in contact: the next answer decides; until then, serve as before the outage.
        sh.verdict.store(SERVE, Ordering::Relaxed);
        sh.generation.send_modify(|g| *g += 1);
    }
}

fn outage(sh: &Shared, why: &str) {
    if sh.reachable.swap(false, Ordering::Relaxed) {
        tracing::warn!(service = %sh.config.service, error = %why, "registry unreachable: failing open");
    }
    let Some(bound) = sh.config.fail_open_for else {
        return;
    };
    let since_contact = Duration::from_millis(
        (sh.epoch.elapsed().as_millis() as u64)
            .saturating_sub(sh.last_contact_ms.load(Ordering::Relaxed)),
    );
    if since_contact >= bound && sh.verdict.swap(FAIL_CLOSED, Ordering::Relaxed) != FAIL_CLOSED {
        tracing::error!(service = %sh.config.service, bound_secs = bound.as_secs(),
            "no registry answered within fail_open_for: failing closed");
        sh.generation.send_modify(|g| *g += 1);
    }
}

fn jitter(d: Duration) -> Duration {
    // Up to +50%, from the clock's low bits: enough to spread a fleet's reconnects.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

async fn poll(sh: &Shared, client: &RegistryClient) {
    match client.release(&sh.config.env, &sh.config.service).await {
        Ok(r) => observe(sh, r, false),
        Err(e) => outage(sh, &e.to_string()),
    }
}

async fn run(sh: Arc<Shared>, client: RegistryClient) {
    let cfg = sh.config.clone();
    let mut backoff = cfg.reconnect_min;
    loop {
        let since = match sh.cursor.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        };
        match client
            .watch(Some(&cfg.env), Some(&cfg.service), since)
            .await
        {
            Ok(stream) => {
                contact(&sh);
                if since.is_none() {
                    // No revision yet and nothing registered means no initial event: learn
                    // "unknown" now rather than at the first change.
                    poll(&sh, &client).await;
                }
                let mut stream = std::pin::pin!(stream);
                loop {
                    match tokio::time::timeout(cfg.idle_timeout, stream.next()).await {
                        Ok(Some(ev)) => {
                            contact(&sh);
                            backoff = cfg.reconnect_min;
                            if ev.event == "release" {
                                match serde_json::from_str::<StoredRelease>(&ev.data) {
                                    Ok(r) => observe(&sh, Some(r), true),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "ignoring an unreadable watch event")
                                    }
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!("watch stream idle too long; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                outage(&sh, &e.to_string());
                // The push stream is unavailable; a plain read may still work (or tell us
                // that nothing is registered).
                poll(&sh, &client).await;
            }
        }
        // Reconnect after a backoff; while the backoff is longer than cache_ttl, poll. Not
        // polling before a quick reconnect keeps the resume exact: the stream replays every
        // revision after the last one seen.
        let retry_at = Instant::now() + jitter(backoff);
        backoff = (backoff * 2).min(cfg.reconnect_max);
        loop {
            let now = Instant::now();
            if now >= retry_at {
                break;
            }
            let mut nap = cfg.cache_ttl.min(retry_at - now);
            if let Some(bound) = cfg.fail_open_for {
                nap = nap.min(bound.max(Duration::from_millis(10)));
            }
            tokio::time::sleep(nap).await;
            if Instant::now() < retry_at {
                poll(&sh, &client).await;
            }
        }
    }
}
