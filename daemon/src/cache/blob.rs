//! Streaming blob writes: bytes go to a temp file inside the cache while their sha256 is
//! computed; only a verified, fsynced blob is renamed to `blobs/sha256/<hex>`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use super::CacheError;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// What this process added to `blobs/sha256` since the cache was opened: the new blobs
/// and their bytes (a blob that was there already is not counted). With one scan of the
/// directory this keeps the cache's size current without scanning it again per write.
#[derive(Debug, Default)]
pub(super) struct Added {
    blobs: AtomicU64,
    bytes: AtomicU64,
}

impl Added {
    /// (blobs, bytes) added so far.
    pub(super) fn get(&self) -> (u64, u64) {
        (
            self.blobs.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// The write buffer of an open writer.
const BUFFER: usize = 256 * 1024;

/// A blob being written. Dropping it unfinished removes its temp file.
///
/// Temp files are named `blob-<pid>-<n>` under `.kiln/tmp`, so `fsck` can tell the
/// leftovers of a dead process from the writes of a live one.
///
/// Between the chunks of a registry upload the writer is [parked](BlobWriter::park):
/// its file is closed (no descriptor, no buffer held while the client is away) and
/// reopened for the next write; only the hash state stays in memory.
#[derive(Debug)]
pub struct BlobWriter {
    /// The open temp file; `None` while parked (or once finished).
    file: Option<io::BufWriter<File>>,
    finished: bool,
    path: PathBuf,
    blobs: PathBuf,
    hasher: Sha256,
    size: u64,
    added: Arc<Added>,
}

impl BlobWriter {
    pub(super) fn create(tmp: &Path, blobs: &Path, added: Arc<Added>) -> Result<Self, CacheError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = tmp.join(format!("blob-{}-{n}", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(CacheError::io(&path))?;
        Ok(BlobWriter {
            file: Some(io::BufWriter::with_capacity(BUFFER, file)),
            finished: false,
            path,
            blobs: blobs.to_owned(),
            hasher: Sha256::new(),
            size: 0,
            added,
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The temp file being written.
    pub fn temp_path(&self) -> &Path {
        &self.path
    }

    /// Closes the temp file, keeping what was written and the hash state; the next
    /// write or [`BlobWriter::finish`] reopens it.
    pub fn park(&mut self) -> Result<(), CacheError> {
        if let Some(file) = self.file.take() {
            file.into_inner()
                .map_err(|e| CacheError::io(&self.path)(e.into_error()))?;
        }
        Ok(())
    }

    /// The open temp file, reopened (for appending) if parked.
    fn open(&mut self) -> Result<&mut io::BufWriter<File>, CacheError> {
        if self.finished {
            return Err(CacheError::WriterFinished);
        }
        if self.file.is_none() {
            let file = fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(CacheError::io(&self.path))?;
            self.file = Some(io::BufWriter::with_capacity(BUFFER, file));
        }
        self.file.as_mut().ok_or(CacheError::WriterFinished)
    }

    /// Appends bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.path.clone();
        let file = self.open()?;
        file.write_all(bytes).map_err(CacheError::io(path))?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// The digest of what was written so far, without finishing.
    pub fn current_digest(&self) -> Digest {
        Digest::from_sha256_bytes(&self.hasher.clone().finalize().into())
    }

    /// Verifies the digest (and size, when given), makes the blob durable and visible
    /// under its digest, and returns the digest. On any mismatch nothing becomes visible
    /// and the temp file is removed. A blob that already exists is kept (its mtime is
    /// refreshed, so a concurrent garbage collection sees it as new).
    pub fn finish(
        mut self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<Digest, CacheError> {
        self.open()?;
        let Some(file) = self.file.take() else {
            return Err(CacheError::WriterFinished);
        };
        self.finished = true;
        let actual = Digest::from_sha256_bytes(&self.hasher.clone().finalize().into());
        if let Some(expected_size) = expected_size
            && expected_size != self.size
        {
            return Err(CacheError::SizeMismatch {
                expected: expected_size,
                actual: self.size,
            });
        }
        if let Some(expected) = expected
            && *expected != actual
        {
            return Err(CacheError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let file = file
            .into_inner()
            .map_err(|e| CacheError::io(&self.path)(e.into_error()))?;
        let target = self.blobs.join(actual.hex());
        if refresh_existing(&target)? {
            return Ok(actual);
        }
        file.sync_all().map_err(CacheError::io(&self.path))?;
        drop(file);
        if !rename_new(&self.path, &target)? {
            // Another writer put the same bytes in place meanwhile: theirs is kept.
            return Ok(actual);
        }
        self.added.blobs.fetch_add(1, Ordering::Relaxed);
        self.added.bytes.fetch_add(self.size, Ordering::Relaxed);
        File::open(&self.blobs)
            .and_then(|d| d.sync_all())
            .map_err(CacheError::io(&self.blobs))?;
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Finished or not, the temp path is gone afterwards (renamed, or removed here).
        let _ = fs::remove_file(&self.path);
    }
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with `RENAME_NOREPLACE`, so two
/// writers of the same blob count it once); false when it existed. Filesystems without
/// the flag get a plain rename, which replaces the identical bytes.
fn rename_new(from: &Path, to: &Path) -> Result<bool, CacheError> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            fs::rename(from, to).map_err(CacheError::io(to))?;
            Ok(true)
        }
        Err(e) => Err(CacheError::io(to)(e.into())),
    }
}

/// Refreshes the mtime of an existing blob so a concurrent garbage collection keeps it,
/// and tells whether it is still in place afterwards. gc moves a blob to its trash before
/// deleting it and re-checks the mtime there: a touch that lands before that move is seen
/// by gc (which restores the blob), and a touch that lands after it is followed by the
/// check below, which then sees the blob gone and lets the caller install its own copy.
pub(super) fn refresh_existing(path: &Path) -> Result<bool, CacheError> {
    let f = match File::options().append(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(CacheError::io(path)(e)),
    };
    f.set_modified(std::time::SystemTime::now())
        .map_err(CacheError::io(path))?;
    drop(f);
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CacheError::io(path)(e)),
    }
}
