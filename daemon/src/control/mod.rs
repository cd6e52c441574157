//! The control layer: kilnd's event loop. It reacts to file saves (the watcher), control
//! requests (the API) and pulls of tags the cache lacks (the registry), asks the pure
//! planner what to build, publishes what happens on the bus and submits the jobs to the
//! queue, whose [`runner`] builds a target and lands it in the cache. GC and build on
//! pull start here too.
//!
//! It sits above `plan`, `schedule` and the builders, and is the only place (with `api`)
//! that uses `watch` and `bus`.

mod events;
mod fetch;
mod gc;
mod owned;
mod pull;
mod push;
mod request;
pub mod runner;
mod stats;
mod transfer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_shared::protocol::{Event, PackageInfo, Snapshot, now_ms};
use kiln_shared::reference::Tag;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::build::docker::{EngineError, Engines};
use crate::bus::Bus;
use crate::cache::{Cache, point_dev};
use crate::plan::{self, Builders, PackageProblem, Planner};
use crate::schedule::{CancelFilter, CancelReason, QueueReason, SchedEvent, Scheduler};
use crate::watch::{Touched, WatchEvent, is_git_state};
use crate::workspace::{PackageTable, Planned};

pub use events::{describe, to_event};
pub use owned::Owned;
pub use pull::PullMiss;
pub use push::{publish_upstreams, resume_pushes};
pub use request::{ControlError, ControlRequest, Reply};
pub use runner::{BuildRunner, Imports};
pub use stats::cache_stats;

/// Settings of the control layer.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub builders: Builders,
    /// The moving tag that follows the newest successful build (`dev`).
    pub dev_tag: Tag,
    /// The size cap for gc (None: only unreferenced blobs go).
    pub max_size: Option<u64>,
    /// The upstream registries, for `kiln pull` and `kiln push`.
    pub upstreams: Option<Arc<crate::upstream::Upstreams>>,
    /// What the watcher saw change, and the files open for writing: a plan whose files
    /// changed while it read them waits for that change instead of acting.
    pub touched: Arc<Touched>,
}

/// The longest a plan waits for files that keep changing while it reads them (a file
/// written without pause): after that it acts on what it read, and a build whose files
/// changed while it ran is still dropped before it lands.
const DEFER_LIMIT: Duration = Duration::from_secs(1);

/// The event loop's state: the planner, the queue, and what they share.
pub struct Controller {
    planner: Planner,
    cache: Arc<Cache>,
    bus: Bus,
    sched: Scheduler,
    table: Arc<PackageTable>,
    /// Where the tasks it spawns (gc) are tracked, for shutdown to await them.
    tasks: TaskTracker,
    cfg: ControlConfig,
    /// The packages that cannot be built, by row name (why a request for one fails).
    broken: BTreeMap<String, PackageProblem>,
    /// The rows published (planned and broken packages): a row whose package is no
    /// longer on disk (or is now named otherwise) is removed.
    rows: BTreeSet<String>,
    /// A plan not acted on because its files were being written as it read them.
    deferred: Option<Deferred>,
}

/// A plan not acted on: the package directories it was for, the names it planned anew,
/// and since when plans have waited.
#[derive(Debug)]
struct Deferred {
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<String>,
    since: std::time::Instant,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Controller({:?})", self.planner)
    }
}

/// What kilnd and a one-off build share: the bus, the plan table and the queue whose
/// runner builds into the cache.
#[derive(Debug)]
pub struct Core {
    pub bus: Bus,
    pub table: Arc<PackageTable>,
    pub sched: Scheduler,
    /// The workspace roots, canonical.
    pub roots: Vec<PathBuf>,
    /// What the watcher saw change, for builds to check before they land.
    pub touched: Arc<Touched>,
}

/// Where the queue's runner builds: the cache, the engines, kilnd's registry.
#[derive(Debug, Clone)]
pub struct QueueConfig<'a> {
    pub cache: &'a Arc<Cache>,
    pub roots: &'a [PathBuf],
    pub registry_addrs: Vec<String>,
    pub engines: &'a [String],
    /// kilnd's registry as the engine reaches it (`127.0.0.1:PORT`).
    pub push_to: Option<String>,
    pub dev_tag: Tag,
    pub jobs: usize,
    /// Registries to fetch from, pull through and push to (none for one-off builds).
    pub upstreams: Option<Arc<crate::upstream::Upstreams>>,
    /// What `kiln.toml` imports from layouts.
    pub imports: runner::Imports,
    /// Where the queue, its builds and the pushes run.
    pub owned: &'a Owned,
}

