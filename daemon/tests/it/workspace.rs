//! Tags in git repositories made by the tests, each compared with LinuxKit's algorithm
//! replayed step by step with plain `git` commands, sha1 and sha256 (pkglib.go
//! `NewFromConfig`, git.go `treeHash`, `isDirty`, `contentHash`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_daemon::workspace::{GitMeta, Package, TagError, Tagger, Workspace, show_tag, show_tags};
use sha1::Digest as _;

struct Repo {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

fn git_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_in(dir, args);
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Repo {
    fn new() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        git(&root, &["init", "-q", "-b", "main"]);
        Repo { _tmp: tmp, root }
    }

    fn plain() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        Repo { _tmp: tmp, root }
    }

    fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        p
    }

    fn package(&self, rel: &str, yml: &str) -> PathBuf {
        self.write(&format!("{rel}/build.yml"), yml);
        self.write(&format!("{rel}/Dockerfile"), "FROM scratch\nCOPY . /\n");
        self.write(&format!("{rel}/src/main.c"), "int main() { return 0; }\n");
        if rel == "." {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn commit(&self) {
        git(&self.root, &["add", "-A"]);
        git(&self.root, &["commit", "-q", "-m", "c", "--allow-empty"]);
    }

    fn load(&self, dir: &Path) -> Package {
        Package::load(dir, &self.root).unwrap()
    }
}

/// LinuxKit's `treeHash`: `git rev-parse --show-toplevel` equal to the package means
/// the commit's tree, else `git ls-tree --full-tree HEAD -- PKG`.
fn lk_tree_hash(path: &Path) -> String {
    let top = git(
        path,
        &[
            "rev-parse",
            "--prefix",
            path.to_str().unwrap(),
            "--show-toplevel",
        ],
    );
    if Path::new(top.trim()) == path {
        return git(path, &["show", "--format=%T", "-s", "HEAD"])
            .trim()
            .to_owned();
    }
    let out = git(
        path,
        &[
            "ls-tree",
            "--full-tree",
            "HEAD",
            "--",
            path.to_str().unwrap(),
        ],
    );
    // "040000 tree <sha>\t<path>\n"
    out.split_whitespace().nth(2).unwrap().to_owned()
}

/// LinuxKit's `isDirty`: `git diff --no-ext-diff --exit-code --quiet HEAD -- PKG`, then
/// `git ls-files --exclude-standard --others --error-unmatch -- PKG`.
fn lk_is_dirty(path: &Path) -> bool {
    let p = path.to_str().unwrap();
    let diff = git_in(
        path,
        &[
            "diff",
            "--no-ext-diff",
            "--exit-code",
            "--quiet",
            "HEAD",
            "--",
            p,
        ],
    );
    if !diff.status.success() {
        return true;
    }
    git_in(
        path,
        &[
            "ls-files",
            "--exclude-standard",
            "--others",
            "--error-unmatch",
            "--",
            p,
        ],
    )
    .status
    .success()
}

/// LinuxKit's `contentHash`, line by line.
fn lk_content_hash(path: &Path) -> String {
    let tracked = git(path, &["ls-files"]);
    let untracked = git(path, &["ls-files", "--exclude-standard", "--others"]);
    let all = [tracked, untracked].join("\n");
    let mut h = sha2::Sha256::new();
    for line in all.trim().lines() {
        let f = if line.is_empty() {
            path.to_owned()
        } else {
            path.join(line)
        };
        let Ok(m) = fs::symlink_metadata(&f) else {
            continue;
        };
        if m.is_dir() || m.file_type().is_symlink() {
            continue;
        }
        h.update(fs::read(&f).unwrap());
    }
    hex::encode(h.finalize())
}

/// LinuxKit's hash of a package with the given extra source directories.
fn lk_hash(pkg: &Path, sources: &[&Path]) -> String {
    let mut hash = lk_tree_hash(pkg);
    if !sources.is_empty() {
        let joined: String = std::iter::once(hash.clone())
            .chain(sources.iter().map(|s| lk_tree_hash(s)))
            .collect();
        hash = hex::encode(sha1::Sha1::digest(joined.as_bytes()));
    }
    if lk_is_dirty(pkg) {
        hash = format!("{hash}-dirty-{}", &lk_content_hash(pkg)[..7]);
    }
    hash
}

/// LinuxKit's `goPkgVersion` (git.go), replayed as it runs: the `--match` pattern keeps
/// its quotes (exec, no shell), and `rev-list --count` output keeps its newline.
fn lk_go_pkg_version(path: &Path) -> String {
    let out = git_in(
        path,
        &[
            "--no-pager",
            "describe",
            "--match='v[0-9].[0-9].[0-9]*'",
            "--abbrev=0",
            "--tags",
        ],
    );
    let mut last = if out.status.success() {
        String::from_utf8(out.stdout).unwrap()
    } else {
        String::new()
    };
    if last.is_empty() {
        last = "v0.0.0".into();
    }
    let list = if last == "v0.0.0" {
        "HEAD".to_owned()
    } else {
        format!("{last}..HEAD")
    };
    let count = git(path, &["rev-list", &list, "--count"]);
    let version = if count == "0" {
        last
    } else {
        let date = git(
            path,
            &[
                "--no-pager",
                "show",
                "--quiet",
                "--abbrev=12",
                "--date=format-local:%Y%m%d%H%M%S",
                "--format=%cd-%h",
            ],
        );
        format!("{last}-{date}")
    };
    version.trim().to_owned()
}

/// What LinuxKit's build takes from git: the commit when clean, the Go version always.
fn lk_git_meta(path: &Path) -> GitMeta {
    GitMeta {
        in_git: true,
        clean_commit: (!lk_is_dirty(path))
            .then(|| git(path, &["rev-parse", "HEAD"]).trim().to_owned()),
        go_pkg_version: Some(lk_go_pkg_version(path)),
    }
}

fn tag(t: &mut Tagger, r: &Repo, dir: &Path) -> String {
    let pkg = r.load(dir);
    t.invalidate(&[dir.to_owned()]);
    t.tag(&pkg).unwrap().to_string()
}

/// Tags with a fresh tagger and with a long-lived one, which must agree.
fn both(t: &mut Tagger, r: &Repo, dir: &Path) -> String {
    let a = tag(t, r, dir);
    let b = Tagger::new().tag(&r.load(dir)).unwrap().to_string();
    assert_eq!(a, b, "memoised and fresh tags differ");
    a
}

#[test]
fn clean_modified_touched_untracked_ignored() {
    let r = Repo::new();
    let p = r.package("pkg/a", "image: a\n");
    r.package("pkg/b", "image: b\n");
    r.write(".gitignore", "*.o\n/pkg/a/build-out/\n");
    r.commit();
    let mut t = Tagger::new();

    let clean = both(&mut t, &r, &p);
    assert_eq!(clean, lk_hash(&p, &[]));
    assert_eq!(clean, git(&r.root, &["rev-parse", "HEAD:pkg/a"]).trim());

    // Same bytes, new mtime: not dirty (git compares content).
    fs::write(p.join("src/main.c"), "int main() { return 0; }\n").unwrap();
    assert_eq!(both(&mut t, &r, &p), clean);

    // Ignored files do not count, even in an ignored directory.
    r.write("pkg/a/x.o", "obj");
    r.write("pkg/a/build-out/y", "out");
    assert_eq!(both(&mut t, &r, &p), clean);

    // A tracked change.
    r.write("pkg/a/src/main.c", "int main() { return 1; }\n");
    let modified = both(&mut t, &r, &p);
    assert!(
        modified.starts_with(&format!("{clean}-dirty-")),
        "{modified}"
    );
    assert_eq!(modified, lk_hash(&p, &[]));

    // An untracked file on top.
    r.write("pkg/a/src/new.h", "#define X 1\n");
    let untracked = both(&mut t, &r, &p);
    assert_ne!(untracked, modified);
    assert_eq!(untracked, lk_hash(&p, &[]));

    // Revert both: the clean tag again.
    fs::remove_file(p.join("src/new.h")).unwrap();
    r.write("pkg/a/src/main.c", "int main() { return 0; }\n");
    assert_eq!(both(&mut t, &r, &p), clean);

    // Only an untracked file.
    r.write("pkg/a/notes.txt", "n\n");
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]));
    assert_ne!(both(&mut t, &r, &p), clean);
}

