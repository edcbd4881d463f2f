//! `lockstep demo`: a self-contained walk-through.

use clap::Args;

use crate::exit::{self, fail};

/// `lockstep demo`.
#[derive(Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub async fn run(_a: DemoArgs) -> anyhow::Result<u8> {
    Err(fail(exit::USAGE, "lockstep demo is being built"))
}
