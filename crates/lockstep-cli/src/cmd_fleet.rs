//! Commands that read the fleet: `status` and `verify`.

use clap::Args;
use lockstep_api::{InstanceStatus, StatusReport};
use lockstep_client::verify::{self, Conclusion, Line, Rules};
use lockstep_core::{format_secs, short_id};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::exit::{self, fail};
use crate::{Output, RegistryArgs};

/// Which part of the fleet.
#[derive(Args, Clone, Debug)]
pub struct Scope {
    /// Only this environment (default: all).
    #[arg(long, env = "LOCKSTEP_ENV")]
    env: Option<String>,
    /// Only this service (default: all).
    #[arg(long)]
    service: Option<String>,
}

/// `lockstep status`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep status
  lockstep status --service api --output json | jq '.environments[].services[].counts'")]
pub struct StatusArgs {
    #[command(flatten)]
    scope: Scope,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

fn ts(t: Option<time::OffsetDateTime>) -> String {
    // Whole seconds: sub-second digits only make the table wider.
    t.and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// Prints the fleet.
pub async fn status(a: StatusArgs) -> anyhow::Result<u8> {
    let client = a.registry.client()?;
    let report = client
        .status(a.scope.env.as_deref(), a.scope.service.as_deref())
        .await?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(exit::OK);
    }
    if report.environments.is_empty() {
        println!("nothing registered yet");
        return Ok(exit::OK);
    }
    let mut rows = vec![
        [
            "ENV",
            "SERVICE",
            "EXPECTED",
            "INSTANCE",
            "RUNNING",
            "STATUS",
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
                    [&env.name, &svc.name, &expected, "-", "-", "-", "-", "-"].map(String::from),
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
            ]);
        }
    }
    print_table(&rows);
    Ok(exit::OK)
}

fn print_table(rows: &[[String; 8]]) {
    let mut widths = [0usize; 8];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `lockstep verify`.
#[derive(Args)]
#[command(after_help = "\
Prints [OK], [STALE] or [MISSING] per instance, then [OK] or [FAIL]. Exit 0 only when every
instance is current; 1 when any is not or when there is no instance at all (unless
--allow-empty); 3 when the registry cannot be reached.

Examples:
  lockstep verify --service extractor
  lockstep verify --service extractor --expect $(git rev-parse HEAD)")]
pub struct VerifyArgs {
    #[command(flatten)]
    scope: Scope,
    /// Check every instance against this git SHA (or version id) instead of the registry's
    /// expected release; a prefix of at least 7 characters matches.
    #[arg(long)]
    expect: Option<String>,
    /// Succeed when there is no instance at all.
    #[arg(long)]
    allow_empty: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct Verdict<'a> {
    ok: bool,
    failing: usize,
    instances: Vec<VerdictLine<'a>>,
}

/// One line of `verify --output json`.
#[derive(Serialize)]
struct VerdictLine<'a> {
    verdict: &'static str,
    env: &'a str,
    service: &'a str,
    #[serde(flatten)]
    instance: &'a InstanceStatus,
}

impl<'a> From<&Line<'a>> for VerdictLine<'a> {
    fn from(l: &Line<'a>) -> Self {
        VerdictLine {
            verdict: l.mark.as_str(),
            env: l.env,
            service: l.service,
            instance: l.instance,
        }
    }
}

/// Prints `[OK] service instance short-version started …` lines.
pub(crate) fn print_verdict_lines(lines: &[Line<'_>]) {
    for l in lines {
        let i = &l.instance.instance;
        println!(
            "[{}] {} {} {} started {}",
            l.mark.as_str(),
            l.service,
            i.instance_id,
            short_id(&i.version_id),
            ts(i.started_at.or(Some(i.first_seen)))
        );
    }
}

/// Verifies the fleet.
pub async fn verify(a: VerifyArgs) -> anyhow::Result<u8> {
    if a.expect.as_deref().is_some_and(str::is_empty) {
        return Err(fail(exit::USAGE, "--expect needs a SHA or version id"));
    }
    let client = a.registry.client()?;
    let report: StatusReport = client
        .status(a.scope.env.as_deref(), a.scope.service.as_deref())
        .await?;
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
            })?
        );
    } else {
        print_verdict_lines(&v.lines);
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
