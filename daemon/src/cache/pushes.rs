//! The pushes to upstreams that kilnd owes: `.kiln/pushes.json`, the `org/image:tag`s
//! whose push began and has not yet succeeded or been superseded. A push cut by a
//! shutdown (or failing until one) stays listed, and the next kilnd on this cache pushes
//! it again, so a built tag is never half-pushed and forgotten. Written atomically under
//! the writer lock, like the index.

use std::collections::BTreeSet;
use std::fs;
use std::io;

use kiln_shared::reference::ImageRef;

use super::{Cache, CacheError, write_atomic};

const PUSHES_FILE: &str = "pushes.json";

impl Cache {
    /// The pushes owed, as recorded (an entry that no longer parses is dropped).
    pub fn pending_pushes(&self) -> Result<BTreeSet<ImageRef>, CacheError> {
        Ok(self
            .read_pushes()?
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }

    /// Records that a push of `image` is owed (`owed`) or done or given up (`!owed`).
    pub fn mark_push(&self, image: &ImageRef, owed: bool) -> Result<(), CacheError> {
        let _lock = self.lock()?;
        let mut names = self.read_pushes()?;
        let name = image.to_string();
        let changed = if owed {
            names.insert(name)
        } else {
            names.remove(&name)
        };
        if !changed {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&names)
            .map_err(|e| CacheError::io(self.pushes_path())(io::Error::other(e)))?;
        let dir = self.root.join(".kiln");
        fs::create_dir_all(&dir).map_err(CacheError::io(&dir))?;
        write_atomic(&dir, PUSHES_FILE, &bytes)
    }

    fn pushes_path(&self) -> std::path::PathBuf {
        self.root.join(".kiln").join(PUSHES_FILE)
    }

    fn read_pushes(&self) -> Result<BTreeSet<String>, CacheError> {
        let path = self.pushes_path();
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable list of pushes owed; starting a new one");
                BTreeSet::new()
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(CacheError::io(path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_pushes_survive_a_reopen_until_marked_done() {
        let dir = tempfile::tempdir().unwrap();
        let a: ImageRef = "org/a:t1".parse().unwrap();
        let b: ImageRef = "org/b:t2".parse().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            assert!(cache.pending_pushes().unwrap().is_empty());
            cache.mark_push(&a, true).unwrap();
            cache.mark_push(&b, true).unwrap();
            cache.mark_push(&b, false).unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.pending_pushes().unwrap(), BTreeSet::from([a.clone()]));
        cache.mark_push(&a, false).unwrap();
        assert!(cache.pending_pushes().unwrap().is_empty());
    }
}
