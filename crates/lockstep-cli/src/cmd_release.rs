//! Commands about releases: `register`, `deploy` and `rollback` change what is expected;
//! `history` shows what was; `detect` reads a source tree.

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::{PutRelease, RollbackRequest};
use lockstep_client::RegistryClient;
use lockstep_client::deploy::{
    self, CommandError, Deployment, PrecheckError, Retry, Wait, WaitOutcome,
};
use lockstep_core::{Release, StoredRelease, parse_duration, short_id};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::exit::{self, fail};
use crate::{Output, RegistryArgs};

/// How often `deploy --wait` asks the registry for the fleet's status.
const POLL: Duration = Duration::from_millis(500);

/// Environment and service.
#[derive(Args, Clone, Debug)]
pub struct ServiceArgs {
    /// Environment.
    #[arg(long, env = "LOCKSTEP_ENV", default_value = "production")]
    pub env: String,
    /// Service name (`^[a-z0-9][a-z0-9._-]{0,63}$`).
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    pub service: String,
}

/// What describes a release besides its id. Nothing is guessed: the version, SHA and
/// components come from flags, or from a source tree with `--detect`.
#[derive(Args, Clone, Debug, Default)]
pub struct ReleaseFields {
    /// Human label, e.g. v1.4.0. A lower semantic version than the expected release's is
    /// refused as a downgrade unless --force.
    #[arg(long)]
    version: Option<String>,
    /// Commit SHA the release was built from.
    #[arg(long)]
    git_sha: Option<String>,
    /// Fill --version, --git-sha and components that were not given from a source tree
    /// (VERSION file → git tag → dev-<sha7>, as `lockstep detect` prints them).
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = ".")]
    detect: Option<PathBuf>,
    /// Build date, RFC 3339. Compared with the expected release's when the versions do
    /// not tell which is newer: an older build is refused unless --force.
    #[arg(long, value_parser = parse_time)]
    build_date: Option<OffsetDateTime>,
    /// Why (recorded in the event log).
    #[arg(long)]
    reason: Option<String>,
    /// Component version NAME=VERSION (repeatable).
    #[arg(long = "component", value_parser = parse_component)]
    components: Vec<(String, String)>,
    /// An older version id still allowed to serve while it drains (repeatable).
    #[arg(long)]
    accepts: Vec<String>,
    /// Mark the release as not rollback-safe (it ran a migration older releases cannot read).
    #[arg(long)]
    not_rollback_safe: bool,
    /// Register even if it is older than the expected release (a deliberate downgrade).
    #[arg(long)]
    force: bool,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{e}: use RFC 3339, e.g. 2026-11-24T12:00:00Z"))
}

fn parse_component(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("{s:?}: use NAME=VERSION"))
}

impl ReleaseFields {
    fn into_put(
        self,
        version_id: String,
        deployed_at: Option<OffsetDateTime>,
    ) -> anyhow::Result<PutRelease> {
        let detected = match &self.detect {
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(fail(
                        exit::USAGE,
                        format!("--detect {}: not a directory", dir.display()),
                    ));
                }
                Some(
                    lockstep_core::detect::detect(dir)
                        .map_err(|e| fail(exit::USAGE, format!("--detect: {e}")))?,
                )
            }
            None => None,
        };
        let mut components: BTreeMap<String, String> = detected
            .as_ref()
            .map(|d| d.components.clone())
            .unwrap_or_default();
        components.extend(self.components);
        let mut release = Release::new(version_id);
        release.version = self
            .version
            .or_else(|| detected.as_ref().map(|d| d.version.clone()));
        release.git_sha = self.git_sha.or_else(|| {
            detected
                .as_ref()
                .map(|d| d.git_sha.clone())
                .filter(|s| s != lockstep_core::detect::UNKNOWN)
        });
        release.build_date = self.build_date;
        release.deployed_at = deployed_at;
        release.components = components;
        release.accepts = self.accepts;
        release.rollback_safe = !self.not_rollback_safe;
        release.reason = self.reason;
        Ok(PutRelease {
            release,
            force: self.force,
        })
    }
}

