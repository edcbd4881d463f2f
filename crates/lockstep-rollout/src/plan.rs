//! The rules of a rollout, as a pure function of its state: [`next`] takes the settings,
//! the phase and every node's step, and answers the phase to move to and the actions to
//! start now. No I/O and no clock: the coordinator records each node's step in the store
//! before acting on it, and asks again after every change, so a coordinator that crashes
//! and one that takes over decide alike.
//!
//! The phases: `Canary` (the first `canary` nodes, one batch), `Batches` (the rest, at most
//! `concurrency` at a time), then `Completed` — or, once a canary fails or failures exceed
//! `max_failures`, no new node is started and, when the in-flight ones have finished,
//! `RollingBack` (every node the rollout touched is told to roll back, then `RolledBack`)
//! or, for a release that is not rollback-safe, `Frozen` (nothing is rolled back; a person
//! decides). A person's [`stop`] enters `RollingBack` at once (an abort keeps the
//! concurrency; the emergency rollback is bounded only by its own `concurrency`, default
//! none), or — `Stop::Keep` — ends in `Aborted` without rolling anything back.

use serde::{Deserialize, Serialize};

/// How a rollout runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Nodes updated first, alone, before any other node is touched (0: no canary).
    pub canary: usize,
    /// At most this many nodes updated (or rolled back) at once; at least 1.
    pub concurrency: usize,
    /// The rollout stops once more nodes than this have failed.
    pub max_failures: usize,
    /// Whether the release may be rolled back automatically (false: a migration an older
    /// release cannot read ran with it, so failures freeze the rollout instead).
    pub rollback_safe: bool,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Updating the canary nodes.
    Canary,
    /// Updating the rest, batch by batch.
    Batches,
    /// Telling every node the rollout touched to roll back.
    RollingBack,
    /// Stopped after failures of a release that is not rollback-safe: nothing more
    /// happens until a person acts (abort with force, or retry).
    Frozen,
    /// Every node runs the new release (failures, if any, within the threshold).
    Completed,
    /// Every touched node was rolled back after the rollout failed.
    RolledBack,
    /// Stopped by a person and rolled back.
    Aborted,
}

impl Phase {
    /// Whether nothing more will happen without a person (retry, abort).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::RolledBack | Phase::Aborted | Phase::Frozen
        )
    }
}

/// The step a node has reached. Every transition is recorded before it is acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step", content = "reason")]
pub enum NodeStep {
    /// Not touched yet (waiting for its batch).
    Pending,
    /// Being updated (upload, apply, wait for the version and health).
    Updating,
    /// Runs the new release and passed its health check.
    Updated,
    /// The update failed (unreachable, timeout, failed health check), with the reason.
    Failed(String),
    /// Being rolled back.
    RollingBack,
    /// Back on its previous release.
    RolledBack,
    /// Rolling back failed, with the reason (a person must look at the node).
    RollbackFailed(String),
    /// Left alone: already on the release, or the rollout stopped before its turn.
    Skipped(String),
}

impl NodeStep {
    /// Whether the rollout may have changed what the node runs.
    fn touched(&self) -> bool {
        matches!(
            self,
            NodeStep::Updating | NodeStep::Updated | NodeStep::Failed(_)
        )
    }

    fn in_flight(&self) -> bool {
        matches!(self, NodeStep::Updating | NodeStep::RollingBack)
    }
}

/// What to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Update node `i` (record `Updating` first).
    Update(usize),
    /// Roll node `i` back (record `RollingBack` first).
    Rollback(usize),
    /// Make the previous release expected again (once, when rolling back starts).
    RestorePreviousRelease,
    /// Raise a critical alert: the rollout froze.
    AlertFrozen,
}

/// The answer of [`next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The phase after this decision.
    pub phase: Phase,
    /// What to start now.
    pub actions: Vec<Action>,
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Completed.
    Succeeded,
    /// Rolled back or frozen after failures.
    Failed,
    /// Aborted by a person.
    Aborted,
}

