//! kiln-daemon's integration tests: one binary, a module per concern, against real git
//! repositories, real file systems, real processes, and the machine's real Docker engine
//! and registry tools (they fail, never skip, without them).

// All of this binary is test code, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
mod docker;
mod native;
mod native_run;
mod registry;
mod upstream;
mod workspace;
