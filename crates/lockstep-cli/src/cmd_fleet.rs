//! Commands that read the fleet — `status` and `verify` — and `forget`, which removes
//! instances that will not come back. A scope that names nothing the registry knows is an
//! error naming the known ones (`lockstep_client::fleet`).

use clap::Args;
use lockstep_api::{InstanceStatus, StatusReport};
use lockstep_client::fleet::{self, FleetError};
use lockstep_client::verify::{self, Conclusion, Line, Rules};
use lockstep_core::{format_secs, short_id};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::exit::{self, fail};
use crate::{Output, RegistryArgs};

/// Which part of the fleet.
#[derive(Args, Clone, Debug)]
pub struct Scope {
    /// Only this environment (default: all). An unknown one exits 1 naming the known ones.
    #[arg(long, env = "LOCKSTEP_ENV")]
    env: Option<String>,
    /// Only this service (default: all). An unknown one exits 1 naming the known ones.
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    service: Option<String>,
}

/// A scoped read's error: an unknown scope is a failed check (exit 1), said plainly; a
/// registry error keeps its own exit code.
pub(crate) fn fleet_error(e: FleetError) -> anyhow::Error {
    match e {
        FleetError::Client(c) => c.into(),
        FleetError::Unknown(u) => fail(exit::FAILED, u.to_string()),
    }
}

/// `lockstep status`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep status
  lockstep status --service api -o json | jq '.environments[].services[].counts'

