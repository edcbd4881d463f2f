//! `lockstep serve`: opens the store, prints where it listens (and the bootstrap token on
//! first start), serves until SIGTERM or Ctrl-C, then drains and flushes.

use anyhow::Context;
use clap::Args;
use lockstep_core::parse_duration;
use lockstep_server::{Config, Registry};
use lockstep_store::Store;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::exit::{self, fail};
use crate::serve_config::{self, Threshold};

/// `lockstep serve`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep serve                                   # SQLite in ./lockstep-data, 127.0.0.1:7070
  lockstep serve --listen 0.0.0.0:7070 --data-dir /var/lib/lockstep
  LOCKSTEP_ADMIN_TOKEN=… lockstep serve --listen 127.0.0.1:0   # port 0 picks a free port
  lockstep serve --compat authrim                  # + the source system's VersionManager routes

The first start prints a bootstrap admin token once (unless LOCKSTEP_ADMIN_TOKEN is set);
create narrower tokens with `lockstep token create`. Every flag has an environment variable
(shown with each flag above). A data directory serves one registry at a time: a second serve on it refuses
to start (exit 2); replicas share state with --store postgres://… instead.")]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port, printed as `listening on http://ADDR`.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory of the embedded SQLite store.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value = "./lockstep-data")]
    data_dir: PathBuf,
    /// Store URL instead of the data dir: `postgres://user@host/db` for several replicas
    /// sharing one PostgreSQL, or `sqlite:///path/to/dir`.
    #[arg(long, env = "LOCKSTEP_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Bearer token presented to update agents during rollouts (the agents' `--token`).
    #[arg(long, env = "LOCKSTEP_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// Largest package `POST /v1/rollouts` accepts (`256M`, `1G`).
    #[arg(
        long,
        env = "LOCKSTEP_MAX_PACKAGE_SIZE",
        default_value = "256M",
        value_parser = crate::cmd_agent::parse_size,
        value_name = "SIZE"
    )]
    max_package_size: u64,
    /// This replica's id in `/v1/status`, `/healthz` and the leader lease
    /// (default: `<hostname>-<pid>`). Must differ between replicas.
    #[arg(long, env = "LOCKSTEP_REPLICA_ID")]
    replica_id: Option<String>,
    /// How long the leader lease lasts without renewal: after a crash of the leader,
    /// another replica takes over background work within about this long.
    #[arg(long, env = "LOCKSTEP_LEADER_LEASE", default_value = "5s", value_parser = parse_duration)]
    leader_lease: Duration,
    /// Mirror live instances to Redis hashes `<prefix>:worker:<service>:version`
    /// (best-effort, written by the leader only), e.g. `redis://127.0.0.1:6379`.
    #[arg(long, env = "LOCKSTEP_REDIS_MIRROR", hide_env_values = true)]
    redis_mirror: Option<String>,
    /// Key prefix of the Redis mirror.
    #[arg(long, env = "LOCKSTEP_REDIS_PREFIX", default_value = "lockstep")]
    redis_prefix: String,
    /// The environment whose instances the Redis mirror holds.
    #[arg(long, env = "LOCKSTEP_REDIS_ENV", default_value = "production")]
    redis_env: String,
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
    #[arg(long, env = "LOCKSTEP_INSTANCE_RETENTION", default_value = "24h", value_parser = parse_duration)]
    instance_retention: Duration,
    /// Close a connection that does not deliver a request's headers within this long (a
    /// stuck client, or an idle keep-alive connection). Open watch streams are unaffected.
    #[arg(long, env = "LOCKSTEP_HEADER_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// At most this many open connections, watch streams included; beyond it new
    /// connections wait until one closes (and a warning is logged).
    #[arg(long, env = "LOCKSTEP_MAX_CONNECTIONS", default_value_t = 25_000)]
    max_connections: usize,
    /// Configuration file (TOML): `[drift]` thresholds, `[alerts]` delivery, `[[channels]]`.
    /// A flag or environment variable below beats the same key in the file.
    #[arg(long, env = "LOCKSTEP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stale this long before a `low` alert (`[drift] low`; default 1m; `off` disables it).
    #[arg(long, env = "LOCKSTEP_DRIFT_LOW", value_name = "DURATION")]
    drift_low: Option<Threshold>,
    /// Stale this long before `medium` (`[drift] medium`; default 10m; `off` disables it).
    #[arg(long, env = "LOCKSTEP_DRIFT_MEDIUM", value_name = "DURATION")]
    drift_medium: Option<Threshold>,
    /// Stale this long before `high` (`[drift] high`; default 1h; `off` disables it).
    #[arg(long, env = "LOCKSTEP_DRIFT_HIGH", value_name = "DURATION")]
    drift_high: Option<Threshold>,
    /// Stale this long before `critical` (`[drift] critical`; default 24h; `off` disables it).
    #[arg(long, env = "LOCKSTEP_DRIFT_CRITICAL", value_name = "DURATION")]
    drift_critical: Option<Threshold>,
    /// Severity of a missing instance, or `thresholds` to count its drift like a stale one's
    /// (`[drift] missing`; default critical).
    #[arg(long, env = "LOCKSTEP_DRIFT_MISSING", value_name = "SEVERITY", value_parser = crate::serve_config::parse_missing)]
    drift_missing: Option<lockstep_core::MissingSeverity>,
    /// How often the leader checks drift when no release changed (`[drift] check_interval`;
    /// default 1s).
    #[arg(long, env = "LOCKSTEP_DRIFT_CHECK_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    drift_check_interval: Option<Duration>,
    /// Each alert channel sends at most one message per this window; what accumulates meanwhile
    /// goes out as one digest (`[alerts] rate_limit`; default 1m; 0 disables the limit).
    #[arg(long, env = "LOCKSTEP_ALERT_RATE_LIMIT", value_name = "DURATION", value_parser = parse_duration)]
    alert_rate_limit: Option<Duration>,
    /// Attempts per alert delivery before it is recorded as failed (`[alerts] max_attempts`;
    /// default 6).
    #[arg(long, env = "LOCKSTEP_ALERT_MAX_ATTEMPTS", value_name = "N")]
    alert_max_attempts: Option<u32>,
    /// Wait after a failed delivery, doubled after each further failure up to 5m
    /// (`[alerts] retry_base`; default 2s).
    #[arg(long, env = "LOCKSTEP_ALERT_RETRY_BASE", value_name = "DURATION", value_parser = parse_duration)]
    alert_retry_base: Option<Duration>,
    /// Alert channels as JSON (`{"channels": [...]}`, as `PUT /v1/alert-channels` takes),
    /// replacing `[[channels]]` of the file. Channels given either way replace the stored ones
    /// at start.
    #[arg(
        long,
        env = "LOCKSTEP_ALERT_CHANNELS",
        value_name = "JSON",
        hide_env_values = true
    )]
    alert_channels: Option<String>,
    /// Also serve another system's API on top of the registry: `authrim` adds the source
    /// system's VersionManager routes (`POST /api/internal/version/{worker}`, …) so its deploy
    /// script and Worker middleware work unchanged. Off by default.
    #[arg(long, env = "LOCKSTEP_COMPAT", value_enum, value_name = "PROFILE")]
    compat: Option<CompatProfile>,
    /// The environment the compatibility routes register into and read from.
    #[arg(
        long,
        env = "LOCKSTEP_COMPAT_ENV",
        default_value = "production",
        value_name = "NAME"
    )]
    compat_env: String,
}

