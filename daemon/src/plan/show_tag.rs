//! `kiln show-tag DIR...` (kilnd's one-off command): a package directory's tag as kilnd
//! computes it, planned with the rest of its workspace so the tags it follows are folded
//! in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kiln_shared::reference::ImageRef;

use super::{Builders, PlanErrors, Planner};

/// Why `show-tag` has no tag for a directory.
#[derive(Debug, thiserror::Error)]
pub enum ShowTagError {
    #[error("{}: {source}", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no build.yml here: give a package directory", .0.display())]
    NoBuildYml(PathBuf),
    #[error(transparent)]
    Tag(crate::workspace::TagError),
    /// The package cannot be planned: the problem as planning reports it.
    #[error("{0}")]
    Broken(String),
    #[error(
        "{}: not a package of the workspace {} (is it ignored by git?)",
        dir.display(),
        root.display()
    )]
    NotInWorkspace { dir: PathBuf, root: PathBuf },
}

/// `kiln show-tag DIR...`: `org/image:tag` of each package as kilnd tags it, the tags of
/// the workspace packages it follows folded in (otherwise the same as
/// `linuxkit pkg show-tag`). The workspace is the package's git repository, or its parent
/// directory outside git.
pub fn show_tags(dirs: &[PathBuf]) -> Vec<Result<ImageRef, ShowTagError>> {
    let mut planners: BTreeMap<PathBuf, (Planner, PlanErrors)> = BTreeMap::new();
    dirs.iter()
        .map(|dir| {
            let abs = std::fs::canonicalize(dir).map_err(|source| ShowTagError::Read {
                dir: dir.clone(),
                source,
            })?;
            if !abs.join(crate::workspace::BUILD_YML).exists() {
                return Err(ShowTagError::NoBuildYml(dir.clone()));
            }
            let root = crate::workspace::git::find_top(&abs)
                .or_else(|| abs.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_else(|| abs.clone());
            let (planner, errors) = planners.entry(root.clone()).or_insert_with(|| {
                let mut planner = Planner::new(std::slice::from_ref(&root), Builders::default());
                let broken = planner.tag(&BTreeSet::new()).broken;
                (planner, broken)
            });
            if let Some(e) = errors.get(&abs).map(|p| &p.error) {
                // Without its Dockerfile a package follows nothing: its tag is its files'
                // hash, as `linuxkit pkg show-tag` prints it.
                return match planner.without_dockerfile(&abs) {
                    Some(own) => own.map_err(ShowTagError::Tag),
                    None => Err(ShowTagError::Broken(e.clone())),
                };
            }
            planner
                .planned()
                .values()
                .find(|p| p.pkg.dir == abs)
                .map(|p| p.image())
                .ok_or_else(|| ShowTagError::NotInWorkspace {
                    dir: dir.clone(),
                    root: root.clone(),
                })
        })
        .collect()
}
