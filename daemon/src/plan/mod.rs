//! The planner, pure: from changed paths and the package table to tags and jobs. It keeps
//! the workspace's packages and their tags, maps a change to the packages that contain it
//! (or list it in `extra-sources`) and to the packages that follow those, and for every
//! (package, tag, arch) decides: already in the cache (served at once, a revert
//! included) or a [`Job`] to build, in dependency order.
//!
//! It reads files (a tag is a content hash) but spawns nothing, publishes nothing and
//! knows no API: the control layer publishes what it returns and submits the jobs.

pub mod deps;
mod show_tag;

pub use show_tag::{ShowTagError, show_tags};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_shared::digest::Digest;
use kiln_shared::reference::{Tag, arch_ref};

use crate::build::dockerfile::{Dockerfile, DockerfileError};
use crate::build::native::{Capabilities, native_supports};
use crate::cache::IndexView;
use crate::schedule::{Job, QueueReason, TargetKey};
use crate::workspace::{BUILD_YML, BuilderKind, Package, PackageTable, Planned, Tagger, Workspace};

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

/// A tagging of the workspace: the packages planned, the broken ones by directory, and
/// which of those to report (new errors, and those of the directories affected).
#[derive(Debug, Default)]
pub struct Tagged {
    pub planned: BTreeMap<String, Arc<Planned>>,
    pub broken: PlanErrors,
    pub report: BTreeSet<PathBuf>,
}

/// The planner's state: the workspace, its tagger, and what it remembers between plans.
pub struct Planner {
    ws: Workspace,
    tagger: Tagger,
    builders: Builders,
    /// Followed workspace packages, by package directory (recomputed when it changes).
    deps: BTreeMap<PathBuf, Result<Vec<String>, DockerfileError>>,
    /// Errors already reported, so that an unchanged broken package is not repeated.
    errors: PlanErrors,
    /// The name each package directory had when its build.yml last loaded.
    known: BTreeMap<PathBuf, String>,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Planner({} packages)", self.ws.packages.len())
    }
}

impl Planner {
    /// Discovers the workspace under `roots`. Blocking: reads directories.
    pub fn new(roots: &[PathBuf], builders: Builders) -> Planner {
        Planner {
            ws: Workspace::discover(roots),
            tagger: Tagger::new(),
            builders,
            deps: BTreeMap::new(),
            errors: BTreeMap::new(),
            known: BTreeMap::new(),
        }
    }

    /// Tags the workspace: the planned packages and every broken package's error (for
    /// a one-off `kiln build` without kilnd). Blocking.
    pub fn load(&mut self) -> (BTreeMap<String, Arc<Planned>>, BTreeMap<PathBuf, String>) {
        let tagged = self.tag(&BTreeSet::new());
        let errors = tagged
            .broken
            .into_iter()
            .map(|(d, p)| (d, p.error))
            .collect();
        (tagged.planned, errors)
    }

