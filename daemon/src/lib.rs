//! kiln-daemon: the library behind `kilnd` (the daemon and its one-off commands, which
//! `kiln` runs for the commands that work on a cache or a workspace without a daemon).

pub mod api;
pub mod build;
pub mod bus;
pub mod cache;
pub mod config;
pub mod control;
pub mod daemon;
pub mod oci;
pub mod oneoff;
pub mod plan;
pub mod registry;
pub mod schedule;
pub mod upstream;
pub mod watch;
pub mod workspace;
