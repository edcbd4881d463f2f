//! The proxy: the thin layer that wires routing, auth, limits and upstream selection
//! around one hyper client. Every step that decides something is a pure function from
//! another module; this one only moves bytes and headers and writes the access log.
//!
//! Order of the steps, and why:
//! 1. request id first, so every answer (even a 413) carries it;
//! 2. route, then auth before anything costly (no body read for a 401);
//! 3. rate limits after auth, so a user's bucket is known;
//! 4. pool check before reading the body: a 503 costs the client no upload;
//! 5. the request body: none, or small with a known length (≤ 64 KiB) — buffered, so a
//!    connect failure can be retried on another instance with the same bytes — or else
//!    streamed through under the size cap (413 up front on `Content-Length`, and when a
//!    chunked body goes past it the upstream call is aborted and the answer is a 413);
//! 6. upstream call under one deadline covering the response head *and its first body
//!    frame* (504 when either is late: an upstream hanging after its headers still gets a
//!    clear answer); from then on the body streams through frame by frame (event streams,
//!    downloads), and a pause between frames longer than `idle_timeout` aborts the
//!    connection (warning + `lockstep_gateway_upstream_errors_total{kind="idle"}`).

use crate::auth::{self, Decision, Identity, LEVEL_HEADER, USER_HEADER};
use crate::config::{Compiled, Fallback};
use crate::h1;
use crate::limit::{Rate, Verdict, headline};
use crate::route::{Route, normalize_host};
use crate::upstream::{Member, ReleaseChoice, seed};
use crate::{Live, Shared};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer.
pub type Body = BoxBody<Bytes, BoxError>;

/// Request id header, generated when absent and passed upstream.
pub const REQUEST_ID: &str = "x-request-id";
/// Header pinning a client to a release.
pub const VERSION_HEADER: &str = "x-lockstep-version";
/// Cookie pinning a client to a release.
pub const VERSION_COOKIE: &str = "lockstep-version";

/// Bodies up to this size with a known length are buffered so they can be retried.
const RETRY_BUFFER: u64 = 64 * 1024;

/// A request body on its way upstream: bytes in hand (retryable) or the client's stream.
pub enum ReqBody {
    /// Buffered (or empty): can be sent again to another instance.
    Bytes(Option<Bytes>),
    /// Streamed from the client under the size cap.
    Stream(Capped),
}

/// The client's body, cut off with an error once it passes the cap.
pub struct Capped {
    inner: Incoming,
    left: usize,
    over: Arc<AtomicBool>,
}

impl hyper::body::Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(c) => match ready!(Pin::new(&mut c.inner).poll_frame(cx)) {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        if d.len() > c.left {
                            c.over.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err("request body over the limit".into())));
                        }
                        c.left -= d.len();
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Bytes(b) => b.is_none(),
            ReqBody::Stream(c) => c.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream(c) => c.inner.size_hint(),
        }
    }
}

/// The request body as the attempts see it: bytes go again, a stream goes once.
pub(crate) enum Outgoing {
    Bytes(Option<Bytes>),
    Stream(Option<Capped>, Arc<AtomicBool>),
}

impl Outgoing {
    /// The body for the next attempt; `None` once a stream has been sent.
    fn next(&mut self) -> Option<ReqBody> {
        match self {
            Outgoing::Bytes(b) => Some(ReqBody::Bytes(b.clone())),
            Outgoing::Stream(s, _) => s.take().map(ReqBody::Stream),
        }
    }

    fn over_limit(&self) -> bool {
        matches!(self, Outgoing::Stream(_, over) if over.load(Ordering::Relaxed))
    }
}

/// Takes the client's body: nothing to read, small and known (buffered), or a stream.
pub(crate) async fn outgoing(
    body: Incoming,
    cfg: &Compiled,
    headers: &HeaderMap,
) -> Result<Outgoing, Response<Body>> {
    if body.is_end_stream() {
        return Ok(Outgoing::Bytes(None));
    }
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n > cfg.max_body as u64 => Err(too_large(cfg)),
        Some(n) if n <= RETRY_BUFFER => Box::pin(read_body(body, cfg, headers))
            .await
            .map(|b| Outgoing::Bytes(Some(b))),
        _ => {
            let over = Arc::new(AtomicBool::new(false));
            Ok(Outgoing::Stream(
                Some(Capped {
                    inner: body,
                    left: cfg.max_body,
                    over: over.clone(),
                }),
                over,
            ))
        }
    }
}

