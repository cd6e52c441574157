//! Fetch before build: when a plan lacks targets whose tags are clean, their packages are
//! asked of the upstreams first, outside the build queue (whose slots are for builds)
//! and many at once, each package's tag whole (its index and every arch in one fetch).
//! What is found lands in the cache, grouped (one index change for the packages that
//! arrived together), and counts as built ("pulled from <upstream>"); the rest, and
//! every job of the batch after it, goes to the queue as planned, so a build never
//! starts before the bases it follows are fetched.
//!
//! Fetches here are lazy: a target lands with its package's index, its manifest, config
//! and layers stay upstream as blobs on demand (`cache::ondemand`), fetched when something
//! reads them (a pull from kilnd's registry, a build on top of it, a push elsewhere).
//! `kiln pull` is the eager way, for a user who wants the bytes here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use kiln_shared::protocol::{BuildOutcome, BuildSummary, BuiltBy, Event, now_ms};
use kiln_shared::reference::{ImageRef, Tag};

use super::Controller;
use super::push::{is_dirty, publish_upstreams};
use crate::build::docker::platform_for_arch;
use crate::bus::Bus;
use crate::cache::{Cache, CacheError};
use crate::oci::{ANNOTATION_REF_NAME, Descriptor, is_index};
use crate::schedule::{Job, Scheduler};
use crate::upstream::{FetchedPackage, Upstreams};
use crate::workspace::PackageTable;

/// Packages fetched at once.
const PACKAGES_AT_ONCE: usize = 16;

/// Fetches are numbered `f1`, `f2`... as builds are `b1`, `b2`...
static NEXT_FETCH: AtomicU64 = AtomicU64::new(1);

impl Controller {
    /// Queues `jobs`, after asking the upstreams for those that may be there (clean
    /// tags, not forced): found targets land without a build. The asking runs in a task
    /// of its own, so the event loop keeps answering.
    pub(super) async fn submit(&mut self, jobs: Vec<Job>) {
        let upstreams = self
            .cfg
            .upstreams
            .clone()
            .filter(|u| u.has_target_sources());
        let Some(upstreams) = upstreams.filter(|_| jobs.iter().any(wanted)) else {
            let _ = self.sched.submit(jobs).await;
            return;
        };
        let batch = Batch {
            cache: Arc::clone(&self.cache),
            bus: self.bus.clone(),
            table: Arc::clone(&self.table),
            sched: self.sched.clone(),
            upstreams,
            dev_tag: self.cfg.dev_tag.clone(),
        };
        self.tasks.spawn(batch.run(jobs));
    }
}

/// A job worth asking the upstreams about.
fn wanted(job: &Job) -> bool {
    job.look_up && !job.force && !is_dirty(&job.tag)
}

struct Batch {
    cache: Arc<Cache>,
    bus: Bus,
    table: Arc<PackageTable>,
    sched: Scheduler,
    upstreams: Arc<Upstreams>,
    dev_tag: Tag,
}

/// One package's tag to ask for, and the arches it lacks.
struct Ask {
    image: ImageRef,
    archs: Vec<String>,
}

impl Batch {
    async fn run(self, mut jobs: Vec<Job>) {
        let mut asks: BTreeMap<String, Ask> = BTreeMap::new();
        for job in jobs.iter().filter(|j| wanted(j)) {
            let Ok(repo) = job.key.package.parse() else {
                continue;
            };
            asks.entry(job.key.package.clone())
                .or_insert_with(|| Ask {
                    image: ImageRef::new(repo, job.tag.clone()),
                    archs: Vec::new(),
                })
                .archs
                .push(job.key.arch.clone());
        }
        let upstreams = &self.upstreams;
        let cache = &self.cache;
        let mut arrivals = futures_util::stream::iter(asks.into_values())
            .map(|ask| async move {
                let wanted: Vec<_> = ask
                    .archs
                    .iter()
                    .map(|a| (a.clone(), platform_for_arch(a)))
                    .collect();
                let result = upstreams
                    .fetch_package(cache, &ask.image, &wanted, true)
                    .await;
                (ask, result)
            })
            .buffer_unordered(PACKAGES_AT_ONCE)
            .ready_chunks(PACKAGES_AT_ONCE);
        let mut landed: Vec<(String, String)> = Vec::new();
        while let Some(chunk) = arrivals.next().await {
            let mut found = Vec::new();
            for (ask, result) in chunk {
                match result {
                    Ok(Some(f)) => found.push((ask.image, f)),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}; building {} here", ask.image),
                }
            }
            // The upstreams' states first, so a client that sees a target pulled sees
            // its upstream up.
            publish_upstreams(&self.upstreams, &self.bus);
            landed.extend(self.land(found).await);
        }
        drop(arrivals);
        publish_upstreams(&self.upstreams, &self.bus);
        jobs.retain(|j| {
            !landed
                .iter()
                .any(|(p, a)| *p == j.key.package && *a == j.key.arch)
        });
        for job in &mut jobs {
            job.look_up = false;
        }
        if !jobs.is_empty() {
            let _ = self.sched.submit(jobs).await;
        }
    }

    /// Lands the packages that arrived together in one change of the index and reports
    /// each arch as pulled. Returns the (package, arch) landed.
    async fn land(&self, found: Vec<(ImageRef, FetchedPackage)>) -> Vec<(String, String)> {
        if found.is_empty() {
            return Vec::new();
        }
        let current: Vec<bool> = found
            .iter()
            .map(|(image, _)| is_current(&self.table, image))
            .collect();
        let cache = Arc::clone(&self.cache);
        let dev = self.dev_tag.clone();
        let work = found.clone();
        let flags = current.clone();
        let landing = tokio::task::spawn_blocking(move || {
            let groups: Vec<_> = work
                .iter()
                .zip(&flags)
                .map(|((image, f), cur)| (image, f, cur.then_some(&dev)))
                .collect();
            land_all(&cache, &groups)
        })
        .await;
        match landing {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("cannot land what the upstreams had: {e}");
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!("landing what the upstreams had stopped: {e}");
                return Vec::new();
            }
        }
        let mut landed = Vec::new();
        for ((image, f), current) in found.iter().zip(current) {
            let package = image.repo.to_string();
            for (arch, desc) in &f.archs {
                landed.push((package.clone(), arch.clone()));
                // A newer tag planned meanwhile has its own status: leave it.
                if current {
                    report_pulled(&self.bus, &package, arch, &image.tag, desc, f);
                }
            }
        }
        landed
    }
}

