//! The planner: from file changes to builds. It keeps the workspace's packages and their
//! tags, maps a change to the packages that contain it (or list it in `extra-sources`)
//! and to the packages that follow those, and for every (package, tag, arch) decides:
//! already in the cache (served at once, a revert included) or queued for a build, in
//! dependency order. It also answers the control API and the registry's pull misses.
//!
//! It owns the workspace and the tagger; the runner reads what it planned through the
//! shared [`PackageTable`].

pub mod deps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kiln_shared::protocol::{
    BuildId, BuildRequest, BuildResponse, CancelRequest, CancelResponse, Event, GcResponse,
    GcSummary, PackageInfo, QueuedBuild, now_ms,
};
use kiln_shared::reference::{ImageRef, Tag};
use tokio::sync::oneshot;

use crate::api::{ControlError, ControlRequest};
use crate::build::dockerfile::Dockerfile;
use crate::build::native::{Capabilities, native_supports};
use crate::bus::Bus;
use crate::cache::{Cache, GcOptions, gc, set_ref_in};
use crate::schedule::{CancelFilter, Job, Outcome, Scheduler, TargetKey};
use crate::watch::WatchEvent;
use crate::workspace::{GitMeta, Package, Tagger, Workspace};

/// Which builder builds a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuilderMode {
    /// Native when the Dockerfile needs nothing it lacks, else docker.
    #[default]
    Auto,
    Native,
    Docker,
}

impl std::str::FromStr for BuilderMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BuilderMode::Auto),
            "native" => Ok(BuilderMode::Native),
            "docker" => Ok(BuilderMode::Docker),
            other => Err(format!(
                "unknown builder {other:?}: use auto, native or docker"
            )),
        }
    }
}

/// The builder of each package: a default, and per-package choices (`kiln.toml`'s
/// `[packages."org/image"] builder = ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builders {
    pub default: BuilderMode,
    pub packages: BTreeMap<String, BuilderMode>,
}

impl Builders {
    pub fn mode_for(&self, repo: &str) -> BuilderMode {
        self.packages.get(repo).copied().unwrap_or(self.default)
    }
}

/// The builder chosen for one package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderKind {
    Native,
    Docker,
}

impl BuilderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuilderKind::Native => "native",
            BuilderKind::Docker => "docker",
        }
    }
}

/// A package as planned: what the runner builds.
#[derive(Debug, Clone)]
pub struct Planned {
    pub pkg: Package,
    pub tag: Tag,
    /// The workspace packages it follows, at their current tags.
    pub deps: Vec<(String, Tag)>,
    pub builder: BuilderKind,
    /// `auto` chose the builder (see [`Job::fallback`]).
    pub auto: bool,
    /// What LinuxKit's build args and labels take from git.
    pub git: GitMeta,
    /// When its files were read for the tag (just before): a build must not land if one
    /// of them changed after this (see [`crate::watch::Touched`]).
    pub at: std::time::Instant,
}

impl Planned {
    pub fn image(&self) -> ImageRef {
        ImageRef::new(self.pkg.repo.clone(), self.tag.clone())
    }

    pub fn archs(&self) -> Vec<String> {
        self.pkg
            .arches
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect()
    }
}

/// The packages as last planned, by repository (`org/image`).
pub type PackageTable = RwLock<BTreeMap<String, Arc<Planned>>>;

/// A pull of a tag that the cache lacks: the builds to wait for. An empty list means the
/// tag is not a workspace package's current tag.
#[derive(Debug)]
pub struct PullMiss {
    pub repo: String,
    pub tag: String,
    pub reply: oneshot::Sender<Vec<oneshot::Receiver<Outcome>>>,
}

/// Settings of the planner.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub builders: Builders,
    /// The moving tag that follows the newest successful build (`dev`).
    pub dev_tag: Tag,
    /// The size cap for gc (None: only unreferenced blobs go).
    pub max_size: Option<u64>,
}

