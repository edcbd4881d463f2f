//! `lockstep alerts list|ack`.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use crate::{Output, RegistryArgs};

/// Alert commands.
#[derive(Subcommand)]
pub enum AlertsCommand {
    /// List drift alerts, newest first (open ones by default; needs a viewer token).
    #[command(after_help = "\
Examples:
  lockstep alerts list
  lockstep alerts list --state all --service api
  lockstep alerts list -o json | jq '.alerts[] | select(.severity == \"critical\")'")]
    List(ListArgs),
    /// Acknowledge an alert (needs an operator token); acknowledging again changes nothing.
    #[command(after_help = "\
Examples:
  lockstep alerts ack 42
  lockstep alerts ack 42 --reason \"rolling the node pool\" -o json")]
    Ack(AckArgs),
}

/// Which alerts.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StateFilter {
    /// Open alerts.
    #[default]
    Open,
    /// Resolved alerts.
    Resolved,
    /// Both.
    All,
}

/// `alerts list`.
#[derive(Args)]
pub struct ListArgs {
    /// Which alerts.
    #[arg(long, value_enum, default_value_t)]
    state: StateFilter,
    /// Only this environment.
    #[arg(long)]
    env: Option<String>,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// At most this many (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `alerts ack`.
#[derive(Args)]
pub struct AckArgs {
    /// The alert id (first column of `alerts list`).
    id: String,
    /// Why (recorded in the event log).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Runs an alerts command.
pub async fn run(cmd: AlertsCommand) -> anyhow::Result<u8> {
    match cmd {
        AlertsCommand::List(a) => {
            let state = match a.state {
                StateFilter::Open => "open",
                StateFilter::Resolved => "resolved",
                StateFilter::All => "all",
            };
            let list = a
                .registry
                .client()?
                .alerts(state, a.env.as_deref(), a.service.as_deref(), a.limit)
                .await
                .context("listing alerts")?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Text => {
                    println!(
                        "{:<6} {:<9} {:<8} {:<9} {:<24} {:<28} {:<8} {:<8} {:<8} ACK",
                        "ID",
                        "SEVERITY",
                        "STATE",
                        "CONDITION",
                        "SERVICE",
                        "INSTANCE",
                        "DRIFT",
                        "RUNS",
                        "EXPECTED"
                    );
                    for x in &list.alerts {
                        println!(
                            "{:<6} {:<9} {:<8} {:<9} {:<24} {:<28} {:<8} {:<8} {:<8} {}",
                            x.alert_id,
                            x.severity.as_str(),
                            x.state.as_str(),
                            x.condition.as_str(),
                            format!("{}/{}", x.env, x.service),
                            x.instance_id,
                            x.drift_duration,
                            x.current_version,
                            x.expected_version.as_deref().unwrap_or("-"),
                            x.acknowledged_by.as_deref().unwrap_or("-"),
                        );
                    }
                    if list.alerts.is_empty() {
                        eprintln!("no {state} alerts");
                    }
                }
            }
        }
        AlertsCommand::Ack(a) => {
            let alert = a
                .registry
                .client()?
                .ack_alert(&a.id, a.reason.as_deref())
                .await
                .with_context(|| format!("acknowledging alert {}", a.id))?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string(&alert)?),
                Output::Text => println!(
                    "alert {} acknowledged by {}: {}",
                    alert.alert_id,
                    alert.acknowledged_by.as_deref().unwrap_or("-"),
                    alert.message
                ),
            }
        }
    }
    Ok(crate::exit::OK)
}
