//! Garbage collection: mark every blob reachable from `index.json`, sweep the rest, and
//! over a size cap drop references least recently used first. Blobs on demand (missing
//! here, fetched from an upstream on first read: see `ondemand`) take no space; their
//! records that no reference reaches any more (once older than the grace period: a
//! landing records before it names), or whose blob is local now, are dropped.
//!
//! Safety with writers of this and other processes (how gc and they agree):
//! - a writer references blobs under the writer lock, after checking there that they are
//!   present (a manifest PUT, a build landing; LinuxKit takes the same lock);
//! - gc marks and drops references under the lock, then sweeps a batch at a time
//!   ([`SWEEP_BATCH`] blobs), each batch under the lock: a writer waits for one batch
//!   at most, and a batch that finds `index.json` changed marks again first, so a blob
//!   referenced meanwhile is kept;
//! - blobs are written without the lock (uploads, builds in flight) and become referenced
//!   later, so an unreferenced blob younger than the grace period is kept; a blob write
//!   that finds its blob already present refreshes its mtime, and so does a registry
//!   HEAD or mount of it (a lease: the client skips the upload and references the blob
//!   in the manifest it pushes next, as containerd's and the distribution registry's
//!   leases protect blobs between the two);
//! - a blob is first renamed into `.kiln/trash/`, then its mtime is checked again there:
//!   a writer that refreshed it meanwhile gets it back, and a writer that refreshes it
//!   after the move finds it gone and installs its own copy (see `blob.rs`);
//! - readers that have a blob open keep reading it after it is unlinked (the inode lives
//!   until the last descriptor closes).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_shared::digest::Digest;

use super::{Cache, CacheError, IndexView};
use crate::oci::{AnyManifest, Descriptor, is_document};
use kiln_shared::size::format_size;

/// How old an unreferenced blob must be before gc removes it, by default: long enough for
/// a push or a build to reference what it uploaded.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10 * 60);

/// What `gc` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Drop references, least recently used first, until the blobs fit in this many bytes.
    pub max_size: Option<u64>,
    /// Unreferenced blobs modified more recently than this are kept.
    pub grace: Duration,
    /// Report what would be freed, change nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            max_size: None,
            grace: DEFAULT_GRACE,
            dry_run: false,
        }
    }
}

/// What `gc` did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcReport {
    pub dry_run: bool,
    /// References dropped to get under the size cap, least recently used first (names, or
    /// digests for unnamed `index.json` entries).
    pub refs_dropped: Vec<String>,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Bytes held by blobs before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub young_kept: u64,
    pub young_bytes: u64,
    pub grace: Duration,
    /// The cap, when one was given and the cache could not be brought under it (what is
    /// left is referenced by nothing gc may drop, or is within the grace period).
    pub still_over: Option<u64>,
    /// Records of blobs on demand dropped (no reference reaches them, or they are local).
    pub on_demand_dropped: u64,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would free" } else { "freed" };
        write!(
            f,
            "{verb} {}: {} blob{}, {} reference{} ({} -> {})",
            format_size(self.bytes_freed),
            self.blobs_removed,
            plural(self.blobs_removed),
            self.refs_dropped.len(),
            plural(self.refs_dropped.len() as u64),
            format_size(self.bytes_before),
            format_size(self.bytes_after),
        )?;
        let verb = if self.dry_run {
            "would drop"
        } else {
            "dropped"
        };
        for name in &self.refs_dropped {
            write!(f, "\n  {verb} {name}")?;
        }
        if self.young_kept > 0 {
            write!(
                f,
                "\n  kept {} unreferenced blob{} ({}) written in the last {}s; they may belong to a push or build in progress",
                self.young_kept,
                plural(self.young_kept),
                format_size(self.young_bytes),
                self.grace.as_secs()
            )?;
        }
        if self.on_demand_dropped > 0 {
            write!(
                f,
                "\n  forgot {} blob{} on demand that nothing references",
                self.on_demand_dropped,
                plural(self.on_demand_dropped)
            )?;
        }
        if let Some(cap) = self.still_over {
            write!(
                f,
                "\n  still over the cap of {}: what remains is in use or too recent to remove",
                format_size(cap)
            )?;
        }
        Ok(())
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A blob file as listed at the start of gc.
#[derive(Debug, Clone, Copy)]
struct BlobFile {
    size: u64,
    mtime: SystemTime,
}

