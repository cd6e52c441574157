//! Base images that are not workspace packages: resolved through the upstreams once,
//! pinned by digest in the package's `kiln.lock` ([`crate::workspace::lock`]), and from
//! then on always taken by that digest, from the cache (offline) or, when the cache lacks
//! it, from the upstreams by digest. Names written with a digest are pinned already;
//! names that `kiln.toml` imports from a layout are pinned by the layout; names on
//! kilnd's own registry are served from the cache as they are.
//!
//! Recording a new pin changes the package's files, so its tag: the build that recorded
//! it stops there (superseded), and the watcher plans the package again at the new tag.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{ImageRef, arch_ref};

use super::{BaseError, BuildError, Inner, Log, Superseded, linuxkit_info};
use crate::build::docker::{linuxkit_build_args, platform_for_arch};
use crate::build::dockerfile::Dockerfile;
use crate::build::native::{self, cache_names};
use crate::plan::deps::build_args;
use crate::schedule::RunError;
use crate::upstream::{UpstreamError, cache_name, parse_image};
use crate::workspace::{BuilderKind, LOCK_FILE, Lock, Planned};
use kiln_shared::error::Chain;

impl Inner {
    /// The package's bases to pin, for every arch it lists: the names (after build
    /// args) that are not workspace packages, digests, imports or kilnd's own.
    fn bases_to_pin(&self, p: &Planned) -> BTreeSet<String> {
        let Ok(df) = Dockerfile::read(&p.pkg.dockerfile) else {
            return BTreeSet::new(); // the builder reports it
        };
        let args = linuxkit_build_args(&linuxkit_info(p), &build_args(&p.pkg));
        let mut names = BTreeSet::new();
        for arch in p.archs() {
            let Ok(refs) = df.image_references(&args, &platform_for_arch(&arch)) else {
                continue;
            };
            for r in refs {
                let name = r.value;
                let repo = native::repository_of(&name);
                let ours = self
                    .registry
                    .as_deref()
                    .is_some_and(|r| parse_image(&name).is_ok_and(|i| i.registry() == r));
                let imported = cache_names(&name).iter().any(|n| self.imported.contains(n));
                if ours || imported || name.contains('@') || p.deps.iter().any(|(d, _)| d == repo) {
                    continue;
                }
                names.insert(name);
            }
        }
        names
    }

    /// The digests to build `p` with, by base name. A base missing from `kiln.lock` is
    /// resolved (through the upstreams; when they cannot give it, from a fallback import
    /// or what the cache holds) and recorded, and the build stops there as superseded.
    /// A pinned digest the cache lacks is fetched by digest. For the native builder a
    /// base that cannot be had fails the build with what to do; the docker builder is left
    /// to its engine.
    pub(super) async fn pin_bases_in_lock(
        &self,
        p: &Planned,
        builder: BuilderKind,
        log: &mut Log,
    ) -> Result<BTreeMap<String, Digest>, RunError> {
        let names = self.bases_to_pin(p);
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let dir = &p.pkg.dir;
        let mut lock = Lock::read(dir).map_err(BuildError::from)?;
        let mut pins = BTreeMap::new();
        let mut recorded = Vec::new();
        for name in &names {
            let result = match lock.images.get(name) {
                Some(digest) => self
                    .pinned(name, digest, log)
                    .await
                    .map(|()| digest.clone()),
                None if self.upstreams.is_some() => {
                    let resolved = self.resolve(name, log).await.map_err(BaseError::from);
                    if let Ok(d) = &resolved {
                        lock.images.insert(name.clone(), d.clone());
                        recorded.push(format!("{name}@{d}"));
                    }
                    resolved
                }
                // No upstreams (a one-off build): the cache as it is.
                None => continue,
            };
            match result {
                Ok(d) => {
                    pins.insert(name.clone(), d);
                }
                Err(e) if builder == BuilderKind::Native => {
                    return Err(BuildError::BaseUnavailable {
                        name: name.clone(),
                        source: e,
                    }
                    .into());
                }
                Err(e) => log.line(&format!(
                    "warning: base image {name}: {}; the engine resolves it",
                    Chain(&e)
                )),
            }
        }
        self.publish_upstreams();
        if recorded.is_empty() {
            return Ok(pins);
        }
        lock.write(dir).map_err(BuildError::from)?;
        let line = format!(
            "pinned {} in {}",
            recorded.join(", "),
            dir.join(LOCK_FILE).display()
        );
        log.line(&line);
        Err(Superseded::Pinned { line }.into())
    }

    /// Makes the bytes of the workspace packages `p` is built on local for `arch` (the
    /// native builder reads their configs and layers from the cache, synchronously): a
    /// base fetched lazily from an upstream has its blobs on demand, fetched now. A base
    /// the cache does not name yet is left to the builder, which reports it.
    pub(super) async fn fetch_bases_on_demand(
        &self,
        p: &Planned,
        arch: &str,
        log: &mut Log,
    ) -> Result<(), BuildError> {
        for (repo, tag) in &p.deps {
            let Ok(repo) = repo.parse() else { continue };
            let image = ImageRef::new(repo, tag.clone());
            let Ok(index) = self.cache.index() else {
                continue;
            };
            let Some(desc) = index
                .get(&arch_ref(&image, arch))
                .or_else(|| index.get(&image.cache_name()))
                .cloned()
            else {
                continue;
            };
            let bytes = self.cache.ensure_graph(&desc).await?;
            if bytes > 0 {
                log.line(&format!(
                    "{image} ({arch}): fetched its {bytes} bytes on demand from the upstream"
                ));
            }
        }
        Ok(())
    }

