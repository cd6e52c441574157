//! `kiln show-tag DIR...` (kilnd's one-off command): a package directory's tag as kilnd
//! computes it, planned with the rest of its workspace so the tags it follows are folded
//! in.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_shared::reference::ImageRef;

use super::{Builders, PlanErrors, plan_workspace};
use crate::workspace::{Planned, Tagger, Workspace};

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
    let mut tagger = Tagger::new();
    type Planned3 = (Workspace, BTreeMap<String, Arc<Planned>>, PlanErrors);
    let mut planned_roots: BTreeMap<PathBuf, Planned3> = BTreeMap::new();
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
            let (ws, planned, errors) = planned_roots.entry(root.clone()).or_insert_with(|| {
                let ws = Workspace::discover(std::slice::from_ref(&root));
                let (planned, errors) = plan_workspace(
                    &ws,
                    &mut tagger,
                    &mut BTreeMap::new(),
                    &Builders::default(),
                    &BTreeMap::new(),
                );
                (ws, planned, errors)
            });
            if let Some(e) = errors.get(&abs).map(|p| &p.error) {
                // Without its Dockerfile a package follows nothing: its tag is its files'
                // hash, as `linuxkit pkg show-tag` prints it.
                return match ws.packages.get(&abs) {
                    Some(Ok(p)) if p.missing_dockerfile().is_some() => {
                        tagger.image_ref(p).map_err(ShowTagError::Tag)
                    }
                    _ => Err(ShowTagError::Broken(e.clone())),
                };
            }
            planned
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
