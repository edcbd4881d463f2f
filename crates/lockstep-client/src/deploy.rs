//! Deploying a release: running the deploy command with the new release's identity in its
//! environment (retrying with exponential backoff), waiting until the fleet reports the
//! release, and rolling back when it does not.
//!
//! Shared by `lockstep deploy`, the update agent and the rollout coordinator. Nothing here
//! prints: failed attempts and the fleet's progress are handed to callbacks, so a terminal
//! shows a progress bar and a daemon logs.
//!
//! The deploy command's contract: it runs with stdin closed and these variables set
//! (see [`Deployment::command_env`]):
//!
//! | variable | value |
//! |---|---|
//! | `LOCKSTEP_VERSION_ID`, `CODE_VERSION_UUID` | the new release's version id |
//! | `DEPLOY_TIME_UTC` | when the deploy started, RFC 3339 |
//! | `LOCKSTEP_SERVICE`, `LOCKSTEP_ENV` | what is deployed, where |

use lockstep_api::{RollbackRequest, StatusReport};
use lockstep_core::{Instance, Status, StoredRelease, short_id};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use crate::{ClientError, RegistryClient};

/// The longest delay between two attempts of the deploy command.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Why the deploy command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command line is empty.
    #[error("no deploy command given")]
    NoCommand,
    /// The program could not be started (not found, not executable, …).
    #[error("cannot run {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every attempt exited unsuccessfully.
    #[error("deploy command failed {attempts} time(s)")]
    Failed {
        /// How many times it ran.
        attempts: u32,
        /// How the last attempt ended.
        last: ExitStatus,
    },
    /// The deploy time cannot be written as RFC 3339 (a year beyond 9999).
    #[error("cannot format the deploy time")]
    Time(#[from] time::error::Format),
}

/// The release being deployed, as the deploy command is told about it.
#[derive(Debug, Clone, Copy)]
pub struct Deployment<'a> {
    /// Environment.
    pub env: &'a str,
    /// Service.
    pub service: &'a str,
    /// The new release's version id.
    pub version_id: &'a str,
    /// When the deploy started.
    pub deployed_at: OffsetDateTime,
}

impl Deployment<'_> {
    /// The variables the deploy command runs with (see the module documentation).
    pub fn command_env(&self) -> Result<Vec<(&'static str, String)>, CommandError> {
        let deploy_time = self.deployed_at.format(&Rfc3339)?;
        Ok(vec![
            ("LOCKSTEP_VERSION_ID", self.version_id.to_string()),
            ("CODE_VERSION_UUID", self.version_id.to_string()),
            ("DEPLOY_TIME_UTC", deploy_time),
            ("LOCKSTEP_SERVICE", self.service.to_string()),
            ("LOCKSTEP_ENV", self.env.to_string()),
        ])
    }
}

/// How often to retry a failing deploy command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first attempt (0: run once).
    pub retries: u32,
    /// The delay after the first failure; it doubles after each further failure, up to
    /// [`MAX_RETRY_DELAY`].
    pub first_delay: Duration,
}

impl Retry {
    /// How many times the command runs at most.
    pub fn attempts(&self) -> u32 {
        self.retries.saturating_add(1)
    }
}

/// The delay after `delay`: twice as long, at most [`MAX_RETRY_DELAY`].
pub fn next_delay(delay: Duration) -> Duration {
    delay
        .checked_mul(2)
        .unwrap_or(MAX_RETRY_DELAY)
        .min(MAX_RETRY_DELAY)
}

/// One failed attempt of the deploy command, as reported to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedAttempt {
    /// Which attempt (from 1).
    pub attempt: u32,
    /// How many attempts there are at most.
    pub attempts: u32,
    /// How it ended.
    pub status: ExitStatus,
    /// How long until the next attempt; `None` after the last one.
    pub retry_in: Option<Duration>,
}

