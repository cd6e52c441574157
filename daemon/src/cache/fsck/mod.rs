//! `kiln fsck`: checks the invariants every cache write keeps (see the parent module):
//! every blob hashes to its name, every reference of `index.json` and of the manifests it
//! reaches resolves (to a blob in place, or to a blob on demand that `.kiln/remote.json`
//! records, of the size the descriptor says: reported as such, not as a problem), and no temp file of a dead writer is left behind. With `repair`,
//! corrupt blobs are removed (a corrupt blob must never be served), references whose
//! graph is broken are dropped (kiln rebuilds what it needs), and leftovers are removed.
//!
//! Blobs are hashed without the writer lock (they are immutable once in place); the
//! reference walk and the repairs of `index.json` run under it, so a concurrent gc or
//! writer cannot make a consistent cache look broken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use super::leftovers::{self, FOREIGN_MAX_AGE, Leftover, age, tree_size};
use super::{Cache, CacheError, OnDemand};
use crate::oci::{AnyManifest, Descriptor, is_document, is_index, is_manifest};
use kiln_shared::size::format_size;

const READ_BUFFER: usize = 1024 * 1024;

/// A blob whose content does not hash to its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlob {
    pub digest: Digest,
    pub actual: Digest,
    pub size: u64,
    pub removed: bool,
}

/// What is wrong with a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Corrupt,
    SizeMismatch { expected: u64, actual: u64 },
    Unreadable(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing => write!(f, "missing"),
            Problem::Corrupt => write!(f, "corrupt"),
            Problem::SizeMismatch { expected, actual } => {
                write!(f, "is {actual} bytes, the descriptor says {expected}")
            }
            Problem::Unreadable(e) => write!(f, "unreadable: {e}"),
        }
    }
}

/// A reference that does not resolve, with the path that leads to it:
/// `docker.io/a/b:t -> index sha256:.. -> manifest sha256:.. -> layer sha256:..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReference {
    pub path: Vec<String>,
    pub digest: Digest,
    pub problem: Problem,
}

impl fmt::Display for BadReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path.join(" -> "), self.problem)
    }
}

/// What `fsck` found and, with `repair`, did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    pub repair: bool,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub refs_checked: u64,
    pub corrupt: Vec<CorruptBlob>,
    pub bad_refs: Vec<BadReference>,
    /// `index.json` entries dropped by repair because their graph is broken.
    pub refs_dropped: Vec<String>,
    pub leftovers: Vec<Leftover>,
    /// Temp files of live processes (writes in progress), left alone.
    pub in_progress: Vec<PathBuf>,
    /// Blobs nothing refers to: not an error, `gc` removes them.
    pub stray_blobs: u64,
    pub stray_bytes: u64,
    /// Referenced blobs on demand (missing here, recorded as fetched from an upstream on
    /// first read), by upstream: (blobs, bytes).
    pub on_demand: BTreeMap<String, (u64, u64)>,
    /// Reference changes in the refs journal that `index.json` does not hold yet (not a
    /// problem: kilnd folds them a second after its last landing).
    pub unfolded: u64,
    /// The refs journal ends in a torn record (a write a crash cut short: never
    /// acknowledged, it counts for nothing); repair cuts it off.
    pub journal_torn: bool,
    /// What repair could not fix.
    pub repair_errors: Vec<String>,
}

impl FsckReport {
    /// Whether the cache is consistent: nothing was found, or repair fixed all of it.
    pub fn is_clean(&self) -> bool {
        if self.repair {
            self.repair_errors.is_empty()
        } else {
            self.problems() == 0
        }
    }

    /// Corrupt blobs and bad references found. Leftovers are a warning, not an
    /// inconsistency: nothing reads them.
    pub fn problems(&self) -> usize {
        self.corrupt.len() + self.bad_refs.len()
    }
}

