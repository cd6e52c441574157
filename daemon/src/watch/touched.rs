//! What the watcher has seen change, as the kernel gives it out (recorded on notify's own
//! thread, before the quiet window folds anything): when each path changed, and which
//! files are open for writing (written or created, not closed yet). Builds check it before
//! they land and plans before they act: a verdict read from a file that was being written
//! is never kept.
//!
//! The watcher may lag the kernel under load. [`Touched::settle`] closes that gap with a
//! fence: it writes a marker file in a directory the watcher's own inotify instance
//! watches and waits until the marker's event is seen. inotify gives out one instance's
//! events in order, so by then every change made before the marker is recorded too.
//!
//! What no fence closes: the kernel posts a change's event only after the change is
//! visible, and the writer can stall in between (`open(O_TRUNC)` empties the file, then
//! ext4 finishes the truncation before the event is posted). A reader can then see an
//! empty file no event speaks of yet. The watcher's fold keeps that rare by folding
//! bursts of writes to the same files in the quiet window; a build from such a read
//! never lands (its files change while it runs).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// See the module's documentation.
#[derive(Debug, Default)]
pub struct Touched {
    inner: Mutex<TouchedLog>,
    fence: Fence,
}

#[derive(Debug, Default)]
struct TouchedLog {
    recent: VecDeque<(Instant, PathBuf)>,
    /// The newest time dropped from `recent` (or of a lost event): anything that old
    /// may have touched anything.
    unknown_until: Option<Instant>,
    /// Files seen written or created and not closed since, with when that was.
    open: BTreeMap<PathBuf, Instant>,
}

#[derive(Debug, Default)]
struct Fence {
    /// The watched directory of the markers (unset: [`Touched::settle`] does not wait).
    dir: OnceLock<PathBuf>,
    next: AtomicU64,
    seen: tokio::sync::watch::Sender<u64>,
}

/// How long [`Touched::settle`] waits for its marker (a stalled watcher thread).
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

impl Touched {
    /// Changes remembered one by one; older ones only as a time.
    pub(super) const KEEP: usize = 16_384;

    fn lock(&self) -> std::sync::MutexGuard<'_, TouchedLog> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `path` changed at `at`.
    pub fn record(&self, at: Instant, path: &Path) {
        let mut log = self.lock();
        if log.recent.len() == Self::KEEP
            && let Some((t, _)) = log.recent.pop_front()
        {
            log.unknown_until = Some(log.unknown_until.map_or(t, |u| u.max(t)));
        }
        log.recent.push_back((at, path.to_owned()));
    }

    /// Events were lost at `at` (inotify's queue overflowed): anything may have changed.
    pub fn record_unknown(&self, at: Instant) {
        let mut log = self.lock();
        log.unknown_until = Some(log.unknown_until.map_or(at, |u| u.max(at)));
    }

    /// Whether something under one of `dirs` changed at or after `since`.
    pub fn since(&self, since: Instant, dirs: &[&Path]) -> bool {
        let log = self.lock();
        log.unknown_until.is_some_and(|u| u >= since)
            || log
                .recent
                .iter()
                .rev()
                .take_while(|(t, _)| *t >= since)
                .any(|(_, p)| dirs.iter().any(|d| p.starts_with(d)))
    }

    /// Whether what was read of `dirs` from `since` on may be stale or half-written:
    /// something under them changed since, or a file under them is open for writing.
    /// Call [`Touched::settle`] first, so that every change made so far is known.
    pub fn busy(&self, since: Instant, dirs: &[&Path]) -> bool {
        self.since(since, dirs)
            || self
                .lock()
                .open
                .keys()
                .any(|p| dirs.iter().any(|d| p.starts_with(d)))
    }

    /// `path` was written or created at `at` (open: its content may be partial), or
    /// closed after writing, removed or renamed away (`at` None).
    pub(super) fn set_open(&self, path: &Path, at: Option<Instant>) {
        let mut log = self.lock();
        match at {
            Some(at) => {
                log.open.entry(path.to_owned()).or_insert(at);
            }
            None => {
                log.open.remove(path);
            }
        }
    }

    /// When the first of `paths` still open for writing was opened, if one is.
    pub(super) fn open_since<'a>(
        &self,
        paths: impl Iterator<Item = &'a PathBuf>,
    ) -> Option<Instant> {
        let log = self.lock();
        if log.open.is_empty() {
            return None;
        }
        paths.filter_map(|p| log.open.get(p)).min().copied()
    }

    /// Takes `paths` as they are: those opened at or before `before` count as closed (a
    /// file kept open past the quiet window, or a hard link, which no close follows).
    pub(super) fn close_older(&self, paths: &std::collections::BTreeSet<PathBuf>, before: Instant) {
        let mut log = self.lock();
        for p in paths {
            if log.open.get(p).is_some_and(|at| *at <= before) {
                log.open.remove(p);
            }
        }
    }

    /// Makes [`Touched::settle`] wait for markers written in `dir`, which the watcher's
    /// inotify instance watches.
    pub(super) fn set_fence(&self, dir: PathBuf) {
        let _ = self.fence.dir.set(dir);
    }

    /// Whether `path` is a fence marker (of any kilnd sharing the cache); notes it when it
    /// is this process's.
    pub(super) fn fence_marker(&self, path: &Path) -> bool {
        let Some(dir) = self.fence.dir.get() else {
            return false;
        };
        if path.parent() != Some(dir.as_path()) {
            return false;
        }
        let own = format!("fence-{}-", std::process::id());
        if let Some(n) = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix(own.as_str()))
            .and_then(|n| n.parse::<u64>().ok())
        {
            self.fence.seen.send_modify(|s| *s = (*s).max(n));
        }
        true
    }

    /// Waits until the watcher has recorded every file event that happened before this
    /// call (see the module's documentation); at most a couple of seconds.
    pub async fn settle(&self) {
        let Some(dir) = self.fence.dir.get() else {
            return;
        };
        let n = self.fence.next.fetch_add(1, Ordering::Relaxed) + 1;
        let marker = dir.join(format!("fence-{}-{n}", std::process::id()));
        let mut seen = self.fence.seen.subscribe();
        if let Err(e) = std::fs::write(&marker, b"") {
            tracing::warn!(
                "cannot write the watcher's marker {}: {e}",
                marker.display()
            );
            return;
        }
        let _ = std::fs::remove_file(&marker);
        if tokio::time::timeout(SETTLE_LIMIT, seen.wait_for(|s| *s >= n))
            .await
            .is_err()
        {
            tracing::warn!(
                "the file watcher did not see its marker within {SETTLE_LIMIT:?}: it lags"
            );
        }
    }
}