    /// Makes sure the pinned `name@digest` is in the cache, named so gc keeps it.
    async fn pinned(&self, name: &str, digest: &Digest, log: &mut Log) -> Result<(), BaseError> {
        let pinned = format!("{}@{digest}", name.split('@').next().unwrap_or(name));
        let full = parse_image(&pinned).map(|r| cache_name(&r))?;
        let have = self.cache.blob_size(digest).ok().flatten();
        let named = self.cache.index().is_ok_and(|i| i.get(&full).is_some());
        match have {
            Some(_) if named => Ok(()),
            Some(size) => {
                let manifest = self.cache.read_manifest(digest)?;
                let media_type = manifest
                    .media_type
                    .unwrap_or_else(|| crate::oci::OCI_MANIFEST.to_owned());
                self.cache
                    .set_ref(
                        &full,
                        crate::oci::Descriptor::new(media_type, digest.clone(), size),
                    )
                    .map_err(BaseError::from)
            }
            None => {
                let Some(upstreams) = &self.upstreams else {
                    return Err(BaseError::Missing {
                        name: name.to_owned(),
                        digest: digest.clone(),
                        lock: LOCK_FILE,
                    });
                };
                match upstreams.fetch_image(&self.cache, &pinned).await {
                    Ok(f) => {
                        log.line(&format!(
                            "{name}: pulled {digest} (pinned) from {} in {} ms",
                            f.upstream,
                            f.elapsed.as_millis()
                        ));
                        Ok(())
                    }
                    // The offline fallback may be that very image.
                    Err(e) => match self.import_fallback(name, log).await {
                        Some(d) if d == *digest => Ok(()),
                        _ => Err(e.into()),
                    },
                }
            }
        }
    }

    /// Resolves `name` for a new pin: through the upstreams; when they cannot give it, a
    /// fallback import of `kiln.toml`, else what the cache holds under the name.
    async fn resolve(&self, name: &str, log: &mut Log) -> Result<Digest, UpstreamError> {
        let Some(upstreams) = &self.upstreams else {
            return Err(UpstreamError::NotFound {
                image: name.to_owned(),
                asked: "no upstream".into(),
            });
        };
        let failed = match upstreams.fetch_image(&self.cache, name).await {
            Ok(f) => {
                log.line(&format!(
                    "{name}: resolved to {} through {} in {} ms",
                    f.desc.digest,
                    f.upstream,
                    f.elapsed.as_millis()
                ));
                return self
                    .name_pin(name, f.desc)
                    .map_err(|e| cache_failure(name, e));
            }
            Err(e) => e,
        };
        if let Some(d) = self.import_fallback(name, log).await {
            log.line(&format!("warning: {failed}"));
            return Ok(d);
        }
        let index = self.cache.index().ok();
        let held = cache_names(name)
            .into_iter()
            .find_map(|n| index.as_ref().and_then(|i| i.get(&n).cloned()));
        match held {
            Some(desc) => {
                log.line(&format!(
                    "warning: {failed}; pinned {name} as the cache holds it: {}",
                    desc.digest
                ));
                self.name_pin(name, desc)
                    .map_err(|e| cache_failure(name, e))
            }
            None => Err(failed),
        }
    }

    /// The layout `kiln.toml` names as the offline fallback for `name`, imported now;
    /// returns the digest it pins.
    async fn import_fallback(&self, name: &str, log: &mut Log) -> Option<Digest> {
        let names = cache_names(name);
        let (layout, reference, as_name) = self
            .fallbacks
            .iter()
            .find(|(_, _, n)| names.contains(n))
            .cloned()?;
        let cache = Arc::clone(&self.cache);
        let shown = layout.display().to_string();
        let imported =
            tokio::task::spawn_blocking(move || cache.import_layout(&layout, &reference, &as_name))
                .await;
        match imported {
            Ok(Ok(desc)) => {
                log.line(&format!(
                    "{name}: the upstreams cannot give it; took {} from {shown} (the offline \
                     fallback in kiln.toml)",
                    desc.digest
                ));
                self.name_pin(name, desc).ok()
            }
            Ok(Err(e)) => {
                log.line(&format!("warning: the fallback {shown} for {name}: {e}"));
                None
            }
            Err(e) => {
                log.line(&format!("warning: importing {shown} stopped: {e}"));
                None
            }
        }
    }

    /// Names `name@digest` in the cache (gc keeps what a lock pins); returns the digest.
    fn name_pin(
        &self,
        name: &str,
        desc: crate::oci::Descriptor,
    ) -> Result<Digest, crate::cache::CacheError> {
        let digest = desc.digest.clone();
        if let Ok(r) = parse_image(&format!("{name}@{digest}")) {
            let mut desc = desc;
            desc.annotations.clear();
            self.cache.set_ref(&cache_name(&r), desc)?;
        }
        Ok(digest)
    }
}

fn cache_failure(name: &str, e: crate::cache::CacheError) -> UpstreamError {
    UpstreamError::Cache {
        upstream: "the cache".into(),
        image: name.to_owned(),
        source: e,
    }
}
