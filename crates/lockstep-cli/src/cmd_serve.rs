//! `lockstep serve`: opens the store, prints where it listens (and the bootstrap token on
//! first start), serves until SIGTERM or Ctrl-C, then drains and flushes.

use anyhow::Context;
use clap::{Args, ValueEnum};
use lockstep_core::parse_duration;
use lockstep_server::{Config, Registry};
use lockstep_store::{SqliteStore, Store};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::exit::{self, fail};

/// Log line format.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `lockstep serve`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep serve                                   # SQLite in ./lockstep-data, 127.0.0.1:7070
  lockstep serve --listen 0.0.0.0:7070 --data-dir /var/lib/lockstep
  LOCKSTEP_ADMIN_TOKEN=… lockstep serve --listen 127.0.0.1:0   # port 0 picks a free port

The first start prints a bootstrap admin token once (unless LOCKSTEP_ADMIN_TOKEN is set);
create narrower tokens with `lockstep token create`.")]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port, printed as `listening on http://ADDR`.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory of the embedded SQLite store.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value = "./lockstep-data")]
    data_dir: PathBuf,
    /// Store URL instead of the data dir: `sqlite:///path/to/dir`.
    #[arg(long, env = "LOCKSTEP_STORE")]
    store: Option<String>,
    /// The bootstrap admin token to use instead of a generated one.
    #[arg(long, env = "LOCKSTEP_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// After this long without a heartbeat an instance is `missing`.
    #[arg(long, env = "LOCKSTEP_INSTANCE_TTL", default_value = "30s", value_parser = parse_duration)]
    instance_ttl: Duration,
    /// How often instances are asked to heartbeat.
    #[arg(long, env = "LOCKSTEP_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Forget instances that have been missing this long.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    instance_retention: Duration,
    /// Log format on stderr.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

async fn open_store(args: &ServeArgs) -> anyhow::Result<Arc<dyn Store>> {
    let dir = match &args.store {
        None => args.data_dir.clone(),
        Some(url) if url.starts_with("sqlite://") => PathBuf::from(&url["sqlite://".len()..]),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            return Err(fail(
                exit::USAGE,
                "this build has no PostgreSQL backend yet; use the embedded store (--data-dir)",
            ));
        }
        Some(other) => {
            return Err(fail(
                exit::USAGE,
                format!("unsupported --store {other:?}: use sqlite:///path"),
            ));
        }
    };
    let store = SqliteStore::open(&dir)
        .await
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    tracing::info!(path = %dir.display(), "store: sqlite");
    Ok(Arc::new(store))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the registry.
pub async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    if args.instance_ttl < Duration::from_secs(1) {
        return Err(fail(exit::USAGE, "--instance-ttl must be at least 1s"));
    }
    let store = open_store(&args).await?;
    let config = Config {
        heartbeat_interval: args.heartbeat_interval,
        instance_ttl: args.instance_ttl,
        instance_retention: args.instance_retention,
        ..Config::default()
    };
    let registry = Registry::open(
        store,
        config,
        args.admin_token.as_deref().filter(|t| !t.is_empty()),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| {
            fail(
                exit::USAGE,
                format!("cannot listen on {}: {e}", args.listen),
            )
        })?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        writeln!(
            out,
            "API: http://{addr}/v1   OpenAPI: http://{addr}/openapi.json"
        )?;
        if let Some(t) = &registry.generated_admin_token {
            writeln!(out, "bootstrap admin token (shown once, store it now): {t}")?;
            writeln!(out, "  export LOCKSTEP_TOKEN={t}")?;
        }
        out.flush()?;
    }
    tracing::info!(%addr, "registry serving");
    registry.serve(listener, shutdown_signal()).await?;
    Ok(exit::OK)
}
