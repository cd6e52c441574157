//! Watching the workspace: inotify (through notify) over every root, recursively,
//! including directories created later; a change reported as soon as its files are whole
//! (closed by their writer), and what arrives meanwhile gathered into the next one; editor
//! temporaries, `.git` internals and kiln's own cache ignored.
//!
//! When inotify cannot keep up (its queue overflowed) the change is "everything": a
//! [`WatchEvent::Rescan`]. When its watch limit is reached the watcher says so, with the
//! sysctl that raises it, and falls back to polling the roots, so watching never stops in
//! silence. The [`Watcher`] owns the notify handle; dropping it stops everything.

mod ignore;
mod touched;
mod writers;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

pub use self::ignore::{is_git_state, is_ignored};
pub use self::touched::Touched;

/// How often the fallback poller rescans the roots.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Files or directories that changed (created, written, removed, renamed), once none
    /// of them is open for writing.
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
    /// The longest a change waits for a file of it that is open for writing (written or
    /// created, not closed yet) to be closed, and how long no event must come after a
    /// directory was made or something removed. A change with none is reported at once.
    pub quiet: Duration,
    /// Where each relevant event is recorded as it arrives, before the fold.
    pub touched: Arc<Touched>,
    /// A private directory (kilnd's, in its cache) for [`Touched::settle`]'s markers,
    /// made if missing; `None`: settling does not wait.
    pub fence_dir: Option<PathBuf>,
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
    /// SIGIO handled (a broken lease sends it, see `writers.rs`), while leases are used.
    _sigio: Option<tokio::signal::unix::Signal>,
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
        // One change waits at most: while kilnd works on it, what follows gathers into the
        // next one instead of queueing up as many small ones.
        let (out_tx, out_rx) = mpsc::channel(1);

        // The fence directory exists before watching starts, so its first marker is seen.
        let fence_dir = cfg
            .fence_dir
            .as_ref()
            .and_then(|d| match std::fs::create_dir_all(d) {
                Ok(()) => Some(d.clone()),
                Err(e) => {
                    tracing::warn!(
                        "cannot make {}: {e}; plans do not wait for the watcher",
                        d.display()
                    );
                    None
                }
            });
        // Changes are recorded as notify delivers them, on its thread, before they queue
        // for the fold: a plan or a build that checks `Touched` knows every event the
        // kernel has given out, not only those the fold got to.
        let recorder = Recorder {
            touched: Arc::clone(&cfg.touched),
            roots: cfg.roots.clone(),
            exclude: cfg.exclude.clone(),
        };
        let handler = {
            let raw_tx = raw_tx.clone();
            let recorder = recorder.clone();
            move |ev: Raw| {
                recorder.note(&ev);
                let _ = raw_tx.blocking_send(ev);
            }
        };
        // Before any lease is taken: SIGIO's default action ends the process.
        let sigio = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io()) {
            Ok(s) => {
                cfg.touched
                    .use_leases(cfg.roots.clone(), cfg.exclude.clone());
                Some(s)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot handle SIGIO ({e}): files being written are known from events only"
                );
                None
            }
        };
        // The fold drains events from the start: setting up the watch of a big tree makes
        // events of its own (each directory opened while it is walked), and a queue left
        // full meanwhile would stop notify's thread, and with it the setup, for ever.
        let (roots, exclude, touched) = (
            cfg.roots.clone(),
            cfg.exclude.clone(),
            Arc::clone(&cfg.touched),
        );
        let error_tx = out_tx.clone();
        let task = tokio::spawn(fold(cfg, recorder.clone(), raw_rx, out_tx));
        let backend = match start_inotify(&roots, handler) {
            Ok(mut w) => {
                if let Some(dir) = fence_dir {
                    match w.watch(&dir, RecursiveMode::NonRecursive) {
                        Ok(()) => touched.set_fence(dir),
                        Err(e) => tracing::warn!(
                            "cannot watch {}: {e}; plans do not wait for the watcher",
                            dir.display()
                        ),
                    }
                }
                Backend::Inotify(w)
            }
            Err(StartError::Limit(message)) => {
                let _ = error_tx.try_send(WatchEvent::Error { message });
                Backend::Poll(tokio::spawn(poll(roots, exclude, raw_tx, recorder)))
            }
            Err(StartError::Other(e)) => {
                task.abort();
                return Err(e);
            }
        };
        Ok((
            Watcher {
                backend,
                task,
                _sigio: sigio,
            },
            out_rx,
        ))
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
async fn poll(
    roots: Vec<PathBuf>,
    exclude: Vec<PathBuf>,
    raw_tx: mpsc::Sender<Raw>,
    recorder: Recorder,
) {
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
        let ev = Ok(ev);
        recorder.note(&ev);
        if raw_tx.send(ev).await.is_err() {
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

/// Records each relevant change in [`Touched`] as it arrives: when, and whether the file
/// is now open for writing.
#[derive(Clone)]
struct Recorder {
    touched: Arc<Touched>,
    roots: Vec<PathBuf>,
    exclude: Vec<PathBuf>,
}

impl Recorder {
    fn note(&self, ev: &Raw) {
        let now = std::time::Instant::now();
        match ev {
            Ok(ev) if ev.need_rescan() => self.touched.record_unknown(now),
            Ok(ev) => {
                for p in &ev.paths {
                    if !self.relevant(p) {
                        continue;
                    }
                    if is_change(&ev.kind) {
                        self.touched.record(now, p);
                    }
                    match writing(&ev.kind, p) {
                        Some(true) => self.touched.set_open(p, Some(now)),
                        Some(false) => self.touched.set_open(p, None),
                        None => {}
                    }
                }
            }
            Err(_) => {}
        }
    }

    /// Neither a fence marker nor an ignored path.
    fn relevant(&self, p: &Path) -> bool {
        !self.touched.fence_marker(p) && !is_ignored(p, &self.roots, &self.exclude)
    }
}

/// Whether an event is one of a tree's worth that usually come together, so that its
/// change waits until no event has come for the quiet window. A directory made: its files
/// follow, and those written before inotify watches it give no event, so only a plan read
/// after the window sees them (a package written file by file was otherwise planned empty
/// and never again). A removal: `rm -r` removes a package file by file, and a package
/// planned half removed would be built.
fn structural(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(CreateKind::Folder) | EventKind::Remove(_)
    )
}

/// Whether an event leaves `path` open for writing (`Some(true)`: written, or created as
/// a file; its content may be partial until it is closed), done with (`Some(false)`:
/// closed after writing, removed, renamed), or says nothing about it.
fn writing(kind: &EventKind, path: &Path) -> Option<bool> {
    match kind {
        EventKind::Modify(ModifyKind::Data(_)) => Some(true),
        // A symlink, a fifo or a hard link is created whole: no close follows.
        EventKind::Create(CreateKind::File | CreateKind::Any) => {
            use std::os::unix::fs::MetadataExt;
            Some(
                path.symlink_metadata()
                    .is_ok_and(|m| m.is_file() && m.nlink() == 1),
            )
        }
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_)) => Some(false),
        _ => None,
    }
}

