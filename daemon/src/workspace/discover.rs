//! Finds the packages under the workspace roots: every directory holding a
//! `build.yml`, skipping `.git` and what git ignores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::package::{BUILD_YML, Package, PackageError};

/// The packages of a workspace, by directory; a broken package is an error for that
/// package only.
#[derive(Debug, Default)]
pub struct Workspace {
    pub roots: Vec<PathBuf>,
    pub packages: BTreeMap<PathBuf, Result<Package, PackageError>>,
    /// Roots or directories that could not be walked.
    pub errors: Vec<String>,
    /// Each extra source directory and the package that lists it (few packages have
    /// any): what a change there affects, found without going over every package.
    sources: Vec<(PathBuf, PathBuf)>,
}

impl Workspace {
    /// Walks `roots` and loads every package found.
    pub fn discover(roots: &[PathBuf]) -> Workspace {
        let mut ws = Workspace {
            roots: roots
                .iter()
                .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
                .collect(),
            ..Workspace::default()
        };
        for root in ws.roots.clone() {
            for dir in ws.find(&root) {
                // The walk follows no symlinks, so a directory under a canonical root
                // is canonical.
                let pkg = Package::load_canonical(dir.clone(), root.clone());
                ws.packages.insert(dir, pkg);
            }
        }
        ws.index_sources();
        ws
    }

    fn index_sources(&mut self) {
        self.sources = self
            .packages
            .iter()
            .filter_map(|(d, p)| Some((d, p.as_ref().ok()?)))
            .flat_map(|(d, p)| p.extra_sources.iter().map(|(s, _)| (s.clone(), d.clone())))
            .collect();
    }

    /// The directories holding a `build.yml` under `start` (itself included).
    fn find(&mut self, start: &Path) -> Vec<PathBuf> {
        let walker = ignore::WalkBuilder::new(start)
            .hidden(false)
            .ignore(false)
            .git_ignore(true)
            .git_exclude(true)
            .git_global(true)
            .parents(true)
            .follow_links(false)
            .filter_entry(|e| e.file_name() != ".git")
            .build();
        let mut dirs = Vec::new();
        for entry in walker {
            match entry {
                Ok(e) => {
                    let is_file = e.file_type().is_some_and(|t| t.is_file() || t.is_symlink());
                    if is_file && e.file_name() == BUILD_YML {
                        if let Some(d) = e.path().parent() {
                            dirs.push(d.to_owned());
                        }
                    }
                }
                Err(e) => self.errors.push(e.to_string()),
            }
        }
        dirs.sort();
        dirs
    }

    /// Re-reads the packages that `paths` may have created, changed or removed: a
    /// `build.yml`, a directory (rescanned), a package's Dockerfile or extra source,
    /// anything in a broken package. Returns the package directories added, changed
    /// or removed (a package whose directory is gone is dropped).
    pub fn reload(&mut self, paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut touched = Vec::new();
        for p in paths {
            let Some(root) = self.roots.iter().find(|r| p.starts_with(r)).cloned() else {
                continue;
            };
            // Packages at or below a changed directory, or whose build.yml changed.
            let dir = if p.file_name().is_some_and(|n| n == BUILD_YML) {
                p.parent().map(Path::to_owned).unwrap_or_else(|| p.clone())
            } else {
                p.clone()
            };
            // Looked up by path (the packages at or below `dir`, the ones above `p`), not
            // by going over every package: a save costs the same in any workspace.
            let stale: Vec<PathBuf> = self
                .packages
                .range(dir.clone()..)
                .map(|(d, _)| d)
                .take_while(|d| d.starts_with(&dir))
                .cloned()
                .collect();
            for d in stale {
                self.packages.remove(&d);
                touched.push(d);
            }
            // Packages that name the changed path: their Dockerfile or an extra
            // source; and broken packages, whose error may be gone.
            let mut affected: Vec<PathBuf> = p
                .ancestors()
                .filter_map(|d| Some((d, self.packages.get(d)?)))
                .filter(|(d, pkg)| match pkg {
                    Err(_) => true,
                    Ok(pkg) => *p == pkg.dockerfile || *p == d.join(pkg.spec.dockerfile.as_str()),
                })
                .map(|(d, _)| d.to_owned())
                .collect();
            affected.extend(
                self.sources
                    .iter()
                    .filter(|(s, d)| s.starts_with(p) && self.packages.contains_key(d))
                    .map(|(_, d)| d.clone()),
            );
            for d in affected {
                let pkg = Package::load_canonical(d.clone(), root.clone());
                self.packages.insert(d.clone(), pkg);
                touched.push(d);
            }
            if dir.is_dir() {
                for d in self.find(&dir) {
                    let pkg = Package::load_canonical(d.clone(), root.clone());
                    self.packages.insert(d.clone(), pkg);
                    touched.push(d);
                }
            }
        }
        if !touched.is_empty() {
            self.index_sources();
        }
        touched.sort();
        touched.dedup();
        touched
    }
}