/// One root: an `index.json` entry (entries without a name are keyed by digest).
#[derive(Debug)]
struct Root {
    key: String,
    named: bool,
    digest: Digest,
    reach: Vec<Digest>,
    /// For a referrer (an artifact with a `subject`): the subject's digest.
    subject: Option<Digest>,
}

/// How many blobs one sweep step removes under the writer lock: writers (a manifest
/// PUT, a build landing) wait for one step at most, never for the whole sweep.
const SWEEP_BATCH: usize = 64;

/// Collects garbage in `cache`; see the module documentation.
pub fn gc(cache: &Cache, opts: GcOptions) -> Result<GcReport, CacheError> {
    let started = SystemTime::now();
    let cutoff = started
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let blobs = list_blobs(cache.blobs_dir())?;
    let bytes_before: u64 = blobs.values().map(|b| b.size).sum();
    let mut graph = Graph {
        cache,
        docs: HashMap::new(),
    };
    // Read every document without the lock (the slow part), then mark again under it,
    // where only what changed meanwhile is read.
    roots_of(&mut graph, &*cache.index()?)?;
    let lock = cache.lock()?;
    let view = cache.folded_locked()?;
    let roots = roots_of(&mut graph, &view)?;

    let mut refs = Refs::new(&roots, &blobs, cutoff);
    if let Some(cap) = opts.max_size
        && refs.projected > cap
    {
        let usage = cache.last_used()?;
        let on_demand = cache.on_demand_all()?;
        // Never pulled: as old as its blob, or for one on demand, its record.
        let last_used = |r: &Root| {
            usage
                .get(&r.key)
                .copied()
                .or_else(|| blobs.get(&r.digest).map(|b| b.mtime))
                .or_else(|| {
                    let recorded = on_demand.get(&r.digest)?.recorded;
                    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(recorded))
                })
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let mut order: Vec<usize> = (0..roots.len()).collect();
        order.sort_by(|&a, &b| {
            (last_used(&roots[a]), &roots[a].key).cmp(&(last_used(&roots[b]), &roots[b].key))
        });
        // Artifacts about a kept image (signatures, SBOMs) go with the image, never on
        // their own.
        let attached: Vec<usize> = (0..roots.len())
            .filter(|&i| {
                roots[i]
                    .subject
                    .as_ref()
                    .is_some_and(|s| refs.is_reachable(s))
            })
            .collect();
        for i in order {
            if refs.projected <= cap {
                break;
            }
            if refs.is_dropped[i] || attached.contains(&i) {
                continue;
            }
            refs.drop_root(i);
            // Artifacts about an image that is now gone go with it (and theirs with them).
            while let Some(&j) = attached.iter().find(|&&j| {
                !refs.is_dropped[j]
                    && roots[j]
                        .subject
                        .as_ref()
                        .is_some_and(|s| !refs.is_reachable(s))
            }) {
                refs.drop_root(j);
            }
        }
    }
    let Refs {
        refcount, dropped, ..
    } = refs;

    let refs_dropped: Vec<String> = dropped.iter().map(|&i| roots[i].key.clone()).collect();
    if !opts.dry_run && !dropped.is_empty() {
        let named: HashSet<&str> = dropped
            .iter()
            .filter(|&&i| roots[i].named)
            .map(|&i| roots[i].key.as_str())
            .collect();
        let unnamed: HashSet<&Digest> = dropped
            .iter()
            .filter(|&&i| !roots[i].named)
            .map(|&i| &roots[i].digest)
            .collect();
        cache
            .update_index_locked(|index| {
                index.manifests.retain(|d| match d.ref_name() {
                    Some(n) => !named.contains(n),
                    None => !unnamed.contains(&d.digest),
                });
                Ok(())
            })
            .map_err(|e| match e {
                CacheError::DanglingReference { name, digest } => {
                    CacheError::GcDangling { name, digest }
                }
                e => e,
            })?;
        let forget: Vec<String> = named.iter().map(|s| (*s).to_owned()).collect();
        if let Err(e) = cache.flush_usage_locked(&forget) {
            // Usage is advisory; the references are gone either way.
            tracing::warn!("gc: could not update the usage file: {e}");
        }
        for name in &refs_dropped {
            tracing::info!(reference = %name, "gc dropped a reference");
        }
    }

    drop(lock);
    let trash = cache.root.join(".kiln").join("trash");
    if !opts.dry_run {
        fs::create_dir_all(&trash).map_err(CacheError::io(&trash))?;
    }
    let mut report = GcReport {
        dry_run: opts.dry_run,
        refs_dropped,
        bytes_before,
        grace: opts.grace,
        ..GcReport::default()
    };
    let mut garbage: Vec<(&Digest, &BlobFile)> = blobs
        .iter()
        .filter(|(d, _)| refcount.get(d).copied().unwrap_or(0) == 0)
        .collect();
    garbage.sort_by_key(|(d, _)| *d);
    let (young, old): (Vec<_>, Vec<_>) = garbage.into_iter().partition(|(_, b)| b.mtime >= cutoff);
    for (_, b) in young {
        report.young_kept += 1;
        report.young_bytes += b.size;
    }
    if opts.dry_run {
        for (_, b) in old {
            report.blobs_removed += 1;
            report.bytes_freed += b.size;
        }
    } else {
        // The sweep, a batch at a time under the lock. A writer that referenced a blob
        // meanwhile did so under the lock and changed index.json: the batch marks again
        // (documents are read once) and keeps what is reachable now.
        let mut marked = view;
        let mut reachable: Option<HashSet<Digest>> = None;
        for batch in old.chunks(SWEEP_BATCH) {
            let _lock = cache.lock()?;
            let now = cache.folded_locked()?;
            if !Arc::ptr_eq(&now, &marked) {
                let roots = roots_of(&mut graph, &now)?;
                reachable = Some(roots.into_iter().flat_map(|r| r.reach).collect());
                marked = now;
            }
            for &(digest, b) in batch {
                if reachable.as_ref().is_some_and(|r| r.contains(digest)) {
                    continue;
                }
                match remove_blob(cache, &trash, digest, cutoff)? {
                    Removal::Removed => {
                        report.blobs_removed += 1;
                        report.bytes_freed += b.size;
                    }
                    Removal::Refreshed => {
                        report.young_kept += 1;
                        report.young_bytes += b.size;
                    }
                    Removal::Gone => {}
                }
            }
        }
    }
    if report.blobs_removed > 0 && !opts.dry_run {
        cache.new_epoch()?;
    }
    report.on_demand_dropped = forget_on_demand(cache, &mut graph, opts.dry_run, cutoff)?;
    report.bytes_after = bytes_before.saturating_sub(report.bytes_freed);
    if let Some(cap) = opts.max_size
        && report.bytes_after > cap
    {
        report.still_over = Some(cap);
    }
    Ok(report)
}

