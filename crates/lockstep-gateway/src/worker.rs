//! Worker threads: one per core, each a single-threaded tokio runtime serving the client
//! connections handed to it, with its own pool of keep-alive connections to the instances.
//!
//! Why: hyper drives every upstream connection in a task of its own and hands it requests
//! over a channel. On a multi-threaded runtime each of those handoffs (request to the
//! connection task, answer back, body frames) may wake another thread, and hyper-util's
//! pooling client also spawns a task per request to wait for the connection to be free
//! again; on a machine with few cores the scheduler then costs more than the proxying.
//! Here the task serving a client, the upstream connection's task and every channel
//! between them live on one thread, so a handoff is a push onto that thread's run queue,
//! and a connection goes back to the pool when its answer has been read to the end (no
//! extra task). Which instance a request goes to is still decided per request by
//! `Pool::select`, on any thread: the pool only keeps connections per endpoint.

use crate::Shared;
use crate::h1::RawConn;
use crate::proxy::{self, ReqBody};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Environment variable overriding the number of worker threads (default: one per core).
pub const WORKERS_ENV: &str = "LOCKSTEP_GATEWAY_WORKERS";

/// How many worker threads: `LOCKSTEP_GATEWAY_WORKERS`, else one per core.
pub(crate) fn count() -> usize {
    std::env::var(WORKERS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

enum Msg {
    Conn(std::net::TcpStream, SocketAddr),
    Drain(Duration),
}

struct Worker {
    tx: mpsc::UnboundedSender<Msg>,
    done: oneshot::Receiver<()>,
}

/// The running worker threads. Dropping this (the gateway's future dropped) stops them at
/// once; [`Workers::drain`] stops them gracefully.
pub(crate) struct Workers {
    sh: Arc<Shared>,
    workers: Vec<Worker>,
    /// Connections served on the caller's runtime (no worker thread could start).
    local: GracefulShutdown,
}

/// Starts `n` worker threads.
pub(crate) fn start(sh: &Arc<Shared>, n: usize) -> Workers {
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        let sh = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .spawn(move || {
                run(sh, rx);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => workers.push(Worker { tx, done }),
            Err(e) => tracing::error!(error = %e, "could not start a worker thread"),
        }
    }
    Workers {
        sh: sh.clone(),
        workers,
        local: GracefulShutdown::new(),
    }
}

impl Workers {
    /// Gives an accepted connection to worker `i` (modulo their number).
    pub(crate) fn hand_over(&self, i: usize, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let stream = match self.workers.get(i % self.workers.len().max(1)) {
            Some(w) => match stream.into_std() {
                Ok(s) => match w.tx.send(Msg::Conn(s, peer)) {
                    Ok(()) => return,
                    // The worker is gone: serve it here rather than drop it.
                    Err(mpsc::error::SendError(Msg::Conn(s, _))) => {
                        match tokio::net::TcpStream::from_std(s) {
                            Ok(s) => s,
                            Err(_) => return,
                        }
                    }
                    Err(_) => return,
                },
                Err(_) => return,
            },
            None => stream,
        };
        serve(&self.sh, &self.local, stream, peer);
    }

    /// Stops accepting on every worker and waits (at most `grace`) for open requests.
    pub(crate) async fn drain(self, grace: Duration) {
        let Workers { workers, local, .. } = self;
        let mut done = Vec::with_capacity(workers.len());
        for w in workers {
            if w.tx.send(Msg::Drain(grace)).is_ok() {
                done.push(w.done);
            }
        }
        let all = async {
            for d in done {
                let _ = d.await;
            }
            local.shutdown().await;
        };
        let _ = tokio::time::timeout(grace, all).await;
    }
}

/// A worker thread: serves the connections it is given until told to drain (or until the
/// gateway is dropped).
fn run(sh: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "could not start a worker runtime");
            return;
        }
    };
    rt.block_on(async {
        let sweeper = tokio::spawn(async {
            let mut every = tokio::time::interval(IDLE_FOR / 3);
            loop {
                every.tick().await;
                sweep();
            }
        });
        let _stop_sweeper = AbortOnDrop(sweeper);
        let graceful = GracefulShutdown::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Conn(s, peer) => match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => serve(&sh, &graceful, s, peer),
                    Err(e) => tracing::warn!(error = %e, "could not adopt a connection"),
                },
                Msg::Drain(grace) => {
                    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
                    return;
                }
            }
        }
    });
    // The pooled upstream connections belong to this runtime: close them with it.
    POOL.with(|p| *p.borrow_mut() = Pool::default());
    drop(rt);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts an open client connection for as long as it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .metrics
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection on the current runtime.
fn serve(
    sh: &Arc<Shared>,
    graceful: &GracefulShutdown,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let sh1 = sh.clone();
    let peer = Arc::new(proxy::Peer::new(peer));
    let svc = hyper::service::service_fn(move |req| {
        let sh = sh1.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(sh, req, &peer).await) }
    });
    // Head and body copied into one buffer and sent with one `write`, rather than a
    // `writev` of several pieces: for the small answers a proxy mostly relays, about 1 µs
    // less CPU per request, both directions together (bench/gateway-cpu.sh, same run).
    let conn = hyper::server::conn::http1::Builder::new()
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), svc);
    let conn = graceful.watch(conn);
    sh.metrics.open_connections.fetch_add(1, Ordering::Relaxed);
    let open = Open(sh.clone());
    tokio::spawn(async move {
        let _ = conn.await;
        drop(open);
    });
}

