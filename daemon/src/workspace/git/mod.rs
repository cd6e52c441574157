//! What kiln needs to know about a git repository to tag packages as LinuxKit does,
//! read with a handful of `git` processes per repository (never per package) and
//! re-read only when HEAD, the refs or the index change on disk.
//!
//! HEAD's tree (every tree and blob id, from one `git ls-tree -r -t`), the index
//! (`git ls-files -s`) and the ignore rules (`.gitignore` per directory,
//! `info/exclude`, `core.excludesFile`) are enough to decide natively what
//! `git diff HEAD -- PKG` and `git ls-files --others --exclude-standard` would say.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod format;

pub use format::{IndexStat, blob_oid, dir_prefix, quote_path};
use format::{diff_keys, parse_index_stat, parse_record, split_debug};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// A git command failed or said something kiln cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("git {args} in {}: {message}", dir.display())]
pub struct GitError {
    pub dir: PathBuf,
    pub args: String,
    pub message: String,
}

/// Enough of a file's `lstat` to notice that it changed (git's own racy-free
/// heuristics use the same fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
            mode: m.mode(),
        }
    }

    pub fn lstat(p: &Path) -> Option<Stamp> {
        std::fs::symlink_metadata(p).ok().map(|m| Stamp::of(&m))
    }
}

/// An entry of HEAD's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Octal mode: 040000 tree, 100644/100755 file, 120000 symlink, 160000 gitlink.
    pub mode: u32,
    pub oid: String,
}

/// An index entry (all stages of a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub mode: u32,
    pub oid: String,
    /// How many stages the path has (more than one during a merge conflict);
    /// `git ls-files` prints the path once per stage.
    pub stages: usize,
}

pub const MODE_TREE: u32 = 0o040000;
pub const MODE_FILE: u32 = 0o100644;
pub const MODE_EXEC: u32 = 0o100755;
pub const MODE_LINK: u32 = 0o120000;
pub const MODE_GITLINK: u32 = 0o160000;

