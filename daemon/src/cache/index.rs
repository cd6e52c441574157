//! `index.json`: the named references of the cache, read through an in-memory view that is
//! reloaded only when the file changes, and written only under the writer lock.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{ImageRef, Tag};

use super::{Cache, CacheError};
use crate::oci::{
    ANNOTATION_REF_NAME, AnyManifest, Descriptor, ImageIndex, OCI_INDEX, Platform, is_index,
};

/// Index and manifest documents are small; anything above this is refused when read into
/// memory.
pub const MANIFEST_LIMIT: u64 = 4 * 1024 * 1024;

/// What identifies one version of `index.json` on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileKey {
    fn of(m: &fs::Metadata) -> Self {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// A parsed `index.json` with its references by name.
#[derive(Debug)]
pub struct IndexView {
    key: Option<FileKey>,
    index: ImageIndex,
    by_name: HashMap<String, usize>,
}

impl IndexView {
    pub(super) fn empty() -> Self {
        IndexView {
            key: None,
            index: ImageIndex::new(),
            by_name: HashMap::new(),
        }
    }

    fn new(index: ImageIndex, key: Option<FileKey>) -> Self {
        IndexView {
            key,
            by_name: IndexView::names_of(&index),
            index,
        }
    }

    fn names_of(index: &ImageIndex) -> HashMap<String, usize> {
        index
            .manifests
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.ref_name().map(|n| (n.to_owned(), i)))
            .collect()
    }

    /// The whole index.
    pub fn index(&self) -> &ImageIndex {
        &self.index
    }

    /// The position of each named reference in the index.
    pub(super) fn names(&self) -> &HashMap<String, usize> {
        &self.by_name
    }

    /// How many named references the index holds.
    pub fn ref_count(&self) -> usize {
        self.by_name.len()
    }

    /// The descriptor a full reference name (`docker.io/org/image:tag`) points at.
    pub fn get(&self, name: &str) -> Option<&Descriptor> {
        self.by_name.get(name).map(|&i| &self.index.manifests[i])
    }

    /// Every (name, descriptor) pair, in index order.
    pub fn refs(&self) -> impl Iterator<Item = (&str, &Descriptor)> {
        self.index
            .manifests
            .iter()
            .filter_map(|d| d.ref_name().map(|n| (n, d)))
    }
}

impl Cache {
    /// The current `index.json`, re-read only if the file changed since last time (a stat
    /// per call), so other processes' writes (LinuxKit's too) are seen.
    pub fn index(&self) -> Result<Arc<IndexView>, CacheError> {
        let path = self.root.join("index.json");
        let meta = fs::metadata(&path).map_err(CacheError::io(&path))?;
        let key = FileKey::of(&meta);
        {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            if view.key == Some(key) {
                return Ok(Arc::clone(&view));
            }
        }
        let (index, key) = self.read_index_file()?;
        let mut slot = self.view.write().unwrap_or_else(|p| p.into_inner());
        let view = Arc::new(IndexView::new(index, Some(key)));
        *slot = Arc::clone(&view);
        Ok(view)
    }

    fn read_index_file(&self) -> Result<(ImageIndex, FileKey), CacheError> {
        let path = self.root.join("index.json");
        // Open once and stat the open file, so the key belongs to the bytes read even if
        // a writer renames a new file into place meanwhile.
        let file = fs::File::open(&path).map_err(CacheError::io(&path))?;
        let meta = file.metadata().map_err(CacheError::io(&path))?;
        let bytes = io::read_to_string(file).map_err(CacheError::io(&path))?;
        let index: ImageIndex =
            serde_json::from_str(&bytes).map_err(|source| CacheError::Json {
                path: path.clone(),
                source,
            })?;
        Ok((index, FileKey::of(&meta)))
    }

    /// Writes `index` as `index.json`; the caller holds the writer lock. The new index
    /// is served only once it is durable (synced, renamed into place, the directory
    /// synced): a reader of this process or another sees the old index until then and
    /// the new one after, never one that a crash could still take back. A push is
    /// acknowledged after this returns, so an acknowledged reference survives a crash.
    pub(super) fn write_index(&self, index: ImageIndex) -> Result<(), CacheError> {
        let by_name = IndexView::names_of(&index);
        self.write_index_with(index, by_name)
    }

