//! Drift rules: how long an instance may be `stale` or `missing` before each alert
//! severity, and what happens to an open alert when the detector looks again.
//!
//! Pure functions with time passed in, so tests decide what "now" is and never sleep.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// How urgent an alert is, weakest first (the derived order is the escalation order).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Someone should act today.
    Medium,
    /// Someone should act now.
    High,
    /// Wake someone up.
    Critical,
}

impl Severity {
    /// Every severity, weakest first.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// Lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with an instance that has an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// Runs a release that is neither expected nor accepted.
    Stale,
    /// Stopped heartbeating.
    Missing,
    /// A rollout of a release that is not rollback-safe failed and froze: nothing was
    /// rolled back, a person must decide (raised by the rollout coordinator, on the rollout
    /// — `instance_id` `rollout-<id>` — not by the drift detector, which leaves it alone).
    #[serde(rename = "rollout_frozen")]
    RolloutFrozen,
}

impl Condition {
    /// Lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Stale => "stale",
            Condition::Missing => "missing",
            Condition::RolloutFrozen => "rollout_frozen",
        }
    }

    /// Whether the drift detector owns alerts of this condition (opens, escalates and
    /// resolves them from what it observes).
    pub fn is_drift(self) -> bool {
        matches!(self, Condition::Stale | Condition::Missing)
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Condition> {
        match s {
            "stale" => Some(Condition::Stale),
            "missing" => Some(Condition::Missing),
            "rollout_frozen" => Some(Condition::RolloutFrozen),
            _ => None,
        }
    }
}

/// Severity of a missing instance: a fixed one, or the drift thresholds like a stale one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingSeverity {
    /// Always this severity, at once (the source system's "unreachable = critical").
    Fixed(Severity),
    /// The drift thresholds, counted from when its TTL ran out.
    Thresholds,
}

/// `[drift]` of the configuration: how long stale before each severity (`None`: that
/// severity is never used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    /// Stale this long: `low`.
    pub low: Option<Duration>,
    /// Stale this long: `medium`.
    pub medium: Option<Duration>,
    /// Stale this long: `high`.
    pub high: Option<Duration>,
    /// Stale this long: `critical`.
    pub critical: Option<Duration>,
    /// Severity of a missing instance.
    pub missing: MissingSeverity,
}

impl Default for Thresholds {
    /// Minutes, not hours: a deploy normally converges within a minute or two, so an
    /// instance still stale after 1 minute is worth a note, after 10 a person, after an
    /// hour an incident; a day is the source system's "critical".
    fn default() -> Self {
        Thresholds {
            low: Some(Duration::from_secs(60)),
            medium: Some(Duration::from_secs(600)),
            high: Some(Duration::from_secs(3600)),
            critical: Some(Duration::from_secs(86_400)),
            missing: MissingSeverity::Fixed(Severity::Critical),
        }
    }
}

impl Thresholds {
    /// The thresholds, weakest first, with their severity.
    fn levels(&self) -> [(Severity, Option<Duration>); 4] {
        [
            (Severity::Low, self.low),
            (Severity::Medium, self.medium),
            (Severity::High, self.high),
            (Severity::Critical, self.critical),
        ]
    }

    /// Refuses thresholds that decrease with severity (a `high` reached before `medium`).
    pub fn validate(&self) -> Result<(), String> {
        let mut last: Option<(Severity, Duration)> = None;
        for (sev, t) in self.levels() {
            if let Some(t) = t {
                if let Some((prev, p)) = last
                    && t < p
                {
                    return Err(format!(
                        "drift threshold {sev} ({}s) is shorter than {prev} ({}s)",
                        t.as_secs(),
                        p.as_secs()
                    ));
                }
                last = Some((sev, t));
            }
        }
        Ok(())
    }

    /// The severity of `condition` after `drift`; `None` when below every threshold.
    pub fn severity(&self, condition: Condition, drift: Duration) -> Option<Severity> {
        if condition == Condition::Missing
            && let MissingSeverity::Fixed(s) = self.missing
        {
            return Some(s);
        }
        self.levels()
            .into_iter()
            .filter_map(|(sev, t)| t.filter(|t| drift >= *t).map(|_| sev))
            .max()
    }
}

/// What the detector sees of one instance that is wrong now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The instance.
    pub instance_id: String,
    /// What is wrong.
    pub condition: Condition,
    /// For how long.
    pub drift: Duration,
}

/// An alert that is open now: its key and severity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAlert {
    /// The instance.
    pub instance_id: String,
    /// What is wrong.
    pub condition: Condition,
    /// Current severity.
    pub severity: Severity,
}

