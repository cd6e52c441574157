//! The build context as a [`Tree`]: the package directory (minus what `.dockerignore`
//! excludes) plus the package's extra sources, with owners reset to 0:0 as the docker
//! CLI does when it sends a context. Also Go's `filepath.Match` for wildcard sources of
//! `COPY`.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::tree::{Content, Kind, Node, ResolveError, Tree, clean, join, parent};
use crate::build::dockerignore::{DockerIgnore, IgnoreError};

/// Go's `filepath.Match` on one path component, through `globset`: `*`, `?`, `[...]`
/// (with `^` or `!` negation and ranges), `\` escapes; `{a,b}` is literal, as in Go.
/// Fails on a malformed pattern.
pub fn match_component(pattern: &str, name: &str) -> Result<bool, globset::Error> {
    let mut escaped = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if matches!(c, '{' | '}') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    let glob = globset::GlobBuilder::new(&escaped)
        .literal_separator(true)
        .backslash_escape(true)
        .build()?;
    Ok(glob.compile_matcher().is_match(name))
}

pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Why the context could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Ignore {
        path: PathBuf,
        #[source]
        source: IgnoreError,
    },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("extra source {src}: {source}")]
    ExtraPlace {
        src: PathBuf,
        #[source]
        source: ResolveError,
    },
    #[error("extra source {0} is a file and cannot replace the context root")]
    ExtraFileAtRoot(PathBuf),
    #[error("{0}: sockets, FIFOs and devices cannot be part of a build context")]
    Special(PathBuf),
    #[error("{0}: a file name is not UTF-8")]
    NotUtf8(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the context: `dir` minus `.dockerignore`d paths, then each extra source (an
/// absolute file or directory) placed at its destination inside the context.
pub fn read_context(dir: &Path, extra: &[(PathBuf, String)]) -> Result<Tree, ContextError> {
    let ignore = match fs::read_to_string(dir.join(".dockerignore")) {
        Ok(t) => DockerIgnore::parse(&t).map_err(|source| ContextError::Ignore {
            path: dir.join(".dockerignore"),
            source,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(io_err(&dir.join(".dockerignore"))(e)),
    };
    if !fs::metadata(dir).map_err(io_err(dir))?.is_dir() {
        return Err(ContextError::NotADirectory(dir.to_owned()));
    }
    // The context's root arrives in BuildKit as a 0755 directory, whatever the mode of
    // the package directory (checked against `docker build` in tests/it/native.rs).
    let mut tree = Tree::new(Node::dir(0o755, 0, 0, 0));
    walk(&mut tree, dir, "", Some(&ignore))?;
    for (src, dst) in extra {
        let dst = clean(dst);
        tree.mkdir_all(parent(&dst), 0o755, 0, 0, 0)
            .map_err(|source| ContextError::ExtraPlace {
                src: src.clone(),
                source,
            })?;
        let m = fs::symlink_metadata(src).map_err(io_err(src))?;
        if dst.is_empty() {
            if !m.is_dir() {
                return Err(ContextError::ExtraFileAtRoot(src.clone()));
            }
        } else {
            tree.insert(&dst, node_of(src, &m)?);
        }
        if m.is_dir() {
            walk(&mut tree, src, &dst, None)?;
        }
    }
    Ok(tree)
}

fn node_of(path: &Path, m: &fs::Metadata) -> Result<Node, ContextError> {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        let t = fs::read_link(path).map_err(io_err(path))?;
        Kind::Symlink(t.to_string_lossy().into_owned())
    } else if ft.is_file() {
        Kind::File {
            content: Content::Path(path.to_owned()),
            size: m.len(),
        }
    } else {
        return Err(ContextError::Special(path.to_owned()));
    };
    Ok(Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: 0,
        gid: 0,
        mtime: 0,
    })
}

fn walk(
    tree: &mut Tree,
    dir: &Path,
    at: &str,
    ignore: Option<&DockerIgnore>,
) -> Result<(), ContextError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    names.sort();
    for name in names {
        let Some(name_str) = name.to_str() else {
            return Err(ContextError::NotUtf8(dir.join(&name)));
        };
        let rel = join(at, name_str);
        let path = dir.join(&name);
        let excluded = ignore.is_some_and(|i| i.excludes(&rel));
        let m = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if excluded && !(m.is_dir() && ignore.is_some_and(DockerIgnore::has_exclusions)) {
            continue;
        }
        if m.file_type().is_socket_like() {
            continue;
        }
        if !excluded {
            tree.insert(&rel, node_of(&path, &m)?);
        }
        if m.is_dir() {
            walk(tree, &path, &rel, ignore)?;
            if excluded && !tree.descendants(&rel).is_empty() {
                // A re-included path below an excluded directory: the directory comes
                // with it, as moby's walker keeps the parents of what it sends.
                tree.insert(&rel, node_of(&path, &m)?);
            }
        }
    }
    Ok(())
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}

impl SocketLike for fs::FileType {
    fn is_socket_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_socket()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_go_filepath_match() {
        let m = |p, n| match_component(p, n).unwrap();
        assert!(m("*.txt", "a.txt"));
        assert!(!m("*.txt", "a.txt.bak"));
        assert!(m("a?c", "abc"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[^a-c]x", "bx"));
        assert!(m("[!a-c]x", "dx"));
        assert!(m("\\*", "*"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(m("{a,b}", "{a,b}"));
        assert!(!m("{a,b}", "a"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(match_component("[a-", "x").is_err());
        assert!(match_component("x\\", "x").is_err());
    }

    #[test]
    fn dockerignore_rules() {
        let i = DockerIgnore::parse("# c\n/target\n**/*.o\n*.md\n!README.md\nsub/*/tmp\n").unwrap();
        assert!(i.excludes("target"));
        assert!(i.excludes("target/debug/x"));
        assert!(i.excludes("a/b/c.o"));
        assert!(i.excludes("x.o"));
        assert!(i.excludes("NOTES.md"));
        assert!(!i.excludes("README.md"));
        assert!(!i.excludes("docs/NOTES.md"), "*.md is anchored at the root");
        assert!(i.excludes("sub/a/tmp/f"));
        assert!(!i.excludes("sub/tmp"));
        assert!(i.has_exclusions());
    }

    #[test]
    fn reads_a_context_with_ignores_and_extra_sources() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("pkg");
        fs::create_dir_all(root.join("keep/sub")).unwrap();
        fs::create_dir_all(root.join("skip")).unwrap();
        fs::write(root.join("keep/sub/f"), "x").unwrap();
        fs::write(root.join("skip/f"), "x").unwrap();
        fs::write(root.join("skip/keepme"), "x").unwrap();
        fs::write(root.join(".dockerignore"), "skip\n!skip/keepme\n").unwrap();
        std::os::unix::fs::symlink("keep/sub", root.join("link")).unwrap();
        let extra = d.path().join("extra");
        fs::create_dir_all(&extra).unwrap();
        fs::write(extra.join("e"), "e").unwrap();
        let t = read_context(&root, &[(extra.clone(), "vendor/extra".into())]).unwrap();
        assert!(t.get("keep/sub/f").is_some());
        assert!(t.get("skip/f").is_none());
        assert!(t.get("skip/keepme").is_some());
        assert!(t.get("skip").unwrap().is_dir());
        assert!(matches!(&t.get("link").unwrap().kind, Kind::Symlink(s) if s == "keep/sub"));
        assert!(t.get("vendor/extra/e").is_some());
        assert_eq!(t.get("keep/sub/f").unwrap().uid, 0);
    }
}
