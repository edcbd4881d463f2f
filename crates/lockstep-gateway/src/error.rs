//! The gateway's errors: configuration problems (told in an operator's words, with the
//! key at fault) and start-up failures.

/// Everything that can stop the gateway from starting or a configuration from loading.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration does not parse or is inconsistent.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The registry client could not be built.
    #[error("registry: {0}")]
    Registry(#[from] lockstep_client::ClientError),
}

impl GatewayError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        GatewayError::Config(msg.into())
    }
}
