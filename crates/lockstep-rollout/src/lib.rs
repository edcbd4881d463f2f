//! Fleet rollouts: update many agents with one package — canary first, then batches under
//! a concurrency limit, stopping and rolling back (or freezing, for a release that is not
//! rollback-safe) once failures pass a threshold.
//!
//! This crate holds the rules only ([`plan`]): given a rollout's settings and the step
//! every node has reached, what happens next. The coordinator that runs them (on the
//! registry's leader, with each node's step in the store) calls [`plan::next`] after every
//! step it records, so a new leader that reads the same state back decides the same thing
//! — and never applies a node twice.

pub mod plan;

pub use plan::{Action, Decision, NodeStep, Outcome, Phase, Settings, Stop, Summary};