#[test]
fn staged_deleted_mode_symlink_and_negated_ignores() {
    let r = Repo::new();
    let p = r.package("a", "image: a\n");
    r.write("a/.gitignore", "*.log\n!keep.log\n");
    r.write("a/z.txt", "z\n");
    std::os::unix::fs::symlink("src/main.c", p.join("link")).unwrap();
    r.commit();
    let mut t = Tagger::new();
    let clean = both(&mut t, &r, &p);
    assert_eq!(clean, lk_hash(&p, &[]));

    r.write("a/debug.log", "x");
    assert_eq!(both(&mut t, &r, &p), clean, "ignored *.log");
    r.write("a/keep.log", "x");
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]), "negated pattern");
    assert_ne!(both(&mut t, &r, &p), clean);
    fs::remove_file(p.join("keep.log")).unwrap();

    // Staged new file: tracked order (in the index), not untracked order.
    r.write("a/b.txt", "b\n");
    git(&r.root, &["add", "a/b.txt"]);
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]));
    git(&r.root, &["rm", "-q", "--cached", "a/b.txt"]);
    fs::remove_file(p.join("b.txt")).unwrap();
    assert_eq!(both(&mut t, &r, &p), clean);

    // Deleted tracked file.
    fs::remove_file(p.join("z.txt")).unwrap();
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]));
    r.write("a/z.txt", "z\n");
    assert_eq!(both(&mut t, &r, &p), clean);

    // Mode change only.
    fs::set_permissions(p.join("z.txt"), fs::Permissions::from_mode(0o755)).unwrap();
    let m = both(&mut t, &r, &p);
    assert_eq!(m, lk_hash(&p, &[]));
    assert_ne!(m, clean);
    fs::set_permissions(p.join("z.txt"), fs::Permissions::from_mode(0o644)).unwrap();

    // Symlink retargeted (inside the package).
    fs::remove_file(p.join("link")).unwrap();
    std::os::unix::fs::symlink("Dockerfile", p.join("link")).unwrap();
    let l = both(&mut t, &r, &p);
    assert_eq!(l, lk_hash(&p, &[]));
    assert_ne!(l, clean);

    // Removed from the index but still on disk.
    fs::remove_file(p.join("link")).unwrap();
    std::os::unix::fs::symlink("src/main.c", p.join("link")).unwrap();
    assert_eq!(both(&mut t, &r, &p), clean);
    git(&r.root, &["rm", "-q", "--cached", "a/z.txt"]);
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]));
    assert_ne!(both(&mut t, &r, &p), clean);
}

