//! The cache figures on the bus (size, hits, misses, last gc), kept current from the
//! events that change them.

use std::sync::Arc;

use kiln_shared::protocol::{Event, StreamItem};

use crate::bus::Bus;
use crate::cache::Cache;

/// Keeps the cache figures on the bus: counts hits (targets served from the cache,
/// pulls) and misses (builds), and re-reads the cache's size only after builds and
/// collections, never per pull.
pub async fn cache_stats(cache: Arc<Cache>, bus: Bus, cap: Option<u64>) {
    let mut stats = kiln_shared::protocol::CacheStats {
        dir: cache.root().to_owned(),
        bytes_cap: cap,
        ..Default::default()
    };
    let mut sub = bus.subscribe();
    let mut rescan = true;
    loop {
        if rescan {
            let c = Arc::clone(&cache);
            if let Ok(Ok(s)) = tokio::task::spawn_blocking(move || crate::cache::stats(&c)).await {
                stats.bytes_used = s.blob_bytes;
                stats.blobs = s.blobs;
                stats.references = s.refs;
            }
            rescan = false;
        }
        bus.publish(Event::CacheStats {
            stats: stats.clone(),
        });
        // Wait for something that changes the figures.
        loop {
            let Some(item) = sub.next().await else { return };
            let StreamItem::Event { event, .. } = item else {
                continue;
            };
            match event {
                Event::ServedFromCache { .. } | Event::Pulled { .. } => stats.hits += 1,
                Event::Queued { .. } => stats.misses += 1,
                Event::Finished { .. } => rescan = true,
                Event::GcFinished { gc } => {
                    stats.last_gc = Some(gc);
                    rescan = true;
                }
                _ => continue,
            }
            break;
        }
    }
}
