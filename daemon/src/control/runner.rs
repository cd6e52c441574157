//! The build runner: what the queue calls to build one target. It picks up the package as
//! planned, runs the native or the docker builder for one architecture, lands the image in
//! the cache (the package's index gains the arch) unless a file of the package changed
//! since its tag was computed, moves the `dev` tag, and keeps the log: live on the bus
//! and, when done, in `<cache>/.kiln/logs/`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::protocol::{BuildId, BuildOutcome};
use kiln_shared::reference::{Tag, arch_ref};
use tokio_util::sync::CancellationToken;

mod bases;
mod error;
mod pin;

pub use error::{BaseError, BuildError, PinError, Superseded};

use super::push::{is_dirty, publish_upstreams};

use crate::build::docker::{
    self, DockerBuild, Engines, LinuxkitInfo, linuxkit_build_args, linuxkit_labels,
    platform_for_arch,
};
use crate::build::native::{self, NativeBuild, NativeError, WorkspaceResolver};
use crate::bus::Bus;
use crate::cache::Cache;
use crate::oci::Platform;
use crate::plan::deps::build_args;
use crate::schedule::{Built, Job, RunError, RunFuture, Runner};
use crate::upstream::Upstreams;
use crate::watch::Touched;
use crate::workspace::{BuilderKind, PackageTable, Planned};
use kiln_shared::error::Chain;

/// Builds targets for the queue.
#[derive(Clone)]
pub struct BuildRunner {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Arc<Cache>,
    bus: Bus,
    table: Arc<PackageTable>,
    engines: Arc<Engines>,
    /// kilnd's registry as the engine reaches it (`127.0.0.1:PORT`).
    registry: Option<String>,
    dev_tag: Tag,
    /// Files changed as the watcher saw them: a build whose package changed after its
    /// tag was computed does not land.
    touched: Arc<Touched>,
    /// Registries a target is fetched from before it is built, base images are pulled
    /// through, and builds are pushed to.
    upstreams: Option<Arc<Upstreams>>,
    /// The cache names `kiln.toml` imports (pinned by their layouts, never looked up).
    imported: BTreeSet<String>,
    /// Layouts that stand in for a base the upstreams cannot give: (layout, reference
    /// in it, cache name).
    fallbacks: Vec<(PathBuf, String, String)>,
    /// Where pushes run (they drain at shutdown).
    owned: super::Owned,
}

/// The images `kiln.toml` imports from OCI layouts, as the runner needs them.
#[derive(Debug, Clone, Default)]
pub struct Imports {
    /// Imported at start: their cache names.
    pub names: BTreeSet<String>,
    /// `fallback = true`: (layout, reference in it, cache name), imported on demand.
    pub fallbacks: Vec<(PathBuf, String, String)>,
}

impl std::fmt::Debug for BuildRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildRunner")
    }
}

impl BuildRunner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: Arc<Cache>,
        bus: Bus,
        table: Arc<PackageTable>,
        engines: Arc<Engines>,
        registry: Option<String>,
        dev_tag: Tag,
        touched: Arc<Touched>,
        upstreams: Option<Arc<Upstreams>>,
        imports: Imports,
        owned: &super::Owned,
    ) -> Self {
        BuildRunner {
            inner: Arc::new(Inner {
                cache,
                bus,
                table,
                engines,
                registry,
                dev_tag,
                touched,
                upstreams,
                imported: imports.names,
                fallbacks: imports.fallbacks,
                owned: owned.clone(),
            }),
        }
    }
}

impl Runner for BuildRunner {
    fn run(&self, job: Job, id: BuildId, cancel: CancellationToken) -> RunFuture {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut log = Log {
                bus: inner.bus.clone(),
                id: id.clone(),
                lines: VecDeque::new(),
            };
            let result = inner.build(&job, &mut log, cancel).await;
            if let Err(e) = &result {
                // The live log gets this line from the bus when the build's end is
                // published; the kept copy gets the same line here.
                let outcome = match e {
                    RunError::Failed(_) => BuildOutcome::Failed,
                    RunError::Superseded(_) => BuildOutcome::Cancelled,
                };
                if let Some(line) = crate::bus::end_line(outcome, Some(&Chain(e).to_string())) {
                    log.keep(line);
                }
            }
            inner.save_log(&job, &log.lines);
            result
        })
    }
}

/// A build's log: live on the bus, kept (bounded) for the cache directory.
struct Log {
    bus: Bus,
    id: BuildId,
    lines: VecDeque<String>,
}

/// Lines kept for the log file in the cache.
const LOG_FILE_LINES: usize = 10_000;