#[test]
fn quoted_names_nested_repos_and_package_at_top() {
    let r = Repo::new();
    let p = r.package(".", "image: top\n");
    r.write("données/é.txt", "1\n");
    r.commit();
    let mut t = Tagger::new();
    let clean = both(&mut t, &r, &p);
    assert_eq!(clean, lk_hash(&p, &[]));
    assert_eq!(clean, git(&r.root, &["rev-parse", "HEAD^{tree}"]).trim());

    // LinuxKit reads `git ls-files` unquoted: the quoted name fails lstat and is
    // skipped; kiln matches it.
    r.write("données/é.txt", "2\n");
    assert_eq!(both(&mut t, &r, &p), lk_hash(&p, &[]));
    // With core.quotePath off, LinuxKit does read it.
    git(&r.root, &["config", "core.quotePath", "false"]);
    let unquoted = Tagger::new().tag(&r.load(&p)).unwrap().to_string();
    assert_eq!(unquoted, lk_hash(&p, &[]));
    r.write("données/é.txt", "3\n");
    let unquoted3 = Tagger::new().tag(&r.load(&p)).unwrap().to_string();
    assert_eq!(unquoted3, lk_hash(&p, &[]));
    assert_ne!(unquoted3, unquoted);
    git(&r.root, &["config", "core.quotePath", "true"]);
    r.write("données/é.txt", "1\n");

    // An untracked nested repository makes the package dirty.
    let nested = r.root.join("vendor/lib");
    fs::create_dir_all(&nested).unwrap();
    git(&nested, &["init", "-q"]);
    r.write("vendor/lib/f", "f\n");
    let n = both(&mut t, &r, &p);
    assert_eq!(n, lk_hash(&p, &[]));
    assert_ne!(n, clean);
}