/// How long an idle upstream connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(30);
/// How long connecting to an instance may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle keep-alive connections of one kind, by endpoint, each with when it was put back.
struct Shelf<T>(HashMap<String, Vec<(T, Instant)>>);

impl<T> Default for Shelf<T> {
    fn default() -> Self {
        Shelf(HashMap::new())
    }
}

impl<T> Shelf<T> {
    /// The most recently used connection to `endpoint` (the one least likely to have been
    /// closed) that has not idled out and that `usable` accepts; the others are dropped.
    fn take(&mut self, endpoint: &str, mut usable: impl FnMut(&mut T) -> bool) -> Option<T> {
        let idle = self.0.get_mut(endpoint)?;
        while let Some((mut c, since)) = idle.pop() {
            if since.elapsed() < IDLE_FOR && usable(&mut c) {
                return Some(c);
            }
        }
        None
    }

    /// Puts `conn` back (at most `max` per endpoint).
    fn put(&mut self, endpoint: &str, conn: T, max: usize) {
        let idle = match self.0.get_mut(endpoint) {
            Some(v) => v,
            None => self.0.entry(endpoint.to_string()).or_default(),
        };
        if idle.len() < max {
            idle.push((conn, Instant::now()));
        }
    }

    /// Drops connections that idled out or that `open` says are closed, and endpoints
    /// left with none.
    fn sweep(&mut self, open: impl Fn(&T) -> bool) {
        self.0.retain(|_, v| {
            v.retain(|(c, since)| open(c) && since.elapsed() < IDLE_FOR);
            !v.is_empty()
        });
    }
}

/// This thread's idle keep-alive connections: hyper's (for streamed request bodies) and
/// [`crate::h1`]'s (for everything else).
#[derive(Default)]
struct Pool {
    hyper: Shelf<http1::SendRequest<ReqBody>>,
    raw: Shelf<RawConn>,
}

/// Closes this thread's connections that idled out, forgets closed ones and endpoints
/// that are gone.
fn sweep() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.hyper.sweep(|tx| !tx.is_closed());
        p.raw.sweep(|_| true);
    });
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A connection to one instance, driven by a task on this thread; back to the pool with
/// [`checkin`] once its answer has been read to the end.
pub(crate) struct Conn {
    tx: http1::SendRequest<ReqBody>,
    reused: bool,
}

/// Why sending failed: nothing left (`Connect`: safe to retry anywhere) or the exchange
/// broke after the request may have left (`Reset`).
pub(crate) enum SendError {
    Connect(String),
    Reset(String),
}

