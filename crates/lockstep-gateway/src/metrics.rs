//! Prometheus metrics of the gateway, kept in atomics (no lock is taken on the request
//! path but a shared read of the route table), rendered as text by the admin listener's
//! `/metrics`.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Upstream error kinds, in the order of their counters.
const ERROR_KINDS: [&str; 6] = [
    "connect",
    "reset",
    "timeout",
    "protocol",
    "too_large",
    "idle",
];

/// Answers of one route by status (100–599), one counter each.
struct ByStatus(Box<[AtomicU64]>);

impl ByStatus {
    fn new() -> Self {
        ByStatus((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters and gauges.
#[derive(Default)]
pub struct Metrics {
    requests: RwLock<HashMap<String, Arc<ByStatus>>>,
    upstream_errors: [AtomicU64; ERROR_KINDS.len()],
    duration_buckets: [AtomicU64; 12],
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    /// Open client connections.
    pub open_connections: AtomicI64,
    /// Requests being handled.
    pub in_flight: AtomicI64,
    /// Requests refused with 429.
    pub rate_limited: AtomicU64,
    /// Instances ejected by passive health.
    pub ejections: AtomicU64,
    /// Requests retried on another instance after a connect failure.
    pub retries: AtomicU64,
    /// Successful configuration reloads.
    pub reloads_ok: AtomicU64,
    /// Refused configuration reloads.
    pub reloads_failed: AtomicU64,
}

impl Metrics {
    /// Records a finished request.
    pub fn request(&self, route: &str, status: u16, secs: f64) {
        let i = usize::from(status.clamp(100, 599) - 100);
        let known = self
            .requests
            .read()
            .ok()
            .and_then(|m| m.get(route).map(|c| c.0[i].fetch_add(1, Ordering::Relaxed)))
            .is_some();
        if !known && let Ok(mut m) = self.requests.write() {
            // Once per route name: later requests only read the table.
            m.entry(route.to_string())
                .or_insert_with(|| Arc::new(ByStatus::new()))
                .0[i]
                .fetch_add(1, Ordering::Relaxed);
        }
        // One counter per request; the cumulative buckets are summed when rendered.
        let b = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        if let Some(c) = self.duration_buckets.get(b) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Records an upstream failure of `kind` (one of `connect`, `reset`, `timeout`,
    /// `protocol`, `too_large`, `idle`).
    pub fn upstream_error(&self, kind: &'static str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text; `extra` lines (pools, registry, limiter) are appended by the caller.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP lockstep_gateway_requests_total Requests answered, by route and status.\n# TYPE lockstep_gateway_requests_total counter"
        );
        if let Ok(m) = self.requests.read() {
            let mut routes: Vec<_> = m.iter().collect();
            routes.sort_by(|a, b| a.0.cmp(b.0));
            for (route, by_status) in routes {
                let counts = by_status.0.iter().enumerate().filter_map(|(i, c)| {
                    let n = c.load(Ordering::Relaxed);
                    (n > 0).then_some((i + 100, n))
                });
                for (status, n) in counts {
                    let _ = writeln!(
                        out,
                        "lockstep_gateway_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                        route.replace('\\', "\\\\").replace('"', "\\\"")
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_gateway_request_duration_seconds Time from request to answer.\n# TYPE lockstep_gateway_request_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.duration_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "lockstep_gateway_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.duration_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "lockstep_gateway_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\nlockstep_gateway_request_duration_seconds_sum {}\nlockstep_gateway_request_duration_seconds_count {count}",
            self.duration_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP lockstep_gateway_upstream_errors_total Upstream failures by kind.\n# TYPE lockstep_gateway_upstream_errors_total counter"
        );
        for (k, c) in ERROR_KINDS.iter().zip(&self.upstream_errors) {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "lockstep_gateway_upstream_errors_total{{kind=\"{k}\"}} {n}"
                );
            }
        }
        for (name, help, kind, v) in [
            (
                "open_connections",
                "Open client connections.",
                "gauge",
                self.open_connections.load(Ordering::Relaxed),
            ),
            (
                "in_flight_requests",
                "Requests being handled.",
                "gauge",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "rate_limited_total",
                "Requests refused with 429.",
                "counter",
                self.rate_limited.load(Ordering::Relaxed) as i64,
            ),
            (
                "ejections_total",
                "Instances ejected after consecutive failures.",
                "counter",
                self.ejections.load(Ordering::Relaxed) as i64,
            ),
            (
                "retries_total",
                "Requests retried on another instance after a connect failure.",
                "counter",
                self.retries.load(Ordering::Relaxed) as i64,
            ),
            (
                "config_reloads_total",
                "Configuration reloads applied.",
                "counter",
                self.reloads_ok.load(Ordering::Relaxed) as i64,
            ),
            (
                "config_reload_failures_total",
                "Configuration reloads refused (the previous one stays).",
                "counter",
                self.reloads_failed.load(Ordering::Relaxed) as i64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP lockstep_gateway_{name} {help}\n# TYPE lockstep_gateway_{name} {kind}\nlockstep_gateway_{name} {v}"
            );
        }
    }
}
