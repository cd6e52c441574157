//! When each reference was last used, so `gc --max-size` drops the least recently used
//! first.
//!
//! The registry records a use on every manifest GET by tag, so recording must cost no I/O:
//! [`Cache::touch_ref`] updates an in-memory map, and [`Cache::flush_usage`] (which kilnd
//! calls periodically and on shutdown) merges it into `.kiln/usage.json`, written
//! atomically. Several processes may share a cache: a flush keeps the newest time of each
//! name, its own or the file's. A reference with no record counts as last used when the
//! blob it names was last written (its mtime).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Cache, CacheError, write_atomic};

const USAGE_FILE: &str = "usage.json";

/// The in-memory side: uses recorded since the last flush.
#[derive(Debug, Default)]
pub(super) struct Usage {
    pending: Mutex<HashMap<String, SystemTime>>,
}

/// `.kiln/usage.json`: reference name to the last use, in milliseconds since the epoch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UsageFile {
    #[serde(default)]
    last_used_ms: BTreeMap<String, u64>,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Cache {
    fn usage_path(&self) -> PathBuf {
        self.root.join(".kiln").join(USAGE_FILE)
    }

    /// Records that the reference `name` (`docker.io/org/image:tag`) was used now. No I/O.
    pub fn touch_ref(&self, name: &str) {
        self.touch_ref_at(name, SystemTime::now());
    }

    /// Records a use of `name` at a given time (a later record of the same name wins).
    pub fn touch_ref_at(&self, name: &str, when: SystemTime) {
        let mut pending = self.usage.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get_mut(name) {
            Some(t) => *t = (*t).max(when),
            None => {
                pending.insert(name.to_owned(), when);
            }
        }
    }

    /// Writes the uses recorded since the last flush to `.kiln/usage.json` (merged with
    /// what other processes wrote there); returns whether anything was written. Takes the
    /// writer lock briefly; cheap when nothing was recorded.
    pub fn flush_usage(&self) -> Result<bool, CacheError> {
        if self.pending_is_empty() {
            return Ok(false);
        }
        let _lock = self.lock()?;
        self.flush_usage_locked(&[])
    }

    fn pending_is_empty(&self) -> bool {
        self.usage
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// As [`Cache::flush_usage`] under a lock the caller holds; also forgets the records
    /// of `forget` (references gc dropped) and of names no longer in `index.json`. Writes
    /// only if something changed.
    pub(super) fn flush_usage_locked(&self, forget: &[String]) -> Result<bool, CacheError> {
        let pending =
            std::mem::take(&mut *self.usage.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let result = (|| {
            let mut file = self.read_usage_file()?;
            let mut changed = false;
            for (name, t) in &pending {
                let ms = to_ms(*t);
                let slot = file.last_used_ms.entry(name.clone()).or_insert(0);
                if ms > *slot {
                    *slot = ms;
                    changed = true;
                }
            }
            for name in forget {
                changed |= file.last_used_ms.remove(name).is_some();
            }
            // Names no longer in index.json (removed, or dropped by another tool) are
            // forgotten, so the file does not grow forever.
            let view = self.index()?;
            let before = file.last_used_ms.len();
            file.last_used_ms.retain(|name, _| view.get(name).is_some());
            changed |= file.last_used_ms.len() != before;
            if changed {
                let bytes = serde_json::to_vec(&file).map_err(|source| CacheError::Json {
                    path: self.usage_path(),
                    source,
                })?;
                write_atomic(&self.root.join(".kiln"), USAGE_FILE, &bytes)?;
            }
            Ok(changed)
        })();
        if result.is_err() {
            // Keep the records for the next flush.
            for (name, t) in pending {
                self.touch_ref_at(&name, t);
            }
        }
        result
    }

    fn read_usage_file(&self) -> Result<UsageFile, CacheError> {
        let path = self.usage_path();
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(file) => Ok(file),
                Err(e) => {
                    // Usage is advisory: a damaged file costs LRU order, not data; it is
                    // rewritten at the next flush.
                    tracing::warn!(path = %path.display(), "ignoring unreadable usage file: {e}");
                    Ok(UsageFile::default())
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UsageFile::default()),
            Err(e) => Err(CacheError::io(path)(e)),
        }
    }

    /// The last recorded use of every reference: the file merged with the records not yet
    /// flushed. References never used have no entry.
    pub fn last_used(&self) -> Result<HashMap<String, SystemTime>, CacheError> {
        let file = self.read_usage_file()?;
        let mut out: HashMap<String, SystemTime> = file
            .last_used_ms
            .into_iter()
            .map(|(name, ms)| (name, from_ms(ms)))
            .collect();
        let pending = self.usage.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (name, t) in pending.iter() {
            let slot = out.entry(name.clone()).or_insert(*t);
            *slot = (*slot).max(*t);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Descriptor, OCI_MANIFEST};

    #[test]
    fn uses_are_kept_in_memory_until_flushed_and_merged_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Cache::open(dir.path()).unwrap();
        let b = Cache::open(dir.path()).unwrap();
        let blob = a.put_blob(b"{}").unwrap();
        for name in ["docker.io/a/x:1", "docker.io/a/y:1"] {
            a.set_ref(name, Descriptor::new(OCI_MANIFEST, blob.clone(), 2))
                .unwrap();
        }
        assert!(
            !a.flush_usage().unwrap(),
            "nothing recorded, nothing written"
        );
        assert!(!a.usage_path().exists());

        let t1 = UNIX_EPOCH + Duration::from_secs(1_000);
        let t2 = UNIX_EPOCH + Duration::from_secs(2_000);
        let t3 = UNIX_EPOCH + Duration::from_secs(3_000);
        a.touch_ref_at("docker.io/a/x:1", t2);
        a.touch_ref_at("docker.io/a/x:1", t1); // older: does not move the time back
        assert!(!a.usage_path().exists(), "touch_ref does no I/O");
        assert_eq!(a.last_used().unwrap()["docker.io/a/x:1"], t2);
        assert!(b.last_used().unwrap().is_empty());

        assert!(a.flush_usage().unwrap());
        assert!(!a.flush_usage().unwrap(), "flushed already");
        // Another process, with an older use of the same name and a new name.
        b.touch_ref_at("docker.io/a/x:1", t1);
        b.touch_ref_at("docker.io/a/y:1", t3);
        b.flush_usage().unwrap();
        let seen = a.last_used().unwrap();
        assert_eq!(seen["docker.io/a/x:1"], t2);
        assert_eq!(seen["docker.io/a/y:1"], t3);

        let _lock = a.lock().unwrap();
        a.flush_usage_locked(&["docker.io/a/y:1".to_owned()])
            .unwrap();
        assert!(!a.last_used().unwrap().contains_key("docker.io/a/y:1"));
        drop(_lock);

        // A name removed from index.json is forgotten at the next flush.
        a.remove_ref("docker.io/a/x:1").unwrap();
        a.touch_ref("docker.io/a/gone:1");
        a.flush_usage().unwrap();
        assert!(a.last_used().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_usage_file_is_ignored_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let blob = c.put_blob(b"{}").unwrap();
        c.set_ref("docker.io/a/x:1", Descriptor::new(OCI_MANIFEST, blob, 2))
            .unwrap();
        fs::write(c.usage_path(), "{not json").unwrap();
        assert!(c.last_used().unwrap().is_empty());
        c.touch_ref("docker.io/a/x:1");
        assert!(c.flush_usage().unwrap());
        assert!(c.last_used().unwrap().contains_key("docker.io/a/x:1"));
    }
}