fn print_release(output: Output, verb: &str, r: &StoredRelease) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(r)?),
        Output::Text => println!(
            "{verb} {}/{} {} ({}) revision {}",
            r.env,
            r.service,
            short_id(&r.release.version_id),
            r.release.version.as_deref().unwrap_or("-"),
            r.revision
        ),
    }
    Ok(())
}

/// `lockstep register`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep register --service api --version-id 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f --version v1.4.0
  lockstep register --service api --version-id \"$(git rev-parse HEAD)\" --detect
  lockstep register --service api --version-id \"$GIT_SHA\" --version v0.9.0 --reason 'back out v1.0' --force

Registering the release that is already expected is idempotent (same revision). A release older
than the expected one (a lower semantic --version, else an earlier --build-date) is refused
(exit 1) unless --force. Nothing is read from the current directory unless --detect says so.
Needs a deployer token (--token or LOCKSTEP_TOKEN).")]
pub struct RegisterArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// The identity instances must run (UUID, git SHA, …).
    #[arg(long)]
    version_id: String,
    #[command(flatten)]
    fields: ReleaseFields,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Registers a release.
pub async fn register(a: RegisterArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let put = a.fields.into_put(a.version_id, None)?;
    let stored = client
        .put_release(&a.svc.env, &a.svc.service, &put)
        .await
        .context("registering the release")?;
    print_release(a.output, "registered", &stored)?;
    Ok(exit::OK)
}

/// `lockstep deploy`.
#[derive(Args)]
#[command(after_help = "\
The deploy command runs with LOCKSTEP_VERSION_ID and CODE_VERSION_UUID (the new UUID v4),
DEPLOY_TIME_UTC (RFC 3339), LOCKSTEP_SERVICE and LOCKSTEP_ENV in its environment; bake them into
what you ship. The release is registered only after the command succeeded (its build date is the
deploy time); the new version id is the last line of stdout. A release the registry would refuse
(a lower semantic --version) is refused before the command runs.

--wait waits until every live instance reports the new release (exit 1 on --timeout, rolled back
with --rollback-on-timeout). When no instance of the service reports at all, there is nothing to
wait for: it says so within a second and exits 1, without rolling back.

Examples:
  lockstep deploy --service api -- ./deploy.sh
  lockstep deploy --service api --retries 3 --wait --timeout 5m --rollback-on-timeout -- kubectl apply -f api.yaml")]
pub struct DeployArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    #[command(flatten)]
    fields: ReleaseFields,
    /// Retry the deploy command this many times when it fails (exponential backoff).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// First backoff delay; it doubles after each failure (at most 60s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_delay: Duration,
    /// After registering, wait until every live instance reports the new release.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// When --wait times out, make the previous release expected again.
    #[arg(long, requires = "wait")]
    rollback_on_timeout: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format of the final result.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
    /// The deploy command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs the deploy command through [`deploy::run_command`], saying so on stderr when an
/// attempt fails.
async fn run_deploy_command(
    a: &DeployArgs,
    version_id: &str,
    deployed_at: OffsetDateTime,
) -> anyhow::Result<()> {
    let deployment = Deployment {
        env: &a.svc.env,
        service: &a.svc.service,
        version_id,
        deployed_at,
    };
    let retry = Retry {
        retries: a.retries,
        first_delay: a.retry_delay,
    };
    let result = deploy::run_command(&a.command, &deployment, retry, |f| {
        eprintln!(
            "deploy command failed ({}), attempt {} of {}",
            f.status, f.attempt, f.attempts
        );
        if let Some(delay) = f.retry_in {
            eprintln!("retrying in {}", humantime(delay));
        }
    })
    .await;
    result.map_err(|e| match e {
        CommandError::NoCommand => fail(exit::USAGE, "no deploy command given"),
        CommandError::Spawn { program, source } => {
            let why = if source.kind() == std::io::ErrorKind::NotFound {
                "not found (check the path; it runs from the current directory)".to_string()
            } else {
                format!("cannot be executed ({source}; is it executable?)")
            };
            fail(
                exit::USAGE,
                format!("deploy command {program}: {why}; nothing was registered"),
            )
        }
        CommandError::Failed { attempts, .. } => fail(
            exit::FAILED,
            format!("deploy command failed {attempts} time(s); nothing was registered"),
        ),
        e @ CommandError::Time(_) => e.into(),
    })
}

