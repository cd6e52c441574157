//! The kilnd control protocol: the state snapshot, the events that change it, the
//! requests and responses of the control API, and the protocol version.
//!
//! Both sides fold events with the same reducer, [`Snapshot::apply`]: kilnd keeps its
//! latest-state value with it and the dashboard keeps its model with it, so the two agree
//! by construction. The JSON wire format is pinned by snapshot tests (`tests.rs`); a
//! change to it shows up in review as a changed `.snap` file.

mod event;
mod messages;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use event::{Event, MAX_CHANGE_PATHS, StreamItem};
pub use messages::*;
pub use state::*;

/// The protocol version. Bump it on any incompatible change to the types below.
pub const PROTOCOL_VERSION: u32 = 1;

/// The HTTP header that carries [`PROTOCOL_VERSION`] on every request and response.
pub const PROTOCOL_HEADER: &str = "kiln-protocol";

/// The API path prefix.
pub const API_PREFIX: &str = "/api/v1";

/// The default socket of kilnd: `$XDG_RUNTIME_DIR/kiln/kilnd.sock`, else
/// `<cache_dir>/kilnd.sock` where `cache_dir` is kilnd's cache directory.
pub fn default_socket_path(runtime_dir: Option<PathBuf>, cache_dir: PathBuf) -> PathBuf {
    match runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join("kiln").join("kilnd.sock"),
        _ => cache_dir.join("kilnd.sock"),
    }
}

/// kilnd's default cache directory: `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`; `None`
/// when neither variable is set (the cache must then be named).
pub fn default_cache_dir() -> Option<PathBuf> {
    default_cache_dir_from(
        std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_cache_dir`] from the values of `XDG_CACHE_HOME` and `HOME` (empty is unset).
pub fn default_cache_dir_from(
    xdg_cache: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    if let Some(dir) = xdg_cache.filter(|d| !d.as_os_str().is_empty()) {
        return Some(dir.join("kiln"));
    }
    home.filter(|d| !d.as_os_str().is_empty())
        .map(|h| h.join(".cache").join("kiln"))
}

/// Now, in Unix milliseconds: the time unit of every timestamp in the protocol.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A build's id, assigned by kilnd (unique for the daemon's lifetime).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuildId(pub String);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for BuildId {
    fn from(s: &str) -> Self {
        BuildId(s.to_owned())
    }
}
