//! Build logs: a bounded store of the most recent builds' output, which builders append
//! to and `GET /api/v1/builds/<id>/log?follow=1` streams.
//!
//! Each build keeps at most `bytes_per_build` bytes of its newest lines (a ring buffer:
//! old lines are dropped, and readers are told how many), and the store keeps at most
//! `builds` logs, dropping the oldest finished ones first. A noisy build therefore costs
//! bounded memory whatever it prints.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kiln_shared::protocol::BuildId;
use tokio::sync::watch;

/// The store's bounds.
#[derive(Debug, Clone, Copy)]
pub struct LogStoreLimits {
    /// Bytes of log text kept per build (the newest lines).
    pub bytes_per_build: usize,
    /// Builds whose logs are kept.
    pub builds: usize,
    /// Longer lines are cut to this many bytes.
    pub line_bytes: usize,
}

impl Default for LogStoreLimits {
    fn default() -> Self {
        LogStoreLimits {
            bytes_per_build: 1 << 20,
            builds: 64,
            line_bytes: 16 << 10,
        }
    }
}

/// The logs of the most recent builds.
pub struct LogStore {
    limits: LogStoreLimits,
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    logs: HashMap<BuildId, Arc<BuildLog>>,
    /// Build ids, oldest first.
    order: VecDeque<BuildId>,
}

struct BuildLog {
    state: Mutex<LogState>,
    /// Bumped on every append and on close, to wake followers.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct LogState {
    lines: VecDeque<String>,
    bytes: usize,
    /// The number of the first line held (lines before it were dropped).
    first: u64,
    closed: bool,
}