/// Whether `image`'s tag is still its package's planned tag.
fn is_current(table: &PackageTable, image: &ImageRef) -> bool {
    table
        .read()
        .ok()
        .and_then(|t| t.get(image.repo.as_str()).map(|p| p.tag == image.tag))
        .unwrap_or(false)
}

/// The target's status: done, pulled from the upstream, with a one-line log.
pub(super) fn report_pulled(
    bus: &Bus,
    package: &str,
    arch: &str,
    tag: &Tag,
    desc: &Descriptor,
    f: &FetchedPackage,
) {
    let id =
        kiln_shared::protocol::BuildId(format!("f{}", NEXT_FETCH.fetch_add(1, Ordering::Relaxed)));
    bus.logs().open(&id);
    bus.log_line(
        &id,
        &format!(
            "{package}:{tag} ({arch}): pulled from {} in {} ms ({} bytes new): {}",
            f.upstream,
            f.elapsed.as_millis(),
            f.bytes,
            desc.digest
        ),
    );
    bus.publish(Event::Finished {
        package: package.to_owned(),
        arch: arch.to_owned(),
        summary: BuildSummary {
            id,
            tag: tag.clone(),
            outcome: BuildOutcome::Ok,
            duration_ms: u64::try_from(f.elapsed.as_millis()).unwrap_or(u64::MAX),
            digest: Some(desc.digest.clone()),
            error: None,
            cache_hits: 0,
            steps: 0,
            builder: Some(BuiltBy::Upstream),
            finished_at_ms: now_ms(),
            pulled_from: Some(f.upstream.clone().into_boxed_str()),
        },
    });
}

/// Names what the upstreams had in the cache, in one change of the index: a package
/// whose tag the cache does not hold yet gets the upstream's index verbatim as `tag` and
/// its arches as `tag-<arch>`; one the cache holds some arches of gains the fetched
/// arches in its index, as a build's landing does. `dev` moves to the new index of the
/// packages given a dev tag (those still current). The blobs a lazy fetch left on demand
/// are recorded first, durably, so the index never names a blob that is neither here nor
/// recorded.
pub(super) fn land_all(
    cache: &Cache,
    packages: &[(&ImageRef, &FetchedPackage, Option<&Tag>)],
) -> Result<(), CacheError> {
    let on_demand: Vec<_> = packages
        .iter()
        .flat_map(|(_, f, _)| f.on_demand.iter().cloned())
        .collect();
    cache.record_on_demand(&on_demand)?;
    let view = cache.index()?;
    let (whole, merges): (Vec<_>, Vec<_>) = packages.iter().partition(|(image, f, _)| {
        f.index.as_ref().is_some_and(|d| is_index(&d.media_type))
            && view.get(&image.cache_name()).is_none()
    });
    if !whole.is_empty() {
        // Every name of every whole package, in one commit.
        let mut names: Vec<(String, Descriptor)> = Vec::new();
        for (image, f, dev) in &whole {
            let name = image.cache_name();
            if let Some(desc) = &f.index {
                names.push((name.clone(), desc.clone()));
                for (arch, entry) in &f.archs {
                    let mut entry = entry.clone();
                    entry.annotations.remove(ANNOTATION_REF_NAME);
                    names.push((format!("{name}-{arch}"), entry));
                }
                if let Some(dev) = dev {
                    let mut at = desc.clone();
                    at.annotations.clear();
                    let dev_name = ImageRef::new(image.repo.clone(), (*dev).clone());
                    names.push((dev_name.cache_name(), at));
                }
            }
        }
        cache.update_refs(move |edit| {
            for (name, desc) in names {
                edit.set(&name, desc)?;
            }
            Ok::<_, CacheError>(())
        })?;
    }
    for (image, f, dev) in merges {
        for (arch, desc) in &f.archs {
            let platform = desc
                .platform
                .clone()
                .unwrap_or_else(|| platform_for_arch(arch));
            cache.merge_arch(image, arch, platform, desc.clone(), dev)?;
        }
    }
    Ok(())
}