/// The pause allowed between two frames of an upstream's body: a timer armed only when
/// the upstream makes the proxy wait, so a body that is already there costs none.
struct IdleGuard {
    idle: std::time::Duration,
    last: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleGuard {
    fn new(idle: std::time::Duration) -> IdleGuard {
        IdleGuard {
            idle,
            last: tokio::time::Instant::now(),
            timer: None,
        }
    }

    /// A frame arrived.
    fn progressed(&mut self) {
        if self.timer.is_some() {
            self.last = tokio::time::Instant::now();
        }
    }

    /// The upstream made us wait: `Ready` once it has been silent for too long (then it is
    /// logged and counted, and the caller aborts the body).
    fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        sh: &Shared,
        member: &Member,
    ) -> Poll<BoxError> {
        loop {
            if self.timer.is_none() {
                self.last = tokio::time::Instant::now();
            }
            let deadline = self.last + self.idle;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            ready!(timer.as_mut().poll(cx));
            if tokio::time::Instant::now() >= self.last + self.idle {
                sh.metrics.upstream_error("idle");
                tracing::warn!(instance = %member.instance_id, idle_ms = self.idle.as_millis() as u64,
                    "upstream stalled mid-body; connection aborted");
                return Poll::Ready("upstream stalled mid-body".into());
            }
        }
    }
}

/// The size hint of a body whose first frame is in hand before the rest.
fn hint_with_first(first: Option<u64>, rest: SizeHint) -> SizeHint {
    let Some(n) = first else {
        return rest;
    };
    let mut h = SizeHint::new();
    h.set_lower(rest.lower() + n);
    if let Some(u) = rest.upper() {
        h.set_upper(u + n);
    }
    h
}

/// A streamed answer through hyper's client: the first frame (already awaited under the
/// deadline), then the upstream's body with an idle timeout between frames.
struct Streamed {
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    idle: IdleGuard,
    sh: Arc<Shared>,
    member: Arc<Member>,
    /// The upstream connection, back to the pool once the body has been read to the end.
    conn: Option<crate::worker::Conn>,
}

impl Streamed {
    fn done(&mut self) {
        if let Some(c) = self.conn.take() {
            crate::worker::checkin(&self.member.endpoint, c, self.sh.pool_per_host);
        }
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        // hyper signals the end of a length-delimited body only when the connection task
        // gets round to it; the length says so at once (and spares a timer and a wakeup).
        if this.inner.is_end_stream() {
            this.done();
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.idle.progressed();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.done();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let e = ready!(this.idle.poll_expired(cx, &this.sh, &this.member));
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64);
        hint_with_first(first, self.inner.size_hint())
    }
}

/// A streamed answer read by [`crate::h1`]: the first piece (awaited under the deadline),
/// then the rest off the connection with an idle timeout between reads; the connection
/// goes back to this thread's pool when the body has been read to its end.
struct RawStreamed {
    first: Option<Bytes>,
    reader: h1::Reader,
    conn: Option<h1::RawConn>,
    keep_alive: bool,
    idle: IdleGuard,
    sh: Arc<Shared>,
    member: Arc<Member>,
}

impl RawStreamed {
    /// The body was read to its end: the connection back to this thread's pool.
    fn release(&mut self) {
        if let Some(c) = self.conn.take().filter(|_| self.keep_alive) {
            crate::worker::checkin_raw(&self.member.endpoint, c, self.sh.pool_per_host);
        }
    }
}

impl hyper::body::Body for RawStreamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(d) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        match this.reader.poll_next(conn, cx) {
            Poll::Ready(Ok(Some(d))) => {
                this.idle.progressed();
                // The last piece of a body with a length: hyper may not ask again (the body
                // says it has ended), so the connection goes back now.
                if this.reader.is_done() {
                    this.release();
                }
                Poll::Ready(Some(Ok(Frame::data(d))))
            }
            Poll::Ready(Ok(None)) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                this.conn = None;
                Poll::Ready(Some(Err(e.to_string().into())))
            }
            Poll::Pending => {
                let e = ready!(this.idle.poll_expired(cx, &this.sh, &this.member));
                this.conn = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = match self.reader.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        };
        hint_with_first(self.first.as_ref().map(|d| d.len() as u64), rest)
    }
}

