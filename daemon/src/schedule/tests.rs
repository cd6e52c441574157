//! The queue's behaviour, driven by a runner whose builds the test finishes by hand.

use std::sync::Mutex;

use kiln_shared::digest::Digest;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::oci::OCI_MANIFEST;

/// A build in progress in the test runner: the test ends it by sending the result.
struct Pending {
    job: Job,
    finish: oneshot::Sender<Result<Built, RunError>>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct HandRunner {
    started: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
}

impl Runner for HandRunner {
    fn run(&self, job: Job, _id: BuildId, cancel: CancellationToken) -> RunFuture {
        let (finish, rx) = oneshot::channel();
        let tx = self.started.lock().unwrap().clone().unwrap();
        tx.send(Pending {
            job,
            finish,
            cancel: cancel.clone(),
        })
        .unwrap();
        Box::pin(async move {
            tokio::select! {
                r = rx => r.unwrap_or(Err(failed("test dropped"))),
                _ = cancel.cancelled() => Err(failed("aborted")),
            }
        })
    }
}

struct Harness {
    sched: Scheduler,
    started: UnboundedReceiver<Pending>,
    events: UnboundedReceiver<SchedEvent>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

fn harness(jobs: usize) -> Harness {
    let runner = Arc::new(HandRunner::default());
    let (stx, started) = mpsc::unbounded_channel();
    *runner.started.lock().unwrap() = Some(stx);
    let (etx, events) = mpsc::unbounded_channel();
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let sched = Scheduler::start(
        runner,
        jobs,
        move |e| {
            let _ = etx.send(e);
        },
        &tasks,
        stop.clone(),
    );
    Harness {
        sched,
        started,
        events,
        tasks,
        stop,
    }
}

fn key(p: &str, a: &str) -> TargetKey {
    TargetKey {
        package: p.into(),
        arch: a.into(),
    }
}

fn tag(t: &str) -> Tag {
    t.parse().unwrap()
}

fn job(p: &str, a: &str, t: &str) -> Job {
    Job {
        key: key(p, a),
        tag: tag(t),
        after: vec![],
        force: false,
        look_up: false,
        reason: QueueReason::Requested,
        builder: crate::workspace::BuilderKind::Native,
        fallback: false,
    }
}

/// A filter that matches nothing: a round trip through the actor.
fn nothing() -> CancelFilter {
    CancelFilter {
        package: Some("nothing".into()),
        ..CancelFilter::default()
    }
}

fn desc(n: u8) -> Built {
    Built {
        manifest: Descriptor::new(OCI_MANIFEST, Digest::from_sha256_bytes(&[n; 32]), 1),
        cache_hits: 0,
        steps: 1,
        pulled_from: None,
        builder: kiln_shared::protocol::BuiltBy::Native,
    }
}

/// An outcome as the tests compare it: what was built, or the text a failure or a
/// cancellation shows (with its sources).
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // test values
enum Seen {
    Built(Built),
    Failed(String),
    Cancelled(String),
}

fn seen(o: Outcome) -> Seen {
    match o {
        Outcome::Built(b) => Seen::Built(b),
        Outcome::Failed(e) => Seen::Failed(kiln_shared::error::chain(&e)),
        Outcome::Cancelled(r) => Seen::Cancelled(kiln_shared::error::chain(&r)),
    }
}

/// A runner's failure saying `text`.
fn failed(text: &str) -> RunError {
    RunError::Failed(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
        text,
    )))
}

/// A runner's "superseded" saying `text`.
fn superseded(text: &str) -> RunError {
    RunError::Superseded(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
        text,
    )))
}

impl Harness {
    async fn next_finished(&mut self) -> (TargetKey, Tag, Seen) {
        loop {
            if let SchedEvent::Finished {
                key, tag, outcome, ..
            } = self.events.recv().await.unwrap()
            {
                return (key, tag, seen(outcome));
            }
        }
    }

    fn no_start_pending(&mut self) -> bool {
        self.started.try_recv().is_err()
    }
}

