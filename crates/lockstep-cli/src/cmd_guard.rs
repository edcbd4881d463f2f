//! `lockstep guard -- CMD…`: startup guards and a stale-aware supervisor for any worker.

use clap::Args;

use crate::exit::{self, fail};

/// `lockstep guard`.
#[derive(Args)]
pub struct GuardArgs {
    /// The command to supervise.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs the guard.
pub async fn run(_a: GuardArgs) -> anyhow::Result<u8> {
    Err(fail(exit::USAGE, "lockstep guard is being built"))
}
