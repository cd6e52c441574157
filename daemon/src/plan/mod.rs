//! The planner, pure: from changed paths and the package table to tags and jobs. It keeps
//! the workspace's packages and their tags, maps a change to the packages that contain it
//! (or list it in `extra-sources`) and to the packages that follow those, and for every
//! (package, tag, arch) decides: already in the cache (served at once, a revert
//! included) or a [`Job`] to build, in dependency order.
//!
//! It reads files (a tag is a content hash) but spawns nothing, publishes nothing and
//! knows no API: the control layer publishes what it returns and submits the jobs.

pub mod deps;
mod planner;
mod show_tag;

pub use planner::{Planner, Tagged};
pub use show_tag::{ShowTagError, show_tags};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{Tag, arch_ref};

use crate::cache::IndexView;
use crate::schedule::{Job, QueueReason, TargetKey};
use crate::workspace::{BuilderKind, PackageTable, Planned};

/// Which builder builds a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuilderMode {
    /// Native when the Dockerfile needs nothing it lacks, else docker.
    #[default]
    Auto,
    Native,
    Docker,
}

/// A builder name that is none of `auto`, `native`, `docker`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown builder {0:?}: use auto, native or docker")]
pub struct UnknownBuilder(pub String);

impl std::str::FromStr for BuilderMode {
    type Err = UnknownBuilder;
    fn from_str(s: &str) -> Result<Self, UnknownBuilder> {
        match s {
            "auto" => Ok(BuilderMode::Auto),
            "native" => Ok(BuilderMode::Native),
            "docker" => Ok(BuilderMode::Docker),
            other => Err(UnknownBuilder(other.to_owned())),
        }
    }
}

/// The builder of each package: a default, and per-package choices (`kiln.toml`'s
/// `[packages."org/image"] builder = ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builders {
    pub default: BuilderMode,
    pub packages: BTreeMap<String, BuilderMode>,
}

impl Builders {
    pub fn mode_for(&self, repo: &str) -> BuilderMode {
        self.packages.get(repo).copied().unwrap_or(self.default)
    }
}

/// A package that cannot be built, under the name its row keeps: its `org/image`, else
/// (a build.yml that does not say) the name it had when it last loaded, else the
/// directory. Its arches when its build.yml says them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageProblem {
    pub package: String,
    pub dir: PathBuf,
    pub error: String,
    pub archs: Vec<String>,
}

/// What a new plan changes, against the previous one.
#[derive(Debug, Default)]
pub struct Diff {
    /// Packages no longer in the workspace.
    pub removed: Vec<String>,
    /// Packages planned anew (a new tag, arches or directory, or affected by the change).
    pub packages: Vec<PackagePlan>,
}

/// One package planned anew: each arch with its image when the cache holds it.
#[derive(Debug)]
pub struct PackagePlan {
    pub name: String,
    pub planned: Arc<Planned>,
    pub archs: Vec<(String, Option<Digest>)>,
}

impl PackagePlan {
    /// Every arch is in the cache.
    pub fn all_cached(&self) -> bool {
        self.archs.iter().all(|(_, d)| d.is_some())
    }
}

/// Compares a plan with the previous one over the names it `touched`: what was removed,
/// and for each package whose tag, arches or directory changed (or that `affected`
/// names), which arches the cache already holds.
pub fn diff(
    previous: &BTreeMap<String, Arc<Planned>>,
    planned: &BTreeMap<String, Arc<Planned>>,
    touched: &BTreeSet<String>,
    affected: &BTreeSet<PathBuf>,
    index: Option<&IndexView>,
) -> Diff {
    let mut out = Diff::default();
    for name in touched {
        let Some(p) = planned.get(name) else {
            if previous.contains_key(name) {
                out.removed.push(name.clone());
            }
            continue;
        };
        let unchanged = previous.get(name).is_some_and(|old| {
            old.tag == p.tag && old.pkg.arches == p.pkg.arches && old.pkg.dir == p.pkg.dir
        });
        if unchanged && !affected.contains(&p.pkg.dir) {
            continue;
        }
        let image = p.image();
        let archs = p
            .archs()
            .into_iter()
            .map(|arch| {
                let cached = index
                    .and_then(|i| i.get(&arch_ref(&image, &arch)))
                    .map(|d| d.digest.clone());
                (arch, cached)
            })
            .collect();
        out.packages.push(PackagePlan {
            name: name.clone(),
            planned: Arc::clone(p),
            archs,
        });
    }
    out
}

/// The job that builds `arch` of a planned package.
pub fn job(p: &Planned, arch: &str, force: bool, reason: QueueReason) -> Job {
    Job {
        key: TargetKey {
            package: p.pkg.repo.to_string(),
            arch: arch.to_owned(),
        },
        tag: p.tag.clone(),
        after: p
            .deps
            .iter()
            .map(|(repo, tag)| {
                (
                    TargetKey {
                        package: repo.clone(),
                        arch: arch.to_owned(),
                    },
                    tag.clone(),
                )
            })
            .collect(),
        force,
        look_up: true,
        reason,
        builder: p.builder,
        fallback: p.auto && p.builder == BuilderKind::Native,
    }
}

/// A planned package by name (`org/image`) or by package directory.
pub fn find(table: &PackageTable, package: &str) -> Option<Arc<Planned>> {
    let table = table.read().ok()?;
    if let Some(p) = table.get(package) {
        return Some(Arc::clone(p));
    }
    let dir = std::fs::canonicalize(package).ok()?;
    table.values().find(|p| p.pkg.dir == dir).cloned()
}

