//! The lockstep registry (`lockstep serve`): the v1 HTTP API over a [`Store`], the watch hub
//! that pushes release changes to workers, token authentication, and instance tracking.
//!
//! Entry points: [`Registry::open`] prepares state from a store (warming caches and the
//! bootstrap admin token), [`Registry::router`] is the axum router (tests drive it with
//! `oneshot` or over a socket), and [`Registry::serve`] runs it until the shutdown future
//! resolves, then drains streams and flushes heartbeats.

mod admin;
mod alerts;
mod auth;
pub mod compat;
mod dashboard;
mod error;
mod instance_stream;
mod instances;
mod json;
mod metrics;
mod openapi;
mod releases;
mod rollouts;
pub mod service;
mod state;
mod status;
mod stream;

pub use auth::csrf_token;
pub use compat::CompatConfig;
pub use error::ApiError;
pub use openapi::ApiDoc;
pub use service::tokens::{generate_token, hash_token};
pub use service::{BOOTSTRAP_TOKEN_NAME, RegistryError, RegistryService};
pub use state::{Config, default_replica_id};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use lockstep_store::{Store, StoreError};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::{AppState, Counters};

/// Errors starting the registry.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed while loading state.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The socket failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// A registry ready to serve.
pub struct Registry {
    state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    /// The bootstrap admin token when it was generated now (first start): print it once.
    pub generated_admin_token: Option<String>,
    /// The source system's VersionManager routes, when enabled ([`Registry::with_compat`]).
    compat: Option<CompatConfig>,
}

impl Registry {
    /// Loads state from `store`. With `admin_token`, that secret becomes the `admin` token;
    /// without, a token is generated only when the store has none at all.
    pub async fn open(
        store: Arc<dyn Store>,
        config: Config,
        admin_token: Option<&str>,
    ) -> Result<Registry, ServeError> {
        Self::open_with_mirror(store, config, admin_token, None).await
    }

    /// Like [`Registry::open`], with the Redis mirror that the leader keeps up to date.
    pub async fn open_with_mirror(
        store: Arc<dyn Store>,
        config: Config,
        admin_token: Option<&str>,
        mirror: Option<lockstep_mirror::Mirror>,
    ) -> Result<Registry, ServeError> {
        let (service, generated) =
            RegistryService::open(store, config.clone(), admin_token, mirror).await?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state = Arc::new(AppState {
            service,
            config,
            shutdown: shutdown_rx,
            counters: Counters::default(),
            http: Default::default(),
        });
        Ok(Registry {
            state,
            shutdown_tx,
            generated_admin_token: generated,
            compat: None,
        })
    }

    /// Also serves the source system's VersionManager routes (`serve --compat authrim`),
    /// registering into and reading from `compat.env`; see [`compat`].
    pub fn with_compat(mut self, compat: CompatConfig) -> Self {
        self.compat = Some(compat);
        self
    }