/// The planner. Driven by [`Planner::run`] or its handlers.
pub struct Planner {
    ws: Workspace,
    tagger: Tagger,
    cache: Arc<Cache>,
    bus: Bus,
    sched: Scheduler,
    table: Arc<PackageTable>,
    cfg: PlanConfig,
    /// Followed workspace packages, by package directory (recomputed when it changes).
    deps: BTreeMap<PathBuf, Result<Vec<String>, String>>,
    /// Errors already published, so that an unchanged broken package is not repeated.
    errors: BTreeMap<PathBuf, String>,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Planner({} packages)", self.ws.packages.len())
    }
}

/// The cache name of one architecture's image: `docker.io/org/image:tag-<arch>`.
pub fn arch_ref(image: &ImageRef, arch: &str) -> String {
    format!("{}-{arch}", image.cache_name())
}

impl Planner {
    pub fn new(
        roots: &[PathBuf],
        cache: Arc<Cache>,
        bus: Bus,
        sched: Scheduler,
        table: Arc<PackageTable>,
        cfg: PlanConfig,
    ) -> Planner {
        Planner {
            ws: Workspace::discover(roots),
            tagger: Tagger::new(),
            cache,
            bus,
            sched,
            table,
            cfg,
            deps: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Tags the workspace and records the plan without queueing anything (for a one-off
    /// `kiln build` without kilnd).
    pub fn load(&mut self) -> BTreeMap<PathBuf, String> {
        let (planned, errors) = plan_workspace(
            &self.ws,
            &mut self.tagger,
            &mut self.deps,
            &self.cfg.builders,
        );
        if let Ok(mut t) = self.table.write() {
            *t = planned;
        }
        errors.into_iter().map(|(d, (_, e))| (d, e)).collect()
    }

    /// Plans every package (at start, and after a rescan).
    pub async fn plan_all(&mut self, reason: &str) {
        let all: BTreeSet<PathBuf> = self.ws.packages.keys().cloned().collect();
        self.replan(&all, reason).await;
    }

    /// Handles what the watcher reports.
    pub async fn on_watch(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Changed(paths) => {
                let paths: Vec<PathBuf> = paths.into_iter().collect();
                let mut affected: BTreeSet<PathBuf> =
                    tokio::task::block_in_place(|| self.ws.reload(&paths))
                        .into_iter()
                        .collect();
                affected.extend(self.tagger.invalidate(&paths));
                // A Dockerfile or build.yml edit can change what a package follows.
                for dir in &affected {
                    self.deps.remove(dir);
                }
                let names: Vec<String> = affected
                    .iter()
                    .filter_map(|d| match self.ws.packages.get(d) {
                        Some(Ok(p)) => Some(p.repo.to_string()),
                        _ => None,
                    })
                    .collect();
                self.bus.publish(Event::FilesChanged {
                    paths: paths.iter().take(16).cloned().collect(),
                    packages: names,
                    at_ms: now_ms(),
                });
                if !affected.is_empty() {
                    self.replan(&affected, "files changed").await;
                }
            }
            WatchEvent::Rescan { reason } => {
                tracing::warn!("{reason}");
                let roots = self.ws.roots.clone();
                self.ws = Workspace::discover(&roots);
                self.tagger.invalidate(&roots);
                self.deps.clear();
                self.plan_all("rescan").await;
            }
            WatchEvent::Error { message } => {
                tracing::error!("{message}");
                self.bus.publish(Event::WatchError { error: message });
            }
        }
    }

    /// Re-tags the workspace (cheap: the tagger re-reads only what changed) and plans
    /// the packages whose tag, arches or dependencies changed, plus `affected`.
    async fn replan(&mut self, affected: &BTreeSet<PathBuf>, reason: &str) {
        let planned = tokio::task::block_in_place(|| self.compute(affected));
        let previous = self.table.read().map(|t| t.clone()).unwrap_or_default();

        for name in previous.keys() {
            if !planned.contains_key(name) {
                self.bus.publish(Event::PackageRemoved {
                    package: name.clone(),
                });
                let _ = self
                    .sched
                    .cancel(CancelFilter {
                        package: Some(name.clone()),
                        ..CancelFilter::default()
                    })
                    .await;
            }
        }
        if let Ok(mut t) = self.table.write() {
            *t = planned.clone();
        }

        let mut jobs = Vec::new();
        let index = self.cache.index().ok();
        for (name, p) in &planned {
            let unchanged = previous.get(name).is_some_and(|old| {
                old.tag == p.tag && old.pkg.arches == p.pkg.arches && old.pkg.dir == p.pkg.dir
            });
            if unchanged && !affected.contains(&p.pkg.dir) {
                continue;
            }
            self.bus.publish(Event::PackageAdded {
                package: PackageInfo {
                    name: name.clone(),
                    dir: p.pkg.dir.clone(),
                    tag: Some(p.tag.clone()),
                    archs: p.archs(),
                },
            });
            let image = p.image();
            let mut all_cached = true;
            for arch in p.archs() {
                self.bus.publish(Event::TargetPlanned {
                    package: name.clone(),
                    arch: arch.clone(),
                    tag: p.tag.clone(),
                });
                let cached = index
                    .as_ref()
                    .and_then(|i| i.get(&arch_ref(&image, &arch)).cloned());
                match cached {
                    Some(d) => self.bus.publish(Event::ServedFromCache {
                        package: name.clone(),
                        arch,
                        tag: p.tag.clone(),
                        digest: d.digest,
                    }),
                    None => {
                        all_cached = false;
                        jobs.push(self.job(p, &arch, false, reason));
                    }
                }
            }
            if all_cached {
                point_dev(&self.cache, &image, &self.cfg.dev_tag);
            }
        }
        if !jobs.is_empty() {
            let _ = self.sched.submit(jobs).await;
        }
    }

    /// The job that builds `arch` of a planned package.
    fn job(&self, p: &Planned, arch: &str, force: bool, reason: &str) -> Job {
        Job {
            key: TargetKey {
                package: p.pkg.repo.to_string(),
                arch: arch.to_owned(),
            },
            tag: p.tag.clone(),
            after: p
                .deps
                .iter()
                .map(|(repo, tag)| {
                    (
                        TargetKey {
                            package: repo.clone(),
                            arch: arch.to_owned(),
                        },
                        tag.clone(),
                    )
                })
                .collect(),
            force,
            reason: reason.to_owned(),
            builder: p.builder.as_str().to_owned(),
            fallback: p.auto && p.builder == BuilderKind::Native,
        }
    }

    /// Tags every package and reports the broken ones. Blocking: reads files.
    fn compute(&mut self, affected: &BTreeSet<PathBuf>) -> BTreeMap<String, Arc<Planned>> {
        let (planned, errors) = plan_workspace(
            &self.ws,
            &mut self.tagger,
            &mut self.deps,
            &self.cfg.builders,
        );
        for (dir, (name, error)) in &errors {
            let new = self.errors.get(dir) != Some(error);
            if new || affected.contains(dir) {
                tracing::warn!(package = %name, "{error}");
                self.bus.publish(Event::PackageError {
                    package: name.clone(),
                    dir: dir.clone(),
                    error: error.clone(),
                });
            }
        }
        self.errors = errors.into_iter().map(|(d, (_, e))| (d, e)).collect();
        planned
    }

    /// Answers a control request.
    pub async fn on_control(&mut self, req: ControlRequest) {
        match req {
            ControlRequest::Build { req, reply } => {
                let r = self.build_request(req).await.map(|(r, _)| r);
                let _ = reply.send(r);
            }
            ControlRequest::Cancel { req, reply } => {
                let _ = reply.send(self.cancel_request(req).await);
            }
            ControlRequest::Gc { reply } => {
                let cache = Arc::clone(&self.cache);
                let bus = self.bus.clone();
                let max_size = self.cfg.max_size;
                // GC holds the cache lock; run it aside so the planner keeps going.
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let r = tokio::task::spawn_blocking(move || {
                        gc(
                            &cache,
                            GcOptions {
                                max_size,
                                ..GcOptions::default()
                            },
                        )
                    })
                    .await;
                    let answer = match r {
                        Ok(Ok(report)) => {
                            let summary = GcSummary {
                                finished_at_ms: now_ms(),
                                duration_ms: u64::try_from(started.elapsed().as_millis())
                                    .unwrap_or(u64::MAX),
                                removed_blobs: report.blobs_removed,
                                freed_bytes: report.bytes_freed,
                            };
                            bus.publish(Event::GcFinished {
                                gc: summary.clone(),
                            });
                            Ok(GcResponse { gc: summary })
                        }
                        Ok(Err(e)) => Err(ControlError::Failed(e.to_string())),
                        Err(e) => Err(ControlError::Failed(format!("gc stopped: {e}"))),
                    };
                    let _ = reply.send(answer);
                });
            }
        }
    }

