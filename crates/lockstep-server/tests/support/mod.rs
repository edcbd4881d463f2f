//! Helpers shared by the dashboard's browser test and its benchmark.

#[allow(dead_code, reason = "the test and the bench each use part of it")]
pub mod browser;
