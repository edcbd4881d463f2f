//! The lockstep domain: what a release is, what an instance runs, how the two are compared,
//! and how a source tree's version is detected.
//!
//! Nothing here talks to a network or a database; every other crate builds on these types
//! so that the server, the stores, the client library and the CLI agree on one meaning of
//! "current", "stale" and "downgrade".

pub mod detect;
pub mod drift;
pub mod duration;
pub mod error;
pub mod instance;
pub mod names;
pub mod release;
pub mod role;
pub mod semver;

pub use drift::{
    AlertAction, Condition, MissingSeverity, Observation, OpenAlert, Severity, Thresholds,
    plan_alerts,
};
pub use duration::{format_secs, parse_duration};
pub use error::CoreError;
pub use instance::{Instance, Status, StatusCounts, drift_secs, instance_status};
pub use names::{is_git_sha, short_id, validate_name, validate_version_id};
pub use release::{
    Decision, HistoryEntry, RegistrationKind, Release, StoredRelease, decide_registration,
    describe, older_by, releases_agree, rollback_target,
};
pub use role::Role;

/// The environment used when none is given.
pub const DEFAULT_ENV: &str = "production";
