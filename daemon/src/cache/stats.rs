//! How big the cache is, for the dashboard and `gc`: one readdir of `blobs/sha256` and a
//! stat per blob, plus the references of `index.json` (already in memory).

use std::fmt;
use std::fs;
use std::io;

use kiln_shared::digest::Digest;
use kiln_shared::size::format_size;

use super::{Cache, CacheError};

/// The cache's size at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Bytes held by blob files.
    pub blob_bytes: u64,
    /// Blob files.
    pub blobs: u64,
    /// Named references in `index.json` (`org.opencontainers.image.ref.name`).
    pub refs: u64,
    /// All entries of `index.json`, named or not (the registry keeps referrers unnamed).
    pub index_entries: u64,
    /// Referenced blobs on demand (not here: fetched from an upstream on first read),
    /// apart from the blobs held, and their bytes.
    pub on_demand: u64,
    pub on_demand_bytes: u64,
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in {} blobs, {} references",
            format_size(self.blob_bytes),
            self.blobs,
            self.refs
        )?;
        if self.on_demand > 0 {
            write!(
                f,
                "; {} blobs ({}) on demand from upstreams",
                self.on_demand,
                format_size(self.on_demand_bytes)
            )?;
        }
        Ok(())
    }
}

/// Measures the cache. Blobs that vanish while being counted (a concurrent gc) are
/// skipped.
pub fn stats(cache: &Cache) -> Result<CacheStats, CacheError> {
    let view = cache.index()?;
    let mut out = CacheStats {
        refs: view.refs().count() as u64,
        index_entries: view.entry_count() as u64,
        ..CacheStats::default()
    };
    for from in cache.missing_on_demand()?.values() {
        out.on_demand += 1;
        out.on_demand_bytes += from.size;
    }
    let dir = cache.blobs_dir();
    for entry in fs::read_dir(dir).map_err(CacheError::io(dir))? {
        let entry = entry.map_err(CacheError::io(dir))?;
        // Only blobs: other tools may stage writes here under other names.
        let name = entry.file_name();
        if name.to_str().is_none_or(|n| Digest::from_hex(n).is_err()) {
            continue;
        }
        match entry.metadata() {
            Ok(m) if m.is_file() => {
                out.blobs += 1;
                out.blob_bytes += m.len();
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::io(entry.path())(e)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Descriptor, OCI_MANIFEST};

    #[test]
    fn stats_count_blobs_bytes_and_references() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(stats(&cache).unwrap(), CacheStats::default());
        let a = cache.put_blob(b"hello").unwrap();
        cache.put_blob(b"world!").unwrap();
        cache
            .set_ref(
                "docker.io/a/b:1",
                Descriptor::new(OCI_MANIFEST, a.clone(), 5),
            )
            .unwrap();
        cache
            .update_index_locked(|i| {
                i.manifests.push(Descriptor::new(OCI_MANIFEST, a, 5));
                Ok(())
            })
            .unwrap();
        let s = stats(&cache).unwrap();
        assert_eq!(
            s,
            CacheStats {
                blob_bytes: 11,
                blobs: 2,
                refs: 1,
                index_entries: 2,
                ..CacheStats::default()
            }
        );
        assert_eq!(s.to_string(), "11 B in 2 blobs, 1 references");
    }
}
