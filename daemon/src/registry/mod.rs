//! The built-in OCI registry: serves the cache over the OCI Distribution API on
//! loopback (`docker pull localhost:5000/org/image:tag`), and takes pushes into it (the
//! Docker engine pushes what it builds here).
//!
//! Choices a client can notice:
//! - Names: repository `org/image` and tag `t` are the cache reference
//!   `docker.io/org/image:t`; manifests pushed by digest only are kept as
//!   `docker.io/org/image@sha256:…` (see [`view`]).
//! - Blobs are content-addressed and shared: any blob in the cache is served under any
//!   repository name (registry:2 would answer BLOB_UNKNOWN for a blob not linked to the
//!   repository). Cross-repository mounts therefore succeed whenever the blob exists.
//! - `Accept` negotiation follows registry:2 (see [`accept`]).
//! - A request whose Host is neither loopback nor configured gets 403 (see [`host`]).
//! - Uploads stream to temp files inside the cache; a blob is visible only once complete
//!   and verified; uploads are bounded and idle ones expire (see [`uploads`]).
//! - Deletes (of manifests and blobs) are refused unless enabled (`--allow-delete`), as in
//!   the distribution registry: the registry has no authentication on loopback, and any
//!   local user can reach it.
//!
//! Entry points: [`bind`] (binds now, so a busy port fails at startup), then
//! [`Registry::local_addrs`] for the ready line, then [`Registry::serve`] with the cache
//! and the optional [`Hooks`]:
//!
//! ```no_run
//! # async fn kilnd(
//! #     config: &kiln_daemon::config::Config,
//! #     cache: std::sync::Arc<kiln_daemon::cache::Cache>,
//! # ) -> Result<(), kiln_daemon::registry::RegistryError> {
//! use kiln_daemon::registry::{self, Hooks, RegistryConfig};
//!
//! let reg = registry::bind(RegistryConfig::from(config)).await?;
//! println!("registry on {:?}", reg.local_addrs());
//! let hooks = Hooks {
//!     on_pull: Some(std::sync::Arc::new(|pull| tracing::info!(?pull, "pulled"))),
//!     manifest_miss: None,
//! };
//! let (shutdown, tasks) = (
//!     tokio_util::sync::CancellationToken::new(),
//!     tokio_util::task::TaskTracker::new(),
//! );
//! tasks.spawn(reg.serve(cache, hooks, shutdown.clone()));
//! // ...
//! shutdown.cancel(); // stop accepting, finish what is in flight
//! tasks.close();
//! tasks.wait().await;
//! # Ok(())
//! # }
//! ```

pub mod accept;
pub mod body;
pub mod error;
mod handlers;
pub mod host;
pub mod manifest;
mod query;
pub mod range;
pub mod route;
mod server;
mod service;
pub mod uploads;
pub mod view;
mod wire;

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{RepoName, Tag};

pub use error::{OciError, RegistryError};
pub use server::{Registry, bind};
pub use service::Service;
pub use uploads::UploadLimits;

/// The registry's port when none is configured.
pub const DEFAULT_PORT: u16 = 5000;

/// How the registry listens and whom it answers.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Addresses to listen on (port 0: any free port). Default: 127.0.0.1:5000 and
    /// [::1]:5000. A non-loopback address is used only when listed here; its IP is then
    /// also an accepted Host.
    pub listen: Vec<SocketAddr>,
    /// Whether an address the machine does not have (`[::1]` without IPv6) is skipped
    /// with a warning instead of failing, as long as another one is bound: true for the
    /// default list and for names that resolve to several addresses (`localhost`).
    pub skip_unavailable: bool,
    /// Host names (or IP literals) besides loopback ones that requests may carry in
    /// their Host header.
    pub allowed_hosts: Vec<String>,
    /// Bounds of upload sessions.
    pub uploads: UploadLimits,
    /// Whether DELETE of manifests and blobs is served.
    pub allow_delete: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            listen: vec![
                SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, DEFAULT_PORT)),
            ],
            skip_unavailable: true,
            allowed_hosts: Vec::new(),
            uploads: UploadLimits::default(),
            allow_delete: false,
        }
    }
}

impl From<&crate::config::Config> for RegistryConfig {
    fn from(c: &crate::config::Config) -> Self {
        RegistryConfig {
            listen: c.listen.clone(),
            skip_unavailable: c.skip_unavailable,
            allowed_hosts: c.allow_hosts.clone(),
            uploads: c.uploads,
            allow_delete: c.allow_delete,
        }
    }
}

/// A boxed future, for the object-safe hook traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Asked when a client requests a tag the cache does not hold (GET or HEAD of a manifest
/// by tag), before the registry answers MANIFEST_UNKNOWN. The "build on pull" feature
/// implements it: build `repo:tag` if it is a known package's tag, then answer.
pub trait ManifestMiss: Send + Sync {
    /// `Ok(true)`: the cache now holds `docker.io/<repo>:<tag>` (the registry re-reads
    /// `index.json` and serves it). `Ok(false)`: unknown here, the client gets
    /// MANIFEST_UNKNOWN. `Err(e)`: the client gets MANIFEST_UNKNOWN saying `e` (say which
    /// build or fetch failed and where its log is).
    fn on_miss(&self, repo: RepoName, tag: Tag) -> BoxFuture<'static, Result<bool, MissError>>;
}

/// Why the [`ManifestMiss`] hook could not make a tag: any error, its sources kept
/// (a message alone converts too).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MissError(#[from] Box<dyn std::error::Error + Send + Sync>);

impl From<String> for MissError {
    fn from(message: String) -> Self {
        MissError(message.into())
    }
}

impl From<&str> for MissError {
    fn from(message: &str) -> Self {
        MissError(message.into())
    }
}

/// A manifest was served (GET, not HEAD): what the dashboard shows as the last pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullEvent {
    pub repo: RepoName,
    /// The tag or digest the client asked for.
    pub reference: kiln_shared::reference::Reference,
    /// The manifest served.
    pub digest: Digest,
    pub media_type: &'static str,
    pub peer: SocketAddr,
}

/// Optional callbacks into the rest of kilnd. Both default to none.
#[derive(Clone, Default)]
pub struct Hooks {
    pub manifest_miss: Option<Arc<dyn ManifestMiss>>,
    /// Called on every manifest GET served; must not block (send on a channel).
    pub on_pull: Option<Arc<dyn Fn(PullEvent) + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("manifest_miss", &self.manifest_miss.is_some())
            .field("on_pull", &self.on_pull.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests;