fn too_large(cfg: &Compiled) -> Response<Body> {
    let mut r = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &format!("the body is larger than {} bytes", cfg.max_body),
    );
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A JSON error answer `{"error": code, "message": …}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn unavailable(message: &str) -> Response<Body> {
    let mut r = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        message,
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// What the access log says about one request. Borrowed from the configuration in force
/// for the request, so that filling it in costs no allocation.
#[derive(Default)]
pub struct Log<'a> {
    /// Route name (`-` when none matched).
    pub route: &'a str,
    /// Environment served from.
    pub env: &'a str,
    /// Service.
    pub service: &'a str,
    /// Instance that answered (its endpoint and release are logged).
    pub upstream: Option<Arc<Member>>,
    /// User, if authenticated.
    pub user: Option<String>,
}

const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

const USER: HeaderName = HeaderName::from_static(USER_HEADER);
const LEVEL: HeaderName = HeaderName::from_static(LEVEL_HEADER);
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Drops hop-by-hop headers (and those the `Connection` header names).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the few names present is cheaper
    // than eight removals that each hash a name.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// The value of `X-Forwarded-For` for a client address.
pub(crate) fn ip_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The client connection a request came on.
pub(crate) struct Peer {
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// Its IP as a header value, made once per connection.
    pub(crate) ip_value: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ip_value: ip_header(addr.ip()),
        }
    }

    /// `X-Forwarded-For` for `ip`: the connection's own value when it is the peer.
    fn forwarded_for(&self, ip: IpAddr) -> HeaderValue {
        if ip == self.addr.ip() {
            self.ip_value.clone()
        } else {
            ip_header(ip)
        }
    }
}

/// The client's IP: the peer, or — when the peer is a trusted proxy — the last address in
/// `X-Forwarded-For` that is not one.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .rev()
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
}

/// The incoming id when it is sane, else a new one: a random per-process prefix and a
/// counter (unique, and no call into the OS per request as a random UUID would make).
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID_NAME).filter(|v| {
        !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic)
    }) {
        return v.clone();
    }
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, x) in [prefix, n].into_iter().enumerate() {
        for j in 0..16 {
            buf[i * 16 + j] = HEX[((x >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The release a request is pinned to, if any.
pub fn pinned(headers: &HeaderMap) -> Option<String> {
    headers
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .or_else(|| auth::cookie_value(headers, VERSION_COOKIE))
        .filter(|s| !s.is_empty())
}

fn rate_headers(h: &mut HeaderMap, v: &Verdict) {
    for (k, n) in [
        ("x-ratelimit-limit", u64::from(v.limit)),
        ("x-ratelimit-remaining", u64::from(v.remaining)),
        ("x-ratelimit-reset", v.reset_secs),
    ] {
        h.insert(k, HeaderValue::from(n));
    }
    if !v.allowed {
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(v.retry_after_secs),
        );
    }
}

/// Buckets a request touches on `route` (or the RPC endpoint when `None`).
fn buckets(
    cfg: &Compiled,
    route: Option<&Route>,
    id: Option<&Identity>,
    ip: IpAddr,
) -> Vec<(String, Rate)> {
    let mut keys = Vec::new();
    let (ru, ri, scope) = match route {
        Some(r) => (r.limits.per_user, r.limits.per_ip, r.name.as_str()),
        None => (None, None, ""),
    };
    if let Some(id) = id {
        match (ru, cfg.per_user) {
            (Some(rate), _) => keys.push((format!("u:{scope}:{}", id.user), rate)),
            (None, Some(rate)) => keys.push((format!("u::{}", id.user), rate)),
            _ => {}
        }
    }
    match (ri, cfg.per_ip) {
        (Some(rate), _) => keys.push((format!("ip:{scope}:{ip}"), rate)),
        (None, Some(rate)) => keys.push((format!("ip::{ip}"), rate)),
        _ => {}
    }
    keys
}

/// Entry for every request on the main listener.
pub(crate) async fn handle(sh: Arc<Shared>, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let start = Instant::now();
    let live = sh.live();
    let rid_value = request_id(req.headers());
    let rid = rid_value.to_str().unwrap_or("-");
    let method = req.method().clone();
    // A cheap copy (shared bytes), kept for the access log.
    let uri = req.uri().clone();
    let ip = client_ip(peer.addr.ip(), req.headers(), &live.cfg.trusted_proxies);
    let xff = peer.forwarded_for(ip);
    let mut log = Log {
        route: "-",
        ..Default::default()
    };
    sh.metrics
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut resp = dispatch(&sh, &live, req, ip, &xff, &uri, &rid_value, &mut log).await;
    sh.metrics
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    resp.headers_mut()
        .insert(REQUEST_ID_NAME, rid_value.clone());
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    sh.metrics.request(log.route, status, elapsed.as_secs_f64());
    tracing::info!(target: "lockstep_gateway::access",
        request_id = %rid, client = %ip, method = %method, path = uri.path(), route = %log.route,
        env = %log.env, service = %log.service,
        upstream = log.upstream.as_ref().map_or("-", |m| m.endpoint.as_str()),
        release = log.upstream.as_ref().map_or("-", |m| lockstep_core::short_id(&m.version_id)),
        user = log.user.as_deref().unwrap_or("-"),
        status, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
    resp
}

#[allow(clippy::too_many_arguments)]
async fn dispatch<'a>(
    sh: &Arc<Shared>,
    live: &'a Arc<Live>,
    req: Request<Incoming>,
    ip: IpAddr,
    xff: &HeaderValue,
    uri: &http::Uri,
    rid_value: &HeaderValue,
    log: &mut Log<'a>,
) -> Response<Body> {
    let rid = rid_value.to_str().unwrap_or("-");
    let cfg = &live.cfg;
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(normalize_host)
        .unwrap_or_default();
    let path = uri.path();
    if cfg.rpc_enabled && (path == "/rpc" || path.starts_with("/rpc/")) {
        log.route = "rpc";
        // Boxed, as every path off the common one: the request's future is moved as a
        // whole, so what it holds inline it copies on every request.
        return Box::pin(crate::rpc::handle(sh, live, req, ip, &host, rid, log)).await;
    }
    let Some(route) = crate::route::select(&cfg.routes, &host, path) else {
        log.route = "fallback";
        return match &cfg.fallback {
            Fallback::Status(s) => {
                error_response(*s, "not_found", "no route for this host and path")
            }
            Fallback::Upstream(base) => {
                Box::pin(fallback(sh, cfg, base, req, path, rid_value, xff, log)).await
            }
        };
    };
    log.route = &route.name;
    log.service = &route.service;
    // Auth before anything costly.
    let found = cfg.auth.identify(req.headers());
    let identity = match auth::decide(route.auth, found) {
        Decision::Allow(id) => id,
        Decision::Unauthorized { failed } => {
            return Box::pin(unauthorized(live, failed, ip)).await;
        }
        Decision::Forbidden => {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs a stronger level",
            );
        }
    };
    log.user = identity.as_ref().map(|i| i.user.clone());
    let verdict = match check_limits(sh, live, Some(route), identity.as_ref(), ip).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let ns_header = cfg
        .namespaces
        .header
        .as_ref()
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok());
    let env = cfg
        .namespaces
        .select(route.env.as_deref(), ns_header, &host);
    log.env = env;
    let pool = match sh.upstreams.pool(env, &route.service) {
        Ok(Some(p)) if p.servable() > 0 => p,
        Ok(_) => {
            let mut r = unavailable(&format!(
                "no instance of {} may serve right now",
                route.service
            ));
            if let Some(v) = verdict {
                rate_headers(r.headers_mut(), &v);
            }
            return r;
        }
        Err(_) => return unavailable("the registry has been unreachable for too long"),
    };
    let upstream_path = route.upstream_path(path, uri.query());
    let pin = pinned(req.headers());
    let choice = pin
        .as_deref()
        .map(ReleaseChoice::Pinned)
        .unwrap_or_default();
    let (mut parts, body) = req.into_parts();
    let mut body = match outgoing(body, cfg, &parts.headers).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if identity.is_some() {
        // Gateway credentials are the gateway's: the upstream gets the identity instead.
        parts.headers.remove(http::header::AUTHORIZATION);
        parts.headers.remove(auth::API_KEY_HEADER);
    }
    let idempotent = idempotent(&parts.method);
    let mut headers = Some(upstream_headers(
        std::mem::take(&mut parts.headers),
        rid_value,
        identity.as_ref(),
        xff,
    ));
    let attempts = cfg.attempts;
    let mut tried: Vec<Arc<Member>> = Vec::new();
    let mut last: Option<ForwardError> = None;
    for attempt in 0..attempts {
        let now = sh.upstreams_now_ms();
        let Some(member) = pool.select(choice, &tried, now, seed()) else {
            break;
        };
        if attempt > 0 {
            sh.metrics
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(b) = body.next() else {
            break;
        };
        // A later attempt is possible only with bytes in hand: then (and only then) the
        // headers are copied; the last possible attempt takes them.
        let h = if attempt + 1 < attempts && matches!(body, Outgoing::Bytes(_)) {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        log.upstream = Some(member.clone());
        let lease = member.lease();
        // Boxed: the request's future is moved whole into the connection's slot, and
        // this one (the upstream exchange with its timers) is most of it.
        let res = Box::pin(send(sh, cfg, &member, &parts.method, h, &upstream_path, b)).await;
        let res = match res {
            Err(_) if body.over_limit() => Err(ForwardError::TooLarge(cfg.max_body)),
            r => r,
        };
        drop(lease);
        match res {
            Ok(mut resp) => {
                let failed = resp.status().as_u16() >= 502 && resp.status().as_u16() <= 504;
                if member.record(failed, sh.upstreams_now_ms(), &cfg.ejection) {
                    sh.metrics
                        .ejections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(instance = %member.instance_id, "instance ejected after consecutive failures");
                }
                if let Some(v) = verdict {
                    rate_headers(resp.headers_mut(), &v);
                }
                if cfg.file.upstream.pin_sessions
                    && resp.status().is_success()
                    && pin.as_deref() != Some(member.version_id.as_str())
                    && let Ok(v) = HeaderValue::from_str(&format!(
                        "{VERSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax",
                        member.version_id
                    ))
                {
                    resp.headers_mut().append(http::header::SET_COOKIE, v);
                }
                return resp;
            }
            // The client's fault, not the instance's.
            Err(e @ ForwardError::TooLarge(_)) => return e.response(),
            Err(e) => {
                sh.metrics.upstream_error(e.kind());
                if member.record(true, sh.upstreams_now_ms(), &cfg.ejection) {
                    sh.metrics
                        .ejections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(instance = %member.instance_id, "instance ejected after consecutive failures");
                }
                // Nothing reached the instance after a connect failure, so any method may go
                // elsewhere; after a reset it may have, so only an idempotent one does.
                let retry = match e {
                    ForwardError::Connect(_) => true,
                    ForwardError::Reset(_) => idempotent,
                    _ => false,
                } && headers.is_some();
                tracing::warn!(request_id = %rid, instance = %member.instance_id, error = %e, "upstream failed");
                tried.push(member);
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    match last {
        Some(e) => e.response(),
        None => unavailable(&format!(
            "no instance of {} may serve right now",
            route.service
        )),
    }
}

/// An unmatched request sent to the fallback upstream.
#[allow(clippy::too_many_arguments)]
async fn fallback(
    sh: &Arc<Shared>,
    cfg: &Compiled,
    base: &str,
    req: Request<Incoming>,
    path: &str,
    rid_value: &HeaderValue,
    xff: &HeaderValue,
    log: &mut Log<'_>,
) -> Response<Body> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.to_string());
    let (parts, body) = req.into_parts();
    let mut body = match outgoing(body, cfg, &parts.headers).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let member = Arc::new(Member::new(
        "fallback",
        base,
        "",
        lockstep_core::Status::Current,
    ));
    log.upstream = Some(member.clone());
    let headers = upstream_headers(parts.headers, rid_value, None, xff);
    let Some(b) = body.next() else {
        return unavailable("no fallback upstream");
    };
    match send(sh, cfg, &member, &parts.method, headers, &pq, b).await {
        Ok(r) => r,
        Err(_) if body.over_limit() => too_large(cfg),
        Err(e) => e.response(),
    }
}

async fn unauthorized(live: &Arc<Live>, failed: bool, ip: IpAddr) -> Response<Body> {
    if failed {
        let v = live
            .limiter
            .check(&[(format!("authfail:{ip}"), live.cfg.failed_attempts)])
            .await;
        if let Some(v) = v.first().filter(|v| !v.allowed) {
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed authentication attempts",
            );
            rate_headers(r.headers_mut(), v);
            return r;
        }
    }
    let mut r = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        if failed {
            "the credential is not valid"
        } else {
            "a bearer token, API key or session is needed"
        },
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"lockstep-gateway\""),
    );
    r
}

/// Takes from the buckets of this request; `Err` is the 429 answer.
pub(crate) async fn check_limits(
    sh: &Arc<Shared>,
    live: &Arc<Live>,
    route: Option<&Route>,
    identity: Option<&Identity>,
    ip: IpAddr,
) -> Result<Option<Verdict>, Response<Body>> {
    let keys = buckets(&live.cfg, route, identity, ip);
    if keys.is_empty() {
        return Ok(None);
    }
    let verdicts = Box::pin(live.limiter.check(&keys)).await;
    let v = headline(&verdicts);
    if let Some(v) = v.filter(|v| !v.allowed) {
        sh.metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests",
        );
        rate_headers(r.headers_mut(), &v);
        return Err(r);
    }
    Ok(v)
}

/// Reads a request body under the size cap and the upstream deadline.
pub(crate) async fn read_body(
    body: Incoming,
    cfg: &Compiled,
    headers: &HeaderMap,
) -> Result<Bytes, Response<Body>> {
    let too_large = || too_large(cfg);
    if headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > cfg.max_body as u64)
    {
        return Err(too_large());
    }
    match tokio::time::timeout(cfg.timeout, Limited::new(body, cfg.max_body).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        // The client went away mid-body: nobody will read this answer.
        Ok(Err(_)) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "incomplete_body",
            "the request body broke off",
        )),
        Err(_) => Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body took too long",
        )),
    }
}

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    /// No connection could be made: nothing was sent, so retrying elsewhere is safe.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke before any answer came (a pooled connection the instance had
    /// closed, an instance killed mid-request): retried for idempotent methods only.
    #[error("no answer: {0}")]
    Reset(String),
    /// The deadline passed before the full answer.
    #[error("timed out")]
    Timeout,
    /// The connection broke or the answer was malformed.
    #[error("{0}")]
    Protocol(String),
    /// The client's streamed body went past the cap: the upstream call was aborted.
    #[error("request body over the limit")]
    TooLarge(usize),
}

impl ForwardError {
    fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Reset(_) => "reset",
            ForwardError::Timeout => "timeout",
            ForwardError::Protocol(_) => "protocol",
            ForwardError::TooLarge(_) => "too_large",
        }
    }

    pub(crate) fn response(&self) -> Response<Body> {
        match self {
            ForwardError::Timeout => error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream did not answer in time",
            ),
            ForwardError::Connect(_) => error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "no upstream instance could be reached",
            ),
            ForwardError::TooLarge(max) => {
                let mut r = error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!("the body is larger than {max} bytes"),
                );
                r.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ForwardError::Reset(_) | ForwardError::Protocol(_) => error_response(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the upstream answer broke off",
            ),
        }
    }
}

/// The headers an instance gets: hop-by-hop and identity headers of the client dropped,
/// the gateway's own set. Built once per request, however many attempts follow.
pub(crate) fn upstream_headers(
    mut headers: HeaderMap,
    rid: &HeaderValue,
    identity: Option<&Identity>,
    xff: &HeaderValue,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    if headers.keys().any(|k| *k == USER || *k == LEVEL) {
        headers.remove(USER);
        headers.remove(LEVEL);
    }
    if let Some(h) = headers.remove(http::header::HOST) {
        headers.insert(FORWARDED_HOST, h);
    }
    headers.insert(REQUEST_ID_NAME, rid.clone());
    // The client as the gateway determined it (an untrusted peer's own X-Forwarded-For is
    // not passed on: the upstream may believe this header).
    headers.insert(FORWARDED_FOR, xff.clone());
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(id) = identity
        && let Ok(u) = HeaderValue::from_str(&id.user)
    {
        headers.insert(USER, u);
        headers.insert(LEVEL, HeaderValue::from_static(id.level.as_str()));
    }
    headers
}

/// One call to one instance with buffered bytes (the RPC proxy's calls).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    sh: &Arc<Shared>,
    cfg: &Compiled,
    member: &Arc<Member>,
    parts: &http::request::Parts,
    path: &str,
    body: Bytes,
    rid: &str,
    identity: Option<&Identity>,
    ip: IpAddr,
) -> Result<Response<Body>, ForwardError> {
    let rid = HeaderValue::from_str(rid).unwrap_or_else(|_| HeaderValue::from_static("-"));
    let headers = upstream_headers(parts.headers.clone(), &rid, identity, &ip_header(ip));
    let body = ReqBody::Bytes(Some(body).filter(|b| !b.is_empty()));
    send(sh, cfg, member, &parts.method, headers, path, body).await
}

/// `fut`'s output, or `None` when `timer` fires first. The future is polled first, so
/// one that is ready at once never touches the timer.
async fn before<F: Future>(timer: Pin<&mut tokio::time::Sleep>, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = timer => None,
    }
}

/// One call to one instance: the response head and the first body frame (or the end of
/// the body) under one deadline, then the body streamed with an idle timeout.
pub(crate) async fn send(
    sh: &Arc<Shared>,
    cfg: &Compiled,
    member: &Arc<Member>,
    method: &Method,
    headers: HeaderMap,
    path: &str,
    body: ReqBody,
) -> Result<Response<Body>, ForwardError> {
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let Some((authority, base)) = crate::worker::split_endpoint(&member.endpoint) else {
        return Err(ForwardError::Connect(format!(
            "not an http:// endpoint: {}",
            member.endpoint
        )));
    };
    // One timer for both waits (the head, then the first frame), armed only if one of
    // them has to wait at all.
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let body = match body {
        ReqBody::Bytes(b) => {
            let target = if base.is_empty() {
                std::borrow::Cow::Borrowed(path)
            } else {
                std::borrow::Cow::Owned(format!("{base}{path}"))
            };
            let request = h1::encode_request(method, &target, authority, &headers, b.as_ref())
                .map_err(|e| ForwardError::Protocol(e.to_string()))?;
            return send_raw(sh, cfg, member, method, authority, &request, timer).await;
        }
        b => b,
    };
    // Origin form (`/path?query`) with the instance as `Host`, as a pooling client sends.
    let uri = if base.is_empty() {
        http::Uri::try_from(path)
    } else {
        let mut uri = String::with_capacity(base.len() + path.len());
        uri.push_str(base);
        uri.push_str(path);
        http::Uri::try_from(uri)
    }
    .map_err(|e: http::uri::InvalidUri| ForwardError::Protocol(e.to_string()))?;
    let host =
        HeaderValue::from_str(authority).map_err(|e| ForwardError::Protocol(e.to_string()))?;
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req.headers_mut().insert(http::header::HOST, host);
    let sent = crate::worker::send(&member.endpoint, authority, req);
    let (resp, conn) = match before(timer.as_mut(), sent).await {
        None => return Err(ForwardError::Timeout),
        Some(Err(crate::worker::SendError::Connect(e))) => return Err(ForwardError::Connect(e)),
        Some(Err(crate::worker::SendError::Reset(e))) => return Err(ForwardError::Reset(e)),
        Some(Ok(r)) => r,
    };
    let (mut rparts, mut rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    // Waiting for the first frame is what keeps "headers, then nothing" a clear 504; after
    // it, the client sees bytes as they come.
    let first = if rbody.is_end_stream() {
        None
    } else {
        match before(timer.as_mut(), rbody.frame()).await {
            None => return Err(ForwardError::Timeout),
            Some(None) => None,
            Some(Some(Err(e))) => return Err(ForwardError::Protocol(e.to_string())),
            Some(Some(Ok(f))) => Some(f),
        }
    };
    // The whole answer in one frame (the common small answer): hand it over as it is,
    // with its exact length and without a streaming wrapper.
    if rbody.is_end_stream() {
        drop(rbody);
        crate::worker::checkin(&member.endpoint, conn, sh.pool_per_host);
        let body = match first.map(Frame::into_data) {
            Some(Ok(data)) => full(data),
            Some(Err(trailers)) => BodyExt::boxed(http_body_util::StreamBody::new(
                futures_util::stream::once(async move { Ok::<_, BoxError>(trailers) }),
            )),
            None => full(Bytes::new()),
        };
        return Ok(Response::from_parts(rparts, body));
    }
    let body = Streamed {
        first,
        inner: rbody,
        idle: IdleGuard::new(cfg.idle_timeout),
        sh: sh.clone(),
        member: member.clone(),
        conn: Some(conn),
    };
    Ok(Response::from_parts(rparts, BodyExt::boxed(body)))
}

/// The head of an answer from `endpoint` to `request` (already encoded), on a pooled
/// [`h1::RawConn`] of this thread or a new one. A pooled connection that turns out closed
/// before any answer is replaced when the request may be sent again; otherwise, as for a
/// new connection, that is a reset.
async fn raw_head(
    endpoint: &str,
    authority: &str,
    method: &Method,
    request: &[u8],
) -> Result<(h1::Head, h1::RawConn), ForwardError> {
    let resend = idempotent(method);
    loop {
        let (mut conn, reused) = match crate::worker::checkout_raw(endpoint, !resend) {
            Some(c) => (c, true),
            // Boxed: connecting is rare (connections are pooled), and its future is big.
            None => match Box::pin(tokio::time::timeout(
                crate::worker::CONNECT_TIMEOUT,
                h1::RawConn::connect(authority),
            ))
            .await
            {
                Ok(Ok(c)) => (c, false),
                Ok(Err(e)) => return Err(ForwardError::Connect(e.to_string())),
                Err(_) => return Err(ForwardError::Connect("connect timed out".into())),
            },
        };
        match h1::exchange(&mut conn, request, method).await {
            Ok(head) => return Ok((head, conn)),
            Err(h1::Error::NotSent(_)) if reused => continue,
            Err(h1::Error::NoAnswer(_)) if reused && resend => continue,
            // Nothing left on a new connection: as good as not connected.
            Err(h1::Error::NotSent(e)) => return Err(ForwardError::Connect(e)),
            Err(h1::Error::NoAnswer(e)) => return Err(ForwardError::Reset(e)),
            Err(e @ h1::Error::Protocol(_)) => return Err(ForwardError::Protocol(e.to_string())),
        }
    }
}

/// [`send`] for a body in hand: the exchange by [`h1`], the answer's head and first piece
/// under the deadline, the rest streamed with an idle timeout.
async fn send_raw(
    sh: &Arc<Shared>,
    cfg: &Compiled,
    member: &Arc<Member>,
    method: &Method,
    authority: &str,
    request: &[u8],
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Result<Response<Body>, ForwardError> {
    let (head, mut conn) = match before(
        timer.as_mut(),
        raw_head(&member.endpoint, authority, method, request),
    )
    .await
    {
        None => return Err(ForwardError::Timeout),
        Some(r) => r?,
    };
    let h1::Head {
        status,
        mut headers,
        framing,
        keep_alive,
    } = head;
    strip_hop_by_hop(&mut headers);
    let mut reader = h1::Reader::new(framing);
    let first = if reader.is_done() {
        None
    } else {
        match before(timer.as_mut(), reader.next(&mut conn)).await {
            None => return Err(ForwardError::Timeout),
            Some(Err(e)) => return Err(ForwardError::Protocol(e.to_string())),
            Some(Ok(d)) => d,
        }
    };
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if reader.is_done() {
        // The whole answer in hand (the common small answer): its exact length, no
        // streaming wrapper, and the connection free for the next request at once.
        if keep_alive {
            crate::worker::checkin_raw(&member.endpoint, conn, sh.pool_per_host);
        }
        return Ok(resp.map(|()| full(first.unwrap_or_default())));
    }
    let body = RawStreamed {
        first,
        reader,
        conn: Some(conn),
        keep_alive,
        idle: IdleGuard::new(cfg.idle_timeout),
        sh: sh.clone(),
        member: member.clone(),
    };
    Ok(resp.map(|()| BodyExt::boxed(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_ip_is_believed_from_trusted_proxies_only() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 10.0.0.2"),
        );
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let trusted: Vec<IpAddr> = vec![
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        ];
        assert_eq!(client_ip(peer, &h, &[]), peer);
        assert_eq!(client_ip(peer, &h, &trusted).to_string(), "1.1.1.1");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
