//! `kiln fsck`: checks the invariants every cache write keeps (see the parent module):
//! every blob hashes to its name, every reference of `index.json` and of the manifests it
//! reaches resolves, and no temp file of a dead writer is left behind. With `repair`,
//! corrupt blobs are removed (a corrupt blob must never be served), references whose
//! graph is broken are dropped (kiln rebuilds what it needs), and leftovers are removed.
//!
//! Blobs are hashed without the writer lock (they are immutable once in place); the
//! reference walk and the repairs of `index.json` run under it, so a concurrent gc or
//! writer cannot make a consistent cache look broken.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use super::stats::format_size;
use super::{Cache, CacheError};
use crate::oci::{AnyManifest, Descriptor, is_index, is_manifest};

/// Files under `.kiln/uploads/` untouched for this long are abandoned registry uploads.
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Files with unknown names in kiln's scratch directories, or non-blob files in
/// `blobs/sha256` (where other tools such as LinuxKit may stage their writes), are only
/// called leftovers when untouched for this long.
pub const FOREIGN_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

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

/// A file left behind by an interrupted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    pub bytes: u64,
    pub reason: String,
    pub removed: bool,
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

    /// Corrupt blobs, bad references and leftovers found.
    pub fn problems(&self) -> usize {
        self.corrupt.len() + self.bad_refs.len() + self.leftovers.len()
    }
}

