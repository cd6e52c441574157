//! From a RUN step's overlay upper directory to the paths of its layer, as BuildKit's
//! overlay differ sees them: overlay whiteouts (0/0 character devices) become OCI
//! `.wh.<name>` entries and opaque directories a `.wh..wh..opq` entry; what overlayfs
//! copied up without a change (same type, mode, owner and content as below) and the mount
//! points the runtime made are left out; a directory is kept when it is new, changed, or
//! holds a kept entry. The result is a [`Tree`] whose files point at the upper directory,
//! written by [`super::layer::write_layer`] sorted, with owners and modes kept and mtimes
//! set to `SOURCE_DATE_EPOCH`.

use std::collections::BTreeSet;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::tree::{Content, Kind, Node, Tree, join, parent};
use super::unpack::OPAQUE_XATTR;

/// A RUN step's changes, ready for `write_layer`.
#[derive(Debug)]
pub struct Diff {
    pub tree: Tree,
    /// Every path of the layer, parents before children.
    pub paths: Vec<String>,
}

/// Compares `upper` with `lowers` (top first, as overlayfs stacks them). `mounts` are the
/// mount destinations of the step (relative, cleaned): they and what is under them are
/// not part of the layer, nor are new directories made only to hold them.
pub fn diff(upper: &Path, lowers: &[PathBuf], mounts: &BTreeSet<String>) -> io::Result<Diff> {
    let mut w = Walk {
        upper,
        lowers,
        mounts,
        out: Vec::new(),
    };
    w.dir("", false)?;
    w.out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tree = Tree::new(Node::dir(0o755, 0, 0, 0));
    let mut paths = Vec::with_capacity(w.out.len());
    for (p, n) in w.out {
        tree.insert(&p, n);
        paths.push(p);
    }
    Ok(Diff { tree, paths })
}

struct Walk<'a> {
    upper: &'a Path,
    lowers: &'a [PathBuf],
    mounts: &'a BTreeSet<String>,
    out: Vec<(String, Node)>,
}

impl Walk<'_> {
    /// Walks the upper directory `rel`; returns whether it emitted anything below it.
    fn dir(&mut self, rel: &str, below_opaque: bool) -> io::Result<bool> {
        let mut names: Vec<String> = Vec::new();
        for e in fs::read_dir(self.upper.join(rel))? {
            let e = e?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        let mut emitted = false;
        for name in names {
            let child = join(rel, &name);
            if self.mounts.contains(&child) {
                continue;
            }
            let path = self.upper.join(&child);
            let meta = path.symlink_metadata()?;
            let ft = meta.file_type();
            if is_whiteout(&meta) {
                self.out
                    .push((join(rel, &format!(".wh.{name}")), whiteout()));
                emitted = true;
                continue;
            }
            let lower = if below_opaque {
                None
            } else {
                lookup(self.lowers, &child)
            };
            if ft.is_dir() {
                let opaque = is_opaque(&path);
                let sub = self.dir(&child, below_opaque || opaque)?;
                if opaque {
                    self.out.push((join(&child, ".wh..wh..opq"), whiteout()));
                }
                let changed = match &lower {
                    None => true,
                    Some((_, lm)) => !lm.is_dir() || !same_meta(&meta, lm),
                };
                let made_for_mount =
                    lower.is_none() && !sub && !opaque && self.is_mount_ancestor(&child);
                if (changed || sub || opaque) && !made_for_mount {
                    self.out.push((child, node(&meta, Kind::Dir)));
                    emitted = true;
                }
                continue;
            }
            if let Some((lp, lm)) = &lower
                && same_entry(&path, &meta, lp, lm)?
            {
                continue;
            }
            let kind = if ft.is_symlink() {
                Kind::Symlink(fs::read_link(&path)?.to_string_lossy().into_owned())
            } else if ft.is_file() {
                Kind::File {
                    content: Content::Path(path.clone()),
                    size: meta.len(),
                }
            } else {
                let entry_type = if ft.is_char_device() {
                    b'3'
                } else if ft.is_block_device() {
                    b'4'
                } else if ft.is_fifo() {
                    b'6'
                } else {
                    // A socket has no tar form; BuildKit leaves it out too.
                    continue;
                };
                let rdev = meta.rdev();
                Kind::Special {
                    entry_type,
                    major: nix::sys::stat::major(rdev) as u32,
                    minor: nix::sys::stat::minor(rdev) as u32,
                }
            };
            self.out.push((child, node(&meta, kind)));
            emitted = true;
        }
        Ok(emitted)
    }

    fn is_mount_ancestor(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.mounts.iter().any(|m| m.starts_with(&prefix))
    }
}

fn node(meta: &Metadata, kind: Kind) -> Node {
    Node {
        kind,
        mode: meta.mode() & 0o7777,
        uid: u64::from(meta.uid()),
        gid: u64::from(meta.gid()),
        mtime: meta.mtime(),
    }
}

fn whiteout() -> Node {
    Node {
        kind: Kind::File {
            content: Content::Empty,
            size: 0,
        },
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
    }
}

/// An overlay whiteout: a character device with device number 0/0.
pub fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

pub fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

/// What `rel` is in the stacked lower directories (top first), if anything.
fn lookup(lowers: &[PathBuf], rel: &str) -> Option<(PathBuf, Metadata)> {
    for l in lowers {
        let p = l.join(rel);
        if let Ok(m) = p.symlink_metadata() {
            if is_whiteout(&m) {
                return None;
            }
            return Some((p, m));
        }
        // Does this layer hide `rel` in the layers below it?
        let mut anc = parent(rel);
        while !anc.is_empty() {
            let a = l.join(anc);
            if let Ok(m) = a.symlink_metadata()
                && (!m.is_dir() || is_opaque(&a))
            {
                return None;
            }
            anc = parent(anc);
        }
    }
    None
}

fn same_meta(a: &Metadata, b: &Metadata) -> bool {
    a.mode() == b.mode() && a.uid() == b.uid() && a.gid() == b.gid()
}

/// Whether an upper entry is the lower one copied up unchanged.
fn same_entry(up: &Path, um: &Metadata, low: &Path, lm: &Metadata) -> io::Result<bool> {
    if !same_meta(um, lm) {
        return Ok(false);
    }
    let ft = um.file_type();
    if ft.is_symlink() {
        return Ok(fs::read_link(up)? == fs::read_link(low)?);
    }
    if ft.is_file() {
        return Ok(um.len() == lm.len() && same_bytes(up, low)?);
    }
    Ok(um.rdev() == lm.rdev())
}

fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
