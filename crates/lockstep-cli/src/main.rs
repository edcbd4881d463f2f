//! `lockstep`: the registry server and the command-line tools around it. Thin by design:
//! parsing, wiring and output formatting live here; behaviour lives in the library crates.

/// mimalloc instead of glibc malloc, for every subcommand: a profile of the gateway under
/// load spent about an eighth of its samples in glibc's malloc/free (hyper's buffers and
/// header maps, allocated and freed on the worker threads for every request); see the
/// Gateway section of docs/benchmarks.md for the measured difference. Its arenas are
/// committed on demand (`.cargo/config.toml`): with eager commit the agent's peak RSS more
/// than doubled.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cmd_agent;
mod cmd_alerts;
mod cmd_demo;
mod cmd_fleet;
mod cmd_gateway;
mod cmd_guard;
mod cmd_package;
mod cmd_release;
mod cmd_rollout;
mod cmd_serve;
mod cmd_token;
mod exit;
mod log_sink;
mod serve_config;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::process::ExitCode;

/// `0.1.0 (git 1a2b3c4…, built 2026-11-24T12:00:00Z)`: the version, the commit and the build
/// date baked in by `build.rs`.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("LOCKSTEP_GIT_SHA"),
    ", built ",
    env!("LOCKSTEP_BUILD_DATE"),
    ")"
);

/// Keeps a fleet of workers on the version that was deployed.
#[derive(Parser)]
#[command(name = "lockstep", version = VERSION, about, long_about = None, after_help = "\
Examples:
  Start a registry on the embedded store:   lockstep serve
  Register what was deployed:               lockstep register --service api --version-id 3f2a9c1e-… --version v1.4.0
  Deploy, wait for the fleet, roll back:    lockstep deploy --service api --wait --rollback-on-timeout -- ./deploy.sh
  Check the fleet from CI:                  lockstep verify --service api
  Find a release to roll back to:           lockstep history --service api
  Guard a worker in any language:           lockstep guard --env production --service api -- python3 worker.py

Environment: LOCKSTEP_REGISTRY (registry URL), LOCKSTEP_TOKEN (bearer token), LOCKSTEP_ENV
(environment, default production), LOCKSTEP_SERVICE (service), LOCKSTEP_LOG_FORMAT (text|json).

Exit codes: 0 success, 1 check failed (stale, timeout, rejected, unknown service), 2 usage or
configuration error (including a missing or too weak token), 3 registry unreachable, 78 a startup
guard refused to run.")]
struct Cli {
    /// Log lines on stderr as text or as one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "LOCKSTEP_LOG_FORMAT",
        value_enum,
        default_value_t,
        display_order = 900
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log line format.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
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
    /// The releases of a service, newest first (the ids `rollback --to` takes).
    History(cmd_release::HistoryArgs),
    /// Services, expected releases, instances and their status.
    Status(cmd_fleet::StatusArgs),
    /// [OK] / [STALE] / [MISSING] per instance; exit 0 only when all are current.
    Verify(cmd_fleet::VerifyArgs),
    /// Forget instances that will not come back (a killed worker, a removed host).
    Forget(cmd_fleet::ForgetArgs),
    /// Print the version detected for a source tree (VERSION file → git tag → dev-<sha7>).
    Detect(cmd_release::DetectArgs),
    /// Create, list and revoke API tokens.
    #[command(subcommand)]
    Token(cmd_token::TokenCommand),
    /// List and acknowledge drift alerts.
    #[command(subcommand)]
    Alerts(cmd_alerts::AlertsCommand),
    /// Run any worker under startup guards and stop it when it becomes stale.
    Guard(cmd_guard::GuardArgs),
    /// A self-contained walk-through: registry, three workers, a deploy, a stale worker refused.
    Demo(cmd_demo::DemoArgs),
    /// The update agent on a worker node: verified packages, atomic switch, self-rollback.
    Agent(cmd_agent::AgentArgs),
    /// Create, sign and verify update packages; generate signing keys.
    #[command(subcommand)]
    Package(cmd_package::PackageCommand),
    /// The version-aware HTTP entry point and RPC proxy.
    Gateway(cmd_gateway::GatewayArgs),
    /// Update a whole fleet through its agents: canary, batches, rollback on failures.
    #[command(subcommand)]
    Rollout(cmd_rollout::RolloutCommand),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one page per subcommand with --dir.
    Man(ManArgs),
}

/// `lockstep completions`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep completions bash > /etc/bash_completion.d/lockstep
  lockstep completions zsh > \"${fpath[1]}/_lockstep\"
  lockstep completions fish > ~/.config/fish/completions/lockstep.fish")]
struct CompletionsArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

/// `lockstep man`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep man | man -l -
  lockstep man --dir /usr/local/share/man/man1   # lockstep.1, lockstep-serve.1, …")]
struct ManArgs {
    /// Write lockstep.1 and one page per subcommand into this directory instead.
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
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
    /// Bearer token (`lockstep serve` prints an admin token on first start).
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

/// Whether stderr may carry colours: a terminal, and no `NO_COLOR`.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(log_sink::Stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn man(a: ManArgs) -> anyhow::Result<u8> {
    let cmd = Cli::command();
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| exit::fail(exit::USAGE, format!("{}: {e}", dir.display())))?;
            clap_mangen::generate_to(cmd, &dir)?;
            eprintln!("wrote the manual pages to {}", dir.display());
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
    }
    Ok(exit::OK)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The registry logs what it does; the tools print their own results, so only warnings
    // from the libraries are interesting there.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Agent(_) | Command::Gateway(_) => "info",
        // The demo narrates; its in-process registry and workers stay quiet unless asked.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    init_logging(cli.log_format, default_filter);
    if let Command::Completions(a) = &cli.command {
        clap_complete::generate(
            a.shell,
            &mut Cli::command(),
            "lockstep",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
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
            Command::History(a) => cmd_release::history(a).await,
            Command::Status(a) => cmd_fleet::status(a).await,
            Command::Verify(a) => cmd_fleet::verify(a).await,
            Command::Forget(a) => cmd_fleet::forget(a).await,
            Command::Detect(a) => cmd_release::detect(a),
            Command::Token(c) => cmd_token::run(c).await,
            Command::Alerts(c) => cmd_alerts::run(c).await,
            Command::Guard(a) => cmd_guard::run(a).await,
            Command::Demo(a) => cmd_demo::run(a).await,
            Command::Agent(a) => cmd_agent::run(a).await,
            Command::Package(c) => cmd_package::run(c),
            Command::Gateway(a) => cmd_gateway::run(a).await,
            Command::Rollout(c) => cmd_rollout::run(c).await,
            Command::Completions(_) => Ok(exit::OK),
            Command::Man(a) => man(a),
        }
    });
    // Buffered access lines go out before the process does.
    log_sink::flush();
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
