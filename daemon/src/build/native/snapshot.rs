//! Snapshots: each layer of an image unpacked once into a directory keyed by its chain ID
//! (the OCI image spec's `ChainID`), in kiln's state directory `<cache>/.kiln/snapshots/`
//! (beside the OCI layout, never inside `blobs/`, so the cache stays LinuxKit-compatible).
//! Every build and package shares them; a RUN step mounts a stage's snapshots as the
//! lower directories of an overlay.
//!
//! A snapshot holds only its own layer's changes in overlayfs's format: OCI whiteouts
//! (`.wh.name`) become 0/0 character devices and opaque markers (`.wh..wh..opq`) the
//! `trusted.overlay.opaque` attribute of their directory, so stacking the snapshots of a
//! chain as lower directories gives the image's root filesystem.
//!
//! A snapshot appears whole or not at all: it is unpacked into a temp directory and
//! renamed into place; two builds unpacking the same chain at once keep one. GC removes
//! the snapshots no cached image needs ([`Snapshots::gc`]), except those used recently
//! (each use touches the directory, as blob GC's grace period protects a blob being
//! written).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use crate::cache::Cache;
use crate::oci::Descriptor;

/// A snapshot used this recently is in use (a build may have it mounted): GC keeps it.
pub const IN_USE_GRACE: Duration = Duration::from_secs(60 * 60);

/// Prefix of everything kiln creates for a RUN step (temp directories, container ids,
/// mount points), so a later kilnd can tell its own leftovers from anything else.
pub const PREFIX: &str = "kiln-";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest} is a {media_type}, which cannot be unpacked")]
    MediaType { digest: Digest, media_type: String },
    #[error(
        "the image has {layers} layers but its config lists {diff_ids} diff IDs; the image is malformed"
    )]
    Mismatch { layers: usize, diff_ids: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The snapshot store of one cache.
#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
    /// Scratch space of RUN steps (`kiln-<pid>-<n>` directories), on the same file
    /// system as the snapshots so that an upper directory can be renamed into one.
    work: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Snapshots {
    /// The store of `cache` (`<cache>/.kiln/snapshots`), created if missing.
    pub fn open(cache: &Cache) -> Result<Snapshots, SnapshotError> {
        Snapshots::at(&cache.root().join(".kiln"))
    }

    /// The store under kiln's state directory `state` (`<cache>/.kiln`).
    pub fn at(state: &Path) -> Result<Snapshots, SnapshotError> {
        let root = state.join("snapshots");
        let work = state.join("run");
        for d in [&root, &work] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(Snapshots { root, work })
    }

    /// Where RUN steps keep their temp directories.
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// A fresh, unique directory for one RUN step, under [`Self::work_dir`].
    pub fn new_work(&self) -> Result<PathBuf, SnapshotError> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .work
            .join(format!("{PREFIX}{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    fn path(&self, chain: &Digest) -> PathBuf {
        self.root.join(chain.hex())
    }

    /// The chain IDs of a stack of layers, bottom first: `ChainID(L0) = DiffID(L0)`,
    /// `ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))`.
    pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
        for d in diff_ids {
            let next = match out.last() {
                None => d.clone(),
                Some(prev) => {
                    let h: [u8; 32] = Sha256::digest(format!("{prev} {d}")).into();
                    Digest::from_sha256_bytes(&h)
                }
            };
            out.push(next);
        }
        out
    }

    /// The snapshot directories of `layers` (with their `diff_ids`), top first as an
    /// overlay's `lowerdir` lists them; those missing are unpacked from the cache.
    pub fn ensure(
        &self,
        cache: &Cache,
        layers: &[Descriptor],
        diff_ids: &[Digest],
    ) -> Result<Vec<PathBuf>, SnapshotError> {
        if layers.len() != diff_ids.len() {
            return Err(SnapshotError::Mismatch {
                layers: layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let chains = Snapshots::chain_ids(diff_ids);
        let mut dirs = Vec::with_capacity(layers.len());
        for (layer, chain) in layers.iter().zip(&chains) {
            let dir = self.path(chain);
            if !dir.is_dir() {
                self.unpack(cache, layer, &dir)?;
            }
            touch(&dir);
            dirs.push(dir);
        }
        dirs.reverse();
        Ok(dirs)
    }

    fn unpack(&self, cache: &Cache, layer: &Descriptor, dest: &Path) -> Result<(), SnapshotError> {
        let blob = cache.blob_path(&layer.digest);
        let file = fs::File::open(&blob).map_err(io_err(&blob))?;
        let reader: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
            Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file)))
        } else if layer.media_type.ends_with("tar") {
            Box::new(io::BufReader::new(file))
        } else {
            return Err(SnapshotError::MediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        };
        let tmp = self.new_work()?;
        let fs_dir = tmp.join("fs");
        let result = fs::create_dir(&fs_dir)
            .and_then(|()| super::unpack::unpack(reader, &fs_dir))
            .map_err(|source| SnapshotError::Unpack {
                digest: layer.digest.clone(),
                source,
            })
            .and_then(|()| self.place(&fs_dir, dest));
        let _ = fs::remove_dir_all(&tmp);
        result
    }

    /// Makes `dir` (a finished root of changes, on this file system) the snapshot of
    /// `chain`; when another build placed it first, `dir` is left where it was.
    pub fn commit(&self, dir: &Path, chain: &Digest) -> Result<PathBuf, SnapshotError> {
        let dest = self.path(chain);
        self.place(dir, &dest)?;
        Ok(dest)
    }

    fn place(&self, dir: &Path, dest: &Path) -> Result<(), SnapshotError> {
        match fs::rename(dir, dest) {
            Ok(()) => Ok(()),
            // Another build placed the same chain first: same content, keep theirs.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(SnapshotError::Io {
                path: dest.to_owned(),
                source: e,
            }),
        }
    }

    /// Garbage collection after the cache's own: removes the snapshots no image in
    /// `cache` needs, then, when `budget` (the bytes `--max-size` leaves after the blobs)
    /// is given and the snapshots take more, the least recently used of the others (a
    /// snapshot is only a faster form of blobs the cache keeps). A snapshot used within
    /// [`IN_USE_GRACE`] is never removed (a build may have it mounted).
    pub fn collect(&self, cache: &Cache, budget: Option<u64>) -> Result<SnapshotGc, SnapshotError> {
        let keep = chains_in(cache);
        let now = SystemTime::now();
        let mut report = SnapshotGc::default();
        let mut kept: Vec<(SystemTime, PathBuf, u64)> = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name();
            let Some(chain) = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let size = dir_size(&path);
            let used = fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(now);
            let in_use = now
                .duration_since(used)
                .map_or(true, |age| age < IN_USE_GRACE);
            if keep.contains(&chain) || in_use {
                if !in_use {
                    kept.push((used, path, size));
                }
                report.bytes_after += size;
                continue;
            }
            self.remove(&path)?;
            report.removed += 1;
            report.bytes_freed += size;
        }
        if let Some(budget) = budget {
            kept.sort();
            for (_, path, size) in kept {
                if report.bytes_after <= budget {
                    break;
                }
                self.remove(&path)?;
                report.removed += 1;
                report.bytes_freed += size;
                report.bytes_after -= size;
            }
        }
        Ok(report)
    }

    fn remove(&self, path: &Path) -> Result<(), SnapshotError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // Renamed out first, so a half-removed snapshot is never taken for whole.
        let doomed = self.work.join(format!("{PREFIX}gc-{name}"));
        fs::rename(path, &doomed).map_err(io_err(path))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }

    /// Bytes the snapshots take on disk (for `--max-size`).
    pub fn size(&self) -> u64 {
        dir_size(&self.root)
    }
}

