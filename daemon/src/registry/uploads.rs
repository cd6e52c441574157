//! Blob upload sessions: an id the client carries from `POST` through `PATCH`es to the
//! final `PUT`, and the cache's streaming blob writer behind it (a temp file inside the
//! cache, hashed as it is written; dropping it removes the file). A session that sees no
//! request for the configured time expires and its temp file goes with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::cache::BlobWriter;

/// One upload in progress.
#[derive(Debug)]
pub struct Session {
    /// The repository the upload was started in; other repositories cannot touch it.
    pub repo: String,
    /// `None` once the writer broke (a failed write): the session only awaits deletion.
    pub writer: Option<BlobWriter>,
    last_used: Instant,
}

impl Session {
    /// Bytes received so far.
    pub fn offset(&self) -> u64 {
        self.writer.as_ref().map_or(0, BlobWriter::size)
    }

    pub fn touch(&mut self) {
        self.last_used = Instant::now();
    }
}

type Slot = Arc<tokio::sync::Mutex<Session>>;

/// Every upload in progress, by id.
#[derive(Debug)]
pub struct Uploads {
    sessions: Mutex<HashMap<String, Slot>>,
    key: [u8; 16],
    next: AtomicU64,
    ttl: Duration,
}

impl Uploads {
    pub fn new(ttl: Duration) -> Self {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            key: random_key(),
            next: AtomicU64::new(0),
            ttl,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session and returns its id: 32 hex digits that cannot be guessed from
    /// other sessions' ids (a keyed hash of a counter).
    pub fn start(&self, repo: &str, writer: BlobWriter) -> (String, Slot) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(n.to_le_bytes());
        let id = hex::encode(&h.finalize()[..16]);
        let slot = Arc::new(tokio::sync::Mutex::new(Session {
            repo: repo.to_owned(),
            writer: Some(writer),
            last_used: Instant::now(),
        }));
        self.map().insert(id.clone(), Arc::clone(&slot));
        (id, slot)
    }

    /// The session `id`, if it exists. (The caller checks, under the session's lock,
    /// that it belongs to the repository of the request.)
    pub fn get(&self, id: &str) -> Option<Slot> {
        if !valid_id(id) {
            return None;
        }
        self.map().get(id).cloned()
    }

    /// Forgets a session; its writer (and temp file) goes when the last holder drops it.
    pub fn remove(&self, id: &str) -> Option<Slot> {
        self.map().remove(id)
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes sessions idle for the ttl or longer; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut map = self.map();
        let before = map.len();
        map.retain(|id, slot| match slot.try_lock() {
            Ok(s) if now.duration_since(s.last_used) >= self.ttl => {
                tracing::info!(upload = %id, repo = %s.repo, "abandoned upload expired");
                false
            }
            _ => true,
        });
        before - map.len()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_key() -> [u8; 16] {
    use std::io::Read;
    let mut key = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
    if from_os.is_err() {
        // Without /dev/urandom, ids stay unique (the counter) but become predictable;
        // sessions are also bound to their repository.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        key = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;

    #[tokio::test]
    async fn sessions_have_unguessable_ids_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let uploads = Uploads::new(Duration::ZERO);
        let (id, slot) = uploads.start("a/b", cache.blob_writer().unwrap());
        assert!(valid_id(&id));
        slot.lock()
            .await
            .writer
            .as_mut()
            .unwrap()
            .write_bytes(b"abc")
            .unwrap();
        assert_eq!(slot.lock().await.offset(), 3);
        let tmp = slot
            .lock()
            .await
            .writer
            .as_ref()
            .unwrap()
            .temp_path()
            .to_owned();
        assert!(tmp.exists());
        drop(slot);
        assert!(uploads.get(&id).is_some());
        assert_eq!(uploads.get(&id).unwrap().lock().await.repo, "a/b");
        assert!(uploads.get("../../etc/passwd").is_none());
        let (id2, _) = uploads.start("a/b", cache.blob_writer().unwrap());
        assert_ne!(id, id2);
        // A zero ttl: everything not in use is abandoned.
        assert_eq!(uploads.expire(), 2);
        assert!(uploads.is_empty());
        assert!(!tmp.exists(), "an expired upload leaves no temp file");
    }
}
