//! The build queue: bounded concurrency, dependency order, no target queued twice, newer
//! tags superseding older ones, and waiters (a `docker pull` of a tag being built joins
//! its build).
//!
//! One actor task owns all state; callers talk to it through [`Scheduler`]. What a build
//! does is the [`Runner`]'s business (the docker or the native builder); what happens is
//! reported through [`SchedEvent`]s. The actor and every build run on the caller's
//! [`TaskTracker`]; cancelling the stop token cancels what runs, ends what is queued, and
//! ends the actor once the running builds have stopped, so awaiting the tracker awaits
//! them all.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_shared::protocol::BuildId;
use kiln_shared::reference::Tag;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::oci::Descriptor;
use crate::workspace::BuilderKind;

/// One package and architecture: the slot that one build at a time may fill.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    /// The package's repository, `org/image`.
    pub package: String,
    pub arch: String,
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.package, self.arch)
    }
}

/// A build to do: a target at a tag, after the targets it depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub key: TargetKey,
    pub tag: Tag,
    /// Targets (at their tags) whose images this build uses; it starts after they are
    /// built, and fails if one of them fails. A dependency the queue does not know is
    /// taken as already built.
    pub after: Vec<(TargetKey, Tag)>,
    /// Build even if the cache holds the target (the runner decides what that means).
    pub force: bool,
    /// Ask the upstreams for the target before building it (false once they were asked
    /// for this tag and did not have it).
    pub look_up: bool,
    /// Why it was queued, for display.
    pub reason: QueueReason,
    /// Which builder runs it.
    pub builder: BuilderKind,
    /// The builder was `auto`'s choice: native, unless it refuses something it finds only
    /// while building (an xz archive in ADD, a base with ONBUILD), then docker.
    pub fallback: bool,
}

/// Why a target was queued (shown as the protocol's `QueuedBuild::reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueReason {
    /// kilnd started and planned the workspace.
    Start,
    /// Files of the package (or of one it follows) changed.
    FilesChanged,
    /// The watcher lost events and the workspace was planned again.
    Rescan,
    /// A package being built follows it.
    Dependency,
    /// `kiln build`.
    Requested,
    /// A client pulled a tag of it that the cache lacks.
    Pulled,
}

impl QueueReason {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueReason::Start => "start",
            QueueReason::FilesChanged => "files changed",
            QueueReason::Rescan => "rescan",
            QueueReason::Dependency => "dependency",
            QueueReason::Requested => "requested",
            QueueReason::Pulled => "pulled",
        }
    }
}

impl fmt::Display for QueueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a successful build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The architecture's image manifest, now in the cache.
    pub manifest: Descriptor,
    /// Steps answered by the builder's cache, and steps in all.
    pub cache_hits: u32,
    pub steps: u32,
    /// Fetched from this upstream instead of built (boxed: keeps the queue's messages
    /// small).
    pub pulled_from: Option<Box<str>>,
    /// Which builder built it (`Cache` when it was there already).
    pub builder: kiln_shared::protocol::BuiltBy,
}

/// How a build ended.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // rare, short-lived values
pub enum Outcome {
    Built(Built),
    Failed(Failure),
    Cancelled(CancelReason),
}

/// An error any part of a build may end with, its sources kept; shared, as the same
/// error goes to the bus and to every waiter.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a build failed: the runner's error, or the queue's own reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Run(SharedError),
    /// A target it follows failed at the tag it needs.
    #[error("dependency {dep} failed: {source}")]
    Dependency {
        dep: TargetKey,
        #[source]
        source: Box<Failure>,
    },
    #[error("dependency {dep} was cancelled: {reason}")]
    DependencyCancelled {
        dep: TargetKey,
        reason: CancelReason,
    },
    /// The build's task ended without an answer (it panicked).
    #[error("the build task failed: {0}")]
    Task(#[source] Arc<tokio::task::JoinError>),
}

