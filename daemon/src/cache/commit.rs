//! Group commit of reference changes, as databases commit their log: a writer hands its
//! change to the group and waits for the commit that holds it; one writer at a time, the
//! leader, takes every change pending, applies them in order to the references, commits
//! them once under the writer lock (one record appended to the refs journal and fsynced,
//! or a fold of the journal into `index.json` when one is due: see [`super::journal`]),
//! and wakes every writer of the batch. The fsync is shared by all the changes that
//! arrived while the previous one was on its way to disk.
//!
//! The guarantees of a single write stay: a change is acknowledged (its writer returns)
//! only once the commit holding it is durable and served, readers see only whole states
//! (the view is swapped after the fsync), and a crash leaves the old state or the new one.
//! A change that fails (its closure returns an error, a blob it names is missing) is left
//! out of the batch alone: each change is recorded in its own overlay and folded in only
//! when its closure succeeded. Leadership passes on after each batch, so no writer keeps
//! committing other writers' changes for long.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::index::IndexView;
use super::journal::Edit;
use super::{Cache, CacheError};
use crate::oci::{ANNOTATION_REF_NAME, Descriptor};

/// One writer's change, applied by the leader: true when it succeeded (its overlay is
/// folded in), false when it failed (its result, an error, is already in its slot).
type Change = Box<dyn FnOnce(&mut RefEdit<'_>) -> bool + Send>;

/// How a batch's write ended, shared by every writer of the batch.
type Outcome = Arc<OnceLock<Result<(), Failed>>>;

/// A failed write of `index.json`, kept so every writer of the batch can be told.
#[derive(Debug, Clone)]
struct Failed {
    path: PathBuf,
    kind: io::ErrorKind,
    message: String,
}

impl Failed {
    fn of(path: PathBuf, e: &CacheError) -> Self {
        let kind = match e {
            CacheError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        Failed {
            path,
            kind,
            message: e.to_string(),
        }
    }

    fn error(&self) -> CacheError {
        CacheError::Io {
            path: self.path.clone(),
            source: io::Error::new(self.kind, self.message.clone()),
        }
    }
}

/// The changes waiting for a commit, and whether a leader is committing.
#[derive(Default)]
struct Queue {
    pending: Vec<(Change, Outcome)>,
    leading: bool,
}

/// The group of writers of one cache.
#[derive(Default)]
pub(super) struct Group {
    queue: Mutex<Queue>,
    /// Signalled after each batch: its writers are done, and a new leader may be needed.
    turn: Condvar,
    /// Commits made by batches, for tests and the debug log.
    writes: AtomicU64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Group")
    }
}

impl Group {
    /// How many commits the batches made.
    #[cfg(test)]
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is only pushed to and drained whole: a panic cannot leave it half done.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The references as one change sees them: the index as committed so far in this batch,
/// plus this change's own edits, which are folded in only if the change succeeds.
pub struct RefEdit<'a> {
    cache: &'a Cache,
    refs: &'a imbl::OrdMap<String, Descriptor>,
    /// This change's edits in order: a name set to a descriptor, or removed (`None`).
    edits: Vec<Edit>,
}

impl RefEdit<'_> {
    /// The cache, to read or write blobs while changing references.
    pub fn cache(&self) -> &Cache {
        self.cache
    }

    /// What a full reference name points at now.
    pub fn get(&self, name: &str) -> Option<&Descriptor> {
        match self.edits.iter().rev().find(|(n, _)| n == name) {
            Some((_, d)) => d.as_ref(),
            None => self.refs.get(name),
        }
    }

    /// Points `name` at `desc`, which must name a blob in the cache or one recorded on
    /// demand (an index never names a blob that is neither). The check is made under the
    /// writer lock, so gc cannot take the blob before the index names it.
    pub fn set(&mut self, name: &str, mut desc: Descriptor) -> Result<(), CacheError> {
        if !self.cache.is_held(&desc.digest)? {
            return Err(CacheError::DanglingReference {
                name: name.to_owned(),
                digest: desc.digest,
            });
        }
        desc.annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), name.to_owned());
        self.edits.push((name.to_owned(), Some(desc)));
        Ok(())
    }

    /// Removes `name`; returns whether it existed.
    pub fn remove(&mut self, name: &str) -> bool {
        let existed = self.get(name).is_some();
        if existed {
            self.edits.push((name.to_owned(), None));
        }
        existed
    }

    /// The named references whose names start with `prefix`, with their descriptors,
    /// as this change sees them.
    pub fn refs_with_prefix(&self, prefix: &str) -> Vec<(String, Descriptor)> {
        let mut out: std::collections::BTreeMap<String, Descriptor> = self
            .refs
            .range::<_, str>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(n, _)| n.starts_with(prefix))
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, edit) in self.edits.iter().filter(|(n, _)| n.starts_with(prefix)) {
            match edit {
                Some(d) => out.insert(name.clone(), d.clone()),
                None => out.remove(name),
            };
        }
        out.into_iter().collect()
    }

    /// Every named reference with its descriptor, as this change sees them (a scan of
    /// the whole index: for the rare changes that look for a digest, not a name).
    pub fn refs(&self) -> Vec<(String, Descriptor)> {
        self.refs_with_prefix("")
    }
}

