//! Package tags, as `linuxkit pkg show-tag` computes them (pkglib.go
//! `NewFromConfig`, git.go `treeHash`, `isDirty`, `contentHash`), with a memo so that
//! re-tagging after an edit reads only the files of the affected packages.
//!
//! In a git repository the hash is the package's tree id at HEAD; with extra sources,
//! `sha1(tree + tree(src1) + tree(src2) ...)` in hex. When the package differs from
//! HEAD (a tracked change or an untracked, non-ignored file) LinuxKit appends
//! `-dirty-` and 7 hex of a sha256 over the contents of `git ls-files` then
//! `git ls-files --others --exclude-standard`, run in the package directory.
//!
//! kiln's one deliberate difference: when an extra source differs from HEAD, LinuxKit
//! does not notice; kiln appends `-dirty-` and 7 hex of
//! `sha256(C(pkg) || for each source: "\n" dst "\n" C(src))`, C being LinuxKit's content
//! hash in hex. When every extra source is clean the tag is LinuxKit's.
//!
//! Outside git (or for a package that HEAD does not have yet), the hash is the first
//! 40 hex of a sha256 over the sorted paths, kinds, modes and contents of the package
//! and its extra sources: every distinct content has its own tag, a revert gives back
//! the earlier one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_shared::reference::{ImageRef, Tag};
use sha2::{Digest, Sha256};

mod walk;

use walk::{GitScan, Walk, io, linuxkit_content_hash, plain_tree, work_file};

use super::git::{
    GitError, MODE_EXEC, MODE_FILE, MODE_GITLINK, MODE_LINK, MODE_TREE, Repo, Stamp, blob_oid,
    find_top, quote_path,
};
use super::package::{Package, clean_abs};

/// Why a package has no tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("package {}: cannot read {}: {message}", dir.display(), path.display())]
    Io {
        dir: PathBuf,
        path: PathBuf,
        message: String,
    },
    #[error(
        "package {}: symlink {} points to {target:?}, outside {}: make it a relative link inside",
        dir.display(), link.display(), root.display()
    )]
    SymlinkEscape {
        dir: PathBuf,
        link: PathBuf,
        target: String,
        root: PathBuf,
    },
    #[error("package {}: {source}", dir.display())]
    Git { dir: PathBuf, source: GitError },
    #[error("package {} disappeared while it was tagged", dir.display())]
    Vanished { dir: PathBuf },
    #[error("package {}: tag template {template:?} gives {tag:?}, which is not a valid tag", dir.display())]
    BadTag {
        dir: PathBuf,
        template: String,
        tag: String,
    },
}

/// The sums of one file's content (or of a symlink's target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sums {
    /// git's blob id, hex-encoded into 40 bytes.
    oid: [u8; 40],
    sha256: [u8; 32],
}

/// Content sums keyed by path and `lstat` stamp: a file is read again only when its
/// size, mtime, ctime, inode or mode changed.
#[derive(Debug, Default)]
struct Memo {
    files: HashMap<PathBuf, (Stamp, Sums)>,
    /// Files read so far (for tests and benchmarks).
    reads: u64,
}

/// Files modified this recently are not memoised: a second write within the
/// file system's timestamp granularity would keep the stamp (git's "racy" case).
const RACY_NS: i128 = 2_000_000_000;

impl Memo {
    fn sums_of(content: &[u8]) -> std::io::Result<Sums> {
        let mut oid = [0u8; 40];
        oid.copy_from_slice(blob_oid(content).as_bytes());
        Ok(Sums {
            oid,
            sha256: Sha256::digest(content).into(),
        })
    }

    fn sums(&mut self, path: &Path, meta: &std::fs::Metadata) -> std::io::Result<Sums> {
        let stamp = Stamp::of(meta);
        if let Some((s, sums)) = self.files.get(path) {
            if *s == stamp {
                return Ok(*sums);
            }
        }
        self.reads += 1;
        let content = if meta.file_type().is_symlink() {
            std::fs::read_link(path)?.into_os_string().into_vec()
        } else {
            use std::io::Read;
            // Sized from the lstat already made; `take` avoids std's own fstat+lseek.
            let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
            std::fs::File::open(path)?
                .take(meta.len().saturating_add(1))
                .read_to_end(&mut buf)?;
            if buf.len() as u64 != meta.len() {
                // Changed while read: hash what is there now, remember nothing.
                self.files.remove(path);
                return Self::sums_of(&std::fs::read(path)?);
            }
            buf
        };
        let sums = Self::sums_of(&content)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now - stamp.mtime_ns > RACY_NS && now - stamp.ctime_ns > RACY_NS {
            self.files.insert(path.to_owned(), (stamp, sums));
        } else {
            self.files.remove(path);
        }
        Ok(sums)
    }
}

