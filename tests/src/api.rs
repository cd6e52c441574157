//! kilnd's control API from a test, over its unix socket with nothing but std: the state
//! snapshot (`GET /api/v1/state`), requests (`POST /api/v1/build`, `/cancel`), and an
//! [`Events`] recorder that follows `GET /api/v1/events` on a thread, keeps every event
//! and folds them into the snapshot with the protocol's own reducer, so that a test waits
//! on the daemon's state without polling the socket and counts exactly the builds queued.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use kiln_shared::protocol::{
    API_PREFIX, Event, PROTOCOL_HEADER, PROTOCOL_VERSION, QueuedBuild, Snapshot, StreamItem,
    TargetStatus,
};

/// A client of one kilnd's control socket.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Api {
    pub fn new(socket: impl AsRef<Path>) -> Api {
        Api {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// `GET /api/v1/state`.
    pub fn state(&self) -> Snapshot {
        let a = self.request("GET", "/state", None);
        assert_eq!(a.status, 200, "GET {API_PREFIX}/state: {}", a.body);
        serde_json::from_str(&a.body)
            .unwrap_or_else(|e| panic!("GET {API_PREFIX}/state: {e}: {}", a.body))
    }

    /// `POST /api/v1/<path>` with a JSON body; the answer whatever its status.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Answer {
        self.request("POST", path, Some(body.to_string()))
    }

    /// One request on a fresh connection (`Connection: close`), the body de-chunked.
    pub fn request(&self, method: &str, path: &str, body: Option<String>) -> Answer {
        let mut stream = self.connect();
        let body = body.unwrap_or_default();
        write!(
            stream,
            "{method} {API_PREFIX}{path} HTTP/1.1\r\nHost: kilnd\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap_or_else(|e| panic!("write to {}: {e}", self.socket.display()));
        let mut reader = BufReader::new(stream);
        let (status, chunked, length) = read_head(&mut reader, &self.socket);
        let bytes = if chunked {
            let mut all = Vec::new();
            while let Some(chunk) = read_chunk(&mut reader) {
                all.extend(chunk);
            }
            all
        } else {
            let mut all = Vec::new();
            match length {
                Some(n) => {
                    all.resize(n, 0);
                    reader
                        .read_exact(&mut all)
                        .unwrap_or_else(|e| panic!("{method} {path}: body of {n} bytes: {e}"));
                }
                None => {
                    let _ = reader.read_to_end(&mut all);
                }
            }
            all
        };
        Answer {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to kilnd's socket {}: {e}", self.socket.display()))
    }

    /// Follows `GET /api/v1/events` from now on.
    pub fn events(&self) -> Events {
        Events::follow(self)
    }
}

/// Reads the status line and headers: (status, chunked, content-length).
fn read_head(reader: &mut impl BufRead, socket: &Path) -> (u16, bool, Option<usize>) {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("read from {}: {e}", socket.display()));
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "not an HTTP status line from {}: {line:?}",
                socket.display()
            )
        });
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read headers from {}: {e}", socket.display()));
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            }
        }
    }
    (status, chunked, length)
}

/// One chunk of a chunked body; `None` at the last chunk or when the stream ends.
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim().split(';').next()?.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).ok()?;
    chunk.truncate(size);
    Some(chunk)
}

/// What the recorder has seen.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The first snapshot with every later event folded in.
    pub snapshot: Snapshot,
    /// Every event after the first snapshot, in order.
    pub events: Vec<Event>,
    /// Why the stream ended, if it did.
    pub ended: Option<String>,
    /// Snapshots sent again because the recorder lagged (events may be missing then).
    pub resyncs: u32,
}

/// A follower of kilnd's event stream; stops when dropped.
#[derive(Debug)]
pub struct Events {
    shared: Arc<(Mutex<Recorded>, Condvar)>,
    stream: UnixStream,
    thread: Option<thread::JoinHandle<()>>,
}