#[test]
fn extra_sources() {
    let r = Repo::new();
    let p = r.package(
        "pkg/a",
        "image: a\nextra-sources:\n  - ../../lib:/lib\n  - ../../tools:/opt/tools\n",
    );
    r.write("lib/x.c", "x\n");
    r.write("tools/t.sh", "t\n");
    r.commit();
    let lib = r.root.join("lib");
    let tools = r.root.join("tools");
    let mut t = Tagger::new();

    let clean = both(&mut t, &r, &p);
    assert_eq!(clean, lk_hash(&p, &[&lib, &tools]));
    assert_eq!(clean.len(), 40);

    // Package dirty, sources clean: LinuxKit's tag.
    r.write("pkg/a/src/main.c", "changed\n");
    let pd = both(&mut t, &r, &p);
    assert_eq!(pd, lk_hash(&p, &[&lib, &tools]));

    // A source dirty too: LinuxKit keeps its tag; kiln must not.
    let lk_before = lk_hash(&p, &[&lib, &tools]);
    r.write("lib/x.c", "y\n");
    assert_eq!(
        lk_hash(&p, &[&lib, &tools]),
        lk_before,
        "LinuxKit misses it"
    );
    let both_dirty = both(&mut t, &r, &p);
    assert_ne!(both_dirty, pd);
    // kiln's suffix: sha256(C(pkg) || "\n" dst "\n" C(src) ...).
    let mut h = sha2::Sha256::new();
    h.update(lk_content_hash(&p).as_bytes());
    for (src, dst) in [(&lib, "/lib"), (&tools, "/opt/tools")] {
        h.update(format!("\n{dst}\n{}", lk_content_hash(src)).as_bytes());
    }
    let base = lk_before.split("-dirty-").next().unwrap().to_owned();
    assert_eq!(
        both_dirty,
        format!("{base}-dirty-{}", &hex::encode(h.finalize())[..7])
    );

    // Package clean, source dirty: a dirty tag where LinuxKit gives the clean one.
    r.write("pkg/a/src/main.c", "int main() { return 0; }\n");
    let sd = both(&mut t, &r, &p);
    assert_eq!(lk_hash(&p, &[&lib, &tools]), clean);
    assert!(sd.starts_with(&format!("{clean}-dirty-")), "{sd}");
    // Different source contents, different tags; a revert gives back the clean tag.
    r.write("lib/x.c", "z\n");
    assert_ne!(both(&mut t, &r, &p), sd);
    r.write("lib/x.c", "x\n");
    assert_eq!(both(&mut t, &r, &p), clean);

    // A source removed after the package was loaded: an error naming it.
    let pkg = r.load(&p);
    fs::remove_dir_all(&tools).unwrap();
    assert_eq!(t.invalidate(std::slice::from_ref(&tools)), vec![p.clone()]);
    match t.tag(&pkg) {
        Err(TagError::Io { path, .. }) => assert_eq!(path, tools),
        other => panic!("{other:?}"),
    }
}

