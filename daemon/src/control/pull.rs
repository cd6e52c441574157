//! Build on pull: a pull of a workspace package's current tag that the cache lacks
//! starts (or joins) its builds; the registry's hook waits for them.

use tokio::sync::oneshot;

use super::Controller;
use crate::plan;
use crate::schedule::Outcome;

/// A pull of a tag that the cache lacks: the builds to wait for. An empty list means the
/// tag is not a workspace package's current tag.
#[derive(Debug)]
pub struct PullMiss {
    pub repo: String,
    pub tag: String,
    pub reply: oneshot::Sender<Vec<oneshot::Receiver<Outcome>>>,
}

impl Controller {
    /// A pull of `repo:tag` that the cache lacks: if it is a workspace package's current
    /// tag (or one arch of it, or the dev tag), queue what is missing and hand back the
    /// builds to wait for.
    pub async fn on_pull_miss(&mut self, miss: PullMiss) {
        let Some(p) = plan::find(&self.table, &miss.repo) else {
            let _ = miss.reply.send(Vec::new());
            return;
        };
        let index = self.cache.index().ok();
        let jobs = plan::pull_jobs(&p, &miss.tag, &self.cfg.dev_tag, index.as_deref());
        let waits = if jobs.is_empty() {
            Vec::new()
        } else {
            self.sched
                .submit_joined(jobs)
                .await
                .map(|j| j.into_iter().map(|(_, rx)| rx).collect())
                .unwrap_or_default()
        };
        let _ = miss.reply.send(waits);
    }
}
