//! What happened in kilnd: the events that change the snapshot, and the lines of the
//! event stream.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::Tag;

use super::{
    BuildId, BuildSummary, CacheStats, GcSummary, PackageInfo, Progress, Pull, QueuedBuild,
    RunningBuild, Snapshot,
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
    /// A package cannot be built: bad build.yml, unreadable files, tag failed.
    PackageError {
        package: String,
        dir: PathBuf,
        error: String,
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
