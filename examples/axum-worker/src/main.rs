//! `axum-worker`: the smallest useful lockstep-aware HTTP service.
//!
//! It runs the startup guards, heartbeats to the registry advertising its URL, watches the
//! expected release, and serves `GET /` and `GET /whoami` behind `VersionCheckLayer`, so
//! the moment a deploy moves past it every request gets `503 {"error":"service_unavailable"}`
//! with `Retry-After: 5`. `GET /healthz` is exempt.
//!
//! Configured like every lockstep worker: `LOCKSTEP_REGISTRY`, `LOCKSTEP_TOKEN`,
//! `LOCKSTEP_ENV`, `LOCKSTEP_SERVICE`, `LOCKSTEP_VERSION_ID` (the release it claims to run;
//! default: the baked git SHA).
//!
//! ```sh
//! LOCKSTEP_SERVICE=api LOCKSTEP_VERSION_ID=$ID axum-worker --listen 127.0.0.1:8081
//! ```

use anyhow::Context;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use lockstep_client::{HeartbeatTask, RegistryClient, VersionCheckLayer, Watcher, WatcherConfig};
use std::io::Write;
use std::sync::Arc;

/// An example HTTP worker that refuses requests while it is stale.
#[derive(Parser)]
#[command(
    version,
    after_help = "Example:\n  LOCKSTEP_SERVICE=api LOCKSTEP_VERSION_ID=v1 axum-worker --listen 127.0.0.1:8081"
)]
struct Args {
    /// Address to listen on (port 0 picks one; printed as `listening on http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Serve without the version check (for measuring what the layer costs).
    #[arg(long)]
    no_version_check: bool,
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let info = lockstep_client::build_info!();
    // Before anything connects: a wrong binary must not get as far as serving.
    lockstep_client::guard::enforce(&info);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colour codes only on a terminal: redirected logs stay plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = WatcherConfig::from_env(info.git_sha).context("configuration")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let endpoint = format!("http://{addr}");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {endpoint}")?;
        out.flush()?;
    }
    let watcher = Watcher::start(cfg.clone())?;
    let mut heartbeat = lockstep_client::heartbeat_for(
        &cfg,
        Some(info.git_sha),
        std::process::id(),
        Some(endpoint),
    );
    heartbeat.build_date = info.build_date.and_then(|d| {
        time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc3339).ok()
    });
    heartbeat.health = Some("ok".into());
    let instance_id = heartbeat.instance_id.clone();
    let beats = HeartbeatTask::spawn(
        RegistryClient::new(&cfg.registry, cfg.token.clone())?,
        heartbeat,
        Some(watcher.clone()),
    );
    let whoami =
        Arc::new(serde_json::json!({ "instance_id": instance_id, "version_id": cfg.version_id }));
    let mut app = Router::new()
        .route("/", get(|| async { "hello from a lockstep worker\n" }))
        .route(
            "/whoami",
            get(move || async move { Json((*whoami).clone()) }),
        );
    if !args.no_version_check {
        // Innermost of the stack: every route above is checked, the exempt ones below are not.
        app = app.layer(VersionCheckLayer::new(watcher.clone()).exempt("/healthz"));
    }
    // Outside the check: health and metrics must answer even (especially) when stale.
    let metrics_watcher = watcher.clone();
    let app = app.route("/healthz", get(|| async { "ok\n" })).route(
        "/metrics",
        get(move || {
            let w = metrics_watcher.clone();
            async move {
                format!(
                    "# HELP lockstep_version_current 1 while this instance may serve.\n\
                     # TYPE lockstep_version_current gauge\nlockstep_version_current {}\n\
                     # HELP lockstep_registry_outage_seconds Seconds since a registry last answered.\n\
                     # TYPE lockstep_registry_outage_seconds gauge\nlockstep_registry_outage_seconds {}\n",
                    u8::from(w.is_current()),
                    w.outage_secs()
                )
            }
        }),
    );
    tracing::info!(%addr, service = %cfg.service, version = %lockstep_core::short_id(&cfg.version_id), "serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    beats.shutdown().await;
    Ok(())
}
