//! Waiting for something to become true without sleeping a fixed time: poll a condition
//! until it holds or a deadline passes, and say what was awaited when it never came.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

/// The deadline passed before the condition held.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub waited: Duration,
}

/// Polls `cond` until it returns `Some(value)`, at most `timeout`; the first poll is at
/// once, then the pause between polls grows from 1 ms to 100 ms.
pub fn try_wait_for<T>(
    timeout: Duration,
    what: impl Display,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                waited: now - started,
            });
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`try_wait_for`], panicking with "timed out after ... waiting for `what`".
pub fn wait_for<T>(timeout: Duration, what: impl Display, cond: impl FnMut() -> Option<T>) -> T {
    try_wait_for(timeout, what, cond).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `cond` until it is true, at most `timeout`; panics with `what` otherwise.
pub fn wait_until(timeout: Duration, what: impl Display, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn returns_at_once_when_already_true() {
        let polls = Cell::new(0);
        let v = try_wait_for(Duration::from_secs(5), "x", || {
            polls.set(polls.get() + 1);
            Some(42)
        })
        .unwrap();
        assert_eq!((v, polls.get()), (42, 1));
    }

    #[test]
    fn polls_until_the_condition_holds() {
        let polls = Cell::new(0);
        let v = try_wait_for(Duration::from_secs(5), "x", || {
            polls.set(polls.get() + 1);
            (polls.get() == 5).then_some("done")
        })
        .unwrap();
        assert_eq!((v, polls.get()), ("done", 5));
    }

    #[test]
    fn times_out_naming_what_it_waited_for() {
        let started = Instant::now();
        let err =
            try_wait_for(Duration::from_millis(150), "the ready file", || None::<()>).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(msg.starts_with("timed out after "), "{msg}");
        assert!(msg.ends_with(" waiting for the ready file"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "waiting for the moon")]
    fn wait_until_panics_on_timeout() {
        wait_until(Duration::from_millis(10), "the moon", || false);
    }
}
