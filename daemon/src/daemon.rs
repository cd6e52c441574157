//! The daemon's lifetime: open the cache, bind the registry and the control socket,
//! discover and plan the workspace, say when ready, then run the event loop (file
//! changes, control requests, pulls of tags not built yet) until SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_shared::protocol::{Event, Pull, Ready, now_ms};
use kiln_shared::reference::{ImageRef, RepoName, Tag};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiError};
use crate::build::docker::EngineError;
use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::control::{
    ControlConfig, Controller, Core, Inputs, Owned, PullMiss, QueueConfig, cache_stats, describe,
    flush_usage, fold_refs, fold_refs_when_quiet, start_queue,
};
use crate::control::{publish_upstreams, resume_pushes};
use crate::registry::{BoxFuture, Hooks, ManifestMiss, MissError, RegistryConfig, RegistryError};
use crate::schedule::{CancelReason, Failure, Outcome};
use crate::upstream::{AuthFiles, UpstreamError, Upstreams};
use crate::watch::{WatchConfig, WatchError, Watcher};
use kiln_shared::error::Chain;

/// Why kilnd stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("dev tag: {0}")]
    DevTag(#[source] kiln_shared::reference::ReferenceError),
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How long each phase of shutdown may take (draining what is in flight, then ending the
/// builds) before kilnd stops anyway, saying so.
const SHUTDOWN_PHASE: Duration = Duration::from_secs(60);

/// Runs kilnd until a termination signal.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let cache = open_cache(&config.cache, &config.imports).await?;
    tracing::info!(cache = %cache.root().display(), "cache open");

    let registry = crate::registry::bind(RegistryConfig::from(&config)).await?;
    let addrs: Vec<String> = registry
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    // The engine pushes to an IPv4 loopback address (an image reference cannot hold
    // `[::1]`), which it treats as a plain-HTTP registry.
    let push_to = registry
        .local_addrs()
        .iter()
        .find(|a| a.is_ipv4() && a.ip().is_loopback())
        .map(ToString::to_string);

    // Docker Hub is always there, last, for docker.io names, as docker does: a base image
    // that is neither a workspace package nor in the cache comes through it. (The one-off
    // `kilnd build` runs with none.)
    let upstreams = Some(Arc::new(Upstreams::new(
        &config.upstreams,
        &AuthFiles::from_env(),
    )?));
    // Blobs on demand (targets fetched lazily) come from the upstream that named them.
    if let Some(u) = &upstreams {
        cache.set_blob_source(Arc::clone(u) as Arc<dyn crate::cache::BlobSource>);
    }
    // Every task is owned: shutdown stops accepting, drains what is in flight (uploads,
    // pushes), then cancels and awaits the builds.
    let owned = Owned::default();
    // The clients fetches will use load the system's CA certificates (~100 ms of CPU):
    // that happens while the workspace is read and tagged, not when the first fetch starts.
    if let Some(u) = &upstreams {
        owned.drain.spawn(Arc::clone(u).warm());
    }
    let Core {
        bus,
        table,
        sched,
        roots,
        touched,
    } = start_queue(
        QueueConfig {
            cache: &cache,
            roots: &config.roots,
            registry_addrs: addrs.clone(),
            engines: &config.engines,
            push_to,
            dev_tag: config.dev_tag.clone(),
            jobs: config.jobs,
            upstreams: upstreams.clone(),
            imports: crate::control::Imports {
                names: config.imports.iter().map(|(_, _, n)| n.clone()).collect(),
                fallbacks: config.fallback_imports.clone(),
            },
            owned: &owned,
        },
        |_| {},
    )?;
    if let Some(u) = &upstreams {
        publish_upstreams(u, &bus);
    }
    let api = Api::bind(&config.socket).await?;
    let bus_for_api = bus.clone();

    // The registry: pulls are shown, and a pull of a tag not built yet waits for it.
    let (pull_tx, pull_rx) = mpsc::channel::<PullMiss>(64);
    let pulled_bus = bus.clone();
    let hooks = Hooks {
        manifest_miss: Some(Arc::new(BuildOnPull {
            tx: pull_tx,
            wait: config.pull_wait,
            cache: Arc::clone(&cache),
            upstreams: upstreams.clone(),
            stopping: owned.stopping.clone(),
        })),
        on_pull: Some(Arc::new(move |p: crate::registry::PullEvent| {
            pulled_bus.publish(Event::Pulled {
                pull: Pull {
                    reference: p.reference.qualified(&p.repo),
                    digest: p.digest,
                    client: Some(p.peer.to_string()),
                    at_ms: now_ms(),
                },
            });
        })),
    };
    // The registry drains at shutdown: pushes in flight finish.
    let (stop, tasks) = (owned.stopping.clone(), owned.drain.clone());
    tasks.spawn(registry.serve(Arc::clone(&cache), hooks, stop.clone()));

    let (control_tx, control_rx) = mpsc::channel(64);
    let api_stop = stop.clone();
    tasks.spawn(async move {
        let served = api.serve(bus_for_api, control_tx, api_stop.cancelled_owned());
        if let Err(e) = served.await {
            tracing::error!("the control API stopped: {e}");
        }
    });
    tasks.spawn(until(
        stop.clone(),
        cache_stats(Arc::clone(&cache), bus.clone(), config.max_size),
    ));

    let (_watcher, watch_rx) = Watcher::start(WatchConfig {
        roots: roots.clone(),
        exclude: vec![cache.root().to_owned()],
        quiet: config.quiet,
        touched: Arc::clone(&touched),
        fence_dir: Some(cache.root().join(".kiln").join("fence")),
    })?;

    let mut controller = tokio::task::block_in_place(|| {
        Controller::new(
            &roots,
            Arc::clone(&cache),
            bus.clone(),
            sched,
            Arc::clone(&table),
            tasks.clone(),
            ControlConfig {
                builders: config.builders.clone(),
                dev_tag: config.dev_tag.clone(),
                max_size: config.max_size,
                upstreams: upstreams.clone(),
                touched,
            },
        )
    });
    controller
        .plan_all(crate::schedule::QueueReason::Start)
        .await;
    if let Some(u) = &upstreams {
        resume_pushes(&owned, u, &cache, &bus, &table).await;
    }

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    announce(
        &Ready {
            registry: addrs,
            socket: config.socket.clone(),
            pid: std::process::id(),
        },
        config.ready_file.as_deref(),
    )?;

    tasks.spawn(controller.run(
        Inputs {
            watch: watch_rx,
            control: control_rx,
            pulls: pull_rx,
        },
        stop.clone(),
    ));
    tasks.spawn(fold_refs_when_quiet(Arc::clone(&cache), stop.clone()));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    owned.shutdown(SHUTDOWN_PHASE).await;
    // What landed or was pushed last is in index.json for other tools.
    fold_refs(&cache).await;
    Ok(())
}

/// Imports the configured images (base images made without a registry). A missing
/// layout is a warning: the packages built on it fail with their own message.
async fn import_images(cache: &Arc<Cache>, imports: &[(std::path::PathBuf, String, String)]) {
    for (layout, reference, name) in imports.iter().cloned() {
        let c = Arc::clone(cache);
        let r = tokio::task::spawn_blocking(move || {
            let done = c.import_layout(&layout, &reference, &name);
            (layout, name, done)
        })
        .await;
        match r {
            Ok((_, name, Ok(d))) => tracing::info!(image = %name, digest = %d.digest, "imported"),
            Ok((layout, name, Err(e))) => tracing::warn!(
                "cannot import {name} from {}: {e}; make the base images with scripts/setup \
                 (or scripts/base-images)",
                layout.display()
            ),
            Err(e) => tracing::warn!("import stopped: {e}"),
        }
    }
}

/// Opens the cache and imports the configured images into it.
async fn open_cache(
    dir: &std::path::Path,
    imports: &[(std::path::PathBuf, String, String)],
) -> Result<Arc<Cache>, DaemonError> {
    let dir = dir.to_owned();
    let cache = Arc::new(
        tokio::task::spawn_blocking(move || {
            let cache = Cache::open(&dir)?;
            // What writers killed mid-write left (temp files of dead processes only).
            match cache.remove_leftovers() {
                Ok(gone) if !gone.is_empty() => tracing::info!(
                    files = gone.len(),
                    bytes = gone.iter().map(|l| l.bytes).sum::<u64>(),
                    "removed temp files that dead writers left in the cache"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot clean the cache's temp files: {e}"),
            }
            // Changes an earlier kilnd left in the refs journal go into index.json.
            if let Err(e) = cache.fold_refs() {
                tracing::warn!("cannot fold the refs journal into index.json: {e}");
            }
            // What a crashed kilnd left of its RUN steps (containers, mounts,
            // directories) goes before anything builds.
            match crate::build::native::Snapshots::open(&cache) {
                Ok(s) => {
                    let n = crate::build::native::runtime::clean_stale(&s);
                    if n > 0 {
                        tracing::info!("removed {n} leftovers of RUN steps of an earlier kilnd");
                    }
                }
                Err(e) => tracing::warn!("cannot open the snapshot store: {e}"),
            }
            Ok::<_, crate::cache::CacheError>(cache)
        })
        .await??,
    );
    import_images(&cache, imports).await;
    Ok(cache)
}

/// Builds on pull: a manifest request for a workspace package's current tag that the
/// cache lacks starts (or joins) its builds and answers when they are done.
pub struct BuildOnPull {
    pub tx: mpsc::Sender<PullMiss>,
    pub wait: Duration,
    /// A name that is not a workspace package is fetched through the upstreams once
    /// (kilnd as the machine's pull-through cache), then served from the cache.
    pub cache: Arc<Cache>,
    pub upstreams: Option<Arc<Upstreams>>,
    /// Once kilnd stops, a pull that waits for a build is answered at once: the drain
    /// does not wait for builds, which are cancelled after it.
    pub stopping: CancellationToken,
}

impl ManifestMiss for BuildOnPull {
    fn on_miss(&self, repo: RepoName, tag: Tag) -> BoxFuture<'static, Result<bool, MissError>> {
        let tx = self.tx.clone();
        let wait = self.wait;
        let (cache, upstreams) = (Arc::clone(&self.cache), self.upstreams.clone());
        let stopping = self.stopping.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let miss = PullMiss {
                repo: repo.to_string(),
                tag: tag.to_string(),
                reply,
            };
            if tx.send(miss).await.is_err() {
                return Err(miss_error(PullBuildError::ShuttingDown));
            }
            let waits = rx
                .await
                .map_err(|_| miss_error(PullBuildError::ShuttingDown))?;
            if waits.is_empty() {
                let Some(upstreams) = upstreams else {
                    return Ok(false);
                };
                return match upstreams
                    .fetch_image(&cache, &format!("{repo}:{tag}"))
                    .await
                {
                    Ok(f) => {
                        tracing::info!(
                            "{repo}:{tag}: pulled through from {} in {} ms",
                            f.upstream,
                            f.elapsed.as_millis()
                        );
                        Ok(true)
                    }
                    Err(UpstreamError::NotFound { .. }) => Ok(false),
                    Err(e) => Err(MissError::from(Box::new(e) as Box<_>)),
                };
            }
            let all = futures_util::future::join_all(waits);
            let all = async {
                tokio::select! {
                    outcomes = all => Some(outcomes),
                    () = stopping.cancelled() => None,
                }
            };
            let image = ImageRef::new(repo, tag);
            let outcomes = tokio::time::timeout(wait, all).await.map_err(|_| {
                miss_error(PullBuildError::StillRunning {
                    image: image.clone(),
                    wait,
                })
            })?;
            let Some(outcomes) = outcomes else {
                return Err(miss_error(PullBuildError::ShuttingDown));
            };
            for o in outcomes {
                let e = match o {
                    Ok(Outcome::Built(_)) => continue,
                    Ok(Outcome::Failed(source)) => PullBuildError::Failed {
                        image: image.clone(),
                        source,
                    },
                    Ok(Outcome::Cancelled(reason)) => PullBuildError::Cancelled {
                        image: image.clone(),
                        reason,
                    },
                    Err(_) => PullBuildError::ShuttingDown,
                };
                return Err(miss_error(e));
            }
            Ok(true)
        })
    }
}