#[tokio::test]
async fn concurrency_is_bounded_and_queue_order_kept() {
    let mut h = harness(2);
    h.sched
        .submit(vec![
            job("a", "amd64", "1"),
            job("a", "arm64", "1"),
            job("b", "amd64", "1"),
        ])
        .await
        .unwrap();
    let p1 = h.started.recv().await.unwrap();
    let p2 = h.started.recv().await.unwrap();
    assert_eq!(
        (p1.job.key.arch.as_str(), p2.job.key.arch.as_str()),
        ("amd64", "arm64")
    );
    // A round trip through the actor proves it had the chance to start a third one.
    h.sched.cancel(nothing()).await.unwrap();
    assert!(h.no_start_pending());
    p1.finish.send(Ok(desc(1))).unwrap();
    let p3 = h.started.recv().await.unwrap();
    assert_eq!(p3.job.key, key("b", "amd64"));
    p2.finish.send(Err(failed("boom"))).unwrap();
    p3.finish.send(Ok(desc(3))).unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(h.next_finished().await);
    }
    assert!(outcomes.contains(&(key("a", "arm64"), tag("1"), Seen::Failed("boom".into()))));
    assert!(outcomes.contains(&(key("b", "amd64"), tag("1"), Seen::Built(desc(3)))));
}

#[tokio::test]
async fn a_run_that_no_longer_matches_its_tag_is_cancelled_not_failed() {
    let mut h = harness(1);
    h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let p = h.started.recv().await.unwrap();
    p.finish.send(Err(superseded("files changed"))).unwrap();
    assert_eq!(
        h.next_finished().await.2,
        Seen::Cancelled("superseded: files changed".into())
    );
}

#[tokio::test]
async fn a_run_superseded_after_the_same_tag_was_asked_again_runs_again() {
    // A touch (or a save of the same bytes) while a build runs: the tag is the same, so
    // the new job joins the run; the run then ends superseded, as its files changed
    // under it, and someone must build the tag.
    let mut h = harness(1);
    h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let first = h.started.recv().await.unwrap();
    let joined = h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let waiter = h
        .sched
        .join(key("a", "amd64"), tag("1"))
        .await
        .unwrap()
        .unwrap();
    first.finish.send(Err(superseded("files changed"))).unwrap();
    assert_eq!(
        h.next_finished().await.2,
        Seen::Cancelled("superseded: files changed".into())
    );
    let second = h.started.recv().await.unwrap();
    assert_eq!(second.job.tag, tag("1"));
    assert!(!joined.is_empty());
    second.finish.send(Ok(desc(1))).unwrap();
    assert_eq!(h.next_finished().await.2, Seen::Built(desc(1)));
    assert_eq!(seen(waiter.await.unwrap()), Seen::Built(desc(1)));
}

#[tokio::test]
async fn a_superseded_run_nobody_asked_for_again_is_left_to_the_change() {
    let mut h = harness(1);
    h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let p = h.started.recv().await.unwrap();
    p.finish.send(Err(superseded("files changed"))).unwrap();
    h.next_finished().await;
    h.sched.cancel(nothing()).await.unwrap();
    assert!(h.no_start_pending());
}

#[tokio::test]
async fn a_dependent_of_a_superseded_run_waits_for_the_change_to_build_it_again() {
    // kilnd writes a package's kiln.lock while building it: the build is superseded, and
    // the change asks for the same tag again only after the run ended. Its dependent must
    // not fail on the way (nothing would build it again: its tag does not change).
    let mut h = harness(2);
    let mut app = job("app", "amd64", "7");
    app.after = vec![(key("base", "amd64"), tag("1"))];
    h.sched
        .submit(vec![job("base", "amd64", "1"), app])
        .await
        .unwrap();
    let base = h.started.recv().await.unwrap();
    base.finish.send(Err(superseded("files changed"))).unwrap();
    let (k, _, outcome) = h.next_finished().await;
    assert_eq!(k, key("base", "amd64"));
    assert_eq!(outcome, Seen::Cancelled("superseded: files changed".into()));
    h.sched.cancel(nothing()).await.unwrap();
    assert!(
        h.no_start_pending(),
        "the dependent started without its base"
    );
    h.sched
        .submit(vec![job("base", "amd64", "1")])
        .await
        .unwrap();
    let base = h.started.recv().await.unwrap();
    assert_eq!(base.job.key, key("base", "amd64"));
    base.finish.send(Ok(desc(1))).unwrap();
    let app = tokio::time::timeout(std::time::Duration::from_secs(10), h.started.recv())
        .await
        .expect("the dependent never started after its base was built")
        .unwrap();
    assert_eq!(app.job.key, key("app", "amd64"));
    app.finish.send(Ok(desc(7))).unwrap();
    loop {
        let (k, _, outcome) = h.next_finished().await;
        if k == key("app", "amd64") {
            assert_eq!(outcome, Seen::Built(desc(7)));
            break;
        }
    }
}

