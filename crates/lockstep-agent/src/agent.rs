//! The agent's behaviour without HTTP: uploads kept until applied, the apply as named
//! steps with the state on disk after each, rollback, recovery on start, retention and
//! heartbeats.
//!
//! Layout under `--root`:
//! - `releases/<version_id>/` — installed releases; all but `current` are the backups;
//! - `current` → `releases/<version_id>` — switched by rename, never edited in place;
//! - `uploads/<X-Update-Version>/` — verified packages waiting for an apply;
//! - `staging/` — where archives are unpacked, and the only place they are unpacked;
//! - `state.json` — [`State`], rewritten atomically after every step.
//!
//! **Architecture Invariant:** `current` always names a complete release. A release is
//! renamed into `releases/` only after every file was unpacked, checked and synced; the
//! symlink is switched only after that rename is durable. A crash at any step therefore
//! leaves the old or the new release in place, and [`Agent::recover`] reads the step
//! reached to finish or undo the rest.

use lockstep_client::{HeartbeatTask, RegistryClient};
use lockstep_package::{Expect, Limits, Manifest, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::fsutil;
use crate::state::{ApplyProgress, ReleaseMeta, State, Step, now};
use crate::worker::{Worker, WorkerMode, health_check};
use crate::{AgentError, short_id};

/// The test hook: `LOCKSTEP_AGENT_CRASH_AT=<point>` makes the agent SIGKILL itself at that
/// point of an apply, so the crash test stops it at each step rather than once at random.
/// Points: the [`Step`] names (right after that step's state is on disk), `unpacking`
/// (half the files written) and `switching` (the new link exists under its temporary
/// name, before the rename). Never set it in production.
pub const CRASH_ENV: &str = "LOCKSTEP_AGENT_CRASH_AT";

/// Where heartbeats go.
#[derive(Clone)]
pub struct RegistrySettings {
    /// Registry URLs (comma-separated, failing over in order).
    pub urls: String,
    /// The token heartbeats present.
    pub token: Option<String>,
    /// The environment.
    pub env: String,
    /// The service this node runs.
    pub service: String,
}

/// Everything the agent is configured with.
#[derive(Clone)]
pub struct AgentConfig {
    /// The agent's directory.
    pub root: PathBuf,
    /// Keys whose signatures are accepted.
    pub trusted_keys: Vec<VerifyingKey>,
    /// The bearer token callers present.
    pub token: Option<String>,
    /// Accept manifest-less, unsigned packages (the source system's coordinator).
    pub allow_unsigned: bool,
    /// Accept calls without a token.
    pub allow_unauthenticated: bool,
    /// How the worker is restarted.
    pub worker: WorkerMode,
    /// Between SIGTERM and SIGKILL when the child is stopped.
    pub grace: Duration,
    /// The worker's health URL.
    pub health_url: Option<String>,
    /// How long a new release may take to become healthy.
    pub health_timeout: Duration,
    /// How long previous releases are kept.
    pub retention: Duration,
    /// The largest package accepted, in bytes.
    pub max_package_size: u64,
    /// Component versions reported when the manifest has none.
    pub components: BTreeMap<String, String>,
    /// Unpack limits.
    pub limits: Limits,
    /// Heartbeats, when configured.
    pub registry: Option<RegistrySettings>,
    /// The URL the registry records as this instance's endpoint.
    pub endpoint: Option<String>,
    /// The crash-test hook ([`CRASH_ENV`]).
    pub crash_at: Option<String>,
}

impl AgentConfig {
    /// A configuration with the defaults for everything but the root.
    pub fn new(root: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            root: root.into(),
            trusted_keys: Vec::new(),
            token: None,
            allow_unsigned: false,
            allow_unauthenticated: false,
            worker: WorkerMode::None,
            grace: Duration::from_secs(10),
            health_url: None,
            health_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            max_package_size: 1 << 30,
            components: BTreeMap::new(),
            limits: Limits::default(),
            registry: None,
            endpoint: None,
            crash_at: None,
        }
    }
}

