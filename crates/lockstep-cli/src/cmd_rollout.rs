//! `lockstep rollout start|watch|abort|retry|list`: fleet rollouts run by `serve`.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Output, RegistryArgs};

/// Rollout commands.
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Upload a package to `serve` and update the service's agents: canary, then batches.
    #[command(after_help = "\
Examples:
  lockstep rollout start --service api --package api-1.4.0.tar.gz --signature api-1.4.0.tar.gz.sig
  lockstep rollout start --service api --package p.tar.gz --canary 1 --concurrency 5 --max-failures 1
  lockstep rollout start --service api --package p.tar.gz --agents http://10.0.0.5:7071,http://10.0.0.6:7071

Prints the rollout id last; follow it with `lockstep rollout watch ID`.")]
    Start(StartArgs),
    /// Show a rollout's progress until it ends; exit 0 when it succeeded, 1 otherwise.
    #[command(after_help = "\
Examples:
  lockstep rollout watch 12
  lockstep rollout watch 12 -o json | jq .summary")]
    Watch(IdArgs),
    /// Stop a running rollout and roll back every node it touched (--keep: roll nothing back).
    #[command(after_help = "\
Examples:
  lockstep rollout abort 12
  lockstep rollout abort 12 --keep && lockstep rollout retry 12

Without --keep every node the rollout touched rolls back (at most --concurrency of the
rollout at once) and the previous release is expected again. With --keep nothing is rolled
back: the updated nodes stay on the new release, which stays expected with the previous one
accepted, and no alert is raised; `rollout retry` later updates only the other nodes.")]
    Abort(AbortArgs),
    /// Run an aborted or failed rollout again: only the nodes not on its release.
    #[command(after_help = "\
Examples:
  lockstep rollout retry 12 && lockstep rollout watch 12")]
    Retry(IdArgs),
    /// Recent rollouts, newest first.
    #[command(after_help = "\
Examples:
  lockstep rollout list
  lockstep rollout list -o json | jq '.rollouts[] | select(.running)'")]
    List(ListArgs),
}

/// `rollout start`.
#[derive(Args)]
pub struct StartArgs {
    /// Environment.
    #[arg(long, env = "LOCKSTEP_ENV", default_value = "production")]
    env: String,
    /// Service to update.
    #[arg(long)]
    service: String,
    /// The package (`lockstep package create`).
    #[arg(long)]
    package: PathBuf,
    /// Its detached signature (`lockstep package sign`).
    #[arg(long)]
    signature: Option<PathBuf>,
    /// Agent URLs, comma-separated (default: every live instance of the service that has
    /// an endpoint).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<String>,
    /// Nodes updated first, alone (0: no canary).
    #[arg(long, default_value_t = 1)]
    canary: usize,
    /// Nodes updated at once.
    #[arg(long, default_value_t = 3)]
    concurrency: usize,
    /// Failed nodes tolerated before the rollout stops and rolls back.
    #[arg(long, default_value_t = 0)]
    max_failures: usize,
    /// How often an updating agent is asked for its version.
    #[arg(long, default_value = "10s", value_parser = lockstep_core::duration::parse_duration)]
    poll: Duration,
    /// How long one node may take to report the new release healthy.
    #[arg(long, default_value = "5m", value_parser = lockstep_core::duration::parse_duration)]
    timeout: Duration,
    /// Whether the release may be rolled back automatically; `false` (a migration older
    /// releases cannot read) makes a failing rollout freeze and alert instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rollback_safe: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// A command on one rollout.
#[derive(Args)]
pub struct IdArgs {
    /// The rollout id (printed by `rollout start`).
    id: i64,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `rollout abort`.
#[derive(Args)]
pub struct AbortArgs {
    /// The rollout id (printed by `rollout start`).
    id: i64,
    /// Stop without rolling back: updated nodes keep the new release.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `rollout list`.
#[derive(Args)]
pub struct ListArgs {
    /// At most this many (1-1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(r: &RegistryArgs) -> anyhow::Result<Api> {
        let base = r
            .registry
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches('/')
            .to_string();
        Ok(Api {
            base,
            token: r.token.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = r.send().await.context("calling the registry")?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{} {}: {}",
                status.as_u16(),
                body["error"].as_str().unwrap_or(""),
                body["message"].as_str().unwrap_or("")
            );
        }
        Ok(body)
    }

