//! `lockstep-gateway`: the version-aware HTTP entry point and RPC proxy.
//!
//! It routes by path, host and namespace ([`route`]), authenticates ([`auth`]), limits
//! ([`limit`]), and sends each request only to an instance of the routed service that may
//! serve — one running the expected release, or one the expected release still accepts
//! ([`upstream`]) — as learned from the registry's push streams ([`registry`]). The proxy
//! ([`proxy`], [`rpc`]) is the thin layer that wires those pure parts.
//!
//! ```no_run
//! # async fn run() -> Result<(), lockstep_gateway::GatewayError> {
//! let gw = lockstep_gateway::Gateway::start(std::path::Path::new("gateway.toml"), None).await?;
//! println!("listening on http://{}", gw.addr());
//! gw.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! Listeners: the main one serves the routes and `/rpc…`; the optional admin listener
//! (`admin_listen`) serves `/metrics` (Prometheus), `/healthz` and `/readyz`, so metrics
//! never share a port (or a route table) with the public.

pub mod auth;
pub mod config;
mod error;
mod h1;
pub mod limit;
mod metrics;
pub mod proxy;
pub mod registry;
pub mod route;
pub mod rpc;
pub mod upstream;
mod worker;

pub use config::Compiled;
pub use error::GatewayError;

use hyper_util::rt::TokioIo;
use limit::Limiter;
use metrics::Metrics;
use registry::Upstreams;
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A compiled configuration with what was built from it.
pub(crate) struct Live {
    pub(crate) cfg: Compiled,
    pub(crate) limiter: Arc<Limiter>,
}

pub(crate) struct Shared {
    live: RwLock<Arc<Live>>,
    pub(crate) upstreams: Arc<Upstreams>,
    /// Idle upstream connections kept per instance, per worker thread.
    pub(crate) pool_per_host: usize,
    pub(crate) metrics: Metrics,
    path: PathBuf,
}

impl Shared {
    pub(crate) fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn upstreams_now_ms(&self) -> u64 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    /// Re-reads the file; on error the running configuration stays.
    fn reload(&self) -> Result<bool, GatewayError> {
        let cfg = match Compiled::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), error = %e, "configuration refused; the previous one stays in force");
                return Err(e);
            }
        };
        let old = self.live();
        if cfg.file.registry != old.cfg.file.registry || cfg.file.token != old.cfg.file.token {
            tracing::warn!("registry or token changed: restart the gateway to apply");
        }
        if cfg.file.listen != old.cfg.file.listen
            || cfg.file.admin_listen != old.cfg.file.admin_listen
        {
            tracing::warn!("listen addresses changed: restart the gateway to apply");
        }
        let limiter = if cfg.file.rate_limit.redis == old.cfg.file.rate_limit.redis
            && cfg.file.rate_limit.redis_prefix == old.cfg.file.rate_limit.redis_prefix
        {
            old.limiter.clone()
        } else {
            Arc::new(build_limiter(&cfg)?)
        };
        self.upstreams.set_fail_open_for(cfg.fail_open_for);
        self.upstreams.follow(&cfg.environments());
        let routes = cfg.routes.len();
        if let Ok(mut g) = self.live.write() {
            *g = Arc::new(Live { cfg, limiter });
        }
        self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!(routes, "configuration reloaded");
        Ok(true)
    }
}

fn build_limiter(cfg: &Compiled) -> Result<Limiter, GatewayError> {
    Limiter::new(
        cfg.file.rate_limit.redis.as_deref(),
        cfg.file
            .rate_limit
            .redis_prefix
            .as_deref()
            .unwrap_or("lockstep-gateway"),
    )
    .map_err(GatewayError::Config)
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    listener: Option<tokio::net::TcpListener>,
    admin: Option<tokio::net::TcpListener>,
}

