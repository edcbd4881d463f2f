//! What the HTTP side shares: the registry service (which owns the store and the
//! projection), the tunables, the shutdown signal and the connection gauges.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use tokio::sync::watch;

use crate::service::RegistryService;
pub use crate::service::config::{Config, default_replica_id};

/// Gauges exported on `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Watch streams open now.
    pub watchers: AtomicI64,
    /// Event streams open now.
    pub event_streams: AtomicI64,
}

/// Shared by every handler.
pub struct AppState {
    /// The registry service.
    pub service: Arc<RegistryService>,
    /// Tunables.
    pub config: Config,
    /// Flips to true when the server shuts down; ends every stream.
    pub shutdown: watch::Receiver<bool>,
    /// Metrics.
    pub counters: Counters,
    /// HTTP request counts and latency.
    pub http: crate::metrics::HttpMetrics,
}
