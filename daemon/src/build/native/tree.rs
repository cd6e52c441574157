//! A filesystem tree in memory: what a stage's root filesystem (or the build context)
//! holds, path by path, with modes and owners. COPY semantics are applied to trees, and
//! a layer is written from the paths a COPY changed.
//!
//! File contents are not held in memory: a node points at a file in the build context,
//! or at a byte range of a spool file into which an image layer's files were unpacked.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a file's bytes are.
#[derive(Debug, Clone)]
pub enum Content {
    /// A file on disk (the build context).
    Path(PathBuf),
    /// A byte range of a spool file.
    Spool { spool: Arc<File>, offset: u64 },
    /// Not read: the tree was materialised for its metadata only.
    Unread,
    /// No bytes (a whiteout entry).
    Empty,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File {
        content: Content,
        size: u64,
    },
    Symlink(String),
    /// A device or FIFO: tar entry type and device numbers.
    Special {
        entry_type: u8,
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits, with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
}

impl Node {
    pub fn dir(mode: u32, uid: u64, gid: u64, mtime: i64) -> Node {
        Node {
            kind: Kind::Dir,
            mode,
            uid,
            gid,
            mtime,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }

    /// A reader over a file node's bytes.
    pub fn open(&self) -> io::Result<Box<dyn Read + Send + '_>> {
        match &self.kind {
            Kind::File { content, size } => match content {
                Content::Path(p) => Ok(Box::new(File::open(p)?.take(*size))),
                Content::Spool { spool, offset } => Ok(Box::new(SpoolReader {
                    file: spool,
                    pos: *offset,
                    end: offset + size,
                })),
                Content::Empty => Ok(Box::new(io::empty())),
                Content::Unread => Err(io::Error::other(
                    "file content was not read (internal: tree materialised without content)",
                )),
            },
            _ => Ok(Box::new(io::empty())),
        }
    }

    /// The whole content of a small file node.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.open()?.read_to_end(&mut v)?;
        Ok(v)
    }
}

struct SpoolReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Why a path could not be resolved in a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("/{0} is not a directory")]
    NotADirectory(String),
    #[error("too many levels of symbolic links at /{0}")]
    TooManyLinks(String),
    /// A symlink leads outside the tree (only reported when `confine` is asked for).
    #[error("symlink {link} points to {target}, outside the build context")]
    Escapes { link: String, target: String },
}

/// Paths are relative, `/`-separated, cleaned, without a leading `/`; the root is "".
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

pub fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