impl fmt::Display for FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked {} blobs ({}) and {} index.json entries",
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
                "leftover {} ({}): {}{done}",
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
        for e in &self.repair_errors {
            writeln!(f, "could not repair: {e}")?;
        }
        if self.problems() == 0 {
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

    // 2. Leftovers of interrupted writes.
    find_leftovers(cache, now, &mut report)?;
    if repair {
        for l in &mut report.leftovers {
            let result = match fs::symlink_metadata(&l.path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&l.path),
                Ok(_) => fs::remove_file(&l.path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => l.removed = true,
                Err(e) => report
                    .repair_errors
                    .push(format!("removing {}: {e}", l.path.display())),
            }
        }
    }

    // 3. References, under the lock so that nothing changes while they are followed.
    let _lock = cache.lock()?;
    let view = cache.index()?;
    let corrupt: HashSet<&Digest> = report.corrupt.iter().map(|c| &c.digest).collect();
    let mut walk = Walk {
        cache,
        corrupt: &corrupt,
        broken: HashMap::new(),
        reached: HashSet::new(),
        bad: Vec::new(),
    };
    let mut broken_entries: Vec<(Option<String>, Digest)> = Vec::new();
    // Indexes first, so a problem is reported with the longest path that reaches it
    // (`image:tag -> index -> manifest -> layer` rather than `image:tag-amd64 -> ..`).
    let mut entries: Vec<&Descriptor> = view.index().manifests.iter().collect();
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
    for (d, size) in &blobs {
        if !walk.reached.contains(d) {
            report.stray_blobs += 1;
            report.stray_bytes += size;
        }
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

fn age(meta: &fs::Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or(Duration::ZERO)
}

/// Bytes under a path (a file, or a directory tree).
fn tree_size(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| tree_size(&e.path()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The newest mtime of a path and, for a directory, of its entries (an upload directory
/// whose files are being appended to is in use).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = fs::symlink_metadata(path).ok()?;
    let mut newest = meta.modified().ok()?;
    if meta.is_dir()
        && let Ok(rd) = fs::read_dir(path)
    {
        for e in rd.filter_map(Result::ok) {
            if let Some(t) = newest_mtime(&e.path()) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}

/// Whether a process with this id exists (a zombie counts: it has not been reaped).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

fn parse_pid(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What a file in one of the scratch places is.
enum Scratch {
    /// Written by the process with this id.
    Owned(i32),
    /// A name kiln does not write there.
    Foreign,
}

fn find_leftovers(
    cache: &Cache,
    now: SystemTime,
    report: &mut FsckReport,
) -> Result<(), CacheError> {
    let kiln = cache.root.join(".kiln");
    // `<dir>/.<name>.tmp-<pid>`: write_atomic's temp files (index.json, oci-layout,
    // usage.json). Other dot files there are not kiln's and are left alone.
    for dir in [cache.root.as_path(), kiln.as_path()] {
        scan(dir, now, report, |name| {
            let rest = name.strip_prefix('.')?;
            let (_, pid) = rest.rsplit_once(".tmp-")?;
            Some(parse_pid(pid).map_or(Scratch::Foreign, Scratch::Owned))
        })?;
    }
    // `.kiln/tmp/blob-<pid>-<n>`: blob writes.
    scan(&cache.tmp, now, report, |name| {
        let pid = name
            .strip_prefix("blob-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, n)| parse_pid(n).and(parse_pid(pid)));
        Some(pid.map_or(Scratch::Foreign, Scratch::Owned))
    })?;
    // `.kiln/trash/<hex>-<pid>`: blobs gc was removing.
    scan(&kiln.join("trash"), now, report, |name| {
        let pid = name.rsplit_once('-').and_then(|(_, pid)| parse_pid(pid));
        Some(pid.map_or(Scratch::Foreign, Scratch::Owned))
    })?;
    // `.kiln/uploads/*`: registry upload sessions, abandoned after a day without writes.
    let uploads = kiln.join("uploads");
    match fs::read_dir(&uploads) {
        Ok(rd) => {
            for e in rd.filter_map(Result::ok) {
                let path = e.path();
                let idle = newest_mtime(&path)
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or(Duration::ZERO);
                if idle >= UPLOAD_MAX_AGE {
                    report.leftovers.push(Leftover {
                        bytes: tree_size(&path),
                        reason: format!(
                            "registry upload untouched for {} h",
                            idle.as_secs() / 3600
                        ),
                        path,
                        removed: false,
                    });
                } else {
                    report.in_progress.push(path);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(CacheError::io(uploads)(e)),
    }
    report.leftovers.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(())
}

/// Sorts the files of `dir` that `classify` recognises (`None`: not a scratch file, skip)
/// into leftovers and writes in progress.
fn scan(
    dir: &Path,
    now: SystemTime,
    report: &mut FsckReport,
    classify: impl Fn(&str) -> Option<Scratch>,
) -> Result<(), CacheError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io(dir)(e)),
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(kind) = name.to_str().and_then(&classify) else {
            continue;
        };
        let path = e.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let reason = match kind {
            Scratch::Owned(pid) if pid_alive(pid) => None,
            Scratch::Owned(pid) => Some(format!("temp file of a dead process (pid {pid})")),
            Scratch::Foreign if age(&meta, now) >= FOREIGN_MAX_AGE => {
                Some("unknown file in kiln's scratch space, untouched for a day".into())
            }
            Scratch::Foreign => None,
        };
        match reason {
            Some(reason) => report.leftovers.push(Leftover {
                bytes: tree_size(&path),
                path,
                reason,
                removed: false,
            }),
            None => report.in_progress.push(path),
        }
    }
    Ok(())
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
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CacheError::Invalid("a blob hashing thread panicked".into()))
                })
            })
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

/// The reference walk: each blob is checked once; problems are reported with the first
/// path that reaches them.
struct Walk<'a> {
    cache: &'a Cache,
    corrupt: &'a HashSet<&'a Digest>,
    /// Digest to whether its graph is broken.
    broken: HashMap<Digest, bool>,
    reached: HashSet<Digest>,
    bad: Vec<BadReference>,
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
        if let Some(&broken) = self.broken.get(&d.digest) {
            return broken;
        }
        let broken = self.check_uncached(d, path);
        self.broken.insert(d.digest.clone(), broken);
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
            Ok(None) => return report(Problem::Missing),
            Err(e) => return report(Problem::Unreadable(e.to_string())),
        };
        if size != d.size {
            return report(Problem::SizeMismatch {
                expected: d.size,
                actual: size,
            });
        }
        self.reached.insert(d.digest.clone());
        if !(is_index(&d.media_type) || is_manifest(&d.media_type)) {
            return false;
        }
        let doc: AnyManifest = match self.cache.read_manifest(&d.digest) {
            Ok(doc) => doc,
            Err(e) => return report(Problem::Unreadable(e.to_string())),
        };
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
mod tests {
    use std::process::Command;

    use super::*;
    use crate::oci::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Platform};
    use kiln_shared::reference::ImageRef;

    struct Image {
        index: Digest,
        manifest: Digest,
        config: Digest,
        layer: Digest,
    }

    fn image(cache: &Cache, name: &str, layer: &[u8]) -> Image {
        let layer_d = cache.put_blob(layer).unwrap();
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":"{name}"}}"#);
        let config_d = cache.put_blob(config.as_bytes()).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor::new(OCI_CONFIG, config_d.clone(), config.len() as u64),
            "layers": [Descriptor::new(OCI_LAYER_GZIP, layer_d.clone(), layer.len() as u64)],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_d = cache.put_blob(&bytes).unwrap();
        let image: ImageRef = name.parse().unwrap();
        let index = cache
            .merge_arch(
                &image,
                "amd64",
                Platform::linux("amd64", None),
                Descriptor::new(OCI_MANIFEST, manifest_d.clone(), bytes.len() as u64),
            )
            .unwrap();
        Image {
            index: index.digest,
            manifest: manifest_d,
            config: config_d,
            layer: layer_d,
        }
    }

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        (dir, cache)
    }

    /// The id of a process that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn set_age(path: &Path, age: Duration) {
        File::open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    #[test]
    fn a_consistent_cache_is_clean() {
        let (_dir, cache) = cache();
        image(&cache, "org/a:1", b"layer a");
        image(&cache, "org/b:1", b"layer b");
        cache.put_blob(b"stray").unwrap();
        let report = fsck(&cache, false).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.blobs_checked, 9);
        assert_eq!(report.refs_checked, 4);
        assert_eq!((report.stray_blobs, report.stray_bytes), (1, 5));
        assert!(
            report.to_string().ends_with("the cache is consistent"),
            "{report}"
        );
    }

    #[test]
    fn a_corrupt_blob_is_found_removed_and_its_references_dropped() {
        let (_dir, cache) = cache();
        let a = image(&cache, "org/a:1", b"layer a");
        image(&cache, "org/b:1", b"layer b");
        fs::write(cache.blob_path(&a.layer), b"layer A").unwrap();

        let report = fsck(&cache, false).unwrap();
        assert!(!report.is_clean());
        assert_eq!(report.corrupt.len(), 1, "{report}");
        assert_eq!(report.corrupt[0].digest, a.layer);
        assert!(!report.corrupt[0].removed);
        let lines: Vec<String> = report.bad_refs.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            lines,
            [format!(
                "docker.io/org/a:1 -> index {} -> manifest {} -> layer {} corrupt",
                a.index, a.manifest, a.layer
            )],
            "the layer is reported once, with the first path that reaches it"
        );
        assert!(
            report.to_string().contains("`kiln fsck --repair`"),
            "{report}"
        );
        assert!(
            cache.blob_path(&a.layer).exists(),
            "no repair without --repair"
        );

        let report = fsck(&cache, true).unwrap();
        assert!(report.is_clean(), "{report}");
        assert!(report.corrupt[0].removed);
        assert!(!cache.blob_path(&a.layer).exists());
        assert_eq!(
            report.refs_dropped,
            ["docker.io/org/a:1", "docker.io/org/a:1-amd64"]
        );
        let view = cache.index().unwrap();
        assert!(view.get("docker.io/org/a:1").is_none());
        assert!(view.get("docker.io/org/b:1").is_some());

        let after = fsck(&cache, false).unwrap();
        assert!(after.is_clean(), "{after}");
        // a's index, manifest and config are now unreferenced.
        assert_eq!(after.stray_blobs, 3);
    }

    #[test]
    fn missing_blobs_and_wrong_sizes_are_dangling_references() {
        let (_dir, cache) = cache();
        let a = image(&cache, "org/a:1", b"layer a");
        fs::remove_file(cache.blob_path(&a.config)).unwrap();
        let report = fsck(&cache, false).unwrap();
        let lines: Vec<String> = report.bad_refs.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            lines,
            [format!(
                "docker.io/org/a:1 -> index {} -> manifest {} -> config {} missing",
                a.index, a.manifest, a.config
            )]
        );

        let b = cache.put_blob(b"12345").unwrap();
        cache
            .update_index(|i| {
                i.manifests.push(Descriptor::new("x/y", b.clone(), 4));
                Ok(())
            })
            .unwrap();
        let report = fsck(&cache, false).unwrap();
        assert_eq!(report.bad_refs.len(), 2, "{report}");
        assert_eq!(
            report.bad_refs[1].to_string(),
            format!("index.json entry -> blob {b} is 5 bytes, the descriptor says 4")
        );
        let report = fsck(&cache, true).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.refs_dropped.len(), 3);
        assert!(cache.index().unwrap().index().manifests.is_empty());
    }

    #[test]
    fn leftovers_of_dead_writers_are_removed_and_live_writes_left_alone() {
        let (_dir, cache) = cache();
        image(&cache, "org/a:1", b"layer a");
        let dead = dead_pid();
        let me = std::process::id();
        let kiln = cache.root().join(".kiln");
        let hex = "ab".repeat(32);
        let dead_files = [
            cache.tmp_dir().join(format!("blob-{dead}-3")),
            cache.root().join(format!(".index.json.tmp-{dead}")),
            kiln.join(format!(".usage.json.tmp-{dead}")),
            kiln.join("trash").join(format!("{hex}-{dead}")),
        ];
        let live_files = [
            cache.tmp_dir().join(format!("blob-{me}-77")),
            cache.root().join(format!(".index.json.tmp-{me}")),
        ];
        fs::create_dir_all(kiln.join("trash")).unwrap();
        fs::create_dir_all(kiln.join("uploads").join("old")).unwrap();
        fs::create_dir_all(kiln.join("uploads").join("busy")).unwrap();
        for f in dead_files.iter().chain(&live_files) {
            fs::write(f, b"partial").unwrap();
        }
        let old_upload = kiln.join("uploads").join("old").join("data");
        fs::write(&old_upload, b"abandoned").unwrap();
        set_age(&old_upload, Duration::from_secs(25 * 3600));
        set_age(
            &kiln.join("uploads").join("old"),
            Duration::from_secs(25 * 3600),
        );
        // An old directory whose data is still being written is in use.
        let busy = kiln.join("uploads").join("busy");
        fs::write(busy.join("data"), b"uploading").unwrap();
        set_age(&busy, Duration::from_secs(25 * 3600));
        // Not a blob name: another tool's write in progress, or, when old, a leftover.
        let foreign_new = cache.blobs_dir().join(format!("{hex}.tmp123"));
        let foreign_old = cache.blobs_dir().join("junk");
        fs::write(&foreign_new, b"x").unwrap();
        fs::write(&foreign_old, b"xy").unwrap();
        set_age(&foreign_old, Duration::from_secs(30 * 3600));

        let report = fsck(&cache, false).unwrap();
        let mut found: Vec<&Path> = report.leftovers.iter().map(|l| l.path.as_path()).collect();
        found.sort();
        let mut expected: Vec<PathBuf> = dead_files.to_vec();
        expected.push(kiln.join("uploads").join("old"));
        expected.push(foreign_old.clone());
        expected.sort();
        assert_eq!(
            found,
            expected.iter().map(PathBuf::as_path).collect::<Vec<_>>()
        );
        assert!(report.corrupt.is_empty() && report.bad_refs.is_empty());
        assert!(!report.is_clean());
        assert_eq!(report.in_progress.len(), 4, "{:?}", report.in_progress);
        assert!(
            report
                .to_string()
                .contains(&format!("temp file of a dead process (pid {dead})")),
            "{report}"
        );

        let report = fsck(&cache, true).unwrap();
        assert!(report.is_clean(), "{report}");
        assert!(
            report
                .leftovers
                .iter()
                .all(|l| l.removed && !l.path.exists())
        );
        for f in live_files.iter().chain([&foreign_new, &busy]) {
            assert!(f.exists(), "{} was removed", f.display());
        }
        let after = fsck(&cache, false).unwrap();
        assert!(after.is_clean() && after.leftovers.is_empty(), "{after}");
    }
}
