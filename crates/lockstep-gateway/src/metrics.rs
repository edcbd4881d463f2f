//! Prometheus metrics of the gateway, kept in atomics and a few small maps, rendered as
//! text by the admin listener's `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters and gauges.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<HashMap<String, BTreeMap<u16, u64>>>,
    upstream_errors: Mutex<BTreeMap<&'static str, u64>>,
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
        if let Ok(mut m) = self.requests.lock() {
            // Looked up by &str first: no allocation per request once a route was seen.
            match m.get_mut(route) {
                Some(by_status) => *by_status.entry(status).or_default() += 1,
                None => {
                    m.insert(route.to_string(), BTreeMap::from([(status, 1)]));
                }
            }
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.duration_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Records an upstream failure of `kind` (`connect`, `timeout`, `protocol`).
    pub fn upstream_error(&self, kind: &'static str) {
        if let Ok(mut m) = self.upstream_errors.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// Prometheus text; `extra` lines (pools, registry, limiter) are appended by the caller.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP lockstep_gateway_requests_total Requests answered, by route and status.\n# TYPE lockstep_gateway_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            let mut routes: Vec<_> = m.iter().collect();
            routes.sort_by(|a, b| a.0.cmp(b.0));
            for (route, by_status) in routes {
                for (status, n) in by_status {
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
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "lockstep_gateway_request_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.duration_buckets[i].load(Ordering::Relaxed)
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
        if let Ok(m) = self.upstream_errors.lock() {
            for (k, n) in m.iter() {
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