impl fmt::Display for FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked {} blobs ({}) and {} references",
            self.blobs_checked,
            format_size(self.bytes_checked),
            self.refs_checked
        )?;
        for c in &self.corrupt {
            let done = if c.removed { " [removed]" } else { "" };
            writeln!(
                f,
                "corrupt blob {} ({}): its content hashes to {}{done}",
                c.digest,
                format_size(c.size),
                c.actual
            )?;
        }
        for r in &self.bad_refs {
            writeln!(f, "dangling: {r}")?;
        }
        for name in &self.refs_dropped {
            writeln!(f, "dropped reference {name} [its images are incomplete]")?;
        }
        for l in &self.leftovers {
            let done = if l.removed { " [removed]" } else { "" };
            writeln!(
                f,
                "warning: leftover {} ({}): {}{done}",
                l.path.display(),
                format_size(l.bytes),
                l.reason
            )?;
        }
        if !self.in_progress.is_empty() {
            writeln!(
                f,
                "{} temp file(s) of writes in progress left alone",
                self.in_progress.len()
            )?;
        }
        if self.stray_blobs > 0 {
            writeln!(
                f,
                "{} unreferenced blob(s) ({}): `kiln gc` removes them",
                self.stray_blobs,
                format_size(self.stray_bytes)
            )?;
        }
        for (upstream, (n, bytes)) in &self.on_demand {
            writeln!(
                f,
                "{n} blob(s) ({}) on demand from {upstream}",
                format_size(*bytes)
            )?;
        }
        if self.unfolded > 0 {
            writeln!(
                f,
                "{} reference change(s) in the refs journal are not in index.json yet \
                 (other tools see them once kilnd folds them, a second after its last \
                 landing)",
                self.unfolded
            )?;
        }
        if self.journal_torn {
            let done = if self.repair { " [cut off]" } else { "" };
            writeln!(
                f,
                "warning: the refs journal ends in a torn record (a write a crash cut \
                 short, never acknowledged; it counts for nothing){done}"
            )?;
        }
        for e in &self.repair_errors {
            writeln!(f, "could not repair: {e}")?;
        }
        let unremoved = self.leftovers.iter().filter(|l| !l.removed).count();
        if self.problems() == 0 && unremoved > 0 {
            write!(
                f,
                "the cache is consistent; {unremoved} leftover(s) of interrupted writes \
                 (kilnd removes them when it starts, as does `kiln fsck --repair`)"
            )
        } else if self.problems() == 0 {
            write!(f, "the cache is consistent")
        } else if self.repair && self.is_clean() {
            write!(f, "{} problem(s) repaired", self.problems())
        } else if self.repair {
            write!(f, "{} problem(s) remain", self.repair_errors.len())
        } else {
            write!(
                f,
                "{} problem(s); `kiln fsck --repair` fixes them",
                self.problems()
            )
        }
    }
}

