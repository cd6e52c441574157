//! kiln-daemon: the library behind `kilnd`, also used by `kiln` for the commands that
//! work on a cache or a workspace without a running daemon.

pub mod api;
pub mod build;
pub mod bus;
pub mod cache;
pub mod config;
pub mod control;
pub mod daemon;
pub mod oci;
pub mod plan;
pub mod registry;
pub mod schedule;
pub mod upstream;
pub mod watch;
pub mod workspace;
