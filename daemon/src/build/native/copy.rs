//! `COPY` and `ADD` of local sources, applied to trees with the semantics of BuildKit's
//! file operations (tonistiigi/fsutil `copy`): wildcard sources, the source followed if it
//! is a symlink, directory contents copied rather than the directory, a destination that
//! is an existing directory receiving the source by name, parent directories created
//! 0755, modes kept unless `--chmod`, owners from `--chown` (else kept: 0:0 for the
//! context), and local tar archives unpacked by `ADD`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use super::context::{has_wildcard, match_component};
use super::tree::{Kind, Node, ResolveError, Tree, base_name, clean, join, parent};

/// Options of one COPY/ADD.
#[derive(Debug, Clone)]
pub struct CopyOpts {
    pub chown: Option<(u64, u64)>,
    pub chmod: Option<u32>,
    pub epoch: i64,
    /// ADD: unpack local tar archives.
    pub unpack: bool,
    /// Sources come from the build context: a symlink leading out of it is an error.
    pub confine: bool,
}

/// What a COPY or ADD could not do. Most are failures (a message for the user, without
/// location); [`CopyError::is_refusal`] tells the archives the native builder cannot
/// read, which the docker builder can.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("destination /{dest}: {source}")]
    Destination {
        dest: String,
        #[source]
        source: ResolveError,
    },
    #[error(
        "source {path}: symlink {link} points to {target}, outside the build context; copy \
         what it points to into the package instead"
    )]
    Escapes {
        path: String,
        link: String,
        target: String,
    },
    #[error("source {path}: {source}")]
    Source {
        path: String,
        #[source]
        source: ResolveError,
    },
    #[error("source {pattern}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("{0}: not found in the build context (or excluded by .dockerignore)")]
    NotInContext(String),
    #[error("/{0}: not found in the source stage or image")]
    NotInStage(String),
    #[error("cannot copy directory /{from} onto /{to}, which is not a directory")]
    DirOntoFile { from: String, to: String },
    #[error("cannot overwrite directory /{to} with the non-directory /{from}")]
    FileOntoDir { from: String, to: String },
    #[error("reading {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("unpacking {archive}: {source}")]
    Unpacking {
        archive: String,
        #[source]
        source: Box<CopyError>,
    },
    #[error("reading the archive: {0}")]
    Archive(#[source] io::Error),
    #[error("the archive's /{path} would replace the directory /{target}")]
    ArchiveOverDir { path: String, target: String },
    /// Refused: the docker builder can do it.
    #[error(
        "ADD --chown/--chmod of the archive {0}: how they apply to unpacked files differs \
         between BuildKit versions"
    )]
    ArchiveOwnership(String),
    /// Refused: the docker builder can do it.
    #[error(
        "ADD {name}: the file is {compression}-compressed; the native builder unpacks only \
         plain and gzip-compressed tar archives"
    )]
    Compressed {
        name: String,
        compression: &'static str,
    },
}

impl CopyError {
    /// The native builder cannot do this exactly, the docker builder can: the build is
    /// refused rather than failed (`auto` falls back to docker).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            CopyError::ArchiveOwnership(_) | CopyError::Compressed { .. }
        )
    }
}