/// Starts the bus and the build queue. `on_event` sees each queue event before the bus.
pub fn start_queue(
    q: QueueConfig<'_>,
    on_event: impl Fn(&SchedEvent) + Send + 'static,
) -> Result<Core, EngineError> {
    let roots: Vec<_> = q
        .roots
        .iter()
        .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
        .collect();
    let bus = Bus::new(Snapshot::new(
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        roots.clone(),
        q.registry_addrs,
    ));
    let table = Arc::new(PackageTable::default());
    let touched = Arc::new(Touched::default());
    let runner = BuildRunner::new(
        Arc::clone(q.cache),
        bus.clone(),
        Arc::clone(&table),
        Arc::new(Engines::new(None, q.engines)?),
        q.push_to,
        q.dev_tag,
        Arc::clone(&touched),
        q.upstreams,
        q.imports,
        q.owned,
    );
    let sched_bus = bus.clone();
    let sched = Scheduler::start(
        Arc::new(runner),
        q.jobs,
        move |e| {
            on_event(&e);
            sched_bus.publish(to_event(e));
        },
        &q.owned.builds,
        q.owned.cancel_builds.clone(),
    );
    Ok(Core {
        bus,
        table,
        sched,
        roots,
        touched,
    })
}

/// What the event loop listens to.
#[derive(Debug)]
pub struct Inputs {
    pub watch: mpsc::Receiver<WatchEvent>,
    pub control: mpsc::Receiver<ControlRequest>,
    pub pulls: mpsc::Receiver<PullMiss>,
}

impl Controller {
    /// Discovers the workspace under `roots`. Blocking: reads directories.
    pub fn new(
        roots: &[PathBuf],
        cache: Arc<Cache>,
        bus: Bus,
        sched: Scheduler,
        table: Arc<PackageTable>,
        tasks: TaskTracker,
        cfg: ControlConfig,
    ) -> Controller {
        Controller {
            planner: Planner::new(roots, cfg.builders.clone()),
            cache,
            bus,
            sched,
            table,
            tasks,
            cfg,
            broken: BTreeMap::new(),
            rows: BTreeSet::new(),
            deferred: None,
        }
    }

    /// Tags the workspace and records the plan without queueing anything (for a one-off
    /// `kiln build` without kilnd). Returns the broken packages' errors by directory.
    pub fn load(&mut self) -> BTreeMap<PathBuf, String> {
        let (planned, errors) = self.planner.load();
        if let Ok(mut t) = self.table.write() {
            *t = planned;
        }
        errors
    }

    /// Reacts to saves, requests and pull misses until `stop` fires; flushes the
    /// cache's use records every 30 seconds and at the end.
    pub async fn run(mut self, mut inputs: Inputs, stop: CancellationToken) {
        let mut flush = tokio::time::interval(Duration::from_secs(30));
        loop {
            // A plan that waited on files being written is made after DEFER_LIMIT even if
            // no change comes.
            let retry = self
                .deferred
                .as_ref()
                .map(|d| tokio::time::Instant::from_std(d.since + DEFER_LIMIT));
            tokio::select! {
                Some(ev) = inputs.watch.recv() => self.on_watch(ev).await,
                () = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => {
                    self.replan(&BTreeSet::new(), QueueReason::FilesChanged, std::time::Instant::now()).await;
                }
                Some(req) = inputs.control.recv() => self.on_control(req).await,
                Some(miss) = inputs.pulls.recv() => self.on_pull_miss(miss).await,
                _ = flush.tick() => flush_usage(&self.cache).await,
                () = stop.cancelled() => break,
            }
        }
        flush_usage(&self.cache).await;
    }

    /// Plans every package (at start, and after a rescan).
    pub async fn plan_all(&mut self, reason: QueueReason) {
        let since = std::time::Instant::now();
        let all = self.planner.dirs();
        self.replan(&all, reason, since).await;
    }

