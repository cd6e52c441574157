//! Blobs on demand: a target fetched from an upstream lands with its index only; its
//! per-arch manifests, configs and layers stay upstream until something reads them (as
//! BuildKit's registry cache import does). The OCI image layout allows it: "the blobs
//! directory MAY be missing referenced blobs, in which case the missing blobs SHOULD be
//! fulfilled by an external blob store".
//!
//! `.kiln/remote.json` records, for each such blob, where it is fulfilled from (upstream,
//! repository there, size, and for a manifest or index its media type: those are asked
//! of the upstream's manifest endpoint). It is written atomically under the writer lock
//! BEFORE anything local names those blobs: before the index names a fetched index, and
//! before a manifest fetched on demand lands, the blobs it names are recorded. A crash
//! therefore leaves either no reference (an extra record entry is harmless; gc drops
//! entries nothing reaches) or a reference whose missing blobs are all recorded.
//!
//! [`Cache::ensure_blob`] is the one way to make such a blob local: it asks the
//! [`BlobSource`] the daemon installed (the upstreams; the cache does not depend on them),
//! which copies the blob through a verifying blob writer, and then drops its entry. The
//! source copies a digest once however many readers ask at once. Every reader that needs
//! bytes goes through it (the registry's manifest and blob GETs, the native builder's
//! bases, pushes, `kiln pull`); a blob HEAD answers from the recorded size.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use kiln_shared::digest::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Cache, CacheError, MANIFEST_LIMIT, write_atomic};
use crate::oci::{AnyManifest, Descriptor, is_document};

const REMOTE_FILE: &str = "remote.json";

/// Where a blob on demand is fulfilled from.
/// Fields a later kilnd adds are ignored, not refused: the cache outlives versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnDemand {
    /// The upstream as configured (`registry[/prefix]`).
    pub upstream: String,
    /// The repository on that upstream (with its prefix).
    pub repo: String,
    /// The repository it belongs to here (`org/image`), for messages.
    pub image: String,
    pub size: u64,
    /// The media type of a manifest or index (asked of the manifest endpoint, which is
    /// where registries keep them); `None` for a config or layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// When it was last recorded, in seconds since the epoch ([`Cache::record_on_demand`]
    /// sets it): a writer records before it names, so gc forgets a record that nothing
    /// reaches only once it is older than the grace period, as it keeps young
    /// unreferenced blobs.
    #[serde(default)]
    pub recorded: u64,
}

impl OnDemand {
    /// Whether this is a manifest or an index.
    pub fn is_document(&self) -> bool {
        self.media_type.as_deref().is_some_and(is_document)
    }
}

/// A blob on demand that could not be fetched (see [`CacheError::OnDemand`]).
#[derive(Debug)]
pub struct OnDemandFailure {
    pub digest: Digest,
    /// The repository it belongs to here (`org/image`).
    pub image: String,
    pub upstream: String,
    pub detail: String,
}

/// Fetches blobs on demand into the cache (the daemon installs the upstreams as one).
pub trait BlobSource: Send + Sync + std::fmt::Debug {
    /// Makes `digest` local from `from` (verified by digest and size), or says why not.
    fn fetch<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        digest: &'a Digest,
        from: &'a OnDemand,
    ) -> BoxFuture<'a, Result<(), String>>;
}

impl Cache {
    /// Installs where blobs on demand come from (once; later calls are ignored).
    pub fn set_blob_source(&self, source: Arc<dyn BlobSource>) {
        let _ = self.source.set(source);
    }

    fn remote_path(&self) -> PathBuf {
        self.root.join(".kiln").join(REMOTE_FILE)
    }

    /// Every recorded blob on demand (entries whose blob is local meanwhile included).
    pub fn on_demand_all(&self) -> Result<BTreeMap<Digest, OnDemand>, CacheError> {
        let path = self.remote_path();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| CacheError::Json { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(CacheError::io(path)(e)),
        }
    }

    /// Whether the cache holds `digest` or records it on demand: what a reference may name.
    pub fn is_held(&self, digest: &Digest) -> Result<bool, CacheError> {
        Ok(self.blob_size(digest)?.is_some() || self.on_demand(digest)?.is_some())
    }