/// Runs `command` (program and arguments) for `deployment` until it succeeds or `retry`
/// is exhausted, calling `on_failure` after each failed attempt (before waiting).
///
/// Only an exit status counts as a failure to retry: a program that cannot be started at
/// all is reported at once as [`CommandError::Spawn`].
pub async fn run_command(
    command: &[String],
    deployment: &Deployment<'_>,
    retry: Retry,
    mut on_failure: impl FnMut(&FailedAttempt),
) -> Result<(), CommandError> {
    let (program, args) = command.split_first().ok_or(CommandError::NoCommand)?;
    let vars = deployment.command_env()?;
    let attempts = retry.attempts();
    let mut delay = retry.first_delay;
    let mut attempt = 1;
    loop {
        let status = tokio::process::Command::new(program)
            .args(args)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .status()
            .await
            .map_err(|source| CommandError::Spawn {
                program: program.clone(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        let last = attempt >= attempts;
        on_failure(&FailedAttempt {
            attempt,
            attempts,
            status,
            retry_in: (!last).then_some(delay),
        });
        if last {
            return Err(CommandError::Failed {
                attempts,
                last: status,
            });
        }
        tokio::time::sleep(delay).await;
        delay = next_delay(delay);
        attempt += 1;
    }
}

/// How far the fleet is: `current` of the `total` live (not missing) instances run the
/// release waited for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Live instances on the release.
    pub current: usize,
    /// Live instances.
    pub total: usize,
}

impl Progress {
    /// Whether there is at least one live instance and all of them run the release.
    pub fn is_complete(&self) -> bool {
        self.total > 0 && self.current == self.total
    }
}

fn live(report: &StatusReport) -> impl Iterator<Item = &Instance> {
    report
        .environments
        .iter()
        .flat_map(|e| &e.services)
        .flat_map(|s| &s.instances)
        .filter(|i| i.status != Status::Missing)
        .map(|i| &i.instance)
}

/// How many live instances of `report` run `version_id`. Missing instances do not count:
/// an instance that died during the deploy does not hold it up.
pub fn progress(report: &StatusReport, version_id: &str) -> Progress {
    live(report).fold(Progress::default(), |p, i| Progress {
        current: p.current + usize::from(i.version_id == version_id),
        total: p.total + 1,
    })
}

/// The live instances of `report` that do not run `version_id`, in report order.
pub fn behind<'a>(report: &'a StatusReport, version_id: &str) -> Vec<&'a Instance> {
    live(report)
        .filter(|i| i.version_id != version_id)
        .collect()
}

/// How waiting for the fleet ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitOutcome {
    /// Every live instance (at least one) runs the release.
    AllCurrent {
        /// Live instances.
        total: usize,
    },
    /// The timeout ran out first.
    TimedOut {
        /// Live instances on the release at the last look.
        current: usize,
        /// Live instances at the last look.
        total: usize,
        /// The live instances still on another release.
        behind: Vec<Instance>,
    },
    /// No live instance of the service reported during [`Wait::empty_grace`]: there is no
    /// fleet to wait for (a service with no worker yet, workers not pointed at this
    /// registry, or all of them dead). Waiting out the timeout would only delay the answer.
    NoInstances {
        /// Instances known but missing (no heartbeat within their TTL).
        missing: usize,
    },
}

/// How long and how often [`wait_for_fleet`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Give up after this long ([`WaitOutcome::TimedOut`]).
    pub timeout: Duration,
    /// Time between two looks.
    pub poll: Duration,
    /// When no live instance at all has reported after this long, stop at once
    /// ([`WaitOutcome::NoInstances`]) instead of waiting for the timeout. Instances that
    /// restart during a deploy heartbeat on start, so a short grace covers them.
    pub empty_grace: Duration,
}

impl Wait {
    /// `timeout`, a look every 500 ms, and an empty fleet answered after 800 ms.
    pub fn new(timeout: Duration) -> Wait {
        Wait {
            timeout,
            poll: Duration::from_millis(500),
            empty_grace: Duration::from_millis(800),
        }
    }
}

fn missing_count(report: &StatusReport) -> usize {
    report
        .environments
        .iter()
        .flat_map(|e| &e.services)
        .flat_map(|s| &s.instances)
        .filter(|i| i.status == Status::Missing)
        .count()
}

