//! Semantic-version precedence for release labels, as the downgrade rule needs it: is
//! `v0.9.0` older than `v1.0.0`?
//!
//! Lenient where labels in the wild are: a leading `v`, one to three numeric parts
//! (`v2` is `2.0.0`, `1.4` is `1.4.0`), an optional `-pre.release` and an ignored
//! `+build`. Anything else (`dev-b7e4c27`, a UUID, a date) is not a semantic version and
//! the caller falls back to other evidence.
//!
//! ```
//! use lockstep_core::semver::Version;
//! let a = Version::parse("v0.9.0").unwrap();
//! let b = Version::parse("1.0.0-rc.1").unwrap();
//! assert!(a < b);
//! assert!(b < Version::parse("v1").unwrap());
//! assert!(Version::parse("dev-b7e4c27").is_none());
//! ```

use std::cmp::Ordering;

/// A parsed semantic version (build metadata dropped: it does not affect precedence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// MAJOR, MINOR, PATCH.
    pub core: [u64; 3],
    /// Dot-separated pre-release identifiers; empty for a release.
    pub pre: Vec<String>,
}

impl Version {
    /// Parses `label`, or `None` when it is not a semantic version.
    pub fn parse(label: &str) -> Option<Version> {
        let s = label.trim();
        let s = s
            .strip_prefix('v')
            .or_else(|| s.strip_prefix('V'))
            .unwrap_or(s);
        let s = s.split_once('+').map_or(s, |(v, _build)| v);
        let (nums, pre) = match s.split_once('-') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let parts: Vec<&str> = nums.split('.').collect();
        if parts.is_empty() || parts.len() > 3 {
            return None;
        }
        let mut core = [0u64; 3];
        for (slot, p) in core.iter_mut().zip(&parts) {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 18 {
                return None;
            }
            *slot = p.parse().ok()?;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(p) => {
                let ids: Vec<String> = p.split('.').map(str::to_string).collect();
                let valid = |id: &String| {
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                };
                if !ids.iter().all(valid) {
                    return None;
                }
                ids
            }
        };
        Some(Version { core, pre })
    }
}

fn cmp_identifier(a: &str, b: &str) -> Ordering {
    let num = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        // Numeric identifiers have lower precedence than alphanumeric ones.
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core.cmp(&other.core).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A pre-release comes before its release.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let o = cmp_identifier(a, b);
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Compares two labels when both are semantic versions.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    Some(Version::parse(a)?.cmp(&Version::parse(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(a, b)` → how `a` compares to `b`, or `None` when either is not a version.
    fn check(a: &str, b: &str, expect: Option<Ordering>) {
        assert_eq!(compare(a, b), expect, "{a} vs {b}");
    }

    #[test]
    fn semantic_versions_compare_by_precedence() {
        use Ordering::*;
        check("v0.9.0", "v1.0.0", Some(Less));
        check("1.10.0", "1.9.0", Some(Greater));
        check("v1.0.0", "1.0.0", Some(Equal));
        check("v1", "v2", Some(Less));
        check("1.4", "1.4.0", Some(Equal));
        check("1.0.0-alpha", "1.0.0", Some(Less));
        check("1.0.0-alpha", "1.0.0-alpha.1", Some(Less));
        check("1.0.0-alpha.1", "1.0.0-alpha.beta", Some(Less));
        check("1.0.0-beta.2", "1.0.0-beta.11", Some(Less));
        check("1.0.0-rc.1", "1.0.0", Some(Less));
        check("1.0.0+build.5", "1.0.0+build.9", Some(Equal));
        check("2026.11.24", "2026.11.3", Some(Greater));
    }

    #[test]
    fn labels_that_are_not_semantic_versions_do_not_compare() {
        check("dev-b7e4c27", "v1.0.0", None);
        check("v1.0.0", "3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f", None);
        check("1.2.3.4", "1.2.3", None);
        check("v1..2", "v1.2", None);
        check("", "1.0.0", None);
        check("1.0.0-", "1.0.0", None);
        check("latest", "stable", None);
    }
}