/// Why a pull that waited for a build gets no image.
#[derive(Debug, thiserror::Error)]
enum PullBuildError {
    #[error("kilnd is shutting down; pull again once it runs")]
    ShuttingDown,
    #[error(
        "the build of {image} is still running after {}s; pull again later, or raise \
         kilnd's --pull-wait (`kiln status` shows the build)",
        .wait.as_secs()
    )]
    StillRunning { image: ImageRef, wait: Duration },
    #[error(
        "the build of {image} failed: {} (`kiln logs {}` shows its log)",
        Chain(.source),
        .image.repo
    )]
    Failed {
        image: ImageRef,
        #[source]
        source: Failure,
    },
    #[error("the build of {image} was cancelled: {reason}")]
    Cancelled {
        image: ImageRef,
        reason: CancelReason,
    },
}

fn miss_error(e: PullBuildError) -> MissError {
    MissError::from(Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
}

/// Runs `task` until it ends or `stop` fires (then drops it).
async fn until(stop: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = task => {}
        () = stop.cancelled() => {}
    }
}

/// Prints the ready line and writes the ready file atomically.
fn announce(ready: &Ready, file: Option<&Path>) -> Result<(), DaemonError> {
    println!(
        "kilnd ready: registry {} api {}",
        ready.registry.join(" "),
        ready.socket.display()
    );
    if let Some(path) = file {
        let err = |source| DaemonError::ReadyFile {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(ready).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
    }
    Ok(())
}

/// A one-off build without a running kilnd (`kiln build --cache DIR`).
#[derive(Debug, Clone)]
pub struct OneOff {
    pub roots: Vec<std::path::PathBuf>,
    pub cache: std::path::PathBuf,
    /// Package directories or `org/image` names.
    pub packages: Vec<String>,
    pub arch: Option<String>,
    pub force: bool,
    pub builders: crate::plan::Builders,
    pub engines: Vec<String>,
    pub jobs: usize,
    /// Images to import first (kiln.toml's `[[import]]`).
    pub imports: Vec<(std::path::PathBuf, String, String)>,
}

/// How one target of a one-off build ended.
#[derive(Debug)]
pub struct OneOffResult {
    pub package: String,
    pub arch: String,
    /// The tag built, when the package could be planned.
    pub tag: Option<Tag>,
    pub outcome: Result<Outcome, NotQueued>,
}

/// Why a target of a one-off build never reached the queue, or got no answer from it.
#[derive(Debug, thiserror::Error)]
pub enum NotQueued {
    /// The package cannot be planned: the problem as planning reports it.
    #[error("{0}")]
    Unplanned(String),
    #[error(transparent)]
    Refused(#[from] crate::control::ControlError),
    #[error("the build queue stopped")]
    QueueStopped,
}

/// Builds what `req` asks for into its cache, with kilnd's own planner, queue and
/// builders, and a registry on a free loopback port for the engine to push to. `line`
/// receives a line per step as builds start and end.
pub async fn build_once(
    req: OneOff,
    line: impl Fn(String) + Send + Sync + 'static,
) -> Result<Vec<OneOffResult>, DaemonError> {
    let cache = open_cache(&req.cache, &req.imports).await?;
    let registry = crate::registry::bind(RegistryConfig {
        listen: vec![std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        ))],
        skip_unavailable: false,
        ..RegistryConfig::default()
    })
    .await?;
    let push_to = registry.local_addrs().first().map(ToString::to_string);
    // Serves the engine for this one run; stopped (drained) when the builds are done.
    let owned = Owned::default();
    let tasks = owned.drain.clone();
    tasks.spawn(registry.serve(Arc::clone(&cache), Hooks::default(), owned.stopping.clone()));
    let dev_tag: Tag = "dev".parse().map_err(DaemonError::DevTag)?;
    let line = Arc::new(line);
    let events_line = Arc::clone(&line);
    let Core {
        bus,
        table,
        sched,
        roots,
        touched,
    } = start_queue(
        QueueConfig {
            cache: &cache,
            roots: &req.roots,
            registry_addrs: Vec::new(),
            engines: &req.engines,
            push_to,
            dev_tag: dev_tag.clone(),
            jobs: req.jobs,
            upstreams: None,
            imports: crate::control::Imports {
                names: req.imports.iter().map(|(_, _, n)| n.clone()).collect(),
                fallbacks: Vec::new(),
            },
            owned: &owned,
        },
        move |e| {
            if let Some(text) = describe(e) {
                events_line(text);
            }
        },
    )?;
    let mut controller = tokio::task::block_in_place(|| {
        Controller::new(
            &roots,
            Arc::clone(&cache),
            bus,
            sched.clone(),
            table,
            tasks.clone(),
            ControlConfig {
                builders: req.builders,
                dev_tag,
                max_size: None,
                upstreams: None,
                touched,
            },
        )
    });
    let errors = tokio::task::block_in_place(|| controller.load());
    let mut results = Vec::new();
    let mut waits = Vec::new();
    for package in &req.packages {
        let key = std::fs::canonicalize(package).ok();
        if let Some(e) = key.as_ref().and_then(|k| errors.get(k)) {
            results.push(OneOffResult {
                package: package.clone(),
                arch: req.arch.clone().unwrap_or_default(),
                tag: None,
                outcome: Err(NotQueued::Unplanned(e.clone())),
            });
            continue;
        }
        let response = controller
            .build_request(kiln_shared::protocol::BuildRequest {
                package: package.clone(),
                arch: req.arch.clone(),
                force: req.force,
                builder: None,
            })
            .await;
        match response {
            Ok((r, rxs)) => {
                for a in r.up_to_date {
                    line(format!("{package} ({a}) is up to date in the cache"));
                }
                waits.extend(r.builds.into_iter().zip(rxs));
            }
            Err(e) => results.push(OneOffResult {
                package: package.clone(),
                arch: req.arch.clone().unwrap_or_default(),
                tag: None,
                outcome: Err(e.into()),
            }),
        }
    }
    for (b, rx) in waits {
        let outcome = rx.await.map_err(|_| NotQueued::QueueStopped);
        results.push(OneOffResult {
            package: b.package,
            arch: b.arch,
            tag: Some(b.tag),
            outcome,
        });
    }
    flush_usage(&cache).await;
    owned.shutdown(SHUTDOWN_PHASE).await;
    fold_refs(&cache).await;
    Ok(results)
}
