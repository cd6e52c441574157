//! Copying from one upstream into the cache: a workspace package's tag (its whole
//! multi-arch index in one go, as LinuxKit pushes it) or any image, every document kept
//! bit for bit, only the blobs the cache lacks transferred, each streamed into a
//! verifying blob writer. A package's tag may be fetched lazily: its index only, what it
//! names left upstream as blobs on demand (see `cache::ondemand`), fetched on first read
//! through [`Remote::fetch_on_demand`]; a manifest fetched so brings the record of its
//! own config and layers.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use kiln_shared::digest::Digest;
use kiln_shared::reference::ImageRef;
use oci_client::Reference;

use super::{PARALLEL, Remote, oci_descriptor};
use crate::cache::{Cache, CacheError, MANIFEST_LIMIT, OnDemand};
use crate::oci::{
    AnyManifest, Descriptor, ImageIndex, Platform, is_document, is_index, is_manifest,
};
use crate::upstream::{Fetched, FetchedPackage, UpstreamError, cache_name};

/// Where a lazy fetch puts the blobs it leaves upstream (`None`: an eager fetch copies
/// them).
type Deferred<'a> = Option<&'a Mutex<Vec<Descriptor>>>;

impl Remote {
    /// A package's tag, as [`crate::upstream::Upstreams::fetch_package`] says: the index
    /// `tag` with every manifest it lists (one GET for the index, one per arch, then the
    /// missing blobs), and for a wanted arch the index lacks, the manifest `tag-<arch>`.
    /// `lazy`: what the index or manifest names is not copied but listed in
    /// [`FetchedPackage::on_demand`] (one GET per package when the index is there).
    pub async fn fetch_package(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        archs: &[(String, Platform)],
        lazy: bool,
    ) -> Result<Option<FetchedPackage>, UpstreamError> {
        self.challenged_once(|| self.fetch_package_once(cache, image, archs, lazy))
            .await
    }

