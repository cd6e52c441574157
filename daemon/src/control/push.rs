//! Pushing what kiln builds to the upstreams that take pushes, as `linuxkit pkg push`
//! writes it (`tag-<arch>` per arch, then the index as `tag`). A push runs in the
//! background once every arch of a tag is in the cache; a failed one is reported (a
//! `Pushed` event with the error and the time of the next try, the dashboard, `kiln
//! status`) and tried again on a timer, backing off from 5 s to 5 min, for as long as the
//! tag is its package's current one and no later push of the package took over. It never
//! fails the build or touches the local result. Dirty tags are never pushed. A push runs
//! on kilnd's drain tracker: one in flight at shutdown finishes; its retries stop. A push
//! is recorded as owed in the cache until it succeeds or is superseded, and the next
//! kilnd on the cache pushes what is still owed ([`resume_pushes`]): never half-pushed
//! and forgotten.

use std::sync::Arc;
use std::time::Duration;

use kiln_shared::protocol::{Event, PushResult, now_ms};
use kiln_shared::reference::{ImageRef, RepoName, Tag};

use crate::bus::Bus;
use crate::cache::Cache;
use crate::upstream::Upstreams;
use crate::workspace::{PackageTable, Planned};

use super::Owned;

/// The wait before the first retry of a failed push, and the longest wait.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// A tag with uncommitted changes (`-dirty-`) names a local state: never looked up in or
/// pushed to an upstream.
pub(super) fn is_dirty(tag: &Tag) -> bool {
    tag.as_str().contains("-dirty")
}

/// Pushes `p`'s current tag in a task of its own, retrying on a timer until it is
/// pushed, superseded (a newer tag, a later push of the package) or kilnd stops.
pub(super) fn push_in_background(
    owned: &Owned,
    upstreams: Arc<Upstreams>,
    cache: Arc<Cache>,
    bus: Bus,
    table: Arc<PackageTable>,
    p: &Planned,
) {
    if is_dirty(&p.tag) {
        return;
    }
    let image = p.image();
    let package = p.pkg.repo.to_string();
    let mounts: Vec<RepoName> = p.deps.iter().filter_map(|(r, _)| r.parse().ok()).collect();
    if owned.stopping.is_cancelled() {
        tracing::warn!(image = %image, "not pushed now: kilnd is stopping; it pushes it when it starts again");
        owned
            .drain
            .spawn(async move { owe(&cache, &image, true).await });
        return;
    }
    let stopping = owned.stopping.clone();
    owned.drain.spawn(async move {
        owe(&cache, &image, true).await;
        let mut wait = FIRST_RETRY;
        loop {
            let results = push_and_report(
                &upstreams,
                &cache,
                &bus,
                &package,
                &image,
                &mounts,
                Some(wait),
            )
            .await;
            if results.iter().all(|r| r.error.is_none()) {
                owe(&cache, &image, false).await;
                return;
            }
            let ours = results.iter().map(|r| r.at_ms).max().unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stopping.cancelled() => {
                    tracing::warn!(image = %image, "push not tried again now: kilnd is stopping; it pushes it when it starts again");
                    return;
                }
            }
            let current = table
                .read()
                .ok()
                .and_then(|t| t.get(&package).map(|c| c.tag == image.tag))
                .unwrap_or(false);
            let taken_over = bus
                .watch()
                .borrow()
                .pushes
                .get(&package)
                .is_some_and(|r| r.at_ms > ours || r.tag != image.tag);
            if !current || taken_over {
                owe(&cache, &image, false).await;
                return;
            }
            tracing::info!(image = %image, "pushing again");
            wait = (wait * 2).min(MAX_RETRY);
        }
    });
}

/// Records in the cache that `image`'s push is owed, or no longer is.
async fn owe(cache: &Arc<Cache>, image: &ImageRef, owed: bool) {
    let (cache, name) = (Arc::clone(cache), image.clone());
    match tokio::task::spawn_blocking(move || cache.mark_push(&name, owed)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(image = %image, "cannot record the push as owed: {e}"),
        Err(e) => tracing::warn!(image = %image, "recording the push stopped: {e}"),
    }
}

/// Pushes again what an earlier kilnd on this cache owed (its push cut by a shutdown, or
/// failing until one), for each tag that is still its package's current one; forgets
/// the others (superseded). Call once the workspace is planned.
pub async fn resume_pushes(
    owned: &Owned,
    upstreams: &Arc<Upstreams>,
    cache: &Arc<Cache>,
    bus: &Bus,
    table: &Arc<PackageTable>,
) {
    let c = Arc::clone(cache);
    let owed = match tokio::task::spawn_blocking(move || c.pending_pushes()).await {
        Ok(Ok(owed)) => owed,
        Ok(Err(e)) => {
            tracing::warn!("cannot read the pushes owed: {e}");
            return;
        }
        Err(e) => {
            tracing::warn!("reading the pushes owed stopped: {e}");
            return;
        }
    };
    for image in owed {
        let current = table
            .read()
            .ok()
            .and_then(|t| t.get(&image.repo.to_string()).cloned())
            .filter(|p| p.tag == image.tag);
        match current {
            Some(p) if upstreams.pushes() => {
                tracing::info!(image = %image, "pushing what the last run did not finish pushing");
                push_in_background(
                    owned,
                    Arc::clone(upstreams),
                    Arc::clone(cache),
                    bus.clone(),
                    Arc::clone(table),
                    &p,
                );
            }
            Some(_) => {} // no upstream takes pushes now: still owed
            None => owe(cache, &image, false).await,
        }
    }
}

/// Pushes a package's tag to every upstream with `push` and reports each result on the
/// bus (and in kilnd's log). A failure reports `retry` as the time of the next try, when
/// one is planned.
pub async fn push_and_report(
    upstreams: &Upstreams,
    cache: &Arc<Cache>,
    bus: &Bus,
    package: &str,
    image: &ImageRef,
    mounts: &[RepoName],
    retry: Option<Duration>,
) -> Vec<PushResult> {
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    for (upstream, result) in upstreams.push_target(cache, image, mounts).await {
        let push = match result {
            Ok(p) => PushResult {
                package: package.to_owned(),
                tag: image.tag.clone(),
                upstream,
                references: p.references,
                error: None,
                duration_ms: u64::try_from(p.elapsed.as_millis()).unwrap_or(u64::MAX),
                at_ms: now_ms(),
                next_try_at_ms: None,
            },
            Err(e) => {
                tracing::warn!("push of {image} failed: {e}");
                PushResult {
                    package: package.to_owned(),
                    tag: image.tag.clone(),
                    upstream,
                    references: Vec::new(),
                    error: Some(e.to_string()),
                    duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                    at_ms: now_ms(),
                    next_try_at_ms: retry.map(|r| {
                        now_ms().saturating_add(u64::try_from(r.as_millis()).unwrap_or(u64::MAX))
                    }),
                }
            }
        };
        bus.publish(Event::Pushed {
            push: Box::new(push.clone()),
        });
        out.push(push);
    }
    publish_upstreams(upstreams, bus);
    out
}

/// The upstreams' states on the bus (the dashboard's upstream list).
pub fn publish_upstreams(upstreams: &Upstreams, bus: &Bus) {
    let upstreams = upstreams.info();
    if bus.watch().borrow().upstreams != upstreams {
        bus.publish(Event::Upstreams { upstreams });
    }
}
