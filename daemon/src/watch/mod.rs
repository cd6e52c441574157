//! Watching the workspace: inotify (through notify) over every root, recursively,
//! including directories created later; an editor's burst of events folded into one change
//! after a quiet window; editor temporaries, `.git` internals and kiln's own cache ignored.
//!
//! When inotify cannot keep up (its queue overflowed) the change is "everything": a
//! [`WatchEvent::Rescan`]. When its watch limit is reached the watcher says so, with the
//! sysctl that raises it, and falls back to polling the roots, so watching never stops in
//! silence. The [`Watcher`] owns the notify handle; dropping it stops everything.

mod ignore;

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

pub use self::ignore::is_ignored;

/// How often the fallback poller rescans the roots.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Files or directories that changed (created, written, removed, renamed), after the
    /// quiet window.
    Changed(BTreeSet<PathBuf>),
    /// Events were lost (inotify's queue overflowed): everything must be looked at again.
    Rescan { reason: String },
    /// Watching is degraded or failed somewhere; the message says what and what to do.
    Error { message: String },
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Settings of a watcher.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub roots: Vec<PathBuf>,
    /// Paths whose contents are never reported (kiln's cache, if it lies in a root).
    pub exclude: Vec<PathBuf>,
    /// Quiet window that folds a burst of events into one change.
    pub quiet: Duration,
    /// Where each relevant event is recorded as it arrives, before the quiet window.
    pub touched: Arc<Touched>,
}

/// When files changed, as the watcher sees them arrive (before the quiet window folds
/// them). A build checks it before it lands: a file of its package that changed after
/// the tag was computed may have gone into the image, which would then not be what the
/// tag names.
#[derive(Debug, Default)]
pub struct Touched {
    inner: Mutex<TouchedLog>,
}

#[derive(Debug, Default)]
struct TouchedLog {
    recent: VecDeque<(std::time::Instant, PathBuf)>,
    /// The newest time dropped from `recent` (or of a lost event): anything that old
    /// may have touched anything.
    unknown_until: Option<std::time::Instant>,
}

impl Touched {
    /// Changes remembered one by one; older ones only as a time.
    const KEEP: usize = 16_384;

    fn lock(&self) -> std::sync::MutexGuard<'_, TouchedLog> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `path` changed at `at`.
    pub fn record(&self, at: std::time::Instant, path: &Path) {
        let mut log = self.lock();
        if log.recent.len() == Self::KEEP
            && let Some((t, _)) = log.recent.pop_front()
        {
            log.unknown_until = Some(log.unknown_until.map_or(t, |u| u.max(t)));
        }
        log.recent.push_back((at, path.to_owned()));
    }

    /// Events were lost at `at` (inotify's queue overflowed): anything may have changed.
    pub fn record_unknown(&self, at: std::time::Instant) {
        let mut log = self.lock();
        log.unknown_until = Some(log.unknown_until.map_or(at, |u| u.max(at)));
    }

    /// Whether something under one of `dirs` changed at or after `since`.
    pub fn since(&self, since: std::time::Instant, dirs: &[&Path]) -> bool {
        let log = self.lock();
        log.unknown_until.is_some_and(|u| u >= since)
            || log
                .recent
                .iter()
                .rev()
                .take_while(|(t, _)| *t >= since)
                .any(|(_, p)| dirs.iter().any(|d| p.starts_with(d)))
    }
}

/// What watches: inotify, or the fallback poller.
enum Backend {
    /// Owned so that watching lasts as long as the `Watcher`.
    Inotify(#[allow(dead_code)] RecommendedWatcher),
    Poll(tokio::task::JoinHandle<()>),
}

/// The running watcher. Dropping it stops watching.
pub struct Watcher {
    backend: Backend,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_polling() { "poll" } else { "inotify" };
        write!(f, "Watcher({kind})")
    }
}

type Raw = notify::Result<notify::Event>;

impl Watcher {
    /// Starts watching; events arrive on the returned receiver.
    pub fn start(cfg: WatchConfig) -> Result<(Watcher, mpsc::Receiver<WatchEvent>), WatchError> {
        // Bounded: if kilnd falls behind, the notify thread waits, the kernel queue fills
        // and overflows, and that is reported as a Rescan: lag is never silent.
        let (raw_tx, raw_rx) = mpsc::channel::<Raw>(4096);
        let (out_tx, out_rx) = mpsc::channel(64);

        let handler = {
            let raw_tx = raw_tx.clone();
            move |ev: Raw| {
                let _ = raw_tx.blocking_send(ev);
            }
        };
        let backend = match start_inotify(&cfg.roots, handler) {
            Ok(w) => Backend::Inotify(w),
            Err(StartError::Limit(message)) => {
                let _ = out_tx.try_send(WatchEvent::Error { message });
                Backend::Poll(tokio::spawn(poll(
                    cfg.roots.clone(),
                    cfg.exclude.clone(),
                    raw_tx,
                )))
            }
            Err(StartError::Other(e)) => return Err(e),
        };
        let task = tokio::spawn(fold(cfg, raw_rx, out_tx));
        Ok((Watcher { backend, task }, out_rx))
    }

    /// Whether the watcher fell back to polling.
    pub fn is_polling(&self) -> bool {
        matches!(self.backend, Backend::Poll(_))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
        if let Backend::Poll(p) = &self.backend {
            p.abort();
        }
    }
}

enum StartError {
    Limit(String),
    Other(WatchError),
}

