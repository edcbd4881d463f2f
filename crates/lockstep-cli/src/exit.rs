//! Exit codes of the contract and the mapping from errors to them.

use lockstep_client::ClientError;

/// Success.
pub const OK: u8 = 0;
/// The check failed: stale, timeout, rejected.
pub const FAILED: u8 = 1;
/// Usage or configuration error.
pub const USAGE: u8 = 2;
/// The registry could not be reached.
pub const UNREACHABLE: u8 = 3;

/// An error that carries the exit code it should end the process with.
#[derive(Debug)]
pub struct Exit {
    /// Exit code.
    pub code: u8,
    /// What to print on stderr (nothing when empty).
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Ends with `code` after printing `message`.
pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error anywhere in the chain: 3 when the registry could not be
/// reached; 2 for a setting to fix (no or a wrong token, too weak a role, a URL that is not
/// a lockstep registry, a request the registry calls malformed); 1 when the registry
/// refused or failed the request itself (a downgrade, an unknown rollback target).
pub fn code_of(err: &anyhow::Error) -> u8 {
    if let Some(e) = err.downcast_ref::<Exit>() {
        return e.code;
    }
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Unreachable { .. } => UNREACHABLE,
                c if c.is_configuration() => USAGE,
                ClientError::Api { status: 400, .. } => USAGE,
                _ => FAILED,
            };
        }
    }
    FAILED
}
