//! The rules of `lockstep verify`: which instances of a [`StatusReport`] are fine, which are
//! not, and whether the fleet as a whole passes.
//!
//! Pure and synchronous, so CI, the update agent and the rollout coordinator judge a fleet
//! alike; fetching the report and printing the lines is the caller's business.
//!
//! - Against the registry (no expectation): an instance is `OK` only when it is `current`;
//!   `draining`, `unknown` and `stale` instances fail, and so does a `missing` one.
//! - Against an expectation (`--expect SHA`): an instance that is not missing is `OK` when its
//!   version id or git SHA equals the expectation, or starts with it when the expectation
//!   has at least 7 characters; otherwise `STALE`. An empty expectation matches nothing.
//! - The fleet passes when no instance fails and there is at least one instance — or there
//!   is none and [`Rules::allow_empty`] says that is fine.
//!
//! ```
//! use lockstep_client::verify::{self, Conclusion, Rules};
//! let report = lockstep_api::StatusReport::default();
//! let v = verify::verify(&report, &Rules { expect: None, allow_empty: true });
//! assert_eq!(v.conclusion, Conclusion::Empty { allowed: true });
//! assert!(v.ok());
//! ```

use lockstep_api::{InstanceStatus, StatusReport};
use lockstep_core::Status;

/// Shortest expectation that may match as a prefix (a short git SHA).
pub const MIN_PREFIX: usize = 7;

/// What `verify` checks against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules<'a> {
    /// Check every instance against this git SHA or version id instead of the registry's
    /// expected release.
    pub expect: Option<&'a str>,
    /// Pass when there is no instance at all.
    pub allow_empty: bool,
}

/// The verdict on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// Runs what it should.
    Ok,
    /// Runs a release the expected one still accepts (fails verify).
    Draining,
    /// No expected release is registered for its service (fails verify).
    Unknown,
    /// Runs another release.
    Stale,
    /// No heartbeat within its TTL.
    Missing,
}

impl Mark {
    /// The label printed between brackets: `OK`, `DRAINING`, `UNKNOWN`, `STALE`, `MISSING`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Ok => "OK",
            Mark::Draining => "DRAINING",
            Mark::Unknown => "UNKNOWN",
            Mark::Stale => "STALE",
            Mark::Missing => "MISSING",
        }
    }

    /// Whether this instance passes.
    pub fn is_ok(self) -> bool {
        self == Mark::Ok
    }
}

/// One instance of the report with its verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line<'a> {
    /// The verdict.
    pub mark: Mark,
    /// Its environment.
    pub env: &'a str,
    /// Its service.
    pub service: &'a str,
    /// The instance as reported.
    pub instance: &'a InstanceStatus,
}

/// The verdict on the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conclusion {
    /// Every one of `total` (at least one) instances passes.
    AllCurrent {
        /// Instances checked.
        total: usize,
    },
    /// `failing` of `total` instances do not pass.
    NotCurrent {
        /// Instances that do not pass.
        failing: usize,
        /// Instances checked.
        total: usize,
    },
    /// There is no instance at all; `allowed` repeats [`Rules::allow_empty`].
    Empty {
        /// Whether an empty fleet passes.
        allowed: bool,
    },
}

impl Conclusion {
    /// Whether the fleet passes.
    pub fn ok(self) -> bool {
        matches!(
            self,
            Conclusion::AllCurrent { .. } | Conclusion::Empty { allowed: true }
        )
    }
}

/// Every instance with its verdict, in report order, and the verdict on the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification<'a> {
    /// One line per instance.
    pub lines: Vec<Line<'a>>,
    /// The verdict on the fleet.
    pub conclusion: Conclusion,
}

impl Verification<'_> {
    /// Whether the fleet passes.
    pub fn ok(&self) -> bool {
        self.conclusion.ok()
    }

    /// How many instances do not pass.
    pub fn failing(&self) -> usize {
        self.lines.iter().filter(|l| !l.mark.is_ok()).count()
    }

    /// Instances a running rollout has not reached yet (waiting for their batch, or being
    /// updated): behind, but going to plan.
    pub fn rollout_waiting(&self) -> Vec<&Line<'_>> {
        self.lines
            .iter()
            .filter(|l| {
                l.instance
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.step.is_waiting())
            })
            .collect()
    }

    /// Instances on which a rollout failed (their update, or their rollback).
    pub fn rollout_failed(&self) -> Vec<&Line<'_>> {
        self.lines
            .iter()
            .filter(|l| {
                l.instance
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.step.is_failure())
            })
            .collect()
    }
}

