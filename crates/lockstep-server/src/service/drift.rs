//! The drift detector: on the leader, for every instance that is `stale` or `missing`, how
//! long; the rules of `lockstep_core::drift` turn that into alerts to open, escalate or
//! resolve, which the store writes (fenced by the leader lease) with their events.
//!
//! It checks every `check_interval`, and at once when an expected release changes (that is
//! when instances become stale), so with thresholds of 0 an alert is written within
//! milliseconds of the release.

use lockstep_api::{Alert, AlertState};
use lockstep_core::{
    AlertAction, Condition, Instance, Observation, OpenAlert, Status, drift_secs, format_secs,
    instance_status, plan_alerts, short_id,
};
use lockstep_store::{AlertFilter, AlertWrite, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{RegistryError, RegistryService};

/// Runs the detector until shutdown; acts only while this replica leads.
pub async fn run(svc: Arc<RegistryService>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = svc.projection.subscribe_changes();
    loop {
        let interval = svc.alerts.settings().check_interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = changes.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    tokio::time::sleep(interval).await;
                }
            }
            _ = svc.alerts.detector_woken() => {}
            _ = shutdown.changed() => return,
        }
        if !svc.leadership.is_leader() {
            continue;
        }
        match check(&svc, OffsetDateTime::now_utc()).await {
            Ok(_) => {}
            Err(RegistryError::Store(StoreError::NotLeader)) => {}
            Err(e) => tracing::warn!(error = %e, "drift check failed; will retry"),
        }
    }
}

/// What the detector knows of one wrong instance.
struct Seen {
    instance: Instance,
    condition: Condition,
    drift: u64,
    expected: Option<String>,
}

fn message(s: &Seen) -> String {
    let i = &s.instance;
    let drift = format_secs(s.drift);
    match s.condition {
        Condition::Stale => format!(
            "{}/{} instance {} runs {} instead of {} ({} stale)",
            i.env,
            i.service,
            i.instance_id,
            short_id(&i.version_id),
            s.expected.as_deref().unwrap_or("-"),
            drift
        ),
        Condition::Missing => format!(
            "{}/{} instance {} (running {}) stopped heartbeating ({} missing)",
            i.env,
            i.service,
            i.instance_id,
            short_id(&i.version_id),
            drift
        ),
        // Never observed here (the rollout coordinator raises it with its own message).
        Condition::RolloutFrozen => format!("{}/{} rollout frozen", i.env, i.service),
    }
}

/// One check at `now` (tests pass their own time): observe, plan, write. Returns how many
/// alerts changed.
pub async fn check(svc: &RegistryService, now: OffsetDateTime) -> Result<usize, RegistryError> {
    let settings = svc.alerts.settings();
    let ttl = svc.config.instance_ttl;
    let ttl_secs = ttl.as_secs();
    let expected: HashMap<(String, String), _> = svc
        .projection
        .all_expected()?
        .into_iter()
        .map(|c| ((c.release.env.clone(), c.release.service.clone()), c))
        .collect();
    let mut seen: HashMap<(String, Condition), Seen> = HashMap::new();
    for inst in svc.projection.instances()? {
        let exp = expected.get(&(inst.env.clone(), inst.service.clone()));
        let missing = now - inst.last_seen > ttl;
        let status = instance_status(
            exp.map(|c| &c.release.release),
            &inst.version_id,
            &inst.components,
            missing,
        );
        let condition = match status {
            Status::Stale => Condition::Stale,
            Status::Missing => Condition::Missing,
            _ => continue,
        };
        let drift = drift_secs(
            status,
            now,
            &inst,
            exp.map(|c| c.release.registered_at),
            ttl_secs,
        );
        seen.insert(
            (inst.instance_id.clone(), condition),
            Seen {
                condition,
                drift,
                expected: exp.map(|c| short_id(&c.release.release.version_id).to_string()),
                instance: inst,
            },
        );
    }
    let open: Vec<OpenAlert> = svc
        .store
        .alerts(AlertFilter {
            state: Some(AlertState::Open),
            limit: u32::MAX,
            ..AlertFilter::default()
        })
        .await?
        .into_iter()
        .map(|a| OpenAlert {
            instance_id: a.instance_id,
            condition: a.condition,
            severity: a.severity,
        })
        .collect();
    let observed: Vec<Observation> = seen
        .values()
        .map(|s| Observation {
            instance_id: s.instance.instance_id.clone(),
            condition: s.condition,
            drift: Duration::from_secs(s.drift),
        })
        .collect();
    let actions = plan_alerts(&open, &observed, &settings.thresholds);
    let raise = |id: &str, c: Condition, sev| -> Option<AlertWrite> {
        let s = seen.get(&(id.to_string(), c))?;
        Some(AlertWrite::Raise(Box::new(Alert {
            alert_id: String::new(),
            instance_id: s.instance.instance_id.clone(),
            worker_id: s.instance.instance_id.clone(),
            env: s.instance.env.clone(),
            service: s.instance.service.clone(),
            condition: c,
            severity: sev,
            state: AlertState::Open,
            drift_secs: s.drift,
            drift_duration: format_secs(s.drift),
            current_version: short_id(&s.instance.version_id).to_string(),
            expected_version: s.expected.clone(),
            message: message(s),
            timestamp: now,
            updated_at: now,
            resolved_at: None,
            acknowledged: false,
            acknowledged_by: None,
            acknowledged_at: None,
        })))
    };
    let writes: Vec<AlertWrite> = actions
        .iter()
        .filter_map(|a| match a {
            AlertAction::Open {
                instance_id,
                condition,
                severity,
                ..
            }
            | AlertAction::Escalate {
                instance_id,
                condition,
                severity,
                ..
            } => raise(instance_id, *condition, *severity),
            AlertAction::Resolve {
                instance_id,
                condition,
            } => Some(AlertWrite::Resolve {
                instance_id: instance_id.clone(),
                condition: *condition,
                at: now,
            }),
        })
        .collect();
    let mut changed = 0;
    if !writes.is_empty() {
        let done = svc
            .store
            .apply_alerts(svc.leadership.replica(), writes)
            .await?;
        changed = done.len();
        for (a, ev) in &done {
            tracing::warn!(alert = %a.alert_id, instance = %a.instance_id, env = %a.env,
                service = %a.service, severity = %a.severity, drift = %a.drift_duration,
                kind = %ev.kind, "drift alert");
        }
        if changed > 0 {
            svc.projection.poke();
            svc.alerts.wake_delivery();
        }
    }
    svc.alerts.checked(now);
    Ok(changed)
}
