//! Who owns kilnd's tasks, so that shutdown ends every one of them, in order
//! (ARCHITECTURE.md, "Every task is owned"): first nothing new is accepted and the work
//! that must finish once started (registry uploads, pushes to upstreams, transfers, gc)
//! drains; then the builds are cancelled and awaited (a landing in progress finishes).
//! Each phase is bounded; one that overruns is logged and cut.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// kilnd's tasks, by how shutdown ends them.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    /// Cancelled when kilnd stops accepting work: listeners close, loops end, pushes
    /// stop retrying.
    pub stopping: CancellationToken,
    /// What must finish once started: awaited before any build is cancelled.
    pub drain: TaskTracker,
    /// Cancelled after the drain: the queue cancels its builds and ends.
    pub cancel_builds: CancellationToken,
    /// The queue's actor and its builds.
    pub builds: TaskTracker,
}

impl Owned {
    /// Stops accepting, drains, then cancels and awaits the builds; each phase waits at
    /// most `limit` (what is left then is logged, and dropped when kilnd exits).
    pub async fn shutdown(&self, limit: Duration) {
        self.stopping.cancel();
        bounded_wait(&self.drain, limit, "uploads, pushes or transfers").await;
        self.cancel_builds.cancel();
        bounded_wait(&self.builds, limit, "cancelled builds").await;
    }
}

/// Closes `tasks` and waits for them, at most `limit`; says so when that is not enough.
async fn bounded_wait(tasks: &TaskTracker, limit: Duration, what: &str) {
    tasks.close();
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "shutdown: {what} still run after {}s; stopping anyway",
            limit.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_then_cancels_builds_and_bounds_each_phase() {
        let owned = Owned::default();
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        // A push in flight: it sees `stopping` but finishes its work.
        let (tx, stopping) = (order_tx.clone(), owned.stopping.clone());
        owned.drain.spawn(async move {
            stopping.cancelled().await;
            tokio::task::yield_now().await;
            let _ = tx.send("push finished");
        });
        // A build: it runs until cancelled, which must come after the drain.
        let (tx, cancel) = (order_tx.clone(), owned.cancel_builds.clone());
        owned.builds.spawn(async move {
            cancel.cancelled().await;
            let _ = tx.send("build cancelled");
        });
        // A build that ignores its cancellation: the bound cuts the wait.
        owned.builds.spawn(std::future::pending::<()>());
        // The bound under test: the stuck build is waited for this long.
        owned.shutdown(Duration::from_millis(200)).await;
        assert_eq!(order.recv().await, Some("push finished"));
        assert_eq!(order.recv().await, Some("build cancelled"));
        assert_eq!(owned.builds.len(), 1, "the stuck build is left to the exit");
    }
}