Needs a viewer token. An unknown --service or --env exits 1 naming the known ones.")]
pub struct StatusArgs {
    #[command(flatten)]
    scope: Scope,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// An RFC 3339 time in whole seconds, or `-`.
pub(crate) fn ts(t: Option<time::OffsetDateTime>) -> String {
    // Whole seconds: sub-second digits only make the table wider.
    t.and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// Prints the fleet.
pub async fn status(a: StatusArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let report = fleet::status_of(&client, a.scope.env.as_deref(), a.scope.service.as_deref())
        .await
        .map_err(fleet_error)?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(exit::OK);
    }
    if report.environments.is_empty() {
        println!("nothing registered yet");
        return Ok(exit::OK);
    }
    // The ROLLOUT column appears only when a rollout has something to say, beside the
    // status it explains (`draining  rollout 7: waiting for its batch`).
    let rollouts = report
        .environments
        .iter()
        .flat_map(|e| &e.services)
        .flat_map(|s| &s.instances)
        .any(|i| i.rollout.is_some());
    let mut rows = vec![
        [
            "ENV",
            "SERVICE",
            "EXPECTED",
            "INSTANCE",
            "RUNNING",
            "STATUS",
            "ROLLOUT",
            "DRIFT",
            "LAST SEEN",
        ]
        .map(String::from),
    ];
    for env in &report.environments {
        for svc in &env.services {
            let expected = svc
                .expected
                .as_ref()
                .map(|e| match &e.release.version {
                    Some(v) => format!("{} ({v})", short_id(&e.release.version_id)),
                    None => short_id(&e.release.version_id).to_string(),
                })
                .unwrap_or_else(|| "-".into());
            if svc.instances.is_empty() {
                rows.push(
                    [&env.name, &svc.name, &expected, "-", "-", "-", "", "-", "-"]
                        .map(String::from),
                );
            }
            for i in &svc.instances {
                rows.push([
                    env.name.clone(),
                    svc.name.clone(),
                    expected.clone(),
                    i.instance.instance_id.clone(),
                    short_id(&i.instance.version_id).to_string(),
                    i.status.as_str().to_string(),
                    i.rollout.as_ref().map(|r| r.describe()).unwrap_or_default(),
                    if i.drift_secs > 0 {
                        format_secs(i.drift_secs)
                    } else {
                        "-".into()
                    },
                    ts(Some(i.instance.last_seen)),
                ]);
            }
            let c = svc.counts;
            rows.push([
                String::new(),
                String::new(),
                String::new(),
                format!(
                    "{} current, {} draining, {} stale, {} missing",
                    c.current, c.draining, c.stale, c.missing
                ),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    if !rollouts {
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|r| {
                let mut r = r.to_vec();
                r.remove(6);
                r
            })
            .collect();
        print_table(&rows);
        return Ok(exit::OK);
    }
    print_table(&rows);
    Ok(exit::OK)
}

/// Prints rows as aligned columns (the first row is the header).
pub(crate) fn print_table<R: AsRef<[String]>>(rows: &[R]) {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.as_ref()) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `lockstep verify`.
#[derive(Args)]
#[command(after_help = "\
Prints [OK], [STALE] or [MISSING] per instance, then [OK] or [FAIL]. Exit 0 only when every
instance is current; 1 when any is not, when there is no instance at all (unless
--allow-empty), or when --service / --env names nothing the registry knows (never excused by
--allow-empty: a typo must not pass CI); 2 for a missing or too weak token; 3 when the
registry cannot be reached.

Examples:
  lockstep verify --service extractor
  lockstep verify --service extractor --expect \"$(git rev-parse HEAD)\"
  LOCKSTEP_SERVICE=extractor lockstep verify -o json")]
pub struct VerifyArgs {
    #[command(flatten)]
    scope: Scope,
    /// Check every instance against this git SHA (or version id) instead of the registry's
    /// expected release; a prefix of at least 7 characters matches.
    #[arg(long)]
    expect: Option<String>,
    /// Succeed when a known service has no instance at all (an unknown one still fails).
    #[arg(long)]
    allow_empty: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct Verdict<'a> {
    ok: bool,
    failing: usize,
    instances: Vec<VerdictLine<'a>>,
    /// Instances a running rollout has not reached yet (going to plan).
    rollout_waiting: Vec<RolloutNode<'a>>,
    /// Instances on which a rollout failed.
    rollout_failed: Vec<RolloutNode<'a>>,
}

/// An instance named in `rollout_waiting` / `rollout_failed` of `verify -o json`.
#[derive(Serialize)]
struct RolloutNode<'a> {
    env: &'a str,
    service: &'a str,
    instance_id: &'a str,
    rollout: i64,
    step: &'static str,
    reason: Option<&'a str>,
}

impl<'a> RolloutNode<'a> {
    fn of(l: &Line<'a>) -> Option<Self> {
        let r = l.instance.rollout.as_ref()?;
        Some(RolloutNode {
            env: l.env,
            service: l.service,
            instance_id: &l.instance.instance.instance_id,
            rollout: r.id,
            step: r.step.as_str(),
            reason: r.reason.as_deref(),
        })
    }
}

/// One line of `verify --output json`: the verdict and the instance as `/v1/status` has it.
/// `env` and `service` come from the instance itself — writing them here as well would put
/// each key twice in one object, which strict JSON parsers reject.
#[derive(Serialize)]
struct VerdictLine<'a> {
    verdict: &'static str,
    #[serde(flatten)]
    instance: &'a InstanceStatus,
}

impl<'a> From<&Line<'a>> for VerdictLine<'a> {
    fn from(l: &Line<'a>) -> Self {
        VerdictLine {
            verdict: l.mark.as_str(),
            instance: l.instance,
        }
    }
}

/// Prints `[OK] service instance short-version started …` lines (with the instance's
/// rollout step when it has one: `(rollout 7: waiting for its batch)`).
pub(crate) fn print_verdict_lines(lines: &[Line<'_>]) {
    for l in lines {
        let i = &l.instance.instance;
        let rollout = l
            .instance
            .rollout
            .as_ref()
            .map(|r| format!(" ({})", r.describe()))
            .unwrap_or_default();
        println!(
            "[{}] {} {} {} started {}{rollout}",
            l.mark.as_str(),
            l.service,
            i.instance_id,
            short_id(&i.version_id),
            ts(i.started_at.or(Some(i.first_seen)))
        );
    }
}

/// Prints the nodes a rollout has not reached yet and those it failed on, each group on
/// its own lines, so "behind but going to plan" is not read as "broken".
fn print_rollout_groups(v: &verify::Verification<'_>) {
    let group = |title: &str, lines: Vec<&Line<'_>>| {
        if lines.is_empty() {
            return;
        }
        println!("{title} ({}):", lines.len());
        for l in lines {
            if let Some(r) = &l.instance.rollout {
                println!(
                    "  {} {} {}",
                    l.service,
                    l.instance.instance.instance_id,
                    r.describe()
                );
            }
        }
    };
    group("waiting for a running rollout", v.rollout_waiting());
    group("failed in a rollout", v.rollout_failed());
}

/// Verifies the fleet.
pub async fn verify(a: VerifyArgs) -> anyhow::Result<u8> {
    if a.expect.as_deref().is_some_and(str::is_empty) {
        return Err(fail(exit::USAGE, "--expect needs a SHA or version id"));
    }
    let client = a.registry.client()?;
    let report: StatusReport =
        fleet::status_of(&client, a.scope.env.as_deref(), a.scope.service.as_deref())
            .await
            .map_err(fleet_error)?;
    let rules = Rules {
        expect: a.expect.as_deref(),
        allow_empty: a.allow_empty,
    };
    let v = verify::verify(&report, &rules);
    if a.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Verdict {
                ok: v.ok(),
                failing: v.failing(),
                instances: v.lines.iter().map(VerdictLine::from).collect(),
                rollout_waiting: v
                    .rollout_waiting()
                    .into_iter()
                    .filter_map(RolloutNode::of)
                    .collect(),
                rollout_failed: v
                    .rollout_failed()
                    .into_iter()
                    .filter_map(RolloutNode::of)
                    .collect(),
            })?
        );
    } else {
        print_verdict_lines(&v.lines);
        print_rollout_groups(&v);
        match v.conclusion {
            Conclusion::Empty { allowed: true } => {
                println!("[OK] no instances (allowed by --allow-empty)")
            }
            Conclusion::Empty { allowed: false } => {
                println!("[FAIL] no instances found; pass --allow-empty if that is expected")
            }
            Conclusion::AllCurrent { total } => {
                println!("[OK] all {total} instance(s) current")
            }
            Conclusion::NotCurrent { failing, total } => {
                println!("[FAIL] {failing} of {total} instance(s) not current")
            }
        }
    }
    Ok(if v.ok() { exit::OK } else { exit::FAILED })
}

