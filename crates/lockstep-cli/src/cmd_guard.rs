//! `lockstep guard -- CMD…`: startup guards and a stale-aware supervisor for a worker in
//! any language.
//!
//! It runs the startup guards against the environment (`GIT_SHA`, `EXPECTED_GIT_SHA`,
//! `LOCKSTEP_EXPECTED_VERSION`, and with `--service` the registry's expected release),
//! refusing with exit 78 before CMD starts when the environment is production — named by
//! `--env production` or by `LOCKSTEP_ENV`/`APP_ENV`/`NODE_ENV` (the rules are
//! `lockstep_client::guard`'s); then runs CMD with stdio passed through,
//! heartbeats on its behalf, forwards SIGTERM/SIGINT to it, and when the expected release
//! moves away from CMD's version either stops it (SIGTERM, `--grace`, SIGKILL; exit 1, so
//! the supervisor starts the new release) or only reports (`--on-stale=warn`).
//! Otherwise it exits with CMD's own code.
//!
//! The supervision itself is `lockstep_client::supervise`; this file parses the arguments,
//! runs the guards, and prints what the supervisor reports.

use clap::{Args, ValueEnum};
use lockstep_client::WatcherConfig;
use lockstep_client::guard::{self, Facts};
use lockstep_client::supervise::{self, Event, Policy, Registration, SuperviseError};
use lockstep_core::{parse_duration, short_id};
use std::time::Duration;

use crate::RegistryArgs;
use crate::exit::{self, fail};

/// What to do when the child's release stops being the expected one.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStale {
    /// SIGTERM, wait `--grace`, SIGKILL, exit 1.
    Exit,
    /// Log it and keep running.
    Warn,
}

/// `lockstep guard`.
#[derive(Args)]
#[command(after_help = "\
CMD's release is --version-id, else $LOCKSTEP_VERSION_ID, else $GIT_SHA; with none of them it
is unknown.

Production means an environment named production: --env production, or LOCKSTEP_ENV, APP_ENV or
NODE_ENV set to production. There the guard refuses (exit 78, CMD never starts) when
  - the release is unknown (no GIT_SHA, no --version-id),
  - GIT_SHA differs from EXPECTED_GIT_SHA, or the release from LOCKSTEP_EXPECTED_VERSION,
  - with --service: the registry expects another release, refuses the token, is not a lockstep
    registry, or has no release for the service while it knows others (a misspelled --service),
  - CMD goes through a development runner (tsx, ts-node, nodemon, vite-node, cargo run, go run;
    directly or via npx, npm exec, pnpm dlx…) and --allow-dev-runner is not given.
Heartbeats carry the child's pid, BUILD_DATE (or LOCKSTEP_BUILD_DATE) and GIT_SHA, else the
release when it is a SHA.
Nothing set anywhere counts as development: the same findings only warn and CMD starts (the
registry scope and heartbeats still use the default environment, production). A registry that
cannot be reached never blocks CMD: the guard fails open, like the watcher.

Exit codes: CMD's own; 1 when CMD was stopped because it became stale; 78 refused; 127 CMD not
found; 126 CMD not executable; 2 usage.

Examples:
  GIT_SHA=$(git rev-parse HEAD) EXPECTED_GIT_SHA=$DEPLOYED_SHA lockstep guard --env production -- python3 worker.py
  lockstep guard --env production --service extractor --version-id \"$LOCKSTEP_VERSION_ID\" --grace 30s -- node worker.js
  lockstep guard --service api --on-stale warn -- ./legacy-worker")]