    async fn get(&self, id: i64) -> anyhow::Result<Value> {
        self.send(self.req(reqwest::Method::GET, &format!("/v1/rollouts/{id}")))
            .await
    }
}

/// Runs a rollout command.
pub async fn run(cmd: RolloutCommand) -> anyhow::Result<u8> {
    match cmd {
        RolloutCommand::Start(a) => start(a).await,
        RolloutCommand::Watch(a) => watch(a).await,
        RolloutCommand::Abort(a) => {
            let api = Api::new(&a.registry)?;
            let keep = if a.keep { "?keep=true" } else { "" };
            let v = api
                .send(api.req(
                    reqwest::Method::POST,
                    &format!("/v1/rollouts/{}/abort{keep}", a.id),
                ))
                .await?;
            print_one(&v, a.output)?;
            Ok(0)
        }
        RolloutCommand::Retry(a) => {
            let api = Api::new(&a.registry)?;
            let v = api
                .send(api.req(
                    reqwest::Method::POST,
                    &format!("/v1/rollouts/{}/retry", a.id),
                ))
                .await?;
            print_one(&v, a.output)?;
            Ok(0)
        }
        RolloutCommand::List(a) => {
            let api = Api::new(&a.registry)?;
            let v = api
                .send(api.req(
                    reqwest::Method::GET,
                    &format!("/v1/rollouts?limit={}", a.limit),
                ))
                .await?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Text => {
                    println!(
                        "{:<6} {:<28} {:<10} {:<13} {:<20} SUMMARY",
                        "ID", "SERVICE", "VERSION", "PHASE", "CREATED"
                    );
                    for r in v["rollouts"].as_array().into_iter().flatten() {
                        println!(
                            "{:<6} {:<28} {:<10} {:<13} {:<20} {}",
                            r["id"],
                            format!(
                                "{}/{}",
                                r["env"].as_str().unwrap_or(""),
                                r["service"].as_str().unwrap_or("")
                            ),
                            r["version_id"]
                                .as_str()
                                .unwrap_or("")
                                .chars()
                                .take(8)
                                .collect::<String>(),
                            r["phase"].as_str().unwrap_or(""),
                            r["created_at"].as_str().unwrap_or(""),
                            r["summary"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
            Ok(0)
        }
    }
}

fn print_one(v: &Value, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Text => {
            println!(
                "rollout {} of {}/{}: {}",
                v["id"],
                v["env"].as_str().unwrap_or(""),
                v["service"].as_str().unwrap_or(""),
                v["phase"].as_str().unwrap_or("")
            );
            for n in v["nodes"].as_array().into_iter().flatten() {
                println!(
                    "  {:<32} {:<14} {}",
                    n["instance_id"].as_str().unwrap_or(""),
                    n["step"].as_str().unwrap_or(""),
                    n["reason"].as_str().unwrap_or("")
                );
            }
            println!("{}", v["summary"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn start(a: StartArgs) -> anyhow::Result<u8> {
    let manifest = lockstep_package::check(&a.package, &lockstep_package::Limits::default())
        .with_context(|| format!("reading the manifest of {}", a.package.display()))?;
    if !manifest.service.is_empty() && manifest.service != a.service {
        bail!(
            "the package is for service {:?}, not {:?}",
            manifest.service,
            a.service
        );
    }
    let package = tokio::fs::read(&a.package)
        .await
        .with_context(|| format!("reading {}", a.package.display()))?;
    let request = serde_json::json!({
        "env": a.env,
        "service": a.service,
        "version_id": manifest.version_id,
        "version": manifest.version,
        "git_sha": (!manifest.git_sha.is_empty()).then_some(&manifest.git_sha),
        "agents": a.agents,
        "canary": a.canary,
        "concurrency": a.concurrency,
        "max_failures": a.max_failures,
        "poll_secs": a.poll.as_secs_f64(),
        "timeout_secs": a.timeout.as_secs_f64(),
        "rollback_safe": a.rollback_safe,
    });
    let mut form = reqwest::multipart::Form::new()
        .text("request", request.to_string())
        .part(
            "package",
            reqwest::multipart::Part::bytes(package).file_name("package.tar.gz"),
        );
    if let Some(sig) = &a.signature {
        let bytes = tokio::fs::read(sig)
            .await
            .with_context(|| format!("reading {}", sig.display()))?;
        form = form.part(
            "signature",
            reqwest::multipart::Part::bytes(bytes).file_name("package.tar.gz.sig"),
        );
    }
    let api = Api::new(&a.registry)?;
    let v = api
        .send(
            api.req(reqwest::Method::POST, "/v1/rollouts")
                .multipart(form),
        )
        .await
        .context("starting the rollout")?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => {
            eprintln!(
                "rollout of {}/{} to {} started over {} nodes",
                a.env,
                a.service,
                manifest.version_id.chars().take(8).collect::<String>(),
                v["nodes"].as_array().map_or(0, Vec::len)
            );
            println!("{}", v["id"]);
        }
    }
    Ok(0)
}

fn count(v: &Value, steps: &[&str]) -> u64 {
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| steps.contains(&n["step"].as_str().unwrap_or("")))
        .count() as u64
}

async fn watch(a: IdArgs) -> anyhow::Result<u8> {
    let api = Api::new(&a.registry)?;
    let first = api.get(a.id).await?;
    let total = first["nodes"].as_array().map_or(0, Vec::len) as u64;
    let canary = first["settings"]["canary"].as_u64().unwrap_or(0).min(total);
    let show = a.output == Output::Text && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = |prefix: &str, len: u64| {
        let b = if show {
            multi.add(ProgressBar::new(len))
        } else {
            ProgressBar::hidden()
        };
        b.set_style(style.clone());
        b.set_prefix(prefix.to_string());
        b
    };
    let canary_bar = bar("canary", canary);
    let batch_bar = bar("batches", total - canary);
    let mut rollback_bar: Option<ProgressBar> = None;
    let mut last_event = String::new();
    let v = loop {
        let v = api.get(a.id).await?;
        let nodes: Vec<Value> = v["nodes"].as_array().cloned().unwrap_or_default();
        let done = |range: std::ops::Range<usize>| {
            nodes[range]
                .iter()
                .filter(|n| n["step"] != "pending" && n["step"] != "updating")
                .count() as u64
        };
        let c = canary as usize;
        canary_bar.set_position(done(0..c.min(nodes.len())));
        batch_bar.set_position(done(c.min(nodes.len())..nodes.len()));
        let working: Vec<String> = nodes
            .iter()
            .filter(|n| n["step"] == "updating" || n["step"] == "rolling_back")
            .map(|n| {
                format!(
                    "{} {}",
                    n["instance_id"].as_str().unwrap_or(""),
                    n["step"].as_str().unwrap_or("")
                )
            })
            .collect();
        if let Some(n) = nodes
            .iter()
            .max_by_key(|n| n["updated_at"].as_str().unwrap_or("").to_string())
        {
            last_event = format!(
                "last: {} {}{}",
                n["instance_id"].as_str().unwrap_or(""),
                n["step"].as_str().unwrap_or(""),
                n["reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        let msg = if working.is_empty() {
            last_event.clone()
        } else {
            format!("{} | {last_event}", working.join(", "))
        };
        canary_bar.set_message(msg.clone());
        batch_bar.set_message(msg);
        let touched_back = count(&v, &["rolling_back", "rolled_back", "rollback_failed"]);
        if touched_back > 0 || v["phase"] == "rolling_back" {
            let rb = rollback_bar.get_or_insert_with(|| bar("rollback", 0));
            rb.set_length(touched_back.max(1));
            rb.set_position(count(&v, &["rolled_back", "rollback_failed"]));
        }
        if !v["running"].as_bool().unwrap_or(false) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    canary_bar.finish();
    batch_bar.finish();
    if let Some(b) = rollback_bar {
        b.finish();
    }
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Text => {
            for n in v["nodes"].as_array().into_iter().flatten() {
                if n["step"] != "updated" {
                    eprintln!(
                        "  {:<32} {:<14} {}",
                        n["instance_id"].as_str().unwrap_or(""),
                        n["step"].as_str().unwrap_or(""),
                        n["reason"].as_str().unwrap_or("")
                    );
                }
            }
            println!("{}", v["summary"].as_str().unwrap_or(""));
        }
    }
    Ok(if v["outcome"] == "succeeded" { 0 } else { 1 })
}