    fn find(&self, package: &str) -> Option<Arc<Planned>> {
        let table = self.table.read().ok()?;
        if let Some(p) = table.get(package) {
            return Some(Arc::clone(p));
        }
        // A package directory works too.
        let dir = std::fs::canonicalize(package).ok()?;
        table.values().find(|p| p.pkg.dir == dir).cloned()
    }

    /// Queues the builds of the packages `p` follows that the cache lacks for `arch`,
    /// dependencies first.
    fn missing_deps(
        &self,
        p: &Planned,
        arch: &str,
        index: &crate::cache::IndexView,
        jobs: &mut Vec<Job>,
    ) {
        for (repo, _) in &p.deps {
            let Some(d) = self.find(repo) else { continue };
            if index.get(&arch_ref(&d.image(), arch)).is_none()
                && !jobs
                    .iter()
                    .any(|j| j.key.package == *repo && j.key.arch == arch)
            {
                self.missing_deps(&d, arch, index, jobs);
                jobs.push(self.job(&d, arch, false, "dependency"));
            }
        }
    }

    /// Queues the builds a request asks for (and the missing builds of the packages it
    /// follows); returns them, with a receiver of each one's outcome.
    pub async fn build_request(
        &mut self,
        req: BuildRequest,
    ) -> Result<(BuildResponse, Vec<oneshot::Receiver<Outcome>>), ControlError> {
        let Some(p) = self.find(&req.package) else {
            let known: Vec<String> = self
                .table
                .read()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            return Err(ControlError::NotFound(format!(
                "no package {:?} in the workspace (known: {})",
                req.package,
                known.join(", ")
            )));
        };
        let archs = match &req.arch {
            Some(a) if p.archs().contains(a) => vec![a.clone()],
            Some(a) => {
                return Err(ControlError::Invalid(format!(
                    "{} does not list arch {a} (it lists {})",
                    p.pkg.repo,
                    p.archs().join(", ")
                )));
            }
            None => p.archs(),
        };
        if let Some(b) = &req.builder
            && !matches!(b.as_str(), "native" | "docker")
        {
            return Err(ControlError::Invalid(format!(
                "unknown builder {b:?}: use native or docker"
            )));
        }
        let index = self
            .cache
            .index()
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        let image = p.image();
        let mut jobs = Vec::new();
        let mut up_to_date = Vec::new();
        for arch in archs {
            if !req.force && index.get(&arch_ref(&image, &arch)).is_some() {
                up_to_date.push(arch);
            } else {
                self.missing_deps(&p, &arch, &index, &mut jobs);
                let mut job = self.job(&p, &arch, req.force, "requested");
                if let Some(b) = &req.builder {
                    job.builder = b.clone();
                    job.fallback = false;
                }
                jobs.push(job);
            }
        }
        let joined = self
            .sched
            .submit_joined(jobs.clone())
            .await
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        let (ids, waits): (Vec<String>, Vec<_>) = joined.into_iter().unzip();
        let response = BuildResponse {
            builds: jobs
                .into_iter()
                .zip(ids)
                .map(|(j, id)| QueuedBuild {
                    id: BuildId(id),
                    package: j.key.package,
                    arch: j.key.arch,
                    tag: j.tag,
                    reason: j.reason,
                })
                .collect(),
            up_to_date,
        };
        Ok((response, waits))
    }

