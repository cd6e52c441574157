//! `index.json` and the refs journal: the named references of the cache, read through an
//! in-memory view that is re-read only when the files change, and written only under
//! the writer lock (a landing appends to the journal; see [`journal`]).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{ImageRef, Tag};

use super::{Cache, CacheError, journal};
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

/// The files a view was read from or written to: `index.json` and the refs journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskKey {
    index: FileKey,
    journal: Option<journal::FileId>,
}

/// The named references of the cache (`index.json` with the refs journal applied), as
/// one immutable version. Cheap to derive a changed version from: the map is persistent
/// (a change copies O(log n) of it, not the whole), so a landing costs what it changes.
#[derive(Debug, Clone)]
pub struct IndexView {
    /// `index.json`'s own fields (its `manifests` empty): kept as another writer left
    /// them, and written back.
    head: Arc<ImageIndex>,
    refs: imbl::OrdMap<String, Descriptor>,
    /// Entries without a reference name (kiln writes none; another tool may).
    unnamed: Arc<Vec<Descriptor>>,
    /// Versions read afresh from disk, or rewritten whole, get a new epoch; versions
    /// derived from another by changes keep its epoch (see [`IndexView::epoch`]).
    epoch: u64,
    disk: Option<DiskKey>,
    /// Where the journal's whole records end, and how many there are.
    journal_end: u64,
    journal_records: u64,
    /// Whether the journal ends in a torn record (a write cut short by a crash).
    journal_torn: bool,
    /// Read afresh from a file another writer changed (not derived from this process's
    /// writes): the next commit folds, so the journal never spans a foreign write.
    reloaded: bool,
}

impl IndexView {
    pub(super) fn empty() -> Self {
        IndexView {
            head: Arc::new(ImageIndex::new()),
            refs: imbl::OrdMap::new(),
            unnamed: Arc::default(),
            epoch: 0,
            disk: None,
            journal_end: 0,
            journal_records: 0,
            journal_torn: false,
            reloaded: false,
        }
    }

    /// The view of a whole index: named entries by name (the last of a repeated name
    /// wins, as LinuxKit's lookups do), unnamed ones kept apart.
    fn of_index(mut index: ImageIndex, epoch: u64) -> Self {
        let mut refs = imbl::OrdMap::new();
        let mut unnamed = Vec::new();
        for d in std::mem::take(&mut index.manifests) {
            match d.ref_name() {
                Some(n) => {
                    refs.insert(n.to_owned(), d);
                }
                None => unnamed.push(d),
            }
        }
        IndexView {
            head: Arc::new(index),
            refs,
            unnamed: Arc::new(unnamed),
            epoch,
            ..IndexView::empty()
        }
    }

    /// Applies changes in order.
    pub(super) fn apply(&mut self, edits: impl IntoIterator<Item = journal::Edit>) {
        for (name, edit) in edits {
            match edit {
                Some(d) => {
                    self.refs.insert(name, d);
                }
                None => {
                    self.refs.remove(&name);
                }
            }
        }
    }

    /// The whole index, as `index.json` holds it: named entries in name order, then
    /// the unnamed ones.
    pub fn to_image_index(&self) -> ImageIndex {
        let mut index = (*self.head).clone();
        index.manifests = self.entries().cloned().collect();
        index
    }

    /// Every entry: the named ones in name order, then the unnamed ones.
    pub fn entries(&self) -> impl Iterator<Item = &Descriptor> {
        self.refs.values().chain(self.unnamed.iter())
    }

    /// How many entries the index holds.
    pub fn entry_count(&self) -> usize {
        self.refs.len() + self.unnamed.len()
    }

    /// How many named references the index holds.
    pub fn ref_count(&self) -> usize {
        self.refs.len()
    }

    /// The descriptor a full reference name (`docker.io/org/image:tag`) points at.
    pub fn get(&self, name: &str) -> Option<&Descriptor> {
        self.refs.get(name)
    }

