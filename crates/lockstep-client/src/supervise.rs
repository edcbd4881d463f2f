//! Supervising a worker process that cannot link this library (any language): run it with
//! its release in `LOCKSTEP_VERSION_ID`, heartbeat and watch on its behalf, forward SIGTERM
//! and SIGINT to it, and when its release stops being the expected one either stop it
//! (SIGTERM, a grace period, SIGKILL) or only report it. Otherwise its own exit status is
//! the result.
//!
//! Used by `lockstep guard` and the update agent. Nothing here prints: what happens is
//! handed to an [`Event`] callback. Signals are sent with `kill(1)`, which keeps the
//! workspace free of `unsafe` libc calls; they are rare events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockstep_client::supervise::SuperviseError> {
//! use lockstep_client::supervise::{self, OnStale, Policy};
//! use std::time::Duration;
//! let command = ["python3".to_string(), "worker.py".to_string()];
//! let policy = Policy { on_stale: OnStale::Stop, grace: Duration::from_secs(10) };
//! let outcome = supervise::run(&command, "3f2a9c1e", None, policy, |e| eprintln!("{e:?}")).await?;
//! std::process::exit(i32::from(outcome.exit_code()));
//! # }
//! ```

use lockstep_core::StoredRelease;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

use crate::{ClientError, HeartbeatTask, RegistryClient, Watcher, WatcherConfig};

/// The exit code of a child that was stopped because it became stale: a failure, so the
/// process manager above starts the new release.
pub const EXIT_STOPPED_STALE: u8 = 1;

/// Why supervision could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The command line is empty.
    #[error("no command given")]
    NoCommand,
    /// The program could not be started (not found, not executable, …).
    #[error("cannot start {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The watcher could not be set up (an invalid registry URL).
    #[error(transparent)]
    Registry(#[from] ClientError),
    /// Installing a signal handler or waiting for the child failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SuperviseError {
    /// The exit code a shell would end with for this failure: 127 when the program does
    /// not exist, 126 when it exists but cannot be executed, 2 for an empty command line,
    /// 1 otherwise. Process supervisors read 126/127 as "will not get better by
    /// restarting".
    pub fn exit_code(&self) -> u8 {
        match self {
            SuperviseError::Spawn { source, .. } => spawn_exit_code(source),
            SuperviseError::NoCommand => 2,
            _ => 1,
        }
    }
}

/// 127 for a program that does not exist, 126 for one that cannot be executed (as `sh`).
pub fn spawn_exit_code(e: &std::io::Error) -> u8 {
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// What to do when the child's release stops being the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// SIGTERM, wait the grace period, SIGKILL; the outcome is [`Outcome::StoppedStale`].
    Stop,
    /// Report it once ([`Event::Stale`]) and keep the child running.
    Warn,
}

/// How the child is treated when it becomes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Stop it or only report it.
    pub on_stale: OnStale,
    /// How long it gets between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// Where to report the child and learn its service's expected release.
pub struct Registration {
    /// The watch: registry, token, environment, service, and the child's release as
    /// `version_id`.
    pub watcher: WatcherConfig,
    /// The client the heartbeats go through.
    pub client: RegistryClient,
    /// The child's baked commit, reported in its heartbeats.
    pub git_sha: Option<String>,
    /// When the child was built, reported in its heartbeats (and so mirrored as `buildDate`).
    pub build_date: Option<time::OffsetDateTime>,
}

/// Something the caller may want to tell a person about.
#[derive(Debug, Clone)]
pub enum Event {
    /// The child's release is no longer the expected one (reported once with
    /// [`OnStale::Warn`]); `expected` is the expected release as last seen, if any.
    Stale {
        /// The release expected now.
        expected: Option<Arc<StoredRelease>>,
    },
    /// [`OnStale::Stop`]: SIGTERM was sent; SIGKILL follows after `grace`.
    Stopping {
        /// The grace period.
        grace: Duration,
    },
    /// The child outlived the grace period; SIGKILL was sent.
    Killing,
}

/// How supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The child exited by itself (or on a forwarded signal).
    Exited(ExitStatus),
    /// The child became stale and was stopped; `killed` when it needed SIGKILL.
    StoppedStale {
        /// Whether it outlived the grace period.
        killed: bool,
    },
}

impl Outcome {
    /// The exit code to end with: the child's own ([`exit_code`]), or
    /// [`EXIT_STOPPED_STALE`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Exited(status) => exit_code(*status),
            Outcome::StoppedStale { .. } => EXIT_STOPPED_STALE,
        }
    }
}

