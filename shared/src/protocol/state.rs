//! The daemon state a client sees: the snapshot and the rows it holds (packages,
//! targets, builds, the cache's figures), and the one reducer, [`Snapshot::apply`],
//! that folds an [`Event`] into it on both sides.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::Tag;

use super::{BuildId, Event, MAX_CHANGE_PATHS, PROTOCOL_VERSION};

/// Where one target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    /// Nothing planned or known yet for the current tag.
    #[default]
    Idle,
    Queued,
    Building,
    /// The current tag is in the cache (built now or earlier).
    Ok,
    Failed,
    Cancelled,
}

impl TargetStatus {
    /// True for statuses that a build in flight holds.
    pub fn is_active(self) -> bool {
        matches!(self, TargetStatus::Queued | TargetStatus::Building)
    }
}

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildOutcome {
    Ok,
    Failed,
    Cancelled,
}

/// What made a target's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltBy {
    /// kiln's own builder (RUN steps in runc).
    Native,
    /// BuildKit through the Docker engine.
    Docker,
    /// Nothing: the image was in the cache already.
    Cache,
    /// Fetched from an upstream registry (`BuildSummary::pulled_from` says which).
    Upstream,
}

impl BuiltBy {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltBy::Native => "native",
            BuiltBy::Docker => "docker",
            BuiltBy::Cache => "cache",
            BuiltBy::Upstream => "upstream",
        }
    }
}

/// The last build of a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub id: BuildId,
    pub tag: Tag,
    pub outcome: BuildOutcome,
    pub duration_ms: u64,
    /// The image (manifest) digest, on success.
    pub digest: Option<Digest>,
    /// What went wrong, on failure or cancellation.
    pub error: Option<String>,
    /// Build steps answered by the builder's cache.
    pub cache_hits: u32,
    /// Build steps in all.
    pub steps: u32,
    /// Which builder built it, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<BuiltBy>,
    /// Unix time in milliseconds.
    pub finished_at_ms: u64,
    /// Not built here: fetched from this upstream registry (`registry[/prefix]`) in
    /// `duration_ms`. (Boxed: it keeps [`Event`] small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_from: Option<Box<str>>,
}

/// An upstream registry and whether it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamInfo {
    /// `registry[/prefix]`.
    pub name: String,
    /// kiln pushes what it builds there.
    pub push: bool,
    /// `unknown` (not asked yet), `up` or `down`.
    pub state: String,
    /// Why it is down.
    pub error: Option<String>,
}

/// The last push of a package's tag to an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResult {
    pub package: String,
    pub tag: Tag,
    pub upstream: String,
    /// The references written (`registry/org/image:tag-<arch>`, `...:tag`).
    pub references: Vec<String>,
    /// Why it failed.
    pub error: Option<String>,
    pub duration_ms: u64,
    pub at_ms: u64,
    /// When a failed push is tried again (Unix time in milliseconds); none when no retry
    /// is planned (`kiln push` reports to its caller instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_try_at_ms: Option<u64>,
}

/// A build step in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 1-based.
    pub current: u32,
    pub total: u32,
    pub step: String,
}

/// One (package, tag, arch).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TargetState {
    pub status: TargetStatus,
    /// The tag this status is about.
    pub tag: Option<Tag>,
    /// The digest in the cache for `tag`, when it is there.
    pub digest: Option<Digest>,
    /// The build queued or running for it.
    pub build: Option<BuildId>,
    pub progress: Option<Progress>,
    pub last: Option<BuildSummary>,
}

impl TargetState {
    /// The build whose end is the target's state: the last build, when it was of the
    /// current tag and ended as the status says (its duration is the state's). None when
    /// the state comes from elsewhere (served from the cache, a build in flight, a package
    /// error), so that a duration shown next to a state is never another build's.
    pub fn settled_by(&self) -> Option<&BuildSummary> {
        let last = self.last.as_ref()?;
        let outcome = match self.status {
            TargetStatus::Ok => BuildOutcome::Ok,
            TargetStatus::Failed => BuildOutcome::Failed,
            TargetStatus::Cancelled => BuildOutcome::Cancelled,
            TargetStatus::Idle | TargetStatus::Queued | TargetStatus::Building => return None,
        };
        (last.outcome == outcome && self.tag.as_ref() == Some(&last.tag)).then_some(last)
    }
}

