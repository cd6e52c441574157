//! Blob upload sessions: an id the client carries from `POST` through `PATCH`es to the
//! final `PUT`, and the cache's streaming blob writer behind it (a temp file inside the
//! cache, hashed as it is written; dropping it removes the file). A session that sees no
//! request for the configured time expires and its temp file goes with it.
//!
//! Sessions are bounded, so idle clients cannot exhaust the registry: at most
//! [`UploadLimits::max_sessions`] at once holding at most [`UploadLimits::max_bytes`]
//! together (past either, a new upload gets 429 `TOOMANYREQUESTS` with `Retry-After`),
//! and a session holds no file descriptor or buffer between its requests (the writer
//! is parked).

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

/// How many uploads may be in progress, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Sessions open at once.
    pub max_sessions: usize,
    /// Bytes held by all unfinished sessions together.
    pub max_bytes: u64,
    /// How long a session may stay idle (between requests, or within a request body)
    /// before it is dropped with its temp file.
    pub idle: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_sessions: 128,
            max_bytes: 32 << 30,
            idle: Duration::from_secs(5 * 60),
        }
    }
}

/// Every upload in progress, by id.
#[derive(Debug)]
pub struct Uploads {
    sessions: Mutex<HashMap<String, Slot>>,
    key: [u8; 16],
    next: AtomicU64,
    limits: UploadLimits,
    /// When a session last ended (for shutdown's drain: a push's next request follows).
    last_ended: Mutex<Option<Instant>>,
}

/// Why no upload can start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Sessions(usize),
    Bytes(u64),
}

impl Uploads {
    pub fn new(limits: UploadLimits) -> Self {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            key: random_key(),
            next: AtomicU64::new(0),
            limits,
            last_ended: Mutex::new(None),
        }
    }

    /// How long no upload has been in use: zero while a request works on a session,
    /// else the time since a session was last used or ended (`Duration::MAX` if none
    /// ever was). A session idle longer is a client that went away, not a push in flight.
    pub fn quiet_for(&self) -> Duration {
        let mut quiet = self
            .last_ended
            .lock()
            .ok()
            .and_then(|t| t.map(|t| t.elapsed()))
            .unwrap_or(Duration::MAX);
        for slot in self.map().values() {
            match slot.try_lock() {
                Ok(s) => quiet = quiet.min(s.last_used.elapsed()),
                Err(_) => return Duration::ZERO,
            }
        }
        quiet
    }

    fn ended(&self) {
        if let Ok(mut t) = self.last_ended.lock() {
            *t = Some(Instant::now());
        }
    }

    /// Whether a new session (or a monolithic upload) may start: under both bounds.
    /// Sessions busy with a request count with what they held before it.
    pub fn admit(&self) -> Result<(), Full> {
        let map = self.map();
        if map.len() >= self.limits.max_sessions {
            return Err(Full::Sessions(self.limits.max_sessions));
        }
        let held: u64 = map
            .values()
            .filter_map(|slot| slot.try_lock().ok().map(|s| s.offset()))
            .sum();
        if held >= self.limits.max_bytes {
            return Err(Full::Bytes(self.limits.max_bytes));
        }
        Ok(())
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
        let gone = self.map().remove(id);
        if gone.is_some() {
            self.ended();
        }
        gone
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
            Ok(s) if now.duration_since(s.last_used) >= self.limits.idle => {
                tracing::info!(upload = %id, repo = %s.repo, "abandoned upload expired");
                false
            }
            _ => true,
        });
        before - map.len()
    }

    pub fn ttl(&self) -> Duration {
        self.limits.idle
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
        let uploads = Uploads::new(UploadLimits {
            idle: Duration::ZERO,
            ..UploadLimits::default()
        });
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

    #[tokio::test]
    async fn sessions_are_bounded_by_count_and_bytes_and_hold_no_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let uploads = Uploads::new(UploadLimits {
            max_sessions: 2,
            max_bytes: 10,
            idle: Duration::from_secs(60),
        });
        assert_eq!(uploads.admit(), Ok(()));
        let mut w = cache.blob_writer().unwrap();
        w.write_bytes(b"0123456789").unwrap();
        w.park().unwrap();
        let (_, slot) = uploads.start("a/b", w);
        assert_eq!(uploads.admit(), Err(Full::Bytes(10)));
        // A parked writer keeps no descriptor open on its temp file.
        let tmp = slot
            .lock()
            .await
            .writer
            .as_ref()
            .unwrap()
            .temp_path()
            .to_owned();
        let open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|p| p == tmp);
        assert!(!open, "a parked upload holds its file open");
        // It resumes where it stopped.
        slot.lock()
            .await
            .writer
            .as_mut()
            .unwrap()
            .write_bytes(b"!")
            .unwrap();
        assert_eq!(slot.lock().await.offset(), 11);
        drop(slot);
        let uploads = Uploads::new(UploadLimits {
            max_sessions: 1,
            ..UploadLimits::default()
        });
        uploads.start("a/b", cache.blob_writer().unwrap());
        assert_eq!(uploads.admit(), Err(Full::Sessions(1)));
    }

    #[tokio::test]
    async fn quiet_is_zero_while_a_session_is_in_use_and_counts_from_its_last_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let uploads = Uploads::new(UploadLimits::default());
        assert_eq!(uploads.quiet_for(), Duration::MAX, "no upload ever");
        let (id, slot) = uploads.start("a/b", cache.blob_writer().unwrap());
        let busy = slot.lock().await;
        assert_eq!(
            uploads.quiet_for(),
            Duration::ZERO,
            "a request holds the session"
        );
        drop(busy);
        assert!(
            uploads.quiet_for() < Duration::from_secs(60),
            "used just now"
        );
        uploads.remove(&id);
        assert!(uploads.is_empty());
        assert!(
            uploads.quiet_for() < Duration::from_secs(60),
            "a session ended just now: the push's next request may follow"
        );
    }
}