#[test]
fn head_moves_and_only_the_edited_package_is_read() {
    let r = Repo::new();
    let dirs: Vec<PathBuf> = (0..5)
        .map(|i| r.package(&format!("p{i}"), &format!("image: p{i}\n")))
        .collect();
    r.commit();
    let ws = Workspace::discover(std::slice::from_ref(&r.root));
    assert_eq!(ws.packages.len(), 5);
    let pkgs: Vec<Package> = ws.packages.values().map(|p| p.clone().unwrap()).collect();
    let mut t = Tagger::new();
    let before: Vec<String> = pkgs.iter().map(|p| t.tag(p).unwrap().to_string()).collect();

    // Edit one file: only that package is forgotten and re-read.
    let f = r.write("p2/src/main.c", "edited\n");
    assert_eq!(t.invalidate(&[f]), vec![dirs[2].clone()]);
    let reads = t.files_read();
    let after: Vec<String> = pkgs.iter().map(|p| t.tag(p).unwrap().to_string()).collect();
    assert!(
        t.files_read() - reads <= 4,
        "read {} files",
        t.files_read() - reads
    );
    for i in 0..5 {
        assert_eq!(after[i] == before[i], i != 2, "package {i}");
    }
    assert_eq!(after[2], lk_hash(&dirs[2], &[]));

    // A commit moves HEAD: noticed without being told about any path.
    r.commit();
    let committed = t.tag(&pkgs[2]).unwrap().to_string();
    assert_eq!(committed, lk_hash(&dirs[2], &[]));
    assert!(!committed.contains("dirty"));
    assert_ne!(committed, before[2]);
    // Checkout back: the first tag again.
    git(&r.root, &["checkout", "-q", "HEAD~1"]);
    t.invalidate(&[dirs[2].join("src/main.c")]);
    assert_eq!(t.tag(&pkgs[2]).unwrap().to_string(), before[2]);
    assert_eq!(t.tag(&pkgs[0]).unwrap().to_string(), before[0]);
}

