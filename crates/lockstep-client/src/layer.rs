//! `VersionCheckLayer`: a tower layer that refuses requests while this instance is stale.
//!
//! A stale instance answers `503 Service Unavailable`, `Retry-After: 5`, and the body
//! exactly `{"error":"service_unavailable"}` — never a version id, so a client learns
//! nothing about what runs where. A draining instance serves. Exempt path prefixes (health
//! checks, the deploy's own registration path) always pass. The check is one atomic load.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use lockstep_client::{VersionCheckLayer, Watcher, WatcherConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let watcher = Watcher::start(WatcherConfig::from_env(lockstep_client::build_info!().git_sha)?)?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .route("/healthz", get(|| async { "ok" }))
//!     .layer(VersionCheckLayer::new(watcher).exempt("/healthz"));
//! # Ok(()) }
//! ```

use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response, StatusCode, header};
use std::task::{Context, Poll};
use tower::{Layer, Service};

use crate::Watcher;

/// The exact body of a refusal.
pub const STALE_BODY: &str = r#"{"error":"service_unavailable"}"#;

/// Wraps services in [`VersionCheck`].
#[derive(Clone)]
pub struct VersionCheckLayer {
    watcher: Watcher,
    exempt: Vec<String>,
}

impl VersionCheckLayer {
    /// A layer checking against `watcher`.
    pub fn new(watcher: Watcher) -> Self {
        VersionCheckLayer {
            watcher,
            exempt: Vec::new(),
        }
    }

    /// Lets requests under `prefix` through even when stale, matching whole path segments:
    /// `exempt("/healthz")` covers `/healthz` and `/healthz/live`, not `/healthzX`.
    pub fn exempt(mut self, prefix: impl Into<String>) -> Self {
        self.exempt.push(prefix.into());
        self
    }
}

impl<S> Layer<S> for VersionCheckLayer {
    type Service = VersionCheck<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VersionCheck {
            inner,
            check: std::sync::Arc::new((self.watcher.clone(), self.exempt.clone())),
        }
    }
}

/// The service: refuses with 503 while stale, otherwise calls the inner service.
///
/// Routers clone their services per request, so everything but the inner service sits
/// behind one `Arc`: a clone is one reference-count increment, never an allocation.
#[derive(Clone)]
pub struct VersionCheck<S> {
    inner: S,
    check: std::sync::Arc<(Watcher, Vec<String>)>,
}

/// The response future: the inner service's, or a ready refusal.
pub type ResponseFuture<F, B, E> = Either<F, Ready<Result<Response<B>, E>>>;

/// The refusal response.
pub fn stale_response<B: From<&'static str>>() -> Response<B> {
    let mut resp = Response::new(B::from(STALE_BODY));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for VersionCheck<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: From<&'static str>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let (watcher, exempt) = &*self.check;
        if watcher.is_current() || exempt.iter().any(|p| under(req.uri().path(), p)) {
            Either::Left(self.inner.call(req))
        } else {
            Either::Right(ready(Ok(stale_response())))
        }
    }
}

/// Whether `path` is `prefix` or lies below it, segment-wise.
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod exempt_tests {
    use super::under;

    #[test]
    fn exempt_paths_match_whole_segments_only() {
        for (path, prefix, expect) in [
            ("/healthz", "/healthz", true),
            ("/healthz/live", "/healthz", true),
            ("/healthz/live", "/healthz/", true),
            ("/healthzX", "/healthz", false),
            ("/healthz-debug", "/healthz", false),
            ("/api/healthz", "/healthz", false),
            ("/anything", "/", true),
        ] {
            assert_eq!(under(path, prefix), expect, "{path} under {prefix}");
        }
    }
}
