//! The walks under a package's tag: what a directory holds as git would record it
//! (modes, blob ids, symlinks kept inside the package), LinuxKit's content hash of a
//! git directory, and the plain tree hash outside git.

use super::*;

/// The result of scanning one directory of a repository.
#[derive(Debug)]
pub(super) struct GitScan {
    pub(super) dirty: bool,
    /// `git ls-files` in the directory: names relative to it, in index order.
    pub(super) tracked: Vec<Vec<u8>>,
    /// `git ls-files --others --exclude-standard`: sorted, nested repositories as `dir/`.
    pub(super) untracked: Vec<Vec<u8>>,
    /// `core.quotePath`.
    pub(super) quote_high: bool,
}

/// A work-tree file as git would record it.
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkFile {
    pub(super) mode: u32,
    pub(super) oid: [u8; 40],
}

pub(super) fn io(dir: &Path, path: &Path, e: &std::io::Error) -> TagError {
    if e.kind() == ErrorKind::NotFound && !dir.exists() {
        return TagError::Vanished {
            dir: dir.to_owned(),
        };
    }
    TagError::Io {
        dir: dir.to_owned(),
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Reads one work-tree path as git would (`None` if it is missing or not a file).
pub(super) fn work_file(
    memo: &mut Memo,
    path: &Path,
    pkg_dir: &Path,
) -> Result<Option<WorkFile>, TagError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(pkg_dir, path, &e)),
    };
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_symlink() {
        return Ok(None);
    }
    let sums = memo.sums(path, &meta).map_err(|e| io(pkg_dir, path, &e))?;
    Ok(Some(WorkFile {
        mode: git_mode(&meta),
        oid: sums.oid,
    }))
}

pub(super) fn git_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.file_type().is_symlink() {
        MODE_LINK
    } else if meta.permissions().mode() & 0o100 != 0 {
        MODE_EXEC
    } else {
        MODE_FILE
    }
}

/// Checks that a symlink at `link` (inside `root`) points inside `root`.
pub(super) fn check_symlink(pkg_dir: &Path, root: &Path, link: &Path) -> Result<(), TagError> {
    let target = std::fs::read_link(link).map_err(|e| io(pkg_dir, link, &e))?;
    let escape = || TagError::SymlinkEscape {
        dir: pkg_dir.to_owned(),
        link: link.to_owned(),
        target: target.to_string_lossy().into_owned(),
        root: root.to_owned(),
    };
    if target.is_absolute() {
        return Err(escape());
    }
    let parent = link.parent().unwrap_or(root);
    // Lexically, like a build context: `..` must not climb above the root.
    let Ok(rel_parent) = parent.strip_prefix(root) else {
        return Err(escape());
    };
    let mut depth: usize = rel_parent.components().count();
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => {
                depth = depth.checked_sub(1).ok_or_else(escape)?;
            }
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    Ok(())
}

pub(super) struct Walk<'a> {
    pub(super) repo: &'a mut Repo,
    pub(super) memo: &'a mut Memo,
    pub(super) pkg_dir: &'a Path,
    pub(super) root: &'a Path,
    pub(super) rel_len: usize,
    pub(super) work: BTreeMap<Vec<u8>, WorkFile>,
    pub(super) untracked: Vec<Vec<u8>>,
}