    async fn cancel_request(&mut self, req: CancelRequest) -> Result<CancelResponse, ControlError> {
        let ids = self
            .sched
            .cancel(CancelFilter {
                build_id: req.build.map(|b| b.0),
                package: req.package,
                arch: req.arch,
            })
            .await
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        Ok(CancelResponse {
            cancelled: ids.into_iter().map(BuildId).collect(),
        })
    }

    /// A pull of `repo:tag` that the cache lacks: if it is a workspace package's current
    /// tag (or one arch of it, or the dev tag), queue what is missing and hand back the
    /// builds to wait for.
    pub async fn on_pull_miss(&mut self, miss: PullMiss) {
        let Some(p) = self.find(&miss.repo) else {
            let _ = miss.reply.send(Vec::new());
            return;
        };
        let current = p.tag.as_str();
        let archs: Vec<String> = if miss.tag == current || miss.tag == self.cfg.dev_tag.as_str() {
            p.archs()
        } else {
            p.archs()
                .into_iter()
                .filter(|a| miss.tag == format!("{current}-{a}"))
                .collect()
        };
        let index = self.cache.index().ok();
        let image = p.image();
        let jobs: Vec<Job> = archs
            .iter()
            .filter(|a| {
                index
                    .as_ref()
                    .is_none_or(|i| i.get(&arch_ref(&image, a)).is_none())
            })
            .map(|a| self.job(&p, a, false, "pulled"))
            .collect();
        let waits = if jobs.is_empty() {
            Vec::new()
        } else {
            self.sched
                .submit_joined(jobs)
                .await
                .map(|j| j.into_iter().map(|(_, rx)| rx).collect())
                .unwrap_or_default()
        };
        let _ = miss.reply.send(waits);
    }
}

