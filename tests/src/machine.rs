//! Machine-wide settings that a test may change (e.g. `fs.inotify.max_user_watches`): the
//! test that changes one holds [`exclusive`] while every test that runs kilnd holds
//! [`shared`] (taken by [`crate::Kilnd::start`]), so the change cannot break tests running
//! in parallel in this process. [`Sysctl`] restores a setting when dropped, even on panic.

use std::cell::Cell;
use std::fs;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Readers (tests running kilnd) and whether a writer holds the machine.
#[derive(Default)]
struct State {
    readers: usize,
    writer: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    readers: 0,
    writer: false,
});
static CHANGED: Condvar = Condvar::new();

thread_local! {
    /// This thread holds the exclusive token: its own kilnds need no shared one.
    static EXCLUSIVE_HERE: Cell<bool> = const { Cell::new(false) };
}

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A test that relies on the machine's settings as they are; released on drop.
#[derive(Debug)]
pub struct SharedToken {
    held: bool,
}

/// A test that changes the machine's settings; released on drop.
#[derive(Debug)]
pub struct ExclusiveToken(());

/// Waits until no test changes machine settings, then holds them for reading. On the
/// thread that holds [`exclusive`] it returns at once (and holds nothing).
pub fn shared() -> SharedToken {
    if EXCLUSIVE_HERE.with(Cell::get) {
        return SharedToken { held: false };
    }
    let mut s = state();
    while s.writer {
        s = CHANGED.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    s.readers += 1;
    SharedToken { held: true }
}

/// Waits until no other test holds the machine, then holds it alone.
pub fn exclusive() -> ExclusiveToken {
    let mut s = state();
    while s.writer || s.readers > 0 {
        s = CHANGED.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    s.writer = true;
    EXCLUSIVE_HERE.with(|c| c.set(true));
    ExclusiveToken(())
}

impl Drop for SharedToken {
    fn drop(&mut self) {
        if self.held {
            state().readers -= 1;
            CHANGED.notify_all();
        }
    }
}

impl Drop for ExclusiveToken {
    fn drop(&mut self) {
        EXCLUSIVE_HERE.with(|c| c.set(false));
        state().writer = false;
        CHANGED.notify_all();
    }
}

/// A `/proc/sys` setting changed for a test, put back when dropped (also on panic).
#[derive(Debug)]
pub struct Sysctl {
    path: PathBuf,
    old: String,
    restored: bool,
}

impl Sysctl {
    /// Sets `name` (e.g. `fs/inotify/max_user_watches`) to `value`; the caller holds
    /// [`exclusive`].
    pub fn set(_held: &ExclusiveToken, name: &str, value: &str) -> Sysctl {
        let path = PathBuf::from("/proc/sys").join(name);
        let old = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .trim()
            .to_owned();
        fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
        Sysctl {
            path,
            old,
            restored: false,
        }
    }

    /// The value before the change.
    pub fn old(&self) -> &str {
        &self.old
    }

    /// Puts the old value back now.
    pub fn restore(&mut self) {
        if !self.restored {
            fs::write(&self.path, &self.old).unwrap_or_else(|e| {
                panic!(
                    "could not restore {} to {}: {e}; restore it by hand",
                    self.path.display(),
                    self.old
                )
            });
            self.restored = true;
        }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = fs::write(&self.path, &self.old) {
                eprintln!(
                    "could not restore {} to {}: {e}; restore it by hand",
                    self.path.display(),
                    self.old
                );
            }
            self.restored = true;
        }
    }
}
