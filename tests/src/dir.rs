//! A temporary workspace for one test: write package files, make it a git repository,
//! commit. Removed when the test ends, unless `KILN_TEST_KEEP=1` asks to keep it for a look.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::cmd::git;

/// A temporary directory; paths given to its methods are relative to it.
#[derive(Debug)]
pub struct Dir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl Dir {
    /// A new empty directory named `kiln-<name>-XXXXXX` under the system's temp dir.
    pub fn new(name: &str) -> Dir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temp dir for {name}: {e}"));
        // Canonical, so that paths compare equal to what kilnd and git report.
        let path = dir
            .path()
            .canonicalize()
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", dir.path().display()));
        Dir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's own name, unique to this run: a nonce for contents that no cache
    /// (the engine's build cache, kiln's) can have seen before.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Writes `contents` to `rel`, making parent directories.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        }
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// The contents of `rel` as UTF-8.
    pub fn read(&self, rel: impl AsRef<Path>) -> String {
        let path = self.join(rel);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// Makes `rel` and its parents.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let path = self.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
        path
    }

    /// Removes the file or directory tree `rel`.
    pub fn remove(&self, rel: impl AsRef<Path>) {
        let path = self.join(rel);
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    /// `git init` (branch main) in this directory.
    pub fn git_init(&self) {
        git().args(["init", "-q"]).dir(&self.path).run();
    }

    /// Stages everything and commits it (empty commits allowed); returns the commit id.
    pub fn git_commit_all(&self, message: &str) -> String {
        git().args(["add", "-A"]).dir(&self.path).run();
        git()
            .args(["commit", "-q", "--allow-empty", "-m", message])
            .dir(&self.path)
            .run();
        git().args(["rev-parse", "HEAD"]).dir(&self.path).stdout()
    }

    /// Runs `git ARGS` here; returns its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        git().args(args).dir(&self.path).stdout()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let keep = std::env::var_os("KILN_TEST_KEEP").is_some_and(|v| v != "0" && !v.is_empty());
        if let (true, Some(dir)) = (keep, self.dir.take()) {
            eprintln!("KILN_TEST_KEEP: keeping {}", dir.keep().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_mkdir_remove() {
        let d = Dir::new("dir-test");
        let p = d.write("pkg/a/build.yml", "image: a\n");
        assert_eq!(p, d.path().join("pkg/a/build.yml"));
        assert_eq!(d.read("pkg/a/build.yml"), "image: a\n");
        d.mkdir("empty/deeper");
        assert!(d.join("empty/deeper").is_dir());
        d.remove("pkg");
        assert!(!d.join("pkg").exists());
        d.remove("empty");
        assert!(!d.join("empty").exists());
    }

    #[test]
    fn removed_on_drop() {
        let d = Dir::new("dir-drop");
        let path = d.path().to_owned();
        assert!(path.is_dir());
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("kiln-dir-drop-")
        );
        drop(d);
        assert!(!path.exists());
    }

    #[test]
    fn git_commits_are_real_and_distinct() {
        let d = Dir::new("dir-git");
        d.git_init();
        d.write("pkg/build.yml", "image: pkg\n");
        let first = d.git_commit_all("first");
        d.write("pkg/Dockerfile", "FROM scratch\n");
        let second = d.git_commit_all("second");
        assert_eq!(first.len(), 40, "{first}");
        assert_ne!(first, second);
        assert_eq!(d.git(&["rev-parse", "HEAD~1"]), first);
        assert_eq!(d.git(&["status", "--porcelain"]), "");
        assert_eq!(
            d.git(&["show", "--format=", "--name-only", "HEAD"]),
            "pkg/Dockerfile"
        );
    }
}