    /// Every package directory.
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.ws.packages.keys().cloned().collect()
    }

    /// Takes in changed paths: re-reads the packages they touch and forgets their
    /// hashes. Returns the package directories affected. Blocking.
    pub fn changed(&mut self, paths: &[PathBuf]) -> BTreeSet<PathBuf> {
        let mut affected: BTreeSet<PathBuf> = self.ws.reload(paths).into_iter().collect();
        affected.extend(self.tagger.invalidate(paths));
        // A Dockerfile or build.yml edit can change what a package follows.
        for dir in &affected {
            self.deps.remove(dir);
        }
        affected
    }

    /// Forgets the hashes of the packages in `dirs` (read while they were being
    /// written): the next plan reads them again.
    pub fn forget(&mut self, dirs: &BTreeSet<PathBuf>) {
        for dir in dirs {
            self.deps.remove(dir);
        }
        let dirs: Vec<PathBuf> = dirs.iter().cloned().collect();
        self.tagger.invalidate(&dirs);
    }

    /// The names (`org/image`) of the packages in `dirs` that load.
    pub fn names(&self, dirs: &BTreeSet<PathBuf>) -> Vec<String> {
        dirs.iter()
            .filter_map(|d| match self.ws.packages.get(d) {
                Some(Ok(p)) => Some(p.repo.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Discovers the workspace again and forgets every hash (after the watcher lost
    /// events). Blocking.
    pub fn rescan(&mut self) {
        let roots = self.ws.roots.clone();
        self.ws = Workspace::discover(&roots);
        self.tagger.invalidate(&roots);
        self.deps.clear();
    }

    /// Tags every package (cheap: the tagger re-reads only what changed). Returns the
    /// planned packages, every broken one, and which of those to report: new errors,
    /// and the errors of `affected` packages again. Blocking.
    pub fn tag(&mut self, affected: &BTreeSet<PathBuf>) -> Tagged {
        let (planned, broken) = plan_workspace(
            &self.ws,
            &mut self.tagger,
            &mut self.deps,
            &self.builders,
            &self.known,
        );
        let report = broken
            .iter()
            .filter(|(dir, p)| self.errors.get(*dir) != Some(p) || affected.contains(*dir))
            .map(|(dir, _)| dir.clone())
            .collect();
        self.errors.clone_from(&broken);
        self.known.retain(|d, _| self.ws.packages.contains_key(d));
        for (dir, p) in &self.ws.packages {
            if let Ok(p) = p {
                self.known.insert(dir.clone(), p.repo.to_string());
            }
        }
        Tagged {
            planned,
            broken,
            report,
        }
    }
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

/// Compares a new plan with the previous one: what was removed, and for each package
/// whose tag, arches or directory changed (or that `affected` names), which arches the
/// cache already holds.
pub fn diff(
    previous: &BTreeMap<String, Arc<Planned>>,
    planned: &BTreeMap<String, Arc<Planned>>,
    affected: &BTreeSet<PathBuf>,
    index: Option<&IndexView>,
) -> Diff {
    let removed = previous
        .keys()
        .filter(|name| !planned.contains_key(*name))
        .cloned()
        .collect();
    let mut packages = Vec::new();
    for (name, p) in planned {
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
        packages.push(PackagePlan {
            name: name.clone(),
            planned: Arc::clone(p),
            archs,
        });
    }
    Diff { removed, packages }
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

/// A package directory as a row name when it has no name of its own: its path under its
/// workspace root (the root's own name for a package at the root).
fn dir_label(ws: &Workspace, dir: &std::path::Path) -> String {
    ws.roots
        .iter()
        .filter_map(|r| dir.strip_prefix(r).ok())
        .map(|rel| rel.to_string_lossy().into_owned())
        .find(|rel| !rel.is_empty())
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// Tags every package of a workspace, dependencies folded in, in dependency order, and
/// says which packages cannot be built and why. `deps` remembers what each package
/// follows (drop a directory's entry when its Dockerfile or build.yml changes); `known`
/// is the name each directory had when it last loaded (a broken build.yml keeps it).
/// Blocking: reads files (the tagger re-reads only what changed).
pub fn plan_workspace(
    ws: &Workspace,
    tagger: &mut Tagger,
    deps: &mut BTreeMap<PathBuf, Result<Vec<String>, DockerfileError>>,
    builders: &Builders,
    known: &BTreeMap<PathBuf, String>,
) -> (BTreeMap<String, Arc<Planned>>, PlanErrors) {
    let at = std::time::Instant::now();
    let mut errors = PlanErrors::new();
    let problem =
        |package: String, dir: &PathBuf, error: String, archs: Vec<String>| PackageProblem {
            package,
            dir: dir.clone(),
            error,
            archs,
        };
    let mut by_repo: BTreeMap<String, Package> = BTreeMap::new();
    for p in ws.packages.values().filter_map(|p| p.as_ref().ok()) {
        if p.missing_dockerfile().is_none() && !by_repo.contains_key(p.repo.as_str()) {
            by_repo.insert(p.repo.to_string(), p.clone());
        }
    }
    // The broken ones, each under a name no other row has: its own, the last known or
    // the one its build.yml still says, else its directory. The workspace packages
    // among them (named as images) are still followed by their dependents.
    let mut broken_repos: BTreeSet<String> = BTreeSet::new();
    for (dir, pkg) in &ws.packages {
        let (name, error, archs) = match pkg {
            Ok(p) if by_repo.get(p.repo.as_str()).is_some_and(|q| q.dir == p.dir) => continue,
            Ok(p) => {
                let name = p.repo.to_string();
                let archs = p.arches.iter().map(|a| a.as_str().to_owned()).collect();
                match (p.missing_dockerfile(), by_repo.get(&name)) {
                    (Some(e), _) => (Some(name), e.to_string(), archs),
                    (None, Some(first)) => (
                        None,
                        format!(
                            "{}: image {name} is already built from {}; give one of them another image or org",
                            p.build_yml().display(),
                            first.dir.display()
                        ),
                        archs,
                    ),
                    (None, None) => continue,
                }
            }
            Err(e) => {
                let name = crate::workspace::spec::loose_repo_name(&dir.join(BUILD_YML))
                    .map(|r| r.to_string())
                    .or_else(|| known.get(dir).cloned());
                (name, e.to_string(), Vec::new())
            }
        };
        let taken = |n: &String| by_repo.contains_key(n) || broken_repos.contains(n);
        let name = match name.filter(|n| !taken(n)) {
            Some(n) => {
                broken_repos.insert(n.clone());
                n
            }
            None => dir_label(ws, dir),
        };
        errors.insert(dir.clone(), problem(name, dir, error, archs));
    }
    let repos: BTreeSet<String> = by_repo.keys().cloned().collect();
    // What a dependent may follow: the packages that plan, and the broken ones (whose
    // dependents then say which base is broken, not that it is missing from the cache).
    let followable: BTreeSet<String> = repos.union(&broken_repos).cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, p) in &by_repo {
        let deps = deps
            .entry(p.dir.clone())
            .or_insert_with(|| deps::followed(p, &followable))
            .clone();
        match deps {
            Ok(d) => {
                graph.insert(
                    name.clone(),
                    d.into_iter().filter(|r| followable.contains(r)).collect(),
                );
            }
            Err(e) => {
                let archs = p.arches.iter().map(|a| a.as_str().to_owned()).collect();
                errors.insert(
                    p.dir.clone(),
                    problem(name.clone(), &p.dir, e.to_string(), archs),
                );
                graph.insert(name.clone(), Vec::new());
            }
        }
    }
    let (order, broken) = deps::order(&graph);
    for (name, why) in broken {
        if let Some(p) = by_repo.get(&name) {
            let archs = p.arches.iter().map(|a| a.as_str().to_owned()).collect();
            errors.insert(p.dir.clone(), problem(name, &p.dir, why, archs));
        }
    }
    let mut planned: BTreeMap<String, Arc<Planned>> = BTreeMap::new();
    for name in order {
        let Some(p) = by_repo.get(&name) else {
            continue;
        };
        if errors.contains_key(&p.dir) {
            continue;
        }
        let archs = || p.arches.iter().map(|a| a.as_str().to_owned()).collect();
        let own = match tagger.hash(p) {
            Ok(h) => h,
            Err(e) => {
                errors.insert(
                    p.dir.clone(),
                    problem(name.clone(), &p.dir, e.to_string(), archs()),
                );
                continue;
            }
        };
        let mut dep_tags = Vec::new();
        let mut missing = None;
        for d in graph.get(&name).into_iter().flatten() {
            match planned.get(d) {
                Some(dp) => dep_tags.push((d.clone(), dp.tag.clone())),
                None => missing = Some(d.clone()),
            }
        }
        if let Some(d) = missing {
            // Dependencies come first in `order`: the base's error is known by now.
            let why = errors
                .values()
                .find(|b| b.package == d)
                .map_or_else(|| "it cannot be built".to_owned(), |b| b.error.clone());
            let error = format!(
                "{}: its base package {d} is broken (fix it first): {why}",
                p.dockerfile.display()
            );
            errors.insert(p.dir.clone(), problem(name.clone(), &p.dir, error, archs()));
            continue;
        }
        let rendered = p.spec.tag.render(&deps::fold(&own, &dep_tags));
        let tag: Tag = match rendered.parse() {
            Ok(t) => t,
            Err(e) => {
                let error = format!("{}: {e}", p.build_yml().display());
                errors.insert(p.dir.clone(), problem(name.clone(), &p.dir, error, archs()));
                continue;
            }
        };
        let mode = builders.mode_for(&name);
        let builder = choose_builder(mode, p);
        let git = tagger.git_meta(p);
        // When its files were read: before this plan if its hash was remembered.
        let at = tagger.read_at(p).map_or(at, |r| r.min(at));
        planned.insert(
            name,
            Arc::new(Planned {
                pkg: p.clone(),
                tag,
                deps: dep_tags,
                builder,
                auto: mode == BuilderMode::Auto,
                git,
                at,
            }),
        );
    }
    (planned, errors)
}

fn choose_builder(mode: BuilderMode, p: &Package) -> BuilderKind {
    match mode {
        BuilderMode::Native => BuilderKind::Native,
        BuilderMode::Docker => BuilderKind::Docker,
        BuilderMode::Auto => match Dockerfile::read(&p.dockerfile) {
            Ok(df) if native_supports(&df, Capabilities::host()).is_ok() => BuilderKind::Native,
            _ => BuilderKind::Docker,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &std::path::Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_follower_folds_its_base_tag_and_a_pinned_from_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "base/build.yml", "org: kiln\nimage: base\n");
        write(&ws, "base/Dockerfile", "FROM scratch\nCOPY f /f\n");
        write(&ws, "base/f", "one");
        write(&ws, "app/build.yml", "org: kiln\nimage: app\n");
        write(&ws, "app/Dockerfile", "FROM kiln/base\n");
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