use std::os::unix::ffi::OsStringExt;

/// What LinuxKit's automatic build args and labels take from git for a package
/// (pkglib/build.go): whether it is in a work tree, HEAD's commit when the package is
/// clean at HEAD (`REVISION`, `org.opencontainers.image.revision`), and HEAD's Go
/// module version (`GOPKGVERSION`, set for any package in git).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitMeta {
    pub in_git: bool,
    pub clean_commit: Option<String>,
    pub go_pkg_version: Option<String>,
}

/// What [`Tagger::refresh`] found.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// The package directories whose hashes it forgot (their entries in HEAD or the
    /// index changed).
    pub forgotten: Vec<PathBuf>,
    /// A HEAD moved (every package's git metadata changed) or a repository could not be
    /// read: every package is to be tagged again.
    pub all: bool,
}

/// A cached result, with the inputs it depends on.
#[derive(Debug)]
struct Cached {
    sources: Vec<(PathBuf, String)>,
    hash: Result<String, TagError>,
    /// When its files started to be read: a change from then on may not be in it.
    read_at: std::time::Instant,
}

/// Computes and remembers package hashes. One per daemon; not shared across threads.
#[derive(Debug, Default)]
pub struct Tagger {
    repos: HashMap<PathBuf, Repo>,
    /// Directory to the top of its work tree (`None`: not in git).
    tops: HashMap<PathBuf, Option<PathBuf>>,
    memo: Memo,
    /// Hashes by package directory, and the packages that list each extra source.
    cache: BTreeMap<PathBuf, Cached>,
    by_source: BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    /// What repository changes forgot since the last [`Tagger::refresh`].
    refreshed: Refreshed,
}

impl Tagger {
    pub fn new() -> Tagger {
        Tagger::default()
    }

    /// How many files (or symlinks) the tagger has read to hash them.
    pub fn files_read(&self) -> u64 {
        self.memo.reads
    }

    /// The package's tag: its hash through the `tag` template.
    pub fn tag(&mut self, pkg: &Package) -> Result<Tag, TagError> {
        let hash = self.hash(pkg)?;
        render(pkg, &hash)
    }

    /// `org/image:tag`.
    pub fn image_ref(&mut self, pkg: &Package) -> Result<ImageRef, TagError> {
        Ok(ImageRef::new(pkg.repo.clone(), self.tag(pkg)?))
    }

    /// The value of `{{.Hash}}` for the package (cached until [`Tagger::invalidate`]
    /// names one of its paths, or the git repository's HEAD or index changes).
    pub fn hash(&mut self, pkg: &Package) -> Result<String, TagError> {
        let mut errors = HashMap::new();
        self.sync(&[pkg], &mut errors);
        self.hash_synced(pkg, &errors)
    }

    /// The package's [`GitMeta`], from the repository state its last [`Tagger::hash`]
    /// read. Clean means what gave a plain git hash: the package and its extra sources
    /// are in HEAD's tree and none differs from it (kiln's tag has no `-dirty-`).
    pub fn git_meta(&mut self, pkg: &Package) -> GitMeta {
        let Some(top) = self.top(&pkg.dir) else {
            return GitMeta::default();
        };
        let Some(repo) = self.repos.get(&top) else {
            return GitMeta {
                in_git: true,
                ..GitMeta::default()
            };
        };
        let (head, go_pkg_version) = (repo.head.clone(), repo.go_pkg_version.clone());
        let clean_hash = matches!(
            self.cache.get(&pkg.dir),
            Some(Cached { hash: Ok(h), sources, .. }) if !h.contains("-dirty-") && *sources == pkg.extra_sources
        );
        let dirs: Vec<PathBuf> = std::iter::once(&pkg.dir)
            .chain(pkg.extra_sources.iter().map(|(s, _)| s))
            .cloned()
            .collect();
        let in_head = dirs.iter().all(|d| {
            self.top(d).is_some_and(|t| {
                self.repos
                    .get(&t)
                    .and_then(|r| r.tree_hash(&r.rel(d)?).map(drop))
                    .is_some()
            })
        });
        GitMeta {
            in_git: true,
            clean_commit: head.filter(|_| clean_hash && in_head),
            go_pkg_version,
        }
    }

    /// The tags of many packages, each repository checked once (for a whole
    /// workspace, this is much cheaper than [`Tagger::tag`] one by one).
    pub fn tag_all(&mut self, pkgs: &[&Package]) -> Vec<Result<Tag, TagError>> {
        let mut errors = HashMap::new();
        self.sync(pkgs, &mut errors);
        pkgs.iter()
            .map(|p| {
                let hash = self.hash_synced(p, &errors)?;
                render(p, &hash)
            })
            .collect()
    }