    /// Every (name, descriptor) pair, in name order.
    pub fn refs(&self) -> impl Iterator<Item = (&str, &Descriptor)> {
        self.refs.iter().map(|(n, d)| (n.as_str(), d))
    }

    /// The (name, descriptor) pairs whose names start with `prefix`, in name order.
    pub fn refs_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Descriptor)> + 'a {
        self.refs
            .range::<_, str>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(n, _)| n.starts_with(prefix))
            .map(|(n, d)| (n.as_str(), d))
    }

    /// The references by name, for comparing two versions: versions of one epoch share
    /// structure, so `a.ref_map().diff(b.ref_map())` costs what changed between them.
    pub fn ref_map(&self) -> &imbl::OrdMap<String, Descriptor> {
        &self.refs
    }

    /// The version's lineage: two views of one epoch are one derived from the other by
    /// reference changes only, so what changed between them is their [`ref_map`] diff.
    /// A new epoch (a file rewritten by another writer, gc or fsck rewriting the index)
    /// may also mean that blobs were removed: a reader that keeps more than the
    /// references (the registry keeps manifests) starts afresh.
    ///
    /// [`ref_map`]: IndexView::ref_map
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records in the journal that `index.json` does not hold yet.
    pub fn unfolded(&self) -> u64 {
        self.journal_records
    }

    /// Whether the journal ends in a torn record: a write a crash cut short, never
    /// acknowledged, which counts for nothing (the next commit or fold cuts it off).
    pub fn journal_torn(&self) -> bool {
        self.journal_torn
    }
}

/// Fold when the journal holds this many records, or half as many as the index has
/// references if that is more: folding (a whole write) then costs O(1) per landing,
/// amortized, and replaying the journal stays a fraction of reading the index.
const FOLD_RECORDS: u64 = 256;

impl Cache {
    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn journal_path(&self) -> PathBuf {
        self.root.join(".kiln").join(journal::JOURNAL_FILE)
    }

