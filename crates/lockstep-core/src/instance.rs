//! Instances (running processes), their status against the expected release, and drift.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

use crate::release::{Release, releases_agree};

/// One running process as its heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    /// Stable id chosen by the instance.
    pub instance_id: String,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The release it runs.
    pub version_id: String,
    /// Its baked commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    /// Its build date.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub build_date: Option<OffsetDateTime>,
    /// Component versions it reports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, String>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, maximum = 4294967295_u64)]
    pub pid: Option<u32>,
    /// When the process started.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub started_at: Option<OffsetDateTime>,
    /// When the registry first heard of it with this version id.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub first_seen: OffsetDateTime,
    /// Last heartbeat.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub last_seen: OffsetDateTime,
    /// URL the gateway and the agent use to reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Self-reported health (free text such as `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

impl Instance {
    /// An instance known only by its names, first and last seen at `seen`; everything it
    /// may also report (commit, host, pid, endpoint, …) is left empty, to be set with
    /// struct-update syntax.
    pub fn new(
        instance_id: impl Into<String>,
        env: impl Into<String>,
        service: impl Into<String>,
        version_id: impl Into<String>,
        seen: OffsetDateTime,
    ) -> Instance {
        Instance {
            instance_id: instance_id.into(),
            env: env.into(),
            service: service.into(),
            version_id: version_id.into(),
            git_sha: None,
            build_date: None,
            components: BTreeMap::new(),
            host: None,
            pid: None,
            started_at: None,
            first_seen: seen,
            last_seen: seen,
            endpoint: None,
            health: None,
        }
    }
}

/// How an instance stands against its service's expected release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Runs the expected release.
    Current,
    /// Runs a release the expected one still accepts: it may serve, and is reported.
    Draining,
    /// Runs any other release.
    Stale,
    /// No heartbeat within its TTL.
    Missing,
    /// No expected release is registered for its service.
    Unknown,
}

impl Status {
    /// Lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Current => "current",
            Status::Draining => "draining",
            Status::Stale => "stale",
            Status::Missing => "missing",
            Status::Unknown => "unknown",
        }
    }
}

/// Counts per status for one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusCounts {
    /// Instances on the expected release.
    pub current: u32,
    /// Instances on an accepted older release.
    pub draining: u32,
    /// Instances on any other release.
    pub stale: u32,
    /// Instances that stopped heartbeating.
    pub missing: u32,
    /// Instances of a service with no expected release to compare with.
    #[serde(default)]
    pub unknown: u32,
}

impl StatusCounts {
    /// Adds one instance of `status`.
    pub fn add(&mut self, status: Status) {
        match status {
            Status::Current => self.current += 1,
            Status::Draining => self.draining += 1,
            Status::Stale => self.stale += 1,
            Status::Missing => self.missing += 1,
            Status::Unknown => self.unknown += 1,
        }
    }
}

/// The status of an instance running `version_id` (with `components`) against `expected`.
/// `missing` wins over everything: an instance that stopped heartbeating runs nothing we know.
pub fn instance_status(
    expected: Option<&Release>,
    version_id: &str,
    components: &BTreeMap<String, String>,
    missing: bool,
) -> Status {
    if missing {
        return Status::Missing;
    }
    let Some(exp) = expected else {
        return Status::Unknown;
    };
    if releases_agree(&exp.version_id, &exp.components, version_id, components) {
        Status::Current
    } else if exp.accepts.iter().any(|a| a == version_id) {
        Status::Draining
    } else {
        Status::Stale
    }
}

/// How long an instance has been wrong, in whole seconds.
///
/// Stale (or draining): since the later of "the expected release changed" and "the registry
/// first saw this instance on its version". Missing: since its TTL ran out. Otherwise 0.
pub fn drift_secs(
    status: Status,
    now: OffsetDateTime,
    instance: &Instance,
    expected_since: Option<OffsetDateTime>,
    ttl_secs: u64,
) -> u64 {
    let since = match status {
        Status::Current | Status::Unknown => return 0,
        Status::Stale | Status::Draining => match expected_since {
            Some(t) if t > instance.first_seen => t,
            _ => instance.first_seen,
        },
        Status::Missing => instance.last_seen + time::Duration::seconds(ttl_secs as i64),
    };
    (now - since).whole_seconds().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn exp(id: &str, accepts: &[&str]) -> Release {
        let mut r = Release::new(id);
        r.accepts = accepts.iter().map(|s| s.to_string()).collect();
        r
    }

    #[test]
    fn status_table() {
        let none = BTreeMap::new();
        let e = exp("v2", &["v1"]);
        let cases: [(Option<&Release>, &str, bool, Status); 6] = [
            (Some(&e), "v2", false, Status::Current),
            (Some(&e), "v1", false, Status::Draining),
            (Some(&e), "v0", false, Status::Stale),
            (Some(&e), "v2", true, Status::Missing),
            (None, "v2", false, Status::Unknown),
            (None, "v2", true, Status::Missing),
        ];
        for (expected, running, missing, want) in cases {
            assert_eq!(
                instance_status(expected, running, &none, missing),
                want,
                "{running}"
            );
        }
    }

    fn inst() -> Instance {
        Instance {
            first_seen: datetime!(2026-11-01 10:00 UTC),
            ..Instance::new(
                "i",
                "production",
                "s",
                "v1",
                datetime!(2026-11-01 10:05 UTC),
            )
        }
    }

    #[test]
    fn drift_counts_from_the_later_of_deploy_and_first_seen() {
        let now = datetime!(2026-11-01 11:00 UTC);
        let i = inst();
        assert_eq!(drift_secs(Status::Current, now, &i, None, 30), 0);
        assert_eq!(
            drift_secs(
                Status::Stale,
                now,
                &i,
                Some(datetime!(2026-11-01 10:30 UTC)),
                30
            ),
            1800
        );
        assert_eq!(
            drift_secs(
                Status::Stale,
                now,
                &i,
                Some(datetime!(2026-11-01 9:00 UTC)),
                30
            ),
            3600
        );
        // Missing: since last_seen + ttl.
        assert_eq!(drift_secs(Status::Missing, now, &i, None, 60), 3240);
    }
}
