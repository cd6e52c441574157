//! The cache: one OCI image-layout directory, shareable with LinuxKit's
//! `~/.linuxkit/cache`.
//!
//! Layout: `oci-layout`, `index.json`, `blobs/sha256/<hex>`, plus kiln's own scratch space
//! under `.kiln/` (temp files of writes in progress). Invariants, which every write keeps
//! and `fsck` checks:
//! - a blob file's name is the sha256 of its bytes: blobs are written to a temp file,
//!   verified, fsynced and renamed into place, and the directory is fsynced;
//! - the references are `index.json` with the refs journal (`.kiln/refs.journal`)
//!   applied: a commit appends one record to the journal and fsyncs it; `index.json` is
//!   replaced atomically (write a temp file, fsync, rename, fsync the directory) when the
//!   journal is folded into it, and so always holds a complete, recent state that other
//!   tools read (see [`journal`]);
//! - the references never name a blob that is not on disk: a blob is durable before a
//!   record or an index names it;
//!   the one exception is a blob on demand: a manifest, config or layer of a target
//!   fetched lazily from an upstream, recorded in `.kiln/remote.json` (durably, before
//!   anything on disk names it) and fetched on first read through
//!   [`Cache::ensure_blob`] (see `ondemand`). What a manifest on demand names is
//!   recorded when it lands;
//! - writers of `index.json` and the journal hold a POSIX `fcntl` lock on
//!   `<cache>/.lock`, as LinuxKit does, so both tools can share one cache.
//!
//! A crash at any instant therefore leaves the old state or the new one, plus at most some
//! temp files of the dead writer (under `.kiln/tmp`, `.index.json.tmp-<pid>`), which
//! kilnd removes when it starts and `fsck` reports as a warning (see [`leftovers`]), and
//! at most a torn last journal record, which was never acknowledged and counts for nothing.
//!
//! What a reader sees, and when a write counts as done:
//! - a blob is visible under its digest only once its bytes are verified and durable;
//! - a reference (a tag pushed, a build landed) is visible to this process's readers only
//!   once the journal record or the `index.json` holding it is durable: the in-memory
//!   view takes the change after the fsync. There is no window in which a pull sees a
//!   tag that a crash would lose. (Another process that reads the files while this one
//!   writes may see a record up to one fsync early.);
//! - a manifest PUT answers 201 after that, so an acknowledged push survives a crash;
//! - reference changes are grouped ([`commit`]): writers that arrive while a commit is
//!   on its way to disk share the next one, and each is acknowledged only once durable;
//!   a commit costs what it changes (an append to the journal, a persistent map), not
//!   the size of the index;
//! - gc and writers agree through the writer lock and blob mtimes (see [`gc`]): what a
//!   writer checked under the lock stays until the index names it, and a blob a client
//!   HEADed or mounted is leased for the grace period.
//!
//! Maintenance lives beside the core: `fsck` (checks and repairs), `gc` (mark and sweep,
//! LRU under a size cap, using `.kiln/trash/` to remove blobs safely), `usage` (last use
//! of each reference, `.kiln/usage.json`), `pushes` (pushes to upstreams still owed,
//! `.kiln/pushes.json`), `ondemand` (blobs left upstream, `.kiln/remote.json`: fsck
//! counts them apart, gc forgets those no reference reaches, stats show their bytes
//! apart) and `stats` (sizes for the dashboard).

mod blob;
mod commit;
mod dev;
mod fsck;
mod gc;
mod import;
mod index;
mod journal;
mod leftovers;
mod lock;
mod ondemand;
mod pushes;
mod stats;
mod usage;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use kiln_shared::digest::Digest;

pub use blob::BlobWriter;
pub use commit::RefEdit;
pub use dev::point_dev;
pub use fsck::{BadReference, CorruptBlob, FsckReport, Problem, fsck};
pub use gc::{DEFAULT_GRACE, GcOptions, GcReport, SizeError, gc, parse_size};
pub use index::{IndexView, MANIFEST_LIMIT};
pub use leftovers::Leftover;
pub use lock::CacheLock;
pub use ondemand::{BlobSource, OnDemand, OnDemandFailure};
pub use stats::{CacheStats, stats};

use crate::oci::OCI_LAYOUT_VERSION;