fn limit_message(path: &Path) -> String {
    let current = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!(
        "inotify's watch limit is reached (fs.inotify.max_user_watches = {current}) while \
         watching {}; kiln falls back to rescanning every {}s, which is slower. Raise the \
         limit with `sysctl fs.inotify.max_user_watches=524288` (and in /etc/sysctl.conf to \
         keep it), then restart kilnd",
        path.display(),
        POLL_INTERVAL.as_secs()
    )
}

fn start_inotify(
    roots: &[PathBuf],
    handler: impl notify::EventHandler,
) -> Result<RecommendedWatcher, StartError> {
    let mut w = RecommendedWatcher::new(handler, notify::Config::default()).map_err(|e| {
        if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
            StartError::Limit(limit_message(&roots[0]))
        } else {
            StartError::Other(WatchError::Watch {
                path: roots[0].clone(),
                source: e,
            })
        }
    })?;
    for root in roots {
        if let Err(e) = w.watch(root, RecursiveMode::Recursive) {
            return Err(match e.kind {
                notify::ErrorKind::MaxFilesWatch => StartError::Limit(limit_message(root)),
                _ => StartError::Other(WatchError::Watch {
                    path: root.clone(),
                    source: e,
                }),
            });
        }
    }
    Ok(w)
}

/// What identifies one version of a file for the poller: size, mtime to the nanosecond,
/// inode and mode (notify's poller compares whole seconds and misses quick saves).
type Stamp = (u64, i64, i64, u64, u32);

/// Stats every file under the roots (skipping `.git` and the excluded paths).
fn scan(roots: &[PathBuf], exclude: &[PathBuf]) -> std::collections::HashMap<PathBuf, Stamp> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashMap::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name() == ".git" || exclude.iter().any(|x| path.starts_with(x)) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() {
                stack.push(path.clone());
            }
            out.insert(
                path,
                (m.size(), m.mtime(), m.mtime_nsec(), m.ino(), m.mode()),
            );
        }
    }
    out
}

/// The fallback when inotify cannot watch everything: rescans the roots every
/// [`POLL_INTERVAL`] and reports what was created, changed or removed.
async fn poll(roots: Vec<PathBuf>, exclude: Vec<PathBuf>, raw_tx: mpsc::Sender<Raw>) {
    let scan_now = |roots: Vec<PathBuf>, exclude: Vec<PathBuf>| {
        tokio::task::spawn_blocking(move || scan(&roots, &exclude))
    };
    let Ok(mut before) = scan_now(roots.clone(), exclude.clone()).await else {
        return;
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(now) = scan_now(roots.clone(), exclude.clone()).await else {
            return;
        };
        let mut changed: Vec<PathBuf> = now
            .iter()
            .filter(|(p, s)| before.get(*p) != Some(*s))
            .map(|(p, _)| p.clone())
            .collect();
        changed.extend(before.keys().filter(|p| !now.contains_key(*p)).cloned());
        before = now;
        if changed.is_empty() {
            continue;
        }
        let mut ev = notify::Event::new(EventKind::Modify(notify::event::ModifyKind::Any));
        ev.paths = changed;
        if raw_tx.send(Ok(ev)).await.is_err() {
            return;
        }
    }
}

/// Whether an event says something about content (reads and opens do not).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Other => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}

/// Folds raw events into changes: paths gather until `quiet` passes without a new one
/// (or 20 quiet windows pass in all, so a never-ending stream still gets through).
async fn fold(cfg: WatchConfig, mut raw: mpsc::Receiver<Raw>, out: mpsc::Sender<WatchEvent>) {
    let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut limit_reported = false;
    loop {
        let deadline = first.map(|f| (last + cfg.quiet).min(f + cfg.quiet * 20));
        let next = tokio::select! {
            ev = raw.recv() => ev,
            _ = async { sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                let batch = std::mem::take(&mut pending);
                first = None;
                if !batch.is_empty() && out.send(WatchEvent::Changed(batch)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some(ev) = next else { return };
        let sent = match ev {
            Ok(ev) if ev.need_rescan() => {
                cfg.touched.record_unknown(std::time::Instant::now());
                out.send(WatchEvent::Rescan {
                    reason: "inotify's event queue overflowed (fs.inotify.max_queued_events); \
                             looking at everything again"
                        .into(),
                })
                .await
            }
            Ok(ev) => {
                if is_change(&ev.kind) {
                    // Every relevant event restarts the quiet window, also one on a path
                    // already pending: a file still being written must not be read (and
                    // tagged) half-written in the middle of its burst.
                    let mut relevant = false;
                    let now = Instant::now();
                    for p in ev.paths {
                        if !is_ignored(&p, &cfg.roots, &cfg.exclude) {
                            cfg.touched.record(now.into_std(), &p);
                            pending.insert(p);
                            relevant = true;
                        }
                    }
                    if relevant {
                        first.get_or_insert(now);
                        last = now;
                    }
                }
                Ok(())
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                // A directory created later could not be watched.
                if limit_reported {
                    Ok(())
                } else {
                    limit_reported = true;
                    let path = e.paths.first().cloned().unwrap_or_default();
                    out.send(WatchEvent::Error {
                        message: format!(
                            "{}; until then new directories are not watched",
                            limit_message(&path)
                        ),
                    })
                    .await
                }
            }
            Err(e) => {
                out.send(WatchEvent::Error {
                    message: format!("file watcher: {e}"),
                })
                .await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