/// Drops (or, in a dry run, counts) the records of blobs on demand that no reference
/// reaches (recorded before `cutoff`) or that are local now, under the writer lock.
fn forget_on_demand(
    cache: &Cache,
    graph: &mut Graph<'_>,
    dry_run: bool,
    cutoff: SystemTime,
) -> Result<u64, CacheError> {
    let cutoff = cutoff
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    let _lock = cache.lock()?;
    let all = cache.on_demand_all()?;
    if all.is_empty() {
        return Ok(0);
    }
    let view = cache.index()?;
    let reachable: HashSet<Digest> = roots_of(graph, &view)?
        .into_iter()
        .flat_map(|r| r.reach)
        .collect();
    // An unreached record younger than the grace period may belong to a landing that
    // has recorded and not named yet: kept, as a young unreferenced blob is.
    let stale: HashSet<Digest> = all
        .iter()
        .filter(|(d, from)| {
            (!reachable.contains(*d) && from.recorded <= cutoff)
                || cache.blob_size(d).ok().flatten().is_some()
        })
        .map(|(d, _)| d.clone())
        .collect();
    if !dry_run && !stale.is_empty() {
        cache.edit_remote_locked(|all| {
            all.retain(|d, _| !stale.contains(d));
            true
        })?;
    }
    Ok(stale.len() as u64)
}