    /// As [`Cache::write_index`], with the name map already made (the group commit
    /// keeps it up to date as it applies changes).
    pub(super) fn write_index_with(
        &self,
        index: ImageIndex,
        by_name: HashMap<String, usize>,
    ) -> Result<(), CacheError> {
        use std::io::Write;
        let path = self.root.join("index.json");
        let bytes = serde_json::to_vec(&index).map_err(|source| CacheError::Json {
            path: path.clone(),
            source,
        })?;
        let tmp = self
            .root
            .join(format!(".index.json.tmp-{}", std::process::id()));
        let durable = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            // Renaming keeps the inode, size and mtime: the key the file will have.
            let key = FileKey::of(&file.metadata()?);
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.root)?.sync_all()?;
            Ok::<_, io::Error>(key)
        })();
        match durable {
            Ok(key) => {
                *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(IndexView {
                    key: Some(key),
                    index,
                    by_name,
                });
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(CacheError::io(&path)(e))
            }
        }
    }

    /// Rewrites `index.json` whole, for a caller that holds the writer lock and changes
    /// many references at once (gc, fsck): reads the file afresh, applies `f`, checks
    /// that every descriptor names a blob on disk, and replaces the file atomically. If
    /// `f` fails, nothing is written. Writers of a few references use
    /// [`Cache::update_refs`], which groups them.
    pub fn update_index_locked<R>(
        &self,
        f: impl FnOnce(&mut ImageIndex) -> Result<R, CacheError>,
    ) -> Result<R, CacheError> {
        let (mut index, _) = self.read_index_file()?;
        let result = f(&mut index)?;
        for d in &index.manifests {
            if self.blob_size(&d.digest)?.is_none() {
                return Err(CacheError::DanglingReference {
                    name: d.ref_name().unwrap_or("<unnamed>").to_owned(),
                    digest: d.digest.clone(),
                });
            }
        }
        self.write_index(index)?;
        Ok(result)
    }

    /// Points the full reference `name` at `desc` (replacing what it named before).
    pub fn set_ref(&self, name: &str, desc: Descriptor) -> Result<(), CacheError> {
        let name = name.to_owned();
        self.update_refs(move |edit| edit.set(&name, desc))
    }

    /// Removes the reference `name`; returns whether it existed.
    pub fn remove_ref(&self, name: &str) -> Result<bool, CacheError> {
        let name = name.to_owned();
        self.update_refs(move |edit| Ok::<_, CacheError>(edit.remove(&name)))
    }

    /// Reads and parses a manifest or index blob.
    pub fn read_manifest(&self, digest: &Digest) -> Result<AnyManifest, CacheError> {
        let bytes = self.read_blob(digest, MANIFEST_LIMIT)?;
        serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
            path: self.blob_path(digest),
            source,
        })
    }

    /// Lands one architecture's image of a package: `image:tag-<arch>` names `manifest`,
    /// and the multi-arch index `image:tag` gains it, replacing the entry of the same
    /// os/architecture/variant. Entries are kept sorted by platform so the same set of
    /// images always gives the same index digest. With `dev`, the repository's moving tag
    /// names the new index too, in the same commit. Returns the new index's descriptor.
    pub fn merge_arch(
        &self,
        image: &ImageRef,
        arch_suffix: &str,
        platform: Platform,
        manifest: Descriptor,
        dev: Option<&Tag>,
    ) -> Result<Descriptor, CacheError> {
        let index_name = image.cache_name();
        let arch_name = format!("{index_name}-{arch_suffix}");
        let dev_name = dev.map(|t| ImageRef::new(image.repo.clone(), t.clone()).cache_name());
        let mut entry = manifest;
        entry.annotations.remove(ANNOTATION_REF_NAME);
        entry.platform = Some(platform.clone());
        // Merge into the index as served now, before taking a place in the commit (the
        // blob write is the slow part); the commit merges again only if a concurrent
        // landing of the same tag changed it meanwhile.
        let base = self.index()?.get(&index_name).cloned();
        let merged = merge_into(self, base.as_ref(), &entry, &platform)?;
        self.update_refs(move |edit| {
            let now = edit.get(&index_name).cloned();
            let index_desc = if now.as_ref().map(|d| &d.digest) == base.as_ref().map(|d| &d.digest)
            {
                merged
            } else {
                merge_into(edit.cache(), now.as_ref(), &entry, &platform)?
            };
            edit.set(&arch_name, entry)?;
            edit.set(&index_name, index_desc.clone())?;
            if let Some(dev_name) = dev_name {
                edit.set(&dev_name, index_desc.clone())?;
            }
            Ok(index_desc)
        })
    }
}

/// Writes the multi-arch index that `base` (an index blob, if any) becomes once it holds
/// `entry` in `platform`'s slot, and returns its descriptor.
fn merge_into(
    cache: &Cache,
    base: Option<&Descriptor>,
    entry: &Descriptor,
    platform: &Platform,
) -> Result<Descriptor, CacheError> {
    let mut image_index = match base {
        Some(d) if is_index(&d.media_type) => {
            let bytes = cache.read_blob(&d.digest, MANIFEST_LIMIT)?;
            serde_json::from_slice::<ImageIndex>(&bytes).map_err(|source| CacheError::Json {
                path: cache.blob_path(&d.digest),
                source,
            })?
        }
        _ => ImageIndex::new(),
    };
    image_index
        .manifests
        .retain(|d| !d.platform.as_ref().is_some_and(|p| p.same_slot(platform)));
    image_index.manifests.push(entry.clone());
    image_index
        .manifests
        .sort_by(|a, b| a.platform.cmp(&b.platform));
    let bytes = serde_json::to_vec(&image_index).map_err(|source| CacheError::Json {
        path: cache.root.join("index.json"),
        source,
    })?;
    let digest = cache.put_blob(&bytes)?;
    Ok(Descriptor::new(OCI_INDEX, digest, bytes.len() as u64))
}