/// APIs `serve --compat` can add.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompatProfile {
    /// The source system's VersionManager API (`/api/internal/version/{worker}`, `/version/{worker}`).
    Authrim,
}

/// Reads `--config` and the alert flags; a bad file or value is a usage error (exit 2).
fn alert_settings(
    args: &ServeArgs,
) -> anyhow::Result<(
    lockstep_server::service::alerts::AlertSettings,
    Option<Vec<lockstep_api::ChannelConfig>>,
)> {
    let file = match &args.config {
        Some(p) => serve_config::read(p).map_err(|e| fail(exit::USAGE, e))?,
        None => serve_config::FileConfig::default(),
    };
    let channels = match &args.alert_channels {
        Some(json) => Some(
            serde_json::from_str::<lockstep_api::AlertChannels>(json)
                .map_err(|e| fail(exit::USAGE, format!("--alert-channels: {e}")))?
                .channels,
        ),
        None => None,
    };
    let o = serve_config::Overrides {
        low: args.drift_low,
        medium: args.drift_medium,
        high: args.drift_high,
        critical: args.drift_critical,
        missing: args.drift_missing,
        check_interval: args.drift_check_interval,
        rate_limit: args.alert_rate_limit,
        max_attempts: args.alert_max_attempts,
        retry_base: args.alert_retry_base,
        channels,
    };
    serve_config::settings(file, o).map_err(|e| fail(exit::USAGE, e))
}