/// What went wrong in the cache, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache {path} is not an OCI image layout: {reason}")]
    NotALayout { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("blob {0} is not in the cache")]
    BlobUnknown(Digest),
    #[error("blob {digest} is {size} bytes, more than the {limit} bytes kiln reads into memory")]
    BlobTooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("index.json would name {digest} ({name}), which is not in the cache")]
    DanglingReference { name: String, digest: Digest },
    #[error(
        "blob {} of {} is on demand from {}, which cannot give it: {}; run `kiln pull {}` \
         when the upstream is back, or build it here with `kiln build --force {}`",
        .0.digest, .0.image, .0.upstream, .0.detail, .0.image, .0.image
    )]
    OnDemand(Box<OnDemandFailure>),
    #[error("blob writer already finished")]
    WriterFinished,
    #[error("{layout} has no reference {reference:?} (it has: {has})")]
    NoSuchRef {
        layout: PathBuf,
        reference: String,
        has: String,
    },
    #[error("a blob hashing thread panicked")]
    HashThreadPanicked,
    /// A reference that is not what its user needs (upstream's push of a name).
    #[error("{0}")]
    Invalid(String),
    #[error(
        "gc could not drop references: index.json names {digest} ({name}), which is not in \
         the cache; nothing was removed. Run `kiln fsck --repair` first."
    )]
    GcDangling { name: String, digest: Digest },
    #[error(
        "gc stopped: cannot follow the references of {digest}: {source}. Run `kiln fsck \
         --repair` first."
    )]
    GcUnfollowable {
        digest: Digest,
        #[source]
        source: Box<CacheError>,
    },
}

impl CacheError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io { path, source }
    }
}

/// An open cache directory. Cheap to share (`Arc<Cache>`); all methods take `&self`.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    /// fcntl locks belong to the process, not the thread: this mutex serialises the
    /// writers inside this process, the fcntl lock those of other processes.
    writers: Mutex<()>,
    view: RwLock<Arc<IndexView>>,
    /// Held (written) by this process's writer while it changes `index.json` or the refs
    /// journal on disk, until the new view is swapped in: readers that find the files
    /// changed meanwhile serve the view before the write instead of reading a change
    /// that is not durable yet.
    disk_guard: RwLock<()>,
    /// Held by the reader that re-reads the files (see [`Cache::index`]).
    refreshing: Mutex<()>,
    /// The refs journal, open for appending (see [`journal`]).
    appender: Mutex<Option<journal::Appender>>,
    /// The last epoch given to a view (see [`IndexView::epoch`]).
    epochs: AtomicU64,
    /// Bumped on every commit of references (for kilnd's fold after a quiet moment).
    refs_committed: tokio::sync::watch::Sender<u64>,
    /// New blobs written by this process, for the cache's size without a rescan.
    added: Arc<blob::Added>,
    /// The writers waiting for the next commit of `index.json` (see [`commit`]).
    group: commit::Group,
    /// When each reference was last used (LRU for gc), kept in memory until flushed.
    usage: usage::Usage,
    /// The blobs on demand (`.kiln/remote.json`), as last read or written; `None` until
    /// first needed.
    remote: Mutex<Option<Arc<BTreeMap<Digest, OnDemand>>>>,
    /// Where blobs on demand come from (see [`ondemand`]).
    source: OnceLock<Arc<dyn BlobSource>>,
    /// Bumped on every change of the blobs on demand (for the dashboard's figures).
    remote_changed: tokio::sync::watch::Sender<u64>,
}