/// Checks the cache; with `repair`, fixes what it finds (module documentation).
pub fn fsck(cache: &Cache, repair: bool) -> Result<FsckReport, CacheError> {
    let mut report = FsckReport {
        repair,
        ..FsckReport::default()
    };
    let now = SystemTime::now();

    // 1. Every blob hashes to its name.
    let mut blobs: HashMap<Digest, u64> = HashMap::new();
    let mut to_hash: Vec<ToHash> = Vec::new();
    let dir = cache.blobs_dir();
    for entry in fs::read_dir(dir).map_err(CacheError::io(dir))? {
        let entry = entry.map_err(CacheError::io(dir))?;
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let digest = entry
            .file_name()
            .to_str()
            .and_then(|n| Digest::from_hex(n).ok());
        match digest {
            Some(digest) if meta.is_file() => to_hash.push(ToHash {
                digest,
                path,
                size: meta.len(),
            }),
            _ => {
                if age(&meta, now) >= FOREIGN_MAX_AGE {
                    report.leftovers.push(Leftover {
                        bytes: tree_size(&path),
                        path,
                        reason: "not a blob (its name is not a sha256 digest)".into(),
                        removed: false,
                    });
                } else {
                    report.in_progress.push(path);
                }
            }
        }
    }
    for Hashed {
        digest,
        size,
        actual,
    } in hash_all(&to_hash)?
    {
        report.blobs_checked += 1;
        report.bytes_checked += size;
        if actual == digest {
            blobs.insert(digest, size);
        } else {
            report.corrupt.push(CorruptBlob {
                digest,
                actual,
                size,
                removed: false,
            });
        }
    }
    report.corrupt.sort_by(|a, b| a.digest.cmp(&b.digest));
    if repair {
        for c in &mut report.corrupt {
            let path = cache.blob_path(&c.digest);
            match fs::remove_file(&path) {
                Ok(()) => c.removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => c.removed = true,
                Err(e) => report
                    .repair_errors
                    .push(format!("removing corrupt blob {}: {e}", path.display())),
            }
        }
    }

    // 2. Leftovers of interrupted writes (a warning: they take space, nothing reads
    // them).
    let scan = leftovers::find(cache, now)?;
    report.leftovers.extend(scan.leftovers);
    report.leftovers.sort_by(|a, b| a.path.cmp(&b.path));
    report.in_progress.extend(scan.in_progress);
    if repair {
        for l in &mut report.leftovers {
            if let Err(e) = leftovers::remove(l) {
                report
                    .repair_errors
                    .push(format!("removing {}: {e}", l.path.display()));
            }
        }
    }

    // 3. References, under the lock so that nothing changes while they are followed.
    let _lock = cache.lock()?;
    let view = cache.index_locked()?;
    report.unfolded = view.unfolded();
    report.journal_torn = view.journal_torn();
    let corrupt: HashSet<&Digest> = report.corrupt.iter().map(|c| &c.digest).collect();
    let remote = cache.on_demand_all()?;
    let mut walk = Walk {
        cache,
        corrupt: &corrupt,
        remote: &remote,
        on_demand: HashSet::new(),
        broken: HashMap::new(),
        reached: HashSet::new(),
        bad: Vec::new(),
    };
    let mut broken_entries: Vec<(Option<String>, Digest)> = Vec::new();
    // Indexes first, so a problem is reported with the longest path that reaches it
    // (`image:tag -> index -> manifest -> layer` rather than `image:tag-amd64 -> ..`).
    let mut entries: Vec<&Descriptor> = view.entries().collect();
    entries.sort_by_key(|d| (!is_index(&d.media_type), d.ref_name()));
    for d in entries {
        report.refs_checked += 1;
        let head = match d.ref_name() {
            Some(n) => n.to_owned(),
            None => "index.json entry".to_owned(),
        };
        let mut path = vec![head];
        if walk.check(d, kind_of(d), &mut path) {
            broken_entries.push((d.ref_name().map(str::to_owned), d.digest.clone()));
        }
    }
    report.bad_refs = std::mem::take(&mut walk.bad);
    for d in &walk.on_demand {
        if let Some(from) = remote.get(d) {
            let e = report.on_demand.entry(from.upstream.clone()).or_default();
            e.0 += 1;
            e.1 += from.size;
        }
    }
    for (d, size) in &blobs {
        if !walk.reached.contains(d) {
            report.stray_blobs += 1;
            report.stray_bytes += size;
        }
    }
    if repair
        && broken_entries.is_empty()
        && report.journal_torn
        && let Err(e) = cache.folded_locked()
    {
        report
            .repair_errors
            .push(format!("folding the refs journal into index.json: {e}"));
    }
    if repair && !broken_entries.is_empty() {
        let result = cache.update_index_locked(|index| {
            index.manifests.retain(|d| {
                !broken_entries
                    .iter()
                    .any(|(name, digest)| d.ref_name() == name.as_deref() && d.digest == *digest)
            });
            Ok(())
        });
        match result {
            Ok(()) => {
                report.refs_dropped = broken_entries
                    .into_iter()
                    .map(|(name, digest)| name.unwrap_or_else(|| digest.to_string()))
                    .collect();
            }
            Err(e) => report
                .repair_errors
                .push(format!("dropping broken references from index.json: {e}")),
        }
    }
    Ok(report)
}

/// A blob to hash.
struct ToHash {
    digest: Digest,
    path: PathBuf,
    size: u64,
}

/// A blob hashed: its name, size and actual digest.
struct Hashed {
    digest: Digest,
    size: u64,
    actual: Digest,
}

/// Hashes blobs on up to 4 threads; a blob removed meanwhile (by gc) is skipped.
fn hash_all(blobs: &[ToHash]) -> Result<Vec<Hashed>, CacheError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    // Deal the blobs out largest first, each to the least loaded thread.
    let mut order: Vec<&ToHash> = blobs.iter().collect();
    order.sort_by_key(|b| std::cmp::Reverse(b.size));
    let mut shares: Vec<(u64, Vec<&ToHash>)> = vec![(0, Vec::new()); threads];
    for b in order {
        if let Some(share) = shares.iter_mut().min_by_key(|s| s.0) {
            share.0 += b.size;
            share.1.push(b);
        }
    }
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|(_, share)| {
                s.spawn(move || -> Result<Vec<Hashed>, CacheError> {
                    let mut buf = vec![0u8; READ_BUFFER];
                    let mut out = Vec::new();
                    for b in share {
                        if let Some((size, actual)) = hash_file(&b.path, &mut buf)? {
                            out.push(Hashed {
                                digest: b.digest.clone(),
                                size,
                                actual,
                            });
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(CacheError::HashThreadPanicked)))
            .collect::<Vec<_>>()
    });
    let mut all = Vec::with_capacity(blobs.len());
    for r in results {
        all.extend(r?);
    }
    all.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(all)
}

