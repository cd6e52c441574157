//! The refs journal, `.kiln/refs.journal`: reference changes committed since
//! `index.json` was last written whole, so that a landing costs what it adds (one small
//! append and one fsync) and not a rewrite of an index that grows with the cache.
//!
//! The cache's references are `index.json` with the journal's records applied in order.
//! Each record is one committed batch of changes, one line:
//! `<sha256 hex of the JSON> <JSON>\n`, the JSON an array of `[name, descriptor]` (set)
//! and `[name, null]` (removed). A record counts only once whole and matching its hash:
//! a crash in the middle of an append leaves a torn last line, which readers ignore (it
//! was never acknowledged: its writer had not returned from the fsync) and the next
//! writer cuts off before appending.
//!
//! Folding writes `index.json` whole (atomically, as before) and then replaces the
//! journal with an empty one (a new file renamed into place, so a reader of another
//! process that still holds the old one knows by its inode). A crash between the two
//! leaves a journal whose records `index.json` already holds; replaying them again
//! changes nothing, since a record sets or removes names outright. `index.json` is thus
//! always a complete, valid OCI image layout index of some recent state: LinuxKit and
//! skopeo read it as they always did, and kilnd folds after a moment of quiet, when the
//! journal has grown to a share of the index, when another writer (LinuxKit) has
//! rewritten `index.json`, and when it stops.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::CacheError;
use crate::oci::Descriptor;

/// The journal's file name under `.kiln/`.
pub(super) const JOURNAL_FILE: &str = "refs.journal";

/// One name's change: set to a descriptor, or removed (`None`).
pub type Edit = (String, Option<Descriptor>);

/// The records read from a journal, and where the whole ones end.
#[derive(Debug, Default)]
pub(super) struct Records {
    pub edits: Vec<Edit>,
    pub records: u64,
    /// Bytes of whole, valid records from where reading started.
    pub valid: u64,
    /// Whether something that is not a whole record follows them.
    pub torn: bool,
}

/// Encodes one record (a line, with its newline).
pub(super) fn encode(edits: &[Edit], path: &Path) -> Result<Vec<u8>, CacheError> {
    let json = serde_json::to_vec(edits).map_err(|source| CacheError::Json {
        path: path.to_owned(),
        source,
    })?;
    let mut line = hex::encode(Sha256::digest(&json)).into_bytes();
    line.push(b' ');
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// Decodes the whole, valid records of `bytes`, in order; stops at the first line that
/// is not one (a torn append).
pub(super) fn decode(bytes: &[u8]) -> Records {
    let mut read = Records::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(len) = bytes[at..].iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = &bytes[at..at + len];
        let Some(edits) = decode_line(line) else {
            break;
        };
        read.edits.extend(edits);
        read.records += 1;
        at += len + 1;
    }
    read.valid = at as u64;
    read.torn = at < bytes.len();
    read
}

fn decode_line(line: &[u8]) -> Option<Vec<Edit>> {
    let (sum, json) = (line.get(..64)?, line.get(65..)?);
    if line.get(64) != Some(&b' ') || hex::encode(Sha256::digest(json)).as_bytes() != sum {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// The journal as found on disk: its inode and size (what identifies its version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    pub ino: u64,
    pub size: u64,
}

impl FileId {
    pub fn of(m: &fs::Metadata) -> Self {
        FileId {
            ino: m.ino(),
            size: m.size(),
        }
    }
}

/// Stats the journal; `None` when there is none.
pub(super) fn stat(path: &Path) -> Result<Option<FileId>, CacheError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(FileId::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::io(path)(e)),
    }
}

/// Reads the journal from byte `from` on: its records there, and the file as read.
pub(super) fn read_from(path: &Path, from: u64) -> Result<Option<(Records, FileId)>, CacheError> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io(path)(e)),
    };
    let mut bytes = Vec::new();
    let id = (|| {
        file.seek(SeekFrom::Start(from))?;
        file.read_to_end(&mut bytes)?;
        // The size is what was read, not what the file may have grown to meanwhile.
        let m = file.metadata()?;
        Ok::<_, io::Error>(FileId {
            ino: m.ino(),
            size: from + bytes.len() as u64,
        })
    })()
    .map_err(CacheError::io(path))?;
    Ok(Some((decode(&bytes), id)))
}

/// The journal open for appending, by the writer that holds the cache's lock.
#[derive(Debug)]
pub(super) struct Appender {
    file: fs::File,
    ino: u64,
}

impl Appender {
    /// Opens (creating it, durably, if missing) the journal at `path`.
    pub fn open(path: &Path) -> Result<Appender, CacheError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let existed = path.exists();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(CacheError::io(path))?;
        if !existed {
            file.sync_all().map_err(CacheError::io(path))?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(CacheError::io(dir))?;
        }
        let ino = file.metadata().map_err(CacheError::io(path))?.ino();
        Ok(Appender { file, ino })
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Writes `record` at `at` (the end of the whole records: a torn tail after them is
    /// cut off first) and makes it durable. Returns the new end.
    pub fn append(
        &self,
        at: u64,
        size: u64,
        record: &[u8],
        path: &Path,
    ) -> Result<u64, CacheError> {
        let written = (|| {
            if size > at {
                self.file.set_len(at)?;
            }
            self.file.write_all_at(record, at)?;
            self.file.sync_data()
        })();
        if let Err(e) = written {
            // Not acknowledged: take it back, so no reader counts it.
            let _ = self.file.set_len(at);
            return Err(CacheError::io(path)(e));
        }
        Ok(at + record.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::OCI_MANIFEST;
    use kiln_shared::digest::Digest;

    fn edit(name: &str, n: u8) -> Edit {
        let d = Digest::from_sha256_bytes(&[n; 32]);
        (name.to_owned(), Some(Descriptor::new(OCI_MANIFEST, d, 2)))
    }

    #[test]
    fn records_round_trip_and_a_torn_or_damaged_tail_is_ignored() {
        let p = Path::new("j");
        let one = encode(&[edit("docker.io/a/b:1", 1)], p).unwrap();
        let two = encode(
            &[edit("docker.io/a/b:2", 2), ("docker.io/a/b:1".into(), None)],
            p,
        )
        .unwrap();
        let mut bytes = [one.clone(), two.clone()].concat();
        let read = decode(&bytes);
        assert_eq!((read.records, read.edits.len(), read.torn), (2, 3, false));
        assert_eq!(read.valid, bytes.len() as u64);
        assert_eq!(read.edits[2], ("docker.io/a/b:1".to_owned(), None));

        // A crash in the middle of the second append.
        let torn = &bytes[..one.len() + two.len() / 2];
        let read = decode(torn);
        assert_eq!(
            (read.records, read.valid, read.torn),
            (1, one.len() as u64, true)
        );

        // A flipped byte in a whole line: that line and what follows do not count.
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        let read = decode(&bytes);
        assert_eq!(
            (read.records, read.valid, read.torn),
            (1, one.len() as u64, true)
        );
    }
}
