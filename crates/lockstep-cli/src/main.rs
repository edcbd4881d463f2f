//! `lockstep`: the registry server and the command-line tools around it. Thin by design:
//! parsing, wiring and output formatting live here; behaviour lives in the library crates.

mod cmd_demo;
mod cmd_fleet;
mod cmd_guard;
mod cmd_release;
mod cmd_serve;
mod cmd_token;
mod exit;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Keeps a fleet of workers on the version that was deployed.
#[derive(Parser)]
#[command(name = "lockstep", version, about, long_about = None, after_help = "\
Start a registry on the embedded store:   lockstep serve
Register what was deployed:               lockstep register --service api --version-id 3f2a9c1e-…
Deploy, wait for the fleet, roll back:    lockstep deploy --service api --wait --rollback-on-timeout -- ./deploy.sh
Check the fleet from CI:                  lockstep verify --service api

Exit codes: 0 success, 1 check failed (stale, timeout, rejected), 2 usage or configuration
error, 3 registry unreachable, 78 a startup guard refused to run.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry: HTTP API, watch streams, instance tracking.
    Serve(cmd_serve::ServeArgs),
    /// Register a release you already built and make it expected.
    Register(cmd_release::RegisterArgs),
    /// Generate a version id, run the deploy command with it, register it, optionally wait.
    Deploy(cmd_release::DeployArgs),
    /// Make the previous (or a named) release expected again.
    Rollback(cmd_release::RollbackArgs),
    /// Services, expected releases, instances and their status.
    Status(cmd_fleet::StatusArgs),
    /// [OK] / [STALE] / [MISSING] per instance; exit 0 only when all are current.
    Verify(cmd_fleet::VerifyArgs),
    /// Print the version detected for a source tree (VERSION file → git tag → dev-<sha7>).
    Detect(cmd_release::DetectArgs),
    /// Create, list and revoke API tokens.
    #[command(subcommand)]
    Token(cmd_token::TokenCommand),
    /// Run any worker under startup guards and stop it when it becomes stale.
    Guard(cmd_guard::GuardArgs),
    /// A self-contained walk-through: registry, three workers, a deploy, a stale worker refused.
    Demo(cmd_demo::DemoArgs),
}

/// Where the registry is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Registry URL; several comma-separated URLs fail over in order.
    #[arg(
        long,
        env = "LOCKSTEP_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    pub registry: String,
    /// Bearer token.
    #[arg(long, env = "LOCKSTEP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl RegistryArgs {
    /// A client for these settings.
    pub fn client(&self) -> anyhow::Result<lockstep_client::RegistryClient> {
        Ok(lockstep_client::RegistryClient::new(
            &self.registry,
            self.token.clone(),
        )?)
    }
}

/// How to print a result.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// For scripts: one JSON document on stdout.
    Json,
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_json =
        matches!(&cli.command, Command::Serve(a) if a.log_format == cmd_serve::LogFormat::Json);
    if !matches!(cli.command, Command::Serve(_)) && std::env::var_os("RUST_LOG").is_none() {
        // Tools print their own results; only warnings from the libraries are interesting.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    } else {
        init_logging(log_json);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => cmd_serve::run(a).await,
            Command::Register(a) => cmd_release::register(a).await,
            Command::Deploy(a) => cmd_release::deploy(a).await,
            Command::Rollback(a) => cmd_release::rollback(a).await,
            Command::Status(a) => cmd_fleet::status(a).await,
            Command::Verify(a) => cmd_fleet::verify(a).await,
            Command::Detect(a) => cmd_release::detect(a),
            Command::Token(c) => cmd_token::run(c).await,
            Command::Guard(a) => cmd_guard::run(a).await,
            Command::Demo(a) => cmd_demo::run(a).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit::code_of(&e);
            let msg = format!("{e:#}");
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            ExitCode::from(code)
        }
    }
}