/// Broken packages: directory -> (package name, what is wrong).
pub type PlanErrors = BTreeMap<PathBuf, (String, String)>;

/// Tags every package of a workspace, dependencies folded in, in dependency order, and
/// says which packages cannot be built and why. `deps` remembers what each package
/// follows (drop a directory's entry when its Dockerfile or build.yml changes).
/// Blocking: reads files (the tagger re-reads only what changed).
pub fn plan_workspace(
    ws: &Workspace,
    tagger: &mut Tagger,
    deps: &mut BTreeMap<PathBuf, Result<Vec<String>, String>>,
    builders: &Builders,
) -> (BTreeMap<String, Arc<Planned>>, PlanErrors) {
    let at = std::time::Instant::now();
    let mut errors: BTreeMap<PathBuf, (String, String)> = BTreeMap::new();
    let mut by_repo: BTreeMap<String, Package> = BTreeMap::new();
    for (dir, pkg) in &ws.packages {
        match pkg {
            Ok(p) => {
                let name = p.repo.to_string();
                if let Some(first) = by_repo.get(&name) {
                    errors.insert(
                            dir.clone(),
                            (
                                name.clone(),
                                format!(
                                    "{}: image {name} is already built from {}; give one of them another image or org",
                                    p.build_yml().display(),
                                    first.dir.display()
                                ),
                            ),
                        );
                } else {
                    by_repo.insert(name, p.clone());
                }
            }
            Err(e) => {
                let name = dir.file_name().map_or_else(
                    || dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                errors.insert(dir.clone(), (name, e.to_string()));
            }
        }
    }
    let repos: BTreeSet<String> = by_repo.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, p) in &by_repo {
        let deps = deps
            .entry(p.dir.clone())
            .or_insert_with(|| deps::followed(p, &repos))
            .clone();
        match deps {
            Ok(d) => {
                graph.insert(
                    name.clone(),
                    d.into_iter().filter(|r| repos.contains(r)).collect(),
                );
            }
            Err(e) => {
                errors.insert(p.dir.clone(), (name.clone(), e));
                graph.insert(name.clone(), Vec::new());
            }
        }
    }
    let (order, broken) = deps::order(&graph);
    for (name, why) in broken {
        if let Some(p) = by_repo.get(&name) {
            errors.insert(p.dir.clone(), (name, why));
        }
    }
    let mut planned: BTreeMap<String, Arc<Planned>> = BTreeMap::new();
    for name in order {
        let Some(p) = by_repo.get(&name) else {
            continue;
        };
        if errors.contains_key(&p.dir) {
            continue;
        }
        let own = match tagger.hash(p) {
            Ok(h) => h,
            Err(e) => {
                errors.insert(p.dir.clone(), (name.clone(), e.to_string()));
                continue;
            }
        };
        let mut dep_tags = Vec::new();
        let mut missing = None;
        for d in graph.get(&name).into_iter().flatten() {
            match planned.get(d) {
                Some(dp) => dep_tags.push((d.clone(), dp.tag.clone())),
                None => missing = Some(d.clone()),
            }
        }
        if let Some(d) = missing {
            errors.insert(
                p.dir.clone(),
                (
                    name.clone(),
                    format!("depends on {d}, which cannot be built"),
                ),
            );
            continue;
        }
        let rendered = p.spec.tag.render(&deps::fold(&own, &dep_tags));
        let tag: Tag = match rendered.parse() {
            Ok(t) => t,
            Err(e) => {
                errors.insert(
                    p.dir.clone(),
                    (name.clone(), format!("{}: {e}", p.build_yml().display())),
                );
                continue;
            }
        };
        let mode = builders.mode_for(&name);
        let builder = choose_builder(mode, p);
        let git = tagger.git_meta(p);
        planned.insert(
            name,
            Arc::new(Planned {
                pkg: p.clone(),
                tag,
                deps: dep_tags,
                builder,
                auto: mode == BuilderMode::Auto,
                git,
                at,
            }),
        );
    }
    (planned, errors)
}

