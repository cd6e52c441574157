//! kiln-daemon's integration tests: real git repositories, real file systems.

// Tests may panic on the unexpected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod workspace;
