//! Helpers shared by the dashboard's browser test and its benchmark.

pub mod browser;