/// Adds the builds of the packages `p` follows that the cache lacks for `arch`,
/// dependencies first.
pub fn missing_deps(
    table: &PackageTable,
    p: &Planned,
    arch: &str,
    index: &IndexView,
    jobs: &mut Vec<Job>,
) {
    for (repo, _) in &p.deps {
        let Some(d) = find(table, repo) else { continue };
        if index.get(&arch_ref(&d.image(), arch)).is_none()
            && !jobs
                .iter()
                .any(|j| j.key.package == *repo && j.key.arch == arch)
        {
            missing_deps(table, &d, arch, index, jobs);
            jobs.push(job(&d, arch, false, QueueReason::Dependency));
        }
    }
}

/// A pull of `tag` of a planned package that the cache lacks: the builds of the arches
/// it names (all of them for the current tag or the dev tag, one for `<tag>-<arch>`)
/// that the cache lacks. None when the tag is not the package's.
pub fn pull_jobs(p: &Planned, tag: &str, dev_tag: &Tag, index: Option<&IndexView>) -> Vec<Job> {
    let current = p.tag.as_str();
    let archs: Vec<String> = if tag == current || tag == dev_tag.as_str() {
        p.archs()
    } else {
        p.archs()
            .into_iter()
            .filter(|a| tag == format!("{current}-{a}"))
            .collect()
    };
    let image = p.image();
    archs
        .iter()
        .filter(|a| index.is_none_or(|i| i.get(&arch_ref(&image, a)).is_none()))
        .map(|a| job(p, a, false, QueueReason::Pulled))
        .collect()
}

/// Broken packages by directory.
pub type PlanErrors = BTreeMap<PathBuf, PackageProblem>;

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn write(root: &std::path::Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// `base` (`FROM scratch`, a file `f`) and `app` (`FROM kiln/base`) in `ws`.
    pub(super) fn base_and_app(ws: &std::path::Path) {
        write(ws, "base/build.yml", "org: kiln\nimage: base\n");
        write(ws, "base/Dockerfile", "FROM scratch\nCOPY f /f\n");
        write(ws, "base/f", "one");
        write(ws, "app/build.yml", "org: kiln\nimage: app\n");
        write(ws, "app/Dockerfile", "FROM kiln/base\n");
    }

    #[test]
    fn a_follower_folds_its_base_tag_and_a_pinned_from_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        base_and_app(&ws);
        write(&ws, "pinned/build.yml", "org: kiln\nimage: pinned\n");
        write(&ws, "pinned/Dockerfile", "FROM kiln/base:v1\n");
        let dirs = [ws.join("base"), ws.join("app"), ws.join("pinned")];
        let tags = |dirs: &[PathBuf]| -> Vec<String> {
            show_tags(dirs)
                .into_iter()
                .map(|r| r.unwrap().tag.to_string())
                .collect()
        };
        let first = tags(&dirs);
        let own = |d: &PathBuf| crate::workspace::show_tag(d).unwrap().tag.to_string();
        assert_eq!(first[0], own(&dirs[0]));
        assert_ne!(first[1], own(&dirs[1]));
        assert_eq!(first[2], own(&dirs[2]));

        write(&ws, "base/f", "two");
        let second = tags(&dirs);
        assert_ne!(second[0], first[0]);
        assert_ne!(second[1], first[1], "the follower's tag follows its base");
        assert_eq!(second[2], first[2], "a pinned FROM stays as written");

        write(&ws, "base/f", "one");
        assert_eq!(tags(&dirs), first, "a revert gives back the earlier tags");
    }

    /// `linuxkit pkg show-tag` tags a package whose Dockerfile is missing; so does kiln,
    /// while planning it to build says the file is missing.
    #[test]
    fn show_tag_without_a_dockerfile_and_planning_says_it_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "a/build.yml", "org: kiln\nimage: a\n");
        write(&ws, "a/file", "x");
        let tags = show_tags(&[ws.join("a")]);
        let image = tags[0].as_ref().unwrap();
        assert_eq!(
            image.to_string(),
            crate::workspace::show_tag(&ws.join("a"))
                .unwrap()
                .to_string()
        );
        assert_eq!(image.repo.as_str(), "kiln/a");

        let mut planner = Planner::new(std::slice::from_ref(&ws), Builders::default());
        let (planned, errors) = planner.load();
        assert!(planned.is_empty());
        let e = &errors[&std::fs::canonicalize(ws.join("a")).unwrap()];
        assert!(
            e.contains("Dockerfile") && e.contains("does not exist: create it"),
            "{e}"
        );
    }

    #[test]
    fn a_cycle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "a/build.yml", "org: kiln\nimage: a\n");
        write(&ws, "a/Dockerfile", "FROM kiln/b\n");
        write(&ws, "b/build.yml", "org: kiln\nimage: b\n");
        write(&ws, "b/Dockerfile", "FROM kiln/a\n");
        write(&ws, "c/build.yml", "org: kiln\nimage: c\n");
        write(&ws, "c/Dockerfile", "FROM scratch\n");
        let r = show_tags(&[ws.join("a"), ws.join("c")]);
        let err = r[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("kiln/a -> kiln/b -> kiln/a"), "{err}");
        assert!(r[1].is_ok());
    }
}