impl Log {
    fn line(&mut self, text: &str) {
        self.bus.log_line(&self.id, text);
        self.keep(text.to_owned());
    }

    /// Adds a line to the kept copy only.
    fn keep(&mut self, text: String) {
        if self.lines.len() == LOG_FILE_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(text);
    }
}

impl Inner {
    async fn build(
        &self,
        job: &Job,
        log: &mut Log,
        cancel: CancellationToken,
    ) -> Result<Built, RunError> {
        let planned = self
            .table
            .read()
            .ok()
            .and_then(|t| t.get(&job.key.package).cloned())
            .ok_or_else(|| BuildError::Gone(job.key.package.clone()))?;
        if planned.tag != job.tag {
            return Err(Superseded::NewTag {
                package: job.key.package.clone(),
                tag: planned.tag.clone(),
            }
            .into());
        }
        let image = planned.image();
        let arch = job.key.arch.clone();
        if !job.force
            && let Some(d) = self
                .cache
                .index()
                .ok()
                .and_then(|i| i.get(&arch_ref(&image, &arch)).cloned())
        {
            log.line(&format!("{image} ({arch}) is already in the cache"));
            return Ok(Built {
                manifest: d,
                cache_hits: 0,
                steps: 0,
                pulled_from: None,
                builder: kiln_shared::protocol::BuiltBy::Cache,
            });
        }
        if !job.force
            && job.look_up
            && let Some(built) = self.fetch(&planned, &arch, log).await?
        {
            return Ok(built);
        }
        // The job names its builder: the package's, or the one a request asked for.
        let builder = job.builder;
        let pins = self.pin_bases_in_lock(&planned, builder, log).await?;
        // What auto chose, and why (a request may have named the builder instead).
        let why = if planned.auto && builder == planned.builder {
            format!(" (auto: {})", native::auto_reason(&planned.pkg.dockerfile))
        } else {
            String::new()
        };
        log.line(&format!(
            "building {image} for linux/{arch} with the {} builder{why}",
            builder.as_str()
        ));
        let (image_out, engine_tag) = match builder {
            BuilderKind::Native => match self
                .native(&planned, &arch, &pins, log, cancel.clone())
                .await
            {
                Ok(out) => (out, None),
                Err(BuildError::Native(NativeError::Refused(why))) if job.fallback => {
                    log.line(&format!("{why}; building with the docker builder instead"));
                    let (out, tag) = self.docker(&planned, &arch, &pins, log, cancel).await?;
                    (out, Some(tag))
                }
                Err(e) => return Err(e.into()),
            },
            BuilderKind::Docker => {
                let (out, tag) = self.docker(&planned, &arch, &pins, log, cancel).await?;
                (out, Some(tag))
            }
        };
        // The image is what the tag names only if no file of the package changed since
        // its files were read for the tag (the builder may have read the newer file), and
        // none is still being written (the tag and the build may both have read it half
        // written, before its writer wrote the rest).
        let dirs: Vec<&std::path::Path> = std::iter::once(planned.pkg.dir.as_path())
            .chain(planned.pkg.extra_sources.iter().map(|(s, _)| s.as_path()))
            .collect();
        if self.touched.unsure(&[(dirs, planned.at)]).await[0] {
            return Err(Superseded::FilesChanged {
                package: job.key.package.clone(),
                tag: job.tag.clone(),
            }
            .into());
        }
        let Landing { built, platform } = image_out;
        self.land(job, &image, &arch, platform, built.manifest.clone())
            .await?;
        self.push_later(&planned);
        // The image is served now; the engine's copy goes before the build counts as
        // finished, so nothing is left in the engine once it is.
        if let Some(tag) = engine_tag {
            let reference = tag.reference().to_owned();
            if let Err(e) = tag.remove().await {
                log.line(&format!(
                    "warning: cannot remove {reference} from the engine: {}",
                    Chain(&e)
                ));
            }
        }
        log.line(&format!("{image} ({arch}): {}", built.manifest.digest));
        Ok(built)
    }

    /// Names the image in the cache (the package's index gains the arch) and moves
    /// `dev` to it in the same commit, unless a newer tag was planned meanwhile.
    async fn land(
        &self,
        job: &Job,
        image: &kiln_shared::reference::ImageRef,
        arch: &str,
        platform: Platform,
        manifest: crate::oci::Descriptor,
    ) -> Result<(), BuildError> {
        let current = self
            .table
            .read()
            .ok()
            .and_then(|t| t.get(&job.key.package).map(|p| p.tag == job.tag))
            .unwrap_or(false);
        let cache = Arc::clone(&self.cache);
        let (landed_image, suffix) = (image.clone(), arch.to_owned());
        let dev = current.then(|| self.dev_tag.clone());
        tokio::task::spawn_blocking(move || {
            cache.merge_arch(&landed_image, &suffix, platform, manifest, dev.as_ref())
        })
        .await
        .map_err(BuildError::LandingStopped)??;
        Ok(())
    }

