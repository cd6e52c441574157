//! Pushing a target from the cache to one upstream: `tag-<arch>` per arch, then the
//! index as `tag` (the references `linuxkit pkg push` writes), children before the
//! documents that name them, and only what the upstream lacks: a manifest it has under
//! the name is skipped (HEAD), a blob it has is skipped, a blob another repository there
//! has is mounted, the rest is uploaded.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use http::HeaderValue;
use kiln_shared::reference::{ImageRef, RepoName};
use oci_client::errors::OciDistributionError;

use super::{PARALLEL, Remote, not_found, oci_descriptor};
use crate::cache::{Cache, CacheError, MANIFEST_LIMIT};
use crate::oci::{AnyManifest, Descriptor, is_document};
use crate::upstream::{Pushed, UpstreamError, digest_str, read_index};

impl Remote {
    /// Pushes every arch of a target the cache holds (`tag-<arch>`), then its index
    /// (`tag`), skipping what the upstream has. Pushes of one image go one at a time (the
    /// push after a landing and a `kiln push` of it, say): the second then finds what the
    /// first sent and skips it, instead of racing it blob by blob, which the distribution
    /// registry can answer with a manifest whose blob it does not know yet.
    pub async fn push_target(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        mount_from: &[RepoName],
    ) -> Result<Pushed, UpstreamError> {
        let key = image.to_string();
        let gate = Arc::clone(
            self.pushing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let pushed = {
            let _one = gate.lock().await;
            self.challenged_once(|| self.push_target_once(cache, image, mount_from))
                .await
        };
        let mut pushing = self.pushing.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this push's: no other push of the image waits.
        if Arc::strong_count(&gate) == 2 {
            pushing.remove(&key);
        }
        pushed
    }

    async fn push_target_once(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        mount_from: &[RepoName],
    ) -> Result<Pushed, UpstreamError> {
        self.ready()?;
        let start = Instant::now();
        let shown = image.to_string();
        let name = image.cache_name();
        let view = cache.index().map_err(|e| self.cache_error(&shown, e))?;
        let index_desc = view
            .get(&name)
            .cloned()
            .ok_or_else(|| UpstreamError::Cache {
                upstream: self.spec.to_string(),
                image: shown.clone(),
                source: CacheError::Invalid(format!("{name} is not in the cache: build it first")),
            })?;
        let Some(index) =
            read_index(cache, &index_desc).map_err(|e| self.cache_error(&shown, e))?
        else {
            return Err(self.cache_error(
                &shown,
                CacheError::Invalid(format!("{name} is not a multi-arch index")),
            ));
        };
        let repo = self.repo(image.repo.as_str());
        let mounts: Vec<String> = mount_from
            .iter()
            .map(|r| self.repo(r.as_str()))
            .filter(|r| *r != repo)
            .collect();
        let arch_prefix = format!("{name}-");
        let mut references = Vec::new();
        let mut bytes = 0;
        for entry in &index.manifests {
            let Some(suffix) = view
                .refs()
                .find(|(n, d)| n.starts_with(&arch_prefix) && d.digest == entry.digest)
                .map(|(n, _)| n[arch_prefix.len()..].to_owned())
            else {
                continue;
            };
            let tag = format!("{}-{suffix}", image.tag);
            bytes += self
                .push_graph(cache, &repo, entry, Some(&tag), &mounts)
                .await?;
            references.push(format!("{}/{repo}:{tag}", self.spec.registry));
        }
        bytes += self
            .push_graph(cache, &repo, &index_desc, Some(image.tag.as_str()), &mounts)
            .await?;
        references.push(format!("{}/{repo}:{}", self.spec.registry, image.tag));
        tracing::info!(image = %shown, upstream = %self.spec, bytes, ms = start.elapsed().as_millis() as u64, "pushed");
        Ok(Pushed {
            upstream: self.spec.to_string(),
            references,
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Pushes `desc` and what it reaches (children first), under `tag` or by digest.
    fn push_graph<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        repo: &'a str,
        desc: &'a Descriptor,
        tag: Option<&'a str>,
        mounts: &'a [String],
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            let image = format!("{repo}@{}", desc.digest);
            if !is_document(&desc.media_type) {
                return self.push_blob(cache, repo, desc, mounts).await;
            }
            let reference = match tag {
                Some(t) => self.tagged(repo, t),
                None => self.by_digest(repo, &desc.digest),
            };
            // HEAD first: a manifest the upstream has under this name is done.
            match self.manifest_digest(&reference).await? {
                Ok(d) if d == digest_str(&desc.digest) => return Ok(0),
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(self.error(&image, e)),
            }
            // A manifest on demand comes from its upstream first.
            cache
                .ensure_blob(&desc.digest)
                .await
                .map_err(|e| self.cache_error(&image, e))?;
            let doc = cache
                .read_blob(&desc.digest, MANIFEST_LIMIT)
                .map_err(|e| self.cache_error(&image, e))?;
            let parsed: AnyManifest =
                serde_json::from_slice(&doc).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.clone(),
                    detail: format!("not valid JSON in the cache: {e}"),
                })?;
            let children: Vec<Descriptor> = parsed.children().cloned().collect();
            let pushes: Vec<_> = children
                .iter()
                .map(|c| self.push_graph(cache, repo, c, None, mounts))
                .collect();
            let sizes: Vec<u64> = futures_util::stream::iter(pushes)
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
            let content_type =
                HeaderValue::from_str(&desc.media_type).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.clone(),
                    detail: format!("media type {:?}: {e}", desc.media_type),
                })?;
            self.client()
                .await?
                .push_manifest_raw(&reference, doc, content_type)
                .await
                .map_err(|e| self.error(&image, e))?;
            Ok(sizes.iter().sum::<u64>() + desc.size)
        }
        .boxed()
    }

    /// One blob: nothing if the upstream has it, a mount if another repository there has
    /// it, else an upload.
    async fn push_blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
        mounts: &[String],
    ) -> Result<u64, UpstreamError> {
        let image = format!("{repo}@{}", desc.digest);
        let reference = self.by_digest(repo, &desc.digest);
        let client = self.client().await?;
        match client
            .pull_blob_stream_partial(&reference, &oci_descriptor(desc), 0, Some(1))
            .await
        {
            Ok(_) => return Ok(0),
            Err(OciDistributionError::ServerError { code: 416, .. }) => return Ok(0),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.error(&image, e)),
        }
        for from in mounts {
            let source = self.by_digest(from, &desc.digest);
            if client
                .mount_blob(&reference, &source, &digest_str(&desc.digest))
                .await
                .is_ok()
            {
                return Ok(0);
            }
        }
        // Only now are the bytes needed: a blob on demand is fetched from its upstream.
        cache
            .ensure_blob(&desc.digest)
            .await
            .map_err(|e| self.cache_error(&image, e))?;
        let path = cache.blob_path(&desc.digest);
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| self.cache_error(&image, CacheError::Io { path, source: e }))?;
        client
            .push_blob(&reference, &data, &digest_str(&desc.digest))
            .await
            .map_err(|e| self.error(&image, e))?;
        Ok(desc.size)
    }
}
