//! kiln-daemon's integration tests: one binary, a module per concern.

// All of this binary is test code, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