    /// Asks the upstreams for the target before building it (a job the planner's fetch
    /// did not ask for: build on pull, `kiln build`): the package's tag is fetched whole
    /// and lands with every arch the upstream has. A dirty tag names a local state and is
    /// never looked up. An upstream that fails is logged and the target is built here.
    async fn fetch(
        &self,
        p: &Planned,
        arch: &str,
        log: &mut Log,
    ) -> Result<Option<Built>, BuildError> {
        let Some(upstreams) = self.upstreams.as_ref().filter(|u| u.has_target_sources()) else {
            return Ok(None);
        };
        if is_dirty(&p.tag) {
            return Ok(None);
        }
        let image = p.image();
        let wanted: Vec<_> = p
            .archs()
            .into_iter()
            .map(|a| {
                let platform = platform_for_arch(&a);
                (a, platform)
            })
            .collect();
        let found = upstreams
            .fetch_package(&self.cache, &image, &wanted, true)
            .await;
        self.publish_upstreams();
        let fetched = match found {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => {
                log.line(&format!("warning: {}; building it here", Chain(&e)));
                return Ok(None);
            }
        };
        let Some((_, desc)) = fetched.archs.iter().find(|(a, _)| a == arch).cloned() else {
            return Ok(None);
        };
        let current = self
            .table
            .read()
            .ok()
            .and_then(|t| t.get(p.pkg.repo.as_str()).map(|c| c.tag == p.tag))
            .unwrap_or(false);
        let cache = Arc::clone(&self.cache);
        let dev = current.then(|| self.dev_tag.clone());
        let landed = (image.clone(), fetched.clone());
        tokio::task::spawn_blocking(move || {
            super::fetch::land_all(&cache, &[(&landed.0, &landed.1, dev.as_ref())])
        })
        .await
        .map_err(BuildError::LandingStopped)??;
        log.line(&format!(
            "{image} ({arch}): pulled from {} in {} ms ({} bytes new): {}",
            fetched.upstream,
            fetched.elapsed.as_millis(),
            fetched.bytes,
            desc.digest
        ));
        Ok(Some(Built {
            manifest: desc,
            cache_hits: 0,
            steps: 0,
            pulled_from: Some(fetched.upstream.into_boxed_str()),
            builder: kiln_shared::protocol::BuiltBy::Upstream,
        }))
    }

    /// With `push`, sends the package's tag to the upstreams once every arch of it is in
    /// the cache, in the background ([`super::push`]).
    fn push_later(&self, p: &Planned) {
        let Some(upstreams) = self.upstreams.clone().filter(|u| u.pushes()) else {
            return;
        };
        let image = p.image();
        let Ok(index) = self.cache.index() else {
            return;
        };
        if !p
            .archs()
            .iter()
            .all(|a| index.get(&arch_ref(&image, a)).is_some())
        {
            return; // the last arch to land pushes them all
        }
        super::push::push_in_background(
            &self.owned,
            upstreams,
            Arc::clone(&self.cache),
            self.bus.clone(),
            Arc::clone(&self.table),
            p,
        );
    }

    fn publish_upstreams(&self) {
        if let Some(u) = &self.upstreams {
            publish_upstreams(u, &self.bus);
        }
    }

    async fn native(
        &self,
        p: &Planned,
        arch: &str,
        pins: &BTreeMap<String, Digest>,
        log: &mut Log,
        cancel: CancellationToken,
    ) -> Result<Landing, BuildError> {
        self.fetch_bases_on_demand(p, arch, log).await?;
        let input = NativeBuild {
            context: p.pkg.dir.clone(),
            dockerfile: p.pkg.dockerfile.clone(),
            extra_sources: p.pkg.extra_sources.clone(),
            image: p.image(),
            arches: vec![(arch.to_owned(), None)],
            build_args: linuxkit_build_args(&linuxkit_info(p), &build_args(&p.pkg)),
            labels: linuxkit_labels(&linuxkit_info(p)),
            source_date_epoch: source_date_epoch(),
            target: None,
            network: p.pkg.spec.network,
            no_cache: p.pkg.spec.disable_cache,
            cancel,
        };
        let resolver = WorkspaceResolver {
            packages: p
                .deps
                .iter()
                .filter_map(|(repo, tag)| {
                    Some((
                        repo.clone(),
                        kiln_shared::reference::ImageRef::new(repo.parse().ok()?, tag.clone()),
                    ))
                })
                .collect(),
            pinned: pins.clone(),
        };
        let cache = Arc::clone(&self.cache);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::task::spawn_blocking(move || {
            let mut sink = |line: String| {
                let _ = tx.send(line);
            };
            native::build_images(&cache, &input, &resolver, &mut sink)
        });
        while let Some(line) = rx.recv().await {
            log.line(&line);
        }
        let out = task.await.map_err(BuildError::NativeStopped)??;
        let (steps, cache_hits) = (out.steps, out.cache_hits);
        let (_, platform, manifest) = out.images.into_iter().next().ok_or(BuildError::NoImage)?;
        Ok(Landing {
            built: Built {
                manifest,
                cache_hits,
                steps,
                pulled_from: None,
                builder: kiln_shared::protocol::BuiltBy::Native,
            },
            platform,
        })
    }