/// What is known about a stored upload (`uploads/<key>/upload.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadMeta {
    /// The `X-Update-Version` it came with.
    pub key: String,
    /// The release it installs as.
    pub version_id: String,
    /// Its label.
    pub version: String,
    /// Whether a trusted signature was verified.
    pub signed: bool,
    /// The manifest (absent for a legacy package).
    pub manifest: Option<Manifest>,
    /// Bytes.
    pub size: u64,
    /// Hex sha256 of the archive.
    pub sha256: String,
    /// When (RFC 3339).
    pub uploaded_at: String,
}

/// The result of an apply or rollback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// `applied`, `unchanged`, `rolled_back`.
    pub status: String,
    /// The release now current.
    pub version_id: Option<String>,
    /// In words.
    pub message: String,
}

struct Inner {
    state: State,
    worker: Worker,
}

/// The update agent.
pub struct Agent {
    cfg: AgentConfig,
    inner: tokio::sync::Mutex<Inner>,
    snapshot: RwLock<State>,
    http: reqwest::Client,
    heartbeat: tokio::sync::Mutex<Option<HeartbeatTask>>,
    started_at: time::OffsetDateTime,
}

const PACKAGE: &str = "package.tar.gz";
const SIGNATURE: &str = "package.tar.gz.sig";
const UPLOAD_META: &str = "upload.json";

