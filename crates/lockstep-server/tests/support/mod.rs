//! Helpers shared by the dashboard's tests and its benchmark.

#[allow(dead_code, reason = "the test and the bench each use part of it")]
pub mod browser;
#[allow(dead_code, reason = "each dashboard test uses part of it")]
pub mod fleet;