fn hash_file(path: &Path, buf: &mut [u8]) -> Result<Option<(u64, Digest)>, CacheError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io(path)(e)),
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CacheError::io(path)(e)),
        }
    }
    Ok(Some((
        size,
        Digest::from_sha256_bytes(&hasher.finalize().into()),
    )))
}

fn kind_of(d: &Descriptor) -> &'static str {
    if is_index(&d.media_type) {
        "index"
    } else if is_manifest(&d.media_type) {
        "manifest"
    } else {
        "blob"
    }
}

/// The reference walk: each descriptor (digest, size and media type: two descriptors
/// of one blob can disagree, and each is judged on its own) is checked once; problems
/// are reported with the first path that reaches them.
struct Walk<'a> {
    cache: &'a Cache,
    corrupt: &'a HashSet<&'a Digest>,
    /// The blobs on demand as recorded, and those the walk reached.
    remote: &'a BTreeMap<Digest, OnDemand>,
    on_demand: HashSet<Digest>,
    /// Descriptor to whether its graph is broken.
    broken: HashMap<DescKey, bool>,
    reached: HashSet<Digest>,
    bad: Vec<BadReference>,
}

/// What a descriptor claims about its blob.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DescKey {
    digest: Digest,
    size: u64,
    media_type: String,
}

impl DescKey {
    fn of(d: &Descriptor) -> Self {
        DescKey {
            digest: d.digest.clone(),
            size: d.size,
            media_type: d.media_type.clone(),
        }
    }
}

impl Walk<'_> {
    /// Checks `d` and what it reaches; returns whether anything is wrong.
    fn check(&mut self, d: &Descriptor, kind: &str, path: &mut Vec<String>) -> bool {
        path.push(format!("{kind} {}", d.digest));
        let broken = self.check_inner(d, path);
        path.pop();
        broken
    }

    fn check_inner(&mut self, d: &Descriptor, path: &mut Vec<String>) -> bool {
        let key = DescKey::of(d);
        if let Some(&broken) = self.broken.get(&key) {
            return broken;
        }
        let broken = self.check_uncached(d, path);
        self.broken.insert(key, broken);
        broken
    }

    fn check_uncached(&mut self, d: &Descriptor, path: &mut Vec<String>) -> bool {
        let mut report = |problem| {
            self.bad.push(BadReference {
                path: path.clone(),
                digest: d.digest.clone(),
                problem,
            });
            true
        };
        if self.corrupt.contains(&d.digest) {
            return report(Problem::Corrupt);
        }
        let size = match self.cache.blob_size(&d.digest) {
            Ok(Some(size)) => size,
            Ok(None) => match self.remote.get(&d.digest) {
                // A manifest on demand must be recorded as one: it is asked of the
                // upstream's manifest endpoint.
                Some(from)
                    if from.size == d.size && from.is_document() == is_document(&d.media_type) =>
                {
                    self.on_demand.insert(d.digest.clone());
                    return false;
                }
                _ => return report(Problem::Missing),
            },
            Err(e) => return report(Problem::Unreadable(e.to_string())),
        };
        if size != d.size {
            return report(Problem::SizeMismatch {
                expected: d.size,
                actual: size,
            });
        }
        if !is_document(&d.media_type) {
            self.reached.insert(d.digest.clone());
            return false;
        }
        let doc: AnyManifest = match self.cache.read_manifest(&d.digest) {
            Ok(doc) => doc,
            Err(e) => return report(Problem::Unreadable(e.to_string())),
        };
        self.reached.insert(d.digest.clone());
        let mut broken = false;
        if let Some(config) = &doc.config {
            broken |= self.check(config, "config", path);
        }
        for layer in &doc.layers {
            broken |= self.check(layer, "layer", path);
        }
        for m in &doc.manifests {
            broken |= self.check(m, kind_of(m), path);
        }
        broken
    }
}

#[cfg(test)]
mod tests;