#[test]
fn outside_git() {
    let r = Repo::plain();
    let p = r.package("a", "image: a\norg: me\n");
    let mut t = Tagger::new();
    let first = both(&mut t, &r, &p);
    assert_eq!(first.len(), 40);
    r.write("a/src/main.c", "other\n");
    let second = both(&mut t, &r, &p);
    assert_ne!(first, second);
    // Path, not only content.
    fs::rename(p.join("src/main.c"), p.join("src/main2.c")).unwrap();
    let renamed = both(&mut t, &r, &p);
    assert_ne!(renamed, second);
    fs::rename(p.join("src/main2.c"), p.join("src/main.c")).unwrap();
    // Mode.
    fs::set_permissions(p.join("src/main.c"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_ne!(both(&mut t, &r, &p), second);
    fs::set_permissions(p.join("src/main.c"), fs::Permissions::from_mode(0o644)).unwrap();
    // Revert.
    r.write("a/src/main.c", "int main() { return 0; }\n");
    assert_eq!(both(&mut t, &r, &p), first);
    assert_eq!(show_tag(&p).unwrap().to_string(), format!("me/a:{first}"));
    let many = show_tags(&[p.clone(), r.root.clone()]);
    assert_eq!(
        many[0].as_ref().unwrap().to_string(),
        format!("me/a:{first}")
    );
    let e = many[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("no build.yml here"), "{e}");
}

#[test]
fn show_tag_templates_and_bad_packages() {
    let r = Repo::new();
    let p = r.package("a", "image: a\ntag: 'v1-{{.Hash}}'\n");
    let bad = r.package("bad", "image: b\nnope: 1\n");
    let esc = r.package("esc", "image: e\n");
    std::os::unix::fs::symlink("../../etc/passwd", esc.join("pw")).unwrap();
    let df = r.package("df", "image: d\ndockerfile: ../a/Dockerfile\n");
    let xs = r.package("xs", "image: x\nextra-sources: ['/etc:/etc']\n");
    r.write("ignored/build.yml", "image: i\n");
    r.write(".gitignore", "ignored/\n");
    r.commit();

    let tree = git(&r.root, &["rev-parse", "HEAD:a"]);
    assert_eq!(
        show_tag(&p).unwrap().to_string(),
        format!("linuxkit/a:v1-{}", tree.trim())
    );

    let ws = Workspace::discover(std::slice::from_ref(&r.root));
    let keys: Vec<_> = ws.packages.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![p.clone(), bad.clone(), df.clone(), esc.clone(), xs.clone()]
    );
    let e = ws.packages[&bad].as_ref().unwrap_err().to_string();
    assert!(e.contains("bad/build.yml:2:1: unknown field `nope`"), "{e}");
    let e = ws.packages[&df].as_ref().unwrap_err().to_string();
    assert!(e.contains("leaves the package"), "{e}");
    let e = ws.packages[&xs].as_ref().unwrap_err().to_string();
    assert!(e.contains("leaves the workspace root"), "{e}");

    let esc_pkg = ws.packages[&esc].as_ref().unwrap();
    let mut t = Tagger::new();
    match t.tag(esc_pkg) {
        Err(TagError::SymlinkEscape { link, .. }) => assert_eq!(link, esc.join("pw")),
        other => panic!("{other:?}"),
    }
    // The others go on.
    assert!(t.tag(ws.packages[&p].as_ref().unwrap()).is_ok());

    // Deleted during a scan.
    let a = ws.packages[&p].as_ref().unwrap().clone();
    fs::remove_dir_all(&p).unwrap();
    t.invalidate(std::slice::from_ref(&p));
    assert!(
        matches!(t.tag(&a), Err(TagError::Vanished { .. })),
        "{:?}",
        t.tag(&a)
    );
}

#[test]
fn workspace_reload() {
    let r = Repo::new();
    let a = r.package("a", "image: a\n");
    let mut ws = Workspace::discover(std::slice::from_ref(&r.root));
    assert_eq!(ws.packages.len(), 1);
    let b = r.package("sub/b", "image: b\n");
    assert_eq!(ws.reload(&[r.root.join("sub")]), vec![b.clone()]);
    r.write("a/build.yml", "image: [\n");
    assert_eq!(ws.reload(&[a.join("build.yml")]), vec![a.clone()]);
    assert!(ws.packages[&a].is_err());
    fs::remove_dir_all(r.root.join("sub")).unwrap();
    assert_eq!(ws.reload(&[r.root.join("sub")]), vec![b]);
    assert_eq!(ws.packages.len(), 1);

    // The Dockerfile goes and comes back.
    r.write("a/build.yml", "image: a\n");
    ws.reload(&[a.join("build.yml")]);
    assert!(ws.packages[&a].is_ok());
    fs::remove_file(a.join("Dockerfile")).unwrap();
    assert_eq!(ws.reload(&[a.join("Dockerfile")]), vec![a.clone()]);
    // Still a package (it has a tag, as linuxkit's show-tag says), that cannot build.
    let pkg = ws.packages[&a].as_ref().unwrap();
    let e = pkg.missing_dockerfile().unwrap().to_string();
    assert!(e.contains("does not exist: create it"), "{e}");
    r.write("a/Dockerfile", "FROM scratch\n");
    assert_eq!(ws.reload(&[a.join("Dockerfile")]), vec![a.clone()]);
    assert!(ws.packages[&a].is_ok());
}

#[test]
fn uncommitted_package_and_tag_all() {
    let r = Repo::new();
    let a = r.package("a", "image: a\n");
    r.commit();
    // LinuxKit refuses a package that HEAD does not have; kiln hashes its content.
    let b = r.package("b", "image: b\n");
    let pa = r.load(&a);
    let pb = r.load(&b);
    let mut t = Tagger::new();
    let tags = t.tag_all(&[&pa, &pb]);
    assert_eq!(tags[0].as_ref().unwrap().as_str(), lk_hash(&a, &[]));
    let first_b = tags[1].as_ref().unwrap().to_string();
    assert_eq!(first_b.len(), 40);
    r.write("b/src/main.c", "changed\n");
    t.invalidate(&[b.join("src/main.c")]);
    let second_b = t.tag(&pb).unwrap().to_string();
    assert_ne!(first_b, second_b);
    // Committed, it gets LinuxKit's tag.
    r.commit();
    assert_eq!(t.tag(&pb).unwrap().as_str(), lk_hash(&b, &[]));

    fn send<T: Send>(_: &T) {}
    send(&t);
}

#[test]
fn git_metadata_for_build_args_and_labels() {
    let r = Repo::new();
    let a = r.package("a", "image: a\n");
    r.commit();
    let pa = r.load(&a);
    let mut t = Tagger::new();
    t.tag(&pa).unwrap();
    let clean = t.git_meta(&pa);
    assert_eq!(clean, lk_git_meta(&a));
    assert!(clean.clean_commit.is_some());
    // A semver tag on HEAD: LinuxKit's pattern never matches it, the pseudo-version stays.
    git(&r.root, &["tag", "v1.2.3"]);
    assert_eq!(lk_go_pkg_version(&a), clean.go_pkg_version.clone().unwrap());
    // Dirty: no revision, the same Go version.
    r.write("a/src/main.c", "changed\n");
    t.invalidate(&[a.join("src/main.c")]);
    t.tag(&pa).unwrap();
    let dirty = t.git_meta(&pa);
    assert_eq!(dirty, lk_git_meta(&a));
    assert_eq!(dirty.clean_commit, None);
    assert_eq!(dirty.go_pkg_version, clean.go_pkg_version);
    // A new commit moves both.
    r.commit();
    t.tag(&pa).unwrap();
    let moved = t.git_meta(&pa);
    assert_eq!(moved, lk_git_meta(&a));
    assert_ne!(moved.clean_commit, clean.clean_commit);
    assert_ne!(moved.go_pkg_version, clean.go_pkg_version);
    // A package HEAD does not have yet is not clean.
    let b = r.package("b", "image: b\n");
    let pb = r.load(&b);
    t.tag(&pb).unwrap();
    assert_eq!(t.git_meta(&pb).clean_commit, None);
    // Outside git: nothing.
    let plain = Repo::plain();
    let c = plain.package("c", "image: c\n");
    let pc = plain.load(&c);
    t.tag(&pc).unwrap();
    assert_eq!(t.git_meta(&pc), GitMeta::default());
}

#[test]
fn attributes_that_convert_content() {
    let r = Repo::new();
    let p = r.package("a", "image: a\n");
    r.write(".gitattributes", "*.txt text\n");
    r.write("a/crlf.txt", "one\r\ntwo\r\n");
    r.commit();
    // The blob has LF, the work tree CRLF: git says clean, and so must kiln.
    let mut t = Tagger::new();
    let clean = both(&mut t, &r, &p);
    assert_eq!(clean, lk_hash(&p, &[]));
    assert!(!clean.contains("dirty"));
    r.write("a/crlf.txt", "one\r\nthree\r\n");
    let d = both(&mut t, &r, &p);
    assert_eq!(d, lk_hash(&p, &[]));
    assert!(d.contains("-dirty-"));
}

#[test]
fn index_stat_data_spares_reads_but_not_changes() {
    let r = Repo::new();
    let p = r.package("a", "image: a\n");
    r.commit();
    // Age the files past the racy window, and let git record their stat data.
    let old = std::process::Command::new("touch")
        .args(["-d", "-1 minute"])
        .args(["a/build.yml", "a/Dockerfile", "a/src/main.c"])
        .current_dir(&r.root)
        .status()
        .unwrap();
    assert!(old.success());
    git(&r.root, &["update-index", "-q", "--refresh"]);
    let mut t = Tagger::new();
    let clean = t.tag(&r.load(&p)).unwrap().to_string();
    assert_eq!(clean, lk_hash(&p, &[]));
    assert_eq!(
        t.files_read(),
        0,
        "clean files matching the index are not read"
    );

    // Same size, mtime set back: the ctime still tells.
    r.write("a/src/main.c", "int main() { return 7; }\n");
    let back = std::process::Command::new("touch")
        .args(["-d", "-1 minute", "a/src/main.c"])
        .current_dir(&r.root)
        .status()
        .unwrap();
    assert!(back.success());
    t.invalidate(&[p.join("src/main.c")]);
    let d = t.tag(&r.load(&p)).unwrap().to_string();
    // Not compared with `git diff`: a git built without nanosecond stat compares
    // ctime in whole seconds and may miss this change within the same second.
    assert_eq!(d, format!("{clean}-dirty-{}", &lk_content_hash(&p)[..7]));
}

/// A file rewritten in place with the same bytes, over and over, while the tagger tags:
/// a tag taken mid-write may say dirty (the file was empty or half written then), but
/// once the writes stop and the file is named again, the tag is the clean one: no
/// verdict read from a half-written file is kept.
#[test]
fn same_bytes_rewritten_in_place_while_tagging_ends_clean() {
    let r = Repo::new();
    let p = r.package("a", "image: a\n");
    let file = r.write("a/f.txt", &"the same bytes\n".repeat(200));
    r.commit();
    let mut t = Tagger::new();
    let clean = t.tag(&r.load(&p)).unwrap().to_string();
    assert!(!clean.contains("-dirty-"), "{clean}");
    let pkg = r.load(&p);
    for round in 0..3 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (file, stop) = (file.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 200 {
                    fs::write(&file, "the same bytes\n".repeat(200)).unwrap();
                    n += 1;
                }
            })
        };
        let mut dirty = 0;
        for i in 0..500 {
            t.invalidate(std::slice::from_ref(&file));
            if t.tag(&pkg).unwrap().as_str().contains("-dirty-") {
                dirty += 1;
            }
            if round == 1 && i % 50 == 0 {
                // What an editor's or a shell prompt's `git status` does meanwhile.
                git(&r.root, &["status", "--porcelain"]);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        eprintln!("round {round}: {dirty} of 500 tags mid-write were dirty");
        t.invalidate(std::slice::from_ref(&file));
        assert_eq!(t.tag(&pkg).unwrap().to_string(), clean, "round {round}");
        assert_eq!(
            Tagger::new().tag(&pkg).unwrap().to_string(),
            clean,
            "a fresh tagger, round {round}"
        );
    }
}

