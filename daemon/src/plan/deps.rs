//! Workspace dependencies: which workspace packages a package's Dockerfile follows, the
//! order to build them in, and the tags that fold a dependency's tag into its dependents'.
//!
//! A `FROM` (or `COPY --from`) that names a workspace package as `org/image`, without a
//! tag or digest, follows that package: it is built first, and its tag is folded into
//! the dependent's, so a tag always names one content. A reference with a tag or digest
//! is pinned and stays as written, as in LinuxKit.

use std::collections::{BTreeMap, BTreeSet};

use kiln_shared::reference::Tag;
use sha1::{Digest as _, Sha1};

use crate::build::dockerfile::{Dockerfile, DockerfileError};
use crate::oci::Platform;
use crate::workspace::Package;

/// The `build.yml` build args as a map.
pub fn build_args(pkg: &Package) -> BTreeMap<String, String> {
    pkg.spec
        .build_args
        .iter()
        .map(|a| (a.key.clone(), a.value.clone()))
        .collect()
}

/// The untagged image names (`org/image`, without `docker.io/`) that `pkg`'s Dockerfile
/// names in `FROM` or `COPY --from` over all its arches, sorted, its own excluded: the
/// workspace packages among them are what it follows.
pub fn named(pkg: &Package, df: &Dockerfile) -> Result<Vec<String>, DockerfileError> {
    let args = build_args(pkg);
    let mut out = BTreeSet::new();
    for arch in &pkg.arches {
        let platform = Platform::linux(arch.as_str(), None);
        for r in df.image_references(&args, &platform)? {
            let name = r.value.strip_prefix("docker.io/").unwrap_or(&r.value);
            if name != pkg.repo.as_str() {
                out.insert(name.to_owned());
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Orders packages so that dependencies come first. Packages in a cycle (or depending on
/// one) are returned apart, each with a message naming the cycle.
pub fn order(deps: &BTreeMap<String, Vec<String>>) -> (Vec<String>, BTreeMap<String, String>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
        broken: &mut BTreeMap<String, String>,
    ) -> bool {
        match marks.get(n) {
            Some(Mark::Done) => return !broken.contains_key(n),
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle: Vec<&str> = stack[start..].iter().map(String::as_str).collect();
                cycle.push(n);
                let msg = format!(
                    "dependency cycle: {} (FROM lines follow each other in a circle; pin one of them to a tag)",
                    cycle.join(" -> ")
                );
                for c in &stack[start..] {
                    broken.insert(c.clone(), msg.clone());
                }
                return false;
            }
            None => {}
        }
        marks.insert(n.to_owned(), Mark::Visiting);
        stack.push(n.to_owned());
        let mut ok = true;
        for d in deps.get(n).into_iter().flatten() {
            if !visit(d, deps, marks, stack, out, broken) {
                ok = false;
                if !broken.contains_key(n) {
                    let why = broken
                        .get(d)
                        .cloned()
                        .unwrap_or_else(|| format!("dependency {d} cannot be built"));
                    broken.insert(n.to_owned(), format!("depends on {d}: {why}"));
                }
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        if ok && !broken.contains_key(n) {
            out.push(n.to_owned());
        }
        ok && !broken.contains_key(n)
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    let mut broken = BTreeMap::new();
    for n in deps.keys() {
        let mut stack = Vec::new();
        visit(n, deps, &mut marks, &mut stack, &mut out, &mut broken);
    }
    (out, broken)
}

/// The hash of a package that follows others: its own hash with the dependencies'
/// tags folded in (sha1, as LinuxKit folds extra sources). A package that follows none
/// keeps its own hash, so its tag equals `linuxkit pkg show-tag`'s. A dirty input keeps
/// the result recognisably dirty.
pub fn fold(own: &str, deps: &[(String, Tag)]) -> String {
    if deps.is_empty() {
        return own.to_owned();
    }
    let mut h = Sha1::new();
    h.update(own.as_bytes());
    for (repo, tag) in deps {
        h.update(b"\n");
        h.update(repo.as_bytes());
        h.update(b":");
        h.update(tag.as_str().as_bytes());
    }
    let hex = hex::encode(h.finalize());
    let dirty = own.contains("-dirty") || deps.iter().any(|(_, t)| t.as_str().contains("-dirty"));
    if dirty { format!("{hex}-dirty") } else { hex }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn dependencies_come_first() {
        let (order, broken) = order(&graph(&[
            ("app", &["base", "tools"]),
            ("tools", &["base"]),
            ("base", &[]),
            ("lone", &[]),
        ]));
        assert!(broken.is_empty());
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("base") < pos("tools") && pos("tools") < pos("app"));
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn a_cycle_is_named_and_blocks_only_its_members_and_dependents() {
        let (order, broken) = order(&graph(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &["a"]),
            ("e", &[]),
        ]));
        assert_eq!(order, ["e"]);
        assert!(broken["a"].contains("a -> b -> c -> a"), "{}", broken["a"]);
        assert!(broken["c"].contains("dependency cycle"), "{}", broken["c"]);
        assert!(broken["d"].starts_with("depends on a"), "{}", broken["d"]);
    }

    #[test]
    fn folding_changes_with_the_dependency_and_only_then() {
        let t = |s: &str| s.parse::<Tag>().unwrap();
        let own = "1bcf83268ece88f800dfb29e189a72d2513cb9ed";
        assert_eq!(fold(own, &[]), own);
        let a = fold(own, &[("kiln/base".into(), t("aaa"))]);
        let b = fold(own, &[("kiln/base".into(), t("bbb"))]);
        assert_ne!(a, b);
        assert_eq!(a, fold(own, &[("kiln/base".into(), t("aaa"))]));
        assert_eq!(a.len(), 40);
        assert!(fold(own, &[("kiln/base".into(), t("aaa-dirty-1234567"))]).ends_with("-dirty"));
    }
}