impl Agent {
    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.root.join("state.json")
    }
    fn releases(&self) -> PathBuf {
        self.cfg.root.join("releases")
    }
    fn current_link(&self) -> PathBuf {
        self.cfg.root.join("current")
    }
    fn staging(&self) -> PathBuf {
        self.cfg.root.join("staging")
    }
    /// `uploads/`, where packages wait for an apply.
    pub fn uploads(&self) -> PathBuf {
        self.cfg.root.join("uploads")
    }

    /// A consistent copy of the state (never waits for an apply).
    pub fn state(&self) -> State {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    fn save(&self, state: &State) -> Result<(), AgentError> {
        state.save(&self.state_path())?;
        if let Ok(mut s) = self.snapshot.write() {
            *s = state.clone();
        }
        Ok(())
    }

    fn crash(&self, point: &str) {
        if self.cfg.crash_at.as_deref() == Some(point) {
            eprintln!("{CRASH_ENV}={point}: killing the agent with SIGKILL (test hook)");
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(std::process::id().to_string())
                .status();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Opens the agent's directory and recovers from whatever an earlier run was doing
    /// (see [`Agent::recover`]); starts the worker on `current`.
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        for d in ["releases", "uploads", "staging"] {
            let p = cfg.root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| AgentError::io(format!("creating {}", p.display()), e))?;
        }
        let state = State::load(&cfg.root.join("state.json"))?;
        let worker = Worker::new(cfg.worker.clone(), &cfg.root, cfg.grace);
        let agent = Arc::new(Agent {
            snapshot: RwLock::new(state.clone()),
            inner: tokio::sync::Mutex::new(Inner { state, worker }),
            cfg,
            http: reqwest::Client::new(),
            heartbeat: tokio::sync::Mutex::new(None),
            started_at: time::OffsetDateTime::now_utc(),
        });
        agent.recover().await?;
        Ok(agent)
    }

    /// Reads the step an interrupted apply reached and finishes or undoes it: before
    /// `installed` the new release never existed for anyone, so staging is removed and
    /// the node stays on the old one; once `current` points at the new release the apply
    /// continues from the restart (health check, and rollback if it fails). The state is
    /// then reconciled with where `current` really points.
    pub async fn recover(&self) -> Result<(), AgentError> {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        inner.worker.stop_orphan(&self.cfg.root).await;
        let st = &mut inner.state;
        if st.instance_id.is_empty() {
            st.instance_id = lockstep_client::default_instance_id();
        }
        remove_tmp_links(&self.cfg.root);
        let actual = fsutil::read_current(&self.current_link())
            .filter(|id| self.releases().join(id).is_dir());
        let mut resume = None;
        if let Some(p) = st.apply.take() {
            let vid = p.version_id.clone();
            let live = actual.as_deref() == Some(vid.as_str());
            if p.step >= Step::Installed && live {
                // `current` names the new release (also when a self-rollback was cut short
                // before it switched back): finish from the restart; the health check
                // decides again, and rolls back if it fails.
                st.current = Some(vid.clone());
                st.event(
                    "recovered",
                    Some(&vid),
                    format!(
                        "an apply was interrupted after step {}; the new release is in place, finishing it",
                        p.step.name()
                    ),
                );
                resume = Some(ApplyProgress {
                    step: Step::Switched,
                    rollback: false,
                    ..p
                });
            } else {
                if p.step >= Step::Installed {
                    // Installed but not live: never switched to, or already rolled back
                    // from. It was never good; remove it.
                    let keep = [
                        st.last_good.as_deref(),
                        p.previous.as_deref(),
                        actual.as_deref(),
                    ];
                    if !keep.contains(&Some(vid.as_str())) {
                        let _ = std::fs::remove_dir_all(self.releases().join(&vid));
                        st.releases.remove(&vid);
                    }
                }
                st.event(
                    "apply_interrupted",
                    Some(&vid),
                    format!(
                        "an apply was interrupted after step {}; staying on the release that was current",
                        p.step.name()
                    ),
                );
            }
        }
        clear_dir(&self.staging());
        st.current = actual.clone();
        if let Some(cur) = &st.current
            && !st.releases.contains_key(cur)
        {
            st.releases.insert(
                cur.clone(),
                ReleaseMeta {
                    version_id: cur.clone(),
                    version: cur.clone(),
                    installed_at: now(),
                    ..ReleaseMeta::default()
                },
            );
        }
        st.apply = resume.clone();
        let snapshot = st.clone();
        self.save(&snapshot)?;
        match resume {
            Some(p) => {
                let _ = self.finish_apply(inner, p).await;
            }
            None => {
                if let (Some(cur), WorkerMode::Child(_)) = (actual, &self.cfg.worker) {
                    inner.worker.restart(&cur).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts heartbeating (when a registry is configured) and removes expired backups.
    pub async fn start_background(self: &Arc<Self>) {
        self.restart_heartbeat().await;
        let agent = Arc::downgrade(self);
        let every =
            (self.cfg.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(a) = agent.upgrade() else { break };
                let mut inner = a.inner.lock().await;
                a.apply_retention(&mut inner.state);
                let s = inner.state.clone();
                let _ = a.save(&s);
            }
        });
    }

    async fn restart_heartbeat(&self) {
        let Some(reg) = &self.cfg.registry else {
            return;
        };
        let st = self.state();
        let mut slot = self.heartbeat.lock().await;
        if let Some(old) = slot.take() {
            old.shutdown().await;
        }
        let Some(cur) = st.current.clone() else {
            return;
        };
        let meta = st.releases.get(&cur).cloned().unwrap_or_default();
        let hb = lockstep_api::Heartbeat {
            instance_id: st.instance_id.clone(),
            env: reg.env.clone(),
            service: reg.service.clone(),
            version_id: cur,
            git_sha: Some(meta.git_sha.clone()).filter(|s| !s.is_empty()),
            build_date: None,
            components: self.components_of(&meta),
            host: None,
            pid: Some(std::process::id()),
            started_at: Some(self.started_at),
            endpoint: self.cfg.endpoint.clone(),
            health: None,
        };
        match RegistryClient::new(&reg.urls, reg.token.clone()) {
            Ok(client) => *slot = Some(HeartbeatTask::spawn(client, hb, None)),
            Err(e) => tracing::warn!(error = %e, "heartbeats disabled"),
        }
    }

    /// Stops the worker and the heartbeats (deregistering).
    pub async fn shutdown(&self) {
        if let Some(hb) = self.heartbeat.lock().await.take() {
            hb.shutdown().await;
        }
        self.inner.lock().await.worker.stop().await;
    }

    /// The components a release reports: its manifest's, completed by `--component`.
    pub fn components_of(&self, meta: &ReleaseMeta) -> BTreeMap<String, String> {
        let mut c = self.cfg.components.clone();
        c.extend(meta.components.clone());
        c
    }

    /// Stores a received package (already in `dir`, with its signature if any) as upload
    /// `key`: checks size, signature and contents, then moves it into `uploads/<key>`.
    /// Starting an upload begins a new update attempt: the release running now becomes
    /// the one a rollback returns to.
    pub async fn accept_upload(
        self: &Arc<Self>,
        key: &str,
        dir: &Path,
        size: u64,
        sha256: String,
    ) -> Result<UploadMeta, AgentError> {
        let agent = self.clone();
        let key_owned = key.to_string();
        let dir_owned = dir.to_path_buf();
        let meta = tokio::task::spawn_blocking(move || {
            agent.check_upload(&key_owned, &dir_owned, size, sha256)
        })
        .await
        .map_err(|e| AgentError::Config(format!("verification task: {e}")))??;
        let mut inner = self.inner.lock().await;
        let dest = self.uploads().join(key);
        if dest.exists() {
            std::fs::remove_dir_all(&dest)
                .map_err(|e| AgentError::io(format!("replacing {}", dest.display()), e))?;
        }
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| AgentError::Config(e.to_string()))?;
        fsutil::write_atomic(&dir.join(UPLOAD_META), &json)
            .map_err(|e| AgentError::io("writing the upload's metadata", e))?;
        std::fs::rename(dir, &dest)
            .and_then(|()| fsutil::sync_dir(&self.uploads()))
            .map_err(|e| AgentError::io(format!("storing {}", dest.display()), e))?;
        let st = &mut inner.state;
        if st.current.is_some() {
            st.last_good = st.current.clone();
        }
        let s = st.clone();
        self.save(&s)?;
        tracing::info!(
            version = %short_id(&meta.version_id),
            size = meta.size,
            signed = meta.signed,
            legacy = meta.manifest.is_none(),
            "package uploaded"
        );
        Ok(meta)
    }

    fn check_upload(
        &self,
        key: &str,
        dir: &Path,
        size: u64,
        sha256: String,
    ) -> Result<UploadMeta, AgentError> {
        let package = dir.join(PACKAGE);
        let sig = dir.join(SIGNATURE);
        let signed = sig.exists();
        if size > self.cfg.max_package_size {
            return Err(AgentError::TooLarge {
                limit: self.cfg.max_package_size,
            });
        }
        if signed {
            lockstep_package::sign::verify_file(&package, &sig, &self.cfg.trusted_keys)?;
        } else if !self.cfg.allow_unsigned {
            return Err(AgentError::bad(
                "unsigned",
                "the package has no signature (multipart field `signature`); this agent accepts only signed packages (--allow-unsigned to accept unsigned ones)",
            ));
        }
        let manifest = match lockstep_package::check(&package, &self.cfg.limits) {
            Ok(m) => Some(m),
            Err(lockstep_package::PackageError::Manifest(why))
                if why.starts_with("the first entry") && (self.cfg.allow_unsigned || signed) =>
            {
                // No manifest: a legacy package, accepted only on the explicit opt-in (or
                // when a trusted key signed it). The safety rules still apply in full.
                let f = std::fs::File::open(&package)
                    .map_err(|e| AgentError::io("reading the package", e))?;
                lockstep_package::unpack(
                    std::io::BufReader::new(f),
                    None,
                    &self.cfg.limits,
                    Expect::Legacy,
                    &mut |_| {},
                )?;
                None
            }
            Err(e) => return Err(e.into()),
        };
        if !signed {
            tracing::warn!(
                version = %short_id(key),
                "accepting an UNSIGNED package because of --allow-unsigned"
            );
        }
        let (version_id, version) = match &manifest {
            Some(m) => {
                if key != m.version_id && key != m.version {
                    return Err(AgentError::bad(
                        "version_mismatch",
                        format!(
                            "X-Update-Version {key:?} matches neither the manifest's version_id nor its version"
                        ),
                    ));
                }
                (m.version_id.clone(), m.version.clone())
            }
            None => (key.to_string(), key.to_string()),
        };
        Ok(UploadMeta {
            key: key.to_string(),
            version_id,
            version,
            signed,
            manifest,
            size,
            sha256,
            uploaded_at: now(),
        })
    }

    /// Applies upload `key` through the named steps. The caller should run it in its own
    /// task: an apply, once started, finishes even if the request that asked for it goes
    /// away.
    pub async fn apply(self: Arc<Self>, key: String) -> Result<Outcome, AgentError> {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        let dir = self.uploads().join(&key);
        let meta: UploadMeta = match std::fs::read(dir.join(UPLOAD_META)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AgentError::Config(format!("upload metadata: {e}")))?,
            Err(_) => {
                // Already applied (its upload removed) is not an error.
                if let Some(cur) = &inner.state.current
                    && (cur == &key
                        || inner
                            .state
                            .releases
                            .get(cur)
                            .is_some_and(|m| m.version == key))
                {
                    return Ok(Outcome {
                        status: "unchanged".into(),
                        version_id: Some(cur.clone()),
                        message: "already running this release".into(),
                    });
                }
                return Err(AgentError::UnknownVersion(key));
            }
        };
        let vid = meta.version_id.clone();
        if inner.state.current.as_deref() == Some(vid.as_str()) {
            return Ok(Outcome {
                status: "unchanged".into(),
                version_id: Some(vid),
                message: "already running this release".into(),
            });
        }
        let mut progress = ApplyProgress {
            version_id: vid.clone(),
            upload: key.clone(),
            previous: inner.state.current.clone(),
            step: Step::Started,
            rollback: false,
        };
        tracing::info!(version = %short_id(&vid), "apply started");
        self.set_step(&mut inner.state, &progress)?;
        match self
            .prepare(&mut inner.state, &mut progress, &meta, &dir)
            .await
        {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.staging().join(&vid));
                let st = &mut inner.state;
                st.apply = None;
                st.event(
                    "apply_failed",
                    Some(&vid),
                    format!("apply failed, nothing changed: {e}"),
                );
                let s = st.clone();
                self.save(&s)?;
                return Err(e);
            }
        }
        let out = self.finish_apply(inner, progress).await;
        if out.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        out
    }

    fn set_step(&self, st: &mut State, p: &ApplyProgress) -> Result<(), AgentError> {
        st.apply = Some(p.clone());
        let s = st.clone();
        self.save(&s)?;
        tracing::debug!(version = %short_id(&p.version_id), step = p.step.name(), "apply step");
        self.crash(p.step.name());
        Ok(())
    }

    /// Verify, unpack, install, switch.
    async fn prepare(
        self: &Arc<Self>,
        st: &mut State,
        p: &mut ApplyProgress,
        meta: &UploadMeta,
        dir: &Path,
    ) -> Result<(), AgentError> {
        let vid = p.version_id.clone();
        // Verified: the bytes on disk are the ones that were signed.
        let package = dir.join(PACKAGE);
        let size = std::fs::metadata(&package)
            .map_err(|e| AgentError::io("reading the package", e))?
            .len();
        if size > self.cfg.max_package_size {
            return Err(AgentError::TooLarge {
                limit: self.cfg.max_package_size,
            });
        }
        if meta.signed {
            let (pk, sig, keys) = (
                package.clone(),
                dir.join(SIGNATURE),
                self.cfg.trusted_keys.clone(),
            );
            tokio::task::spawn_blocking(move || {
                lockstep_package::sign::verify_file(&pk, &sig, &keys)
            })
            .await
            .map_err(|e| AgentError::Config(e.to_string()))??;
        } else if !self.cfg.allow_unsigned {
            return Err(AgentError::bad("unsigned", "unsigned package"));
        }
        p.step = Step::Verified;
        self.set_step(st, p)?;
        // Unpacked: into staging only, every checksum matched, synced.
        let staging = self.staging().join(&vid);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| AgentError::io("clearing staging", e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| AgentError::io("creating staging", e))?;
        let agent = self.clone();
        let (stg, manifest, limits) = (staging.clone(), meta.manifest.clone(), self.cfg.limits);
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            let f = std::fs::File::open(&package)
                .map_err(|e| AgentError::io("reading the package", e))?;
            let r = std::io::BufReader::with_capacity(256 * 1024, f);
            let half = manifest
                .as_ref()
                .map(|m| (m.files.len() as u64).div_ceil(2))
                .unwrap_or(1);
            let expect = match &manifest {
                Some(m) => Expect::Manifest(Some(m)),
                None => Expect::Legacy,
            };
            lockstep_package::unpack(r, Some(&stg), &limits, expect, &mut |n| {
                if n == half {
                    agent.crash("unpacking");
                }
            })?;
            fsutil::sync_tree(&stg).map_err(|e| AgentError::io("syncing the release", e))
        })
        .await
        .map_err(|e| AgentError::Config(e.to_string()))??;
        p.step = Step::Unpacked;
        self.set_step(st, p)?;
        // Installed: renamed into releases/ (a re-applied old release is replaced whole).
        let dest = self.releases().join(&vid);
        if dest.exists() {
            let trash = self.staging().join(format!("{vid}.old"));
            std::fs::rename(&dest, &trash)
                .map_err(|e| AgentError::io("moving an old copy aside", e))?;
            let _ = std::fs::remove_dir_all(&trash);
        }
        std::fs::rename(&staging, &dest)
            .and_then(|()| fsutil::sync_dir(&self.releases()))
            .map_err(|e| AgentError::io(format!("installing {}", dest.display()), e))?;
        let m = meta.manifest.as_ref();
        st.releases.insert(
            vid.clone(),
            ReleaseMeta {
                version_id: vid.clone(),
                version: meta.version.clone(),
                service: m.map(|m| m.service.clone()).unwrap_or_default(),
                git_sha: m
                    .map(|m| m.git_sha.clone())
                    .unwrap_or_else(|| "unknown".into()),
                build_time: m.map(|m| m.created_at.clone()).unwrap_or_default(),
                components: m.map(|m| m.components.clone()).unwrap_or_default(),
                installed_at: now(),
                signed: meta.signed,
            },
        );
        p.step = Step::Installed;
        self.set_step(st, p)?;
        // Switched: `current` names the new release.
        self.switch_to(&vid)?;
        st.current = Some(vid.clone());
        st.last_updated = Some(now());
        p.step = Step::Switched;
        self.set_step(st, p)?;
        Ok(())
    }

    fn switch_to(&self, vid: &str) -> Result<(), AgentError> {
        fsutil::switch_symlink(
            &self.current_link(),
            &Path::new("releases").join(vid),
            || self.crash("switching"),
        )
        .map_err(|e| AgentError::io("switching `current`", e))
    }

    /// Restart and health check; rolls back by itself when the check fails.
    async fn finish_apply(
        &self,
        inner: &mut Inner,
        mut p: ApplyProgress,
    ) -> Result<Outcome, AgentError> {
        let vid = p.version_id.clone();
        let restarted = inner.worker.restart(&vid).await;
        let healthy = match &restarted {
            Err(e) => {
                tracing::warn!(version = %short_id(&vid), error = %e, "restart failed");
                false
            }
            Ok(()) => {
                p.step = Step::Restarted;
                self.set_step(&mut inner.state, &p)?;
                match &self.cfg.health_url {
                    Some(url) => health_check(&self.http, url, self.cfg.health_timeout).await,
                    None => true,
                }
            }
        };
        let st = &mut inner.state;
        if healthy {
            st.apply = None;
            st.event(
                "applied",
                Some(&vid),
                "the new release is current and healthy",
            );
            self.apply_retention(st);
            let s = st.clone();
            self.save(&s)?;
            self.crash("healthy");
            self.restart_heartbeat().await;
            return Ok(Outcome {
                status: "applied".into(),
                version_id: Some(vid),
                message: "the new release is current and healthy".into(),
            });
        }
        let previous = p
            .previous
            .clone()
            .filter(|prev| self.releases().join(prev).is_dir());
        let Some(prev) = previous else {
            st.apply = None;
            st.event(
                "apply_failed",
                Some(&vid),
                "the new release failed its health check and there is no previous release to return to",
            );
            let s = st.clone();
            self.save(&s)?;
            return Err(AgentError::HealthFailed);
        };
        p.rollback = true;
        st.apply = Some(p.clone());
        self.switch_to(&prev)?;
        st.current = Some(prev.clone());
        st.last_updated = Some(now());
        st.releases.remove(&vid);
        let _ = std::fs::remove_dir_all(self.releases().join(&vid));
        match inner.worker.restart(&prev).await {
            Err(e) => tracing::warn!(error = %e, "restarting the previous release failed"),
            Ok(()) => {
                if let Some(url) = &self.cfg.health_url
                    && !health_check(&self.http, url, self.cfg.health_timeout).await
                {
                    tracing::warn!(version = %short_id(&prev), "the previous release is not healthy either");
                }
            }
        }
        let st = &mut inner.state;
        st.apply = None;
        st.event(
            "self_rollback",
            Some(&prev),
            format!(
                "release {} failed its health check; rolled back to {}",
                short_id(&vid),
                short_id(&prev)
            ),
        );
        let s = st.clone();
        self.save(&s)?;
        self.restart_heartbeat().await;
        Err(AgentError::HealthFailed)
    }

    /// Returns to the release that ran when the latest update attempt began. With nothing
    /// applied since then, the node stays where it is (no downgrade) and the answer is
    /// still a success. `backup_id` and `worker_id` are what the source coordinator sends;
    /// they are logged, never used as paths.
    pub async fn rollback(
        self: Arc<Self>,
        backup_id: Option<String>,
        worker_id: Option<String>,
    ) -> Result<Outcome, AgentError> {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        tracing::info!(
            backup_id = backup_id.as_deref().unwrap_or("-"),
            worker_id = worker_id.as_deref().unwrap_or("-"),
            "rollback requested"
        );
        let st = &mut inner.state;
        let target = st
            .last_good
            .clone()
            .filter(|t| st.current.as_deref() != Some(t.as_str()))
            .filter(|t| self.releases().join(t).is_dir());
        let Some(target) = target else {
            let cur = st.current.clone();
            st.event(
                "rollback_noop",
                cur.as_deref(),
                "nothing was applied since the last good release; staying on it",
            );
            let s = st.clone();
            self.save(&s)?;
            return Ok(Outcome {
                status: "unchanged".into(),
                version_id: cur,
                message: "nothing was applied since the last good release; staying on it".into(),
            });
        };
        let from = st.current.clone();
        self.switch_to(&target)?;
        st.current = Some(target.clone());
        st.last_updated = Some(now());
        st.event(
            "rolled_back",
            Some(&target),
            format!(
                "rolled back from {} to {}",
                from.as_deref().map(short_id).unwrap_or_default(),
                short_id(&target)
            ),
        );
        let s = st.clone();
        self.save(&s)?;
        if let Err(e) = inner.worker.restart(&target).await {
            tracing::warn!(error = %e, "restart after rollback failed");
        } else if let Some(url) = &self.cfg.health_url
            && !health_check(&self.http, url, self.cfg.health_timeout).await
        {
            tracing::warn!(version = %short_id(&target), "the release rolled back to is not healthy");
        }
        self.restart_heartbeat().await;
        Ok(Outcome {
            status: "rolled_back".into(),
            version_id: Some(target),
            message: "rolled back to the last good release".into(),
        })
    }

    /// Removes backups installed longer ago than the retention, never `current`, the
    /// last good release or the one an apply in progress would return to.
    fn apply_retention(&self, st: &mut State) {
        let cutoff = time::OffsetDateTime::now_utc() - self.cfg.retention;
        let keep: Vec<String> = [
            st.current.clone(),
            st.last_good.clone(),
            st.apply.as_ref().and_then(|a| a.previous.clone()),
            st.apply.as_ref().map(|a| a.version_id.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let expired: Vec<String> = st
            .releases
            .values()
            .filter(|m| !keep.contains(&m.version_id))
            .filter(|m| {
                time::OffsetDateTime::parse(
                    &m.installed_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .map(|t| t < cutoff)
                .unwrap_or(true)
            })
            .map(|m| m.version_id.clone())
            .collect();
        for vid in expired {
            let dir = self.releases().join(&vid);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(version = %short_id(&vid), error = %e, "removing an expired backup failed");
                    continue;
                }
            }
            st.releases.remove(&vid);
            st.event(
                "backup_removed",
                Some(&vid),
                "backup older than the retention removed",
            );
        }
        // Uploads never applied expire too, but never within an hour: an upload waits for
        // its apply.
        let upload_ttl = self.cfg.retention.max(Duration::from_secs(3600));
        if let Ok(rd) = std::fs::read_dir(self.uploads()) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() > upload_ttl)
                    .unwrap_or(false);
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn remove_tmp_links(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("current.tmp-")
                || e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.tmp-")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn clear_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// `uploads/.incoming-<uuid>`: where a request writes a package before it is checked.
pub fn incoming_dir(agent: &Agent) -> PathBuf {
    agent
        .uploads()
        .join(format!(".incoming-{}", uuid::Uuid::new_v4().simple()))
}

/// File names inside an upload directory.
pub fn upload_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(PACKAGE), dir.join(SIGNATURE))
}