    fn current_view(&self) -> Arc<IndexView> {
        Arc::clone(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn stat_disk(&self) -> Result<DiskKey, CacheError> {
        let path = self.index_path();
        let meta = fs::metadata(&path).map_err(CacheError::io(&path))?;
        Ok(DiskKey {
            index: FileKey::of(&meta),
            journal: journal::stat(&self.journal_path())?,
        })
    }

    /// The current references: `index.json` and the refs journal, re-read only if they
    /// changed since last time (two stats per call), so other processes' writes
    /// (LinuxKit's too) are seen. While this process is writing them, the version before
    /// the write is served: a change is visible only once durable.
    pub fn index(&self) -> Result<Arc<IndexView>, CacheError> {
        let view = self.current_view();
        if view.disk == Some(self.stat_disk()?) {
            return Ok(view);
        }
        // A write of this process in progress holds the guard: what it wrote so far is
        // not durable yet, and the view it swaps in afterwards is the one to serve.
        let Ok(_reading) = self.disk_guard.try_read() else {
            return Ok(self.current_view());
        };
        self.refresh()
    }

    /// As [`Cache::index`], for the writer that holds the lock: waits for nothing (no
    /// other write can be in progress) and always reads what changed.
    pub(super) fn index_locked(&self) -> Result<Arc<IndexView>, CacheError> {
        let _reading = self.disk_guard.read().unwrap_or_else(|p| p.into_inner());
        self.refresh()
    }

    /// Brings the view up to the files, with the disk guard held (no write of this
    /// process in progress): reads only the journal's new records when `index.json` is
    /// unchanged and the journal only grew (another kilnd appended), everything
    /// otherwise.
    fn refresh(&self) -> Result<Arc<IndexView>, CacheError> {
        // One reader at a time reads the files: two that read at different moments could
        // otherwise swap in the older version last.
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.current_view();
        let disk = self.stat_disk()?;
        if view.disk == Some(disk) {
            return Ok(view);
        }
        let fresh = match (view.disk, disk.journal) {
            (Some(was), Some(now))
                if was.index == disk.index
                    && was
                        .journal
                        .is_some_and(|j| j.ino == now.ino && now.size > j.size) =>
            {
                self.read_tail(&view)?
            }
            _ => self.read_all()?,
        };
        let fresh = Arc::new(fresh);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    /// The view with the journal records appended after `view`'s.
    fn read_tail(&self, view: &IndexView) -> Result<IndexView, CacheError> {
        let path = self.journal_path();
        let Some((read, id)) = journal::read_from(&path, view.journal_end)? else {
            return self.read_all();
        };
        let mut next = view.clone();
        next.apply(read.edits);
        next.journal_end += read.valid;
        next.journal_records += read.records;
        next.journal_torn = read.torn;
        next.disk = view.disk.map(|d| DiskKey {
            journal: Some(id),
            ..d
        });
        Ok(next)
    }

    /// Reads `index.json` and replays the journal over it. `index.json` is read first and
    /// stat again after the journal: a fold by another process between the two (a new
    /// index, then an empty journal) would otherwise pair the old index with the new
    /// journal, so it is read again.
    fn read_all(&self) -> Result<IndexView, CacheError> {
        let path = self.index_path();
        let mut tries = 0;
        loop {
            let (index, key) = self.read_index_file()?;
            let journal = journal::read_from(&self.journal_path(), 0)?;
            let now = fs::metadata(&path).map_err(CacheError::io(&path))?;
            tries += 1;
            if FileKey::of(&now) != key && tries < 10 {
                continue;
            }
            let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            let mut view = IndexView::of_index(index, epoch);
            view.reloaded = true;
            let journal_id = journal.map(|(read, id)| {
                if read.torn {
                    tracing::warn!(
                        path = %self.journal_path().display(),
                        "the refs journal ends in a torn record (a write cut short); it \
                         is ignored, and cut off at the next write"
                    );
                }
                view.apply(read.edits);
                view.journal_end = read.valid;
                view.journal_records = read.records;
                view.journal_torn = read.torn;
                id
            });
            view.disk = Some(DiskKey {
                index: key,
                journal: journal_id,
            });
            return Ok(view);
        }
    }

    fn read_index_file(&self) -> Result<(ImageIndex, FileKey), CacheError> {
        let path = self.index_path();
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

    /// Commits `next` (derived from `base`, the view under the lock, by `edits`): one
    /// record appended to the journal and made durable, or a fold when one is due. The
    /// caller holds the writer lock. `next` is served once durable.
    pub(super) fn commit_refs(
        &self,
        base: &IndexView,
        mut next: IndexView,
        edits: &[journal::Edit],
    ) -> Result<(), CacheError> {
        let due = base.reloaded && base.journal_records > 0
            || base.journal_records + 1 >= FOLD_RECORDS.max(base.refs.len() as u64 / 2);
        if due {
            return self.fold_view(next);
        }
        let path = self.journal_path();
        let record = journal::encode(edits, &path)?;
        let _writing = self.disk_guard.write().unwrap_or_else(|p| p.into_inner());
        let mut appender = self.appender.lock().unwrap_or_else(|p| p.into_inner());
        let on_disk = base.disk.and_then(|d| d.journal);
        // The file open for appending must be the journal the view was read from (a
        // fold, here or in another process, replaces it).
        let file = match appender.take() {
            Some(a) if on_disk.is_some_and(|j| j.ino == a.ino()) => a,
            _ => journal::Appender::open(&path)?,
        };
        let (at, size) = match on_disk {
            Some(j) if j.ino == file.ino() => (base.journal_end, j.size),
            // A journal made just now (there was none).
            _ => (0, 0),
        };
        let end = file.append(at, size, &record, &path)?;
        next.journal_end = end;
        next.journal_records = base.journal_records + 1;
        next.journal_torn = false;
        next.reloaded = false;
        next.disk = base.disk.map(|d| DiskKey {
            journal: Some(journal::FileId {
                ino: file.ino(),
                size: end,
            }),
            ..d
        });
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        *appender = Some(file);
        drop(appender);
        self.refs_committed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Writes `view` as `index.json` whole and empties the journal; the caller holds the
    /// writer lock. The new files are served only once durable (synced, renamed into
    /// place, the directory synced): a reader of this process sees the old version until
    /// then, and a crash leaves the old files, or the new index with the old journal
    /// (whose records it holds already), or both new.
    fn fold_view(&self, mut view: IndexView) -> Result<(), CacheError> {
        use std::io::Write;
        let path = self.index_path();
        let bytes =
            serde_json::to_vec(&view.to_image_index()).map_err(|source| CacheError::Json {
                path: path.clone(),
                source,
            })?;
        let _writing = self.disk_guard.write().unwrap_or_else(|p| p.into_inner());
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
        let key = match durable {
            Ok(key) => key,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(CacheError::io(&path)(e));
            }
        };
        let journal = if self.journal_path().exists() || view.journal_records > 0 {
            super::write_atomic(&self.root.join(".kiln"), journal::JOURNAL_FILE, b"")?;
            journal::stat(&self.journal_path())?
        } else {
            None
        };
        view.disk = Some(DiskKey {
            index: key,
            journal,
        });
        view.journal_end = 0;
        view.journal_records = 0;
        view.journal_torn = false;
        view.reloaded = false;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
        Ok(())
    }

    /// Changes each time references are committed to the journal (for a fold once they
    /// are quiet).
    pub fn refs_committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.refs_committed.subscribe()
    }

    /// Folds the refs journal into `index.json` (see [`journal`]), if it holds anything:
    /// kilnd does it after a moment without landings and when it stops, and a one-off
    /// command before it exits, so that other tools see every reference in `index.json`.
    pub fn fold_refs(&self) -> Result<(), CacheError> {
        if self.index()?.journal_records == 0 {
            return Ok(());
        }
        let _lock = self.lock()?;
        self.folded_locked().map(drop)
    }

    /// The current references with the journal folded into `index.json` first, for gc,
    /// which holds the writer lock: a blob it removes must not be named by `index.json`
    /// either (a name removed in the journal is still in the file until a fold).
    pub(super) fn folded_locked(&self) -> Result<Arc<IndexView>, CacheError> {
        let view = self.index_locked()?;
        if view.journal_records == 0 && !view.journal_torn {
            return Ok(view);
        }
        self.fold_view((*view).clone())?;
        Ok(self.current_view())
    }

    /// Starts a new epoch of the current references, for gc after it removed blobs:
    /// readers that keep manifests beyond what the references name start afresh.
    pub(super) fn new_epoch(&self) -> Result<(), CacheError> {
        // Under the lock: no commit is deriving a version from the one replaced here.
        let _lock = self.lock()?;
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let mut slot = self.view.write().unwrap_or_else(|p| p.into_inner());
        let mut view = (**slot).clone();
        view.epoch = epoch;
        *slot = Arc::new(view);
        Ok(())
    }

    /// Rewrites `index.json` whole, for a caller that holds the writer lock and changes
    /// many references at once (gc, fsck): applies `f` to the current index (the file and
    /// the journal), checks that every descriptor names a blob on disk or on demand, and
    /// writes it as a fold does. If `f` fails, nothing is written. Writers of a few
    /// references use [`Cache::update_refs`], which groups them.
    pub fn update_index_locked<R>(
        &self,
        f: impl FnOnce(&mut ImageIndex) -> Result<R, CacheError>,
    ) -> Result<R, CacheError> {
        let mut index = self.index_locked()?.to_image_index();
        let result = f(&mut index)?;
        for d in &index.manifests {
            if !self.is_held(&d.digest)? {
                return Err(CacheError::DanglingReference {
                    name: d.ref_name().unwrap_or("<unnamed>").to_owned(),
                    digest: d.digest.clone(),
                });
            }
        }
        self.write_index(index)?;
        Ok(result)
    }

    /// Writes `index` as the whole new state (a new epoch: readers that keep more than
    /// the references start afresh); the caller holds the writer lock.
    pub(super) fn write_index(&self, index: ImageIndex) -> Result<(), CacheError> {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        self.fold_view(IndexView::of_index(index, epoch))
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