/// What [`Snapshots::collect`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotGc {
    pub removed: u64,
    pub bytes_freed: u64,
    /// Bytes the snapshots take after it.
    pub bytes_after: u64,
}

/// The chain IDs of every image the cache names (indexes followed to their manifests,
/// each manifest's config read for its diff IDs). What cannot be read keeps nothing.
fn chains_in(cache: &Cache) -> BTreeSet<Digest> {
    let mut out = BTreeSet::new();
    let Ok(index) = cache.index() else {
        return out;
    };
    let mut stack: Vec<Descriptor> = index.refs().map(|(_, d)| d.clone()).collect();
    let mut seen = BTreeSet::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        let Ok(m) = cache.read_manifest(&d.digest) else {
            continue;
        };
        stack.extend(m.manifests.iter().cloned());
        let Some(config) = &m.config else { continue };
        let Ok(bytes) = cache.read_blob(&config.digest, 4 << 20) else {
            continue;
        };
        if let Ok(c) = serde_json::from_slice::<super::image::ImageConfig>(&bytes) {
            out.extend(Snapshots::chain_ids(&c.rootfs.diff_ids));
        }
    }
    out
}

/// Marks a snapshot as used now (GC's grace period counts from here).
fn touch(dir: &Path) {
    let now = nix::sys::time::TimeSpec::from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let _ = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dir,
        &now,
        &now,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

/// Bytes of the files under `dir` (blocks actually used), without following links.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a: Digest = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .parse()
            .unwrap();
        let b: Digest = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
            .parse()
            .unwrap();
        let c = Snapshots::chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want: [u8; 32] = Sha256::digest(format!("{a} {b}")).into();
        assert_eq!(c[1], Digest::from_sha256_bytes(&want));
    }
}
