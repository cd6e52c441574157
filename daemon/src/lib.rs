//! kiln-daemon: the library behind `kilnd`, also used by `kiln` for the commands that
//! work on a cache or a workspace without a running daemon.

pub mod cache;
pub mod config;
pub mod oci;
pub mod registry;