/// What kilnd does on each save, against a writer that rewrites a tracked file in place
/// with the same bytes (truncate, then write) as fast as it can: a tag read mid-write may
/// be dirty (the file was empty or half written then, and the kernel posts a truncation's
/// event only after the file is empty), but such a read is always known to be unsure
/// (`Touched::unsure`: the writer still has the file open, or its events came since), so
/// every tag kilnd would act on is the clean one, and so is the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_in_place_rewrites_is_folded_and_ends_clean() {
    use kiln_daemon::watch::{Touched, WatchConfig, WatchEvent, Watcher};
    let r = Repo::new();
    let p = r.package("a", "image: a\n");
    let file = r.write("a/f.txt", "the same bytes\n");
    r.commit();
    let fence = tempfile::tempdir().unwrap();
    let touched = std::sync::Arc::new(Touched::default());
    let (_w, mut rx) = Watcher::start(WatchConfig {
        roots: vec![r.root.clone()],
        exclude: Vec::new(),
        quiet: std::time::Duration::from_millis(50),
        touched: std::sync::Arc::clone(&touched),
        fence_dir: Some(fence.path().join("fence")),
    })
    .unwrap();
    let pkg = r.load(&p);
    let mut t = Tagger::new();
    let clean = t.tag(&pkg).unwrap().to_string();
    let writes = 2000;
    let writer = {
        let file = file.clone();
        std::thread::spawn(move || {
            for _ in 0..writes {
                fs::write(&file, "the same bytes\n").unwrap();
            }
        })
    };
    let (mut plans, mut sure, mut rescans) = (0, 0, 0);
    let mut last = None;
    loop {
        let done = writer.is_finished();
        // Once the writes are done, their last change comes within a quiet window.
        let wait = std::time::Duration::from_secs(if done { 2 } else { 10 });
        let paths: Vec<std::path::PathBuf> = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(WatchEvent::Changed(paths))) => paths.into_iter().collect(),
            // The writer can outrun the watcher under load: inotify's queue overflows and
            // everything is looked at again, as kilnd does.
            Ok(Some(WatchEvent::Rescan { .. })) => {
                rescans += 1;
                vec![file.clone()]
            }
            Ok(Some(WatchEvent::Error { message })) => panic!("watcher: {message}"),
            Ok(None) | Err(_) => {
                assert!(done, "no change within {wait:?} while writing");
                break;
            }
        };
        let since = std::time::Instant::now();
        t.invalidate(&paths);
        let tag = t.tag(&pkg).unwrap().to_string();
        let unsure = touched.unsure(&[(vec![p.as_path()], since)]).await[0];
        plans += 1;
        if !unsure {
            sure += 1;
            assert_eq!(tag, clean, "a tag read while no write was under way");
        }
        last = Some((tag, unsure));
        if done {
            break;
        }
    }
    writer.join().unwrap();
    eprintln!(
        "{plans} changes ({rescans} rescans) for {writes} writes, {sure} read with no write under way"
    );
    assert_eq!(last, Some((clean, false)), "the last change");
}
