//! Version detection for a source tree, as `lockstep detect` and the build-script helper do
//! it: a `VERSION` file, else the nearest git tag, else `dev-<sha7>`; components from the
//! `[components]` table of `lockstep.toml`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The string used when a commit cannot be determined.
pub const UNKNOWN: &str = "unknown";

/// Where the version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A `VERSION` file at the top of the tree.
    VersionFile,
    /// `git describe --tags --abbrev=0`.
    GitTag,
    /// No tag: `dev-<sha7>`.
    GitSha,
    /// Neither a VERSION file nor git.
    Unknown,
}

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detected {
    /// The human version label.
    pub version: String,
    /// Full commit SHA, or `unknown`.
    pub git_sha: String,
    /// Where `version` came from.
    pub source: Source,
    /// Component name → version from `lockstep.toml`.
    pub components: BTreeMap<String, String>,
}

/// Errors reading `lockstep.toml`.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The file exists but could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// Path of the file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or `[components]` holds something other than strings.
    #[error("{path}: {message}")]
    Toml {
        /// Path of the file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Detects the version of the tree at `dir`.
pub fn detect(dir: &Path) -> Result<Detected, DetectError> {
    let git_sha = git(dir, &["rev-parse", "HEAD"]);
    let file_version = std::fs::read_to_string(dir.join("VERSION"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let (version, source) = if let Some(v) = file_version {
        (v, Source::VersionFile)
    } else if let Some(tag) = git(dir, &["describe", "--tags", "--abbrev=0"]) {
        (tag, Source::GitTag)
    } else if let Some(sha) = &git_sha {
        (format!("dev-{}", &sha[..sha.len().min(7)]), Source::GitSha)
    } else {
        (format!("dev-{UNKNOWN}"), Source::Unknown)
    };
    Ok(Detected {
        version,
        git_sha: git_sha.unwrap_or_else(|| UNKNOWN.to_string()),
        source,
        components: components(dir)?,
    })
}

/// Reads `[components]` from `dir/lockstep.toml`; an absent file means no components.
pub fn components(dir: &Path) -> Result<BTreeMap<String, String>, DetectError> {
    let path = dir.join("lockstep.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(DetectError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let toml_err = |message: String| DetectError::Toml {
        path: path.display().to_string(),
        message,
    };
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| toml_err(e.to_string()))?;
    let mut out = BTreeMap::new();
    if let Some(table) = doc.get("components") {
        let table = table
            .as_table()
            .ok_or_else(|| toml_err("[components] must be a table".into()))?;
        for (name, v) in table {
            let v = v
                .as_str()
                .ok_or_else(|| toml_err(format!("components.{name} must be a string")))?;
            out.insert(name.clone(), v.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git runs")
            .status
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn detection_prefers_version_file_then_tag_then_sha() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // No git, no file.
        let got = detect(d).expect("detect");
        assert_eq!(
            (got.version.as_str(), got.source),
            ("dev-unknown", Source::Unknown)
        );
        assert_eq!(got.git_sha, UNKNOWN);

        sh(d, &["init", "-q"]);
        std::fs::write(d.join("a.txt"), "a").expect("write");
        sh(d, &["add", "."]);
        sh(d, &["commit", "-q", "-m", "one"]);
        let got = detect(d).expect("detect");
        assert_eq!(got.source, Source::GitSha);
        assert_eq!(got.version, format!("dev-{}", &got.git_sha[..7]));
        assert_eq!(got.git_sha.len(), 40);

        sh(d, &["tag", "v1.4.0"]);
        let got = detect(d).expect("detect");
        assert_eq!(
            (got.version.as_str(), got.source),
            ("v1.4.0", Source::GitTag)
        );

        std::fs::write(d.join("VERSION"), "2.0.0\n").expect("write");
        let got = detect(d).expect("detect");
        assert_eq!(
            (got.version.as_str(), got.source),
            ("2.0.0", Source::VersionFile)
        );
    }

    #[test]
    fn components_come_from_lockstep_toml() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("lockstep.toml"),
            "[components]\napi = \"1.2.0\"\nworker = \"3\"\n",
        )
        .expect("write");
        let c = components(dir.path()).expect("components");
        assert_eq!(c.get("api").map(String::as_str), Some("1.2.0"));
        assert_eq!(c.len(), 2);
        std::fs::write(dir.path().join("lockstep.toml"), "[components]\napi = 1\n").expect("write");
        assert!(components(dir.path()).is_err());
    }
}