/// What to do with one (instance, condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertAction {
    /// Open a new alert at this severity.
    Open {
        /// The instance.
        instance_id: String,
        /// What is wrong.
        condition: Condition,
        /// Severity.
        severity: Severity,
        /// Drift so far.
        drift: Duration,
    },
    /// Raise the open alert's severity in place.
    Escalate {
        /// The instance.
        instance_id: String,
        /// What is wrong.
        condition: Condition,
        /// New severity (higher than the old one).
        severity: Severity,
        /// Drift so far.
        drift: Duration,
    },
    /// Close the open alert: the instance is current, draining, deregistered or forgotten,
    /// or its condition changed.
    Resolve {
        /// The instance.
        instance_id: String,
        /// What was wrong.
        condition: Condition,
    },
}

/// The lifecycle rule, for the whole fleet at once: open what crossed a threshold,
/// escalate in place what crossed a higher one (never lower a severity: a new release
/// resetting the drift does not make an old problem less urgent), resolve what is no longer
/// observed. An observation below every threshold keeps an open alert open. The result is
/// sorted by instance id, then condition, so it is the same on every replica. Open alerts
/// of a condition the detector does not own (a frozen rollout's) are left alone.
pub fn plan_alerts(
    open: &[OpenAlert],
    observed: &[Observation],
    thresholds: &Thresholds,
) -> Vec<AlertAction> {
    let by_key: HashMap<(&str, Condition), Severity> = open
        .iter()
        .map(|a| ((a.instance_id.as_str(), a.condition), a.severity))
        .collect();
    let mut seen: HashSet<(&str, Condition)> = HashSet::new();
    let mut out = Vec::new();
    for o in observed {
        let key = (o.instance_id.as_str(), o.condition);
        seen.insert(key);
        let Some(want) = thresholds.severity(o.condition, o.drift) else {
            continue;
        };
        match by_key.get(&key) {
            None => out.push(AlertAction::Open {
                instance_id: o.instance_id.clone(),
                condition: o.condition,
                severity: want,
                drift: o.drift,
            }),
            Some(have) if want > *have => out.push(AlertAction::Escalate {
                instance_id: o.instance_id.clone(),
                condition: o.condition,
                severity: want,
                drift: o.drift,
            }),
            Some(_) => {}
        }
    }
    for a in open.iter().filter(|a| a.condition.is_drift()) {
        if !seen.contains(&(a.instance_id.as_str(), a.condition)) {
            out.push(AlertAction::Resolve {
                instance_id: a.instance_id.clone(),
                condition: a.condition,
            });
        }
    }
    out.sort_by(|a, b| key_of(a).cmp(&key_of(b)));
    out
}