/// One repository (one work tree).
pub struct Repo {
    /// The top of the work tree (as git prints it).
    pub top: PathBuf,
    pub git_dir: PathBuf,
    common_dir: PathBuf,
    pub filemode: bool,
    /// `core.quotePath` (default on): how `git ls-files` prints names.
    pub quote_path: bool,
    /// Whether git may convert content between work tree and blob (a
    /// `.gitattributes` in HEAD, `info/attributes`, or `core.autocrlf`): then a
    /// content mismatch is confirmed with `git diff`.
    pub converts: bool,
    autocrlf: bool,
    watch: Vec<(PathBuf, Option<Stamp>)>,
    /// HEAD's commit, `None` while the branch is unborn.
    pub head: Option<String>,
    /// HEAD's Go module version as LinuxKit's `goPkgVersion` (git.go) makes it:
    /// `v0.0.0-<committer date, local time, yyyymmddhhmmss>-<12 hex of the commit>`.
    /// (Its branch for a semver tag on HEAD never runs: the `--match` pattern it passes
    /// to `git describe` keeps its shell quotes, so no tag matches.)
    pub go_pkg_version: Option<String>,
    pub root_tree: Option<String>,
    /// Repo-relative path (`/`-separated bytes) to entry, trees included.
    pub tree: BTreeMap<Vec<u8>, TreeEntry>,
    /// Repo-relative path to index entry, in index (byte) order.
    pub index: BTreeMap<Vec<u8>, IndexEntry>,
    /// The stat data git recorded per index entry (stage 0), and the index's mtime.
    index_stats: HashMap<Vec<u8>, IndexStat>,
    index_mtime_ns: i128,
    excludes: Gitignore,
    global: Gitignore,
    /// Per directory: the `.gitignore` stamp, its matcher, and the scan that checked it.
    dir_ignores: HashMap<PathBuf, (Option<Stamp>, Option<Gitignore>, u64)>,
    scan: u64,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("top", &self.top)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, GitError> {
    let err = |message: String| GitError {
        dir: dir.to_owned(),
        args: args.join(" "),
        message,
    };
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .map_err(|e| err(format!("cannot run git: {e}: install git")))
}

fn git_ok(dir: &Path, args: &[&str]) -> Result<Vec<u8>, GitError> {
    let out = git(dir, args)?;
    if !out.status.success() {
        return Err(GitError {
            dir: dir.to_owned(),
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The nearest ancestor of `dir` (or `dir`) that holds `.git`, without running git.
pub fn find_top(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| d.join(".git").symlink_metadata().is_ok())
        .map(Path::to_owned)
}

fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

impl Repo {
    /// Opens the repository whose work tree top is `top`.
    pub fn open(top: &Path) -> Result<Repo, GitError> {
        let out = git_ok(
            top,
            &[
                "rev-parse",
                "--path-format=absolute",
                "--show-toplevel",
                "--git-dir",
                "--git-common-dir",
            ],
        )?;
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().collect();
        let [t, g, c] = lines[..] else {
            return Err(GitError {
                dir: top.to_owned(),
                args: "rev-parse".into(),
                message: format!("unexpected output {text:?}"),
            });
        };
        let filemode = git(top, &["config", "--bool", "core.fileMode"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "false")
            .unwrap_or(true);
        let quote_path = git(top, &["config", "--bool", "core.quotePath"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "false")
            .unwrap_or(true);
        let autocrlf = git(top, &["config", "core.autocrlf"])
            .map(|o| {
                let v = String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .to_ascii_lowercase();
                !v.is_empty() && v != "false"
            })
            .unwrap_or(false);
        let top = PathBuf::from(t);
        let mut excludes = GitignoreBuilder::new(&top);
        // A missing info/exclude is normal.
        let _ = excludes.add(Path::new(g).join("info/exclude"));
        let excludes = excludes.build().unwrap_or_else(|_| Gitignore::empty());
        let (global, _) = GitignoreBuilder::new(&top).build_global();
        let mut repo = Repo {
            top,
            git_dir: PathBuf::from(g),
            common_dir: PathBuf::from(c),
            filemode,
            quote_path,
            converts: autocrlf,
            autocrlf,
            watch: Vec::new(),
            head: None,
            go_pkg_version: None,
            root_tree: None,
            tree: BTreeMap::new(),
            index: BTreeMap::new(),
            index_stats: HashMap::new(),
            index_mtime_ns: 0,
            excludes,
            global,
            dir_ignores: HashMap::new(),
            scan: 1,
        };
        repo.refresh()?;
        Ok(repo)
    }

    /// The files whose change means HEAD, the refs, the index or the repo-wide
    /// excludes may have changed. Git replaces them by rename, so the inode changes.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.git_dir.join("HEAD"),
            self.git_dir.join("index"),
            self.common_dir.join("packed-refs"),
            self.git_dir.join("info/exclude"),
        ];
        if let Ok(head) = std::fs::read_to_string(self.git_dir.join("HEAD")) {
            if let Some(r) = head.trim().strip_prefix("ref: ") {
                v.push(self.common_dir.join(r));
                v.push(self.git_dir.join(r));
            }
        }
        v
    }

    /// Re-reads HEAD and the index if their files changed. Returns the repo-relative
    /// paths whose HEAD or index entry changed (all of them on the first call), or
    /// `None` if nothing changed.
    pub fn refresh(&mut self) -> Result<Option<Vec<Vec<u8>>>, GitError> {
        let now: Vec<(PathBuf, Option<Stamp>)> = self
            .watched_files()
            .into_iter()
            .map(|p| {
                let s = Stamp::lstat(&p);
                (p, s)
            })
            .collect();
        if !self.watch.is_empty() && now == self.watch {
            return Ok(None);
        }
        let excludes_changed = self.watch.iter().find(|(p, _)| p.ends_with("info/exclude"))
            != now.iter().find(|(p, _)| p.ends_with("info/exclude"));
        self.watch = now;
        let mut changed = Vec::new();

        // HEAD: `rev-parse` fails while the branch is unborn.
        let out = git(&self.top, &["rev-parse", "-q", "--verify", "HEAD^{commit}"])?;
        let head = if out.status.success() {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            None
        };
        if head != self.head || self.root_tree.is_none() && head.is_some() {
            let mut tree = BTreeMap::new();
            let mut root_tree = None;
            let mut go_pkg_version = None;
            if head.is_some() {
                let out = git_ok(
                    &self.top,
                    &[
                        "--no-pager",
                        "show",
                        "--quiet",
                        "--abbrev=12",
                        "--date=format-local:%Y%m%d%H%M%S",
                        "--format=%cd-%h",
                        "HEAD",
                    ],
                )?;
                go_pkg_version = Some(format!("v0.0.0-{}", String::from_utf8_lossy(&out).trim()));
                let out = git_ok(&self.top, &["rev-parse", "HEAD^{tree}"])?;
                root_tree = Some(String::from_utf8_lossy(&out).trim().to_owned());
                let out = git_ok(
                    &self.top,
                    &["ls-tree", "-r", "-t", "-z", "--full-tree", "HEAD"],
                )?;
                for rec in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
                    let (mode, oid, path) = parse_record(rec, &self.top, "ls-tree")?;
                    tree.insert(path, TreeEntry { mode, oid });
                }
            }
            diff_keys(&self.tree, &tree, &mut changed);
            self.converts = self.autocrlf
                || self.git_dir.join("info/attributes").exists()
                || tree.keys().any(|k| k.ends_with(b".gitattributes"));
            self.tree = tree;
            self.root_tree = root_tree;
            self.head = head;
            self.go_pkg_version = go_pkg_version;
        }

        // With --debug each record is followed by five lines of stat data, which
        // let a file whose lstat matches skip being read (as git itself does).
        let out = git_ok(&self.top, &["ls-files", "-s", "-z", "--debug"])?;
        let mut index: BTreeMap<Vec<u8>, IndexEntry> = BTreeMap::new();
        let mut stats = HashMap::new();
        let mut prev: Option<Vec<u8>> = None;
        for chunk in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let (debug, rec) = split_debug(chunk, prev.is_some());
            if let (Some(p), Some(st)) = (prev.take(), debug.and_then(parse_index_stat)) {
                stats.insert(p, st);
            }
            if rec.is_empty() {
                continue;
            }
            // "<mode> <oid> <stage>\t<path>"
            let (mode, oid, path) = parse_record(rec, &self.top, "ls-files")?;
            prev = Some(path.clone());
            index
                .entry(path)
                .and_modify(|e| e.stages += 1)
                .or_insert(IndexEntry {
                    mode,
                    oid,
                    stages: 1,
                });
        }
        diff_keys(&self.index, &index, &mut changed);
        self.index = index;
        self.index_stats = stats;
        self.index_mtime_ns = Stamp::lstat(&self.git_dir.join("index")).map_or(0, |s| s.mtime_ns);
        if excludes_changed {
            let mut b = GitignoreBuilder::new(&self.top);
            let _ = b.add(self.git_dir.join("info/exclude"));
            self.excludes = b.build().unwrap_or_else(|_| Gitignore::empty());
            changed.push(Vec::new());
        }
        changed.sort();
        changed.dedup();
        Ok(Some(changed))
    }

    /// The blob id of a tracked work-tree file whose `lstat` matches what the index
    /// recorded, without reading it; `None` when git itself would have to look
    /// (no stat data, a different stat, or a "racily clean" entry no older than the
    /// index file).
    pub fn index_oid_if_unchanged(&self, rel: &[u8], meta: &std::fs::Metadata) -> Option<&str> {
        let st = self.index_stats.get(rel)?;
        let now = Stamp::of(meta);
        let same = st.size == now.size
            && st.mtime_ns == now.mtime_ns
            && st.ctime_ns == now.ctime_ns
            && st.ino == now.ino;
        if !same || st.mtime_ns >= self.index_mtime_ns {
            return None;
        }
        self.index.get(rel).map(|e| e.oid.as_str())
    }

    /// LinuxKit's tracked-change check (git.go `isDirty`):
    /// `git diff --no-ext-diff --exit-code --quiet HEAD -- DIR`.
    pub fn diff_quiet(&self, rel: &[u8]) -> Result<bool, GitError> {
        let dir = self.abs(rel);
        let spec = dir.to_string_lossy();
        let args = [
            "diff",
            "--no-ext-diff",
            "--exit-code",
            "--quiet",
            "HEAD",
            "--",
            &spec,
        ];
        let out = git(&self.top, &args)?;
        match out.status.code() {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            _ => Err(GitError {
                dir: self.top.clone(),
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
        }
    }

    /// The repo-relative path of `abs` (which must be inside the work tree).
    pub fn rel(&self, abs: &Path) -> Option<Vec<u8>> {
        let r = abs.strip_prefix(&self.top).ok()?;
        Some(r.as_os_str().as_bytes().to_vec())
    }

    pub fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.top.clone()
        } else {
            self.top.join(path_of(rel))
        }
    }

    /// LinuxKit's `treeHash` (git.go): the tree id of `rel` at HEAD; the commit's
    /// root tree for the top itself. `None` if HEAD has no tree there.
    pub fn tree_hash(&self, rel: &[u8]) -> Option<&str> {
        if rel.is_empty() {
            return self.root_tree.as_deref();
        }
        self.tree.get(rel).map(|e| e.oid.as_str())
    }

    /// Whether a path (repo-relative, below `dir`) is ignored, given that no parent
    /// directory is: the deepest `.gitignore` with a match decides, then
    /// `info/exclude`, then `core.excludesFile` (git's precedence).
    pub fn is_ignored(&mut self, abs: &Path, is_dir: bool) -> bool {
        let mut dir = abs.parent();
        while let Some(d) = dir {
            if !d.starts_with(&self.top) {
                break;
            }
            match self.dir_ignore(d).map(|g| g.matched(abs, is_dir)) {
                Some(Match::Ignore(_)) => return true,
                Some(Match::Whitelist(_)) => return false,
                _ => {}
            }
            dir = d.parent();
        }
        match self.excludes.matched(abs, is_dir) {
            Match::Ignore(_) => return true,
            Match::Whitelist(_) => return false,
            Match::None => {}
        }
        self.global.matched(abs, is_dir).is_ignore()
    }

    /// Whether `abs` or any directory between it and the top is ignored.
    pub fn is_ignored_or_parent(&mut self, abs: &Path, is_dir: bool) -> bool {
        let Ok(rel) = abs.strip_prefix(&self.top) else {
            return false;
        };
        let mut cur = self.top.clone();
        let n = rel.components().count();
        for (i, c) in rel.components().enumerate() {
            cur.push(c);
            let last = i + 1 == n;
            if self.is_ignored(&cur, if last { is_dir } else { true }) {
                return true;
            }
        }
        false
    }

    /// Starts a scan: each `.gitignore` is checked on disk at most once per scan.
    pub fn begin_scan(&mut self) {
        self.scan += 1;
    }

    /// The `.gitignore` matcher of directory `d`, cached by the file's stamp.
    fn dir_ignore(&mut self, d: &Path) -> Option<&Gitignore> {
        let scan = self.scan;
        let checked = matches!(self.dir_ignores.get(d), Some((_, _, s)) if *s == scan);
        if !checked {
            let file = d.join(".gitignore");
            let stamp = Stamp::lstat(&file);
            match self.dir_ignores.get_mut(d) {
                Some(e) if e.0 == stamp => e.2 = scan,
                _ => {
                    let gi = stamp.map(|_| {
                        let mut b = GitignoreBuilder::new(d);
                        let _ = b.add(&file);
                        b.build().unwrap_or_else(|_| Gitignore::empty())
                    });
                    self.dir_ignores.insert(d.to_owned(), (stamp, gi, scan));
                }
            }
        }
        self.dir_ignores.get(d).and_then(|(_, g, _)| g.as_ref())
    }

    /// HEAD's entries below `rel` (a directory), in path order.
    pub fn tree_under<'a>(
        &'a self,
        rel: &'a [u8],
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a TreeEntry)> + 'a {
        let start = dir_prefix(rel);
        self.tree
            .range(start.clone()..)
            .take_while(move |(k, _)| k.starts_with(&start))
    }