#[tokio::test]
async fn the_same_target_is_not_queued_twice() {
    let mut h = harness(1);
    let first = h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let again = h
        .sched
        .submit(vec![job("a", "amd64", "1"), job("a", "amd64", "1")])
        .await
        .unwrap();
    assert_eq!(again, [first[0].clone(), first[0].clone()]);
    let p = h.started.recv().await.unwrap();
    h.sched.cancel(nothing()).await.unwrap();
    assert!(h.no_start_pending());
    p.finish.send(Ok(desc(1))).unwrap();
    assert_eq!(h.next_finished().await.2, Seen::Built(desc(1)));
    h.sched.cancel(nothing()).await.unwrap();
    assert!(h.no_start_pending());
}

#[tokio::test]
async fn a_newer_tag_cancels_the_build_in_flight_and_then_builds() {
    let mut h = harness(2);
    h.sched.submit(vec![job("a", "amd64", "1")]).await.unwrap();
    let old = h.started.recv().await.unwrap();
    h.sched.submit(vec![job("a", "amd64", "2")]).await.unwrap();
    old.cancel.cancelled().await;
    let (_, t, outcome) = h.next_finished().await;
    assert_eq!(t, tag("1"));
    assert_eq!(outcome, Seen::Cancelled("superseded by tag 2".into()));
    let new = h.started.recv().await.unwrap();
    assert_eq!(new.job.tag, tag("2"));
    new.finish.send(Ok(desc(2))).unwrap();
    assert_eq!(h.next_finished().await.2, Seen::Built(desc(2)));
}

#[tokio::test]
async fn a_newer_tag_replaces_a_queued_one() {
    let mut h = harness(1);
    h.sched
        .submit(vec![job("x", "amd64", "1"), job("a", "amd64", "1")])
        .await
        .unwrap();
    let blocker = h.started.recv().await.unwrap();
    h.sched.submit(vec![job("a", "amd64", "2")]).await.unwrap();
    let (k, t, outcome) = h.next_finished().await;
    assert_eq!((k, t), (key("a", "amd64"), tag("1")));
    assert!(matches!(outcome, Seen::Cancelled(_)));
    blocker.finish.send(Ok(desc(9))).unwrap();
    assert_eq!(h.started.recv().await.unwrap().job.tag, tag("2"));
}

#[tokio::test]
async fn dependencies_build_first_and_a_failure_blocks_only_dependents() {
    let mut h = harness(4);
    let mut dependent = job("app", "arm64", "7");
    dependent.after = vec![(key("base", "arm64"), tag("1"))];
    let mut other = job("app", "amd64", "7");
    other.after = vec![(key("base", "amd64"), tag("1"))];
    h.sched
        .submit(vec![
            job("base", "arm64", "1"),
            job("base", "amd64", "1"),
            dependent,
            other,
            job("unrelated", "arm64", "3"),
        ])
        .await
        .unwrap();
    let mut started = Vec::new();
    for _ in 0..3 {
        started.push(h.started.recv().await.unwrap());
    }
    let keys: Vec<_> = started.iter().map(|p| p.job.key.clone()).collect();
    assert!(!keys.iter().any(|k| k.package == "app"), "{keys:?}");
    let arm = started
        .iter()
        .position(|p| p.job.key == key("base", "arm64"))
        .unwrap();
    let arm = started.remove(arm);
    arm.finish.send(Err(failed("compile error"))).unwrap();
    loop {
        let (k, _, outcome) = h.next_finished().await;
        if k == key("app", "arm64") {
            assert_eq!(
                outcome,
                Seen::Failed("dependency base (arm64) failed: compile error".into())
            );
            break;
        }
    }
    let amd = started
        .iter()
        .position(|p| p.job.key == key("base", "amd64"))
        .unwrap();
    started.remove(amd).finish.send(Ok(desc(1))).unwrap();
    let app = h.started.recv().await.unwrap();
    assert_eq!(app.job.key, key("app", "amd64"));
}

