//! The agent's errors, each with the HTTP status and code the API answers with.

use lockstep_package::PackageError;

/// Why an agent call or the agent itself failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No or a wrong bearer token.
    #[error("a valid bearer token is required (Authorization: Bearer …)")]
    Unauthorized,
    /// The request lacks something or carries something malformed.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code (`no_file`, `missing_version`, …).
        code: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The package is over `--max-package-size`.
    #[error("the package is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Apply of a version that was never uploaded.
    #[error("no uploaded package for version {0}")]
    UnknownVersion(String),
    /// The package failed verification (signature, manifest, checksums, safety).
    #[error("package rejected: {0}")]
    Rejected(#[from] PackageError),
    /// The new release failed its health check; the agent rolled back.
    #[error("the new release failed its health check; rolled back to the previous release")]
    HealthFailed,
    /// The worker could not be restarted.
    #[error("restarting the worker failed: {0}")]
    Restart(String),
    /// Disk or process trouble on the node.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The agent's configuration cannot work.
    #[error("{0}")]
    Config(String),
}

impl AgentError {
    /// An I/O error while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> AgentError {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    /// A 400 with `code`.
    pub fn bad(code: &'static str, message: impl Into<String>) -> AgentError {
        AgentError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status and error code this error answers with.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            AgentError::Unauthorized => (401, "unauthorized"),
            AgentError::BadRequest { code, .. } => (400, code),
            AgentError::TooLarge { .. } => (413, "too_large"),
            AgentError::UnknownVersion(_) => (404, "unknown_version"),
            AgentError::Rejected(PackageError::Signature(_)) => (400, "bad_signature"),
            AgentError::Rejected(PackageError::Limit(_)) => (413, "too_large"),
            AgentError::Rejected(_) => (400, "rejected"),
            AgentError::HealthFailed => (500, "health_check_failed"),
            AgentError::Restart(_) => (500, "restart_failed"),
            AgentError::Io { .. } => (500, "io"),
            AgentError::Config(_) => (500, "config"),
        }
    }
}