/// The authority (`host:port`) and base path of an `http://` endpoint.
pub(crate) fn split_endpoint(endpoint: &str) -> Option<(&str, &str)> {
    let rest = endpoint.strip_prefix("http://")?;
    let (authority, base) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    (!authority.is_empty()).then_some((authority, base))
}

fn checkout(endpoint: &str) -> Option<Conn> {
    POOL.with(|p| p.borrow_mut().hyper.take(endpoint, |tx| !tx.is_closed()))
        .map(|tx| Conn { tx, reused: true })
}

/// Puts a connection whose last answer was read to the end back into this thread's pool
/// (at most `max` per endpoint).
pub(crate) fn checkin(endpoint: &str, conn: Conn, max: usize) {
    if !conn.tx.is_closed() {
        POOL.with(|p| p.borrow_mut().hyper.put(endpoint, conn.tx, max));
    }
}

/// An idle [`RawConn`] to `endpoint` from this thread's pool. With `probe`, one that the
/// instance has closed in the meantime is noticed now (one non-blocking read) rather than
/// when the request has gone out — for requests that may not be sent twice.
pub(crate) fn checkout_raw(endpoint: &str, probe: bool) -> Option<RawConn> {
    POOL.with(|p| p.borrow_mut().raw.take(endpoint, |c| !probe || c.idle_ok()))
}

/// Puts a [`RawConn`] whose last answer was read to the end back into this thread's pool
/// (at most `max` per endpoint).
pub(crate) fn checkin_raw(endpoint: &str, conn: RawConn, max: usize) {
    if conn.is_clean() {
        POOL.with(|p| p.borrow_mut().raw.put(endpoint, conn, max));
    }
}

async fn connect(authority: &str) -> Result<Conn, SendError> {
    let stream = crate::h1::tcp_connect(authority)
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    let (tx, conn) = http1::Builder::new()
        .writev(false) // as the client side's, see `serve`
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    // The connection is driven on this thread, next to the requests that use it.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { tx, reused: false })
}

/// Sends `req` (origin-form URI, `Host` set) to `endpoint` on a pooled connection of this
/// thread, or a new one. A pooled connection found closed before the request left is
/// replaced, as hyper's pooling client does.
pub(crate) async fn send(
    endpoint: &str,
    authority: &str,
    mut req: Request<ReqBody>,
) -> Result<(Response<Incoming>, Conn), SendError> {
    loop {
        let mut c = match checkout(endpoint) {
            Some(c) => c,
            // Boxed: connecting is rare (connections are pooled), and its future is big.
            None => match Box::pin(tokio::time::timeout(CONNECT_TIMEOUT, connect(authority))).await
            {
                Ok(c) => c?,
                Err(_) => return Err(SendError::Connect("connect timed out".into())),
            },
        };
        if let Err(e) = c.tx.ready().await {
            if c.reused {
                continue;
            }
            return Err(SendError::Connect(e.to_string()));
        }
        match c.tx.try_send_request(req).await {
            Ok(resp) => return Ok((resp, c)),
            Err(mut e) => match e.take_message() {
                Some(r) if c.reused => req = r,
                // Nothing left on a new connection: as good as not connected.
                Some(_) => return Err(SendError::Connect(e.into_error().to_string())),
                None => return Err(SendError::Reset(e.into_error().to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_authority_and_base_path_and_only_http_is_taken() {
        let cases = [
            ("http://127.0.0.1:8080", Some(("127.0.0.1:8080", ""))),
            (
                "http://10.0.0.5:8080/base",
                Some(("10.0.0.5:8080", "/base")),
            ),
            ("http://[::1]:9000/a/b", Some(("[::1]:9000", "/a/b"))),
            ("http://api.internal", Some(("api.internal", ""))),
            ("https://10.0.0.5:8443", None),
            ("http://", None),
            ("10.0.0.5:8080", None),
        ];
        for (endpoint, want) in cases {
            assert_eq!(split_endpoint(endpoint), want, "{endpoint}");
        }
    }
}