#[tokio::test]
async fn waiters_join_a_build_and_unknown_builds_answer_none() {
    let mut h = harness(1);
    assert!(
        h.sched
            .join(key("a", "amd64"), tag("1"))
            .await
            .unwrap()
            .is_none()
    );
    h.sched
        .submit(vec![job("x", "amd64", "1"), job("a", "amd64", "1")])
        .await
        .unwrap();
    // One waiter joins while the build is queued, one while it runs.
    let queued = h
        .sched
        .join(key("a", "amd64"), tag("1"))
        .await
        .unwrap()
        .unwrap();
    h.started
        .recv()
        .await
        .unwrap()
        .finish
        .send(Ok(desc(0)))
        .unwrap();
    let p = h.started.recv().await.unwrap();
    let running = h
        .sched
        .join(key("a", "amd64"), tag("1"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        h.sched
            .join(key("a", "amd64"), tag("2"))
            .await
            .unwrap()
            .is_none()
    );
    p.finish.send(Ok(desc(5))).unwrap();
    assert_eq!(seen(queued.await.unwrap()), Seen::Built(desc(5)));
    assert_eq!(seen(running.await.unwrap()), Seen::Built(desc(5)));
}

#[tokio::test]
async fn cancel_stops_queued_and_running_builds_of_a_package() {
    let mut h = harness(1);
    h.sched
        .submit(vec![
            job("a", "amd64", "1"),
            job("a", "arm64", "1"),
            job("b", "amd64", "1"),
        ])
        .await
        .unwrap();
    let running = h.started.recv().await.unwrap();
    assert_eq!(
        h.sched
            .cancel(CancelFilter {
                package: Some("a".into()),
                ..CancelFilter::default()
            })
            .await
            .unwrap()
            .len(),
        2
    );
    running.cancel.cancelled().await;
    let next = h.started.recv().await.unwrap();
    assert_eq!(next.job.key, key("b", "amd64"));
}

#[tokio::test]
async fn cancel_by_build_id() {
    let mut h = harness(1);
    let ids = h
        .sched
        .submit(vec![job("a", "amd64", "1"), job("a", "arm64", "1")])
        .await
        .unwrap();
    let running = h.started.recv().await.unwrap();
    let by_id = |id: &BuildId| CancelFilter {
        build_id: Some(id.clone()),
        ..CancelFilter::default()
    };
    assert_eq!(
        h.sched.cancel(by_id(&ids[1])).await.unwrap(),
        [ids[1].clone()]
    );
    assert!(
        h.sched
            .cancel(by_id(&BuildId::from("b999")))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!running.cancel.is_cancelled());
    assert_eq!(
        h.sched.cancel(by_id(&ids[0])).await.unwrap(),
        [ids[0].clone()]
    );
    running.cancel.cancelled().await;
}

#[tokio::test]
async fn stopping_cancels_running_builds_ends_queued_ones_and_the_tracker_awaits_them() {
    let mut h = harness(1);
    let waits = h
        .sched
        .submit_joined(vec![job("a", "amd64", "1"), job("b", "amd64", "1")])
        .await
        .unwrap();
    let running = h.started.recv().await.unwrap();
    h.stop.cancel();
    running.cancel.cancelled().await;
    for (_, rx) in waits {
        let outcome = rx.await.unwrap();
        assert!(
            matches!(&outcome, Outcome::Cancelled(CancelReason::ShuttingDown)),
            "{outcome:?}"
        );
    }
    // The actor and the build ran on the tracker: both are over.
    h.tasks.close();
    h.tasks.wait().await;
    assert!(h.sched.submit(vec![job("c", "amd64", "1")]).await.is_err());
    assert!(h.no_start_pending());
}
