//! kiln-daemon's integration tests: one binary, a module per area.

// Tests panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod native;
