//! The requests and responses of the control API, and what kilnd tells `kiln up`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{BuildId, GcSummary, QueuedBuild};

/// `POST /api/v1/build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub package: String,
    /// One architecture; all of the package's when absent.
    #[serde(default)]
    pub arch: Option<String>,
    /// Build even when the tag is in the cache.
    #[serde(default)]
    pub force: bool,
    /// `native` or `docker` for this build; kilnd's choice for the package when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
}

/// The answer to a [`BuildRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResponse {
    /// The builds queued (or already queued) for the request.
    pub builds: Vec<QueuedBuild>,
    /// Architectures already in the cache for their tag (nothing queued for them).
    pub up_to_date: Vec<String>,
}

/// `POST /api/v1/cancel`: a build by id, the builds of a package (optionally one arch),
/// or, with nothing set, every queued and running build.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CancelRequest {
    #[serde(default)]
    pub build: Option<BuildId>,
    #[serde(default)]
    pub package: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
}

/// The answer to a [`CancelRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {
    pub cancelled: Vec<BuildId>,
}

/// The answer to `POST /api/v1/gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResponse {
    pub gc: GcSummary,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /api/v1/version`, answered whatever version the client speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub protocol: u32,
    pub daemon_version: String,
}

/// What kilnd writes to its `--ready-file` once its API and registry listen; `kiln up`
/// waits for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The registry's bound addresses.
    pub registry: Vec<String>,
    /// The control socket.
    pub socket: PathBuf,
    pub pid: u32,
}