/// A package as the workspace describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageInfo {
    /// The key of the package in [`Snapshot::packages`] (its image name, `org/image`).
    pub name: String,
    /// The package directory.
    pub dir: PathBuf,
    /// Its content tag, once computed.
    pub tag: Option<Tag>,
    /// The architectures it lists, e.g. `amd64`, `arm64`.
    pub archs: Vec<String>,
}

/// A package and its targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageState {
    pub name: String,
    pub dir: PathBuf,
    pub tag: Option<Tag>,
    /// Why the package cannot be built (bad build.yml, tag failed), if it cannot.
    pub error: Option<String>,
    /// Arch to target.
    pub targets: BTreeMap<String, TargetState>,
}

/// A build waiting for a builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedBuild {
    pub id: BuildId,
    pub package: String,
    pub arch: String,
    pub tag: Tag,
    /// Why it was queued: "files changed", "requested", "pulled", "dependency" ...
    pub reason: String,
}

/// A build in a builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBuild {
    pub id: BuildId,
    pub package: String,
    pub arch: String,
    pub tag: Tag,
    /// Which builder runs it, e.g. `docker` or `native`.
    pub builder: String,
    pub started_at_ms: u64,
    pub progress: Option<Progress>,
}

/// One garbage collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSummary {
    pub finished_at_ms: u64,
    pub duration_ms: u64,
    pub removed_blobs: u64,
    pub freed_bytes: u64,
}

/// The cache's figures.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    pub bytes_used: u64,
    /// The size GC keeps the cache under, if any.
    pub bytes_cap: Option<u64>,
    pub blobs: u64,
    /// Reference names in `index.json`.
    pub references: u64,
    /// Registry and planner lookups answered from the cache since kilnd started.
    pub hits: u64,
    /// Lookups that needed a build.
    pub misses: u64,
    pub last_gc: Option<GcSummary>,
    /// Referenced blobs not in the cache but on demand from an upstream (a target fetched
    /// lazily: its configs and layers are read from there on first use), and their bytes
    /// (not in `bytes_used`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub on_demand_blobs: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub on_demand_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CacheStats {
    /// Hits over lookups, if there were lookups.
    pub fn hit_ratio(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        // Precision loss is fine for a ratio shown with a few digits.
        #[allow(clippy::cast_precision_loss)]
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

/// A pull served by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// `org/image:tag` or `org/image@sha256:...`.
    pub reference: String,
    pub digest: Digest,
    /// The client's address or user agent, when known.
    pub client: Option<String>,
    pub at_ms: u64,
}

/// The last file changes seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Up to a few changed paths.
    pub paths: Vec<PathBuf>,
    /// The packages they affect.
    pub packages: Vec<String>,
    pub at_ms: u64,
}

/// Everything the dashboard shows, as of event number `seq`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// The number of events applied; an event stream continues at `seq + 1`.
    pub seq: u64,
    pub protocol: u32,
    /// kilnd's version and pid.
    pub daemon_version: String,
    pub pid: u32,
    /// The workspace roots kilnd watches (absolute paths).
    pub roots: Vec<PathBuf>,
    /// The registry's listening addresses, e.g. `127.0.0.1:5000`.
    pub registry: Vec<String>,
    pub packages: BTreeMap<String, PackageState>,
    pub queue: Vec<QueuedBuild>,
    pub running: Vec<RunningBuild>,
    pub cache: CacheStats,
    pub last_pull: Option<Pull>,
    pub last_change: Option<Change>,
    /// The file watcher's last error, cleared when it recovers.
    pub watch_error: Option<String>,
    /// The upstream registries, in the order they are asked.
    #[serde(default)]
    pub upstreams: Vec<UpstreamInfo>,
    /// Each package's last push, by package.
    #[serde(default)]
    pub pushes: BTreeMap<String, PushResult>,
}

