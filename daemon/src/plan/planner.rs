//! The planner's state between plans, so that a save costs what it changed, not what the
//! workspace holds: the workspace's shape (which directory is which `org/image`, who
//! follows whom, the build order, the problems found before tagging) is worked out again
//! only when a `build.yml` or Dockerfile changed or a package came or went, and a plan
//! re-tags only the packages whose files changed and the packages that follow them. Every
//! other package keeps its planned entry (the same `Arc`), and the plan says which names
//! it planned anew.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_shared::reference::{ImageRef, Tag};

use super::{BuilderMode, Builders, PackageProblem, PlanErrors, deps};
use crate::build::dockerfile::{Dockerfile, DockerfileError};
use crate::build::native::{Capabilities, native_supports};
use crate::workspace::{
    BUILD_YML, BuilderKind, Package, Planned, TagError, Tagger, Workspace, spec,
};

/// What a plan changed: the names planned anew, the broken packages, and which of those
/// to report (new errors, and those of the directories affected).
#[derive(Debug, Default)]
pub struct Tagged {
    /// Names whose planned entry may differ from the last plan's (re-tagged, new, broken
    /// now or gone), and those of the packages in the affected directories: look each up
    /// in [`Planner::planned`] (absent: no longer planned).
    pub touched: BTreeSet<String>,
    /// Every broken package, by directory.
    pub broken: PlanErrors,
    pub report: BTreeSet<PathBuf>,
}

/// What a package's Dockerfile says for planning, read once until a file of the package
/// changes.
#[derive(Debug, Clone)]
struct Read {
    /// The workspace packages it names (unfiltered: the workspace may gain them later).
    from: Result<Vec<String>, DockerfileError>,
    /// The builder `auto` picks.
    auto: BuilderKind,
    missing: Option<String>,
}

/// The workspace's shape: what plans before any tag is computed.
#[derive(Debug, Default)]
struct Shape {
    /// The package each planned name is built from, by name, and the other way.
    dirs: BTreeMap<String, PathBuf>,
    names: BTreeMap<PathBuf, String>,
    /// What each name follows, and what follows it.
    follows: BTreeMap<String, Vec<String>>,
    followers: BTreeMap<String, Vec<String>>,
    /// Dependencies first, and each name's place in that order.
    order: Vec<String>,
    position: HashMap<String, usize>,
    /// The problems found before tagging (names, Dockerfiles, cycles), by directory.
    errors: PlanErrors,
}

