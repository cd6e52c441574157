//! GC on request: it holds the cache's writer lock for a while, so it runs aside and the
//! event loop keeps going; its summary goes to the bus and to the requester. The RUN
//! snapshots are collected after the blobs, against what the cache then keeps.

use std::sync::Arc;

use kiln_shared::protocol::{Event, GcResponse, GcSummary, now_ms};

use super::{ControlError, Controller, Reply};
use crate::build::native::Snapshots;
use crate::cache::{GcOptions, gc};

impl Controller {
    /// Starts a collection (tracked: shutdown waits for it); `reply` gets its summary.
    pub(super) fn gc(&self, reply: Reply<GcResponse>) {
        let cache = Arc::clone(&self.cache);
        let bus = self.bus.clone();
        let max_size = self.cfg.max_size;
        self.tasks.spawn(async move {
            let started = std::time::Instant::now();
            let r = tokio::task::spawn_blocking(move || {
                let report = gc(
                    &cache,
                    GcOptions {
                        max_size,
                        ..GcOptions::default()
                    },
                )?;
                // Then the RUN snapshots: those no kept image needs, and past --max-size
                // (what the blobs leave of it) the least recently used.
                let budget = max_size.map(|m| m.saturating_sub(report.bytes_after));
                let snapshots = Snapshots::open(&cache).and_then(|s| s.collect(&cache, budget))?;
                Ok::<_, ControlError>((report, snapshots))
            })
            .await;
            let answer = match r {
                Ok(Ok((report, snapshots))) => {
                    let summary = GcSummary {
                        finished_at_ms: now_ms(),
                        duration_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                        removed_blobs: report.blobs_removed,
                        freed_bytes: report.bytes_freed + snapshots.bytes_freed,
                    };
                    bus.publish(Event::GcFinished {
                        gc: summary.clone(),
                    });
                    Ok(GcResponse { gc: summary })
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ControlError::GcStopped(e)),
            };
            let _ = reply.send(answer);
        });
    }
}