/// The roots of `view`, each with what it reaches.
fn roots_of(graph: &mut Graph<'_>, view: &IndexView) -> Result<Vec<Root>, CacheError> {
    let mut roots: Vec<Root> = Vec::new();
    let mut seen_keys = HashSet::new();
    for d in view.entries() {
        let (key, named) = match d.ref_name() {
            Some(n) => (n.to_owned(), true),
            None => (d.digest.to_string(), false),
        };
        if !seen_keys.insert(key.clone()) {
            continue;
        }
        let reach = graph.reach(d)?;
        let subject = graph.subject_of(d)?;
        roots.push(Root {
            key,
            named,
            digest: d.digest.clone(),
            reach,
            subject,
        });
    }
    Ok(roots)
}

/// How many roots reach each blob, and what a sweep would leave, as roots are dropped.
struct Refs<'a> {
    roots: &'a [Root],
    blobs: &'a HashMap<Digest, BlobFile>,
    cutoff: SystemTime,
    refcount: HashMap<&'a Digest, u32>,
    /// Bytes that survive a sweep: referenced, or too young to remove.
    projected: u64,
    is_dropped: Vec<bool>,
    /// Dropped roots, in order.
    dropped: Vec<usize>,
}

impl<'a> Refs<'a> {
    fn new(roots: &'a [Root], blobs: &'a HashMap<Digest, BlobFile>, cutoff: SystemTime) -> Self {
        let mut refcount: HashMap<&Digest, u32> = HashMap::new();
        for r in roots {
            for d in &r.reach {
                *refcount.entry(d).or_insert(0) += 1;
            }
        }
        let projected = blobs
            .iter()
            .filter(|(d, b)| b.mtime >= cutoff || refcount.contains_key(d))
            .map(|(_, b)| b.size)
            .sum();
        Refs {
            roots,
            blobs,
            cutoff,
            refcount,
            projected,
            is_dropped: vec![false; roots.len()],
            dropped: Vec::new(),
        }
    }

    fn is_reachable(&self, d: &Digest) -> bool {
        self.refcount.get(d).is_some_and(|&n| n > 0)
    }

    fn drop_root(&mut self, i: usize) {
        self.is_dropped[i] = true;
        self.dropped.push(i);
        for d in &self.roots[i].reach {
            if let Some(n) = self.refcount.get_mut(d) {
                *n -= 1;
                if *n == 0
                    && let Some(b) = self.blobs.get(d)
                    && b.mtime < self.cutoff
                {
                    self.projected -= b.size;
                }
            }
        }
    }
}

enum Removal {
    Removed,
    /// A writer refreshed it while gc looked: kept.
    Refreshed,
    /// Someone else removed it first.
    Gone,
}

/// Removes one unreferenced blob, unless a writer refreshes it meanwhile (module doc).
fn remove_blob(
    cache: &Cache,
    trash: &Path,
    digest: &Digest,
    cutoff: SystemTime,
) -> Result<Removal, CacheError> {
    let path = cache.blob_path(digest);
    let parked = trash.join(format!("{}-{}", digest.hex(), std::process::id()));
    match fs::rename(&path, &parked) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Gone),
        Err(e) => return Err(CacheError::io(&path)(e)),
    }
    let mtime = fs::metadata(&parked)
        .and_then(|m| m.modified())
        .map_err(CacheError::io(&parked))?;
    if mtime >= cutoff {
        if path.exists() {
            // A writer already installed a fresh copy.
            fs::remove_file(&parked).map_err(CacheError::io(&parked))?;
        } else {
            fs::rename(&parked, &path).map_err(CacheError::io(&path))?;
        }
        return Ok(Removal::Refreshed);
    }
    fs::remove_file(&parked).map_err(CacheError::io(&parked))?;
    Ok(Removal::Removed)
}

