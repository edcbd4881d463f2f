//! `lockstep token create|list|revoke`.

use anyhow::Context;
use clap::{Args, Subcommand};
use lockstep_core::Role;
use time::format_description::well_known::Rfc3339;

use crate::exit;
use crate::{Output, RegistryArgs};

/// Token commands (need an admin token).
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once.
    #[command(after_help = "\
Roles: admin ⊃ deployer ⊃ operator ⊃ viewer; worker may only read releases, watch and heartbeat
(every role may do what a worker does). Token commands need an admin token.

Examples:
  lockstep token create --name ci --role deployer
  lockstep token create --name edge-workers --role worker --output json")]
    Create(CreateArgs),
    /// List tokens (names and roles; secrets are never shown again).
    #[command(after_help = "Example:\n  lockstep token list --output json")]
    List(ListArgs),
    /// Revoke a token by name; it stops working at once.
    #[command(
        after_help = "Examples:\n  lockstep token revoke --name ci\n  lockstep token revoke --name ci -o json"
    )]
    Revoke(RevokeArgs),
}

/// `token create`.
#[derive(Args)]
pub struct CreateArgs {
    /// Unique name; recorded as the actor of what the token does.
    #[arg(long)]
    name: String,
    /// admin, deployer, operator, viewer or worker.
    #[arg(long)]
    role: Role,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `token list`.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `token revoke`.
#[derive(Args)]
pub struct RevokeArgs {
    /// Name of the token.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// Runs a token command.
pub async fn run(cmd: TokenCommand) -> anyhow::Result<u8> {
    match cmd {
        TokenCommand::Create(a) => {
            let created = a
                .registry
                .client()?
                .create_token(&a.name, a.role)
                .await
                .context("creating the token")?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string(&created)?),
                Output::Text => {
                    eprintln!(
                        "created token {:?} with role {} (shown once):",
                        created.name, created.role
                    );
                    println!("{}", created.token);
                }
            }
        }
        TokenCommand::List(a) => {
            let list = a
                .registry
                .client()?
                .list_tokens()
                .await
                .context("listing tokens")?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Text => {
                    println!("{:<24} {:<9} CREATED", "NAME", "ROLE");
                    for t in list.tokens {
                        println!(
                            "{:<24} {:<9} {}",
                            t.name,
                            t.role,
                            t.created_at.format(&Rfc3339).unwrap_or_default()
                        );
                    }
                }
            }
        }
        TokenCommand::Revoke(a) => {
            a.registry
                .client()?
                .revoke_token(&a.name)
                .await
                .context("revoking the token")?;
            match a.output {
                Output::Json => println!("{}", serde_json::json!({ "revoked": a.name })),
                Output::Text => eprintln!("revoked token {:?}", a.name),
            }
        }
    }
    Ok(exit::OK)
}