impl Cache {
    /// Opens the cache at `root`, creating an empty layout if the directory is missing or
    /// empty. A directory that holds something else is refused.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(CacheError::io(root))?;
        let root = fs::canonicalize(root).map_err(CacheError::io(root))?;
        let layout = root.join("oci-layout");
        match fs::read(&layout) {
            Ok(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
                        path: layout.clone(),
                        source,
                    })?;
                if v.get("imageLayoutVersion")
                    .and_then(|v| v.as_str())
                    .is_none()
                {
                    return Err(CacheError::NotALayout {
                        path: root,
                        reason: "oci-layout has no imageLayoutVersion".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let foreign = fs::read_dir(&root)
                    .map_err(CacheError::io(&root))?
                    .filter_map(Result::ok)
                    .any(|e| {
                        let n = e.file_name();
                        !matches!(n.to_str(), Some("blobs" | "index.json" | ".kiln" | ".lock"))
                    });
                if foreign {
                    return Err(CacheError::NotALayout {
                        path: root,
                        reason: "the directory is not empty and has no oci-layout file; \
                                 choose an empty or new directory with --cache"
                            .into(),
                    });
                }
                let body = format!("{{\"imageLayoutVersion\":\"{OCI_LAYOUT_VERSION}\"}}");
                write_atomic(&root, "oci-layout", body.as_bytes())?;
            }
            Err(e) => return Err(CacheError::io(&layout)(e)),
        }
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join(".kiln").join("tmp");
        fs::create_dir_all(&blobs).map_err(CacheError::io(&blobs))?;
        fs::create_dir_all(&tmp).map_err(CacheError::io(&tmp))?;
        let cache = Cache {
            view: RwLock::new(Arc::new(IndexView::empty())),
            root,
            blobs,
            tmp,
            writers: Mutex::new(()),
            disk_guard: RwLock::new(()),
            refreshing: Mutex::new(()),
            appender: Mutex::new(None),
            epochs: AtomicU64::new(0),
            refs_committed: tokio::sync::watch::Sender::new(0),
            group: commit::Group::default(),
            added: Arc::default(),
            usage: usage::Usage::default(),
            remote: Mutex::default(),
            source: OnceLock::new(),
            remote_changed: tokio::sync::watch::Sender::new(0),
        };
        if !cache.root.join("index.json").exists() {
            let _lock = cache.lock()?;
            if !cache.root.join("index.json").exists() {
                cache.write_index(crate::oci::ImageIndex::new())?;
            }
        }
        cache.index()?;
        Ok(cache)
    }

    /// The cache directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where kiln keeps temp files of writes in progress (same filesystem as the blobs).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The directory holding `sha256` blobs.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    /// The path of a blob, whether or not it exists.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// The size of a blob, or `None` if the cache does not hold it.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, CacheError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io(path)(e)),
        }
    }

    /// Leases a blob from gc: refreshes its mtime, so gc's grace period protects it
    /// again (a client that saw it with HEAD or mounted it is about to reference it), and
    /// returns its size if it is still in place afterwards (see `blob.rs` for how this
    /// and gc's removal agree). `None`: the cache does not hold it.
    pub fn touch_blob(&self, digest: &Digest) -> Result<Option<u64>, CacheError> {
        if blob::refresh_existing(&self.blob_path(digest))? {
            self.blob_size(digest)
        } else {
            Ok(None)
        }
    }

    /// Reads a whole blob (a manifest, index or config) into memory; refuses blobs larger
    /// than `limit` bytes.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, CacheError> {
        let path = self.blob_path(digest);
        let size = self
            .blob_size(digest)?
            .ok_or_else(|| CacheError::BlobUnknown(digest.clone()))?;
        if size > limit {
            return Err(CacheError::BlobTooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        fs::read(&path).map_err(CacheError::io(path))
    }

    /// Starts writing a blob; see [`BlobWriter`].
    pub fn blob_writer(&self) -> Result<BlobWriter, CacheError> {
        BlobWriter::create(&self.tmp, &self.blobs, Arc::clone(&self.added))
    }

    /// Writes a whole blob held in memory and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, CacheError> {
        let mut w = self.blob_writer()?;
        w.write_bytes(bytes)?;
        w.finish(None, None)
    }

    /// The blobs (count, bytes) this process added to the cache since it opened it: with
    /// a [`stats`] taken at some point, what was added since (gc and other processes
    /// are not counted: measure again after a collection).
    pub fn blobs_added(&self) -> (u64, u64) {
        self.added.get()
    }

    /// Takes the cache's writer lock: the in-process mutex, then the fcntl lock on
    /// `<cache>/.lock`. Blocks until both are held.
    pub fn lock(&self) -> Result<CacheLock<'_>, CacheError> {
        CacheLock::acquire(&self.writers, &self.root.join(".lock"))
    }
}

/// Writes `dir/name` atomically: a temp file beside it, fsync, rename, fsync the
/// directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let target = dir.join(name);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(CacheError::io(target))
}

#[cfg(test)]
mod tests;