pub struct GuardArgs {
    /// The service CMD belongs to; enables the registry check, heartbeats and the watch.
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    service: Option<String>,
    /// Environment of the registry check and heartbeats [default: production]. Naming
    /// production here (or in LOCKSTEP_ENV) makes the startup guards refuse instead of warn.
    #[arg(long, env = "LOCKSTEP_ENV", value_name = "NAME")]
    env: Option<String>,
    /// The release CMD runs (default: $LOCKSTEP_VERSION_ID, else $GIT_SHA).
    #[arg(long)]
    version_id: Option<String>,
    /// What to do when CMD's release is no longer expected.
    #[arg(long, value_enum, default_value_t = OnStale::Exit)]
    on_stale: OnStale,
    /// How long CMD gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    /// Run CMD in production even though it goes through a development runner (tsx, ts-node,
    /// nodemon, vite-node, cargo run, go run, also via npx/npm exec/pnpm dlx…). Logged.
    #[arg(long)]
    allow_dev_runner: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The worker command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// CMD's build time from `BUILD_DATE` (else `LOCKSTEP_BUILD_DATE`): RFC 3339, or a bare
/// `YYYY-MM-DD` (midnight UTC). Anything else is reported and left out, never sent empty.
fn build_date() -> Option<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    let (name, raw) = ["BUILD_DATE", "LOCKSTEP_BUILD_DATE"]
        .iter()
        .find_map(|k| env(k).map(|v| (*k, v)))?;
    if let Ok(t) = time::OffsetDateTime::parse(&raw, &Rfc3339) {
        return Some(t);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(&raw, &day) {
        return Some(d.midnight().assume_utc());
    }
    eprintln!("[version] WARNING: {name} is not an RFC 3339 time or a date; not reported");
    None
}

/// Runs the guard and supervises CMD.
pub async fn run(a: GuardArgs) -> anyhow::Result<u8> {
    let claimed = a
        .version_id
        .clone()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| env("LOCKSTEP_VERSION_ID"));
    let git_sha = env("GIT_SHA");
    let version_id = claimed
        .clone()
        .or_else(|| git_sha.clone())
        .unwrap_or_else(|| lockstep_core::detect::UNKNOWN.to_string());
    let scope_env = a
        .env
        .clone()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| lockstep_core::DEFAULT_ENV.to_string());
    let why = guard::production_reason(a.env.as_deref());
    let mut dev_runner = guard::dev_runner(&a.command);
    if a.allow_dev_runner
        && let Some(runner) = dev_runner.take()
    {
        eprintln!(
            "[version] WARNING: {} runs through a development runner (`{runner}`); allowed by --allow-dev-runner",
            a.command.first().map_or("CMD", String::as_str)
        );
        tracing::warn!(runner = %runner, "development runner allowed by --allow-dev-runner");
    }
    let facts = Facts {
        production: why.is_some(),
        // A wrapped program's build profile is not knowable from outside.
        debug_build: false,
        cargo_run: false,
        git_sha: git_sha
            .clone()
            .unwrap_or_else(|| lockstep_core::detect::UNKNOWN.to_string()),
        version_id: claimed,
        expected_git_sha: env("EXPECTED_GIT_SHA"),
        expected_version: env("LOCKSTEP_EXPECTED_VERSION"),
        wrapped: true,
        dev_runner,
    };
    if !guard::report_with(&guard::evaluate(&facts), why.as_deref()) {
        return Ok(guard::EXIT_REFUSED as u8);
    }
    let registration = match &a.service {
        Some(svc) => {
            lockstep_core::validate_name("service", svc)
                .map_err(|e| fail(exit::USAGE, e.to_string()))?;
            lockstep_core::validate_name("environment", &scope_env)
                .map_err(|e| fail(exit::USAGE, e.to_string()))?;
            let client = a.registry.client()?;
            let v = guard::check_registry(&client, &scope_env, svc, &version_id, facts.production)
                .await;
            if !guard::report_with(&v, why.as_deref()) {
                return Ok(guard::EXIT_REFUSED as u8);
            }
            let mut watcher = WatcherConfig::new(&a.registry.registry, svc, &version_id);
            watcher.token = a.registry.token.clone();
            watcher.env = scope_env.clone();
            // The mirrored `gitSha` must be the commit whenever it is known: a release
            // identified by its SHA (`--version-id $(git rev-parse HEAD)`) is that commit.
            let git_sha = git_sha
                .or_else(|| lockstep_core::is_git_sha(&version_id).then(|| version_id.clone()));
            Some(Registration {
                watcher,
                client,
                git_sha,
                build_date: build_date(),
            })
        }
        None => None,
    };
    let policy = Policy {
        on_stale: match a.on_stale {
            OnStale::Exit => supervise::OnStale::Stop,
            OnStale::Warn => supervise::OnStale::Warn,
        },
        grace: a.grace,
    };
    let program = a.command.first().cloned().unwrap_or_default();
    let outcome = supervise::run(&a.command, &version_id, registration, policy, |e| {
        print_event(&program, &version_id, &e)
    })
    .await
    .map_err(|e| match e {
        SuperviseError::NoCommand => fail(exit::USAGE, "no command given after --"),
        SuperviseError::Spawn { program, source } => {
            let code = supervise::spawn_exit_code(&source);
            let what = if code == 127 {
                "not found (check the path, or that it is on PATH)".to_string()
            } else {
                format!("cannot be executed ({source}; is it executable?)")
            };
            fail(code, format!("{program}: {what}"))
        }
        SuperviseError::Registry(e) => e.into(),
        SuperviseError::Io(e) => e.into(),
    })?;
    Ok(outcome.exit_code())
}

fn print_event(program: &str, version_id: &str, e: &Event) {
    match e {
        Event::Stale { expected } => eprintln!(
            "[version] {} runs {} but {} is expected now",
            program,
            short_id(version_id),
            expected
                .as_ref()
                .map_or("-", |e| short_id(&e.release.version_id))
        ),
        Event::Stopping { grace } => eprintln!(
            "[version] stopping it (SIGTERM, then SIGKILL after {:?})",
            grace
        ),
        Event::Killing => eprintln!("[version] still running after the grace period: SIGKILL"),
    }
}