/// Copies `src_pattern` (from `src`) to `dest` (in `dst`); `dest_dir` when the destination
/// was written with a trailing `/` (or is `.`). Paths written go into `changed`.
#[allow(clippy::too_many_arguments)]
pub fn copy(
    dst: &mut Tree,
    src: &Tree,
    src_pattern: &str,
    dest: &str,
    dest_dir: bool,
    opts: &CopyOpts,
    spool: &Arc<File>,
    changed: &mut BTreeSet<String>,
) -> Result<(), CopyError> {
    let pattern = clean(src_pattern);
    let matches = if has_wildcard(&pattern) {
        wildcard_matches(src, &pattern, opts.confine)?
    } else {
        vec![pattern.clone()]
    };
    let (uid, gid) = opts.chown.unwrap_or((0, 0));
    let dest_r = dst
        .resolve(dest, true, false)
        .map_err(|source| CopyError::Destination {
            dest: dest.to_owned(),
            source,
        })?;
    let ensure = if dest_dir {
        dest_r.as_str()
    } else {
        parent(&dest_r)
    };
    for p in dst
        .mkdir_all(ensure, 0o755, uid, gid, opts.epoch)
        .map_err(|source| CopyError::Destination {
            dest: dest.to_owned(),
            source,
        })?
    {
        changed.insert(p);
    }
    for m in matches {
        let followed = src.resolve(&m, true, opts.confine).map_err(|e| match e {
            ResolveError::Escapes { link, target } => CopyError::Escapes {
                path: m.clone(),
                link,
                target,
            },
            source => CopyError::Source {
                path: m.clone(),
                source,
            },
        })?;
        let Some(node) = src.get(&followed) else {
            return Err(if opts.confine {
                CopyError::NotInContext(m)
            } else {
                CopyError::NotInStage(m)
            });
        };
        if opts.unpack
            && matches!(node.kind, Kind::File { .. })
            && let Some(archive) = open_archive(node, &m)?
        {
            if opts.chown.is_some() || opts.chmod.is_some() {
                return Err(CopyError::ArchiveOwnership(m));
            }
            unpack(dst, &dest_r, archive, opts, spool, changed).map_err(|e| {
                if e.is_refusal() {
                    e
                } else {
                    CopyError::Unpacking {
                        archive: m.clone(),
                        source: Box::new(e),
                    }
                }
            })?;
            continue;
        }
        let mut dest_path = dest_r.clone();
        if !node.is_dir() && dst.get(&dest_path).is_some_and(Node::is_dir) {
            dest_path = join(&dest_path, base_name(&m));
        }
        for p in dst
            .mkdir_all(parent(&dest_path), 0o755, uid, gid, opts.epoch)
            .map_err(|source| CopyError::Destination {
                dest: dest_path.clone(),
                source,
            })?
        {
            changed.insert(p);
        }
        copy_node(dst, src, &followed, &dest_path, false, opts, changed)?;
    }
    Ok(())
}

fn copy_node(
    dst: &mut Tree,
    src: &Tree,
    sp: &str,
    dp: &str,
    overwrite_meta: bool,
    opts: &CopyOpts,
    changed: &mut BTreeSet<String>,
) -> Result<(), CopyError> {
    let Some(node) = src.get(sp) else {
        return Ok(());
    };
    let meta = |n: &Node| {
        let mut out = n.clone();
        if let Some(m) = opts.chmod
            && !matches!(n.kind, Kind::Symlink(_))
        {
            out.mode = m;
        }
        if let Some((u, g)) = opts.chown {
            out.uid = u;
            out.gid = g;
        }
        out.mtime = opts.epoch;
        out
    };
    match &node.kind {
        Kind::Dir => {
            let created = match dst.get(dp) {
                None => true,
                Some(d) if d.is_dir() => false,
                Some(_) => {
                    return Err(CopyError::DirOntoFile {
                        from: sp.to_owned(),
                        to: dp.to_owned(),
                    });
                }
            };
            // The top of a copy is made as BuildKit's `MkdirAll(dest, 0755, chown)` makes
            // it (the owner of --chown, else root), not with the source's metadata; what
            // is below it keeps its own.
            let top = || {
                let (uid, gid) = opts.chown.unwrap_or((0, 0));
                Node::dir(0o755, uid, gid, opts.epoch)
            };
            if created {
                dst.insert(dp, if overwrite_meta { meta(node) } else { top() });
            }
            for child in src.children(sp) {
                copy_node(
                    dst,
                    src,
                    &join(sp, &child),
                    &join(dp, &child),
                    true,
                    opts,
                    changed,
                )?;
            }
            if overwrite_meta {
                dst.insert(dp, meta(node));
            }
            if created || overwrite_meta {
                changed.insert(dp.to_owned());
            }
        }
        _ => {
            if dst.get(dp).is_some_and(Node::is_dir) {
                return Err(CopyError::FileOntoDir {
                    from: sp.to_owned(),
                    to: dp.to_owned(),
                });
            }
            let mut n = meta(node);
            if matches!(n.kind, Kind::Symlink(_)) {
                n.mode = 0o777;
            }
            dst.insert(dp, n);
            changed.insert(dp.to_owned());
        }
    }
    Ok(())
}