/// The numbers of the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Nodes in the rollout.
    pub total: usize,
    /// Nodes on the new release.
    pub succeeded: usize,
    /// Nodes whose update failed.
    pub failed: usize,
    /// Nodes left alone.
    pub skipped: usize,
    /// Nodes rolled back.
    pub rolled_back: usize,
}

impl Summary {
    /// Counts the nodes' steps.
    pub fn of(nodes: &[NodeStep]) -> Summary {
        let mut s = Summary {
            total: nodes.len(),
            ..Summary::default()
        };
        for n in nodes {
            match n {
                NodeStep::Updated => s.succeeded += 1,
                NodeStep::Failed(_) | NodeStep::RollbackFailed(_) => s.failed += 1,
                NodeStep::Skipped(_) | NodeStep::Pending => s.skipped += 1,
                NodeStep::RolledBack => s.rolled_back += 1,
                NodeStep::Updating | NodeStep::RollingBack => {}
            }
        }
        s
    }

    /// `Rollout completed: 8/10 successful (80.0%), 1 failed, 1 skipped in 2m3s` — the line
    /// the source system's orchestrator printed (`verb`: completed, failed, rolled back…).
    pub fn line(&self, verb: &str, elapsed: &str) -> String {
        let pct = if self.total == 0 {
            0.0
        } else {
            self.succeeded as f64 * 100.0 / self.total as f64
        };
        let mut s = format!(
            "Rollout {verb}: {}/{} successful ({pct:.1}%), {} failed, {} skipped",
            self.succeeded, self.total, self.failed, self.skipped
        );
        if self.rolled_back > 0 {
            s.push_str(&format!(", {} rolled back", self.rolled_back));
        }
        s.push_str(&format!(" in {elapsed}"));
        s
    }
}

fn failures(nodes: &[NodeStep]) -> usize {
    nodes
        .iter()
        .filter(|n| matches!(n, NodeStep::Failed(_)))
        .count()
}

/// Starts rollbacks of touched nodes, at most `limit` in flight (`None`: no bound).
fn rollback_actions(nodes: &[NodeStep], limit: Option<usize>) -> Vec<Action> {
    let mut room = limit.map(|l| l.saturating_sub(nodes.iter().filter(|n| n.in_flight()).count()));
    let mut out = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        // A node still updating finishes its step first; then it is rolled back.
        if matches!(n, NodeStep::Updated | NodeStep::Failed(_)) {
            if room == Some(0) {
                break;
            }
            out.push(Action::Rollback(i));
            room = room.map(|r| r - 1);
        }
    }
    out
}