impl Gateway {
    /// Loads `config`, binds the listeners (`listen` overrides the file's address) and
    /// starts following the registry. Serving starts with [`Gateway::run_until`].
    pub async fn start(config: &Path, listen: Option<&str>) -> Result<Gateway, GatewayError> {
        let cfg = Compiled::load(config)?;
        let upstreams = Upstreams::new(&cfg.file.registry, cfg.file.token.clone())?;
        upstreams.set_fail_open_for(cfg.fail_open_for);
        let limiter = Arc::new(build_limiter(&cfg)?);
        let addr_s = listen.unwrap_or(&cfg.file.listen).to_string();
        let listener = tokio::net::TcpListener::bind(&addr_s)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: addr_s.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: addr_s,
                source,
            })?;
        let admin = match &cfg.file.admin_listen {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|source| {
                GatewayError::Listen {
                    addr: a.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let pool_per_host = cfg.file.upstream.pool_per_host.unwrap_or(64);
        upstreams.follow(&cfg.environments());
        let shared = Arc::new(Shared {
            live: RwLock::new(Arc::new(Live { cfg, limiter })),
            upstreams,
            pool_per_host,
            metrics: Metrics::default(),
            path: config.to_path_buf(),
        });
        Ok(Gateway {
            shared,
            addr,
            admin_addr,
            listener: Some(listener),
            admin,
        })
    }

    /// The main listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A handle to trigger reloads (SIGHUP) from elsewhere.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets open requests finish
    /// (for at most 10 s). Also watches the configuration file and reloads it on change.
    ///
    /// Connections are served by one worker thread per core, each with a single-threaded
    /// runtime and its own upstream connection pool: a request, its upstream connection and
    /// its answer stay on one thread, so handing a request to the upstream connection and
    /// the answer back costs no thread wakeup. Accepting, the registry streams, health
    /// checks and the admin listener stay on the caller's runtime.
    pub async fn run_until(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let sh = self.shared.clone();
        let watcher = tokio::spawn(watch_file(Arc::downgrade(&sh)));
        let checker = tokio::spawn(health_checks(Arc::downgrade(&sh)));
        let admin = self
            .admin
            .take()
            .map(|l| tokio::spawn(serve_admin(l, sh.clone())));
        let Some(listener) = self.listener.take() else {
            return;
        };
        let workers = worker::start(&sh, worker::count());
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next = 0usize;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    let Ok((stream, peer)) = accepted else { continue };
                    // Round robin: connections are long-lived, so this spreads them evenly.
                    workers.hand_over(next, stream, peer);
                    next = next.wrapping_add(1);
                }
            }
        }
        drop(listener);
        workers.drain(Duration::from_secs(10)).await;
        watcher.abort();
        checker.abort();
        if let Some(a) = admin {
            a.abort();
        }
    }
}

/// Reloads the configuration of a running gateway.
#[derive(Clone)]
pub struct Reloader(Arc<Shared>);

impl Reloader {
    /// Re-reads the file; on error the running configuration stays and the error is
    /// returned (and logged).
    pub fn reload(&self) -> Result<(), GatewayError> {
        self.0.reload().map(|_| ())
    }
}

/// Polls the file's modification time and content twice a second: cheap, and it works on
/// every file system (and with editors that replace the file).
async fn watch_file(sh: std::sync::Weak<Shared>) {
    let read = |p: &Path| std::fs::read(p).ok();
    let Some(first) = sh.upgrade() else { return };
    let mut last = read(&first.path);
    drop(first);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(sh) = sh.upgrade() else { return };
        let now = read(&sh.path);
        if now.is_some() && now != last {
            last = now;
            let _ = sh.reload();
        }
    }
}

/// Active health checks: `GET {endpoint}{health_path}` for every member, each interval.
async fn health_checks(sh: std::sync::Weak<Shared>) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
    else {
        return;
    };
    loop {
        let Some(s) = sh.upgrade() else { return };
        let live = s.live();
        let interval = live.cfg.health_interval;
        if let Some(path) = live.cfg.health_path.clone() {
            let members = s.upstreams.all_members();
            drop(s);
            let checks = members.into_iter().map(|m| {
                let http = http.clone();
                let url = format!("{}{}", m.endpoint, path);
                async move {
                    let ok = http
                        .get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if m.set_healthy(ok) {
                        if ok {
                            tracing::info!(instance = %m.instance_id, "health check passes again");
                        } else {
                            tracing::warn!(instance = %m.instance_id, "health check failed: not routing to it");
                        }
                    }
                }
            });
            futures_util::future::join_all(checks).await;
        }
        tokio::time::sleep(interval).await;
    }
}