fn key_of(a: &AlertAction) -> (&str, &str) {
    match a {
        AlertAction::Open {
            instance_id,
            condition,
            ..
        }
        | AlertAction::Escalate {
            instance_id,
            condition,
            ..
        }
        | AlertAction::Resolve {
            instance_id,
            condition,
        } => (instance_id.as_str(), condition.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drift_plan_never_resolves_a_frozen_rollouts_alert() {
        let open = [OpenAlert {
            instance_id: "rollout-7".into(),
            condition: Condition::RolloutFrozen,
            severity: Severity::Critical,
        }];
        assert_eq!(plan_alerts(&open, &[], &source_system()), vec![]);
        assert_eq!(
            serde_json::to_value(Condition::RolloutFrozen).expect("json"),
            "rollout_frozen"
        );
        assert_eq!(
            Condition::parse("rollout_frozen"),
            Some(Condition::RolloutFrozen)
        );
    }

    const M: u64 = 60;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn source_system() -> Thresholds {
        Thresholds {
            low: None,
            medium: Some(secs(6 * 3600)),
            high: Some(secs(12 * 3600)),
            critical: Some(secs(24 * 3600)),
            missing: MissingSeverity::Fixed(Severity::Critical),
        }
    }

    #[test]
    fn default_thresholds_map_drift_to_severity() {
        let t = Thresholds::default();
        let cases = [
            (0, None),
            (59, None),
            (M, Some(Severity::Low)),
            (10 * M - 1, Some(Severity::Low)),
            (10 * M, Some(Severity::Medium)),
            (60 * M, Some(Severity::High)),
            (24 * 60 * M, Some(Severity::Critical)),
            (100 * 24 * 60 * M, Some(Severity::Critical)),
        ];
        for (drift, want) in cases {
            assert_eq!(t.severity(Condition::Stale, secs(drift)), want, "{drift}s");
        }
        assert_eq!(
            t.severity(Condition::Missing, secs(0)),
            Some(Severity::Critical)
        );
    }

    #[test]
    fn the_source_systems_6h_12h_24h_and_unreachable_critical_are_expressible() {
        let t = source_system();
        assert_eq!(t.severity(Condition::Stale, secs(5 * 3600)), None);
        assert_eq!(
            t.severity(Condition::Stale, secs(6 * 3600)),
            Some(Severity::Medium)
        );
        assert_eq!(
            t.severity(Condition::Stale, secs(13 * 3600)),
            Some(Severity::High)
        );
        assert_eq!(
            t.severity(Condition::Stale, secs(24 * 3600)),
            Some(Severity::Critical)
        );
        assert_eq!(
            t.severity(Condition::Missing, secs(1)),
            Some(Severity::Critical)
        );
        assert!(t.validate().is_ok());
    }

    #[test]
    fn zero_thresholds_alert_at_once_and_missing_can_follow_the_thresholds() {
        let t = Thresholds {
            low: Some(secs(0)),
            medium: None,
            high: None,
            critical: None,
            missing: MissingSeverity::Thresholds,
        };
        assert_eq!(t.severity(Condition::Stale, secs(0)), Some(Severity::Low));
        assert_eq!(t.severity(Condition::Missing, secs(0)), Some(Severity::Low));
    }

    #[test]
    fn thresholds_that_shrink_with_severity_are_refused() {
        let t = Thresholds {
            low: None,
            medium: Some(secs(10)),
            high: Some(secs(5)),
            ..Thresholds::default()
        };
        let err = t.validate().unwrap_err();
        assert!(err.contains("high"), "{err}");
    }

    fn obs(id: &str, c: Condition, drift: u64) -> Observation {
        Observation {
            instance_id: id.into(),
            condition: c,
            drift: secs(drift),
        }
    }

    fn open(id: &str, c: Condition, s: Severity) -> OpenAlert {
        OpenAlert {
            instance_id: id.into(),
            condition: c,
            severity: s,
        }
    }

    #[test]
    fn lifecycle_opens_escalates_keeps_and_resolves() {
        use Condition::*;
        use Severity::*;
        let t = Thresholds::default();
        // (open alerts, observations, expected actions)
        let cases: Vec<(Vec<OpenAlert>, Vec<Observation>, Vec<AlertAction>)> = vec![
            // below every threshold: nothing
            (vec![], vec![obs("a", Stale, 30)], vec![]),
            // crosses low: open
            (
                vec![],
                vec![obs("a", Stale, M)],
                vec![AlertAction::Open {
                    instance_id: "a".into(),
                    condition: Stale,
                    severity: Low,
                    drift: secs(M),
                }],
            ),
            // still low: no duplicate
            (
                vec![open("a", Stale, Low)],
                vec![obs("a", Stale, 5 * M)],
                vec![],
            ),
            // crosses medium: escalate in place
            (
                vec![open("a", Stale, Low)],
                vec![obs("a", Stale, 10 * M)],
                vec![AlertAction::Escalate {
                    instance_id: "a".into(),
                    condition: Stale,
                    severity: Medium,
                    drift: secs(10 * M),
                }],
            ),
            // drift reset by a new release: severity never goes down, alert stays open
            (
                vec![open("a", Stale, High)],
                vec![obs("a", Stale, 0)],
                vec![],
            ),
            // current again (not observed): resolve
            (
                vec![open("a", Stale, Low)],
                vec![],
                vec![AlertAction::Resolve {
                    instance_id: "a".into(),
                    condition: Stale,
                }],
            ),
            // stale → missing: the stale alert resolves, a missing one opens
            (
                vec![open("a", Stale, Low)],
                vec![obs("a", Missing, 0)],
                vec![
                    AlertAction::Open {
                        instance_id: "a".into(),
                        condition: Missing,
                        severity: Critical,
                        drift: secs(0),
                    },
                    AlertAction::Resolve {
                        instance_id: "a".into(),
                        condition: Stale,
                    },
                ],
            ),
        ];
        for (i, (have, seen, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan_alerts(&have, &seen, &t), want, "case {i}");
        }
    }

    #[test]
    fn a_fleet_wide_drift_opens_one_alert_per_instance_in_a_stable_order() {
        let t = Thresholds::default();
        let seen: Vec<Observation> = (0..100)
            .rev()
            .map(|i| obs(&format!("i{i:03}"), Condition::Stale, 2 * M))
            .collect();
        let plan = plan_alerts(&[], &seen, &t);
        assert_eq!(plan.len(), 100);
        assert!(matches!(&plan[0], AlertAction::Open { instance_id, .. } if instance_id == "i000"));
    }
}