fn choose_builder(mode: BuilderMode, p: &Package) -> BuilderKind {
    match mode {
        BuilderMode::Native => BuilderKind::Native,
        BuilderMode::Docker => BuilderKind::Docker,
        BuilderMode::Auto => match Dockerfile::read(&p.dockerfile) {
            Ok(df) if native_supports(&df, Capabilities::host()).is_ok() => BuilderKind::Native,
            _ => BuilderKind::Docker,
        },
    }
}

/// Points the moving tag (`dev`) of `image`'s repository at `image`'s index, when the
/// cache has it.
pub fn point_dev(cache: &Cache, image: &ImageRef, dev: &Tag) {
    let name = image.cache_name();
    let dev_name = ImageRef::new(image.repo.clone(), dev.clone()).cache_name();
    // Most calls change nothing: look at the current view first.
    if let Ok(view) = cache.index() {
        match (view.get(&name), view.get(&dev_name)) {
            (None, _) => return,
            (Some(d), Some(cur)) if d.digest == cur.digest => return,
            _ => {}
        }
    }
    // Read and write under the writer lock: two arches landing at once must not leave
    // `dev` at the index the first one read.
    let moved = cache.update_index(|index| {
        let Some(mut desc) = index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(name.as_str()))
            .cloned()
        else {
            return Ok(());
        };
        desc.annotations.clear();
        set_ref_in(index, &dev_name, desc);
        Ok(())
    });
    if let Err(e) = moved {
        tracing::warn!("cannot move {dev_name}: {e}");
    }
}

