//! Releases, their comparison, the registration rules (idempotence, downgrade refusal)
//! and the choice of a rollback target.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

use crate::CoreError;

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// What a deploy produced. Only `version_id` is compared; the rest informs people and rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Release {
    /// The identity compared with what instances run (a UUID v4, a git SHA, …): 1-128
    /// characters, no whitespace or control characters.
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub version_id: String,
    /// Human label, e.g. `v1.4.0` or `dev-b7e4c27`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The commit the release was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    /// When the release was built; used to refuse downgrades.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub build_date: Option<OffsetDateTime>,
    /// When it was deployed; set by the registry when absent.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub deployed_at: Option<OffsetDateTime>,
    /// Component name → version; compared where both sides report them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, String>,
    /// Older version ids still allowed to serve while they drain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub accepts: Vec<String>,
    /// False when this release ran a migration that an older release cannot read.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub rollback_safe: bool,
    /// Why it was registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who registered it (the token's name); set by the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Free-form data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl Release {
    /// A release with only a version id.
    pub fn new(version_id: impl Into<String>) -> Self {
        Release {
            version_id: version_id.into(),
            version: None,
            git_sha: None,
            build_date: None,
            deployed_at: None,
            components: BTreeMap::new(),
            accepts: Vec::new(),
            rollback_safe: true,
            reason: None,
            actor: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// A release as the registry stores and serves it: where it applies and its revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredRelease {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The registry-wide monotonic revision of the change that made this release expected.
    pub revision: i64,
    /// `register` or `rollback`.
    pub kind: RegistrationKind,
    /// When this revision was written.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub registered_at: OffsetDateTime,
    /// The release itself.
    #[serde(flatten)]
    pub release: Release,
}

/// How a release became expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationKind {
    /// A new release was registered (deploy or `register`).
    Register,
    /// An earlier release was made expected again.
    Rollback,
}

impl RegistrationKind {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationKind::Register => "register",
            RegistrationKind::Rollback => "rollback",
        }
    }

    /// Parses the storage name; anything unknown reads as `register`.
    pub fn parse(s: &str) -> Self {
        if s == "rollback" {
            RegistrationKind::Rollback
        } else {
            RegistrationKind::Register
        }
    }
}

/// Two releases agree when their version ids are equal and every component the expected
/// release names is reported with the same version (when the running side reports any).
pub fn releases_agree(
    expected_id: &str,
    expected_components: &BTreeMap<String, String>,
    running_id: &str,
    running_components: &BTreeMap<String, String>,
) -> bool {
    if expected_id != running_id {
        return false;
    }
    if expected_components.is_empty() || running_components.is_empty() {
        return true;
    }
    expected_components
        .iter()
        .all(|(name, v)| running_components.get(name) == Some(v))
}

/// What to do with a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The release is already expected: answer with the stored one, write nothing.
    Unchanged,
    /// Write a new revision.
    Apply,
}

/// `v1.0.0 (3f2a9c1e)`, or the short id alone: how a refusal names a release (logs and
/// answers may show only the first 8 characters of a version id).
pub fn describe(r: &Release) -> String {
    match &r.version {
        Some(v) => format!("{v} ({})", crate::short_id(&r.version_id)),
        None => crate::short_id(&r.version_id).to_string(),
    }
}

/// Whether `new` is older than `current`, and by what evidence: the semantic versions of
/// their `version` labels when both parse and differ (`v0.9.0` after `v1.0.0`), otherwise
/// their build dates when both have one. Equal versions or missing evidence: not older.
pub fn older_by(current: &Release, new: &Release) -> Option<&'static str> {
    if let (Some(a), Some(b)) = (&current.version, &new.version)
        && let Some(order) = crate::semver::compare(b, a)
        && order != std::cmp::Ordering::Equal
    {
        return (order == std::cmp::Ordering::Less).then_some("semantic version");
    }
    match (current.build_date, new.build_date) {
        (Some(old), Some(newer)) if newer < old => Some("build date"),
        _ => None,
    }
}

