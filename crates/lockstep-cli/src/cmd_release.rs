//! Commands that change what is expected: `register`, `deploy`, `rollback`; and `detect`.

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::{PutRelease, RollbackRequest};
use lockstep_client::RegistryClient;
use lockstep_client::deploy::{self, CommandError, Deployment, Retry, WaitOutcome};
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

/// What describes a release besides its id.
#[derive(Args, Clone, Debug, Default)]
pub struct ReleaseFields {
    /// Human label, e.g. v1.4.0 (default: detected from the current directory).
    #[arg(long)]
    version: Option<String>,
    /// Commit SHA (default: detected from the current directory's git).
    #[arg(long)]
    git_sha: Option<String>,
    /// Build date, RFC 3339 (default: now); an older build than the expected one is refused.
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
    /// Register even if it is older than the expected release.
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
    fn into_put(self, version_id: String, deployed_at: Option<OffsetDateTime>) -> PutRelease {
        let detected = lockstep_core::detect::detect(std::path::Path::new(".")).ok();
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
                .filter(|s| s != "unknown")
        });
        release.build_date = Some(self.build_date.unwrap_or_else(OffsetDateTime::now_utc));
        release.deployed_at = deployed_at;
        release.components = components;
        release.accepts = self.accepts;
        release.rollback_safe = !self.not_rollback_safe;
        release.reason = self.reason;
        PutRelease {
            release,
            force: self.force,
        }
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
  lockstep register --service api --version-id $GIT_SHA --reason 'hotfix' --force

Registering the release that is already expected is idempotent (same revision).
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
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

/// Registers a release.
pub async fn register(a: RegisterArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let put = a.fields.into_put(a.version_id, None);
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
The deploy command runs with LOCKSTEP_VERSION_ID and CODE_VERSION_UUID (the new UUID v4) and
DEPLOY_TIME_UTC (RFC 3339) in its environment; bake them into what you ship. The release is
registered only after the command succeeded; the new version id is the last line of stdout.

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
    #[arg(long, value_enum, default_value_t)]
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
            fail(exit::USAGE, format!("cannot run {program:?}: {source}"))
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
    eprintln!(
        "deploying {} {} (version id {})",
        a.svc.env,
        a.svc.service,
        short_id(&version_id)
    );
    run_deploy_command(&a, &version_id, now).await?;
    let mut put = a.fields.clone().into_put(version_id.clone(), Some(now));
    put.release.build_date = put.release.build_date.or(Some(now));
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

/// [`deploy::wait_for_fleet`] behind a progress bar; on a timeout, names the instances
/// still on another release.
async fn wait_for_fleet(
    client: &RegistryClient,
    svc: &ServiceArgs,
    version_id: &str,
    timeout: Duration,
) -> anyhow::Result<WaitOutcome> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} instances on {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(short_id(version_id).to_string());
    let outcome = deploy::wait_for_fleet(
        client,
        &svc.env,
        &svc.service,
        version_id,
        timeout,
        POLL,
        |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.current as u64);
            bar.tick();
        },
    )
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
  lockstep rollback --service api --to 3f2a9c1e-… --reason 'bad migration'
  lockstep rollback --service api --now           # emergency: skip canary and analysis")]
pub struct RollbackArgs {
    #[command(flatten)]
    svc: ServiceArgs,
    /// The version id to make expected (default: the previous release).
    #[arg(long)]
    to: Option<String>,
    /// Skip canary and analysis (the emergency path).
    #[arg(long)]
    now: bool,
    /// Roll back even from a release marked not rollback-safe.
    #[arg(long)]
    force: bool,
    /// Why (recorded in the event log).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
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
    };
    let stored = client
        .rollback(&a.svc.env, &a.svc.service, &body)
        .await
        .context("rolling back")?;
    print_release(a.output, "rolled back to", &stored)?;
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
    #[arg(long, value_enum, default_value_t)]
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
