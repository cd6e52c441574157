//! Whether a file is open for writing right now, asked of the kernel rather than read
//! from events. inotify posts a truncation's event only once `open(O_TRUNC)` has
//! finished, and the file is already empty before that: for a while a reader sees an
//! empty file that no event speaks of (under load, for milliseconds). The writer holds
//! the file open for writing from before the truncation until after its last event is
//! posted (`__fput` posts IN_CLOSE_WRITE before it drops the write access), so a check of
//! "open for writing" made after a read, followed by a fence ([`super::Touched::settle`]),
//! knows of every write that read may have seen half done.
//!
//! The kernel answers this through read leases: `fcntl(F_SETLEASE, F_RDLCK)` is refused
//! with EAGAIN while any process has the file open for writing (`inode_is_open_for_write`).
//! The lease is released at once. Neither nix nor rustix wraps F_SETLEASE, hence the two
//! `libc::fcntl` calls below. A lease is broken by a writer's open while it is held (for
//! microseconds); the kernel then sends SIGIO, so the watcher installs a handler for it
//! first (its default action ends the process), and uses leases only if it could.
//!
//! Where leases cannot be taken (a file of another owner without CAP_LEASE, a file system
//! without them, `fs.leases-enable = 0`) the answer is "unknown", taken as "not open":
//! the events alone decide, as before.

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A file held open for writing but not modified for this long is taken as it is (a log
/// kept open, an editor holding a descriptor): only a recent writer makes a read unsure.
const HELD_OPEN: Duration = Duration::from_secs(1);

/// Whether `file` is open for writing by some process (`None`: cannot tell).
fn open_for_writing(file: &Path) -> Option<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(file)
        .ok()?;
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `f` for the whole call; F_SETLEASE takes
    // an int argument and touches no memory of ours.
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// The first file under `dirs` that a process has open for writing and that changed
/// lately, if any. Skips what `ignored` says (editor swap files stay open while editing,
/// `.git`, kiln's cache). Blocking: reads the directories.
pub(super) fn being_written(dirs: &[&Path], ignored: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let now = SystemTime::now();
    let recent = |m: &std::fs::Metadata| {
        [m.modified(), m.created()]
            .into_iter()
            .flatten()
            .chain(ctime(m))
            .any(|t| now.duration_since(t).map_or(true, |d| d < HELD_OPEN))
    };
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if ignored(&path) {
                continue;
            }
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && e.metadata().is_ok_and(|m| recent(&m))
                && open_for_writing(&path) == Some(true)
            {
                return Some(path);
            }
        }
    }
    None
}

/// The inode's change time (a truncation in progress may not have set the mtime yet).
fn ctime(m: &std::fs::Metadata) -> Option<SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let secs = u64::try_from(m.ctime()).ok()?;
    let nanos = u32::try_from(m.ctime_nsec()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_file_is_open_for_writing_until_its_writer_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "old").unwrap();
        assert_eq!(open_for_writing(&file), Some(false));
        assert_eq!(being_written(&[dir.path()], |_| false), None);
        let mut w = std::fs::File::create(&file).unwrap();
        assert_eq!(open_for_writing(&file), Some(true));
        assert_eq!(being_written(&[dir.path()], |_| false), Some(file.clone()));
        assert_eq!(being_written(&[dir.path()], |p| p == file), None, "ignored");
        w.write_all(b"new").unwrap();
        drop(w);
        assert_eq!(open_for_writing(&file), Some(false));
        assert_eq!(being_written(&[dir.path()], |_| false), None);
    }
}
