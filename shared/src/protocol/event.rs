//! What happened in kilnd: the events that change the snapshot, and the lines of the
//! event stream.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::Tag;

use super::{
    BuildId, BuildSummary, CacheStats, GcSummary, PackageInfo, Progress, Pull, PushResult,
    QueuedBuild, RunningBuild, Snapshot, UpstreamInfo,
};

/// What happened. Every event changes the snapshot through [`Snapshot::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Files under a root changed.
    FilesChanged {
        paths: Vec<PathBuf>,
        packages: Vec<String>,
        at_ms: u64,
    },
    /// A package appeared or its build.yml changed.
    PackageAdded {
        package: PackageInfo,
    },
    PackageRemoved {
        package: String,
    },
    /// A package cannot be built: bad build.yml or Dockerfile, unreadable files, tag
    /// failed, a broken base package. `package` is its `org/image`, the last known one
    /// when its build.yml does not say, else its directory; the row stays (with its
    /// error) until the files are fixed or gone.
    PackageError {
        package: String,
        dir: PathBuf,
        error: String,
        /// The architectures it lists, when its build.yml says (else the row keeps its
        /// own).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        archs: Vec<String>,
    },
    /// A target's tag is known (new or unchanged).
    TargetPlanned {
        package: String,
        arch: String,
        tag: Tag,
    },
    Queued {
        build: QueuedBuild,
    },
    Started {
        build: RunningBuild,
    },
    Progress {
        build: BuildId,
        progress: Progress,
    },
    Finished {
        package: String,
        arch: String,
        summary: BuildSummary,
    },
    Failed {
        package: String,
        arch: String,
        summary: BuildSummary,
    },
    Cancelled {
        package: String,
        arch: String,
        summary: BuildSummary,
    },
    /// The target's tag was already in the cache: nothing to build.
    ServedFromCache {
        package: String,
        arch: String,
        tag: Tag,
        digest: Digest,
    },
    Pulled {
        pull: Pull,
    },
    CacheStats {
        stats: CacheStats,
    },
    GcFinished {
        gc: GcSummary,
    },
    WatchError {
        error: String,
    },
    WatchRecovered,
    /// The upstreams' states changed.
    Upstreams {
        upstreams: Vec<UpstreamInfo>,
    },
    /// A push to an upstream ended (done or failed).
    Pushed {
        push: Box<PushResult>,
    },
}

/// How many changed paths [`Change`] keeps.
pub const MAX_CHANGE_PATHS: usize = 8;

/// One line of `GET /api/v1/events`: a snapshot first (and again after the client fell
/// behind), then events numbered `seq`, `seq + 1`, ...
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamItem {
    Snapshot { snapshot: Box<Snapshot> },
    Event { seq: u64, event: Event },
}