    /// Where `digest` is fulfilled from, if it is a blob on demand not local yet.
    pub fn on_demand(&self, digest: &Digest) -> Result<Option<OnDemand>, CacheError> {
        if self.blob_size(digest)?.is_some() {
            return Ok(None);
        }
        let mut known = self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if known.is_none() {
            let all = Arc::new(self.on_demand_all()?);
            *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&all));
            known = Some(all);
        }
        Ok(known.and_then(|k| k.get(digest).cloned()))
    }

    /// Records blobs on demand, durably, before any reference to them is committed, each
    /// stamped now (so gc leaves it for the grace period). Blobs the cache holds are left
    /// out.
    pub fn record_on_demand(&self, blobs: &[(Digest, OnDemand)]) -> Result<(), CacheError> {
        let mut missing = Vec::new();
        for (d, from) in blobs {
            if self.blob_size(d)?.is_none() {
                missing.push((d, from));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let recorded = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let _lock = self.lock()?;
        self.edit_remote_locked(|all| {
            for (d, from) in missing {
                let from = OnDemand {
                    recorded,
                    ..from.clone()
                };
                all.insert(d.clone(), from);
            }
            true
        })
    }

    /// Changes the record under the writer lock (held by the caller); `edit` says whether
    /// it changed anything (nothing is written otherwise).
    pub(super) fn edit_remote_locked(
        &self,
        edit: impl FnOnce(&mut BTreeMap<Digest, OnDemand>) -> bool,
    ) -> Result<(), CacheError> {
        let mut all = self.on_demand_all()?;
        if edit(&mut all) {
            let path = self.remote_path();
            let bytes = serde_json::to_vec_pretty(&all)
                .map_err(|e| CacheError::io(&path)(io::Error::other(e)))?;
            let dir = self.root.join(".kiln");
            fs::create_dir_all(&dir).map_err(CacheError::io(&dir))?;
            write_atomic(&dir, REMOTE_FILE, &bytes)?;
        }
        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(all));
        self.remote_changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Lands a manifest or index that a [`BlobSource`] fetched on demand as `from` says:
    /// verified by digest and size, then the blobs it names are made safe (those here
    /// leased from gc, as a manifest PUT does; the others recorded on demand from the
    /// same place, durably), and only then is it written, so the cache never holds a
    /// document naming a blob that is neither here nor recorded.
    pub fn land_document(
        &self,
        bytes: &[u8],
        digest: &Digest,
        from: &OnDemand,
    ) -> Result<(), CacheError> {
        let actual = Digest::from_sha256_bytes(&Sha256::digest(bytes).into());
        if actual != *digest {
            return Err(CacheError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        if bytes.len() as u64 != from.size {
            return Err(CacheError::SizeMismatch {
                expected: from.size,
                actual: bytes.len() as u64,
            });
        }
        let doc: AnyManifest =
            serde_json::from_slice(bytes).map_err(|source| CacheError::Json {
                path: self.blob_path(digest),
                source,
            })?;
        let mut missing = Vec::new();
        for c in doc.children() {
            // A blob here may be old garbage to gc: the lease keeps it (gc checks the
            // mtime again before it removes a blob); one gone meanwhile is recorded.
            if self.touch_blob(&c.digest)?.is_some() {
                continue;
            }
            let is_doc = is_document(&c.media_type);
            let child = OnDemand {
                size: c.size,
                media_type: is_doc.then(|| c.media_type.clone()),
                ..from.clone()
            };
            missing.push((c.digest.clone(), child));
        }
        self.record_on_demand(&missing)?;
        let mut w = self.blob_writer()?;
        w.write_bytes(bytes)?;
        w.finish(Some(digest), Some(from.size))?;
        Ok(())
    }

    /// Wakes when the blobs on demand change (recorded, fetched, forgotten).
    pub fn on_demand_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.remote_changed.subscribe()
    }

    /// The blobs on demand still missing and their bytes, from the record as this
    /// process last read or wrote it (for the dashboard: a stat per entry).
    pub fn on_demand_totals(&self) -> Result<(u64, u64), CacheError> {
        let known = self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let all = match known {
            Some(all) => all,
            None => Arc::new(self.on_demand_all()?),
        };
        let mut totals = (0, 0);
        for (d, from) in all.iter() {
            if self.blob_size(d)?.is_none() {
                totals.0 += 1;
                totals.1 += from.size;
            }
        }
        Ok(totals)
    }

    /// Makes a blob local: a blob on demand is fetched from where the record says (once,
    /// however many ask), verified, and its entry dropped. Returns its size, or `None`
    /// when the cache neither holds nor records it.
    pub async fn ensure_blob(self: &Arc<Self>, digest: &Digest) -> Result<Option<u64>, CacheError> {
        let Some(from) = self.on_demand(digest)? else {
            return self.blob_size(digest);
        };
        let fail = |detail: String| {
            CacheError::OnDemand(Box::new(OnDemandFailure {
                digest: digest.clone(),
                image: from.image.clone(),
                upstream: from.upstream.clone(),
                detail,
            }))
        };
        let Some(source) = self.source.get() else {
            return Err(fail("kilnd has no upstream to fetch it from".into()));
        };
        source.fetch(self, digest, &from).await.map_err(&fail)?;
        let size = self
            .blob_size(digest)?
            .ok_or_else(|| fail("the upstream's copy did not land".into()))?;
        let cache = Arc::clone(self);
        let d = digest.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            let _lock = cache.lock()?;
            cache.edit_remote_locked(|all| all.remove(&d).is_some())
        })
        .await;
        match dropped {
            Ok(Ok(())) => {}
            // The blob is local either way; a stale entry is dropped by gc.
            Ok(Err(e)) => tracing::warn!("cannot drop {digest} from the blobs on demand: {e}"),
            Err(e) => tracing::warn!("dropping {digest} from the blobs on demand stopped: {e}"),
        }
        Ok(Some(size))
    }

    /// Makes every blob `desc` reaches local (see [`Cache::ensure_blob`]); returns the
    /// bytes fetched. A blob neither held nor recorded is [`CacheError::BlobUnknown`].
    pub async fn ensure_graph(self: &Arc<Self>, desc: &Descriptor) -> Result<u64, CacheError> {
        let mut fetched = 0;
        let mut stack = vec![desc.clone()];
        let mut seen = std::collections::HashSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            if self.blob_size(&d.digest)?.is_none() {
                match self.ensure_blob(&d.digest).await? {
                    Some(size) => fetched += size,
                    None => return Err(CacheError::BlobUnknown(d.digest.clone())),
                }
            }
            if is_document(&d.media_type) {
                let bytes = self.read_blob(&d.digest, MANIFEST_LIMIT)?;
                let doc: AnyManifest =
                    serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
                        path: self.blob_path(&d.digest),
                        source,
                    })?;
                stack.extend(doc.children().cloned());
            }
        }
        Ok(fetched)
    }

    /// The blobs on demand that are still missing (what `stats` and `fsck` show).
    pub fn missing_on_demand(&self) -> Result<BTreeMap<Digest, OnDemand>, CacheError> {
        let mut missing = BTreeMap::new();
        for (d, from) in self.on_demand_all()? {
            if self.blob_size(&d)?.is_none() {
                missing.insert(d, from);
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests;