/// The planner's state: the workspace, its tagger, and what it remembers between plans.
pub struct Planner {
    ws: Workspace,
    tagger: Tagger,
    builders: Builders,
    /// What each package directory's Dockerfile says (dropped when the directory changes).
    read: BTreeMap<PathBuf, Read>,
    /// The workspace's shape; `None` once a package came, went or was read again.
    shape: Option<Shape>,
    /// The packages planned and the broken ones, as of the last plan.
    planned: BTreeMap<String, Arc<Planned>>,
    broken: PlanErrors,
    /// Errors already reported, so that an unchanged broken package is not repeated.
    reported: PlanErrors,
    /// The name each package directory had when its build.yml last loaded.
    known: BTreeMap<PathBuf, String>,
    /// Directories read while they were written: tagged again by the next plan.
    forgotten: BTreeSet<PathBuf>,
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
            read: BTreeMap::new(),
            shape: None,
            planned: BTreeMap::new(),
            broken: PlanErrors::new(),
            reported: PlanErrors::new(),
            known: BTreeMap::new(),
            forgotten: BTreeSet::new(),
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
        (self.planned.clone(), errors)
    }

    /// Every package directory.
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.ws.packages.keys().cloned().collect()
    }

    /// The packages as last planned, by name.
    pub fn planned(&self) -> &BTreeMap<String, Arc<Planned>> {
        &self.planned
    }

    /// Takes in changed paths: re-reads the packages they touch and forgets their
    /// hashes. Returns the package directories affected. Blocking.
    pub fn changed(&mut self, paths: &[PathBuf]) -> BTreeSet<PathBuf> {
        let reloaded = self.ws.reload(paths);
        if !reloaded.is_empty() {
            self.shape = None;
        }
        let mut affected: BTreeSet<PathBuf> = reloaded.into_iter().collect();
        affected.extend(self.tagger.invalidate(paths));
        for dir in &affected {
            self.read.remove(dir);
        }
        affected
    }

    /// Forgets the hashes of the packages in `dirs` (read while they were being
    /// written): the next plan reads them again.
    pub fn forget(&mut self, dirs: &BTreeSet<PathBuf>) {
        for dir in dirs {
            self.read.remove(dir);
        }
        // What they follow may have been read half-written.
        self.shape = None;
        let list: Vec<PathBuf> = dirs.iter().cloned().collect();
        self.tagger.invalidate(&list);
        self.forgotten.extend(dirs.iter().cloned());
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
        self.read.clear();
        self.shape = None;
    }

    /// The tag of the package in `dir` when it has no Dockerfile: from its own files
    /// alone, as `linuxkit pkg show-tag` prints it. None when it has one, or when no
    /// package loads there.
    pub fn without_dockerfile(&mut self, dir: &Path) -> Option<Result<ImageRef, TagError>> {
        match self.ws.packages.get(dir) {
            Some(Ok(p)) if p.missing_dockerfile().is_some() => Some(self.tagger.image_ref(p)),
            _ => None,
        }
    }

    /// Plans the packages in `affected`, those whose entries a commit, checkout or `git
    /// add` changed, and the packages that follow any of them; every other package keeps
    /// its entry. The whole workspace is planned again when its shape changed (a package
    /// came, went or has a new `build.yml` or Dockerfile) or a HEAD moved, still keeping
    /// the entries whose files and bases did not change. Blocking: reads files.
    pub fn tag(&mut self, affected: &BTreeSet<PathBuf>) -> Tagged {
        let at = std::time::Instant::now();
        let refreshed = self.tagger.refresh();
        let mut dirty: BTreeSet<PathBuf> = affected.clone();
        dirty.extend(refreshed.forgotten);
        dirty.append(&mut self.forgotten);
        if refreshed.all {
            dirty.extend(self.ws.packages.keys().cloned());
        }
        let whole = self.shape.is_none() || refreshed.all;
        if self.shape.is_none() {
            self.shape = Some(self.shape_of());
            self.known.retain(|d, _| self.ws.packages.contains_key(d));
            for (dir, p) in &self.ws.packages {
                if let Ok(p) = p {
                    self.known.insert(dir.clone(), p.repo.to_string());
                }
            }
        }
        let Some(shape) = self.shape.as_ref() else {
            return Tagged::default();
        };

        // The names to plan, dependencies first: all of them, or those of the dirty
        // directories and everything that follows them.
        let visit: Vec<String> = if whole {
            shape.order.clone()
        } else {
            let mut seen: BTreeSet<&String> = BTreeSet::new();
            let mut stack: Vec<&String> = dirty.iter().filter_map(|d| shape.names.get(d)).collect();
            while let Some(n) = stack.pop() {
                if seen.insert(n) {
                    stack.extend(shape.followers.get(n).into_iter().flatten());
                }
            }
            let mut v: Vec<String> = seen
                .into_iter()
                .filter(|n| shape.position.contains_key(*n))
                .cloned()
                .collect();
            v.sort_by_key(|n| shape.position.get(n).copied().unwrap_or(usize::MAX));
            v
        };

        let mut errors: PlanErrors = if whole {
            shape.errors.clone()
        } else {
            let mut e = std::mem::take(&mut self.broken);
            for n in &visit {
                if let Some(d) = shape.dirs.get(n) {
                    if !shape.errors.contains_key(d) {
                        e.remove(d);
                    }
                }
            }
            e
        };
        let mut planned = if whole {
            BTreeMap::new()
        } else {
            std::mem::take(&mut self.planned)
        };
        let previous = if whole {
            std::mem::take(&mut self.planned)
        } else {
            BTreeMap::new()
        };
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for name in visit {
            let Some(dir) = shape.dirs.get(&name) else {
                continue;
            };
            let old = if whole {
                previous.get(&name).cloned()
            } else {
                planned.remove(&name)
            };
            if shape.errors.contains_key(dir) {
                if old.is_some() {
                    touched.insert(name);
                }
                continue;
            }
            let Some(Ok(p)) = self.ws.packages.get(dir) else {
                continue;
            };
            let mut dep_tags = Vec::new();
            let mut missing = None;
            for d in shape.follows.get(&name).into_iter().flatten() {
                match planned.get(d) {
                    Some(dp) => dep_tags.push((d.clone(), dp.tag.clone())),
                    None => missing = Some(d.clone()),
                }
            }
            // Untouched files and the same bases: the same plan.
            if let Some(old) = old.filter(|o| {
                !dirty.contains(dir) && missing.is_none() && o.pkg.dir == *dir && o.deps == dep_tags
            }) {
                planned.insert(name, old);
                continue;
            }
            touched.insert(name.clone());
            let problem = |error: String| PackageProblem {
                package: name.clone(),
                dir: dir.clone(),
                error,
                archs: p.arches.iter().map(|a| a.as_str().to_owned()).collect(),
            };
            if let Some(d) = missing {
                // Dependencies come first: the base's error is known by now.
                let why = errors
                    .values()
                    .find(|b| b.package == d)
                    .map_or_else(|| "it cannot be built".to_owned(), |b| b.error.clone());
                let error = format!(
                    "{}: its base package {d} is broken (fix it first): {why}",
                    p.dockerfile.display()
                );
                errors.insert(dir.clone(), problem(error));
                continue;
            }
            let own = match self.tagger.hash(p) {
                Ok(h) => h,
                Err(e) => {
                    errors.insert(dir.clone(), problem(e.to_string()));
                    continue;
                }
            };
            let rendered = p.spec.tag.render(&deps::fold(&own, &dep_tags));
            let tag: Tag = match rendered.parse() {
                Ok(t) => t,
                Err(e) => {
                    let error = format!("{}: {e}", p.build_yml().display());
                    errors.insert(dir.clone(), problem(error));
                    continue;
                }
            };
            let mode = self.builders.mode_for(&name);
            let builder = match mode {
                BuilderMode::Native => BuilderKind::Native,
                BuilderMode::Docker => BuilderKind::Docker,
                BuilderMode::Auto => Self::read_of(&mut self.read, p).auto,
            };
            let git = self.tagger.git_meta(p);
            // When its files were read: before this plan if its hash was remembered.
            let at = self.tagger.read_at(p).map_or(at, |r| r.min(at));
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
        // Gone from the plan: a package removed, renamed or broken at the shape.
        touched.extend(
            previous
                .keys()
                .filter(|n| !planned.contains_key(*n))
                .cloned(),
        );
        for dir in affected {
            if let Some(Ok(p)) = self.ws.packages.get(dir) {
                touched.insert(p.repo.to_string());
            }
        }

        let report = errors
            .iter()
            .filter(|(dir, p)| self.reported.get(*dir) != Some(p) || affected.contains(*dir))
            .map(|(dir, _)| dir.clone())
            .collect();
        self.reported.clone_from(&errors);
        self.planned = planned;
        self.broken = errors.clone();
        Tagged {
            touched,
            broken: errors,
            report,
        }
    }

    /// What the package's Dockerfile says, read if not yet.
    fn read_of<'a>(read: &'a mut BTreeMap<PathBuf, Read>, p: &Package) -> &'a Read {
        read.entry(p.dir.clone()).or_insert_with(|| {
            let df = Dockerfile::read(&p.dockerfile);
            let auto = match &df {
                Ok(df) if native_supports(df, Capabilities::host()).is_ok() => BuilderKind::Native,
                _ => BuilderKind::Docker,
            };
            Read {
                from: df.and_then(|df| deps::named(p, &df)),
                auto,
                missing: p.missing_dockerfile().map(|e| e.to_string()),
            }
        })
    }

    /// Works out the workspace's shape: which package each name is built from, which
    /// packages are broken before tagging and why, who follows whom, and the order.
    fn shape_of(&mut self) -> Shape {
        for p in self.ws.packages.values().filter_map(|p| p.as_ref().ok()) {
            Self::read_of(&mut self.read, p);
        }
        let (ws, reads) = (&self.ws, &self.read);
        let mut errors = PlanErrors::new();
        let mut dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
        for p in ws.packages.values().filter_map(|p| p.as_ref().ok()) {
            let missing = reads.get(&p.dir).is_none_or(|r| r.missing.is_some());
            if !missing && !dirs.contains_key(p.repo.as_str()) {
                dirs.insert(p.repo.to_string(), p.dir.clone());
            }
        }
        // The broken ones, each under a name no other row has: its own, the last known or
        // the one its build.yml still says, else its directory. The workspace packages
        // among them (named as images) are still followed by their dependents.
        let mut broken_repos: BTreeSet<String> = BTreeSet::new();
        for (dir, pkg) in &ws.packages {
            let (name, error, archs) = match pkg {
                Ok(p) if dirs.get(p.repo.as_str()) == Some(&p.dir) => continue,
                Ok(p) => {
                    let name = p.repo.to_string();
                    let archs = p.arches.iter().map(|a| a.as_str().to_owned()).collect();
                    let missing = reads.get(dir).and_then(|r| r.missing.clone());
                    match (missing, dirs.get(&name)) {
                        (Some(e), _) => (Some(name), e, archs),
                        (None, Some(first)) => (
                            None,
                            format!(
                                "{}: image {name} is already built from {}; give one of them another image or org",
                                p.build_yml().display(),
                                first.display()
                            ),
                            archs,
                        ),
                        (None, None) => continue,
                    }
                }
                Err(e) => {
                    let name = spec::loose_repo_name(&dir.join(BUILD_YML))
                        .map(|r| r.to_string())
                        .or_else(|| self.known.get(dir).cloned());
                    (name, e.to_string(), Vec::new())
                }
            };
            let taken = |n: &String| dirs.contains_key(n) || broken_repos.contains(n);
            let package = match name.filter(|n| !taken(n)) {
                Some(n) => {
                    broken_repos.insert(n.clone());
                    n
                }
                None => dir_label(ws, dir),
            };
            errors.insert(
                dir.clone(),
                PackageProblem {
                    package,
                    dir: dir.clone(),
                    error,
                    archs,
                },
            );
        }
        // What a dependent may follow: the packages that plan, and the broken ones (whose
        // dependents then say which base is broken, not that it is missing from the cache).
        let followable = |n: &String| dirs.contains_key(n) || broken_repos.contains(n);
        let mut follows: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, dir) in &dirs {
            let Some(r) = reads.get(dir) else { continue };
            match &r.from {
                Ok(d) => {
                    let d = d.iter().filter(|r| followable(r) && *r != name).cloned();
                    follows.insert(name.clone(), d.collect());
                }
                Err(e) => {
                    let archs = match ws.packages.get(dir) {
                        Some(Ok(p)) => p.arches.iter().map(|a| a.as_str().to_owned()).collect(),
                        _ => Vec::new(),
                    };
                    errors.insert(
                        dir.clone(),
                        PackageProblem {
                            package: name.clone(),
                            dir: dir.clone(),
                            error: e.to_string(),
                            archs,
                        },
                    );
                    follows.insert(name.clone(), Vec::new());
                }
            }
        }
        let (order, cycles) = deps::order(&follows);
        for (name, why) in cycles {
            if let Some(Some(Ok(p))) = dirs.get(&name).map(|d| ws.packages.get(d)) {
                let archs = p.arches.iter().map(|a| a.as_str().to_owned()).collect();
                errors.insert(
                    p.dir.clone(),
                    PackageProblem {
                        package: name,
                        dir: p.dir.clone(),
                        error: why,
                        archs,
                    },
                );
            }
        }
        let mut followers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, deps) in &follows {
            for d in deps {
                followers.entry(d.clone()).or_default().push(name.clone());
            }
        }
        let position = order
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Shape {
            names: dirs.iter().map(|(n, d)| (d.clone(), n.clone())).collect(),
            dirs,
            follows,
            followers,
            order,
            position,
            errors,
        }
    }
}

