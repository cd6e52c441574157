//! Paths a save never needs a rebuild for: `.git` internals, editors' temporary and
//! backup files, and kiln's own cache.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

/// Whether a change at `path` is to be ignored.
pub fn is_ignored(path: &Path, roots: &[PathBuf], exclude: &[PathBuf]) -> bool {
    if exclude.iter().any(|e| path.starts_with(e)) {
        return true;
    }
    let rel = roots
        .iter()
        .find_map(|r| path.strip_prefix(r).ok())
        .unwrap_or(path);
    if rel
        .components()
        .any(|c| matches!(c, Component::Normal(n) if n == ".git"))
    {
        return true;
    }
    path.file_name().is_some_and(is_editor_temp)
}

/// Whether `path` is the state of a git repository that a package's tag reads: `HEAD`,
/// the index, a ref (`refs/...`, `packed-refs`) of a `.git` directory. A commit or a
/// checkout changes these and no file of a package, and must tag again (a package saved
/// and then committed goes from `-dirty-` to clean). Their `.lock` files are not.
pub fn is_git_state(path: &Path) -> bool {
    let mut parts = path.components().rev().map(Component::as_os_str);
    let Some(name) = parts.next() else {
        return false;
    };
    if name.to_str().is_none_or(|n| n.ends_with(".lock")) {
        return false;
    }
    if name == "HEAD" || name == "index" || name == "packed-refs" {
        return parts.next() == Some(OsStr::new(".git"));
    }
    // .git/refs/<anything>/<name>
    let mut seen_refs = false;
    for p in parts {
        if p == ".git" {
            return seen_refs;
        }
        seen_refs = p == "refs";
    }
    false
}

/// Editor temporaries and backups: vim (`.x.swp`, `.x.swx`, `4913`, `x~`), emacs (`#x#`,
/// `.#x`), JetBrains (`x___jb_tmp___`, `x___jb_old___`), VS Code (`.x.tmp.<n>` style
/// atomic-save files ending in `.tmp`), kate (`.x.kate-swp`, `x.kate-swp`, `x.<rand>.new`
/// is not used by kate; kate writes `.x.kate-swp`) and gedit (`.goutputstream-XXXXXX`).
pub fn is_editor_temp(name: &OsStr) -> bool {
    let Some(n) = name.to_str() else {
        return false;
    };
    n == "4913"
        || n.ends_with('~')
        || n.ends_with(".swp")
        || n.ends_with(".swx")
        || n.ends_with(".swo")
        || (n.starts_with('#') && n.ends_with('#') && n.len() > 1)
        || n.starts_with(".#")
        || n.ends_with("___jb_tmp___")
        || n.ends_with("___jb_old___")
        || n.ends_with(".kate-swp")
        || n.starts_with(".goutputstream-")
        || (n.starts_with('.') && n[1..].contains(".tmp."))
        || n.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_temporaries() {
        for t in [
            ".main.go.swp",
            ".main.go.swx",
            "4913",
            "main.go~",
            "#main.go#",
            ".#main.go",
            "main.go___jb_tmp___",
            "main.go___jb_old___",
            ".main.go.kate-swp",
            ".goutputstream-ABC123",
            ".main.go.tmp.12345",
            "main.go.tmp",
        ] {
            assert!(is_editor_temp(OsStr::new(t)), "{t}");
        }
        for t in [
            "main.go",
            "Dockerfile",
            "build.yml",
            "#notes",
            "a#b#c.txt",
            "swp",
        ] {
            assert!(!is_editor_temp(OsStr::new(t)), "{t}");
        }
    }

    #[test]
    fn git_state_is_head_the_index_and_the_refs() {
        for p in [
            "/ws/.git/HEAD",
            "/ws/.git/index",
            "/ws/.git/packed-refs",
            "/ws/.git/refs/heads/main",
            "/ws/.git/refs/heads/topic/x",
            "/ws/sub/.git/refs/tags/v1",
        ] {
            assert!(is_git_state(Path::new(p)), "{p}");
        }
        for p in [
            "/ws/.git/index.lock",
            "/ws/.git/refs/heads/main.lock",
            "/ws/.git/objects/ab/cdef",
            "/ws/.git/logs/HEAD",
            "/ws/.git/refs",
            "/ws/pkg/HEAD",
            "/ws/pkg/refs/heads/main",
            "/ws/.git/FETCH_HEAD",
        ] {
            assert!(!is_git_state(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn git_internals_and_the_cache() {
        let roots = [PathBuf::from("/ws")];
        let cache = [PathBuf::from("/ws/.cache/kiln")];
        assert!(is_ignored(Path::new("/ws/.git/index"), &roots, &cache));
        assert!(is_ignored(Path::new("/ws/pkg/.git/HEAD"), &roots, &cache));
        assert!(is_ignored(
            Path::new("/ws/.cache/kiln/index.json"),
            &roots,
            &cache
        ));
        assert!(!is_ignored(Path::new("/ws/pkg/.gitignore"), &roots, &cache));
        assert!(!is_ignored(Path::new("/ws/pkg/main.go"), &roots, &cache));
        // A root that itself lies under a directory named .git is still watched.
        let odd = [PathBuf::from("/x/.git/ws")];
        assert!(!is_ignored(Path::new("/x/.git/ws/pkg/a"), &odd, &[]));
    }
}