    /// Handles what the watcher reports.
    pub async fn on_watch(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Changed(paths) => {
                // Before anything is read: what changes from now on makes this plan stale.
                let since = std::time::Instant::now();
                // A commit or a checkout (git's HEAD, index or refs) changes tags and no
                // package file: the plan re-reads the repository.
                let (git, paths): (Vec<PathBuf>, Vec<PathBuf>) =
                    paths.into_iter().partition(|p| is_git_state(p));
                let affected = tokio::task::block_in_place(|| self.planner.changed(&paths));
                tracing::debug!(
                    reading_us = since.elapsed().as_micros(),
                    packages = affected.len(),
                    "changed paths read"
                );
                let names = self.planner.names(&affected);
                if !paths.is_empty() {
                    self.bus.publish(Event::FilesChanged {
                        paths: paths.iter().take(16).cloned().collect(),
                        packages: names,
                        at_ms: now_ms(),
                    });
                }
                // A plan that waited for this change is made now, even if the change
                // names none of its packages' files any more.
                if !affected.is_empty() || !git.is_empty() || self.deferred.is_some() {
                    self.replan(&affected, QueueReason::FilesChanged, since)
                        .await;
                }
            }
            WatchEvent::Rescan { reason } => {
                tracing::warn!("{reason}");
                tokio::task::block_in_place(|| self.planner.rescan());
                self.plan_all(QueueReason::Rescan).await;
            }
            WatchEvent::Error { message } => {
                tracing::error!("{message}");
                self.bus.publish(Event::WatchError { error: message });
            }
        }
    }

    /// Plans the packages `affected` names and those that follow them (a rescan or
    /// kilnd's start names every package): each whose tag, arches or dependencies changed,
    /// plus `affected`, gets what the cache holds served at once and the rest queued.
    /// Only the change is published and written to the package table.
    /// `since` is when the files started to be read: a package with a file written from
    /// then on (or still open for writing) may have been read half-written, and its plan
    /// is not acted on; the change on its way plans it again.
    async fn replan(
        &mut self,
        affected: &BTreeSet<PathBuf>,
        reason: QueueReason,
        since: std::time::Instant,
    ) {
        let started = std::time::Instant::now();
        let mut affected = affected.clone();
        let mut touched = BTreeSet::new();
        if let Some(d) = &self.deferred {
            affected.extend(d.dirs.iter().cloned());
            touched.extend(d.names.iter().cloned());
        }
        let affected = &affected;
        let tagged = tokio::task::block_in_place(|| self.planner.tag(affected));
        touched.extend(tagged.touched);
        let tagging = started.elapsed();
        let index = self.cache.index().ok();
        let diff = {
            let previous = self
                .table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            plan::diff(
                &previous,
                self.planner.planned(),
                &touched,
                affected,
                index.as_deref(),
            )
        };

        // What was read, and since when (a remembered tag was read before this plan).
        let read: Vec<(Vec<&std::path::Path>, std::time::Instant)> = diff
            .packages
            .iter()
            .map(|c| {
                let dirs = std::iter::once(c.planned.pkg.dir.as_path())
                    .chain(c.planned.pkg.extra_sources.iter().map(|(s, _)| s.as_path()))
                    .collect();
                (dirs, c.planned.at.min(since))
            })
            .chain(tagged.report.iter().map(|d| (vec![d.as_path()], since)))
            .collect();
        if !read.is_empty() {
            let unsure = self.cfg.touched.unsure(&read).await;
            let busy: BTreeSet<PathBuf> = read
                .iter()
                .zip(unsure)
                .filter(|(_, unsure)| *unsure)
                .map(|((dirs, _), _)| dirs[0].to_owned())
                .collect();
            let waited = self.deferred.as_ref().map(|d| d.since.elapsed());
            if !busy.is_empty() && waited.is_none_or(|w| w < DEFER_LIMIT) {
                tracing::debug!(
                    ?busy,
                    "files changed while they were read: waiting for that change"
                );
                tokio::task::block_in_place(|| self.planner.forget(&busy));
                let first = self
                    .deferred
                    .as_ref()
                    .map_or_else(std::time::Instant::now, |d| d.since);
                self.deferred = Some(Deferred {
                    dirs: affected.clone(),
                    names: touched,
                    since: first,
                });
                return;
            }
        }
        self.deferred = None;

        // State follows the files: a row stays while its package is on disk, planned or
        // broken (under its name, with its error), and goes with it.
        let broken: BTreeMap<String, PackageProblem> = tagged
            .broken
            .values()
            .map(|p| (p.package.clone(), p.clone()))
            .collect();
        let planned = self.planner.planned();
        let gone: Vec<String> = touched
            .iter()
            .chain(self.broken.keys())
            .filter(|n| !planned.contains_key(*n) && !broken.contains_key(*n))
            .filter(|n| self.rows.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.rows.remove(&name);
            self.bus.publish(Event::PackageRemoved { package: name });
        }
        self.rows.extend(
            touched
                .iter()
                .filter(|n| planned.contains_key(*n))
                .chain(broken.keys())
                .cloned(),
        );
        self.broken = broken;
        // What is no longer planned (gone, or broken) stops building.
        for name in diff.removed {
            let _ = self
                .sched
                .cancel(CancelFilter {
                    reason: Some(CancelReason::Unplanned(name.clone())),
                    package: Some(name),
                    ..CancelFilter::default()
                })
                .await;
        }
        for p in tagged.broken.values() {
            if tagged.report.contains(&p.dir) {
                tracing::warn!(package = %p.package, "{}", p.error);
                self.bus.publish(Event::PackageError {
                    package: p.package.clone(),
                    dir: p.dir.clone(),
                    error: p.error.clone(),
                    archs: p.archs.clone(),
                });
            }
        }
        if let Ok(mut t) = self.table.write() {
            let planned = self.planner.planned();
            for name in &touched {
                match planned.get(name) {
                    Some(p) => t.insert(name.clone(), Arc::clone(p)),
                    None => t.remove(name),
                };
            }
        }
        tracing::debug!(
            tagging_us = tagging.as_micros(),
            planned_us = started.elapsed().as_micros(),
            touched = touched.len(),
            packages = diff.packages.len(),
            "planned"
        );

        let mut jobs = Vec::new();
        let mut served = Vec::new();
        for change in diff.packages {
            let p: &Planned = &change.planned;
            self.bus.publish(Event::PackageAdded {
                package: PackageInfo {
                    name: change.name.clone(),
                    dir: p.pkg.dir.clone(),
                    tag: Some(p.tag.clone()),
                    archs: p.archs(),
                },
            });
            for (arch, cached) in &change.archs {
                self.bus.publish(Event::TargetPlanned {
                    package: change.name.clone(),
                    arch: arch.clone(),
                    tag: p.tag.clone(),
                });
                match cached {
                    Some(digest) => {
                        self.bus.publish(Event::ServedFromCache {
                            package: change.name.clone(),
                            arch: arch.clone(),
                            tag: p.tag.clone(),
                            digest: digest.clone(),
                        });
                        served.push((change.name.clone(), arch.clone(), p.tag.clone()));
                    }
                    None => jobs.push(plan::job(p, arch, false, reason)),
                }
            }
            if change.all_cached() {
                let (cache, image, dev) =
                    (Arc::clone(&self.cache), p.image(), self.cfg.dev_tag.clone());
                // It waits for the commit of index.json: off the event loop's thread.
                let _ = tokio::task::spawn_blocking(move || point_dev(&cache, &image, &dev)).await;
            }
        }
        self.cancel_stale(&served).await;
        if !jobs.is_empty() {
            self.submit(jobs).await;
        }
    }

    /// A target served from the cache at its tag (a revert) needs no build of another
    /// tag: those queued or running stop, and their end is history.
    async fn cancel_stale(&mut self, served: &[(String, String, Tag)]) {
        if served.is_empty() {
            return;
        }
        let stale: Vec<(kiln_shared::protocol::BuildId, Tag)> = {
            let state = self.bus.watch();
            let s = state.borrow();
            s.running
                .iter()
                .map(|b| (&b.id, &b.package, &b.arch, &b.tag))
                .chain(s.queue.iter().map(|b| (&b.id, &b.package, &b.arch, &b.tag)))
                .filter_map(|(id, pkg, arch, tag)| {
                    let (_, _, current) = served
                        .iter()
                        .find(|(p, a, t)| p == pkg && a == arch && t != tag)?;
                    Some((id.clone(), current.clone()))
                })
                .collect()
        };
        for (id, tag) in stale {
            let _ = self
                .sched
                .cancel(CancelFilter {
                    build_id: Some(id),
                    reason: Some(CancelReason::Served(tag)),
                    ..CancelFilter::default()
                })
                .await;
        }
    }
}