/// `kiln show-tag DIR...`: `org/image:tag` of each package as kilnd tags it, the tags of
/// the workspace packages it follows folded in (otherwise the same as
/// `linuxkit pkg show-tag`). The workspace is the package's git repository, or its parent
/// directory outside git.
pub fn show_tags(dirs: &[PathBuf]) -> Vec<Result<ImageRef, String>> {
    let mut tagger = Tagger::new();
    let mut planned_roots: BTreeMap<PathBuf, (BTreeMap<String, Arc<Planned>>, PlanErrors)> =
        BTreeMap::new();
    dirs.iter()
        .map(|dir| {
            let abs = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if !abs.join(crate::workspace::BUILD_YML).exists() {
                return Err(format!(
                    "{}: no build.yml here: give a package directory",
                    dir.display()
                ));
            }
            let root = crate::workspace::git::find_top(&abs)
                .or_else(|| abs.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_else(|| abs.clone());
            let (planned, errors) = planned_roots.entry(root.clone()).or_insert_with(|| {
                let ws = Workspace::discover(std::slice::from_ref(&root));
                plan_workspace(&ws, &mut tagger, &mut BTreeMap::new(), &Builders::default())
            });
            if let Some((_, e)) = errors.get(&abs) {
                return Err(e.clone());
            }
            planned
                .values()
                .find(|p| p.pkg.dir == abs)
                .map(|p| p.image())
                .ok_or_else(|| {
                    format!(
                        "{}: not a package of the workspace {} (is it ignored by git?)",
                        dir.display(),
                        root.display()
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &std::path::Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_follower_folds_its_base_tag_and_a_pinned_from_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "base/build.yml", "org: kiln\nimage: base\n");
        write(&ws, "base/Dockerfile", "FROM scratch\nCOPY f /f\n");
        write(&ws, "base/f", "one");
        write(&ws, "app/build.yml", "org: kiln\nimage: app\n");
        write(&ws, "app/Dockerfile", "FROM kiln/base\n");
        write(&ws, "pinned/build.yml", "org: kiln\nimage: pinned\n");
        write(&ws, "pinned/Dockerfile", "FROM kiln/base:v1\n");
        let dirs = [ws.join("base"), ws.join("app"), ws.join("pinned")];
        let tags = |dirs: &[PathBuf]| -> Vec<String> {
            show_tags(dirs)
                .into_iter()
                .map(|r| r.unwrap().tag.to_string())
                .collect()
        };
        let first = tags(&dirs);
        let own = |d: &PathBuf| crate::workspace::show_tag(d).unwrap().tag.to_string();
        assert_eq!(first[0], own(&dirs[0]));
        assert_ne!(first[1], own(&dirs[1]));
        assert_eq!(first[2], own(&dirs[2]));

        write(&ws, "base/f", "two");
        let second = tags(&dirs);
        assert_ne!(second[0], first[0]);
        assert_ne!(second[1], first[1], "the follower's tag follows its base");
        assert_eq!(second[2], first[2], "a pinned FROM stays as written");

        write(&ws, "base/f", "one");
        assert_eq!(tags(&dirs), first, "a revert gives back the earlier tags");
    }

    #[test]
    fn dev_ends_at_the_full_index_when_arches_land_at_once() {
        use crate::oci::{Descriptor, OCI_MANIFEST, Platform};
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
        let dev: Tag = "dev".parse().unwrap();
        for round in 0..50 {
            let image: ImageRef = format!("kiln/race:t{round}").parse().unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = ["amd64", "arm64"]
                .into_iter()
                .map(|arch| {
                    let (cache, image, dev, barrier) =
                        (cache.clone(), image.clone(), dev.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let body = format!("{{\"round\":{round},\"arch\":\"{arch}\"}}");
                        let d = cache.put_blob(body.as_bytes()).unwrap();
                        let m = Descriptor::new(OCI_MANIFEST, d, body.len() as u64);
                        barrier.wait();
                        cache
                            .merge_arch(&image, arch, Platform::linux(arch, None), m)
                            .unwrap();
                        point_dev(&cache, &image, &dev);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let index = cache.index().unwrap();
            let full = index.get(&image.cache_name()).unwrap().digest.clone();
            let at = index.get("docker.io/kiln/race:dev").unwrap().digest.clone();
            assert_eq!(at, full, "round {round}: dev points at a one-arch index");
        }
    }

    #[test]
    fn a_cycle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "a/build.yml", "org: kiln\nimage: a\n");
        write(&ws, "a/Dockerfile", "FROM kiln/b\n");
        write(&ws, "b/build.yml", "org: kiln\nimage: b\n");
        write(&ws, "b/Dockerfile", "FROM kiln/a\n");
        write(&ws, "c/build.yml", "org: kiln\nimage: c\n");
        write(&ws, "c/Dockerfile", "FROM scratch\n");
        let r = show_tags(&[ws.join("a"), ws.join("c")]);
        let err = r[0].as_ref().unwrap_err();
        assert!(err.contains("kiln/a -> kiln/b -> kiln/a"), "{err}");
        assert!(r[1].is_ok());
    }
}
