//! `axum-worker`: the smallest useful lockstep-aware HTTP service.
//!
//! It runs the startup guards, heartbeats to the registry advertising its URL, watches the
//! expected release, and serves `GET /` and `GET /whoami` behind `VersionCheckLayer`, so
//! the moment a deploy moves past it every request gets `503 {"error":"service_unavailable"}`
//! with `Retry-After: 5`. `GET /healthz` is exempt. `POST /rpc/{method}` answers the
//! gateway's RPC proxy: `echo` returns its JSON body, `whoami` the instance, `sleep`
//! waits `{"ms": N}` first, `fail` always answers 500.
//!
//! Configured like every lockstep worker: `LOCKSTEP_REGISTRY`, `LOCKSTEP_TOKEN`,
//! `LOCKSTEP_ENV`, `LOCKSTEP_SERVICE`, `LOCKSTEP_VERSION_ID` (the release it claims to run;
//! default: the baked git SHA).
//!
//! ```sh
//! LOCKSTEP_SERVICE=api LOCKSTEP_VERSION_ID=$ID axum-worker --listen 127.0.0.1:8081
//! ```

use anyhow::Context;
use axum::extract::{Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_util::StreamExt;
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
    /// Also serve routes that only tests need: any other path echoes the request as JSON,
    /// `GET /stall` sends its headers and then no body (`?partial`: one chunk, then
    /// nothing), and `GET /events` sends three server-sent events 300 ms apart, then keeps
    /// the response open for another second.
    #[arg(long)]
    test_routes: bool,
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
    let rpc_who = whoami.clone();
    let echo_who = whoami.clone();
    let mut app = Router::new()
        .route("/", get(|| async { "hello from a lockstep worker\n" }))
        .route(
            "/whoami",
            get(move || async move { Json((*whoami).clone()) }),
        )
        .route(
            "/rpc/{method}",
            post(move |Path(method): Path<String>, body: axum::body::Bytes| {
                let who = rpc_who.clone();
                async move { rpc(&method, &body, &who).await }
            }),
        );
    if args.test_routes {
        app = app
            .route("/stall", get(stall))
            .route("/events", get(events))
            .fallback(move |req: Request| {
                let who = echo_who.clone();
                async move { echo_request(req, who).await }
            });
    }
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

/// `POST /rpc/{method}`: the methods the gateway's RPC tests and examples call.
async fn rpc(method: &str, body: &[u8], who: &serde_json::Value) -> Response {
    let args: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(serde_json::json!({"error": "bad_request", "message": e.to_string()})),
                )
                    .into_response();
            }
        }
    };
    match method {
        "echo" => Json(args).into_response(),
        "whoami" => Json(who.clone()).into_response(),
        "sleep" => {
            let ms = args.get("ms").and_then(serde_json::Value::as_u64).unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
            Json(serde_json::json!({"slept_ms": ms})).into_response()
        }
        "fail" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": "method_failed", "message": "this method always fails"})),
        )
            .into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no_such_method", "message": format!("no method {method:?}")})),
        )
            .into_response(),
    }
}

/// Test route: what this instance received (path, query, the headers a gateway sets).
async fn echo_request(req: Request, who: Arc<serde_json::Value>) -> Response {
    let (parts, body) = req.into_parts();
    let h = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answer = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "instance_id": who["instance_id"],
        "version_id": who["version_id"],
        "x_request_id": h("x-request-id"),
        "x_lockstep_user": h("x-lockstep-user"),
        "x_lockstep_auth_level": h("x-lockstep-auth-level"),
        "x_forwarded_for": h("x-forwarded-for"),
        "authorization": h("authorization"),
    });
    // Read like a real handler would: a body cut off on the way is the caller's error.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut answer = answer;
    answer["body_len"] = body.len().into();
    Json(answer).into_response()
}

/// Test route: headers now, body never (an upstream that hangs after its headers); with
/// `?partial`, one chunk first (an upstream that stalls mid-body).
async fn stall(uri: axum::http::Uri) -> Response {
    let partial = uri.query().is_some_and(|q| q.contains("partial"));
    let first = futures_util::stream::iter(
        partial.then(|| Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"partial"))),
    );
    let body = first.chain(futures_util::stream::pending());
    Response::builder()
        .header("content-type", "text/plain")
        .body(axum::body::Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Test route: three server-sent events 300 ms apart, then the response stays open for a
/// second before it ends (so a proxy that buffers is caught).
async fn events() -> Response {
    let body = futures_util::stream::unfold(0u32, |i| async move {
        match i {
            0..=2 => {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                let e = format!("event: tick\ndata: {i}\n\n");
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(e)), i + 1))
            }
            3 => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                Some((Ok(axum::body::Bytes::from_static(b": end\n\n")), 4))
            }
            _ => None,
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(axum::body::Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