/// Decides what happens next. `nodes` is in rollout order (canary nodes first).
///
/// Call it after every recorded step; it is idempotent: actions it returns for nodes it
/// already started (their step recorded) are not returned again.
pub fn next(settings: &Settings, phase: Phase, nodes: &[NodeStep]) -> Decision {
    let concurrency = settings.concurrency.max(1);
    let in_flight = nodes.iter().filter(|n| n.in_flight()).count();
    let failed = failures(nodes);
    let stay = |phase| Decision {
        phase,
        actions: Vec::new(),
    };
    match phase {
        Phase::Completed | Phase::RolledBack | Phase::Aborted | Phase::Frozen => stay(phase),
        Phase::Canary | Phase::Batches => {
            let canary = settings.canary.min(nodes.len());
            let canary_failed = nodes[..canary]
                .iter()
                .any(|n| matches!(n, NodeStep::Failed(_)));
            let stop = if phase == Phase::Canary {
                canary_failed
            } else {
                failed > settings.max_failures
            };
            if stop {
                if in_flight > 0 {
                    // No new node; those in flight finish their step first.
                    return stay(phase);
                }
                if !settings.rollback_safe {
                    return Decision {
                        phase: Phase::Frozen,
                        actions: vec![Action::AlertFrozen],
                    };
                }
                let mut actions = vec![Action::RestorePreviousRelease];
                actions.extend(rollback_actions(nodes, Some(concurrency)));
                return Decision {
                    phase: Phase::RollingBack,
                    actions,
                };
            }
            if phase == Phase::Canary {
                let pending: Vec<usize> = (0..canary)
                    .filter(|&i| nodes[i] == NodeStep::Pending)
                    .collect();
                let busy = nodes[..canary].iter().filter(|n| n.in_flight()).count();
                if pending.is_empty() && busy == 0 {
                    // Canary passed: straight on to the batches.
                    return next(settings, Phase::Batches, nodes);
                }
                let room = concurrency.saturating_sub(busy);
                return Decision {
                    phase,
                    actions: pending.into_iter().take(room).map(Action::Update).collect(),
                };
            }
            let pending: Vec<usize> = nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| **n == NodeStep::Pending)
                .map(|(i, _)| i)
                .collect();
            if pending.is_empty() && in_flight == 0 {
                return stay(Phase::Completed);
            }
            let room = concurrency.saturating_sub(in_flight);
            Decision {
                phase,
                actions: pending.into_iter().take(room).map(Action::Update).collect(),
            }
        }
        Phase::RollingBack => {
            let actions = rollback_actions(nodes, Some(concurrency));
            let busy = nodes
                .iter()
                .any(|n| n.in_flight() || matches!(n, NodeStep::Updated | NodeStep::Failed(_)));
            if actions.is_empty() && !busy {
                stay(Phase::RolledBack)
            } else {
                Decision { phase, actions }
            }
        }
    }
}

/// How a person stops a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `rollout abort`: roll every touched node back, at most `concurrency` at once.
    Abort,
    /// `rollback --now`: roll every touched node back at once, bounded only by
    /// `concurrency` (`None`: no bound).
    Emergency {
        /// At most this many rollbacks in flight.
        concurrency: Option<usize>,
    },
    /// `rollout abort --keep`: start no new node and roll nothing back; the nodes in
    /// flight finish their step, the updated ones stay on the new release.
    Keep,
}

/// Decides what happens next for a rollout a person stopped ([`Stop`]). No new node is
/// started; the previous release is restored once, when rolling back starts; once nothing
/// is left to roll back (or, for `Keep`, nothing is in flight) the rollout is `Aborted`.
/// Idempotent like [`next`]: call it after every recorded step.
pub fn stop(settings: &Settings, phase: Phase, nodes: &[NodeStep], how: Stop) -> Decision {
    let busy = nodes.iter().any(NodeStep::in_flight);
    let limit = match how {
        Stop::Keep => {
            return Decision {
                phase: if busy { phase } else { Phase::Aborted },
                actions: Vec::new(),
            };
        }
        Stop::Abort => Some(settings.concurrency.max(1)),
        Stop::Emergency { concurrency } => concurrency.map(|c| c.max(1)),
    };
    let mut actions = Vec::new();
    if phase != Phase::RollingBack {
        actions.push(Action::RestorePreviousRelease);
    }
    actions.extend(rollback_actions(nodes, limit));
    let phase = if phase == Phase::RollingBack && actions.is_empty() && !busy {
        Phase::Aborted
    } else {
        Phase::RollingBack
    };
    Decision { phase, actions }
}

/// The nodes a retry updates: every node not on the new release, back to `Pending`; the
/// others stay as they are (a retried rollout never touches a node twice).
pub fn retry(nodes: &[NodeStep]) -> Vec<NodeStep> {
    nodes
        .iter()
        .map(|n| match n {
            NodeStep::Updated => NodeStep::Updated,
            _ => NodeStep::Pending,
        })
        .collect()
}