/// `lockstep forget`.
#[derive(Args)]
#[command(after_help = "\
An instance that stopped without deregistering (killed, its host gone) shows as [MISSING] and
fails `verify` until the registry forgets it (after --instance-retention, 24h by default).
Forget it now by id, or every missing instance of a scope with --missing. An instance that is
still running reappears with its next heartbeat.

Examples:
  lockstep forget api-7f9c-host3-12345
  lockstep forget --missing --service api
  lockstep forget --missing --env staging -o json

Any valid token may forget an instance (workers deregister themselves the same way).")]
pub struct ForgetArgs {
    /// Instance ids, as `lockstep status` shows them.
    #[arg(value_name = "INSTANCE_ID", required_unless_present = "missing")]
    ids: Vec<String>,
    /// Forget every missing instance (no heartbeat within its TTL) in --env / --service.
    #[arg(long)]
    missing: bool,
    #[command(flatten)]
    scope: Scope,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Forgets instances.
pub async fn forget(a: ForgetArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let mut ids = a.ids.clone();
    if a.missing {
        let report = fleet::status_of(&client, a.scope.env.as_deref(), a.scope.service.as_deref())
            .await
            .map_err(fleet_error)?;
        ids.extend(
            fleet::missing_instances(&report)
                .into_iter()
                .map(|i| i.instance_id.clone()),
        );
    }
    let mut forgotten = Vec::new();
    let mut unknown = Vec::new();
    for id in &ids {
        match client.deregister(id).await {
            Ok(()) => forgotten.push(id.clone()),
            Err(e) if e.code() == Some(lockstep_api::codes::NOT_FOUND) => unknown.push(id.clone()),
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("forgetting {id}")));
            }
        }
    }
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "forgotten": forgotten, "unknown": unknown })
        ),
        Output::Text => {
            for id in &forgotten {
                println!("forgot {id}");
            }
            for id in &unknown {
                eprintln!("no instance {id:?} is registered");
            }
            if ids.is_empty() {
                println!("no missing instance to forget");
            }
        }
    }
    Ok(if unknown.is_empty() {
        exit::OK
    } else {
        exit::FAILED
    })
}