pub fn base_name(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else if name.is_empty() {
        dir.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// Cleans an absolute or relative path as Go's `path.Clean(path.Join("/", p))` would,
/// without the leading `/`: `.` and empty components dropped, `..` clamped at the root.
pub fn clean(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl Tree {
    /// A tree holding only its root directory.
    pub fn new(root: Node) -> Tree {
        let mut nodes = BTreeMap::new();
        nodes.insert(String::new(), root);
        Tree { nodes }
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// The direct children names of a directory, sorted.
    pub fn children(&self, dir: &str) -> Vec<String> {
        self.below(dir)
            .filter(|(_, rel)| !rel.contains('/'))
            .map(|(_, rel)| rel.to_owned())
            .collect()
    }

    /// Every path under `dir` (not `dir` itself).
    pub fn descendants(&self, dir: &str) -> Vec<String> {
        self.below(dir).map(|(path, _)| path.to_owned()).collect()
    }

    /// The paths under `dir` (not `dir` itself), in order, each with its part below `dir`.
    fn below<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let skip = prefix.len();
        self.nodes
            .range(prefix.clone()..)
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(&prefix))
            .filter(|k| !k.is_empty())
            .map(move |k| (k, &k[skip..]))
    }

    /// Removes a path and everything under it.
    pub fn remove(&mut self, path: &str) {
        if path.is_empty() {
            let root = self.nodes.remove("");
            self.nodes.clear();
            if let Some(root) = root {
                self.nodes.insert(String::new(), root);
            }
            return;
        }
        for d in self.descendants(path) {
            self.nodes.remove(&d);
        }
        self.nodes.remove(path);
    }

    /// Sets `path` to `node`. A directory over a directory keeps the children; anything
    /// else replaces what was there (and its subtree). The parent must exist.
    pub fn insert(&mut self, path: &str, node: Node) {
        match self.nodes.get(path) {
            Some(old) if old.is_dir() && node.is_dir() => {}
            Some(_) => self.remove(path),
            None => {}
        }
        self.nodes.insert(path.to_owned(), node);
    }

    /// Resolves symlinks in `path` inside the tree, as `fs.RootPath` does: a symlink's
    /// absolute target is taken from the tree's root and `..` never leaves it. The last
    /// component is followed only if `follow_last`. With `confine`, a link that would
    /// leave the root is an error instead of being clamped.
    pub fn resolve(
        &self,
        path: &str,
        follow_last: bool,
        confine: bool,
    ) -> Result<String, ResolveError> {
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .rev()
            .map(str::to_owned)
            .collect();
        let mut cur = String::new();
        let mut links = 0;
        while let Some(c) = pending.pop() {
            if c == ".." {
                if cur.is_empty() && confine {
                    return Err(ResolveError::Escapes {
                        link: path.to_owned(),
                        target: path.to_owned(),
                    });
                }
                cur = parent(&cur).to_owned();
                continue;
            }
            let next = join(&cur, &c);
            let last = pending.is_empty();
            match self.nodes.get(&next) {
                Some(Node {
                    kind: Kind::Symlink(target),
                    ..
                }) if !last || follow_last => {
                    links += 1;
                    if links > 255 {
                        return Err(ResolveError::TooManyLinks(next));
                    }
                    if confine {
                        // Depth of the link's directory against the `..`s of its target.
                        let mut depth: i64 = if target.starts_with('/') {
                            return Err(ResolveError::Escapes {
                                link: format!("/{next}"),
                                target: target.clone(),
                            });
                        } else if cur.is_empty() {
                            0
                        } else {
                            cur.split('/').count() as i64
                        };
                        for t in target.split('/') {
                            match t {
                                "" | "." => {}
                                ".." => depth -= 1,
                                _ => depth += 1,
                            }
                            if depth < 0 {
                                return Err(ResolveError::Escapes {
                                    link: format!("/{next}"),
                                    target: target.clone(),
                                });
                            }
                        }
                    }
                    if target.starts_with('/') {
                        cur = String::new();
                    }
                    for t in target.split('/').rev() {
                        if !t.is_empty() && t != "." {
                            pending.push(t.to_owned());
                        }
                    }
                }
                Some(n) if !last && !n.is_dir() && !matches!(n.kind, Kind::Symlink(_)) => {
                    return Err(ResolveError::NotADirectory(next));
                }
                _ => cur = next,
            }
        }
        Ok(cur)
    }

    /// Creates `path` and missing parents as directories with the given metadata, like
    /// `MkdirAll`; returns the directories it created. An existing non-directory on the
    /// way is an error.
    pub fn mkdir_all(
        &mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: i64,
    ) -> Result<Vec<String>, ResolveError> {
        let mut created = Vec::new();
        let mut cur = String::new();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            cur = join(&cur, c);
            match self.nodes.get(&cur) {
                Some(n) if n.is_dir() => {}
                Some(_) => return Err(ResolveError::NotADirectory(cur)),
                None => {
                    self.nodes
                        .insert(cur.clone(), Node::dir(mode, uid, gid, mtime));
                    created.push(cur.clone());
                }
            }
        }
        Ok(created)
    }

    /// Applies one layer (an uncompressed tar stream) on top of this tree, with OCI
    /// whiteouts. File bytes go to `spool` when given (`keep` decides which paths; all
    /// others are metadata only).
    pub fn apply_layer(
        &mut self,
        tar: impl Read,
        spool: Option<&Arc<File>>,
        keep: &dyn Fn(&str) -> bool,
    ) -> io::Result<()> {
        let mut archive = tar::Archive::new(tar);
        let mut spool_end = match spool {
            Some(s) => s.metadata()?.len(),
            None => 0,
        };
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw_path = entry.path()?.to_string_lossy().into_owned();
            let path = clean(&raw_path);
            if path.is_empty() {
                if let Some(root) = self.nodes.get_mut("") {
                    let h = entry.header();
                    root.mode = h.mode()? & 0o7777;
                    root.uid = h.uid()?;
                    root.gid = h.gid()?;
                }
                continue;
            }
            let name = base_name(&path);
            let dir = parent(&path).to_owned();
            if name == ".wh..wh..opq" {
                for child in self.children(&dir) {
                    self.remove(&join(&dir, &child));
                }
                continue;
            }
            if let Some(victim) = name.strip_prefix(".wh.") {
                self.remove(&join(&dir, victim));
                continue;
            }
            self.mkdir_all(&dir, 0o755, 0, 0, 0)
                .map_err(io::Error::other)?;
            let h = entry.header().clone();
            let mode = h.mode()? & 0o7777;
            let (uid, gid, mtime) = (h.uid()?, h.gid()?, h.mtime()? as i64);
            let et = h.entry_type();
            let kind = if et.is_dir() {
                Kind::Dir
            } else if et.is_symlink() {
                let target = entry
                    .link_name()?
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Kind::Symlink(target)
            } else if et.is_hard_link() {
                let target = entry
                    .link_name()?
                    .map(|p| clean(&p.to_string_lossy()))
                    .unwrap_or_default();
                match self.nodes.get(&target) {
                    Some(n) => n.kind.clone(),
                    None => {
                        return Err(io::Error::other(format!(
                            "hard link /{path} to /{target}, which the layer does not hold"
                        )));
                    }
                }
            } else if et.is_file() || et == tar::EntryType::Continuous {
                let size = entry.size();
                let content = match spool {
                    Some(s) if keep(&path) => {
                        let offset = spool_end;
                        let mut w = SpoolWriter {
                            file: s,
                            pos: offset,
                        };
                        let n = io::copy(&mut entry, &mut w)?;
                        spool_end += n;
                        Content::Spool {
                            spool: Arc::clone(s),
                            offset,
                        }
                    }
                    _ => Content::Unread,
                };
                Kind::File { content, size }
            } else if et.is_character_special() || et.is_block_special() || et.is_fifo() {
                Kind::Special {
                    entry_type: et.as_byte(),
                    major: h.device_major()?.unwrap_or(0),
                    minor: h.device_minor()?.unwrap_or(0),
                }
            } else {
                // PAX/GNU metadata entries are consumed by the tar reader; anything else
                // (sparse files, volume labels) has no place in an image layer.
                return Err(io::Error::other(format!(
                    "/{path}: unsupported tar entry type {:?}",
                    et
                )));
            };
            self.insert(
                &path,
                Node {
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime,
                },
            );
        }
        Ok(())
    }
}

