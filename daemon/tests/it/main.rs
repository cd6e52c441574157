//! kiln-daemon's integration tests: one binary, a module per concern, against real git
//! repositories, real file systems and real processes.

// All of this binary is test code, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
mod workspace;
