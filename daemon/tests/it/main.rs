//! kiln-daemon's integration tests: one binary, a module per concern. They use the real
//! Docker engine and registry tools of the machine and fail (never skip) without them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod docker;