impl Cache {
    /// Changes references through the group commit: `f` sees the index as committed so
    /// far and records its edits; it returns once the commit holding them is durable
    /// and served (or with the error of `f`, in which case nothing of it was written, or
    /// of the write). Blocking: call it from a blocking thread.
    ///
    /// `f` runs under the writer lock, possibly on another writer's thread, so it must
    /// be short: read a blob, compare, set a few names.
    pub fn update_refs<R, E>(
        &self,
        f: impl FnOnce(&mut RefEdit<'_>) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<CacheError> + Send + 'static,
    {
        let slot: Arc<Mutex<Option<Result<R, E>>>> = Arc::new(Mutex::new(None));
        let out = Arc::clone(&slot);
        let change: Change = Box::new(move |edit| {
            let result = f(edit);
            let ok = result.is_ok();
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            ok
        });
        let written = self.commit(change);
        let result = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (result, written) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Err(e)) => Err(e.into()),
            (Some(Ok(r)), Ok(())) => Ok(r),
            // The leader panicked while applying it: nothing of it was written.
            (None, Err(e)) => Err(e.into()),
            (None, Ok(())) => Err(CacheError::Invalid(
                "a reference change was lost: the writer that applied it stopped".into(),
            )
            .into()),
        }
    }

    /// Queues `change` and returns when the batch holding it is written: as the leader
    /// (committing batches until its own is done) or woken by the leader that did.
    fn commit(&self, change: Change) -> Result<(), CacheError> {
        let outcome: Outcome = Arc::default();
        let mut queue = self.group.lock();
        queue.pending.push((change, Arc::clone(&outcome)));
        loop {
            if let Some(done) = outcome.get() {
                return done.clone().map_err(|f| f.error());
            }
            if queue.leading {
                queue = self
                    .group
                    .turn
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead one batch (it holds this writer's change, or an earlier leader took it
            // and this one waits for that batch's end above).
            queue.leading = true;
            let batch = std::mem::take(&mut queue.pending);
            drop(queue);
            let outcomes: Vec<Outcome> = batch.iter().map(|(_, o)| Arc::clone(o)).collect();
            let path = self.root.join("index.json");
            // A change that panics must not leave the group without a leader for ever.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch(batch)))
                    .unwrap_or_else(|_| {
                        Err(CacheError::Invalid(
                            "a reference change panicked; its batch was not written".into(),
                        ))
                    })
                    .map_err(|e| Failed::of(path, &e));
            for o in outcomes {
                let _ = o.set(result.clone());
            }
            queue = self.group.lock();
            queue.leading = false;
            self.group.turn.notify_all();
        }
    }

    /// Applies a batch under the writer lock and commits it once (one journal record)
    /// if anything changed.
    fn write_batch(&self, batch: Vec<(Change, Outcome)>) -> Result<(), CacheError> {
        let _lock = self.lock()?;
        // Under the lock the files are what the last writer (this process or another) left.
        let base: Arc<IndexView> = self.index_locked()?;
        let mut next = (*base).clone();
        let mut edits: Vec<Edit> = Vec::new();
        let changes = batch.len();
        for (change, _) in batch {
            let mut edit = RefEdit {
                cache: self,
                refs: next.ref_map(),
                edits: Vec::new(),
            };
            if change(&mut edit) {
                let mine = edit.edits;
                next.apply(mine.iter().cloned());
                edits.extend(mine);
            }
        }
        if !edits.is_empty() {
            self.commit_refs(&base, next, &edits)?;
            let n = self.group.writes.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(changes, commits = n, "references committed");
        }
        Ok(())
    }
}
