//! The event bus: every part of kilnd publishes what happened here, and API clients
//! subscribe to it (DESIGN decision 5).
//!
//! One `broadcast` channel carries the events (bounded) and one `watch` value holds the
//! latest [`Snapshot`], folded with the same [`Snapshot::apply`] the dashboard uses. A
//! subscriber gets a snapshot and then the events after it; one that falls behind gets a
//! fresh snapshot instead of a silent gap. Build logs live beside it in [`logs`].

pub mod logs;

use std::sync::{Arc, Mutex, MutexGuard};

use kiln_shared::protocol::{BuildId, BuildOutcome, Event, Snapshot, StreamItem};
use tokio::sync::{broadcast, watch};

pub use logs::{LogChunk, LogReader, LogStore, LogStoreLimits};

/// How many events a subscriber may fall behind before it gets a fresh snapshot.
pub const EVENT_CAPACITY: usize = 1024;

/// The last line of a build's log that did not succeed, `error: WHY` or
/// `cancelled: WHY`: the one place the outcome enters the log, so it is said once.
pub fn end_line(outcome: BuildOutcome, error: Option<&str>) -> Option<String> {
    let why = error?;
    match outcome {
        BuildOutcome::Ok => None,
        BuildOutcome::Failed => Some(format!("error: {why}")),
        BuildOutcome::Cancelled => Some(format!("cancelled: {why}")),
    }
}

