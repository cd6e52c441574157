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
//! empty file no event speaks of yet. [`Touched::unsure`] closes that gap too: after the
//! read it asks the kernel whether a file is still open for writing (`writers.rs`),
//! before the fence, so a read of a half-written file is never taken as sure.

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
    /// Set when the kernel can be asked which files are open for writing (see
    /// `writers.rs`): what is watched, to skip what is ignored.
    leases: OnceLock<Watched>,
}

/// The roots watched and the paths excluded.
#[derive(Debug)]
struct Watched {
    roots: Vec<PathBuf>,
    exclude: Vec<PathBuf>,
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

    /// Which of `reads` (the directories read, and since when) may have been read stale or
    /// half written: a file under them is open for writing by a recent writer (asked of
    /// the kernel: a truncation in progress has no event yet), or, once the watcher has
    /// recorded every event made so far ([`Touched::settle`]), something under them
    /// changed since, or the events say a file is still open ([`Touched::busy`]).
    pub async fn unsure(&self, reads: &[(Vec<&Path>, Instant)]) -> Vec<bool> {
        let start = Instant::now();
        let writing: Vec<bool> = reads
            .iter()
            .map(|(dirs, _)| self.written_now(dirs))
            .collect();
        let asked = start.elapsed();
        self.settle().await;
        tracing::debug!(
            reads = reads.len(),
            kernel_us = asked.as_micros(),
            settle_us = (start.elapsed() - asked).as_micros(),
            "what was read checked"
        );
        reads
            .iter()
            .zip(writing)
            .map(|((dirs, since), w)| w || self.busy(*since, dirs))
            .collect()
    }

    /// Whether the kernel says a file under `dirs` is open for writing by a recent writer
    /// (false when it cannot be asked).
    fn written_now(&self, dirs: &[&Path]) -> bool {
        let Some(w) = self.leases.get() else {
            return false;
        };
        match super::writers::being_written(dirs, |p| {
            super::is_ignored(p, &w.roots, &w.exclude) || self.fence_marker(p)
        }) {
            Some(file) => {
                tracing::debug!(file = %file.display(), "open for writing: what was read may be half written");
                true
            }
            None => false,
        }
    }

    /// Makes [`Touched::unsure`] ask the kernel which files under `roots` (less what is
    /// ignored) are open for writing.
    pub(super) fn use_leases(&self, roots: Vec<PathBuf>, exclude: Vec<PathBuf>) {
        let _ = self.leases.set(Watched { roots, exclude });
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