/// Why a build was cancelled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CancelReason {
    /// `kiln cancel`, or a cancel with no reason of its own.
    #[error("cancelled by request")]
    Requested,
    /// kilnd stops.
    #[error("kilnd is shutting down")]
    ShuttingDown,
    /// The package is no longer planned (removed, or broken).
    #[error("{0} is no longer a package of the workspace that can be built")]
    Unplanned(String),
    /// A newer tag of the target was queued.
    #[error("superseded by tag {0}")]
    NewerTag(Tag),
    /// The tag it builds is current again and the cache serves it.
    #[error("superseded: tag {0} is current again and served from the cache")]
    Served(Tag),
    /// The runner found that what it would land no longer matches the tag.
    #[error("superseded: {0}")]
    Superseded(SharedError),
}

/// What the queue did, for the event bus. (Events are rare; boxing the larger variant
/// would buy nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SchedEvent {
    Queued {
        key: TargetKey,
        tag: Tag,
        build_id: BuildId,
        reason: QueueReason,
    },
    Started {
        key: TargetKey,
        tag: Tag,
        build_id: BuildId,
        builder: BuilderKind,
    },
    Finished {
        key: TargetKey,
        tag: Tag,
        build_id: BuildId,
        outcome: Outcome,
        duration: Duration,
    },
}

/// A boxed build future.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<Built, RunError>> + Send>>;

/// Why a run produced no image.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Failed(SharedError),
    /// What it would land no longer matches its tag (its files changed meanwhile): the
    /// build is cancelled, not failed; the change plans the next one.
    #[error("superseded: {0}")]
    Superseded(SharedError),
}

/// Runs one build. `cancel` fires when the build is superseded or cancelled; the runner
/// must then stop its work (abort the engine build) and return.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, job: Job, build_id: BuildId, cancel: CancellationToken) -> RunFuture;
}

enum Cmd {
    Submit {
        jobs: Vec<Job>,
        reply: oneshot::Sender<Vec<(BuildId, oneshot::Receiver<Outcome>)>>,
    },
    Wait {
        key: TargetKey,
        tag: Tag,
        reply: oneshot::Sender<Option<oneshot::Receiver<Outcome>>>,
    },
    Cancel {
        filter: CancelFilter,
        reply: oneshot::Sender<Vec<BuildId>>,
    },
    Done {
        key: TargetKey,
        /// Boxed: a build's result is much larger than the other commands.
        result: Box<Result<Built, RunError>>,
    },
}

/// The handle to the queue. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Cmd>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scheduler")
    }
}

/// Which builds to cancel: every field that is set must match; nothing set matches all.
#[derive(Debug, Clone, Default)]
pub struct CancelFilter {
    pub build_id: Option<BuildId>,
    pub package: Option<String>,
    pub arch: Option<String>,
    /// Why, for the builds' outcome ([`CancelReason::Requested`] when none is given).
    pub reason: Option<CancelReason>,
}

impl CancelFilter {
    fn matches(&self, key: &TargetKey, build_id: &BuildId) -> bool {
        self.build_id.as_ref().is_none_or(|b| b == build_id)
            && self.package.as_deref().is_none_or(|p| p == key.package)
            && self.arch.as_deref().is_none_or(|a| a == key.arch)
    }
}

/// The queue stopped (kilnd is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the build queue has stopped (kilnd is shutting down)")]
pub struct Stopped;

impl Scheduler {
    /// Starts the queue with at most `jobs` builds at once, its actor and builds on
    /// `tasks`, until `stop` is cancelled.
    pub fn start(
        runner: Arc<dyn Runner>,
        jobs: usize,
        events: impl Fn(SchedEvent) + Send + 'static,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Scheduler {
        let (tx, rx) = mpsc::channel(1024);
        let actor = Actor {
            runner,
            jobs: jobs.max(1),
            events: Box::new(events),
            queued: VecDeque::new(),
            running: HashMap::new(),
            finished: HashMap::new(),
            next_id: 1,
            tx: tx.clone(),
            tasks: tasks.clone(),
        };
        tasks.spawn(actor.run(rx, stop));
        Scheduler { tx }
    }