    /// The registry service behind the API (for in-process callers and tests).
    pub fn service(&self) -> &Arc<RegistryService> {
        &self.state.service
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        let v1 = Router::new()
            .route(
                "/v1/envs/{env}/services/{svc}/release",
                get(releases::get_release).put(releases::put_release),
            )
            .route(
                "/v1/envs/{env}/services/{svc}/releases",
                get(releases::history),
            )
            .route(
                "/v1/envs/{env}/services/{svc}/rollback",
                post(releases::rollback),
            )
            .route("/v1/watch", get(stream::watch))
            .route("/v1/instances", post(instances::heartbeat))
            .route("/v1/instances/watch", get(instance_stream::watch_instances))
            .route("/v1/instances/{id}", delete(instances::deregister))
            .route("/v1/status", get(status::status))
            .route("/v1/services", get(status::services))
            .route("/v1/events", get(admin::events))
            .route("/v1/events/stream", get(stream::event_stream))
            .route(
                "/v1/tokens",
                get(admin::list_tokens).post(admin::create_token),
            )
            .route("/v1/tokens/{name}", delete(admin::revoke_token))
            .route("/v1/dashboard", get(dashboard::dashboard))
            .method_not_allowed_fallback(|| async {
                (
                    axum::http::StatusCode::METHOD_NOT_ALLOWED,
                    axum::Json(lockstep_api::ErrorBody {
                        error: "method_not_allowed".into(),
                        message: "this endpoint does not take that method; see the Allow header"
                            .into(),
                    }),
                )
            });
        let mut root = Router::new()
            .merge(v1)
            .route("/v1/alerts", get(alerts::list))
            .route("/v1/alerts/{id}/ack", post(alerts::ack))
            .route(
                "/v1/alert-channels",
                get(alerts::get_channels).put(alerts::put_channels),
            )
            .route(
                "/v1/rollouts",
                get(rollouts::list)
                    .post(rollouts::start)
                    .layer(DefaultBodyLimit::max(
                        self.state.service.rollouts().max_package_size(),
                    )),
            )
            .route("/v1/rollouts/{id}", get(rollouts::get))
            .route("/v1/rollouts/{id}/abort", post(rollouts::abort))
            .route("/v1/rollouts/{id}/retry", post(rollouts::retry));
        if let Some(compat) = &self.compat {
            root = root.merge(compat::router(compat, self.state.clone()));
        }
        root.route("/healthz", get(admin::healthz))
            .route("/readyz", get(admin::readyz))
            .route("/metrics", get(metrics::metrics))
            .route("/openapi.json", get(openapi::openapi_json))
            .route("/", get(dashboard::index))
            .route("/login", post(dashboard::login))
            .route("/logout", post(dashboard::logout))
            .route("/assets/{name}", get(dashboard::asset))
            .fallback(|| async {
                ApiError::NotFound(
                    lockstep_api::codes::NOT_FOUND,
                    "no such endpoint; see /openapi.json".into(),
                )
            })
            // Inside the routes (Router::layer runs after routing), so the matched route
            // names the series; outside the error mapping, so the final status is counted.
            .route_layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                metrics::track,
            ))
            // Rejections produced by axum itself (a query that does not parse) are plain
            // text; give every error the same JSON shape.
            .layer(axum::middleware::map_response(error::json_errors))
            // HTTP/1.1 makes Host mandatory (RFC 9112 §3.2); answering without one would
            // hide a broken client or proxy.
            .layer(axum::middleware::from_fn(error::require_host))
            // The cap applies before any handler reads a byte, so an oversized body costs
            // nothing but the 413.
            .layer(DefaultBodyLimit::max(lockstep_api::MAX_BODY_BYTES))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves; then ends every stream, lets
    /// in-flight requests finish (at most 30 s), stops the background task and flushes
    /// heartbeats.
    ///
    /// HTTP/1.1 only, on hyper directly rather than `axum::serve`: every watcher is a
    /// long-lived connection, and without the HTTP/2 and upgrade machinery each one costs
    /// markedly less memory (see docs/benchmarks.md).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let background = self
            .state
            .service
            .spawn_background(self.state.shutdown.clone());
        let service = hyper_util::service::TowerToHyperService::new(self.router());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // A client that opens a connection and never finishes its headers — or an idle
        // keep-alive connection that sends no next request — is closed after this long.
        // Established watch streams are past their headers and unaffected.
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.state.config.header_read_timeout);
        let limit = Arc::new(tokio::sync::Semaphore::new(
            self.state.config.max_connections,
        ));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut at_limit = false;
        loop {
            // A bound on open connections: at the limit, new ones wait in the kernel's
            // backlog until one closes, instead of exhausting memory or descriptors.
            let permit = match limit.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if !at_limit {
                        at_limit = true;
                        tracing::warn!(
                            max_connections = self.state.config.max_connections,
                            "connection limit reached; new connections wait until one closes \
                             (raise --max-connections if this is expected load)"
                        );
                    }
                    tokio::select! {
                        p = limit.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        _ = &mut shutdown => break,
                    }
                }
            };
            if at_limit && limit.available_permits() > self.state.config.max_connections / 10 {
                at_limit = false;
                tracing::info!("below the connection limit again");
            }
            let (stream, _peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // Server-sent events are small writes that must leave at once.
            let _ = stream.set_nodelay(true);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
        }
        tracing::info!("shutting down: closing streams, draining requests");
        let _ = self.shutdown_tx.send(true);
        drop(listener);
        if tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not finish within 30 s");
        }
        for task in background {
            let _ = task.await;
        }
        let n = self.state.service.stop().await;
        tracing::info!(flushed = n, "heartbeats flushed; bye");
        Ok(())
    }
}