/// Folds raw events into changes. A change is reported as soon as none of its files is
/// open for writing: a file written in place once its writer closed it (IN_CLOSE_WRITE),
/// a file renamed into place or linked at once. The quiet window is only an upper bound:
/// a file held open for a whole window is taken as it is, and a change that made a
/// directory or removed something waits until no event has come for a window (at most
/// 20 in all, so a never-ending stream still gets through). While kilnd works on one change,
/// the next gathers (the output holds one), so a burst of saves becomes few changes; a
/// plan or a build whose files change after it read them is not acted on (see
/// [`Touched`]), and the change on its way plans again from the final bytes.
async fn fold(
    cfg: WatchConfig,
    recorder: Recorder,
    mut raw: mpsc::Receiver<Raw>,
    out: mpsc::Sender<WatchEvent>,
) {
    let mut change = Gathering::default();
    loop {
        let now = Instant::now();
        let opened = if change.pending.is_empty() {
            None
        } else {
            cfg.touched.open_since(change.pending.iter())
        };
        let quiet_until = change
            .structural
            .then(|| (change.last + cfg.quiet).min(change.first + cfg.quiet * 20));
        let ready = !change.notices.is_empty()
            || !change.pending.is_empty()
                && opened.is_none()
                && quiet_until.is_none_or(|t| t <= now);
        let open_until = opened.map(|t| Instant::from_std(t) + cfg.quiet);
        let wake = match (open_until, quiet_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let next = tokio::select! {
            ev = raw.recv() => ev,
            permit = out.reserve(), if ready => {
                let Ok(permit) = permit else { return };
                if let Some(notice) = change.notices.pop_front() {
                    permit.send(notice);
                    continue;
                }
                // Events that came while the output was full (kilnd busy with the last
                // change) join this change before it goes: once, so that a never-ending
                // stream still gets through.
                if !change.rechecked && !raw.is_empty() {
                    drop(permit);
                    change.rechecked = true;
                    raw.recv().await
                } else {
                    tracing::debug!(
                        paths = change.pending.len(),
                        since_first_us = change.first.elapsed().as_micros(),
                        since_last_us = change.last.elapsed().as_micros(),
                        "change reported"
                    );
                    permit.send(WatchEvent::Changed(std::mem::take(&mut change.pending)));
                    change.structural = false;
                    change.rechecked = false;
                    continue;
                }
            }
            () = sleep_until(wake.unwrap_or(now)), if !ready && wake.is_some() => {
                // Open for a whole quiet window: taken as it is now.
                if let Some(before) = Instant::now().checked_sub(cfg.quiet) {
                    cfg.touched.close_older(&change.pending, before.into_std());
                }
                continue;
            }
        };
        let Some(mut ev) = next else { return };
        // What has already arrived joins this change before it is reported (a writer's
        // close and the events just before it come together), a bounded number at a
        // time so that a never-ending stream cannot hold a change back.
        for _ in 0..DRAIN {
            change.take(ev, &recorder);
            match raw.try_recv() {
                Ok(more) => ev = more,
                Err(_) => break,
            }
        }
    }
}

/// How many raw events the fold takes in before it looks again at whether its change is
/// ready.
const DRAIN: usize = 256;

/// The change being gathered.
struct Gathering {
    pending: BTreeSet<PathBuf>,
    /// Whether it made a directory or removed something (see [`structural`]).
    structural: bool,
    /// When its first and its latest event came.
    first: Instant,
    last: Instant,
    /// Whether the watch limit was reported already (once is enough).
    limit_reported: bool,
    /// Whether events that came while the output was full were taken in already.
    rechecked: bool,
    /// Rescans and errors to report before the change. The fold never waits on the
    /// output with events arriving: it keeps taking them in (notify's thread blocks on a
    /// full queue, and a `watch` call waits for that thread while kilnd starts).
    notices: std::collections::VecDeque<WatchEvent>,
}

impl Default for Gathering {
    fn default() -> Gathering {
        Gathering {
            pending: BTreeSet::new(),
            structural: false,
            first: Instant::now(),
            last: Instant::now(),
            limit_reported: false,
            rechecked: false,
            notices: std::collections::VecDeque::new(),
        }
    }
}

impl Gathering {
    /// Takes one raw event in.
    fn take(&mut self, ev: Raw, recorder: &Recorder) {
        match ev {
            Ok(ev) if ev.need_rescan() => {
                // One rescan covers every overflow before it is made.
                if !self
                    .notices
                    .iter()
                    .any(|n| matches!(n, WatchEvent::Rescan { .. }))
                {
                    self.notices.push_back(WatchEvent::Rescan {
                        reason: "inotify's event queue overflowed (fs.inotify.max_queued_events); \
                                 looking at everything again"
                            .into(),
                    });
                }
            }
            Ok(ev) => {
                if is_change(&ev.kind) {
                    for p in ev.paths {
                        // A git state change is reported (a commit tags again), not
                        // recorded: it changes no file of a package.
                        if recorder.relevant(&p) || is_git_state(&p) {
                            let now = Instant::now();
                            if self.pending.is_empty() {
                                self.first = now;
                            }
                            self.last = now;
                            self.structural |= structural(&ev.kind);
                            self.pending.insert(p);
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                // A directory created later could not be watched.
                if self.limit_reported {
                    return;
                }
                self.limit_reported = true;
                let path = e.paths.first().cloned().unwrap_or_default();
                self.notices.push_back(WatchEvent::Error {
                    message: format!(
                        "{}; until then new directories are not watched",
                        limit_message(&path)
                    ),
                });
            }
            Err(e) => {
                let message = format!("file watcher: {e}");
                // The same error again adds nothing while it waits to be reported.
                if !self
                    .notices
                    .iter()
                    .any(|n| matches!(n, WatchEvent::Error { message: m } if *m == message))
                {
                    self.notices.push_back(WatchEvent::Error { message });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