/// The exit code that passes `status` through as a shell would: the child's code, or 128 +
/// the signal that ended it (1 if neither is known).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => 1,
    }
}

fn send_signal(pid: u32, sig: &str) {
    // `kill -SIG 0` would signal our whole process group.
    if pid == 0 {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Runs `command` (program and arguments, stdio inherited) as release `version_id` and
/// supervises it until it exits or, under [`OnStale::Stop`], becomes stale.
///
/// With a `registration`, the child is heartbeated (with its pid) and its service watched;
/// the heartbeats stop, and the instance is deregistered, when supervision ends. Without
/// one, the child never becomes stale. SIGTERM and SIGINT received meanwhile are forwarded
/// to the child.
pub async fn run(
    command: &[String],
    version_id: &str,
    registration: Option<Registration>,
    policy: Policy,
    mut on_event: impl FnMut(Event),
) -> Result<Outcome, SuperviseError> {
    let (program, args) = command.split_first().ok_or(SuperviseError::NoCommand)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("LOCKSTEP_VERSION_ID", version_id)
        .spawn()
        .map_err(|source| SuperviseError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let (watcher, beats) = match registration {
        Some(r) => {
            let watcher = Watcher::start(r.watcher)?;
            let mut hb = crate::heartbeat_for(watcher.config(), r.git_sha.as_deref(), pid, None);
            hb.build_date = r.build_date;
            let beats = HeartbeatTask::spawn(r.client, hb, Some(watcher.clone()));
            (Some(watcher), Some(beats))
        }
        None => (None, None),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut warned = false;
    let outcome = loop {
        let stale = async {
            match &watcher {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break Outcome::Exited(status?),
            _ = term.recv() => send_signal(pid, "TERM"),
            _ = int.recv() => send_signal(pid, "INT"),
            _ = stale, if !warned => {
                let expected = watcher.as_ref().and_then(Watcher::expected);
                on_event(Event::Stale { expected });
                if policy.on_stale == OnStale::Warn {
                    warned = true;
                    continue;
                }
                on_event(Event::Stopping { grace: policy.grace });
                send_signal(pid, "TERM");
                let killed = tokio::time::timeout(policy.grace, child.wait()).await.is_err();
                if killed {
                    on_event(Event::Killing);
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                break Outcome::StoppedStale { killed };
            }
        }
    };
    if let Some(b) = beats {
        b.shutdown().await;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::PutRelease;
    use lockstep_core::Release;

    fn check(raw: i32, expect: u8) {
        assert_eq!(exit_code(ExitStatus::from_raw(raw)), expect, "raw {raw:#x}");
    }

    #[test]
    fn exit_code_passes_the_childs_code_through_and_maps_signals_to_128_plus() {
        check(0, 0);
        check(3 << 8, 3);
        check(255 << 8, 255);
        check(9, 137); // SIGKILL
        check(15, 143); // SIGTERM
        assert_eq!(
            Outcome::StoppedStale { killed: true }.exit_code(),
            EXIT_STOPPED_STALE
        );
    }

    fn sh(script: &str) -> Vec<String> {
        ["sh", "-c", script].map(String::from).to_vec()
    }

    const STOP: Policy = Policy {
        on_stale: OnStale::Stop,
        grace: Duration::from_millis(200),
    };

    #[tokio::test]
    async fn the_child_runs_with_its_release_and_its_exit_status_is_the_outcome() {
        let mut events = 0;
        let outcome = run(
            &sh("[ \"$LOCKSTEP_VERSION_ID\" = v-7 ] && exit 3; exit 9"),
            "v-7",
            None,
            STOP,
            |_| events += 1,
        )
        .await
        .expect("runs");
        assert_eq!(outcome.exit_code(), 3, "{outcome:?}");
        assert_eq!(events, 0);
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_an_error() {
        let err = run(&["/nonexistent/worker".into()], "v", None, STOP, |_| {})
            .await
            .expect_err("cannot start");
        assert!(matches!(err, SuperviseError::Spawn { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 127, "not found, as a shell says it");
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "#!/bin/sh\n").expect("write");
        let err = run(&[plain.display().to_string()], "v", None, STOP, |_| {})
            .await
            .expect_err("cannot execute");
        assert_eq!(err.exit_code(), 126, "{err:?}");
        let err = run(&[], "v", None, STOP, |_| {}).await.expect_err("empty");
        assert!(matches!(err, SuperviseError::NoCommand));
    }

    /// This crate's client for the in-process registry (the testkit links its own copy).
    fn admin(reg: &lockstep_testkit::InProcessRegistry) -> RegistryClient {
        RegistryClient::new(&reg.url, Some(lockstep_testkit::ADMIN_TOKEN.into())).expect("client")
    }

    async fn registry_expecting(version_id: &str) -> lockstep_testkit::InProcessRegistry {
        let reg = lockstep_testkit::InProcessRegistry::start().await;
        let put = PutRelease {
            release: Release::new(version_id),
            force: false,
        };
        admin(&reg)
            .put_release("production", "jobs", &put)
            .await
            .expect("register");
        reg
    }

    fn registration(reg: &lockstep_testkit::InProcessRegistry, version_id: &str) -> Registration {
        let mut watcher = WatcherConfig::new(&reg.url, "jobs", version_id);
        watcher.token = Some(lockstep_testkit::ADMIN_TOKEN.into());
        watcher.env = "production".into();
        Registration {
            watcher,
            client: admin(reg),
            git_sha: None,
            build_date: None,
        }
    }

    fn names(events: &[Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                Event::Stale { .. } => "stale",
                Event::Stopping { .. } => "stopping",
                Event::Killing => "killing",
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stale_child_is_stopped_with_sigterm() {
        let reg = registry_expecting("v2").await;
        let mut events = Vec::new();
        let outcome = run(
            &sh("exec sleep 30"),
            "v1",
            Some(registration(&reg, "v1")),
            STOP,
            |e| events.push(e),
        )
        .await
        .expect("runs");
        assert_eq!(outcome, Outcome::StoppedStale { killed: false });
        assert_eq!(outcome.exit_code(), 1);
        assert_eq!(names(&events), ["stale", "stopping"]);
        let Event::Stale {
            expected: Some(expected),
        } = &events[0]
        else {
            panic!("{events:?}");
        };
        assert_eq!(expected.release.version_id, "v2");
    }

    #[tokio::test]
    async fn a_stale_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let reg = registry_expecting("v2").await;
        let mut events = Vec::new();
        let outcome = run(
            &sh("trap '' TERM; exec sleep 30"),
            "v1",
            Some(registration(&reg, "v1")),
            STOP,
            |e| events.push(e),
        )
        .await
        .expect("runs");
        assert_eq!(outcome, Outcome::StoppedStale { killed: true });
        assert_eq!(names(&events), ["stale", "stopping", "killing"]);
    }

    #[tokio::test]
    async fn on_stale_warn_reports_once_and_keeps_the_child_running() {
        let reg = registry_expecting("v2").await;
        let mut events = Vec::new();
        let policy = Policy {
            on_stale: OnStale::Warn,
            ..STOP
        };
        let outcome = run(
            &sh("sleep 1; exit 4"),
            "v1",
            Some(registration(&reg, "v1")),
            policy,
            |e| events.push(e),
        )
        .await
        .expect("runs");
        assert_eq!(outcome.exit_code(), 4, "{outcome:?}");
        assert_eq!(names(&events), ["stale"]);
    }

    async fn instances(client: &RegistryClient) -> Vec<lockstep_core::Instance> {
        let report = client
            .status(Some("production"), Some("jobs"))
            .await
            .expect("status");
        report
            .environments
            .into_iter()
            .flat_map(|e| e.services)
            .flat_map(|s| s.instances)
            .map(|i| i.instance)
            .collect()
    }

    #[tokio::test]
    async fn a_current_child_is_heartbeated_while_it_runs_and_deregistered_when_it_exits() {
        let reg = registry_expecting("v1").await;
        let client = admin(&reg);
        let mut events = 0;
        let command = sh("sleep 2");
        let supervised = run(&command, "v1", Some(registration(&reg, "v1")), STOP, |_| {
            events += 1
        });
        let heartbeated = async {
            for _ in 0..150 {
                if let [i] = instances(&client).await.as_slice() {
                    return Some((i.version_id.clone(), i.pid.is_some_and(|p| p > 0)));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        };
        let (outcome, heartbeated) = tokio::join!(supervised, heartbeated);
        assert_eq!(outcome.expect("runs").exit_code(), 0);
        assert_eq!(heartbeated, Some(("v1".to_string(), true)));
        assert_eq!(events, 0);
        assert!(instances(&client).await.is_empty(), "deregistered");
    }
}
