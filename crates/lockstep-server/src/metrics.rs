//! `GET /metrics` in Prometheus text format, and the middleware that counts every HTTP
//! request by route and status and times it.
//!
//! Instance numbers come from the per-service index (`service::fleet`), not from walking
//! every instance, so a scrape costs O(services) however large the fleet; they are the
//! same numbers `/v1/status` reports, computed by the same rules.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lockstep_api::ErrorBody;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::service::metrics::{self as m, Histogram};
use crate::state::AppState;

/// Requests of one route (method + path template).
struct RouteStats {
    /// Index: status code − 100.
    by_status: Vec<AtomicU64>,
    latency: Histogram,
}

impl RouteStats {
    fn new() -> RouteStats {
        RouteStats {
            by_status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::new(m::LATENCY_BOUNDS),
        }
    }
}

/// HTTP request counts and latency per route.
#[derive(Default)]
pub struct HttpMetrics {
    /// (method, route template, stats): a few dozen entries, scanned under a read lock.
    routes: RwLock<Vec<(Method, String, Arc<RouteStats>)>>,
}

impl HttpMetrics {
    fn route(&self, method: &Method, path: &str) -> Option<Arc<RouteStats>> {
        // The read path allocates nothing; a route is inserted once.
        let find = |g: &[(Method, String, Arc<RouteStats>)]| {
            g.iter()
                .find(|(m, p, _)| m == method && p == path)
                .map(|(_, _, s)| s.clone())
        };
        if let Some(s) = self.routes.read().ok().and_then(|g| find(&g)) {
            return Some(s);
        }
        let mut g = self.routes.write().ok()?;
        if let Some(s) = find(&g) {
            return Some(s);
        }
        let stats = Arc::new(RouteStats::new());
        g.push((method.clone(), path.to_string(), stats.clone()));
        Some(stats)
    }

    fn render(&self, out: &mut String) {
        let Ok(g) = self.routes.read() else {
            return;
        };
        let mut routes: Vec<_> = g
            .iter()
            .map(|(m, p, s)| ((m.as_str(), p.as_str()), s))
            .collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        m::header(
            out,
            "lockstep_http_requests_total",
            "counter",
            "HTTP requests by method, route and status.",
        );
        for ((method, path), s) in &routes {
            for (i, n) in s.by_status.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "lockstep_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{}\"}} {n}",
                        m::label(path),
                        i + 100
                    );
                }
            }
        }
        m::header(
            out,
            "lockstep_http_request_duration_seconds",
            "histogram",
            "Time to the response head (streams: until they start), by method and route.",
        );
        for ((method, path), s) in &routes {
            let labels = format!("method=\"{method}\",route=\"{}\"", m::label(path));
            s.latency
                .render(out, "lockstep_http_request_duration_seconds", &labels);
        }
    }
}