/// The store URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Opens the store; for SQLite, first locks its directory for the life of the process.
async fn open_store(
    args: &ServeArgs,
) -> anyhow::Result<(Arc<dyn Store>, Option<lockstep_store::DataDirLock>)> {
    let url = match &args.store {
        Some(url) => url.clone(),
        None => args.data_dir.display().to_string(),
    };
    if url.contains("://")
        && !["sqlite://", "postgres://", "postgresql://"]
            .iter()
            .any(|p| url.starts_with(p))
    {
        return Err(fail(
            exit::USAGE,
            format!(
                "unsupported --store {:?}: use postgres://… or sqlite:///path",
                redacted(&url)
            ),
        ));
    }
    let lock = match lockstep_store::lock::sqlite_dir(&url) {
        // Busy or not creatable: either way a setting to fix (exit 2).
        Some(dir) => Some(
            lockstep_store::DataDirLock::acquire(dir)
                .map_err(|e| fail(exit::USAGE, e.to_string()))?,
        ),
        None => None,
    };
    let store = lockstep_store::open_url(&url)
        .await
        .with_context(|| format!("opening the store {}", redacted(&url)))?;
    tracing::info!(store = %redacted(&url), backend = store.backend(), "store opened");
    Ok((store, lock))
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
    // Before the store: a bad configuration file is refused without touching anything.
    let (alert_settings, alert_channels) = alert_settings(&args)?;
    // Held until `run` returns: the data directory is ours while we serve.
    let (store, _lock) = open_store(&args).await?;
    if args.leader_lease < Duration::from_secs(1) {
        return Err(fail(exit::USAGE, "--leader-lease must be at least 1s"));
    }
    let mut config = Config {
        heartbeat_interval: args.heartbeat_interval,
        instance_ttl: args.instance_ttl,
        instance_retention: args.instance_retention,
        lease_ttl: args.leader_lease,
        header_read_timeout: args.header_timeout,
        max_connections: args.max_connections.max(1),
        lease_renew: (args.leader_lease / 5)
            .clamp(Duration::from_millis(200), Duration::from_secs(1)),
        ..Config::default()
    };
    if let Some(id) = args.replica_id.clone().filter(|s| !s.is_empty()) {
        config.replica_id = id;
    }
    let mirror = match &args.redis_mirror {
        Some(url) => {
            let m = lockstep_mirror::Mirror::start(lockstep_mirror::MirrorConfig {
                url: url.clone(),
                prefix: args.redis_prefix.clone(),
                env: args.redis_env.clone(),
            })
            .map_err(|e| fail(exit::USAGE, format!("--redis-mirror: {e}")))?;
            tracing::info!(prefix = %args.redis_prefix, env = %args.redis_env,
                "redis mirror on (written by the leader)");
            Some(m)
        }
        None => None,
    };
    tracing::info!(replica = %config.replica_id, "replica");
    if args.compat.is_some() {
        lockstep_core::validate_name("environment", &args.compat_env)
            .map_err(|e| fail(exit::USAGE, format!("--compat-env: {e}")))?;
    }
    let mut registry = Registry::open_with_mirror(
        store,
        config,
        args.admin_token.as_deref().filter(|t| !t.is_empty()),
        mirror,
    )
    .await?;
    if let Some(channels) = alert_channels {
        registry
            .service()
            .seed_alert_channels(channels)
            .await
            .map_err(|e| fail(exit::USAGE, format!("alert channels: {e}")))?;
    }
    registry.service().alerts().configure(alert_settings);
    if let Some(CompatProfile::Authrim) = args.compat {
        tracing::info!(env = %args.compat_env, "compatibility routes on: authrim VersionManager API");
        registry = registry.with_compat(lockstep_server::CompatConfig {
            env: args.compat_env.clone(),
        });
    }
    let rollouts = registry.service().rollouts();
    rollouts.set_agent_token(args.agent_token.clone().filter(|t| !t.is_empty()));
    rollouts.set_max_package_size(args.max_package_size);
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