async fn serve_admin(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let sh = sh.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let sh = sh.clone();
            async move {
                let r = match req.uri().path() {
                    "/metrics" => {
                        let mut r = http::Response::new(proxy::full(render_metrics(&sh)));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    }
                    "/upstreams" => {
                        let mut r =
                            http::Response::new(proxy::full(render_upstreams(&sh).to_string()));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        r
                    }
                    "/healthz" => http::Response::new(proxy::full("ok\n")),
                    "/readyz" if sh.upstreams.reachable() => {
                        http::Response::new(proxy::full("ready\n"))
                    }
                    "/readyz" => proxy::error_response(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "registry_unreachable",
                        "the registry does not answer",
                    ),
                    _ => proxy::error_response(
                        http::StatusCode::NOT_FOUND,
                        "not_found",
                        "admin serves /metrics, /upstreams, /healthz, /readyz",
                    ),
                };
                Ok::<_, std::convert::Infallible>(r)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Every pool as the gateway sees it: which instance may serve, and why not.
fn render_upstreams(sh: &Shared) -> serde_json::Value {
    let live = sh.live();
    let now = sh.upstreams_now_ms();
    let mut out = Vec::new();
    for env in live.cfg.environments() {
        for (svc, pool) in sh.upstreams.services(&env).unwrap_or_default() {
            let members: Vec<serde_json::Value> = pool
                .members
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "instance_id": m.instance_id,
                        "endpoint": m.endpoint,
                        "version": lockstep_core::short_id(&m.version_id),
                        "status": m.status().as_str(),
                        "healthy": m.healthy(),
                        "ejected": m.ejected(now),
                        "outstanding": m.outstanding(),
                    })
                })
                .collect();
            out.push(serde_json::json!({
                "env": env,
                "service": svc,
                "expected": pool.expected.as_ref().map(|r| lockstep_core::short_id(&r.release.version_id).to_string()),
                "servable": pool.servable(),
                "instances": members,
            }));
        }
    }
    serde_json::json!({
        "registry_reachable": sh.upstreams.reachable(),
        "instance_stream": sh.upstreams.streaming.load(Ordering::Relaxed),
        "pools": out,
    })
}

fn render_metrics(sh: &Shared) -> String {
    let mut out = String::new();
    sh.metrics.render(&mut out);
    let live = sh.live();
    let _ = writeln!(
        out,
        "# HELP lockstep_gateway_ratelimit_redis_fallback_total Requests counted locally because Redis did not answer.\n# TYPE lockstep_gateway_ratelimit_redis_fallback_total counter\nlockstep_gateway_ratelimit_redis_fallback_total {}",
        live.limiter.fallbacks.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP lockstep_gateway_registry_reachable 1 while the registry answers.\n# TYPE lockstep_gateway_registry_reachable gauge\nlockstep_gateway_registry_reachable {}\n# HELP lockstep_gateway_instance_stream 1 when instances come over the push stream, 0 when polled.\n# TYPE lockstep_gateway_instance_stream gauge\nlockstep_gateway_instance_stream {}",
        u8::from(sh.upstreams.reachable()),
        u8::from(sh.upstreams.streaming.load(Ordering::Relaxed))
    );
    let _ = writeln!(
        out,
        "# HELP lockstep_gateway_servable_instances Instances that may serve, per environment and service.\n# TYPE lockstep_gateway_servable_instances gauge"
    );
    for env in live.cfg.environments() {
        if let Ok(services) = sh.upstreams.services(&env) {
            for (svc, pool) in services {
                let _ = writeln!(
                    out,
                    "lockstep_gateway_servable_instances{{env=\"{env}\",service=\"{svc}\"}} {}",
                    pool.servable()
                );
            }
        }
    }
    out
}