fn humantime(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        lockstep_core::format_secs(d.as_secs())
    }
}

/// Runs the deploy command, registers, waits.
pub async fn deploy(a: DeployArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let version_id = uuid::Uuid::new_v4().to_string();
    let now = OffsetDateTime::now_utc();
    let mut put = a.fields.clone().into_put(version_id.clone(), Some(now))?;
    put.release.build_date = put.release.build_date.or(Some(now));
    deploy::precheck(&client, &a.svc.env, &a.svc.service, &put.release, put.force)
        .await
        .map_err(|e| match e {
            PrecheckError::Client(e) => {
                anyhow::Error::from(e).context("reading the expected release")
            }
            PrecheckError::Refused(e) => {
                fail(exit::FAILED, format!("{e}; the deploy command did not run"))
            }
        })?;
    eprintln!(
        "deploying {} {} (version id {})",
        a.svc.env,
        a.svc.service,
        short_id(&version_id)
    );
    run_deploy_command(&a, &version_id, now).await?;
    let stored = client
        .put_release(&a.svc.env, &a.svc.service, &put)
        .await
        .context("the deploy command succeeded but registering the release failed")?;
    eprintln!(
        "registered {} revision {}",
        short_id(&version_id),
        stored.revision
    );
    let mut code = exit::OK;
    if a.wait {
        match wait_for_fleet(&client, &a.svc, &version_id, a.timeout).await? {
            WaitOutcome::AllCurrent { .. } => {
                eprintln!("every live instance runs {}", short_id(&version_id))
            }
            WaitOutcome::NoInstances { missing } => {
                code = exit::FAILED;
                let dead = if missing > 0 {
                    format!(" ({missing} known instance(s) stopped heartbeating)")
                } else {
                    String::new()
                };
                eprintln!(
                    "no live instance of {} in {} reports to the registry{dead}, so there is \
                     nothing to wait for. The release is registered and stays expected (not \
                     rolled back); start workers with LOCKSTEP_SERVICE={} LOCKSTEP_ENV={} \
                     (or `lockstep guard --service {}`), or deploy without --wait.",
                    a.svc.service, a.svc.env, a.svc.service, a.svc.env, a.svc.service
                );
            }
            WaitOutcome::TimedOut { .. } => {
                code = exit::FAILED;
                eprintln!(
                    "timed out after {} waiting for the fleet",
                    humantime(a.timeout)
                );
                if a.rollback_on_timeout {
                    let back = deploy::roll_back_after_timeout(
                        &client,
                        &a.svc.env,
                        &a.svc.service,
                        &version_id,
                    )
                    .await
                    .context("rolling back after the timeout")?;
                    eprintln!(
                        "rolled back to {} (revision {})",
                        short_id(&back.release.version_id),
                        back.revision
                    );
                }
            }
        }
    }
    if a.output == Output::Json {
        println!("{}", serde_json::to_string(&stored)?);
    }
    println!("{version_id}");
    Ok(code)
}

/// [`deploy::wait_for_fleet`] behind a progress bar (on a terminal only); on a timeout,
/// names the instances still on another release.
async fn wait_for_fleet(
    client: &RegistryClient,
    svc: &ServiceArgs,
    version_id: &str,
    timeout: Duration,
) -> anyhow::Result<WaitOutcome> {
    let bar = if crate::colour() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} instances on {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(short_id(version_id).to_string());
    let wait = Wait {
        poll: POLL,
        ..Wait::new(timeout)
    };
    let outcome = deploy::wait_for_fleet(client, &svc.env, &svc.service, version_id, wait, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.current as u64);
        bar.tick();
    })
    .await?;
    bar.finish_and_clear();
    if let WaitOutcome::TimedOut { behind, .. } = &outcome {
        for i in behind {
            eprintln!("  still on {}: {}", short_id(&i.version_id), i.instance_id);
        }
    }
    Ok(outcome)
}

