//! Deterministic layers: a tar of the given tree paths (sorted by the caller, mtimes set
//! to `SOURCE_DATE_EPOCH`, owners and modes from the tree, no atime/ctime, no user or
//! group names), gzip-compressed into the cache while the uncompressed `diff_id` and the
//! compressed digest are computed in the same pass.
//!
//! Compression is pigz-like: the tar stream is cut into fixed 1 MiB chunks, each chunk is
//! compressed on a worker thread into an independent gzip member (no file name, mtime 0,
//! OS byte 255, level 6), and the members are concatenated in order. A multi-member gzip
//! file is one valid gzip stream (RFC 1952 §2.2; Go's, containerd's and Docker's readers
//! read it as one). Because the chunk size is fixed, the bytes do not depend on the number
//! of threads or on the machine: the same tar gives the same blob everywhere.
//!
//! The deflate implementation is zlib-rs (flate2's `zlib-rs` feature): about 1.5 times
//! the speed of miniz_oxide at this level on this workload (`scripts/bench-native`).
//! Cargo.lock pins it, so a given kiln build always writes the same bytes; upgrading it
//! may change layer digests (as upgrading any compressor would).

use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use flate2::{Compression, GzBuilder};
use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use super::tree::{Kind, Tree};
use crate::cache::{BlobWriter, Cache, CacheError};
use crate::oci::{Descriptor, OCI_LAYER_GZIP};

/// Size of the independently compressed chunks. Part of the output format: changing it
/// changes every digest.
pub const CHUNK: usize = 1 << 20;
/// gzip level (zlib's default, as BuildKit uses).
pub const LEVEL: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("writing the layer: /{path}: {source}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the layer: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A layer written into the cache.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The compressed blob.
    pub desc: Descriptor,
    /// sha256 of the uncompressed tar (`rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

/// Writes the tar of `paths` (taken from `tree`, in the given order) as a gzip blob.
pub fn write_layer(
    cache: &Cache,
    tree: &Tree,
    paths: &[String],
    epoch: i64,
) -> Result<Layer, LayerError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let blob = cache.blob_writer()?;
    std::thread::scope(|s| {
        let (job_tx, job_rx) = sync_channel::<(u64, Vec<u8>)>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = sync_channel::<(u64, io::Result<Vec<u8>>)>(threads * 2);
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            s.spawn(move || {
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, data)) = job else { return };
                    if res_tx.send((seq, gzip_member(&data))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);
        let writer = s.spawn(move || collect(blob, res_rx));

        let mut sink = Sink {
            hasher: Sha256::new(),
            buf: Vec::with_capacity(CHUNK),
            seq: 0,
            total: 0,
            tx: job_tx,
        };
        let produced = write_tar(&mut sink, tree, paths, epoch).and_then(|()| {
            sink.send_chunk()?;
            Ok(())
        });
        let Sink {
            hasher, total, tx, ..
        } = sink;
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| io::Error::other("the layer writer thread panicked"))?;
        produced?;
        let blob = written?;
        let size = blob.size();
        let digest = blob.finish(None, None)?;
        Ok(Layer {
            desc: Descriptor::new(OCI_LAYER_GZIP, digest, size),
            diff_id: Digest::from_sha256_bytes(&hasher.finalize().into()),
            tar_size: total,
        })
    })
}

fn gzip_member(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzBuilder::new().mtime(0).operating_system(255).write(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::new(LEVEL),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Writes compressed members to the blob in sequence order.
fn collect(
    mut blob: BlobWriter,
    rx: Receiver<(u64, io::Result<Vec<u8>>)>,
) -> Result<BlobWriter, LayerError> {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    let mut failed: Option<LayerError> = None;
    // Keep receiving until every worker is gone, even after a failure, so no worker
    // blocks forever on a full channel.
    for (seq, member) in rx {
        if failed.is_some() {
            continue;
        }
        pending.insert(seq, member);
        while let Some(member) = pending.remove(&next) {
            next += 1;
            match member {
                Ok(bytes) => {
                    if let Err(e) = blob.write_bytes(&bytes) {
                        failed = Some(e.into());
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e.into());
                    break;
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None if pending.is_empty() => Ok(blob),
        None => Err(LayerError::Io(io::Error::other(
            "a layer chunk was lost between compression and writing",
        ))),
    }
}

struct Sink {
    hasher: Sha256,
    buf: Vec<u8>,
    seq: u64,
    total: u64,
    tx: SyncSender<(u64, Vec<u8>)>,
}

impl Sink {
    fn send_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send((self.seq, chunk))
            .map_err(|_| io::Error::other("the layer compressors stopped"))?;
        self.seq += 1;
        Ok(())
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        self.total += n as u64;
        if self.buf.len() == CHUNK {
            self.send_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The tar stream itself: GNU headers (long names as GNU long-name entries), written by
/// hand so that nothing of the machine leaks in.
fn write_tar(
    out: &mut dyn Write,
    tree: &Tree,
    paths: &[String],
    epoch: i64,
) -> Result<(), LayerError> {
    let mut b = tar::Builder::new(out);
    let mtime = u64::try_from(epoch).unwrap_or(0);
    for path in paths {
        let Some(node) = tree.get(path) else {
            continue;
        };
        let entry_err = |source: io::Error| LayerError::Entry {
            path: path.clone(),
            source,
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(node.mode & 0o7777);
        h.set_uid(node.uid);
        h.set_gid(node.gid);
        h.set_mtime(mtime);
        match &node.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), io::empty())
                    .map_err(entry_err)?;
            }
            Kind::File { size, .. } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(*size);
                let reader = node.open().map_err(entry_err)?;
                let mut counted = Exact {
                    inner: reader,
                    left: *size,
                };
                b.append_data(&mut h, path, &mut counted)
                    .map_err(entry_err)?;
                if counted.left != 0 {
                    return Err(entry_err(io::Error::other(format!(
                        "the file shrank while it was read ({} of {size} bytes missing); \
                         retry the build once it stops changing",
                        counted.left
                    ))));
                }
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).map_err(entry_err)?;
            }
            Kind::Special {
                entry_type,
                major,
                minor,
            } => {
                h.set_entry_type(tar::EntryType::new(*entry_type));
                h.set_size(0);
                h.set_device_major(*major).map_err(entry_err)?;
                h.set_device_minor(*minor).map_err(entry_err)?;
                b.append_data(&mut h, path, io::empty())
                    .map_err(entry_err)?;
            }
        }
    }
    b.finish()?;
    Ok(())
}

/// Reads exactly `left` bytes at most and tracks what is missing.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: io::Read> io::Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = (buf.len() as u64).min(self.left) as usize;
        if max == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}