/// Whether a node is touched by the rollout at all (for `status`: "waiting for its batch"
/// versus "failed").
pub fn touched(step: &NodeStep) -> bool {
    step.touched()
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeStep::*;

    fn settings(canary: usize, concurrency: usize, max_failures: usize) -> Settings {
        Settings {
            canary,
            concurrency,
            max_failures,
            rollback_safe: true,
        }
    }

    fn failed() -> NodeStep {
        Failed("health check failed".into())
    }

    /// Runs a whole rollout: every update ends with the outcome `fails(i)` says; returns
    /// the final phase, the steps, and the order in which nodes were started.
    fn simulate(
        s: &Settings,
        n: usize,
        fails: impl Fn(usize) -> bool,
    ) -> (Phase, Vec<NodeStep>, Vec<Action>) {
        let mut nodes = vec![Pending; n];
        let mut phase = Phase::Canary;
        let mut log = Vec::new();
        for _ in 0..10 * n + 10 {
            let d = next(s, phase, &nodes);
            phase = d.phase;
            if d.actions.is_empty() && phase.is_final() {
                break;
            }
            for a in &d.actions {
                log.push(a.clone());
                match a {
                    Action::Update(i) => nodes[*i] = Updating,
                    Action::Rollback(i) => nodes[*i] = RollingBack,
                    _ => {}
                }
            }
            // Every step in flight finishes before the next decision.
            for (i, node) in nodes.iter_mut().enumerate() {
                let done = match &*node {
                    Updating if fails(i) => failed(),
                    Updating => Updated,
                    RollingBack => RolledBack,
                    other => other.clone(),
                };
                *node = done;
            }
        }
        (phase, nodes, log)
    }

    #[test]
    fn a_healthy_rollout_updates_the_canary_alone_then_the_rest_in_batches() {
        let s = settings(1, 2, 0);
        let nodes = vec![Pending; 6];
        let d = next(&s, Phase::Canary, &nodes);
        assert_eq!(d.phase, Phase::Canary);
        assert_eq!(d.actions, vec![Action::Update(0)], "the canary goes alone");
        let (phase, nodes, log) = simulate(&s, 6, |_| false);
        assert_eq!(phase, Phase::Completed);
        assert!(nodes.iter().all(|n| *n == Updated));
        let updates: Vec<_> = log
            .iter()
            .filter(|a| matches!(a, Action::Update(_)))
            .collect();
        assert_eq!(updates.len(), 6, "each node updated exactly once");
    }

    #[test]
    fn a_failing_canary_stops_before_any_other_node_is_touched_and_rolls_back() {
        let s = settings(1, 3, 5);
        let (phase, nodes, log) = simulate(&s, 6, |i| i == 0);
        assert_eq!(phase, Phase::RolledBack);
        assert_eq!(nodes[0], RolledBack);
        assert!(nodes[1..].iter().all(|n| *n == Pending), "{nodes:?}");
        assert!(log.contains(&Action::RestorePreviousRelease));
        assert!(!log.contains(&Action::Update(1)));
    }

    #[test]
    fn past_max_failures_the_rollout_stops_and_rolls_back_every_updated_node() {
        let s = settings(1, 1, 1);
        // Nodes 2 and 3 fail: the second failure passes the threshold of 1.
        let (phase, nodes, _) = simulate(&s, 6, |i| i == 2 || i == 3);
        assert_eq!(phase, Phase::RolledBack);
        for (i, n) in nodes.iter().enumerate() {
            if i <= 3 {
                assert_eq!(
                    *n, RolledBack,
                    "node {i} was touched and must be rolled back"
                );
            } else {
                assert_eq!(*n, Pending, "node {i} was never touched");
            }
        }
    }

    #[test]
    fn failures_within_the_threshold_complete_the_rollout() {
        let s = settings(1, 2, 1);
        let (phase, nodes, _) = simulate(&s, 5, |i| i == 3);
        assert_eq!(phase, Phase::Completed);
        assert_eq!(Summary::of(&nodes).failed, 1);
        assert_eq!(Summary::of(&nodes).succeeded, 4);
    }

    #[test]
    fn a_release_that_is_not_rollback_safe_freezes_and_rolls_nothing_back() {
        let s = Settings {
            rollback_safe: false,
            ..settings(1, 2, 0)
        };
        let (phase, nodes, log) = simulate(&s, 4, |i| i == 1);
        assert_eq!(phase, Phase::Frozen);
        assert!(log.contains(&Action::AlertFrozen));
        assert!(
            !log.iter()
                .any(|a| matches!(a, Action::Rollback(_) | Action::RestorePreviousRelease))
        );
        assert_eq!(nodes[0], Updated, "what runs stays");
        assert_eq!(
            next(&s, Phase::Frozen, &nodes).actions,
            vec![],
            "frozen waits for a person"
        );
    }

    #[test]
    fn no_new_node_starts_while_a_stop_waits_for_the_nodes_in_flight() {
        let s = settings(0, 3, 0);
        let nodes = vec![failed(), Updating, Pending, Pending];
        let d = next(&s, Phase::Batches, &nodes);
        assert_eq!(
            d,
            Decision {
                phase: Phase::Batches,
                actions: vec![]
            }
        );
    }

    #[test]
    fn decisions_never_start_a_node_twice_or_exceed_the_concurrency() {
        let s = settings(0, 2, 0);
        let nodes = vec![Updating, Pending, Pending, Updated];
        let d = next(&s, Phase::Batches, &nodes);
        assert_eq!(d.actions, vec![Action::Update(1)], "one slot left of two");
    }

    const EMERGENCY: Stop = Stop::Emergency { concurrency: None };

    #[test]
    fn the_emergency_rollback_tells_every_touched_node_at_once() {
        let s = settings(1, 1, 0);
        let nodes = vec![Updated, Updated, Updated, Updating, Pending];
        let d = stop(&s, Phase::Batches, &nodes, EMERGENCY);
        assert_eq!(d.phase, Phase::RollingBack);
        assert_eq!(
            d.actions,
            vec![
                Action::RestorePreviousRelease,
                Action::Rollback(0),
                Action::Rollback(1),
                Action::Rollback(2)
            ]
        );
        let gentle = stop(&s, Phase::Batches, &nodes, Stop::Abort);
        assert_eq!(
            gentle.actions,
            vec![Action::RestorePreviousRelease],
            "an ordinary abort keeps the concurrency: the node in flight holds the one slot"
        );
    }

    #[test]
    fn the_emergency_rollback_is_bounded_only_by_its_own_concurrency() {
        let s = settings(1, 1, 0);
        let nodes = vec![Updated; 6];
        let two = Stop::Emergency {
            concurrency: Some(2),
        };
        let d = stop(&s, Phase::Completed, &nodes, two);
        assert_eq!(
            d.actions,
            vec![
                Action::RestorePreviousRelease,
                Action::Rollback(0),
                Action::Rollback(1)
            ]
        );
        // Two in flight: nothing more until one finishes; then one more.
        let mut nodes = nodes;
        nodes[0] = RollingBack;
        nodes[1] = RollingBack;
        assert_eq!(stop(&s, Phase::RollingBack, &nodes, two).actions, vec![]);
        nodes[0] = RolledBack;
        assert_eq!(
            stop(&s, Phase::RollingBack, &nodes, two).actions,
            vec![Action::Rollback(2)]
        );
    }

    /// Runs a stopped rollout to its end; every rollback succeeds. Answers the final phase,
    /// the steps and the most rollbacks ever in flight.
    fn run_stop(
        s: &Settings,
        mut phase: Phase,
        mut nodes: Vec<NodeStep>,
        how: Stop,
    ) -> (Phase, Vec<NodeStep>, usize) {
        let mut most = 0;
        for _ in 0..100 {
            let d = stop(s, phase, &nodes, how);
            phase = d.phase;
            for a in &d.actions {
                match a {
                    Action::Rollback(i) => nodes[*i] = RollingBack,
                    Action::Update(_) => panic!("a stopped rollout started an update"),
                    _ => {}
                }
            }
            most = most.max(nodes.iter().filter(|n| **n == RollingBack).count());
            if phase.is_final() {
                break;
            }
            // One step in flight finishes per round.
            if let Some(n) = nodes
                .iter_mut()
                .find(|n| matches!(n, RollingBack | Updating))
            {
                *n = if *n == Updating { Updated } else { RolledBack };
            }
        }
        (phase, nodes, most)
    }

    #[test]
    fn a_stopped_rollout_rolls_back_every_touched_node_then_ends_aborted() {
        let s = settings(1, 3, 0);
        let start = vec![Updated, Updated, Updating, failed(), Pending];
        for (how, bound) in [
            (Stop::Abort, 3),
            (EMERGENCY, 5),
            (
                Stop::Emergency {
                    concurrency: Some(1),
                },
                1,
            ),
        ] {
            let (phase, nodes, most) = run_stop(&s, Phase::Batches, start.clone(), how);
            assert_eq!(phase, Phase::Aborted, "{how:?}");
            assert_eq!(
                nodes,
                vec![RolledBack, RolledBack, RolledBack, RolledBack, Pending],
                "{how:?}"
            );
            assert!(most <= bound, "{how:?}: {most} rollbacks at once");
        }
    }

    #[test]
    fn abort_keep_rolls_nothing_back_and_ends_once_nothing_is_in_flight() {
        let s = settings(1, 3, 0);
        let nodes = vec![Updated, Updating, Pending];
        let d = stop(&s, Phase::Batches, &nodes, Stop::Keep);
        assert_eq!(
            d,
            Decision {
                phase: Phase::Batches,
                actions: vec![]
            },
            "the node in flight finishes first"
        );
        let (phase, nodes, most) = run_stop(&s, Phase::Batches, nodes, Stop::Keep);
        assert_eq!(phase, Phase::Aborted);
        assert_eq!(nodes, vec![Updated, Updated, Pending]);
        assert_eq!(most, 0, "nothing rolled back");
        assert_eq!(retry(&nodes), vec![Updated, Updated, Pending]);
    }

    #[test]
    fn a_retry_updates_only_the_nodes_not_on_the_new_release() {
        let nodes = vec![
            Updated,
            RolledBack,
            failed(),
            Pending,
            Skipped("stopped".into()),
        ];
        let again = retry(&nodes);
        assert_eq!(again, vec![Updated, Pending, Pending, Pending, Pending]);
        let (phase, done, log) = {
            let s = settings(0, 2, 0);
            let mut nodes = again;
            let mut phase = Phase::Batches;
            let mut log = Vec::new();
            for _ in 0..20 {
                let d = next(&s, phase, &nodes);
                phase = d.phase;
                for a in &d.actions {
                    log.push(a.clone());
                    if let Action::Update(i) = a {
                        nodes[*i] = Updated;
                    }
                }
                if phase.is_final() {
                    break;
                }
            }
            (phase, nodes, log)
        };
        assert_eq!(phase, Phase::Completed);
        assert!(done.iter().all(|n| *n == Updated));
        assert!(
            !log.contains(&Action::Update(0)),
            "node 0 was already on the release"
        );
    }

    #[test]
    fn the_summary_line_reads_like_the_source_systems() {
        let nodes = [
            vec![Updated; 8],
            vec![failed()],
            vec![Skipped("already current".into())],
        ]
        .concat();
        assert_eq!(
            Summary::of(&nodes).line("completed", "2m3s"),
            "Rollout completed: 8/10 successful (80.0%), 1 failed, 1 skipped in 2m3s"
        );
    }

    #[test]
    fn steps_serialise_with_their_reason() {
        let v = serde_json::to_value(failed()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"step": "failed", "reason": "health check failed"})
        );
        let back: NodeStep = serde_json::from_value(v).expect("back");
        assert_eq!(back, failed());
    }
}
