//! GC on request: it holds the cache's writer lock for a while, so it runs aside and the
//! event loop keeps going; its summary goes to the bus and to the requester.

use std::sync::Arc;

use kiln_shared::protocol::{Event, GcResponse, GcSummary, now_ms};

use super::{ControlError, Controller, Reply};
use crate::cache::{GcOptions, gc};

impl Controller {
    /// Starts a collection; `reply` gets its summary.
    pub(super) fn gc(&self, reply: Reply<GcResponse>) {
        let cache = Arc::clone(&self.cache);
        let bus = self.bus.clone();
        let max_size = self.cfg.max_size;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = tokio::task::spawn_blocking(move || {
                gc(
                    &cache,
                    GcOptions {
                        max_size,
                        ..GcOptions::default()
                    },
                )
            })
            .await;
            let answer = match r {
                Ok(Ok(report)) => {
                    let summary = GcSummary {
                        finished_at_ms: now_ms(),
                        duration_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                        removed_blobs: report.blobs_removed,
                        freed_bytes: report.bytes_freed,
                    };
                    bus.publish(Event::GcFinished {
                        gc: summary.clone(),
                    });
                    Ok(GcResponse { gc: summary })
                }
                Ok(Err(e)) => Err(ControlError::Failed(e.to_string())),
                Err(e) => Err(ControlError::Failed(format!("gc stopped: {e}"))),
            };
            let _ = reply.send(answer);
        });
    }
}
