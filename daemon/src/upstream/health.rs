//! Whether an upstream answers: one that cannot be reached is marked down and skipped
//! until a retry time that backs off (5 s, 10 s, 20 s ... at most 5 min), so it costs one
//! short connect timeout, not a stalled build per target.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_shared::protocol::UpstreamInfo;

const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub(super) struct Tracker {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    known: bool,
    down: Option<(String, Instant)>,
    failures: u32,
}

impl Tracker {
    /// `Some((error, time left))` while the upstream is down and not due for a retry.
    pub(super) fn down(&self) -> Option<(String, Duration)> {
        let state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (error, until) = state.down.as_ref()?;
        let now = Instant::now();
        (now < *until).then(|| (error.clone(), *until - now))
    }

    pub(super) fn up(&self) {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        state.known = true;
        state.down = None;
        state.failures = 0;
    }

    /// Marks the upstream down; returns the wait before the next try.
    pub(super) fn failed(&self, error: String) -> Duration {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let wait = FIRST_RETRY
            .saturating_mul(1 << state.failures.min(8))
            .min(MAX_RETRY);
        state.known = true;
        state.failures = state.failures.saturating_add(1);
        state.down = Some((error, Instant::now() + wait));
        wait
    }

    /// The state as the dashboard shows it, for the upstream `name`.
    pub(super) fn info(&self, name: String, push: bool) -> UpstreamInfo {
        let state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (state, error) = match &state.down {
            Some((error, _)) => ("down", Some(error.clone())),
            None if state.known => ("up", None),
            None => ("unknown", None),
        };
        UpstreamInfo {
            name,
            push,
            state: state.to_owned(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_backs_off_and_up_resets() {
        let t = Tracker::default();
        let state = |t: &Tracker| t.info("r".into(), false).state;
        assert_eq!(state(&t), "unknown");
        assert!(t.down().is_none());
        assert_eq!(t.failed("refused".into()), Duration::from_secs(5));
        assert_eq!(t.failed("refused".into()), Duration::from_secs(10));
        assert_eq!(state(&t), "down");
        assert_eq!(t.down().unwrap().0, "refused");
        for _ in 0..10 {
            t.failed("refused".into());
        }
        assert_eq!(t.failed("x".into()), MAX_RETRY);
        t.up();
        assert_eq!(state(&t), "up");
        assert_eq!(t.failed("x".into()), Duration::from_secs(5));
    }
}