/// Lines read from a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogChunk {
    /// Lines dropped (to the byte cap) before the reader got to them.
    pub dropped: u64,
    pub lines: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the value consistent before any call that could
    // panic, so a poisoned lock still holds a usable value.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LogStore {
    pub fn new(limits: LogStoreLimits) -> Self {
        LogStore {
            limits: LogStoreLimits {
                bytes_per_build: limits.bytes_per_build.max(1),
                builds: limits.builds.max(1),
                line_bytes: limits.line_bytes.max(1),
            },
            inner: Mutex::new(StoreInner::default()),
        }
    }

    fn get_or_open(&self, build: &BuildId) -> Arc<BuildLog> {
        let mut inner = lock(&self.inner);
        if let Some(log) = inner.logs.get(build) {
            return log.clone();
        }
        while inner.order.len() >= self.limits.builds {
            // Drop the oldest finished log, else the oldest.
            let victim = inner
                .order
                .iter()
                .position(|id| inner.logs.get(id).is_none_or(|l| lock(&l.state).closed))
                .unwrap_or(0);
            if let Some(id) = inner.order.remove(victim) {
                inner.logs.remove(&id);
            }
        }
        let log = Arc::new(BuildLog {
            state: Mutex::new(LogState::default()),
            changed: watch::channel(0).0,
        });
        inner.logs.insert(build.clone(), log.clone());
        inner.order.push_back(build.clone());
        log
    }

    /// Makes sure a log exists for `build` (a queued build can be followed already).
    pub fn open(&self, build: &BuildId) {
        self.get_or_open(build);
    }

    /// Appends a line (without its newline). A line longer than the limit is cut.
    pub fn append(&self, build: &BuildId, line: &str) {
        let log = self.get_or_open(build);
        let line = truncate(line.trim_end_matches(['\n', '\r']), self.limits.line_bytes);
        {
            let mut st = lock(&log.state);
            st.bytes += line.len();
            st.lines.push_back(line);
            while st.bytes > self.limits.bytes_per_build {
                let Some(old) = st.lines.pop_front() else {
                    break;
                };
                st.bytes -= old.len();
                st.first += 1;
            }
        }
        log.changed.send_modify(|n| *n += 1);
    }

    /// Marks a build's log complete: followers finish after its last line.
    pub fn close(&self, build: &BuildId) {
        let log = self.get_or_open(build);
        lock(&log.state).closed = true;
        log.changed.send_modify(|n| *n += 1);
    }

    /// A reader from the first line held, or `None` for an unknown (or evicted) build.
    pub fn reader(&self, build: &BuildId) -> Option<LogReader> {
        let log = lock(&self.inner).logs.get(build)?.clone();
        let rx = log.changed.subscribe();
        Some(LogReader { log, next: 0, rx })
    }

    /// Bytes of log text held, over all builds (for tests and stats).
    pub fn bytes_held(&self) -> usize {
        let inner = lock(&self.inner);
        inner.logs.values().map(|l| lock(&l.state).bytes).sum()
    }

    /// The number of logs held.
    pub fn len(&self) -> usize {
        lock(&self.inner).logs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn truncate(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Reads one build's log, optionally following it.
pub struct LogReader {
    log: Arc<BuildLog>,
    /// The number of the next line to read.
    next: u64,
    rx: watch::Receiver<u64>,
}

impl LogReader {
    /// Up to `max` lines available now, and whether the log is complete and fully read.
    pub fn read_available(&mut self, max: usize) -> (LogChunk, bool) {
        // Mark the current version seen before reading, so an append after the read wakes
        // `changed` and is not missed.
        self.rx.borrow_and_update();
        let st = lock(&self.log.state);
        let mut chunk = LogChunk::default();
        if self.next < st.first {
            chunk.dropped = st.first - self.next;
            self.next = st.first;
        }
        // `next - first` is below `lines.len()` or equal to it: both count lines held.
        let skip = usize::try_from(self.next - st.first).unwrap_or(usize::MAX);
        chunk.lines = st.lines.iter().skip(skip).take(max).cloned().collect();
        self.next += chunk.lines.len() as u64;
        let done = st.closed && self.next >= st.first + st.lines.len() as u64;
        (chunk, done)
    }

    /// The next lines, waiting for them; `None` once the log is complete and read.
    pub async fn next_chunk(&mut self, max: usize) -> Option<LogChunk> {
        loop {
            let (chunk, done) = self.read_available(max);
            if !chunk.lines.is_empty() || chunk.dropped > 0 {
                return Some(chunk);
            }
            if done {
                return None;
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(bytes: usize, builds: usize) -> LogStore {
        LogStore::new(LogStoreLimits {
            bytes_per_build: bytes,
            builds,
            line_bytes: 64,
        })
    }

    #[test]
    fn keeps_the_newest_lines_under_the_byte_cap_and_reports_drops() {
        let s = store(100, 4);
        let id = BuildId::from("b1");
        for i in 0..1000 {
            s.append(&id, &format!("line {i:04}"));
        }
        assert!(s.bytes_held() <= 100);
        let mut r = s.reader(&id).unwrap();
        let (chunk, done) = r.read_available(usize::MAX);
        assert!(!done);
        assert_eq!(chunk.lines.last().map(String::as_str), Some("line 0999"));
        assert_eq!(chunk.dropped + chunk.lines.len() as u64, 1000);
    }

    #[test]
    fn keeps_a_bounded_number_of_builds_dropping_finished_ones_first() {
        let s = store(1000, 3);
        for i in 0..3 {
            s.append(&BuildId(format!("b{i}")), "x");
        }
        s.close(&BuildId::from("b1"));
        s.append(&BuildId::from("b3"), "x");
        assert_eq!(s.len(), 3);
        assert!(s.reader(&BuildId::from("b1")).is_none());
        assert!(s.reader(&BuildId::from("b0")).is_some());
        s.append(&BuildId::from("b4"), "x");
        assert!(s.reader(&BuildId::from("b0")).is_none());
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let s = store(1000, 3);
        let id = BuildId::from("b");
        s.append(&id, &"é".repeat(100));
        let (chunk, _) = s.reader(&id).unwrap().read_available(10);
        assert!(chunk.lines[0].len() <= 64 + "…".len());
        assert!(chunk.lines[0].ends_with('…'));
    }

    #[tokio::test]
    async fn a_follower_sees_every_line_then_the_end() {
        let s = Arc::new(store(1 << 20, 4));
        let id = BuildId::from("b");
        s.open(&id);
        let mut r = s.reader(&id).unwrap();
        let writer = {
            let s = s.clone();
            let id = id.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    s.append(&id, &format!("{i}"));
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                s.close(&id);
            })
        };
        let mut got = Vec::new();
        while let Some(chunk) = r.next_chunk(64).await {
            assert_eq!(chunk.dropped, 0);
            got.extend(chunk.lines);
        }
        writer.await.unwrap();
        let want: Vec<String> = (0..500).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }
}