/// The registration rules, shared by every store backend so they decide alike inside
/// their own transaction: re-registering the expected release changes nothing; a
/// registration older than the expected release ([`older_by`]) is refused unless forced;
/// a rollback from a release that is not rollback-safe needs force.
pub fn decide_registration(
    current: Option<&Release>,
    new: &Release,
    kind: RegistrationKind,
    force: bool,
) -> Result<Decision, CoreError> {
    let Some(current) = current else {
        return Ok(Decision::Apply);
    };
    // The same release with other accepted releases (a rollout ending: its previous
    // release is no longer accepted) is a change of what the registry expects.
    if current.version_id == new.version_id && current.accepts == new.accepts {
        return Ok(Decision::Unchanged);
    }
    match kind {
        RegistrationKind::Register => {
            if let Some(by) = older_by(current, new)
                && !force
            {
                return Err(CoreError::Downgrade {
                    current: describe(current),
                    new: describe(new),
                    by,
                });
            }
        }
        RegistrationKind::Rollback => {
            if !current.rollback_safe && !force {
                return Err(CoreError::NotRollbackSafe);
            }
        }
    }
    Ok(Decision::Apply)
}

/// One row of a service's history, newest first, as the rollback rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Revision of the row.
    pub revision: i64,
    /// Version id made expected by it.
    pub version_id: String,
    /// Register or rollback.
    pub kind: RegistrationKind,
}