    async fn fetch_package_once(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        archs: &[(String, Platform)],
        lazy: bool,
    ) -> Result<Option<FetchedPackage>, UpstreamError> {
        self.ready()?;
        let deferred = Mutex::new(Vec::new());
        let defer = lazy.then_some(&deferred);
        let start = Instant::now();
        let repo = self.repo(image.repo.as_str());
        let tag = image.tag.as_str();
        let shown = image.to_string();
        let mut bytes = 0;
        let mut index = None;
        let mut found = Vec::new();
        if let Some((doc, desc)) = self.get_manifest(&self.tagged(&repo, tag)).await?
            && is_index(&desc.media_type)
        {
            let parsed: ImageIndex =
                serde_json::from_slice(&doc).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: shown.clone(),
                    detail: format!("the index is not valid JSON: {e}"),
                })?;
            bytes += self
                .copy_children(cache, &repo, &shown, &doc, defer)
                .await?;
            // The index last: it is in the cache only once all it names is.
            bytes += self.store(cache, &shown, &doc, &desc)?;
            for (suffix, platform) in archs {
                if let Some(entry) = parsed.manifests.iter().find(|e| {
                    e.platform
                        .as_ref()
                        .is_some_and(|p| same_platform(p, platform))
                }) {
                    found.push((suffix.clone(), entry.clone()));
                }
            }
            index = Some(desc);
        }
        for (suffix, platform) in archs {
            if found.iter().any(|(s, _)| s == suffix) {
                continue;
            }
            let shown = format!("{image}-{suffix}");
            let Some((doc, mut desc)) = self
                .get_manifest(&self.tagged(&repo, &format!("{tag}-{suffix}")))
                .await?
            else {
                continue;
            };
            if !is_manifest(&desc.media_type) {
                return Err(UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: shown,
                    detail: format!("expected an image manifest, got {}", desc.media_type),
                });
            }
            bytes += self
                .copy_children(cache, &repo, &shown, &doc, defer)
                .await?;
            bytes += self.store(cache, &shown, &doc, &desc)?;
            desc.platform = Some(platform.clone());
            found.push((suffix.clone(), desc));
        }
        if found.is_empty() {
            return Ok(None);
        }
        let upstream = self.spec.to_string();
        let on_demand: Vec<_> = deferred
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|d| {
                let is_doc = is_document(&d.media_type);
                let from = OnDemand {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                    image: image.repo.to_string(),
                    size: d.size,
                    media_type: is_doc.then_some(d.media_type),
                    recorded: 0,
                };
                (d.digest, from)
            })
            .collect();
        tracing::info!(image = %shown, %upstream, bytes, on_demand = on_demand.len(), ms = start.elapsed().as_millis() as u64, "fetched");
        Ok(Some(FetchedPackage {
            upstream,
            index,
            archs: found,
            bytes,
            on_demand,
            elapsed: start.elapsed(),
        }))
    }

    /// Any image, whole, named by its full reference in the cache.
    pub async fn fetch_image(
        &self,
        cache: &Arc<Cache>,
        image: &Reference,
    ) -> Result<Option<Fetched>, UpstreamError> {
        self.challenged_once(|| self.fetch_image_once(cache, image))
            .await
    }

    async fn fetch_image_once(
        &self,
        cache: &Arc<Cache>,
        image: &Reference,
    ) -> Result<Option<Fetched>, UpstreamError> {
        self.ready()?;
        let start = Instant::now();
        let repo = self.repo(image.repository());
        let reference = match (image.digest(), image.tag()) {
            (Some(d), _) => Reference::with_digest(self.host.clone(), repo.clone(), d.to_owned()),
            (None, t) => self.tagged(&repo, t.unwrap_or("latest")),
        };
        let Some((doc, desc)) = self.get_manifest(&reference).await? else {
            return Ok(None);
        };
        let name = cache_name(image);
        let mut bytes = self.copy_children(cache, &repo, &name, &doc, None).await?;
        bytes += self.store(cache, &name, &doc, &desc)?;
        cache
            .set_ref(&name, desc.clone())
            .map_err(|e| self.cache_error(&name, e))?;
        tracing::info!(image = %name, upstream = %self.spec, bytes, ms = start.elapsed().as_millis() as u64, "fetched");
        Ok(Some(Fetched {
            upstream: self.spec.to_string(),
            desc,
            bytes,
            elapsed: start.elapsed(),
        }))
    }

    /// Writes a document already in memory into the cache (verified); returns the bytes
    /// added.
    fn store(
        &self,
        cache: &Cache,
        image: &str,
        doc: &[u8],
        desc: &Descriptor,
    ) -> Result<u64, UpstreamError> {
        // One here is leased from gc until the landing names it.
        if cache
            .touch_blob(&desc.digest)
            .map_err(|e| self.cache_error(image, e))?
            == Some(desc.size)
        {
            return Ok(0);
        }
        let mut w = cache
            .blob_writer()
            .map_err(|e| self.cache_error(image, e))?;
        w.write_bytes(doc).map_err(|e| self.cache_error(image, e))?;
        w.finish(Some(&desc.digest), Some(desc.size))
            .map_err(|e| self.cache_error(image, e))?;
        Ok(desc.size)
    }

    /// Copies what `desc` reaches into the cache, skipping blobs it holds; returns the
    /// bytes added. Every blob is verified by digest and size before it is visible. With
    /// `defer`, a missing blob (a manifest as well as a config or layer) is listed there
    /// instead of copied.
    fn copy_graph<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        repo: &'a str,
        desc: &'a Descriptor,
        defer: Deferred<'a>,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            let image = format!("{repo}@{}", desc.digest);
            // A blob here is leased from gc until the landing names it.
            let have = cache
                .touch_blob(&desc.digest)
                .map_err(|e| self.cache_error(&image, e))?
                == Some(desc.size);
            let is_doc = is_document(&desc.media_type);
            match defer {
                Some(list) if !have => {
                    list.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(desc.clone());
                    return Ok(0);
                }
                _ if is_doc => {}
                _ if have => return Ok(0),
                _ => return self.copy_blob(cache, repo, desc, None).await,
            }
            // A document goes in after what it names, so the cache never holds a
            // manifest whose blobs are missing (but for those deferred).
            let (doc, pending) = if have {
                let doc = cache
                    .read_blob(&desc.digest, MANIFEST_LIMIT)
                    .map_err(|e| self.cache_error(&image, e))?;
                (doc, None)
            } else {
                let (doc, mut got) = self.named_manifest(repo, desc).await?;
                got.size = desc.size;
                (doc, Some(got))
            };
            let sizes = self.copy_children(cache, repo, &image, &doc, defer).await?;
            let added = match pending {
                Some(got) => self.store(cache, &image, &doc, &got)?,
                None => 0,
            };
            Ok(added + sizes)
        }
        .boxed()
    }

    /// Copies what the manifest or index `doc` names (not `doc` itself); returns the
    /// bytes added.
    async fn copy_children(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        image: &str,
        doc: &[u8],
        defer: Deferred<'_>,
    ) -> Result<u64, UpstreamError> {
        let parsed: AnyManifest =
            serde_json::from_slice(doc).map_err(|e| UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image: image.to_owned(),
                detail: format!("not valid JSON: {e}"),
            })?;
        let copies: Vec<_> = parsed
            .children()
            .map(|c| self.copy_graph(cache, repo, c, defer))
            .collect();
        let sizes: Vec<u64> = futures_util::stream::iter(copies)
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(sizes.iter().sum())
    }

    /// A blob on demand (see `cache::ondemand`), copied into the cache now; refused at
    /// once while the upstream is down.
    pub(in crate::upstream) async fn fetch_on_demand(
        &self,
        cache: &Arc<Cache>,
        digest: &Digest,
        from: &OnDemand,
    ) -> Result<u64, UpstreamError> {
        let media_type = from
            .media_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".to_owned());
        let desc = Descriptor::new(media_type, digest.clone(), from.size);
        self.challenged_once(|| async {
            self.ready()?;
            self.copy_blob(cache, &from.repo, &desc, Some(from)).await
        })
        .await
    }

    /// Copies one blob, once: a copy of a blob this upstream is already copying (the
    /// layer two arches share, the base layer of packages fetched together) waits for
    /// that one, then takes the blob from the cache (or, if that copy failed, tries
    /// itself, to report its own error). `on_demand`: the record it is fetched for.
    async fn copy_blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
        on_demand: Option<&OnDemand>,
    ) -> Result<u64, UpstreamError> {
        let turn = {
            let mut copying = self.copying.lock().unwrap_or_else(|p| p.into_inner());
            match copying.get(&desc.digest) {
                // A live entry: its sender (the copying one) is still there.
                Some(copy) if copy.has_changed().is_ok() => Err(copy.clone()),
                _ => {
                    let (done, copy) = tokio::sync::watch::channel(());
                    copying.insert(desc.digest.clone(), copy);
                    Ok(done)
                }
            }
        };
        match turn {
            Ok(done) => {
                let copied = self.transfer(cache, repo, desc, on_demand).await;
                self.copying
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&desc.digest);
                // The sender goes (here, or with this future if it is dropped): that
                // wakes every copy that waits.
                drop(done);
                copied
            }
            Err(mut copy) => {
                // Nothing is ever sent: this returns when the sender is gone.
                let _ = copy.changed().await;
                let image = format!("{repo}@{}", desc.digest);
                match cache
                    .blob_size(&desc.digest)
                    .map_err(|e| self.cache_error(&image, e))?
                {
                    Some(size) if size == desc.size => Ok(0),
                    _ => self.transfer(cache, repo, desc, on_demand).await,
                }
            }
        }
    }

    /// A manifest by digest that something the upstream served names: its absence is an
    /// error of the upstream.
    async fn named_manifest(
        &self,
        repo: &str,
        desc: &Descriptor,
    ) -> Result<(Vec<u8>, Descriptor), UpstreamError> {
        self.get_manifest(&self.by_digest(repo, &desc.digest))
            .await?
            .ok_or_else(|| UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image: format!("{repo}@{}", desc.digest),
                detail: "the upstream names this manifest but does not have it".into(),
            })
    }

    /// One blob's bytes into the cache: a manifest on demand from the manifest endpoint,
    /// landed with the record of what it names; anything else streamed.
    async fn transfer(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
        on_demand: Option<&OnDemand>,
    ) -> Result<u64, UpstreamError> {
        let Some(from) = on_demand.filter(|f| f.is_document()) else {
            return self.stream_blob(cache, repo, desc).await;
        };
        let image = format!("{repo}@{}", desc.digest);
        let (doc, _) = self.named_manifest(repo, desc).await?;
        let (landing, digest, from) = (Arc::clone(cache), desc.digest.clone(), from.clone());
        tokio::task::spawn_blocking(move || landing.land_document(&doc, &digest, &from))
            .await
            .map_err(|e| UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image: image.clone(),
                detail: format!("landing the manifest stopped: {e}"),
            })?
            .map_err(|e| self.cache_error(&image, e))?;
        Ok(desc.size)
    }

    /// Streams one blob into the cache through a blob writer on a blocking thread (the
    /// network and the disk overlap); the writer verifies digest and size.
    async fn stream_blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
    ) -> Result<u64, UpstreamError> {
        let image = format!("{repo}@{}", desc.digest);
        let reference = self.by_digest(repo, &desc.digest);
        let layer = oci_descriptor(desc);
        let mut stream = self.blob_stream(&reference, &layer).await?;
        let mut writer = cache
            .blob_writer()
            .map_err(|e| self.cache_error(&image, e))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
        let (digest, size) = (desc.digest.clone(), desc.size);
        let write = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                writer.write_bytes(&chunk)?;
                if writer.size() > size {
                    return Err(CacheError::SizeMismatch {
                        expected: size,
                        actual: writer.size(),
                    });
                }
            }
            writer.finish(Some(&digest), Some(size))
        });
        let mut failed = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = write.await.map_err(|e| UpstreamError::Registry {
            upstream: self.spec.to_string(),
            image: image.clone(),
            detail: format!("the blob writer stopped: {e}"),
        })?;
        if let Some(e) = failed {
            return Err(UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image,
                detail: format!("reading the blob: {e}"),
            });
        }
        written.map_err(|e| self.cache_error(&image, e))?;
        Ok(size)
    }
}

/// A platform in an upstream's index is the wanted one: same os and architecture, and the
/// same variant when the wanted one names a variant (`arm64` is `arm64/v8` there).
fn same_platform(have: &Platform, want: &Platform) -> bool {
    have.os == want.os
        && have.architecture == want.architecture
        && (want.variant.is_none() || have.variant == want.variant)
}
