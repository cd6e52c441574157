//! The kilnd control protocol: the state snapshot, the events that change it, the
//! requests and responses of the control API, and the protocol version.
//!
//! Both sides fold events with the same reducer, [`Snapshot::apply`]: kilnd keeps its
//! latest-state value with it and the dashboard keeps its model with it, so the two agree
//! by construction. The JSON wire format is pinned by snapshot tests at the bottom of this
//! file; a change to it shows up in review as a changed `.snap` file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::Tag;

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
}

impl BuiltBy {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltBy::Native => "native",
            BuiltBy::Docker => "docker",
            BuiltBy::Cache => "cache",
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
}

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
                p.error = Some(error.clone());
            }
            Event::TargetPlanned { package, arch, tag } => {
                if let Some(p) = self.packages.get_mut(package) {
                    p.error = None;
                    p.tag = Some(tag.clone());
                    let t = p.targets.entry(arch.clone()).or_default();
                    if t.tag.as_ref() != Some(tag) {
                        t.tag = Some(tag.clone());
                        t.digest = None;
                        if !t.status.is_active() {
                            t.status = TargetStatus::Idle;
                        }
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
                    // A build superseded by a newer one (a later save) must not overwrite
                    // the newer one's status.
                    let current = t.build.is_none() || t.build.as_ref() == Some(&summary.id);
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
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(s: &str) -> Tag {
        s.parse().unwrap()
    }

    fn digest(c: char) -> Digest {
        Digest::from_hex(&c.to_string().repeat(64)).unwrap()
    }

    fn summary(id: &str, outcome: BuildOutcome) -> BuildSummary {
        BuildSummary {
            id: id.into(),
            tag: tag("abc123"),
            outcome,
            duration_ms: 1500,
            digest: (outcome == BuildOutcome::Ok).then(|| digest('d')),
            error: (outcome == BuildOutcome::Failed).then(|| "step 2/3: exit code 1".to_owned()),
            cache_hits: 1,
            steps: 3,
            builder: (outcome == BuildOutcome::Ok).then_some(BuiltBy::Native),
            finished_at_ms: 1_700_000_001_500,
        }
    }

    fn queued(id: &str, arch: &str) -> QueuedBuild {
        QueuedBuild {
            id: id.into(),
            package: "linuxkit/hello".into(),
            arch: arch.into(),
            tag: tag("abc123"),
            reason: "files changed".into(),
        }
    }

    fn running(id: &str, arch: &str) -> RunningBuild {
        RunningBuild {
            id: id.into(),
            package: "linuxkit/hello".into(),
            arch: arch.into(),
            tag: tag("abc123"),
            builder: "native".into(),
            started_at_ms: 1_700_000_000_000,
            progress: None,
        }
    }

    fn added() -> Event {
        Event::PackageAdded {
            package: PackageInfo {
                name: "linuxkit/hello".into(),
                dir: "/ws/hello".into(),
                tag: None,
                archs: vec!["amd64".into(), "arm64".into()],
            },
        }
    }

    /// One of every event, in an order a daemon could emit them.
    fn every_event() -> Vec<Event> {
        vec![
            added(),
            Event::TargetPlanned {
                package: "linuxkit/hello".into(),
                arch: "amd64".into(),
                tag: tag("abc123"),
            },
            Event::TargetPlanned {
                package: "linuxkit/hello".into(),
                arch: "arm64".into(),
                tag: tag("abc123"),
            },
            Event::FilesChanged {
                paths: vec!["/ws/hello/Dockerfile".into()],
                packages: vec!["linuxkit/hello".into()],
                at_ms: 1_699_999_999_000,
            },
            Event::Queued {
                build: queued("b1", "amd64"),
            },
            Event::Queued {
                build: queued("b2", "arm64"),
            },
            Event::Started {
                build: running("b1", "amd64"),
            },
            Event::Progress {
                build: "b1".into(),
                progress: Progress {
                    current: 2,
                    total: 3,
                    step: "COPY hello /".into(),
                },
            },
            Event::Finished {
                package: "linuxkit/hello".into(),
                arch: "amd64".into(),
                summary: summary("b1", BuildOutcome::Ok),
            },
            Event::Started {
                build: running("b2", "arm64"),
            },
            Event::Failed {
                package: "linuxkit/hello".into(),
                arch: "arm64".into(),
                summary: summary("b2", BuildOutcome::Failed),
            },
            Event::ServedFromCache {
                package: "linuxkit/hello".into(),
                arch: "arm64".into(),
                tag: tag("abc123"),
                digest: digest('e'),
            },
            Event::Pulled {
                pull: Pull {
                    reference: "linuxkit/hello:abc123".into(),
                    digest: digest('d'),
                    client: Some("docker/20.10".into()),
                    at_ms: 1_700_000_002_000,
                },
            },
            Event::CacheStats {
                stats: CacheStats {
                    dir: "/cache".into(),
                    bytes_used: 10 << 20,
                    bytes_cap: Some(1 << 30),
                    blobs: 12,
                    references: 4,
                    hits: 3,
                    misses: 1,
                    last_gc: None,
                },
            },
            Event::GcFinished {
                gc: GcSummary {
                    finished_at_ms: 1_700_000_003_000,
                    duration_ms: 20,
                    removed_blobs: 2,
                    freed_bytes: 4096,
                },
            },
            Event::WatchError {
                error: "inotify watch limit reached".into(),
            },
            Event::WatchRecovered,
            Event::PackageError {
                package: "linuxkit/broken".into(),
                dir: "/ws/broken".into(),
                error: "/ws/broken/build.yml:3:1: unknown field `imagee`".into(),
            },
            Event::Queued {
                build: queued("b3", "amd64"),
            },
            Event::Cancelled {
                package: "linuxkit/hello".into(),
                arch: "amd64".into(),
                summary: summary("b3", BuildOutcome::Cancelled),
            },
            Event::PackageRemoved {
                package: "linuxkit/broken".into(),
            },
        ]
    }

    fn folded() -> Snapshot {
        let mut s = Snapshot::new(
            "0.1.0",
            42,
            vec!["/ws".into()],
            vec!["127.0.0.1:5000".into()],
        );
        for e in every_event() {
            s.apply(&e);
        }
        s
    }

    #[test]
    fn wire_format_of_events() {
        insta::assert_json_snapshot!("events", every_event());
    }

    #[test]
    fn wire_format_of_snapshot() {
        insta::assert_json_snapshot!("snapshot", folded());
    }

    #[test]
    fn wire_format_of_requests_and_stream() {
        let items = serde_json::json!({
            "build_request": BuildRequest { package: "linuxkit/hello".into(), arch: Some("arm64".into()), force: true, builder: None },
            "build_response": BuildResponse { builds: vec![queued("b4", "arm64")], up_to_date: vec!["amd64".into()] },
            "cancel_request": CancelRequest { build: Some("b4".into()), ..CancelRequest::default() },
            "cancel_response": CancelResponse { cancelled: vec!["b4".into()] },
            "gc_response": GcResponse { gc: GcSummary { finished_at_ms: 1, duration_ms: 2, removed_blobs: 3, freed_bytes: 4 } },
            "error": ErrorBody { error: "no package \"x\"".into() },
            "version": VersionInfo { protocol: PROTOCOL_VERSION, daemon_version: "0.1.0".into() },
            "stream_event": StreamItem::Event { seq: 7, event: Event::WatchRecovered },
            "ready": Ready { registry: vec!["127.0.0.1:5000".into(), "[::1]:5000".into()], socket: "/run/user/1/kiln/kilnd.sock".into(), pid: 4321 },
        });
        insta::assert_json_snapshot!("requests", items);
    }

    #[test]
    fn every_event_round_trips() {
        for e in every_event() {
            let json = serde_json::to_string(&e).unwrap();
            let back: Event = serde_json::from_str(&json).unwrap();
            assert_eq!(back, e, "{json}");
        }
        let s = folded();
        let item = StreamItem::Snapshot {
            snapshot: Box::new(s.clone()),
        };
        let back: StreamItem =
            serde_json::from_str(&serde_json::to_string(&item).unwrap()).unwrap();
        assert_eq!(back, item);
    }

    #[test]
    fn build_request_defaults_optional_fields() {
        let r: BuildRequest = serde_json::from_str(r#"{"package":"a/b"}"#).unwrap();
        assert_eq!(
            r,
            BuildRequest {
                package: "a/b".into(),
                arch: None,
                force: false,
                builder: None,
            }
        );
    }

    #[test]
    fn apply_counts_every_event() {
        let s = folded();
        assert_eq!(s.seq, every_event().len() as u64);
    }

    #[test]
    fn build_lifecycle_moves_target_status() {
        let mut s = Snapshot::default();
        s.apply(&added());
        let status = |s: &Snapshot, a: &str| s.packages["linuxkit/hello"].targets[a].status;
        assert_eq!(status(&s, "amd64"), TargetStatus::Idle);
        s.apply(&Event::Queued {
            build: queued("b1", "amd64"),
        });
        assert_eq!(status(&s, "amd64"), TargetStatus::Queued);
        assert_eq!(s.queue.len(), 1);
        s.apply(&Event::Started {
            build: running("b1", "amd64"),
        });
        assert_eq!(status(&s, "amd64"), TargetStatus::Building);
        assert!(s.queue.is_empty());
        assert_eq!(s.running.len(), 1);
        s.apply(&Event::Finished {
            package: "linuxkit/hello".into(),
            arch: "amd64".into(),
            summary: summary("b1", BuildOutcome::Ok),
        });
        let t = &s.packages["linuxkit/hello"].targets["amd64"];
        assert_eq!(t.status, TargetStatus::Ok);
        assert_eq!(t.digest, Some(digest('d')));
        assert_eq!(t.build, None);
        assert!(s.running.is_empty());
        assert_eq!(status(&s, "arm64"), TargetStatus::Idle);
    }

    #[test]
    fn superseded_build_does_not_overwrite_newer_status() {
        let mut s = Snapshot::default();
        s.apply(&added());
        s.apply(&Event::Started {
            build: running("old", "amd64"),
        });
        s.apply(&Event::Queued {
            build: queued("new", "amd64"),
        });
        s.apply(&Event::Cancelled {
            package: "linuxkit/hello".into(),
            arch: "amd64".into(),
            summary: summary("old", BuildOutcome::Cancelled),
        });
        let t = &s.packages["linuxkit/hello"].targets["amd64"];
        assert_eq!(t.status, TargetStatus::Queued);
        assert_eq!(t.build, Some("new".into()));
        assert_eq!(t.last.as_ref().map(|l| l.id.clone()), Some("old".into()));
        assert!(s.running.is_empty());
        assert_eq!(s.queue.len(), 1);
    }

    #[test]
    fn new_tag_resets_a_finished_target_but_keeps_its_last_build() {
        let mut s = folded();
        s.apply(&Event::TargetPlanned {
            package: "linuxkit/hello".into(),
            arch: "arm64".into(),
            tag: tag("fff000"),
        });
        let t = &s.packages["linuxkit/hello"].targets["arm64"];
        assert_eq!(t.status, TargetStatus::Idle);
        assert_eq!(t.digest, None);
        assert!(t.last.is_some());
    }

    #[test]
    fn re_adding_a_package_keeps_targets_of_remaining_archs() {
        let mut s = folded();
        s.apply(&Event::PackageAdded {
            package: PackageInfo {
                name: "linuxkit/hello".into(),
                dir: "/ws/hello".into(),
                tag: Some(tag("abc123")),
                archs: vec!["amd64".into(), "riscv64".into()],
            },
        });
        let p = &s.packages["linuxkit/hello"];
        assert_eq!(
            p.targets.keys().collect::<Vec<_>>(),
            vec!["amd64", "riscv64"]
        );
        assert!(p.targets["amd64"].last.is_some());
        assert_eq!(p.targets["riscv64"], TargetState::default());
    }

    #[test]
    fn build_of_prefers_the_build_in_flight_then_the_latest() {
        let mut s = folded();
        assert_eq!(
            s.build_of("linuxkit/hello", Some("arm64")),
            Some("b2".into())
        );
        assert_eq!(
            s.build_of("linuxkit/hello", Some("amd64")),
            Some("b3".into())
        );
        let mut later = summary("b5", BuildOutcome::Ok);
        later.finished_at_ms += 10;
        s.apply(&Event::Finished {
            package: "linuxkit/hello".into(),
            arch: "arm64".into(),
            summary: later,
        });
        assert_eq!(s.build_of("linuxkit/hello", None), Some("b5".into()));
        s.apply(&Event::Queued {
            build: queued("b9", "amd64"),
        });
        assert_eq!(s.build_of("linuxkit/hello", None), Some("b9".into()));
        assert_eq!(s.build_of("nope", None), None);
        assert_eq!(s.build_of("linuxkit/hello", Some("s390x")), None);
    }

    #[test]
    fn hit_ratio() {
        let mut c = CacheStats::default();
        assert_eq!(c.hit_ratio(), None);
        c.hits = 3;
        c.misses = 1;
        assert_eq!(c.hit_ratio(), Some(0.75));
    }

    #[test]
    fn default_socket_prefers_the_runtime_dir() {
        assert_eq!(
            default_socket_path(Some("/run/user/1".into()), "/c".into()),
            PathBuf::from("/run/user/1/kiln/kilnd.sock")
        );
        assert_eq!(
            default_socket_path(Some("relative".into()), "/c".into()),
            PathBuf::from("/c/kilnd.sock")
        );
        assert_eq!(
            default_socket_path(None, "/c".into()),
            PathBuf::from("/c/kilnd.sock")
        );
    }
}
