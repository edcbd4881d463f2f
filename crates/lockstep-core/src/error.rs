//! Errors of the domain rules; the server maps each to an HTTP status at its edge.

/// A domain rule that a request broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A service or environment name that does not match `^[a-z0-9][a-z0-9._-]{0,63}$`.
    #[error(
        "invalid {kind} name {name:?}: use 1-64 characters a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    InvalidName {
        /// `service` or `environment`.
        kind: &'static str,
        /// The offending name (never a secret).
        name: String,
    },
    /// A version id that is empty, too long or contains whitespace or control characters.
    #[error("invalid version_id: {0}")]
    InvalidVersionId(&'static str),
    /// The new release is older than the expected one: a lower semantic `version` when both
    /// labels are semantic versions, else an earlier `build_date`.
    #[error(
        "refusing a downgrade: {new} is older than the expected {current} (by {by}); \
         register it anyway with --force (\"force\": true in the API), or make an earlier \
         release expected again with `lockstep rollback --to VERSION_ID`"
    )]
    Downgrade {
        /// The expected release: version label and short id, e.g. `v1.0.0 (3f2a9c1e)`.
        current: String,
        /// The refused release, described the same way.
        new: String,
        /// What showed it older: `semantic version` or `build date`.
        by: &'static str,
    },
    /// Rolling back from a release that ran a migration an older release cannot read.
    #[error(
        "the expected release is marked rollback_safe=false; force the rollback if you are sure"
    )]
    NotRollbackSafe,
    /// Nothing to roll back to.
    #[error("no earlier release to roll back to")]
    NoPreviousRelease,
    /// A rollback target that is not in the service's history.
    #[error("version_id is not in this service's release history")]
    UnknownRollbackTarget,
    /// A role name that is not one of admin, deployer, operator, viewer, worker.
    #[error("unknown role {0:?}: use admin, deployer, operator, viewer or worker")]
    UnknownRole(String),
}