    /// Brings the repositories of `pkgs` up to date, once each, and starts a scan.
    fn sync(&mut self, pkgs: &[&Package], errors: &mut HashMap<PathBuf, GitError>) {
        let mut seen = std::collections::HashSet::new();
        for pkg in pkgs {
            let dirs = std::iter::once(&pkg.dir).chain(pkg.extra_sources.iter().map(|(s, _)| s));
            let tops: Vec<PathBuf> = dirs.filter_map(|d| self.top(d)).collect();
            for top in tops {
                if !seen.insert(top.clone()) {
                    continue;
                }
                match self.sync_repo(&top) {
                    Ok(()) => {
                        if let Some(r) = self.repos.get_mut(&top) {
                            r.begin_scan();
                        }
                    }
                    Err(e) => {
                        errors.insert(top, e);
                    }
                }
            }
        }
    }

    fn hash_synced(
        &mut self,
        pkg: &Package,
        errors: &HashMap<PathBuf, GitError>,
    ) -> Result<String, TagError> {
        let dirs = std::iter::once(&pkg.dir).chain(pkg.extra_sources.iter().map(|(s, _)| s));
        for d in dirs {
            if let Some(e) = self
                .tops
                .get(d)
                .cloned()
                .flatten()
                .and_then(|t| errors.get(&t))
            {
                return Err(TagError::Git {
                    dir: pkg.dir.clone(),
                    source: e.clone(),
                });
            }
        }
        if let Some(c) = self.cache.get(&pkg.dir) {
            if c.sources == pkg.extra_sources {
                return c.hash.clone();
            }
        }
        let read_at = std::time::Instant::now();
        let hash = self.compute(pkg);
        self.forget_hash(&pkg.dir);
        for (src, _) in &pkg.extra_sources {
            let dirs = self.by_source.entry(src.clone()).or_default();
            dirs.insert(pkg.dir.clone());
        }
        self.cache.insert(
            pkg.dir.clone(),
            Cached {
                sources: pkg.extra_sources.clone(),
                hash: hash.clone(),
                read_at,
            },
        );
        hash
    }

    /// Drops the hash of the package in `dir`, and its extra sources from the index.
    fn forget_hash(&mut self, dir: &Path) -> bool {
        let Some(c) = self.cache.remove(dir) else {
            return false;
        };
        for (src, _) in &c.sources {
            if let Some(dirs) = self.by_source.get_mut(src) {
                dirs.remove(dir);
                if dirs.is_empty() {
                    self.by_source.remove(src);
                }
            }
        }
        true
    }

    /// When the files behind the package's remembered hash started to be read (the hash
    /// may be older than the plan that uses it): a change from then on may be missing
    /// from it.
    pub fn read_at(&self, pkg: &Package) -> Option<std::time::Instant> {
        self.cache.get(&pkg.dir).map(|c| c.read_at)
    }

    /// The top of the work tree holding `dir`, remembered.
    fn top(&mut self, dir: &Path) -> Option<PathBuf> {
        if let Some(t) = self.tops.get(dir) {
            return t.clone();
        }
        let t = find_top(dir);
        self.tops.insert(dir.to_owned(), t.clone());
        t
    }

    /// Forgets the hashes that `paths` (created, changed or removed files or
    /// directories) may change. Returns the package directories forgotten.
    pub fn invalidate(&mut self, paths: &[PathBuf]) -> Vec<PathBuf> {
        // A repository created or removed changes which work tree a directory is in.
        if paths
            .iter()
            .any(|p| p.file_name() == Some(OsStr::new(".git")))
        {
            self.tops.clear();
        }
        // Found by path, not by going over every hash: the package or extra source at
        // or above a path, and those below it (a directory removed or renamed) or below
        // a .gitignore's directory (it changes what is untracked).
        let mut hit: BTreeSet<PathBuf> = BTreeSet::new();
        for p in paths {
            for a in p.ancestors() {
                if self.cache.contains_key(a) {
                    hit.insert(a.to_owned());
                }
                hit.extend(self.by_source.get(a).into_iter().flatten().cloned());
            }
            let scope = if p.file_name() == Some(OsStr::new(".gitignore")) {
                p.parent()
            } else {
                Some(p.as_path())
            };
            let Some(scope) = scope else { continue };
            let from = (Bound::Included(scope), Bound::Unbounded);
            hit.extend(
                self.cache
                    .range::<Path, _>(from)
                    .map(|(d, _)| d)
                    .take_while(|d| under(d, scope))
                    .cloned(),
            );
            hit.extend(
                self.by_source
                    .range::<Path, _>(from)
                    .take_while(|(s, _)| under(s, scope))
                    .flat_map(|(_, dirs)| dirs.iter().cloned()),
            );
        }
        hit.into_iter().filter(|d| self.forget_hash(d)).collect()
    }

