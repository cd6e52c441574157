//! The cache figures on the bus (size, blobs on demand, hits, misses, last gc), kept
//! current from the events and cache changes that change them; an event costs O(1)
//! here, whatever the size of the cache.

use std::sync::Arc;

use kiln_shared::protocol::{Event, StreamItem};

use crate::bus::Bus;
use crate::cache::Cache;

/// Keeps the cache figures on the bus: counts hits (targets served from the cache,
/// pulls) and misses (builds). The cache's size is measured (a scan of its blobs) at
/// start and after each collection; after a build it is that figure plus what the cache
/// counted as written since, so a landing costs O(1) here, not a scan of the cache.
pub async fn cache_stats(cache: Arc<Cache>, bus: Bus, cap: Option<u64>) {
    let mut stats = kiln_shared::protocol::CacheStats {
        dir: cache.root().to_owned(),
        bytes_cap: cap,
        ..Default::default()
    };
    let mut sub = bus.subscribe();
    let mut on_demand = cache.on_demand_changes();
    let mut rescan = true;
    // The blobs on demand are counted (a stat each) only when their record changed, not
    // on every hit or miss: a team cache fetched lazily records thousands.
    let mut recount = true;
    // The scan's figures and the writes counted when it started.
    let mut measured = (0u64, 0u64);
    let mut added_then = (0u64, 0u64);
    loop {
        if rescan {
            let c = Arc::clone(&cache);
            let before = cache.blobs_added();
            if let Ok(Ok(s)) = tokio::task::spawn_blocking(move || crate::cache::stats(&c)).await {
                measured = (s.blobs, s.blob_bytes);
                added_then = before;
            }
            rescan = false;
        }
        let now = cache.blobs_added();
        stats.blobs = measured.0 + now.0.saturating_sub(added_then.0);
        stats.bytes_used = measured.1 + now.1.saturating_sub(added_then.1);
        stats.references = cache
            .index()
            .map_or(stats.references, |v| v.ref_count() as u64);
        if std::mem::take(&mut recount)
            && let Ok((blobs, bytes)) = cache.on_demand_totals()
        {
            (stats.on_demand_blobs, stats.on_demand_bytes) = (blobs, bytes);
        }
        bus.publish(Event::CacheStats {
            stats: stats.clone(),
        });
        // Wait for something that changes the figures.
        loop {
            let item = tokio::select! {
                item = sub.next() => item,
                // A blob on demand recorded or fetched.
                changed = on_demand.changed() => match changed {
                    Ok(()) => {
                        recount = true;
                        break;
                    }
                    Err(_) => return,
                },
            };
            let Some(item) = item else { return };
            let StreamItem::Event { event, .. } = item else {
                continue;
            };
            match event {
                Event::ServedFromCache { .. } | Event::Pulled { .. } => stats.hits += 1,
                Event::Queued { .. } => stats.misses += 1,
                Event::Finished { .. } => {}
                Event::GcFinished { gc } => {
                    stats.last_gc = Some(gc);
                    rescan = true;
                    recount = true;
                }
                _ => continue,
            }
            break;
        }
    }
}