/// Every `blobs/sha256/<64 hex>` file with its size and mtime; other names are fsck's
/// business and are left alone.
fn list_blobs(dir: &Path) -> Result<HashMap<Digest, BlobFile>, CacheError> {
    let mut out = HashMap::new();
    for entry in fs::read_dir(dir).map_err(CacheError::io(dir))? {
        let entry = entry.map_err(CacheError::io(dir))?;
        let Some(digest) = entry
            .file_name()
            .to_str()
            .and_then(|n| Digest::from_hex(n).ok())
        else {
            continue;
        };
        let meta = match entry.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CacheError::io(entry.path())(e)),
        };
        let mtime = meta.modified().map_err(CacheError::io(entry.path()))?;
        out.insert(
            digest,
            BlobFile {
                size: meta.len(),
                mtime,
            },
        );
    }
    Ok(out)
}

/// The reference graph, each document parsed once.
struct Graph<'a> {
    cache: &'a Cache,
    /// Digest of a manifest or index to what it refers to and its subject; `None` for a
    /// blob that is not on disk.
    docs: HashMap<Digest, Option<Doc>>,
}

/// What a manifest or index refers to.
struct Doc {
    children: Vec<Descriptor>,
    subject: Option<Digest>,
}

impl Graph<'_> {
    fn load(&mut self, d: &Descriptor) -> Result<(), CacheError> {
        if self.docs.contains_key(&d.digest) {
            return Ok(());
        }
        let doc = match self.cache.read_manifest(&d.digest) {
            Ok(m) => Some(m),
            // Dangling: nothing to follow (fsck reports it).
            Err(CacheError::BlobUnknown(_)) => None,
            Err(e) => {
                return Err(CacheError::GcUnfollowable {
                    digest: d.digest.clone(),
                    source: Box::new(e),
                });
            }
        };
        let entry = doc.map(|m: AnyManifest| Doc {
            children: m.children().cloned().collect(),
            subject: m.subject.map(|s| s.digest),
        });
        self.docs.insert(d.digest.clone(), entry);
        Ok(())
    }

    /// Every blob reachable from `root`, itself included.
    fn reach(&mut self, root: &Descriptor) -> Result<Vec<Digest>, CacheError> {
        let mut seen: HashSet<Digest> = HashSet::new();
        let mut stack = vec![root.clone()];
        let mut out = Vec::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            out.push(d.digest.clone());
            if is_document(&d.media_type) {
                self.load(&d)?;
                if let Some(Some(doc)) = self.docs.get(&d.digest) {
                    stack.extend(doc.children.iter().cloned());
                }
            }
        }
        Ok(out)
    }

    fn subject_of(&mut self, d: &Descriptor) -> Result<Option<Digest>, CacheError> {
        if !is_document(&d.media_type) {
            return Ok(None);
        }
        self.load(d)?;
        Ok(self
            .docs
            .get(&d.digest)
            .and_then(|c| c.as_ref())
            .and_then(|doc| doc.subject.clone()))
    }
}

/// Why a size given on the command line or in kiln.toml is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "size {input:?} is not a size ({source}): give a number with an optional unit, e.g. 10G, \
     500MiB or 1048576 (units are powers of 1024)"
)]
pub struct SizeError {
    input: String,
    #[source]
    source: parse_size::Error,
}

/// Parses a size: a number (fractions allowed) and an optional unit, case-insensitive,
/// every unit a power of 1024 as Docker and `du` read them (`10G`, `10GB` and `10GiB`
/// are all 10 GiB); no unit is bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(input.trim())
        .map_err(|source| SizeError {
            input: input.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