/// Counts and times every request, by the route that matched (not the raw path, which
/// would give every instance id its own series).
pub async fn track(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Both clones are cheap: `Method` is an enum, `MatchedPath` a shared string.
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    let path = route.as_ref().map_or("unmatched", |p| p.as_str());
    if let Some(s) = st.http.route(&method, path) {
        let code = resp.status().as_u16() as usize;
        if let Some(n) = s.by_status.get(code.saturating_sub(100)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.observe(start.elapsed().as_secs_f64());
    }
    resp
}

fn gauge(out: &mut String, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
    m::header(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

/// Instances by environment, service and status, and each service's longest drift.
fn render_fleet(st: &AppState, out: &mut String) -> Result<(), crate::service::Poisoned> {
    let projection = st.service.projection();
    let now = OffsetDateTime::now_utc();
    let ttl = projection.instance_ttl();
    let expected = projection.all_expected()?;
    let mut scopes: BTreeSet<(String, String)> = expected
        .iter()
        .map(|c| (c.release.env.clone(), c.release.service.clone()))
        .collect();
    let rows = projection.with_fleet(|fleet| {
        scopes.extend(fleet.scopes().cloned());
        scopes
            .iter()
            .map(|(env, svc)| {
                let exp = expected
                    .iter()
                    .find(|c| &c.release.env == env && &c.release.service == svc)
                    .map(|c| (&c.release.release, c.release.registered_at));
                (env, svc, fleet.counts(env, svc, exp, now, ttl))
            })
            .collect::<Vec<_>>()
    })?;
    m::header(
        out,
        "lockstep_instances",
        "gauge",
        "Instances by environment, service and status (as /v1/status counts them).",
    );
    let mut total = [0u64; 5];
    for (env, svc, c) in &rows {
        let n = c.counts;
        for (i, (status, v)) in [
            ("current", n.current),
            ("draining", n.draining),
            ("stale", n.stale),
            ("missing", n.missing),
            ("unknown", n.unknown),
        ]
        .into_iter()
        .enumerate()
        {
            total[i] += u64::from(v);
            let _ = writeln!(
                out,
                "lockstep_instances{{env=\"{}\",service=\"{}\",status=\"{status}\"}} {v}",
                m::label(env),
                m::label(svc)
            );
        }
    }
    m::header(
        out,
        "lockstep_instances_total",
        "gauge",
        "Instances of the whole fleet by status.",
    );
    for (i, status) in ["current", "draining", "stale", "missing", "unknown"]
        .iter()
        .enumerate()
    {
        let _ = writeln!(
            out,
            "lockstep_instances_total{{status=\"{status}\"}} {}",
            total[i]
        );
    }
    m::header(
        out,
        "lockstep_drift_seconds",
        "gauge",
        "Longest drift (stale, draining or missing) among a service's instances, in seconds.",
    );
    for (env, svc, c) in &rows {
        let _ = writeln!(
            out,
            "lockstep_drift_seconds{{env=\"{}\",service=\"{}\"}} {}",
            m::label(env),
            m::label(svc),
            c.max_drift_secs
        );
    }
    Ok(())
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let c = &st.counters;
    let svc = &st.service;
    let mut out = String::with_capacity(8192);
    gauge(
        &mut out,
        "lockstep_heartbeats_total",
        "counter",
        "Heartbeats accepted.",
        svc.heartbeats.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "lockstep_release_changes_total",
        "counter",
        "Registrations and rollbacks that changed an expected release.",
        svc.projection().changes_applied.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "lockstep_watchers",
        "gauge",
        "Open watch streams (releases and instances).",
        c.watchers.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "lockstep_event_streams",
        "gauge",
        "Open event streams.",
        c.event_streams.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "lockstep_leader",
        "gauge",
        "1 when this replica holds the leader lease.",
        i64::from(svc.leadership().is_leader()),
    );
    gauge(
        &mut out,
        "lockstep_tokens",
        "gauge",
        "Valid API tokens.",
        svc.projection().tokens.len(),
    );
    gauge(
        &mut out,
        "lockstep_store_errors_total",
        "counter",
        "Store calls that failed (database away or refusing).",
        m::STORE_ERRORS.load(Ordering::Relaxed),
    );
    if let Some(mi) = svc.mirror() {
        let ms = mi.stats();
        gauge(
            &mut out,
            "lockstep_redis_mirror_writes_total",
            "counter",
            "Commands the Redis mirror applied.",
            ms.writes,
        );
        gauge(
            &mut out,
            "lockstep_redis_mirror_errors_total",
            "counter",
            "Redis mirror failures (Redis down or refusing).",
            ms.errors,
        );
        gauge(
            &mut out,
            "lockstep_redis_mirror_pending",
            "gauge",
            "Mirror updates waiting to be written.",
            ms.pending,
        );
        gauge(
            &mut out,
            "lockstep_redis_mirror_up",
            "gauge",
            "1 when the last write to Redis succeeded.",
            i64::from(ms.up),
        );
    }
    if render_fleet(&st, &mut out).is_err() {
        return ApiError::Unavailable.into_response();
    }
    m::header(
        &mut out,
        "lockstep_convergence_seconds",
        "histogram",
        "Time from a release becoming expected until every live instance of its service ran it.",
    );
    svc.convergence
        .render(&mut out, "lockstep_convergence_seconds", "");
    st.http.render(&mut out);
    svc.alerts().write_metrics(&mut out);
    svc.rollouts().write_metrics(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
