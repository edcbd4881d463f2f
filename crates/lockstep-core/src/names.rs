//! Name and version-id validation, and the 8-character prefix used in logs.

use crate::CoreError;

/// Checks a service or environment name against `^[a-z0-9][a-z0-9._-]{0,63}$`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), CoreError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidName {
            kind,
            name: name.chars().take(80).collect(),
        })
    }
}

/// Checks a version id: 1-128 printable characters without whitespace.
pub fn validate_version_id(id: &str) -> Result<(), CoreError> {
    if id.is_empty() {
        return Err(CoreError::InvalidVersionId("must not be empty"));
    }
    // Characters, not bytes: the OpenAPI description says `maxLength: 128`, which counts
    // characters, and a client validating against it must not be refused here.
    if id.chars().count() > 128 {
        return Err(CoreError::InvalidVersionId("longer than 128 characters"));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CoreError::InvalidVersionId(
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

/// The first 8 characters of a version id: all that logs may show of it.
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(8) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// Whether a version id is a git commit SHA (7 to 40 hex digits): then it is also the
/// commit a verify script compares, e.g. the mirrored `gitSha` of a worker guarded with
/// `--version-id $(git rev-parse HEAD)`.
pub fn is_git_sha(id: &str) -> bool {
    (7..=40).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, ok: bool) {
        assert_eq!(validate_name("service", name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn names_follow_the_contract_pattern() {
        check("op-auth", true);
        check("extractor", true);
        check("a", true);
        check("9lives.v2_x", true);
        check(&"a".repeat(64), true);
        check(&"a".repeat(65), false);
        check("", false);
        check("-lead", false);
        check(".hidden", false);
        check("Upper", false);
        check("spa ce", false);
        check("slash/y", false);
        check("ünï", false);
        check("../etc", false);
    }

    #[test]
    fn version_ids_reject_empty_long_and_whitespace() {
        assert!(validate_version_id("3f2a9c1e-0000-4000-8000-000000000000").is_ok());
        assert!(validate_version_id("").is_err());
        assert!(validate_version_id("a b").is_err());
        assert!(validate_version_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn short_id_keeps_eight_characters() {
        assert_eq!(short_id("3f2a9c1e-0000-4000"), "3f2a9c1e");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("ééééééééé"), "éééééééé");
    }
}