/// Polls the registry's status of `env`/`service` every `wait.poll` until every live
/// instance runs `version_id` or `wait.timeout` has passed, calling `progress_to` after
/// each look.
///
/// The first look is immediate and there is always a last look at the deadline, so a zero
/// timeout looks once. When no live instance has reported by `wait.empty_grace` the wait
/// ends with [`WaitOutcome::NoInstances`]; once one has, an emptied fleet (a restart) is
/// waited for until the timeout. A registry that cannot be asked ends the wait with its
/// error.
pub async fn wait_for_fleet(
    client: &RegistryClient,
    env: &str,
    service: &str,
    version_id: &str,
    wait: Wait,
    mut progress_to: impl FnMut(Progress),
) -> Result<WaitOutcome, ClientError> {
    let start = Instant::now();
    let deadline = start + wait.timeout;
    let grace = start + wait.empty_grace.min(wait.timeout);
    let mut seen_live = false;
    loop {
        let report = client.status(Some(env), Some(service)).await?;
        let p = progress(&report, version_id);
        progress_to(p);
        if p.is_complete() {
            return Ok(WaitOutcome::AllCurrent { total: p.total });
        }
        seen_live |= p.total > 0;
        let now = Instant::now();
        if !seen_live && now >= grace {
            return Ok(WaitOutcome::NoInstances {
                missing: missing_count(&report),
            });
        }
        if now >= deadline {
            return Ok(WaitOutcome::TimedOut {
                current: p.current,
                total: p.total,
                behind: behind(&report, version_id).into_iter().cloned().collect(),
            });
        }
        let next = if seen_live {
            deadline
        } else {
            grace.min(deadline)
        };
        tokio::time::sleep(wait.poll.min(next.saturating_duration_since(now))).await;
    }
}