/// A package directory as a row name when it has no name of its own: its path under its
/// workspace root (the root's own name for a package at the root).
fn dir_label(ws: &Workspace, dir: &Path) -> String {
    ws.roots
        .iter()
        .filter_map(|r| dir.strip_prefix(r).ok())
        .map(|rel| rel.to_string_lossy().into_owned())
        .find(|rel| !rel.is_empty())
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{base_and_app, write};

    fn git(ws: &Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(ws)
            .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    /// base, app (FROM kiln/base), and `n` packages that follow nothing, in git.
    fn workspace(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        base_and_app(&ws);
        for i in 0..n {
            write(
                &ws,
                &format!("p{i}/build.yml"),
                &format!("org: kiln\nimage: p{i}\n"),
            );
            write(
                &ws,
                &format!("p{i}/Dockerfile"),
                "FROM scratch\nCOPY f /f\n",
            );
            write(&ws, &format!("p{i}/f"), &format!("{i}"));
        }
        git(&ws, &["init", "-q"]);
        git(&ws, &["add", "-A"]);
        git(&ws, &["commit", "-q", "-m", "ws"]);
        let ws = std::fs::canonicalize(&ws).unwrap();
        (dir, ws)
    }

    /// [`workspace`] with a planner that has tagged every package.
    fn tagged(n: usize) -> (tempfile::TempDir, PathBuf, Planner) {
        let (dir, ws) = workspace(n);
        let mut planner = Planner::new(std::slice::from_ref(&ws), Builders::default());
        planner.tag(&planner.dirs());
        (dir, ws, planner)
    }

    /// Reports a change of `rel` to the planner and plans it, as kilnd does.
    fn save(planner: &mut Planner, ws: &Path, rel: &str) -> Tagged {
        let affected = planner.changed(&[ws.join(rel)]);
        planner.tag(&affected)
    }

    fn tag_of(planner: &Planner, name: &str) -> String {
        planner.planned()[name].tag.to_string()
    }

    #[test]
    fn a_save_plans_its_package_and_followers_and_keeps_every_other_entry() {
        let (_d, ws) = workspace(50);
        let mut planner = Planner::new(std::slice::from_ref(&ws), Builders::default());
        let first = planner.tag(&planner.dirs());
        assert_eq!(first.touched.len(), 52);
        let before = planner.planned().clone();
        let reads = planner.tagger.files_read();

        write(&ws, "base/f", "two");
        let t = save(&mut planner, &ws, "base/f");
        let names: Vec<&str> = t.touched.iter().map(String::as_str).collect();
        assert_eq!(names, ["kiln/app", "kiln/base"]);
        assert_ne!(
            tag_of(&planner, "kiln/base"),
            before["kiln/base"].tag.to_string()
        );
        assert_ne!(
            tag_of(&planner, "kiln/app"),
            before["kiln/app"].tag.to_string()
        );
        for (name, p) in &before {
            if name != "kiln/base" && name != "kiln/app" {
                assert!(
                    Arc::ptr_eq(p, &planner.planned()[name]),
                    "{name} planned again"
                );
            }
        }
        assert_eq!(
            planner.tagger.files_read() - reads,
            1,
            "only the saved file is read"
        );

        // A leaf: only itself.
        write(&ws, "p7/f", "changed");
        let t = save(&mut planner, &ws, "p7/f");
        assert_eq!(t.touched, BTreeSet::from(["kiln/p7".to_owned()]));

        // A revert gives back the earlier tags.
        write(&ws, "base/f", "one");
        write(&ws, "p7/f", "7");
        let affected = planner.changed(&[ws.join("base/f"), ws.join("p7/f")]);
        planner.tag(&affected);
        for (name, p) in &before {
            assert_eq!(tag_of(&planner, name), p.tag.to_string(), "{name}");
        }
    }

    #[test]
    fn a_gitignore_above_packages_tags_them_again() {
        let (_d, ws, mut planner) = tagged(3);
        let clean = tag_of(&planner, "kiln/p1");
        write(&ws, "p1/junk", "x");
        save(&mut planner, &ws, "p1/junk");
        assert!(tag_of(&planner, "kiln/p1").contains("-dirty-"));

        write(&ws, ".gitignore", "junk\n");
        let t = save(&mut planner, &ws, ".gitignore");
        assert_eq!(tag_of(&planner, "kiln/p1"), clean, "junk is ignored now");
        assert!(t.touched.contains("kiln/p1"));
    }

    #[test]
    fn git_add_and_commit_are_seen_without_a_changed_path() {
        let (_d, ws, mut planner) = tagged(3);
        write(&ws, "p1/f", "new");
        save(&mut planner, &ws, "p1/f");
        let dirty = tag_of(&planner, "kiln/p1");
        assert!(dirty.contains("-dirty-"), "{dirty}");
        let clean_p0 = planner.planned()["kiln/p0"].git.clone();

        // The watcher does not report what happens under .git.
        git(&ws, &["commit", "-q", "-am", "p1"]);
        let t = planner.tag(&BTreeSet::new());
        let clean = tag_of(&planner, "kiln/p1");
        assert!(!clean.contains("-dirty-"), "{clean}");
        assert!(t.touched.contains("kiln/p1"));
        assert_ne!(
            planner.planned()["kiln/p0"].git.clean_commit,
            clean_p0.clean_commit,
            "a new HEAD is every clean package's revision"
        );
    }

    #[test]
    fn a_base_broken_and_fixed_by_a_save_takes_its_followers_with_it() {
        let (_d, ws, mut planner) = tagged(2);
        let app = tag_of(&planner, "kiln/app");

        std::os::unix::fs::symlink("/etc/passwd", ws.join("base/escape")).unwrap();
        let t = save(&mut planner, &ws, "base/escape");
        assert!(!planner.planned().contains_key("kiln/base"));
        assert!(!planner.planned().contains_key("kiln/app"));
        assert!(t.touched.contains("kiln/base") && t.touched.contains("kiln/app"));
        let app_error = &t.broken[&ws.join("app")].error;
        assert!(
            app_error.contains("its base package kiln/base is broken")
                && app_error.contains("escape"),
            "{app_error}"
        );
        assert_eq!(t.report.len(), 2);

        std::fs::remove_file(ws.join("base/escape")).unwrap();
        let t = save(&mut planner, &ws, "base/escape");
        assert!(t.broken.is_empty(), "{:?}", t.broken);
        assert_eq!(tag_of(&planner, "kiln/app"), app);
    }

    #[test]
    fn a_dockerfile_edit_that_follows_another_package_plans_the_new_order() {
        let (_d, ws, mut planner) = tagged(2);
        let p1 = tag_of(&planner, "kiln/p1");
        write(&ws, "p1/Dockerfile", "FROM kiln/p0\nCOPY f /f\n");
        save(&mut planner, &ws, "p1/Dockerfile");
        assert_eq!(planner.planned()["kiln/p1"].deps[0].0, "kiln/p0");
        assert_ne!(tag_of(&planner, "kiln/p1"), p1);

        // p0's save now re-tags p1 too.
        write(&ws, "p0/f", "changed");
        let t = save(&mut planner, &ws, "p0/f");
        let names: Vec<&str> = t.touched.iter().map(String::as_str).collect();
        assert_eq!(names, ["kiln/p0", "kiln/p1"]);
    }
}