impl Walk<'_> {
    /// Scans directory `d`; `Ok(true)` if it is a nested repository (not the root),
    /// which git does not look into.
    pub(super) fn dir(&mut self, d: &Path) -> Result<bool, TagError> {
        let rd = std::fs::read_dir(d).map_err(|e| io(self.pkg_dir, d, &e))?;
        let mut entries = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| io(self.pkg_dir, d, &e))?;
            if entry.file_name() == ".git" {
                if d != self.root {
                    return Ok(true);
                }
                continue;
            }
            entries.push(entry);
        }
        for entry in entries {
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| io(self.pkg_dir, &path, &e))?;
            let Some(rrel) = self.repo.rel(&path) else {
                continue;
            };
            let strip = if self.rel_len == 0 {
                0
            } else {
                self.rel_len + 1
            };
            let rel_here = || rrel[strip..].to_vec();
            if ft.is_dir() {
                if self.repo.is_ignored(&path, true) {
                    continue;
                }
                if self.dir(&path)? {
                    // A nested repository or a submodule: untracked, git lists it
                    // as `dir/`.
                    if !self.repo.index.contains_key(&rrel) {
                        let mut n = rel_here();
                        n.push(b'/');
                        self.untracked.push(n);
                    }
                }
                continue;
            }
            if !ft.is_file() && !ft.is_symlink() {
                continue;
            }
            let tracked = self.repo.index.contains_key(&rrel);
            if !tracked && self.repo.is_ignored(&path, false) {
                continue;
            }
            if ft.is_symlink() {
                check_symlink(self.pkg_dir, self.root, &path)?;
            }
            let known = if tracked && ft.is_file() {
                let meta = entry.metadata().map_err(|e| io(self.pkg_dir, &path, &e))?;
                // SHA-1 repositories only: their ids are 40 hex.
                let oid = self.repo.index_oid_if_unchanged(&rrel, &meta);
                oid.filter(|o| o.len() == 40).map(|oid| {
                    let mut w = WorkFile {
                        mode: git_mode(&meta),
                        oid: [0; 40],
                    };
                    w.oid.copy_from_slice(oid.as_bytes());
                    w
                })
            } else {
                None
            };
            let w = match known {
                Some(w) => w,
                None => match work_file(self.memo, &path, self.pkg_dir)? {
                    Some(w) => w,
                    None => continue,
                },
            };
            if !tracked {
                self.untracked.push(rel_here());
            }
            self.work.insert(rrel, w);
        }
        Ok(false)
    }
}

/// LinuxKit's `contentHash` (git.go), step by step: the output of `git ls-files` and
/// of `git ls-files --exclude-standard --others` joined by a newline, trimmed, split
/// into lines; each line joined to the directory; skipped if `lstat` fails or it is a
/// directory or a symlink; otherwise its bytes go into one sha256. Kiln reports an
/// unreadable file instead of skipping it.
pub(super) fn linuxkit_content_hash(
    pkg_dir: &Path,
    dir: &Path,
    scan: &GitScan,
) -> Result<[u8; 32], TagError> {
    let mut tracked = Vec::new();
    for n in &scan.tracked {
        tracked.extend_from_slice(&quote_path(n, scan.quote_high));
        tracked.push(b'\n');
    }
    let mut all = tracked;
    all.push(b'\n');
    for n in &scan.untracked {
        all.extend_from_slice(&quote_path(n, scan.quote_high));
        all.push(b'\n');
    }
    let mut h = Sha256::new();
    for line in all.trim_ascii().split(|&b| b == b'\n') {
        // bufio.ScanLines drops a trailing \r.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let path = clean_abs(&dir.join(OsStr::from_bytes(line)));
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() || meta.file_type().is_symlink() {
            continue;
        }
        let content = std::fs::read(&path).map_err(|e| io(pkg_dir, &path, &e))?;
        h.update(&content);
    }
    Ok(h.finalize().into())
}

/// One tree of the outside-git hash, in sorted order, `.git` skipped.
pub(super) fn plain_tree(
    memo: &mut Memo,
    h: &mut Sha256,
    pkg_dir: &Path,
    root: &Path,
    d: &Path,
    prefix: &[u8],
) -> Result<(), TagError> {
    let rd = std::fs::read_dir(d).map_err(|e| io(pkg_dir, d, &e))?;
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|e| io(pkg_dir, d, &e))?;
        entries.push(e.file_name());
    }
    entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in entries {
        if name == ".git" {
            continue;
        }
        let path = d.join(&name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(pkg_dir, &path, &e))?;
        // Names as bytes: no two names may share an entry.
        let mut rel = prefix.to_vec();
        rel.extend_from_slice(name.as_bytes());
        let ft = meta.file_type();
        if ft.is_dir() {
            h.update(b"dir ");
            h.update(&rel);
            h.update(b"\0");
            rel.push(b'/');
            plain_tree(memo, h, pkg_dir, root, &path, &rel)?;
        } else if ft.is_file() || ft.is_symlink() {
            if ft.is_symlink() {
                check_symlink(pkg_dir, root, &path)?;
            }
            let sums = memo
                .sums(&path, &meta)
                .map_err(|e| io(pkg_dir, &path, &e))?;
            h.update(format!("{:o} ", git_mode(&meta)).as_bytes());
            h.update(&rel);
            h.update(b"\0");
            h.update(sums.sha256);
        }
    }
    Ok(())
}