/// `lockstep rollback`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep rollback --service api                 # the release before the current one
  lockstep history --service api                  # find the version id to go back to
  lockstep rollback --service api --to 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f --reason 'bad migration'
  lockstep rollback --now --service api --concurrency 5   # and the nodes of its rollout

A rollback takes effect at once: instances on any other release are told they are stale within
their watch (milliseconds) and refuse work. Rolling back from a release marked not rollback-safe
needs --force. Needs a deployer token.")]
pub struct RollbackArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// The version id to make expected (default: the previous release).
    #[arg(long)]
    to: Option<String>,
    /// The emergency path: also stop a running rollout of the service and roll every node
    /// it touched back at once — or, after its latest rollout completed, tell every node
    /// that rollout updated to roll back — with no canary and no batches; recorded as an
    /// emergency in the event log.
    #[arg(long)]
    now: bool,
    /// With --now: at most this many nodes rolling back at once (default: all).
    #[arg(long, requires = "now", value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Option<u32>,
    /// Roll back even from a release marked not rollback-safe.
    #[arg(long)]
    force: bool,
    /// Why (recorded in the event log).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Rolls back.
pub async fn rollback(a: RollbackArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let body = RollbackRequest {
        version_id: a.to,
        reason: a.reason,
        force: a.force,
        now: a.now,
        concurrency: a.concurrency,
    };
    let stored = client
        .rollback(&a.svc.env, &a.svc.service, &body)
        .await
        .context("rolling back")?;
    print_release(a.output, "rolled back to", &stored)?;
    Ok(exit::OK)
}

/// `lockstep history`.
#[derive(Args)]
#[command(after_help = "\
The current release is marked with *. Version ids are shown whole: copy one into
`lockstep rollback --to`.

Examples:
  lockstep history --service api
  lockstep history --service api --env staging --limit 5 -o json | jq -r '.releases[0].version_id'

Needs a viewer token. An unknown service exits 1 naming the known ones.")]
pub struct HistoryArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// At most this many releases (newest first).
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Prints the release history of a service.
pub async fn history(a: HistoryArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let h = lockstep_client::fleet::history_of(
        &client,
        &a.svc.env,
        &a.svc.service,
        a.limit.clamp(1, 1000),
    )
    .await
    .map_err(crate::cmd_fleet::fleet_error)?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(exit::OK);
    }
    if h.releases.is_empty() {
        println!(
            "no release registered for {} in {} yet",
            a.svc.service, a.svc.env
        );
        return Ok(exit::OK);
    }
    let mut rows = vec![
        [
            "",
            "REVISION",
            "VERSION ID",
            "VERSION",
            "KIND",
            "REGISTERED",
            "BY",
            "REASON",
        ]
        .map(String::from),
    ];
    for (n, r) in h.releases.iter().enumerate() {
        rows.push([
            if n == 0 { "*".into() } else { String::new() },
            r.revision.to_string(),
            r.release.version_id.clone(),
            r.release.version.clone().unwrap_or_else(|| "-".into()),
            r.kind.as_str().to_string(),
            crate::cmd_fleet::ts(Some(r.registered_at)),
            r.release.actor.clone().unwrap_or_else(|| "-".into()),
            r.release.reason.clone().unwrap_or_default(),
        ]);
    }
    crate::cmd_fleet::print_table(&rows);
    Ok(exit::OK)
}

/// `lockstep detect`.
#[derive(Args)]
#[command(after_help = "\
Order: a VERSION file, else `git describe --tags --abbrev=0`, else dev-<sha7>; components
come from the [components] table of lockstep.toml.

Examples:
  lockstep detect
  lockstep detect ./services/api --output json")]
pub struct DetectArgs {
    /// Source tree.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Prints the detected version.
pub fn detect(a: DetectArgs) -> anyhow::Result<u8> {
    if !a.dir.is_dir() {
        return Err(fail(
            exit::USAGE,
            format!("{} is not a directory", a.dir.display()),
        ));
    }
    let d = lockstep_core::detect::detect(&a.dir).map_err(|e| fail(exit::USAGE, e.to_string()))?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Text => {
            println!("{}", d.version);
            for (k, v) in &d.components {
                eprintln!("  {k} {v}");
            }
        }
    }
    Ok(exit::OK)
}