    /// Notices a commit, checkout or `git add` in every repository opened so far (a few
    /// `lstat`s each, git run only when something changed) and forgets the hashes it
    /// changes: what a plan that re-tags only the changed packages checks first.
    pub fn refresh(&mut self) -> Refreshed {
        let tops: Vec<PathBuf> = self.repos.keys().cloned().collect();
        for top in tops {
            let _ = self.sync_repo(&top);
        }
        let mut out = std::mem::take(&mut self.refreshed);
        out.forgotten.sort();
        out.forgotten.dedup();
        out
    }

    /// Opens the repository at `top` or notices that its HEAD or index changed, and
    /// forgets the hashes of the packages whose entries changed (kept for
    /// [`Tagger::refresh`] to return, whichever call noticed).
    fn sync_repo(&mut self, top: &Path) -> Result<(), GitError> {
        let changed = match self.repos.get_mut(top) {
            Some(r) => {
                let head = r.head.clone();
                let changed = r.refresh().inspect_err(|_| self.refreshed.all = true)?;
                self.refreshed.all |= r.head != head;
                changed
            }
            None => {
                let r = Repo::open(top)?;
                // `top` as found on disk may differ from git's spelling; key by both.
                let key = r.top.clone();
                self.repos.insert(top.to_owned(), r);
                if key != top {
                    tracing::debug!(top = %top.display(), git = %key.display(), "repository top differs");
                }
                None
            }
        };
        if let Some((changed, r)) = changed.zip(self.repos.get(top)) {
            let abs: Vec<PathBuf> = changed.iter().map(|p| r.abs(p)).collect();
            let gone = self.invalidate(&abs);
            self.refreshed.forgotten.extend(gone);
        }
        Ok(())
    }

    fn compute(&mut self, pkg: &Package) -> Result<String, TagError> {
        let dir = &pkg.dir;
        let Some(top) = self.top(dir) else {
            return self.plain_hash(pkg);
        };
        // Every tree (package and sources) must be at HEAD for a git hash.
        let mut trees = Vec::new();
        for d in std::iter::once(dir).chain(pkg.extra_sources.iter().map(|(s, _)| s)) {
            let tree = self.top(d).and_then(|t| {
                let r = self.repos.get(&t)?;
                let rel = r.rel(d)?;
                r.tree_hash(&rel).map(|h| (t.clone(), rel, h.to_owned()))
            });
            match tree {
                Some(t) => trees.push(t),
                None => return self.plain_hash(pkg),
            }
        }
        // pkglib.go NewFromConfig: hash = treeHash(pkg); with extra sources,
        // sha1(hash + treeHash(src1) + ...).
        let mut hash = trees[0].2.clone();
        if trees.len() > 1 {
            use sha1::{Digest as _, Sha1};
            let joined: String = trees.iter().map(|t| t.2.as_str()).collect();
            hash = hex::encode(Sha1::digest(joined.as_bytes()));
        }

        let pkg_scan = self.scan_git(&top, &trees[0].1, dir, dir)?;
        let mut src_scans = Vec::new();
        for ((src, dst), (t, rel, _)) in pkg.extra_sources.iter().zip(&trees[1..]) {
            let s = self.scan_git(t, rel, src, dir)?;
            src_scans.push((src, dst, s));
        }
        let sources_dirty = src_scans.iter().any(|(_, _, s)| s.dirty);
        if pkg_scan.dirty || sources_dirty {
            let c = linuxkit_content_hash(dir, dir, &pkg_scan)?;
            let mut suffix = hex::encode(c);
            if sources_dirty {
                // kiln's extension over the extra sources' contents.
                let mut h = Sha256::new();
                h.update(suffix.as_bytes());
                for (src, dst, s) in &src_scans {
                    h.update(b"\n");
                    h.update(dst.as_bytes());
                    h.update(b"\n");
                    h.update(hex::encode(linuxkit_content_hash(dir, src, s)?).as_bytes());
                }
                suffix = hex::encode(h.finalize());
            }
            hash.push_str("-dirty-");
            hash.push_str(&suffix[..7]);
        }
        Ok(hash)
    }

