//! `kiln.lock`: a package's base images pinned by digest, as `Cargo.lock` and `go.sum`
//! pin dependencies. A `FROM` (or `COPY --from`) naming an image that is neither a
//! workspace package, nor written with a digest, nor imported from a layout by
//! `kiln.toml` is resolved through the upstreams once and recorded here; every later
//! build uses the recorded digest, offline too. The file lives in the package directory,
//! so the package's content tag covers it (`kiln show-tag` and LinuxKit's tree hash
//! alike): recording a new digest gives the package a new tag, and committing the file
//! makes a checkout build the same bases. Removing an entry (or the file) resolves that
//! image again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_shared::digest::Digest;
use serde::{Deserialize, Serialize};

/// The file name, in the package directory.
pub const LOCK_FILE: &str = "kiln.lock";

/// What goes at the top of the file.
const HEADER: &str = "\
# The base images of this package, pinned by digest. kiln writes this file: commit it.
# Remove an entry (or the file) to resolve that image again through the upstreams.
";

/// Why a lock file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}; fix the file or remove it to resolve the base images again")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "{path}: image {name:?}: {source}; fix the entry or remove it to resolve the image again"
    )]
    Digest {
        path: PathBuf,
        name: String,
        #[source]
        source: kiln_shared::digest::DigestError,
    },
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    images: BTreeMap<String, String>,
}

/// A package's pinned base images: the name as the Dockerfile writes it (after build
/// args, e.g. `busybox:1.36`) to the digest of what it named when it was resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lock {
    pub images: BTreeMap<String, Digest>,
}

impl Lock {
    /// The lock file of the package in `dir` (empty when there is none).
    pub fn read(dir: &Path) -> Result<Lock, LockError> {
        let path = dir.join(LOCK_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lock::default()),
            Err(source) => return Err(LockError::Io { path, source }),
        };
        let raw: Raw = toml::from_str(&text).map_err(|source| LockError::Parse {
            path: path.clone(),
            source,
        })?;
        let mut images = BTreeMap::new();
        for (name, digest) in raw.images {
            let digest = digest.parse().map_err(|source| LockError::Digest {
                path: path.clone(),
                name: name.clone(),
                source,
            })?;
            images.insert(name, digest);
        }
        Ok(Lock { images })
    }

    /// Writes the lock file into `dir`, atomically (a temp file renamed into place), so
    /// the watcher and the tagger see the old file or the new one.
    pub fn write(&self, dir: &Path) -> Result<(), LockError> {
        let path = dir.join(LOCK_FILE);
        let raw = Raw {
            images: self
                .images
                .iter()
                .map(|(n, d)| (n.clone(), d.to_string()))
                .collect(),
        };
        let body = toml::to_string(&raw).map_err(|e| LockError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // Named as an editor's temporary (`.x.tmp.<n>`), which the watcher ignores: the
        // rename into place is the one change it sees, so the package is planned once,
        // at its new tag, and no late event of the write supersedes that build.
        let mut tmp = tempfile::Builder::new()
            .prefix(".kiln.lock.tmp.")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(format!("{HEADER}{body}").as_bytes())
            .map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_file_round_trips_and_bad_ones_say_where() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Lock::read(dir.path()).unwrap(), Lock::default());
        let mut lock = Lock::default();
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        lock.images.insert("busybox:1.36".into(), d.clone());
        lock.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert!(text.starts_with("# The base images"), "{text}");
        assert!(
            text.contains(&format!("\"busybox:1.36\" = \"{d}\"")),
            "{text}"
        );
        assert_eq!(Lock::read(dir.path()).unwrap(), lock);

        std::fs::write(
            dir.path().join(LOCK_FILE),
            "[images]\nx = \"sha256:nope\"\n",
        )
        .unwrap();
        let e = Lock::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("kiln.lock") && e.contains("\"x\""), "{e}");
        std::fs::write(dir.path().join(LOCK_FILE), "[other]\n").unwrap();
        let e = Lock::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("kiln.lock") && e.contains("remove it"), "{e}");
    }
}