    /// Index entries below `rel` (a directory), in index order.
    pub fn index_under<'a>(
        &'a self,
        rel: &'a [u8],
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a IndexEntry)> + 'a {
        let start = dir_prefix(rel);
        self.index
            .range(start.clone()..)
            .take_while(move |(k, _)| k.starts_with(&start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_matches_git() {
        assert_eq!(quote_path(b"a b", true), b"a b");
        assert_eq!(quote_path("é".as_bytes(), true), br#""\303\251""#);
        assert_eq!(quote_path(b"a\tb\"c\\", true), br#""a\tb\"c\\""#);
        assert_eq!(quote_path(b"\x7f\x01", true), br#""\177\001""#);
        assert_eq!(quote_path("é".as_bytes(), false), "é".as_bytes());
        // `git -c core.quotePath=false ls-files` prints "q\"é" as `"q\"é"`.
        assert_eq!(
            quote_path("q\"é".as_bytes(), false),
            "\"q\\\"é\"".as_bytes()
        );
    }

    #[test]
    fn index_debug_records() {
        let out = b"100644 45b983be36b73c0788dc9cbcb76cbb80fc7bb057 0\tp/a\0  ctime: 1795341848:369572139\n  mtime: 1795341848:369572138\n  dev: 65024\tino: 10018852\n  uid: 0\tgid: 0\n  size: 3\tflags: 0\n100644 587be6b4c3f93f93c489c0111bba5596147a26cb 0\tp/\n\0  ctime: 1:2\n  mtime: 3:4\n  dev: 0\tino: 5\n  uid: 0\tgid: 0\n  size: 6\tflags: 0\n";
        let chunks: Vec<&[u8]> = out.split(|&b| b == 0).collect();
        let (d, rec) = split_debug(chunks[0], false);
        assert!(d.is_none() && rec.ends_with(b"\tp/a"));
        let (d, rec) = split_debug(chunks[1], true);
        let st = parse_index_stat(d.unwrap()).unwrap();
        assert_eq!(
            st,
            IndexStat {
                ctime_ns: 1_795_341_848_369_572_139,
                mtime_ns: 1_795_341_848_369_572_138,
                ino: 10018852,
                size: 3
            }
        );
        // A path with a newline survives.
        assert!(rec.ends_with(b"\tp/\n"));
        let (d, rec) = split_debug(chunks[2], true);
        assert_eq!(parse_index_stat(d.unwrap()).unwrap().size, 6);
        assert!(rec.is_empty());
        assert!(parse_index_stat(b"  ctime: x\n").is_none());
    }

    #[test]
    fn blob_ids_match_git() {
        // `printf 'hi\n' | git hash-object --stdin`
        assert_eq!(
            blob_oid(b"hi\n"),
            "45b983be36b73c0788dc9cbcb76cbb80fc7bb057"
        );
        assert_eq!(blob_oid(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
    }
}