    async fn docker(
        &self,
        p: &Planned,
        arch: &str,
        pins: &BTreeMap<String, Digest>,
        log: &mut Log,
        cancel: CancellationToken,
    ) -> Result<(Landing, docker::EngineTag), BuildError> {
        let registry = self.registry.clone().ok_or(BuildError::NoRegistry)?;
        let platform = platform_for_arch(arch);
        let engine = self.engines.engine_for(&format!("linux/{arch}"))?;
        let info = linuxkit_info(p);
        let args = linuxkit_build_args(&info, &build_args(&p.pkg));
        let dockerfile = self.pin_bases(p, &platform, &args, &registry, pins)?;
        let build = DockerBuild {
            context_dir: p.pkg.dir.clone(),
            dockerfile: dockerfile
                .as_ref()
                .map_or_else(|| p.pkg.dockerfile.clone(), |t| t.path().to_owned()),
            extra_sources: p.pkg.extra_sources.clone(),
            image: p.image(),
            arch: arch.to_owned(),
            build_args: args,
            labels: linuxkit_labels(&info),
            network: p.pkg.spec.network,
            no_cache: p.pkg.spec.disable_cache,
        };
        // Lines go out as the engine reports them, so a client following the log sees
        // the build as it runs. Step lines (a step starting, CACHED, DONE, ERROR) name
        // their step already; output lines get it as a prefix.
        let mut sink = |l: docker::LogLine| match &l.step {
            Some(step) if l.source != docker::LogSource::Step && l.text != *step => {
                log.line(&format!("{step}: {}", l.text));
            }
            _ => log.line(&l.text),
        };
        let result = docker::build_arch(&engine, &build, &registry, &mut sink, cancel).await;
        let (outcome, engine_tag) = result.map_err(|e| {
            match docker::explain(&e, &p.pkg.dockerfile, p.pkg.spec.network) {
                Some(explanation) => BuildError::Explained {
                    explanation,
                    engine: e,
                },
                None => BuildError::Docker(e),
            }
        })?;
        let landing = Landing {
            built: Built {
                manifest: outcome.manifest,
                cache_hits: u32::try_from(outcome.cache_hits).unwrap_or(u32::MAX),
                steps: u32::try_from(outcome.cache_hits + outcome.steps_run).unwrap_or(u32::MAX),
                pulled_from: None,
                builder: kiln_shared::protocol::BuiltBy::Docker,
            },
            platform,
        };
        Ok((landing, engine_tag))
    }

    fn save_log(&self, job: &Job, lines: &VecDeque<String>) {
        let dir = self
            .cache
            .root()
            .join(".kiln")
            .join("logs")
            .join(&job.key.package);
        let path: PathBuf = dir.join(format!("{}-{}.log", job.tag, job.key.arch));
        let mut body = String::new();
        for line in lines {
            body.push_str(line);
            body.push('\n');
        }
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, body)) {
            tracing::warn!("cannot keep the build log {}: {e}", path.display());
        }
    }
}

/// A built image, not yet named in the cache.
struct Landing {
    built: Built,
    platform: Platform,
}

/// `SOURCE_DATE_EPOCH` for native layers (default 0).
fn source_date_epoch() -> i64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What LinuxKit's automatic build args and labels need to know of a package.
fn linuxkit_info(p: &Planned) -> LinuxkitInfo {
    LinuxkitInfo {
        image: p.pkg.repo.to_string(),
        pkg_hash: p.tag.to_string(),
        git_repo: p.pkg.spec.gitrepo.clone(),
        in_git: p.git.in_git,
        clean_commit: p.git.clean_commit.clone(),
        go_pkg_version: p.git.go_pkg_version.clone(),
        config_json: p
            .pkg
            .spec
            .config
            .as_ref()
            .and_then(|c| serde_json::to_string(c).ok()),
    }
}
