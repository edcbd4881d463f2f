//! Store errors: rule violations from `lockstep_core`, conflicts, and backend failures.

/// What a store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A domain rule refused the write (downgrade, not rollback-safe, …).
    #[error(transparent)]
    Rule(#[from] lockstep_core::CoreError),
    /// A unique name is already taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// Nothing registered for the service.
    #[error("no release registered for {env}/{service}")]
    NoRelease {
        /// Environment.
        env: String,
        /// Service.
        service: String,
    },
    /// Revoking this token would leave no admin token.
    #[error("the last admin token cannot be revoked: create another admin token first")]
    LastAdmin,
    /// The token was revoked before and stays revoked (a bootstrap token set again).
    #[error("the token {0:?} was revoked and stays revoked")]
    Revoked(String),
    /// A leader-only write was attempted by a replica that does not hold the leader lease.
    #[error("this replica does not hold the leader lease")]
    NotLeader,
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row could not be decoded (corruption or a newer schema).
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
    /// Opening the store failed.
    #[error("opening the store at {path}: {message}")]
    Open {
        /// Where.
        path: String,
        /// Why.
        message: String,
    },
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

impl From<time::error::Parse> for StoreError {
    fn from(e: time::error::Parse) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}