/// The bus. Cheap to clone; every clone publishes to the same subscribers.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held while an event is applied and sent, and while a subscriber takes its snapshot
    /// and its receiver, so the snapshot's `seq` and the first event received line up.
    order: Mutex<()>,
    state: watch::Sender<Snapshot>,
    events: broadcast::Sender<(u64, Arc<Event>)>,
    logs: LogStore,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("seq", &self.inner.state.borrow().seq)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus whose state starts at `initial` (see [`Snapshot::new`]).
    pub fn new(initial: Snapshot) -> Self {
        Bus::with_limits(initial, EVENT_CAPACITY, LogStoreLimits::default())
    }

    /// A bus with a given event capacity and log limits.
    pub fn with_limits(initial: Snapshot, capacity: usize, logs: LogStoreLimits) -> Self {
        let (state, _) = watch::channel(initial);
        let (events, _) = broadcast::channel(capacity.max(1));
        Bus {
            inner: Arc::new(Inner {
                order: Mutex::new(()),
                state,
                events,
                logs: LogStore::new(logs),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded value is `()`: a panic while holding it cannot leave it inconsistent.
        self.inner
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `event` to the latest state and sends it to every subscriber. Build
    /// lifecycle events also open and close the build's log.
    pub fn publish(&self, event: Event) {
        match &event {
            Event::Queued { build } => self.inner.logs.open(&build.id),
            Event::Started { build } => self.inner.logs.open(&build.id),
            Event::Finished { summary, .. }
            | Event::Failed { summary, .. }
            | Event::Cancelled { summary, .. } => {
                if let Some(line) = end_line(summary.outcome, summary.error.as_deref()) {
                    self.inner.logs.append(&summary.id, &line);
                }
                self.inner.logs.close(&summary.id);
            }
            _ => {}
        }
        let _order = self.lock();
        let mut seq = 0;
        self.inner.state.send_modify(|s| {
            s.apply(&event);
            seq = s.seq;
        });
        // No receivers is fine: nobody is watching.
        let _ = self.inner.events.send((seq, Arc::new(event)));
    }

    /// The latest state.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.state.borrow().clone()
    }

    /// A receiver of the latest state, for parts of kilnd that react to it.
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.inner.state.subscribe()
    }

    /// A subscription: a snapshot, then the events after it.
    pub fn subscribe(&self) -> Subscription {
        let _order = self.lock();
        let snapshot = self.inner.state.borrow().clone();
        let rx = self.inner.events.subscribe();
        Subscription {
            bus: self.clone(),
            rx,
            pending: Some(snapshot),
        }
    }

    /// Appends one line to a build's log (creating the log if needed).
    pub fn log_line(&self, build: &BuildId, line: &str) {
        self.inner.logs.append(build, line);
    }

    /// The build logs.
    pub fn logs(&self) -> &LogStore {
        &self.inner.logs
    }
}

/// What [`Bus::subscribe`] returns: yields a snapshot first, then events in order, and
/// a fresh snapshot whenever the subscriber fell behind.
pub struct Subscription {
    bus: Bus,
    rx: broadcast::Receiver<(u64, Arc<Event>)>,
    pending: Option<Snapshot>,
}

impl Subscription {
    /// The next item. Never returns `None` while the bus lives.
    pub async fn next(&mut self) -> Option<StreamItem> {
        // `subscribe` and the lag path take the snapshot and the receiver under the
        // bus lock, so the first event received is number `snapshot.seq + 1`.
        if let Some(snapshot) = self.pending.take() {
            return Some(StreamItem::Snapshot {
                snapshot: Box::new(snapshot),
            });
        }
        match self.rx.recv().await {
            Ok((seq, event)) => Some(StreamItem::Event {
                seq,
                event: (*event).clone(),
            }),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(
                    missed,
                    "event subscriber fell behind; sending a fresh snapshot"
                );
                let _order = self.bus.lock();
                let snapshot = self.bus.inner.state.borrow().clone();
                self.rx = self.rx.resubscribe();
                drop(_order);
                Some(StreamItem::Snapshot {
                    snapshot: Box::new(snapshot),
                })
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_shared::protocol::PackageInfo;

    fn added(name: &str) -> Event {
        Event::PackageAdded {
            package: PackageInfo {
                name: name.into(),
                dir: format!("/ws/{name}").into(),
                tag: None,
                archs: vec!["amd64".into()],
            },
        }
    }

    #[tokio::test]
    async fn subscriber_gets_snapshot_then_events_in_order() {
        let bus = Bus::new(Snapshot::default());
        bus.publish(added("a/one"));
        let mut sub = bus.subscribe();
        bus.publish(added("a/two"));
        bus.publish(Event::WatchRecovered);
        let Some(StreamItem::Snapshot { snapshot }) = sub.next().await else {
            panic!("first item is not a snapshot");
        };
        assert_eq!(snapshot.seq, 1);
        assert!(snapshot.packages.contains_key("a/one"));
        assert!(!snapshot.packages.contains_key("a/two"));
        let mut model = *snapshot;
        for expected in [2, 3] {
            let Some(StreamItem::Event { seq, event }) = sub.next().await else {
                panic!("expected an event");
            };
            assert_eq!(seq, expected);
            model.apply(&event);
        }
        assert_eq!(model, bus.snapshot());
    }

    #[tokio::test]
    async fn lagging_subscriber_gets_a_fresh_snapshot_not_a_gap() {
        let bus = Bus::with_limits(Snapshot::default(), 4, LogStoreLimits::default());
        let mut sub = bus.subscribe();
        let Some(StreamItem::Snapshot { .. }) = sub.next().await else {
            panic!("first item is not a snapshot");
        };
        for i in 0..20 {
            bus.publish(added(&format!("a/p{i}")));
        }
        let Some(StreamItem::Snapshot { snapshot }) = sub.next().await else {
            panic!("a lagging subscriber must get a snapshot");
        };
        assert_eq!(snapshot.seq, 20);
        assert_eq!(snapshot.packages.len(), 20);
        bus.publish(Event::WatchRecovered);
        let Some(StreamItem::Event { seq, .. }) = sub.next().await else {
            panic!("expected an event after the fresh snapshot");
        };
        assert_eq!(seq, 21);
    }

    #[tokio::test]
    async fn concurrent_publishers_never_leave_a_gap() {
        let bus = Bus::with_limits(Snapshot::default(), 8, LogStoreLimits::default());
        let mut sub = bus.subscribe();
        let publishers: Vec<_> = (0..4)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        bus.publish(added(&format!("t{t}/p{i}")));
                    }
                })
            })
            .collect();
        let mut model: Option<Snapshot> = None;
        loop {
            match sub.next().await {
                Some(StreamItem::Snapshot { snapshot }) => model = Some(*snapshot),
                Some(StreamItem::Event { seq, event }) => {
                    let m = model.as_mut().unwrap();
                    assert_eq!(seq, m.seq + 1, "gap in the event stream");
                    m.apply(&event);
                }
                None => unreachable!(),
            }
            if model.as_ref().unwrap().seq == 2000 {
                break;
            }
        }
        for p in publishers {
            p.join().unwrap();
        }
        assert_eq!(model.unwrap(), bus.snapshot());
    }
}