/// How long references stay unchanged before the refs journal is folded into
/// `index.json`, and how long it may hold records while landings never pause.
const FOLD_QUIET: Duration = Duration::from_secs(1);
const FOLD_LAG: Duration = Duration::from_secs(10);

/// Folds the cache's refs journal into `index.json` once no reference changed for
/// [`FOLD_QUIET`] (or [`FOLD_LAG`] after the first change, while landings never pause),
/// so tools that read `index.json` (LinuxKit, skopeo) see what kilnd built about a
/// second after it: the landings themselves only append to the journal. Ends when
/// `stop` fires; kilnd folds a last time once everything else has stopped.
pub async fn fold_refs_when_quiet(cache: Arc<Cache>, stop: CancellationToken) {
    let mut commits = cache.refs_committed();
    loop {
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        let first = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(FOLD_QUIET, commits.changed()).await {
                Err(_quiet) => break,
                Ok(Err(_closed)) => return,
                Ok(Ok(())) if first.elapsed() >= FOLD_LAG => break,
                Ok(Ok(())) => {}
            }
        }
        fold_refs(&cache).await;
    }
}

/// Folds the cache's refs journal into `index.json` now.
pub async fn fold_refs(cache: &Arc<Cache>) {
    let cache = Arc::clone(cache);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cache.fold_refs()).await {
        tracing::warn!("cannot fold the refs journal into index.json: {e}");
    }
}

/// Records the cache's reference use (for LRU gc) on disk.
pub async fn flush_usage(cache: &Arc<Cache>) {
    let cache = Arc::clone(cache);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cache.flush_usage()).await {
        tracing::warn!("cannot record reference use: {e}");
    }
}