/// Chooses the release a rollback makes expected.
///
/// With `to`, that version id (it must be in the history). Without, "the previous release":
/// the newest entry older than the *original registration* of the current release and with
/// another version id, so repeated rollbacks walk back through history instead of
/// bouncing between two releases.
pub fn rollback_target<'a>(
    history: &'a [HistoryEntry],
    current_version_id: &str,
    to: Option<&str>,
) -> Result<&'a HistoryEntry, CoreError> {
    if let Some(to) = to {
        return history
            .iter()
            .find(|e| e.version_id == to)
            .ok_or(CoreError::UnknownRollbackTarget);
    }
    let origin = history
        .iter()
        .find(|e| e.version_id == current_version_id && e.kind == RegistrationKind::Register)
        .or_else(|| history.iter().find(|e| e.version_id == current_version_id))
        .map(|e| e.revision)
        .unwrap_or(i64::MAX);
    history
        .iter()
        .find(|e| e.revision < origin && e.version_id != current_version_id)
        .ok_or(CoreError::NoPreviousRelease)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rel(id: &str, built: Option<OffsetDateTime>) -> Release {
        let mut r = Release::new(id);
        r.build_date = built;
        r
    }

    #[test]
    fn same_version_id_is_idempotent() {
        let cur = rel("a", None);
        assert_eq!(
            decide_registration(
                Some(&cur),
                &rel("a", None),
                RegistrationKind::Register,
                false
            ),
            Ok(Decision::Unchanged)
        );
    }

    #[test]
    fn downgrade_is_refused_unless_forced_or_rollback() {
        let cur = rel("new", Some(datetime!(2026-11-02 0:00 UTC)));
        let old = rel("old", Some(datetime!(2026-11-01 0:00 UTC)));
        let reg = RegistrationKind::Register;
        assert!(matches!(
            decide_registration(Some(&cur), &old, reg, false),
            Err(CoreError::Downgrade {
                by: "build date",
                ..
            })
        ));
        assert_eq!(
            decide_registration(Some(&cur), &old, reg, true),
            Ok(Decision::Apply)
        );
        assert_eq!(
            decide_registration(Some(&cur), &old, RegistrationKind::Rollback, false),
            Ok(Decision::Apply)
        );
        // Without build dates there is nothing to compare: allowed.
        assert_eq!(
            decide_registration(Some(&rel("x", None)), &rel("y", None), reg, false),
            Ok(Decision::Apply)
        );
    }

    fn labelled(id: &str, version: &str, built: Option<OffsetDateTime>) -> Release {
        let mut r = rel(id, built);
        r.version = Some(version.into());
        r
    }

    /// `(expected label, new label)` → the decision on registering the new one, without
    /// build dates.
    fn check_versions(current: &str, new: &str, expect: Result<Decision, &str>) {
        let got = decide_registration(
            Some(&labelled("cur", current, None)),
            &labelled("new", new, None),
            RegistrationKind::Register,
            false,
        );
        match (got, expect) {
            (Ok(d), Ok(e)) => assert_eq!(d, e, "{current} -> {new}"),
            (Err(CoreError::Downgrade { by, .. }), Err(e)) => {
                assert_eq!(by, e, "{current} -> {new}")
            }
            (got, _) => panic!("{current} -> {new}: {got:?}"),
        }
    }

    #[test]
    fn a_lower_semantic_version_is_a_downgrade() {
        check_versions("v1.0.0", "v0.9.0", Err("semantic version"));
        check_versions("v1.10.0", "v1.9.9", Err("semantic version"));
        check_versions("1.0.0", "1.0.0-rc.1", Err("semantic version"));
        check_versions("v1.0.0", "v1.0.1", Ok(Decision::Apply));
        check_versions("v1.0.0", "v1.0.0", Ok(Decision::Apply));
        check_versions("v1.0.0", "dev-b7e4c27", Ok(Decision::Apply));
    }

    #[test]
    fn semantic_versions_win_over_build_dates_when_both_parse() {
        let early = Some(datetime!(2026-11-01 0:00 UTC));
        let late = Some(datetime!(2026-11-02 0:00 UTC));
        let reg = RegistrationKind::Register;
        // v0.9.0 rebuilt today is still older than v1.0.0.
        let cur = labelled("a", "v1.0.0", early);
        let err = decide_registration(Some(&cur), &labelled("b", "v0.9.0", late), reg, false);
        let Err(CoreError::Downgrade { current, new, by }) = err else {
            panic!("{err:?}");
        };
        assert_eq!(
            (current.as_str(), new.as_str(), by),
            ("v1.0.0 (a)", "v0.9.0 (b)", "semantic version")
        );
        let msg = CoreError::Downgrade { current, new, by }.to_string();
        assert!(
            msg.contains("--force") && msg.contains("v1.0.0 (a)") && msg.contains("v0.9.0 (b)"),
            "{msg}"
        );
        // v2.0.0 built before v1.9.9 is still newer.
        let cur = labelled("a", "v1.9.9", late);
        assert_eq!(
            decide_registration(Some(&cur), &labelled("b", "v2.0.0", early), reg, false),
            Ok(Decision::Apply)
        );
        // Equal labels: the build dates decide.
        let cur = labelled("a", "v1.0.0", late);
        assert!(
            decide_registration(Some(&cur), &labelled("b", "v1.0.0", early), reg, false).is_err()
        );
        assert_eq!(
            decide_registration(Some(&cur), &labelled("b", "v0.1.0", early), reg, true),
            Ok(Decision::Apply)
        );
    }

    #[test]
    fn rollback_from_unsafe_release_needs_force() {
        let mut cur = rel("b", None);
        cur.rollback_safe = false;
        let k = RegistrationKind::Rollback;
        assert_eq!(
            decide_registration(Some(&cur), &rel("a", None), k, false),
            Err(CoreError::NotRollbackSafe)
        );
        assert_eq!(
            decide_registration(Some(&cur), &rel("a", None), k, true),
            Ok(Decision::Apply)
        );
    }

    #[test]
    fn components_compare_where_both_report_them() {
        let mut exp = BTreeMap::new();
        exp.insert("api".to_string(), "1.2".to_string());
        let mut run = BTreeMap::new();
        assert!(releases_agree("v", &exp, "v", &run));
        run.insert("api".to_string(), "1.1".to_string());
        assert!(!releases_agree("v", &exp, "v", &run));
        run.insert("api".to_string(), "1.2".to_string());
        run.insert("extra".to_string(), "9".to_string());
        assert!(releases_agree("v", &exp, "v", &run));
        assert!(!releases_agree("v", &exp, "w", &run));
    }

    fn h(revision: i64, id: &str, kind: RegistrationKind) -> HistoryEntry {
        HistoryEntry {
            revision,
            version_id: id.into(),
            kind,
        }
    }

    #[test]
    fn repeated_rollbacks_walk_back_through_history() {
        use RegistrationKind::*;
        let mut hist = vec![
            h(3, "v3", Register),
            h(2, "v2", Register),
            h(1, "v1", Register),
        ];
        assert_eq!(
            rollback_target(&hist, "v3", None).map(|e| e.version_id.as_str()),
            Ok("v2")
        );
        hist.insert(0, h(4, "v2", Rollback));
        assert_eq!(
            rollback_target(&hist, "v2", None).map(|e| e.version_id.as_str()),
            Ok("v1")
        );
        hist.insert(0, h(5, "v1", Rollback));
        assert_eq!(
            rollback_target(&hist, "v1", None),
            Err(CoreError::NoPreviousRelease)
        );
        assert_eq!(
            rollback_target(&hist, "v1", Some("v3")).map(|e| e.revision),
            Ok(3)
        );
        assert_eq!(
            rollback_target(&hist, "v1", Some("nope")),
            Err(CoreError::UnknownRollbackTarget)
        );
    }
}
