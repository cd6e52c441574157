//! The cache's writer lock: a POSIX `fcntl` write lock on `<cache>/.lock`, the lock
//! LinuxKit takes, behind an in-process mutex (fcntl locks are per process, so threads of
//! one process would otherwise share it, and closing any descriptor of the file would drop
//! it).

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::{FcntlArg, fcntl};

use super::CacheError;

/// Held while writing `index.json` or collecting garbage. Released on drop.
#[derive(Debug)]
pub struct CacheLock<'a> {
    file: File,
    _guard: MutexGuard<'a, ()>,
}

fn flock(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

impl<'a> CacheLock<'a> {
    pub(super) fn acquire(writers: &'a Mutex<()>, path: &Path) -> Result<Self, CacheError> {
        // A poisoned mutex only means another writer panicked; the on-disk state is still
        // whole (every write is atomic), so the lock can be taken over.
        let guard = writers.lock().unwrap_or_else(|p| p.into_inner());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(CacheError::io(path))?;
        loop {
            match fcntl(file.as_fd(), FcntlArg::F_SETLKW(&flock(libc::F_WRLCK))) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(CacheError::io(path)(e.into())),
            }
        }
        Ok(CacheLock {
            file,
            _guard: guard,
        })
    }
}

impl Drop for CacheLock<'_> {
    fn drop(&mut self) {
        // Closing the file releases the lock as well; unlocking first makes the order
        // explicit and releases it before the in-process mutex.
        let _ = fcntl(self.file.as_fd(), FcntlArg::F_SETLK(&flock(libc::F_UNLCK)));
    }
}
