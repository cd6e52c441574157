//! The workspace: which packages exist (`discover`), what their `build.yml` says
//! (`spec`, `package`) and their tags, as `linuxkit pkg show-tag` computes them
//! (`tag`, over `git`).
//!
//! The tag of one package is a function of that package's files, its extra sources
//! and its repository's HEAD and index; a workspace-level fold (a package that
//! `FROM`s another) can be layered on [`Tagger::hash`].
//!
//! Use: `Workspace::discover(roots)`, then `Tagger::tag_all` over the packages. When
//! the watcher reports changed paths (canonical, under the canonical roots), call
//! `Workspace::reload(paths)` (packages added, removed or re-read) and
//! `Tagger::invalidate(paths)` (hashes forgotten), then tag the packages both return.
//! A commit, checkout or `git add` is noticed by the tagger itself (it stats HEAD, the
//! refs and the index on every call and diffs what changed).

pub mod discover;
pub mod git;
pub mod lock;
pub mod package;
pub mod planned;
pub mod spec;
pub mod tag;

use std::path::{Path, PathBuf};

use kiln_shared::reference::ImageRef;

pub use discover::Workspace;
pub use lock::{LOCK_FILE, Lock, LockError};
pub use package::{BUILD_YML, Package, PackageError};
pub use planned::{BuilderKind, PackageTable, Planned};
pub use spec::{SpecError, parse_build_yml};
pub use tag::{GitMeta, Refreshed, TagError, Tagger};

/// An error of `kiln show-tag`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkspaceError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error("{}: no build.yml here: give a package directory", dir.display())]
    NotAPackage { dir: PathBuf },
}

/// `kiln show-tag DIR`: `org/image:tag` of the package in `dir`, as
/// `linuxkit pkg show-tag DIR` prints it. Extra sources must stay inside the
/// package's git repository (or its parent directory outside git).
pub fn show_tag(dir: &Path) -> Result<ImageRef, WorkspaceError> {
    show_tag_with(&mut Tagger::new(), dir)
}

/// `kiln show-tag DIR...`: one result per directory, in order, sharing one tagger.
pub fn show_tags(dirs: &[PathBuf]) -> Vec<Result<ImageRef, WorkspaceError>> {
    let mut tagger = Tagger::new();
    dirs.iter().map(|d| show_tag_with(&mut tagger, d)).collect()
}

fn show_tag_with(tagger: &mut Tagger, dir: &Path) -> Result<ImageRef, WorkspaceError> {
    if !dir.join(BUILD_YML).exists() {
        return Err(WorkspaceError::NotAPackage {
            dir: dir.to_owned(),
        });
    }
    let abs = std::fs::canonicalize(dir).map_err(|e| PackageError::Io {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let root = git::find_top(&abs)
        .or_else(|| abs.parent().map(Path::to_owned))
        .unwrap_or_else(|| abs.clone());
    let pkg = Package::load(&abs, &root)?;
    Ok(tagger.image_ref(&pkg)?)
}