impl Snapshot {
    /// A fresh snapshot for a daemon.
    pub fn new(daemon_version: &str, pid: u32, roots: Vec<PathBuf>, registry: Vec<String>) -> Self {
        Snapshot {
            protocol: PROTOCOL_VERSION,
            daemon_version: daemon_version.to_owned(),
            pid,
            roots,
            registry,
            ..Snapshot::default()
        }
    }

    /// Folds one event into the snapshot and counts it in `seq`.
    pub fn apply(&mut self, event: &Event) {
        self.seq += 1;
        match event {
            Event::FilesChanged {
                paths,
                packages,
                at_ms,
            } => {
                self.last_change = Some(Change {
                    paths: paths.iter().take(MAX_CHANGE_PATHS).cloned().collect(),
                    packages: packages.clone(),
                    at_ms: *at_ms,
                });
            }
            Event::PackageAdded { package } => {
                let previous = self.packages.remove(&package.name);
                let mut targets = BTreeMap::new();
                for arch in &package.archs {
                    let kept = previous
                        .as_ref()
                        .and_then(|p| p.targets.get(arch).cloned())
                        .unwrap_or_default();
                    targets.insert(arch.clone(), kept);
                }
                self.packages.insert(
                    package.name.clone(),
                    PackageState {
                        name: package.name.clone(),
                        dir: package.dir.clone(),
                        tag: package.tag.clone(),
                        error: None,
                        targets,
                    },
                );
            }
            Event::PackageRemoved { package } => {
                self.packages.remove(package);
                self.queue.retain(|b| &b.package != package);
                self.running.retain(|b| &b.package != package);
            }
            Event::PackageError {
                package,
                dir,
                error,
                archs,
            } => {
                let p = self
                    .packages
                    .entry(package.clone())
                    .or_insert_with(|| PackageState {
                        name: package.clone(),
                        dir: dir.clone(),
                        tag: None,
                        error: None,
                        targets: BTreeMap::new(),
                    });
                p.dir.clone_from(dir);
                p.error = Some(error.clone());
                // A package that cannot be built has no current tag: nothing in the cache
                // is its image, and what it built before is history (`last`).
                p.tag = None;
                if !archs.is_empty() {
                    p.targets.retain(|a, _| archs.contains(a));
                    for a in archs {
                        p.targets.entry(a.clone()).or_default();
                    }
                }
                for t in p.targets.values_mut() {
                    *t = TargetState {
                        last: t.last.take(),
                        ..TargetState::default()
                    };
                }
            }
            Event::TargetPlanned { package, arch, tag } => {
                if let Some(p) = self.packages.get_mut(package) {
                    p.error = None;
                    p.tag = Some(tag.clone());
                    let t = p.targets.entry(arch.clone()).or_default();
                    if t.tag.as_ref() != Some(tag) {
                        // A build of another tag (a revert while it ran) is no longer the
                        // target's state: its end is history, and the new tag's state is
                        // what comes next (served from the cache, or queued).
                        *t = TargetState {
                            tag: Some(tag.clone()),
                            last: t.last.take(),
                            ..TargetState::default()
                        };
                    }
                }
            }
            Event::Queued { build } => {
                self.queue.retain(|b| b.id != build.id);
                self.queue.push(build.clone());
                if let Some(t) = self.target_mut(&build.package, &build.arch) {
                    t.status = TargetStatus::Queued;
                    t.tag = Some(build.tag.clone());
                    t.build = Some(build.id.clone());
                    t.progress = None;
                }
            }
            Event::Started { build } => {
                self.queue.retain(|b| b.id != build.id);
                self.running.retain(|b| b.id != build.id);
                self.running.push(build.clone());
                if let Some(t) = self.target_mut(&build.package, &build.arch) {
                    t.status = TargetStatus::Building;
                    t.tag = Some(build.tag.clone());
                    t.build = Some(build.id.clone());
                    t.progress = build.progress.clone();
                }
            }
            Event::Progress { build, progress } => {
                let mut target = None;
                if let Some(r) = self.running.iter_mut().find(|r| &r.id == build) {
                    r.progress = Some(progress.clone());
                    target = Some((r.package.clone(), r.arch.clone()));
                }
                if let Some((package, arch)) = target
                    && let Some(t) = self.target_mut(&package, &arch)
                    && t.build.as_ref() == Some(build)
                {
                    t.progress = Some(progress.clone());
                }
            }
            Event::Finished {
                package,
                arch,
                summary,
            }
            | Event::Failed {
                package,
                arch,
                summary,
            }
            | Event::Cancelled {
                package,
                arch,
                summary,
            } => {
                self.queue.retain(|b| b.id != summary.id);
                self.running.retain(|b| b.id != summary.id);
                if let Some(t) = self.target_mut(package, arch) {
                    // Only the target's own build sets its state: the end of a build
                    // superseded by a newer one (a later save) or of another tag (a
                    // revert served from the cache) is history, kept in `last`.
                    let current = match &t.build {
                        Some(b) => *b == summary.id,
                        None => {
                            t.tag.as_ref() == Some(&summary.tag) && t.status != TargetStatus::Ok
                        }
                    };
                    if current {
                        t.status = match summary.outcome {
                            BuildOutcome::Ok => TargetStatus::Ok,
                            BuildOutcome::Failed => TargetStatus::Failed,
                            BuildOutcome::Cancelled => TargetStatus::Cancelled,
                        };
                        t.build = None;
                        t.progress = None;
                        if summary.outcome == BuildOutcome::Ok {
                            t.tag = Some(summary.tag.clone());
                            t.digest = summary.digest.clone();
                        }
                    }
                    t.last = Some(summary.clone());
                }
            }
            Event::ServedFromCache {
                package,
                arch,
                tag,
                digest,
            } => {
                if let Some(t) = self.target_mut(package, arch)
                    && !t.status.is_active()
                {
                    t.status = TargetStatus::Ok;
                    t.tag = Some(tag.clone());
                    t.digest = Some(digest.clone());
                }
            }
            Event::Pulled { pull } => self.last_pull = Some(pull.clone()),
            Event::CacheStats { stats } => {
                let last_gc = stats.last_gc.clone().or_else(|| self.cache.last_gc.take());
                self.cache = stats.clone();
                self.cache.last_gc = last_gc;
            }
            Event::GcFinished { gc } => self.cache.last_gc = Some(gc.clone()),
            Event::WatchError { error } => self.watch_error = Some(error.clone()),
            Event::WatchRecovered => self.watch_error = None,
            Event::Upstreams { upstreams } => self.upstreams = upstreams.clone(),
            Event::Pushed { push } => {
                self.pushes.insert(push.package.clone(), (**push).clone());
            }
        }
    }

    /// When the build in flight for `t` started (Unix ms), if one is running.
    pub fn started_at(&self, t: &TargetState) -> Option<u64> {
        let id = t.build.as_ref()?;
        self.running
            .iter()
            .find(|r| &r.id == id)
            .map(|r| r.started_at_ms)
    }

    fn target_mut(&mut self, package: &str, arch: &str) -> Option<&mut TargetState> {
        self.packages.get_mut(package)?.targets.get_mut(arch)
    }

    /// The build a `kiln logs PKG --arch A` means: the one in flight, else the last.
    pub fn build_of(&self, package: &str, arch: Option<&str>) -> Option<BuildId> {
        let p = self.packages.get(package)?;
        let targets: Vec<&TargetState> = match arch {
            Some(a) => vec![p.targets.get(a)?],
            None => p.targets.values().collect(),
        };
        targets.iter().find_map(|t| t.build.clone()).or_else(|| {
            targets
                .iter()
                .filter_map(|t| t.last.as_ref())
                .max_by_key(|l| l.finished_at_ms)
                .map(|l| l.id.clone())
        })
    }
}