    /// What `git diff HEAD -- DIR` and `git ls-files [--others --exclude-standard]`
    /// in DIR would say, decided from the repo state and the work tree.
    fn scan_git(
        &mut self,
        top: &Path,
        rel: &[u8],
        dir: &Path,
        pkg_dir: &Path,
    ) -> Result<GitScan, TagError> {
        let Tagger { repos, memo, .. } = self;
        let Some(repo) = repos.get_mut(top) else {
            return Err(TagError::Vanished {
                dir: pkg_dir.to_owned(),
            });
        };
        let mut walk = Walk {
            repo,
            memo,
            pkg_dir,
            root: dir,
            rel_len: rel.len(),
            work: BTreeMap::new(),
            untracked: Vec::new(),
        };
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == ErrorKind::NotFound && dir == pkg_dir => {
                return Err(TagError::Vanished {
                    dir: pkg_dir.to_owned(),
                });
            }
            Err(e) => return Err(io(pkg_dir, dir, &e)),
            Ok(_) => {}
        }
        walk.dir(dir)?;
        let Walk {
            repo,
            memo,
            work,
            mut untracked,
            ..
        } = walk;

        let filemode = repo.filemode;
        let mut dirty = !untracked.is_empty();
        // Tracked at HEAD: deleted from the index, missing, or different in the work tree.
        if !dirty {
            for (p, e) in repo.tree_under(rel) {
                if e.mode == MODE_TREE || e.mode == MODE_GITLINK {
                    continue;
                }
                if !repo.index.contains_key(p) {
                    dirty = true;
                    break;
                }
                let w = match work.get(p) {
                    Some(w) => Some(*w),
                    // Not visited: in an ignored directory, or missing.
                    None => work_file(memo, &repo.abs(p), pkg_dir)?,
                };
                let Some(w) = w else {
                    dirty = true;
                    break;
                };
                let mode_ok =
                    w.mode == e.mode || (!filemode && w.mode != MODE_LINK && e.mode != MODE_LINK);
                if !mode_ok {
                    dirty = true;
                    break;
                }
                if w.oid[..] != *e.oid.as_bytes() {
                    if !repo.converts {
                        dirty = true;
                        break;
                    }
                    // Attributes or autocrlf: git compares the cleaned content,
                    // which only git knows. Ask it, once for this directory.
                    dirty = repo.diff_quiet(rel).map_err(|source| TagError::Git {
                        dir: pkg_dir.to_owned(),
                        source,
                    })?;
                    break;
                }
            }
        }
        // Added to the index but not in HEAD, and present.
        if !dirty {
            for (p, e) in repo.index_under(rel) {
                if e.mode != MODE_GITLINK
                    && !repo.tree.contains_key(p)
                    && (work.contains_key(p) || repo.abs(p).symlink_metadata().is_ok())
                {
                    dirty = true;
                    break;
                }
            }
        }
        let strip = if rel.is_empty() { 0 } else { rel.len() + 1 };
        let mut tracked = Vec::new();
        for (p, e) in repo.index_under(rel) {
            for _ in 0..e.stages {
                tracked.push(p[strip..].to_vec());
            }
        }
        untracked.sort();
        Ok(GitScan {
            dirty,
            tracked,
            untracked,
            quote_high: repo.quote_path,
        })
    }

    /// The hash outside git: paths, kinds, modes and contents, sorted.
    fn plain_hash(&mut self, pkg: &Package) -> Result<String, TagError> {
        let mut h = Sha256::new();
        plain_tree(&mut self.memo, &mut h, &pkg.dir, &pkg.dir, &pkg.dir, b"")?;
        for (src, dst) in &pkg.extra_sources {
            h.update(b"extra-source\0");
            h.update(dst.as_bytes());
            h.update(b"\0");
            plain_tree(&mut self.memo, &mut h, &pkg.dir, src, src, b"")?;
        }
        let mut hex = hex::encode(h.finalize());
        hex.truncate(40);
        Ok(hex)
    }
}

/// The tag for a hash, through the package's template.
fn render(pkg: &Package, hash: &str) -> Result<Tag, TagError> {
    let tag = pkg.spec.tag.render(hash);
    tag.parse().map_err(|_| TagError::BadTag {
        dir: pkg.dir.clone(),
        template: pkg.spec.tag.source().to_owned(),
        tag,
    })
}

/// Whether `p` is `dir` or below it (bytewise: `Path::starts_with` is slow).
fn under(p: &Path, dir: &Path) -> bool {
    let (p, d) = (p.as_os_str().as_bytes(), dir.as_os_str().as_bytes());
    let d = d.strip_suffix(b"/").unwrap_or(d);
    p.starts_with(d) && (p.len() == d.len() || p[d.len()] == b'/')
}
