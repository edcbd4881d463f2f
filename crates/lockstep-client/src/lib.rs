//! The lockstep client library: what a Rust worker links to know, within milliseconds,
//! whether it still runs the release that was deployed — and to act on it.
//!
//! - [`build_info!`] and `lockstep_build::emit()`: the identity baked into the binary.
//! - [`guard`]: startup guards that exit 78 before a wrong binary touches anything.
//! - [`Watcher`]: the expected release pushed over SSE, polled as a fallback, fail-open
//!   (optionally bounded), with a lock-free [`Watcher::is_current`].
//! - [`VersionCheckLayer`]: a tower layer answering 503 while stale.
//! - [`HeartbeatTask`]: registration, heartbeats and deregistration.
//! - [`RegistryClient`]: every v1 call, with ordered failover across registry URLs.
//! - [`deploy`]: the deploy command and its retries, waiting for the fleet, rollback.
//! - [`verify`]: which instances of a status report pass, and whether the fleet does.
//! - [`fleet`]: status and history for a scope that must exist (a typo is named as such,
//!   with the known environments and services).
//! - [`supervise`]: running a worker in any language, stopping it when it becomes stale.
//!
//! Job workers check `watcher.is_current()` before each job and `select!` on
//! `watcher.changed()` to drain and exit.

mod build_info;
pub mod deploy;
pub mod fleet;
pub mod guard;
mod heartbeat;
mod layer;
mod registry;
pub mod sse;
#[cfg(unix)]
pub mod supervise;
pub mod verify;
mod watcher;

pub use build_info::BuildInfo;
pub use heartbeat::{HeartbeatTask, default_instance_id, heartbeat_for};
pub use layer::{ResponseFuture, STALE_BODY, VersionCheck, VersionCheckLayer, stale_response};
pub use registry::{ClientError, RegistryClient};
pub use watcher::{ConfigError, Watcher, WatcherConfig};
