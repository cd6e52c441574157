//! Why the runner produced no image: a build that failed ([`BuildError`], each cause with
//! its source), or one that no longer matches its tag ([`Superseded`]). The queue gets
//! them as a [`RunError`], shared, so the bus and every waiter see the same error.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_shared::reference::Tag;

use crate::build::docker::{DockerBuildError, EngineError};
use crate::build::dockerfile::DockerfileError;
use crate::build::native::{NativeError, ResolveError};
use crate::cache::CacheError;
use crate::schedule::RunError;
use crate::upstream::UpstreamError;
use crate::workspace::LockError;

/// What a build may do about the bases it cannot get.
pub(super) const WHAT_TO_DO: &str = "Check the network, add an upstream or mirror that has \
    it (--upstream, --mirror, [[upstream]] in kiln.toml), or import it from an OCI layout \
    ([[import]] in kiln.toml)";

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("package {0} is no longer in the workspace")]
    Gone(String),
    #[error("landing the image stopped: {0}")]
    LandingStopped(#[source] tokio::task::JoinError),
    /// Landing the image (or naming a pinned base) in the cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("the native build stopped: {0}")]
    NativeStopped(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("the native builder produced no image")]
    NoImage,
    #[error(
        "the docker builder pushes into kilnd's registry, which listens on no IPv4 loopback \
         address: add --listen 127.0.0.1:PORT"
    )]
    NoRegistry,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Docker(#[from] DockerBuildError),
    /// A docker build's failure placed in the package's Dockerfile
    /// ([`crate::build::docker::explain`]): the explanation says all the engine said and
    /// where, so the engine's error is kept beside it rather than shown again after it.
    #[error("{explanation}")]
    Explained {
        explanation: String,
        engine: DockerBuildError,
    },
    /// The Dockerfile with its bases pinned to kilnd's registry could not be written.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The native builder needs the base in the cache.
    #[error("base image {name} is not in the cache and cannot be fetched: {source}. {WHAT_TO_DO}")]
    BaseUnavailable {
        name: String,
        #[source]
        source: BaseError,
    },
}

/// Why a base pinned in `kiln.lock` cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{name} is pinned to {digest} in {lock}, which the cache lacks")]
    Missing {
        name: String,
        digest: kiln_shared::digest::Digest,
        lock: &'static str,
    },
}

/// Why the docker builder's Dockerfile could not be pinned to kilnd's registry.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Name(#[from] UpstreamError),
    #[error(transparent)]
    Platform(#[from] ResolveError),
    #[error("{image} is not in the cache yet; it must be built first")]
    NotBuilt { image: String },
    #[error(
        "{}:{line}: cannot pin {name} to kilnd's registry: write the image name literally on \
         that line",
        path.display()
    )]
    NotLiteral {
        path: PathBuf,
        line: usize,
        name: String,
    },
    #[error("cannot write the pinned Dockerfile: {0}")]
    Write(#[source] std::io::Error),
}

/// Why a build stopped without landing: what it would land no longer matches its tag.
/// The change that superseded it plans the next build.
#[derive(Debug, thiserror::Error)]
pub enum Superseded {
    #[error("{package} is now at tag {tag}")]
    NewTag { package: String, tag: Tag },
    #[error(
        "files of {package} changed while it was built at tag {tag}; the change builds it again"
    )]
    FilesChanged { package: String, tag: Tag },
    /// Bases were pinned in `kiln.lock` (`line` says which, where): the package's
    /// files, so its tag, changed.
    #[error("{line}: the package's tag changed; it builds again at the new tag")]
    Pinned { line: String },
}

impl From<BuildError> for RunError {
    fn from(e: BuildError) -> Self {
        RunError::Failed(Arc::new(e))
    }
}

impl From<Superseded> for RunError {
    fn from(e: Superseded) -> Self {
        RunError::Superseded(Arc::new(e))
    }
}
