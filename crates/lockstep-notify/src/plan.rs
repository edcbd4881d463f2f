//! The pure rules of delivery: which channel gets which alert change, when a channel may send
//! its next message (the rate limit that turns a fleet-wide drift into one digest), and how
//! long to wait before a retry. Time is passed in; nothing here does I/O.

use lockstep_api::{Alert, ChannelConfig, Event};
use lockstep_store::{DeliveryOutcome, NewNotification, Notification};
use std::time::Duration;
use time::OffsetDateTime;

/// Event kinds that notify channels. Acknowledgements are not sent: whoever acknowledged
/// already knows.
pub const NOTIFYING_KINDS: [&str; 3] = ["alert_opened", "alert_escalated", "alert_resolved"];

/// One notification per (alert change, channel whose `min_severity` the alert reaches).
pub fn route(events: &[Event], channels: &[ChannelConfig]) -> Vec<NewNotification> {
    let mut out = Vec::new();
    for ev in events {
        if !NOTIFYING_KINDS.contains(&ev.kind.as_str()) {
            continue;
        }
        let Ok(alert) = serde_json::from_value::<Alert>(ev.data.clone()) else {
            tracing::warn!(event = ev.id, kind = %ev.kind, "alert event without a readable alert; not sent");
            continue;
        };
        for c in channels {
            if alert.severity >= c.min_severity {
                out.push(NewNotification {
                    channel: c.name.clone(),
                    event_id: ev.id,
                    kind: ev.kind.clone(),
                    alert: alert.clone(),
                });
            }
        }
    }
    out
}

/// What a channel with queued notifications does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// Send these notifications as one message (a digest when several).
    Send(Vec<i64>),
    /// The channel sent within its window: wait until then.
    WaitUntil(OffsetDateTime),
}

/// The rate limit: a channel sends at most one message per `window`; everything queued when
/// it may send goes into that one message. The first change after a quiet window goes out at
/// once, so a single drift is not delayed, and a fleet-wide one is one digest per window.
pub fn batch(
    now: OffsetDateTime,
    window: Duration,
    last_sent: Option<OffsetDateTime>,
    queued: &[&Notification],
) -> Option<Batch> {
    if queued.is_empty() {
        return None;
    }
    if let Some(last) = last_sent {
        let open_at = last + window;
        if now < open_at {
            return Some(Batch::WaitUntil(open_at));
        }
    }
    Some(Batch::Send(queued.iter().map(|n| n.id).collect()))
}

/// Retry policy of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included) before a delivery is recorded as failed.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub base: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_secs(2),
            max: Duration::from_secs(300),
        }
    }
}

/// Exponential backoff: the wait after `failures` failed attempts (1 → `base`).
pub fn backoff(policy: &RetryPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    policy
        .base
        .checked_mul(1u32 << exp)
        .unwrap_or(policy.max)
        .min(policy.max)
}

/// What to record after an attempt: sent, a retry at its backoff, or failed for good once
/// `attempts_before + 1` reaches the policy's maximum.
pub fn outcome(
    policy: &RetryPolicy,
    now: OffsetDateTime,
    attempts_before: u32,
    result: Result<(), String>,
) -> DeliveryOutcome {
    match result {
        Ok(()) => DeliveryOutcome::Sent,
        Err(error) => {
            let failures = attempts_before + 1;
            if failures >= policy.max_attempts {
                DeliveryOutcome::Failed { error }
            } else {
                DeliveryOutcome::Retry {
                    error,
                    at: now + backoff(policy, failures),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_core::{Condition, Severity};
    use lockstep_store::conformance::sample_alert;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-05-01 12:00 UTC);

    fn channel(name: &str, min: Severity) -> ChannelConfig {
        serde_json::from_value(serde_json::json!({
            "name": name, "type": "webhook", "url": "http://127.0.0.1:1/", "min_severity": min
        }))
        .expect("channel")
    }

    fn event(id: i64, kind: &str, severity: Severity) -> Event {
        let a = sample_alert(&format!("i{id}"), Condition::Stale, severity);
        Event {
            id,
            at: T0,
            kind: kind.into(),
            env: None,
            service: None,
            actor: None,
            reason: None,
            data: serde_json::to_value(a).expect("json"),
        }
    }

    #[test]
    fn each_channel_gets_the_changes_at_or_above_its_minimum_severity() {
        let chans = [
            channel("all", Severity::Low),
            channel("pager", Severity::High),
        ];
        let evs = [
            event(1, "alert_opened", Severity::Low),
            event(2, "alert_escalated", Severity::High),
            event(3, "alert_acknowledged", Severity::High),
            event(4, "release_registered", Severity::Critical),
            event(5, "alert_resolved", Severity::Critical),
        ];
        let got: Vec<(String, i64)> = route(&evs, &chans)
            .into_iter()
            .map(|n| (n.channel, n.event_id))
            .collect();
        let want: Vec<(String, i64)> = [
            ("all", 1),
            ("all", 2),
            ("pager", 2),
            ("all", 5),
            ("pager", 5),
        ]
        .into_iter()
        .map(|(c, e)| (c.to_string(), e))
        .collect();
        assert_eq!(got, want);
    }

    fn note(id: i64) -> Notification {
        Notification {
            id,
            channel: "c".into(),
            event_id: id,
            kind: "alert_opened".into(),
            alert: sample_alert("i", Condition::Stale, Severity::Low),
            created_at: T0,
        }
    }

    /// (last sent, now, queued, expected).
    type Case<'a> = (
        Option<OffsetDateTime>,
        OffsetDateTime,
        Vec<&'a Notification>,
        Option<Batch>,
    );

    #[test]
    fn the_rate_limit_sends_at_once_after_quiet_and_batches_within_the_window() {
        let w = Duration::from_secs(60);
        let a = note(1);
        let b = note(2);
        let cases: [Case; 5] = [
            (None, T0, vec![], None),
            (None, T0, vec![&a], Some(Batch::Send(vec![1]))),
            (None, T0, vec![&a, &b], Some(Batch::Send(vec![1, 2]))),
            (
                Some(T0),
                T0 + time::Duration::seconds(10),
                vec![&a, &b],
                Some(Batch::WaitUntil(T0 + time::Duration::seconds(60))),
            ),
            (
                Some(T0),
                T0 + time::Duration::seconds(60),
                vec![&a, &b],
                Some(Batch::Send(vec![1, 2])),
            ),
        ];
        for (i, (last, now, queued, want)) in cases.into_iter().enumerate() {
            assert_eq!(batch(now, w, last, &queued), want, "case {i}");
        }
        // A zero window never waits.
        assert_eq!(
            batch(T0, Duration::ZERO, Some(T0), &[&a]),
            Some(Batch::Send(vec![1]))
        );
    }

    #[test]
    fn retries_back_off_exponentially_then_fail_for_good() {
        let p = RetryPolicy {
            max_attempts: 4,
            base: Duration::from_secs(2),
            max: Duration::from_secs(10),
        };
        let waits: Vec<u64> = (1..=5).map(|f| backoff(&p, f).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 10, 10]);
        assert_eq!(outcome(&p, T0, 0, Ok(())), DeliveryOutcome::Sent);
        assert_eq!(
            outcome(&p, T0, 0, Err("refused".into())),
            DeliveryOutcome::Retry {
                error: "refused".into(),
                at: T0 + time::Duration::seconds(2)
            }
        );
        assert_eq!(
            outcome(&p, T0, 3, Err("refused".into())),
            DeliveryOutcome::Failed {
                error: "refused".into()
            }
        );
    }
}
