//! Update packages, shared by the agent and the rollout coordinator (neither owns the
//! format).
//!
//! - [`create`]: a reproducible `.tar.gz` with `lockstep-manifest.json` first (service,
//!   version, version id, commit, creation time, components, size and sha256 of every file).
//! - [`sign`]: Ed25519 keys as PKCS#8 / SPKI PEM and raw detached signatures over the
//!   archive's bytes, verified as a stream.
//! - [`unpack`]: the one way an archive becomes files — streaming, bounded, never writing
//!   outside its staging directory; the same walk without writing is [`check`].

mod create;
mod error;
mod manifest;
pub mod sign;
mod unpack;

pub use create::{CreateOptions, DEFAULT_EXCLUDES, create, default_file_name, glob_match};
pub use error::PackageError;
pub use manifest::{FileEntry, LinkEntry, MANIFEST_NAME, Manifest, valid_version_id};
pub use unpack::{Expect, Limits, Unpacked, normalise, unpack};

use std::path::Path;

/// Verifies a package completely without unpacking it: the detached signature against the
/// trusted keys, then the manifest and the size and sha256 of every file. Returns the
/// manifest.
pub fn verify(
    package: &Path,
    signature: &Path,
    trusted: &[ed25519_dalek::VerifyingKey],
    limits: &Limits,
) -> Result<Manifest, PackageError> {
    sign::verify_file(package, signature, trusted)?;
    check(package, limits)
}

/// Checks the manifest and every file of `package` (no signature).
pub fn check(package: &Path, limits: &Limits) -> Result<Manifest, PackageError> {
    let f = std::fs::File::open(package).map_err(|e| PackageError::io(package, e))?;
    let r = std::io::BufReader::with_capacity(256 * 1024, f);
    let out = unpack(r, None, limits, Expect::Manifest(None), &mut |_| {})?;
    out.manifest
        .ok_or_else(|| PackageError::Manifest("missing".into()))
}

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
