//! Scratch files that writes leave behind when their process dies (a crash, a kill -9):
//! temp files of blob writes and of `index.json`, blobs gc was removing, registry
//! uploads. A file is a leftover only when no live process can be writing it: its name
//! carries the pid of its writer, and that process is gone (or, for names kiln does not
//! write, it has been untouched for a day). kilnd removes leftovers when it starts,
//! under the writer lock ([`Cache::remove_leftovers`]); `kiln fsck` reports them as a
//! warning and `--repair` removes them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Cache, CacheError};

/// Files under `.kiln/uploads/` untouched for this long are abandoned registry uploads.
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Files with unknown names in kiln's scratch directories, or non-blob files in
/// `blobs/sha256` (where other tools such as LinuxKit may stage their writes), are only
/// called leftovers when untouched for this long.
pub const FOREIGN_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// A file left behind by an interrupted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    pub bytes: u64,
    pub reason: String,
    pub removed: bool,
}

pub(super) fn age(meta: &fs::Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or(Duration::ZERO)
}

/// Bytes under a path (a file, or a directory tree).
pub(super) fn tree_size(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| tree_size(&e.path()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The newest mtime of a path and, for a directory, of its entries (an upload directory
/// whose files are being appended to is in use).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = fs::symlink_metadata(path).ok()?;
    let mut newest = meta.modified().ok()?;
    if meta.is_dir()
        && let Ok(rd) = fs::read_dir(path)
    {
        for e in rd.filter_map(Result::ok) {
            if let Some(t) = newest_mtime(&e.path()) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}

/// Whether a process with this id exists (a zombie counts: it has not been reaped).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

fn parse_pid(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What a file in one of the scratch places is.
enum Scratch {
    /// Written by the process with this id.
    Owned(i32),
    /// A name kiln does not write there.
    Foreign,
}

/// The scratch files of `cache`: leftovers of dead writers, and paths of writes in
/// progress (left alone).
pub(super) fn find(cache: &Cache, now: SystemTime) -> Result<Scan, CacheError> {
    let mut report = Scan::default();
    let report = &mut report;
    let kiln = cache.root.join(".kiln");
    // `<dir>/.<name>.tmp-<pid>`: write_atomic's temp files (index.json, oci-layout,
    // usage.json). Other dot files there are not kiln's and are left alone.
    for dir in [cache.root.as_path(), kiln.as_path()] {
        scan(dir, now, report, |name| {
            let rest = name.strip_prefix('.')?;
            let (_, pid) = rest.rsplit_once(".tmp-")?;
            Some(parse_pid(pid).map_or(Scratch::Foreign, Scratch::Owned))
        })?;
    }
    // `.kiln/tmp/blob-<pid>-<n>`: blob writes.
    scan(&cache.tmp, now, report, |name| {
        let pid = name
            .strip_prefix("blob-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, n)| parse_pid(n).and(parse_pid(pid)));
        Some(pid.map_or(Scratch::Foreign, Scratch::Owned))
    })?;
    // `.kiln/trash/<hex>-<pid>`: blobs gc was removing.
    scan(&kiln.join("trash"), now, report, |name| {
        let pid = name.rsplit_once('-').and_then(|(_, pid)| parse_pid(pid));
        Some(pid.map_or(Scratch::Foreign, Scratch::Owned))
    })?;
    // `.kiln/uploads/*`: registry upload sessions, abandoned after a day without writes.
    let uploads = kiln.join("uploads");
    match fs::read_dir(&uploads) {
        Ok(rd) => {
            for e in rd.filter_map(Result::ok) {
                let path = e.path();
                let idle = newest_mtime(&path)
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or(Duration::ZERO);
                if idle >= UPLOAD_MAX_AGE {
                    report.leftovers.push(Leftover {
                        bytes: tree_size(&path),
                        reason: format!(
                            "registry upload untouched for {} h",
                            idle.as_secs() / 3600
                        ),
                        path,
                        removed: false,
                    });
                } else {
                    report.in_progress.push(path);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(CacheError::io(uploads)(e)),
    }
    report.leftovers.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(std::mem::take(report))
}

/// Sorts the files of `dir` that `classify` recognises (`None`: not a scratch file, skip)
/// into leftovers and writes in progress.
fn scan(
    dir: &Path,
    now: SystemTime,
    report: &mut Scan,
    classify: impl Fn(&str) -> Option<Scratch>,
) -> Result<(), CacheError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io(dir)(e)),
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(kind) = name.to_str().and_then(&classify) else {
            continue;
        };
        let path = e.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let reason = match kind {
            Scratch::Owned(pid) if pid_alive(pid) => None,
            Scratch::Owned(pid) => Some(format!("temp file of a dead process (pid {pid})")),
            Scratch::Foreign if age(&meta, now) >= FOREIGN_MAX_AGE => {
                Some("unknown file in kiln's scratch space, untouched for a day".into())
            }
            Scratch::Foreign => None,
        };
        match reason {
            Some(reason) => report.leftovers.push(Leftover {
                bytes: tree_size(&path),
                path,
                reason,
                removed: false,
            }),
            None => report.in_progress.push(path),
        }
    }
    Ok(())
}

/// What a scan of the scratch places found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub leftovers: Vec<Leftover>,
    /// Temp files of live processes (writes in progress).
    pub in_progress: Vec<PathBuf>,
}

/// Removes one leftover (a file or a directory tree); a file already gone counts as
/// removed.
pub(super) fn remove(l: &mut Leftover) -> io::Result<()> {
    let result = match fs::symlink_metadata(&l.path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&l.path),
        Ok(_) => fs::remove_file(&l.path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    l.removed = result.is_ok();
    result
}

impl Cache {
    /// Removes what dead writers left in the cache's scratch places, under the writer
    /// lock (so no gc of this or another process is parking blobs meanwhile); files of
    /// live processes stay. Returns what was found, each marked as removed or not (a
    /// failure is logged and the file stays).
    pub fn remove_leftovers(&self) -> Result<Vec<Leftover>, CacheError> {
        let _lock = self.lock()?;
        let mut scan = find(self, SystemTime::now())?;
        for l in &mut scan.leftovers {
            if let Err(e) = remove(l) {
                tracing::warn!(path = %l.path.display(), error = %e, "cannot remove a leftover temp file");
            }
        }
        Ok(scan.leftovers)
    }
}
