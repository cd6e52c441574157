//! kiln-shared: the types that kilnd and kiln agree on.
//!
//! Only serde and thiserror live here, so the dashboard and the daemon can share the
//! protocol, the `build.yml` spec types and the digest/reference newtypes without
//! pulling in tokio, hyper, ratatui or bollard. The `cli` feature adds the arguments of
//! the commands both binaries run ([`cli`], with clap).

#[cfg(feature = "cli")]
pub mod cli;
pub mod digest;
pub mod error;
pub mod protocol;
pub mod reference;
pub mod size;
pub mod spec;
pub mod term;
