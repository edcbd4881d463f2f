//! Build identity for workers: call [`emit`] from `build.rs` and read it back at run time
//! with `lockstep_client::build_info!()`.
//!
//! ```no_run
//! // The whole `build.rs` of a worker is `fn main() { lockstep_build::emit(); }`:
//! lockstep_build::emit();
//! ```
//!
//! It sets `LOCKSTEP_GIT_SHA` (full SHA, or `unknown` without git), `LOCKSTEP_BUILD_DATE`
//! (RFC 3339) and `LOCKSTEP_VERSION` (as `lockstep detect` finds it) for the crate being
//! built. A build without `.git` (a container build, say) can pass `LOCKSTEP_GIT_SHA` and
//! `LOCKSTEP_VERSION` in the environment instead; they win over detection.
//!
//! Kept apart from `lockstep-client` so that a build script compiles only this and
//! `lockstep-core`, not an HTTP stack.

use std::path::{Path, PathBuf};
use std::process::Command;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What [`emit`] bakes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Full git SHA or `unknown`.
    pub git_sha: String,
    /// RFC 3339 build time.
    pub build_date: String,
    /// Human version label.
    pub version: String,
}

/// Detects the identity of the crate in `dir` (honouring the override variables).
pub fn identity(dir: &Path) -> Identity {
    let detected = lockstep_core::detect::detect(dir).ok();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    Identity {
        git_sha: env("LOCKSTEP_GIT_SHA")
            .or_else(|| detected.as_ref().map(|d| d.git_sha.clone()))
            .unwrap_or_else(|| lockstep_core::detect::UNKNOWN.to_string()),
        // Whole seconds: what a person reads in `--version` and in status tables.
        build_date: OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc())
            .format(&Rfc3339)
            .unwrap_or_default(),
        version: env("LOCKSTEP_VERSION")
            .or_else(|| detected.map(|d| d.version))
            .unwrap_or_else(|| "dev-unknown".to_string()),
    }
}

fn git_dir(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("git")
        .args(["rev-parse", "--absolute-git-dir"])
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Prints the `cargo:` lines for the crate whose `build.rs` calls it.
pub fn emit() {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let id = identity(&dir);
    println!("cargo:rustc-env=LOCKSTEP_GIT_SHA={}", id.git_sha);
    println!("cargo:rustc-env=LOCKSTEP_BUILD_DATE={}", id.build_date);
    println!("cargo:rustc-env=LOCKSTEP_VERSION={}", id.version);
    println!("cargo:rerun-if-env-changed=LOCKSTEP_GIT_SHA");
    println!("cargo:rerun-if-env-changed=LOCKSTEP_VERSION");
    println!("cargo:rerun-if-changed={}", dir.join("VERSION").display());
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("lockstep.toml").display()
    );
    if let Some(g) = git_dir(&dir) {
        // A new commit or tag moves HEAD or a ref; rebuild then so the SHA is never stale.
        println!("cargo:rerun-if-changed={}", g.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", g.join("refs").display());
        println!("cargo:rerun-if-changed={}", g.join("packed-refs").display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_without_git_gets_the_unknown_sha() {
        if std::env::var_os("LOCKSTEP_GIT_SHA").is_some() {
            return; // an explicit override wins by design; nothing to check here
        }
        let dir = std::env::temp_dir().join(format!("lockstep-build-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let id = identity(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(id.git_sha, "unknown");
        assert!(time::OffsetDateTime::parse(&id.build_date, &Rfc3339).is_ok());
    }

    #[test]
    fn this_repository_bakes_its_full_sha() {
        if std::env::var_os("LOCKSTEP_GIT_SHA").is_some() {
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        if git_dir(dir).is_none() {
            eprintln!("skipped: the source tree is not a git checkout");
            return;
        }
        let id = identity(dir);
        assert_eq!(id.git_sha.len(), 40, "{id:?}");
        assert!(id.git_sha.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