/// Whether instance `i` runs what `expect` names: its version id or git SHA equals it, or
/// starts with it when `expect` has at least [`MIN_PREFIX`] characters.
pub fn matches_expect(expect: &str, i: &InstanceStatus) -> bool {
    let hit = |v: &str| v == expect || (expect.len() >= MIN_PREFIX && v.starts_with(expect));
    hit(&i.instance.version_id) || i.instance.git_sha.as_deref().is_some_and(hit)
}

/// The verdict on one instance, against the registry's status of it or against `expect`.
pub fn mark(i: &InstanceStatus, expect: Option<&str>) -> Mark {
    match (i.status, expect) {
        (Status::Missing, _) => Mark::Missing,
        (_, Some(e)) if matches_expect(e, i) => Mark::Ok,
        (_, Some(_)) => Mark::Stale,
        (Status::Current, None) => Mark::Ok,
        (Status::Draining, None) => Mark::Draining,
        (Status::Unknown, None) => Mark::Unknown,
        (Status::Stale, None) => Mark::Stale,
    }
}

/// Applies `rules` to every instance of `report` and to the fleet.
pub fn verify<'a>(report: &'a StatusReport, rules: &Rules<'_>) -> Verification<'a> {
    let lines: Vec<Line<'a>> = report
        .environments
        .iter()
        .flat_map(|env| env.services.iter().map(move |svc| (env, svc)))
        .flat_map(|(env, svc)| {
            svc.instances.iter().map(move |i| Line {
                mark: mark(i, rules.expect),
                env: &env.name,
                service: &svc.name,
                instance: i,
            })
        })
        .collect();
    let total = lines.len();
    let failing = lines.iter().filter(|l| !l.mark.is_ok()).count();
    let conclusion = if total == 0 {
        Conclusion::Empty {
            allowed: rules.allow_empty,
        }
    } else if failing == 0 {
        Conclusion::AllCurrent { total }
    } else {
        Conclusion::NotCurrent { failing, total }
    };
    Verification { lines, conclusion }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::{EnvStatus, ServiceStatus};
    use lockstep_core::{Instance, StatusCounts};
    use time::OffsetDateTime;

    fn instance(
        id: &str,
        status: Status,
        version_id: &str,
        git_sha: Option<&str>,
    ) -> InstanceStatus {
        let now = OffsetDateTime::UNIX_EPOCH;
        InstanceStatus {
            instance: Instance {
                git_sha: git_sha.map(str::to_string),
                ..Instance::new(id, "production", "api", version_id, now)
            },
            status,
            drift_secs: 0,
            rollout: None,
        }
    }

    fn report(instances: Vec<InstanceStatus>) -> StatusReport {
        StatusReport {
            environments: vec![EnvStatus {
                name: "production".into(),
                services: vec![ServiceStatus {
                    name: "api".into(),
                    expected: None,
                    instances,
                    counts: StatusCounts::default(),
                }],
            }],
            ..StatusReport::default()
        }
    }

    const SHA: &str = "abcdef1234567890abcdef1234567890abcdef12";
    const V1: &str = "11111111-aaaa-4bbb-8ccc-000000000001";

    /// `(status, version id, git SHA, --expect)` → the label `verify` prints.
    fn check(input: (Status, &str, Option<&str>, Option<&str>), expect: &str) {
        let (status, version_id, git_sha, expectation) = input;
        let i = instance("w-1", status, version_id, git_sha);
        assert_eq!(mark(&i, expectation).as_str(), expect, "{input:?}");
    }

    #[test]
    fn instance_marks_follow_the_registry_without_an_expectation() {
        check((Status::Current, V1, None, None), "OK");
        check((Status::Draining, V1, None, None), "DRAINING");
        check((Status::Unknown, V1, None, None), "UNKNOWN");
        check((Status::Stale, V1, None, None), "STALE");
        check((Status::Missing, V1, None, None), "MISSING");
    }

    #[test]
    fn expect_matches_the_version_id_or_the_git_sha_whatever_the_registry_says() {
        check((Status::Stale, V1, None, Some(V1)), "OK");
        check((Status::Unknown, V1, Some(SHA), Some(SHA)), "OK");
        check((Status::Current, V1, Some(SHA), Some("0000000")), "STALE");
        check((Status::Current, V1, None, Some(SHA)), "STALE");
    }

    #[test]
    fn expect_matches_a_prefix_of_at_least_seven_characters() {
        check((Status::Current, V1, Some(SHA), Some("abcdef1")), "OK");
        check((Status::Current, V1, Some(SHA), Some("abcdef")), "STALE");
        check((Status::Current, V1, None, Some("1111111")), "OK");
        check((Status::Current, V1, None, Some("111111")), "STALE");
        check((Status::Current, "v1", None, Some("v1")), "OK");
    }

    #[test]
    fn expect_never_rescues_a_missing_instance() {
        check((Status::Missing, V1, Some(SHA), Some(SHA)), "MISSING");
        check((Status::Missing, V1, None, Some(V1)), "MISSING");
    }

    #[test]
    fn an_empty_expectation_matches_nothing() {
        check((Status::Current, V1, Some(SHA), Some("")), "STALE");
    }

    /// `(statuses of the instances, --allow-empty)` → the conclusion.
    fn check_fleet(input: (&[Status], bool), expect: Conclusion) {
        let (statuses, allow_empty) = input;
        let r = report(
            statuses
                .iter()
                .enumerate()
                .map(|(n, s)| instance(&format!("w-{n}"), *s, V1, None))
                .collect(),
        );
        let v = verify(
            &r,
            &Rules {
                expect: None,
                allow_empty,
            },
        );
        assert_eq!(v.conclusion, expect, "{input:?}");
        assert_eq!(v.ok(), expect.ok());
        assert_eq!(v.lines.len(), statuses.len());
    }

    #[test]
    fn verify_passes_only_when_every_instance_is_current() {
        use Status::*;
        check_fleet((&[Current], false), Conclusion::AllCurrent { total: 1 });
        check_fleet(
            (&[Current, Current], true),
            Conclusion::AllCurrent { total: 2 },
        );
    }

    #[test]
    fn verify_fails_when_any_instance_is_stale() {
        use Status::*;
        let not = |failing, total| Conclusion::NotCurrent { failing, total };
        check_fleet((&[Current, Stale], false), not(1, 2));
        check_fleet((&[Stale, Stale, Current], true), not(2, 3));
    }

    #[test]
    fn verify_fails_on_missing_draining_and_unknown_instances() {
        use Status::*;
        let not = |failing, total| Conclusion::NotCurrent { failing, total };
        check_fleet((&[Current, Missing], false), not(1, 2));
        check_fleet((&[Draining], false), not(1, 1));
        check_fleet((&[Unknown, Current], false), not(1, 2));
    }

    #[test]
    fn an_empty_fleet_fails_unless_allowed() {
        check_fleet((&[], false), Conclusion::Empty { allowed: false });
        check_fleet((&[], true), Conclusion::Empty { allowed: true });
        assert!(!Conclusion::Empty { allowed: false }.ok());
    }

    #[test]
    fn rollout_waiting_and_failed_nodes_are_told_apart() {
        use lockstep_api::{InstanceRollout, RolloutStep};
        let with = |id: &str, status, step: Option<RolloutStep>| {
            let mut i = instance(id, status, V1, None);
            i.rollout = step.map(|step| InstanceRollout {
                id: 7,
                step,
                reason: step.is_failure().then(|| "health check failed".into()),
            });
            i
        };
        let r = report(vec![
            with("a", Status::Current, Some(RolloutStep::Updated)),
            with("b", Status::Draining, Some(RolloutStep::Pending)),
            with("c", Status::Draining, Some(RolloutStep::Updating)),
            with("d", Status::Draining, Some(RolloutStep::Failed)),
            with("e", Status::Stale, Some(RolloutStep::RollbackFailed)),
            with("f", Status::Stale, None),
        ]);
        let v = verify(&r, &Rules::default());
        let ids = |ls: Vec<&Line<'_>>| -> Vec<String> {
            ls.iter()
                .map(|l| l.instance.instance.instance_id.clone())
                .collect()
        };
        assert_eq!(ids(v.rollout_waiting()), ["b", "c"]);
        assert_eq!(ids(v.rollout_failed()), ["d", "e"]);
        assert_eq!(v.failing(), 5, "waiting still fails verify");
        assert_eq!(
            r.environments[0].services[0].instances[3]
                .rollout
                .as_ref()
                .map(|m| m.describe()),
            Some("rollout 7: failed \u{2014} health check failed".to_string())
        );
        assert_eq!(
            r.environments[0].services[0].instances[1]
                .rollout
                .as_ref()
                .map(|m| m.describe()),
            Some("rollout 7: waiting for its batch".to_string())
        );
    }

    #[test]
    fn lines_keep_report_order_and_name_their_service() {
        let r = report(vec![
            instance("b", Status::Stale, "old", None),
            instance("a", Status::Current, V1, None),
        ]);
        let v = verify(&r, &Rules::default());
        let got: Vec<_> = v
            .lines
            .iter()
            .map(|l| {
                (
                    l.instance.instance.instance_id.as_str(),
                    l.mark,
                    l.env,
                    l.service,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("b", Mark::Stale, "production", "api"),
                ("a", Mark::Ok, "production", "api")
            ]
        );
        assert_eq!(v.failing(), 1);
    }
}