struct SpoolWriter<'a> {
    file: &'a File,
    pos: u64,
}

impl io::Write for SpoolWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A spool file for layer contents, removed when the last handle is dropped.
pub fn new_spool(dir: &Path) -> io::Result<Arc<File>> {
    Ok(Arc::new(tempfile::tempfile_in(dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        let mut t = Tree::new(Node::dir(0o755, 0, 0, 0));
        t.mkdir_all("usr/lib", 0o755, 0, 0, 0).unwrap();
        t.insert(
            "lib",
            Node {
                kind: Kind::Symlink("usr/lib".into()),
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 0,
            },
        );
        t.insert(
            "abs",
            Node {
                kind: Kind::Symlink("/usr".into()),
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 0,
            },
        );
        t.insert(
            "up",
            Node {
                kind: Kind::Symlink("../../x".into()),
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 0,
            },
        );
        t
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let t = tree();
        assert_eq!(t.resolve("lib/x", true, false).unwrap(), "usr/lib/x");
        assert_eq!(t.resolve("lib", false, false).unwrap(), "lib");
        assert_eq!(t.resolve("abs/lib", true, false).unwrap(), "usr/lib");
        assert_eq!(t.resolve("up", true, false).unwrap(), "x");
        assert_eq!(
            t.resolve("up", true, true).unwrap_err().to_string(),
            "symlink /up points to ../../x, outside the build context"
        );
        assert!(t.resolve("abs", true, true).is_err());
        assert_eq!(t.resolve("lib", true, true).unwrap(), "usr/lib");
    }

    #[test]
    fn lists_children_and_replaces_subtrees() {
        let mut t = tree();
        assert_eq!(t.children(""), ["abs", "lib", "up", "usr"]);
        assert_eq!(t.children("usr"), ["lib"]);
        t.insert("usr", Node::dir(0o700, 1, 1, 0));
        assert!(
            t.get("usr/lib").is_some(),
            "a dir over a dir keeps children"
        );
        t.insert(
            "usr",
            Node {
                kind: Kind::Symlink("x".into()),
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 0,
            },
        );
        assert!(t.get("usr/lib").is_none());
        assert_eq!(clean("/a/./b/../../../c/"), "c");
    }
}
