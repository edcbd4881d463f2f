//! `lockstep-manifest.json`: what a package claims to be and the size and sha256 of every
//! file in it. It is the first entry of the archive so an unpacker knows every checksum
//! before the first file arrives, and stays at the top of the release directory.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The manifest's file name, at the top of the archive and of the release directory.
pub const MANIFEST_NAME: &str = "lockstep-manifest.json";

/// The largest manifest accepted (a million files fit well below it).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// A package's identity and contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The service the release belongs to.
    pub service: String,
    /// The human label (`v1.4.0`).
    pub version: String,
    /// The identity compared by the registry and used as the release directory name.
    pub version_id: String,
    /// The commit it was built from (`unknown` when not known).
    pub git_sha: String,
    /// When the package's contents were last changed (RFC 3339); reproducible, see
    /// [`crate::create`].
    pub created_at: String,
    /// Component versions (name → version), reported by the agent.
    #[serde(default)]
    pub components: BTreeMap<String, String>,
    /// Every regular file, sorted by path.
    pub files: Vec<FileEntry>,
    /// Every symbolic link, sorted by path; targets stay inside the release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkEntry>,
}

/// One regular file of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the contents.
    pub sha256: String,
}

/// One symbolic link of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntry {
    /// Relative path of the link.
    pub path: String,
    /// Its target, relative, resolving inside the release.
    pub target: String,
}

/// Whether `s` can name a release directory: `^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`. Version
/// ids come from request headers and manifests and become directory names, so nothing
/// else (no `/`, no `..`, no leading dot) is ever accepted.
pub fn valid_version_id(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    s.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

impl Manifest {
    /// Checks what the unpacker relies on: a usable version id, relative normal paths, no
    /// duplicates.
    pub fn validate(&self) -> Result<(), crate::PackageError> {
        use crate::PackageError::Manifest as M;
        if !valid_version_id(&self.version_id) {
            return Err(M(format!(
                "version_id {:?} is not a valid release name",
                self.version_id
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for p in self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.links.iter().map(|l| &l.path))
        {
            if crate::unpack::normalise(p).is_none() || p == MANIFEST_NAME {
                return Err(M(format!(
                    "path {p:?} is not a relative path inside the release"
                )));
            }
            if !seen.insert(p.as_str()) {
                return Err(M(format!("path {p:?} is listed twice")));
            }
        }
        for f in &self.files {
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(M(format!("{}: sha256 is not 64 hex digits", f.path)));
            }
        }
        Ok(())
    }

    /// Total size of the files it lists.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, ok: bool) {
        assert_eq!(valid_version_id(id), ok, "{id:?}");
    }

    #[test]
    fn version_ids_that_could_leave_the_releases_directory_are_not_valid() {
        check("3f2a9c1e-7b6d-4e1a-9c1e-3f2a9c1e7b6d", true);
        check("v1.4.0", true);
        check("1.0.0+build.5", true);
        check("", false);
        check("..", false);
        check(".hidden", false);
        check("a/b", false);
        check("../etc", false);
        check("a b", false);
        check(&"a".repeat(129), false);
    }
}