/// Why a deploy must not start.
#[derive(Debug, thiserror::Error)]
pub enum PrecheckError {
    /// The registry could not be asked for the expected release.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Registering the release would be refused (a downgrade).
    #[error(transparent)]
    Refused(#[from] lockstep_core::CoreError),
}

/// Applies the registration rules to `release` against the expected release of
/// `env`/`service` *before* the deploy command runs, so a deploy the registry would refuse
/// to register (a lower semantic version, an older build) never ships. The registry
/// applies the same rule again when the release is registered.
pub async fn precheck(
    client: &RegistryClient,
    env: &str,
    service: &str,
    release: &lockstep_core::Release,
    force: bool,
) -> Result<(), PrecheckError> {
    let current = client.release(env, service).await?;
    lockstep_core::decide_registration(
        current.as_ref().map(|c| &c.release),
        release,
        lockstep_core::RegistrationKind::Register,
        force,
    )?;
    Ok(())
}

/// Makes the release before `version_id` expected again, recording that its deploy timed
/// out; returns what is expected now.
pub async fn roll_back_after_timeout(
    client: &RegistryClient,
    env: &str,
    service: &str,
    version_id: &str,
) -> Result<StoredRelease, ClientError> {
    let body = RollbackRequest {
        reason: Some(format!("deploy {} timed out", short_id(version_id))),
        ..RollbackRequest::default()
    };
    client.rollback(env, service, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::{EnvStatus, InstanceStatus, ServiceStatus};
    use lockstep_core::StatusCounts;

    fn instance(id: &str, version_id: &str, status: Status) -> InstanceStatus {
        let now = OffsetDateTime::UNIX_EPOCH;
        InstanceStatus {
            instance: Instance::new(id, "production", "api", version_id, now),
            status,
            drift_secs: 0,
            rollout: None,
        }
    }

    fn report(instances: &[(&str, &str, Status)]) -> StatusReport {
        StatusReport {
            environments: vec![EnvStatus {
                name: "production".into(),
                services: vec![ServiceStatus {
                    name: "api".into(),
                    expected: None,
                    instances: instances
                        .iter()
                        .map(|(id, v, s)| instance(id, v, *s))
                        .collect(),
                    counts: StatusCounts::default(),
                }],
            }],
            ..StatusReport::default()
        }
    }

    /// Instances `(id, version id, status)` → `(current, total, complete, ids behind)`
    /// while waiting for `new`.
    fn check(input: &[(&str, &str, Status)], expect: (usize, usize, bool, &[&str])) {
        let r = report(input);
        let p = progress(&r, "new");
        let ids: Vec<_> = behind(&r, "new")
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect();
        assert_eq!(
            (p.current, p.total, p.is_complete(), ids.as_slice()),
            expect,
            "{input:?}"
        );
    }

    #[test]
    fn fleet_progress_counts_live_instances_on_the_new_release() {
        use Status::*;
        check(&[], (0, 0, false, &[]));
        check(&[("a", "new", Current)], (1, 1, true, &[]));
        check(
            &[("a", "new", Current), ("b", "old", Stale)],
            (1, 2, false, &["b"]),
        );
        check(
            &[("a", "old", Draining), ("b", "old", Unknown)],
            (0, 2, false, &["a", "b"]),
        );
    }

    #[test]
    fn fleet_progress_ignores_missing_instances() {
        use Status::*;
        check(
            &[("a", "new", Current), ("gone", "old", Missing)],
            (1, 1, true, &[]),
        );
        check(&[("gone", "new", Missing)], (0, 0, false, &[]));
    }

    #[test]
    fn retry_delay_doubles_up_to_a_minute() {
        let s = Duration::from_secs;
        let cases = [
            (Duration::from_millis(10), Duration::from_millis(20)),
            (s(2), s(4)),
            (s(40), s(60)),
            (s(60), s(60)),
            (s(120), s(60)),
            (Duration::MAX, s(60)),
        ];
        for (delay, next) in cases {
            assert_eq!(next_delay(delay), next, "{delay:?}");
        }
        let r = Retry {
            retries: u32::MAX,
            first_delay: s(1),
        };
        assert_eq!(r.attempts(), u32::MAX);
    }

    /// This crate's client for the in-process registry (the testkit links its own copy).
    fn admin(reg: &lockstep_testkit::InProcessRegistry) -> RegistryClient {
        RegistryClient::new(&reg.url, Some(lockstep_testkit::ADMIN_TOKEN.into())).expect("client")
    }

    fn heartbeat(id: &str, version_id: &str) -> lockstep_api::Heartbeat {
        let mut cfg = crate::WatcherConfig::new("http://127.0.0.1:9", "api", version_id);
        cfg.env = "production".into();
        let mut hb = crate::heartbeat_for(&cfg, None, 1, None);
        hb.instance_id = id.into();
        hb
    }

    async fn register(client: &RegistryClient, version_id: &str) {
        let put = lockstep_api::PutRelease {
            release: lockstep_core::Release::new(version_id),
            force: false,
        };
        client
            .put_release("production", "api", &put)
            .await
            .expect("register");
    }

    #[tokio::test]
    async fn wait_for_fleet_completes_once_every_live_instance_runs_the_release() {
        let reg = lockstep_testkit::InProcessRegistry::start().await;
        let client = admin(&reg);
        register(&client, "new").await;
        client
            .heartbeat(&heartbeat("w-1", "new"))
            .await
            .expect("heartbeat");
        let mut seen = Vec::new();
        let outcome = wait_for_fleet(
            &client,
            "production",
            "api",
            "new",
            Wait {
                timeout: Duration::from_secs(10),
                poll: Duration::from_millis(10),
                empty_grace: Duration::from_secs(10),
            },
            |p| seen.push(p),
        )
        .await
        .expect("status");
        assert_eq!(outcome, WaitOutcome::AllCurrent { total: 1 });
        assert_eq!(
            seen,
            [Progress {
                current: 1,
                total: 1
            }]
        );
    }

    #[tokio::test]
    async fn wait_for_fleet_on_an_empty_fleet_answers_after_the_grace_not_the_timeout() {
        let reg = lockstep_testkit::InProcessRegistry::start().await;
        let client = admin(&reg);
        register(&client, "new").await;
        let t0 = std::time::Instant::now();
        let outcome = wait_for_fleet(
            &client,
            "production",
            "api",
            "new",
            Wait {
                timeout: Duration::from_secs(300),
                ..Wait::new(Duration::ZERO)
            },
            |_| {},
        )
        .await
        .expect("status");
        assert_eq!(outcome, WaitOutcome::NoInstances { missing: 0 });
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn precheck_refuses_a_lower_semantic_version_before_anything_runs() {
        let reg = lockstep_testkit::InProcessRegistry::start().await;
        let client = admin(&reg);
        let mut v1 = lockstep_core::Release::new("one");
        v1.version = Some("v1.0.0".into());
        let put = lockstep_api::PutRelease {
            release: v1,
            force: false,
        };
        client
            .put_release("production", "api", &put)
            .await
            .expect("register");
        let mut older = lockstep_core::Release::new("two");
        older.version = Some("v0.9.0".into());
        let err = precheck(&client, "production", "api", &older, false)
            .await
            .expect_err("a downgrade");
        assert!(
            matches!(
                err,
                PrecheckError::Refused(lockstep_core::CoreError::Downgrade { .. })
            ),
            "{err:?}"
        );
        precheck(&client, "production", "api", &older, true)
            .await
            .expect("forced");
        older.version = Some("v1.0.1".into());
        precheck(&client, "production", "api", &older, false)
            .await
            .expect("an upgrade");
    }

    #[tokio::test]
    async fn wait_for_fleet_times_out_naming_the_instances_behind_and_rolls_back() {
        let reg = lockstep_testkit::InProcessRegistry::start().await;
        let client = admin(&reg);
        register(&client, "good").await;
        for (id, v) in [("w-1", "good"), ("w-2", "new")] {
            client
                .heartbeat(&heartbeat(id, v))
                .await
                .expect("heartbeat");
        }
        register(&client, "new").await;
        let mut looks = 0;
        let outcome = wait_for_fleet(
            &client,
            "production",
            "api",
            "new",
            Wait {
                timeout: Duration::from_millis(100),
                poll: Duration::from_millis(20),
                empty_grace: Duration::from_millis(10),
            },
            |p| {
                looks += 1;
                assert_eq!(
                    p,
                    Progress {
                        current: 1,
                        total: 2
                    }
                );
            },
        )
        .await
        .expect("status");
        let WaitOutcome::TimedOut {
            current,
            total,
            behind,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!((current, total), (1, 2));
        let ids: Vec<_> = behind.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(ids, ["w-1"]);
        assert!(looks >= 2, "polled until the deadline: {looks}");

        let back = roll_back_after_timeout(&client, "production", "api", "new")
            .await
            .expect("rollback");
        assert_eq!(back.release.version_id, "good");
        assert_eq!(back.release.reason.as_deref(), Some("deploy new timed out"));
    }

    fn deployment(version_id: &str) -> Deployment<'_> {
        Deployment {
            env: "staging",
            service: "api",
            version_id,
            deployed_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn sh(script: &str, arg: &std::path::Path) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            arg.display().to_string(),
        ]
    }

    #[tokio::test]
    async fn deploy_command_runs_with_the_release_in_its_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("env");
        let script = "echo \"$LOCKSTEP_VERSION_ID $CODE_VERSION_UUID $DEPLOY_TIME_UTC \
                      $LOCKSTEP_SERVICE $LOCKSTEP_ENV\" > \"$0\"";
        let mut failures = 0;
        run_command(
            &sh(script, &out),
            &deployment("v-42"),
            Retry {
                retries: 0,
                first_delay: Duration::ZERO,
            },
            |_| failures += 1,
        )
        .await
        .expect("the command succeeds");
        assert_eq!(failures, 0);
        assert_eq!(
            std::fs::read_to_string(&out)
                .expect("the command ran")
                .trim(),
            "v-42 v-42 1970-01-01T00:00:00Z api staging"
        );
    }

    #[tokio::test]
    async fn failing_deploy_command_is_retried_then_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("attempts");
        let mut seen = Vec::new();
        let err = run_command(
            &sh("echo x >> \"$0\"; exit 7", &log),
            &deployment("v-1"),
            Retry {
                retries: 2,
                first_delay: Duration::from_millis(1),
            },
            |f| seen.push((f.attempt, f.attempts, f.status.code(), f.retry_in)),
        )
        .await
        .expect_err("the command fails");
        assert!(
            matches!(err, CommandError::Failed { attempts: 3, last } if last.code() == Some(7)),
            "{err:?}"
        );
        let ms = Duration::from_millis;
        assert_eq!(
            seen,
            [
                (1, 3, Some(7), Some(ms(1))),
                (2, 3, Some(7), Some(ms(2))),
                (3, 3, Some(7), None)
            ]
        );
        let runs = std::fs::read_to_string(&log).expect("ran");
        assert_eq!(runs.lines().count(), 3);
    }

    #[tokio::test]
    async fn deploy_command_that_succeeds_on_a_retry_is_a_success() {
        let dir = tempfile::tempdir().expect("tempdir");
        let once = dir.path().join("once");
        let mut failures = 0;
        run_command(
            &sh("[ -f \"$0\" ] || { touch \"$0\"; exit 1; }", &once),
            &deployment("v-1"),
            Retry {
                retries: 1,
                first_delay: Duration::from_millis(1),
            },
            |_| failures += 1,
        )
        .await
        .expect("the second attempt succeeds");
        assert_eq!(failures, 1);
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_not_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-program");
        let mut failures = 0;
        let err = run_command(
            &[missing.display().to_string()],
            &deployment("v-1"),
            Retry {
                retries: 5,
                first_delay: Duration::from_secs(60),
            },
            |_| failures += 1,
        )
        .await
        .expect_err("cannot start");
        assert!(matches!(err, CommandError::Spawn { .. }), "{err:?}");
        assert_eq!(failures, 0);
        let err = run_command(
            &[],
            &deployment("v-1"),
            Retry {
                retries: 0,
                first_delay: Duration::ZERO,
            },
            |_| {},
        )
        .await
        .expect_err("empty");
        assert!(matches!(err, CommandError::NoCommand));
    }
}