/// Matches a pattern component by component against the tree, in sorted order.
fn wildcard_matches(src: &Tree, pattern: &str, confine: bool) -> Result<Vec<String>, CopyError> {
    let mut current = vec![String::new()];
    for comp in pattern.split('/') {
        let mut next = Vec::new();
        for dir in &current {
            let real = src
                .resolve(dir, true, confine)
                .map_err(|source| CopyError::Source {
                    path: pattern.to_owned(),
                    source,
                })?;
            if !src.get(&real).is_some_and(Node::is_dir) {
                continue;
            }
            if has_wildcard(comp) {
                for child in src.children(&real) {
                    if match_component(comp, &child).map_err(|source| CopyError::Pattern {
                        pattern: pattern.to_owned(),
                        source,
                    })? {
                        next.push(join(dir, &child));
                    }
                }
            } else if src.get(&join(&real, comp)).is_some() {
                next.push(join(dir, comp));
            }
        }
        current = next;
    }
    Ok(current)
}

/// Opens a file node as a tar stream if it is a tar archive (plain or gzip-compressed);
/// `None` when it is not an archive (ADD then copies it as a file).
fn open_archive<'a>(node: &'a Node, name: &str) -> Result<Option<Box<dyn Read + 'a>>, CopyError> {
    let io_err = |source: io::Error| CopyError::Read {
        name: name.to_owned(),
        source,
    };
    let mut head = [0u8; 6];
    let n = read_full(&mut node.open().map_err(io_err)?, &mut head).map_err(io_err)?;
    let head = &head[..n];
    let kind = if head.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else if head.starts_with(b"BZh") {
        "bzip2"
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else {
        "plain"
    };
    let stream: Box<dyn Read + 'a> = match kind {
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(
            node.open().map_err(io_err)?,
        )),
        "plain" => node.open().map_err(io_err)?,
        other => {
            return Err(CopyError::Compressed {
                name: name.to_owned(),
                compression: other,
            });
        }
    };
    // Docker unpacks only what reads as a tar archive: a valid first header.
    let mut probe = stream;
    let mut block = vec![0u8; 512];
    let n = read_full(&mut probe, &mut block).unwrap_or(0);
    let is_tar = n == 512 && {
        let mut h = tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(&block);
        h.cksum().ok() == Some(checksum(&block))
    };
    if !is_tar {
        return Ok(None);
    }
    let fresh: Box<dyn Read + 'a> = match kind {
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(
            node.open().map_err(io_err)?,
        )),
        _ => node.open().map_err(io_err)?,
    };
    Ok(Some(fresh))
}

fn checksum(block: &[u8]) -> u32 {
    block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum()
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn unpack(
    dst: &mut Tree,
    dest: &str,
    archive: Box<dyn Read + '_>,
    opts: &CopyOpts,
    spool: &Arc<File>,
    changed: &mut BTreeSet<String>,
) -> Result<(), CopyError> {
    for p in dst
        .mkdir_all(dest, 0o755, 0, 0, opts.epoch)
        .map_err(|source| CopyError::Destination {
            dest: dest.to_owned(),
            source,
        })?
    {
        changed.insert(p);
    }
    let mut staged = Tree::new(Node::dir(0o755, 0, 0, opts.epoch));
    staged
        .apply_layer(archive, Some(spool), &|_| true)
        .map_err(CopyError::Archive)?;
    for path in staged.descendants("") {
        let Some(node) = staged.get(&path) else {
            continue;
        };
        let mut node = node.clone();
        node.mtime = opts.epoch;
        let target = join(dest, &path);
        if !node.is_dir() && dst.get(&target).is_some_and(Node::is_dir) {
            return Err(CopyError::ArchiveOverDir { path, target });
        }
        dst.insert(&target, node);
        changed.insert(target);
    }
    Ok(())
}