    /// Queues jobs (in the order given, which should be dependency order). Returns the
    /// build id of each job: a new one, or that of the same build already queued or
    /// running.
    pub async fn submit(&self, jobs: Vec<Job>) -> Result<Vec<BuildId>, Stopped> {
        Ok(self
            .submit_joined(jobs)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// As [`Scheduler::submit`], and joins each build in the same step, so that no
    /// outcome can slip by between queueing and waiting.
    pub async fn submit_joined(
        &self,
        jobs: Vec<Job>,
    ) -> Result<Vec<(BuildId, oneshot::Receiver<Outcome>)>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Submit { jobs, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Joins the build of `key` at `tag`, if one is queued or running: the receiver gets
    /// its outcome. `None` if the queue has no such build.
    pub async fn join(
        &self,
        key: TargetKey,
        tag: Tag,
    ) -> Result<Option<oneshot::Receiver<Outcome>>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Wait { key, tag, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Cancels the queued and running builds that `filter` matches. Returns their ids.
    pub async fn cancel(&self, filter: CancelFilter) -> Result<Vec<BuildId>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Cancel { filter, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

struct Queued {
    job: Job,
    build_id: BuildId,
    waiters: Vec<oneshot::Sender<Outcome>>,
    since: Instant,
}

struct Running {
    tag: Tag,
    build_id: BuildId,
    cancel: CancellationToken,
    /// Why it was cancelled, if it was.
    cancelled: Option<CancelReason>,
    waiters: Vec<oneshot::Sender<Outcome>>,
    started: Instant,
    /// The same target and tag asked for again while it runs: its files may have
    /// changed under it (a touch, a save of the same bytes), so if the run ends
    /// superseded this job runs again instead of nobody building the tag.
    again: Option<Job>,
}

struct Actor {
    runner: Arc<dyn Runner>,
    jobs: usize,
    events: Box<dyn Fn(SchedEvent) + Send>,
    queued: VecDeque<Queued>,
    running: HashMap<TargetKey, Running>,
    /// The last outcome of each target, for dependency checks.
    finished: HashMap<TargetKey, (Tag, Outcome)>,
    next_id: u64,
    tx: mpsc::Sender<Cmd>,
    /// Where builds run (the caller's tracker).
    tasks: TaskTracker,
}

enum Readiness {
    Ready,
    Waiting,
    Blocked(Failure),
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, stop: CancellationToken) {
        let mut stopping = false;
        loop {
            let cmd = tokio::select! {
                () = stop.cancelled(), if !stopping => {
                    // Nothing new starts; what runs is cancelled, what is queued ends.
                    stopping = true;
                    self.cancel(&CancelFilter {
                        reason: Some(CancelReason::ShuttingDown),
                        ..CancelFilter::default()
                    });
                    if self.running.is_empty() {
                        break;
                    }
                    continue;
                }
                cmd = rx.recv() => cmd,
            };
            let Some(cmd) = cmd else { break };
            match cmd {
                // Once stopping, a caller that submits or waits gets `Stopped`.
                Cmd::Submit { .. } | Cmd::Wait { .. } if stopping => {}
                Cmd::Submit { jobs, reply } => {
                    let mut joined = Vec::new();
                    for job in jobs {
                        let (key, tag) = (job.key.clone(), job.tag.clone());
                        let id = self.submit(job);
                        if let Some(rx) = self.waiter(&key, &tag) {
                            joined.push((id, rx));
                        }
                    }
                    let _ = reply.send(joined);
                }
                Cmd::Wait { key, tag, reply } => {
                    let _ = reply.send(self.waiter(&key, &tag));
                }
                Cmd::Cancel { filter, reply } => {
                    let n = self.cancel(&filter);
                    let _ = reply.send(n);
                }
                Cmd::Done { key, result } => self.done(key, *result),
            }
            if stopping {
                if self.running.is_empty() {
                    break;
                }
            } else {
                self.dispatch();
            }
        }
    }

    fn submit(&mut self, job: Job) -> BuildId {
        if let Some(r) = self.running.get_mut(&job.key) {
            if r.tag == job.tag && r.cancelled.is_none() {
                let id = r.build_id.clone(); // already building this content
                r.again = Some(job);
                return id;
            }
            if r.cancelled.is_none() {
                r.cancelled = Some(CancelReason::NewerTag(job.tag.clone()));
                r.cancel.cancel();
            }
        }
        if let Some(pos) = self.queued.iter().position(|q| q.job.key == job.key) {
            if self.queued[pos].job.tag == job.tag {
                self.queued[pos].job.force |= job.force;
                return self.queued[pos].build_id.clone();
            }
            if let Some(old) = self.queued.remove(pos) {
                self.finish_queued(old, CancelReason::NewerTag(job.tag.clone()));
            }
        }
        let build_id = BuildId(format!("b{}", self.next_id));
        self.next_id += 1;
        (self.events)(SchedEvent::Queued {
            key: job.key.clone(),
            tag: job.tag.clone(),
            build_id: build_id.clone(),
            reason: job.reason,
        });
        self.queued.push_back(Queued {
            job,
            build_id: build_id.clone(),
            waiters: Vec::new(),
            since: Instant::now(),
        });
        build_id
    }

    fn waiter(&mut self, key: &TargetKey, tag: &Tag) -> Option<oneshot::Receiver<Outcome>> {
        let (tx, rx) = oneshot::channel();
        if let Some(r) = self.running.get_mut(key)
            && r.tag == *tag
            && r.cancelled.is_none()
        {
            r.waiters.push(tx);
            return Some(rx);
        }
        let q = self
            .queued
            .iter_mut()
            .find(|q| q.job.key == *key && q.job.tag == *tag)?;
        q.waiters.push(tx);
        Some(rx)
    }

    fn cancel(&mut self, filter: &CancelFilter) -> Vec<BuildId> {
        let reason = filter.reason.clone().unwrap_or(CancelReason::Requested);
        let mut ids = Vec::new();
        for r in self
            .running
            .iter_mut()
            .filter(|(k, r)| filter.matches(k, &r.build_id))
        {
            if r.1.cancelled.is_none() {
                r.1.cancelled = Some(reason.clone());
                r.1.cancel.cancel();
                ids.push(r.1.build_id.clone());
            }
        }
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .queued
            .drain(..)
            .partition(|q| filter.matches(&q.job.key, &q.build_id));
        self.queued = kept.into();
        for q in gone {
            ids.push(q.build_id.clone());
            self.finish_queued(q, reason.clone());
        }
        ids
    }

    fn finish_queued(&mut self, q: Queued, reason: CancelReason) {
        let outcome = Outcome::Cancelled(reason);
        self.announce(
            &q.job.key, &q.job.tag, q.build_id, q.since, q.waiters, &outcome,
        );
    }

    /// Publishes a target's end and answers those waiting for it.
    fn announce(
        &self,
        key: &TargetKey,
        tag: &Tag,
        build_id: BuildId,
        since: Instant,
        waiters: Vec<oneshot::Sender<Outcome>>,
        outcome: &Outcome,
    ) {
        (self.events)(SchedEvent::Finished {
            key: key.clone(),
            tag: tag.clone(),
            build_id,
            outcome: outcome.clone(),
            duration: since.elapsed(),
        });
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    }

    fn done(&mut self, key: TargetKey, result: Result<Built, RunError>) {
        let Some(r) = self.running.remove(&key) else {
            return;
        };
        let superseded = matches!(result, Err(RunError::Superseded(_))) && r.cancelled.is_none();
        let outcome = match (result, r.cancelled) {
            (_, Some(reason)) => Outcome::Cancelled(reason),
            (Ok(built), None) => Outcome::Built(built),
            (Err(RunError::Failed(e)), None) => Outcome::Failed(Failure::Run(e)),
            (Err(RunError::Superseded(e)), None) => Outcome::Cancelled(CancelReason::Superseded(e)),
        };
        match r.again.filter(|_| superseded) {
            // Asked for again while its files changed under it: it runs again, and
            // this run's waiters wait for that one.
            Some(job) => {
                self.announce(&key, &r.tag, r.build_id, r.started, Vec::new(), &outcome);
                let build_id = self.submit(job);
                if let Some(q) = self.queued.iter_mut().find(|q| q.build_id == build_id) {
                    q.waiters.extend(r.waiters);
                }
            }
            None => self.announce(&key, &r.tag, r.build_id, r.started, r.waiters, &outcome),
        }
        self.finished.insert(key, (r.tag, outcome));
    }

    fn readiness(&self, job: &Job) -> Readiness {
        for (dep, tag) in &job.after {
            let pending = self.running.get(dep).is_some_and(|r| r.tag == *tag)
                || self
                    .queued
                    .iter()
                    .any(|q| q.job.key == *dep && q.job.tag == *tag);
            if pending {
                return Readiness::Waiting;
            }
            match self.finished.get(dep) {
                Some((t, Outcome::Failed(e))) if t == tag => {
                    return Readiness::Blocked(Failure::Dependency {
                        dep: dep.clone(),
                        source: Box::new(e.clone()),
                    });
                }
                // Its files changed while it ran: the change builds that package again
                // (at this tag, which this job then waits for, or at a new one, which
                // gives this job a new tag too and replaces it).
                Some((t, Outcome::Cancelled(CancelReason::Superseded(_)))) if t == tag => {
                    return Readiness::Waiting;
                }
                Some((t, Outcome::Cancelled(e))) if t == tag => {
                    return Readiness::Blocked(Failure::DependencyCancelled {
                        dep: dep.clone(),
                        reason: e.clone(),
                    });
                }
                _ => {}
            }
        }
        Readiness::Ready
    }

    /// Starts every queued job that can start, in queue order.
    fn dispatch(&mut self) {
        let mut i = 0;
        while i < self.queued.len() && self.running.len() < self.jobs {
            let q = &self.queued[i];
            // One build per target at a time: a superseded build must stop first.
            if self.running.contains_key(&q.job.key) {
                i += 1;
                continue;
            }
            match self.readiness(&q.job) {
                Readiness::Waiting => i += 1,
                Readiness::Blocked(reason) => {
                    let Some(q) = self.queued.remove(i) else {
                        break;
                    };
                    let outcome = Outcome::Failed(reason);
                    self.announce(
                        &q.job.key, &q.job.tag, q.build_id, q.since, q.waiters, &outcome,
                    );
                    self.finished.insert(q.job.key, (q.job.tag, outcome));
                }
                Readiness::Ready => {
                    let Some(q) = self.queued.remove(i) else {
                        break;
                    };
                    self.start(q);
                }
            }
        }
    }

    fn start(&mut self, q: Queued) {
        let build_id = q.build_id;
        let cancel = CancellationToken::new();
        (self.events)(SchedEvent::Started {
            key: q.job.key.clone(),
            tag: q.job.tag.clone(),
            build_id: build_id.clone(),
            builder: q.job.builder,
        });
        let key = q.job.key.clone();
        self.running.insert(
            key.clone(),
            Running {
                tag: q.job.tag.clone(),
                build_id: build_id.clone(),
                cancel: cancel.clone(),
                cancelled: None,
                waiters: q.waiters,
                started: Instant::now(),
                again: None,
            },
        );
        let fut = self.runner.run(q.job, build_id, cancel);
        let tx = self.tx.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            // A panicking build is a failed build, not a stuck slot.
            let result = match tasks.spawn(fut).await {
                Ok(r) => r,
                Err(e) => Err(RunError::Failed(Arc::new(Failure::Task(Arc::new(e))))),
            };
            let _ = tx
                .send(Cmd::Done {
                    key,
                    result: Box::new(result),
                })
                .await;
        });
    }
}

#[cfg(test)]
mod tests;