impl Events {
    fn follow(api: &Api) -> Events {
        let mut stream = api.connect();
        write!(
            stream,
            "GET {API_PREFIX}/events HTTP/1.1\r\nHost: kilnd\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n\r\n"
        )
        .unwrap_or_else(|e| panic!("write to {}: {e}", api.socket.display()));
        let reading = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("clone the events socket: {e}"));
        let mut reader = BufReader::new(reading);
        let (status, chunked, _) = read_head(&mut reader, &api.socket);
        assert_eq!(status, 200, "GET {API_PREFIX}/events answered {status}");
        assert!(chunked, "GET {API_PREFIX}/events is not a chunked stream");
        let shared = Arc::new((Mutex::new(Recorded::default()), Condvar::new()));
        let first = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let shared = Arc::clone(&shared);
            let first = Arc::clone(&first);
            thread::spawn(move || {
                let mut pending = Vec::new();
                let why = loop {
                    let Some(chunk) = read_chunk(&mut reader) else {
                        break "the event stream ended".to_owned();
                    };
                    pending.extend(chunk);
                    while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=nl).collect();
                        let item: StreamItem = match serde_json::from_slice(&line) {
                            Ok(i) => i,
                            Err(e) => {
                                let text = String::from_utf8_lossy(&line).into_owned();
                                let mut r = lock(&shared.0);
                                r.ended = Some(format!("bad event line {text:?}: {e}"));
                                shared.1.notify_all();
                                return;
                            }
                        };
                        let mut r = lock(&shared.0);
                        match item {
                            StreamItem::Snapshot { snapshot } => {
                                let again = *lock(&first.0);
                                if again {
                                    r.resyncs += 1;
                                }
                                r.snapshot = *snapshot;
                                *lock(&first.0) = true;
                                first.1.notify_all();
                            }
                            StreamItem::Event { event, .. } => {
                                r.snapshot.apply(&event);
                                r.events.push(event);
                            }
                        }
                        shared.1.notify_all();
                    }
                };
                lock(&shared.0).ended = Some(why);
                shared.1.notify_all();
                *lock(&first.0) = true;
                first.1.notify_all();
            })
        };
        // The first snapshot arrives before this returns: events from now on are seen.
        let (m, cv) = &*first;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = lock(m);
        while !*got {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no snapshot on kilnd's event stream in 30 s"
            );
            got = cv
                .wait_timeout(got, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        drop(got);
        Events {
            shared,
            stream,
            thread: Some(thread),
        }
    }

    /// The current folded snapshot.
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.shared.0).snapshot.clone()
    }

    /// How many events were seen so far: a mark for [`Events::since`].
    pub fn mark(&self) -> usize {
        lock(&self.shared.0).events.len()
    }

    /// The events seen after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Event> {
        lock(&self.shared.0).events[mark..].to_vec()
    }

    /// The builds queued after `mark`.
    pub fn queued_since(&self, mark: usize) -> Vec<QueuedBuild> {
        self.since(mark)
            .into_iter()
            .filter_map(|e| match e {
                Event::Queued { build } => Some(build),
                _ => None,
            })
            .collect()
    }

    /// `(package, arch)` of the builds queued after `mark`, sorted, duplicates kept.
    pub fn queued_targets_since(&self, mark: usize) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .queued_since(mark)
            .into_iter()
            .map(|b| (b.package, b.arch))
            .collect();
        v.sort();
        v
    }

    /// Waits until `cond` holds on the folded snapshot; panics after `timeout` with what
    /// was awaited and the snapshot's packages.
    pub fn wait(
        &self,
        timeout: Duration,
        what: impl std::fmt::Display,
        mut cond: impl FnMut(&Snapshot) -> bool,
    ) -> Snapshot {
        let (m, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut r = lock(m);
        loop {
            if cond(&r.snapshot) {
                return r.snapshot.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || r.ended.is_some() {
                panic!(
                    "timed out after {timeout:?} waiting for {what}{}\nkilnd's state:\n{}",
                    r.ended
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default(),
                    describe(&r.snapshot)
                );
            }
            r = cv
                .wait_timeout(r, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Waits until nothing is queued or building and every target of every package
    /// without an error has a final status for the package's current tag.
    pub fn wait_settled(&self, timeout: Duration) -> Snapshot {
        self.wait(timeout, "kilnd to settle", settled)
    }

    /// Waits until every target of `package` is Ok at the package's current tag and
    /// nothing is queued or building.
    pub fn wait_built(&self, timeout: Duration, package: &str) -> Snapshot {
        self.wait(timeout, format!("{package} to be built"), |s| {
            settled(s) && package_ok(s, package)
        })
    }

    /// How often kilnd sent a fresh snapshot because the recorder lagged (events may be
    /// missing then): asserts that count events check that it is 0.
    pub fn resyncs(&self) -> u32 {
        lock(&self.shared.0).resyncs
    }
}

/// Nothing in flight, and every package's targets are final for its current tag.
pub fn settled(s: &Snapshot) -> bool {
    s.queue.is_empty()
        && s.running.is_empty()
        && s.packages.values().all(|p| {
            p.error.is_some()
                || p.targets.values().all(|t| {
                    matches!(
                        t.status,
                        TargetStatus::Ok | TargetStatus::Failed | TargetStatus::Cancelled
                    ) && t.tag == p.tag
                })
        })
}

/// Every target of `package` is Ok, with a digest, at the package's tag.
pub fn package_ok(s: &Snapshot, package: &str) -> bool {
    s.packages.get(package).is_some_and(|p| {
        p.error.is_none()
            && !p.targets.is_empty()
            && p.targets
                .values()
                .all(|t| t.status == TargetStatus::Ok && t.tag == p.tag && t.digest.is_some())
    })
}

/// The snapshot's packages, one line per target, for failure messages.
pub fn describe(s: &Snapshot) -> String {
    let mut out = String::new();
    for p in s.packages.values() {
        out.push_str(&format!(
            "  {} tag={} error={:?}\n",
            p.name,
            p.tag.as_ref().map_or("-", |t| t.as_str()),
            p.error
        ));
        for (arch, t) in &p.targets {
            out.push_str(&format!(
                "    {arch}: {:?} tag={} digest={} last={:?}\n",
                t.status,
                t.tag.as_ref().map_or("-", |t| t.as_str()),
                t.digest
                    .as_ref()
                    .map_or("-".to_owned(), ToString::to_string),
                t.last.as_ref().map(|l| (&l.id, l.outcome, &l.error))
            ));
        }
    }
    out.push_str(&format!(
        "  queue={:?} running={:?} watch_error={:?}\n",
        s.queue
            .iter()
            .map(|b| format!("{} {} {}", b.id, b.package, b.arch))
            .collect::<Vec<_>>(),
        s.running
            .iter()
            .map(|b| format!("{} {} {}", b.id, b.package, b.arch))
            .collect::<Vec<_>>(),
        s.watch_error
    ));
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding it leaves data that is still worth reading.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A package's current tag in the snapshot (panics, showing the state, if it has none).
pub fn tag_of(s: &Snapshot, package: &str) -> String {
    s.packages
        .get(package)
        .and_then(|p| p.tag.as_ref())
        .unwrap_or_else(|| panic!("{package} has no tag:\n{}", describe(s)))
        .to_string()
}

/// (arch, digest or "-") of each target of a package.
pub fn digests_of(s: &Snapshot, package: &str) -> Vec<(String, String)> {
    s.packages[package]
        .targets
        .iter()
        .map(|(a, t)| {
            (
                a.clone(),
                t.digest.as_ref().map_or("-".into(), ToString::to_string),
            )
        })
        .collect()
}
