//! Shared harness of the CLI's integration tests (`mod support;` in each test file that
//! needs it; Cargo does not build this directory as a test of its own).

pub mod agents;
