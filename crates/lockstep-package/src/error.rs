//! What can go wrong with a package, in words an operator can act on.

use std::path::PathBuf;

/// Why a package could not be created, signed, verified or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the archive stream failed (truncated, not gzip, not tar).
    #[error("the archive cannot be read: {0}")]
    Archive(#[source] std::io::Error),
    /// A key file is not what it should be.
    #[error("key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The detached signature is malformed or does not match any trusted key.
    #[error("signature: {0}")]
    Signature(String),
    /// The manifest is missing, not first, malformed or disagrees with the archive.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A file's size or sha256 differs from the manifest, or a listed file is missing.
    #[error("checksum: {0}")]
    Checksum(String),
    /// An entry would escape the staging directory or is of a forbidden kind.
    #[error("unsafe entry {path:?}: {reason}")]
    Unsafe {
        /// The entry's path as written in the archive.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The archive is larger (or expands further) than the limits allow.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A create option is invalid (an empty service, an exclude glob that cannot match).
    #[error("{0}")]
    Invalid(String),
}

impl PackageError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> PackageError {
        PackageError::Io {
            path: path.into(),
            source,
        }
    }
}
