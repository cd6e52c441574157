//! The build arguments and labels `linuxkit pkg build` adds on its own, so an image kiln
//! builds carries the same metadata as one LinuxKit builds.
//!
//! Build args (each only if `build.yml`'s `buildArgs` does not set it already):
//! - `SOURCE`: the package's `gitrepo`, when it has one;
//! - `REVISION`: the commit of `HEAD`, when the package is in git and clean;
//! - `GOPKGVERSION`: `HEAD`'s Go module version as LinuxKit makes it (see
//!   [`crate::workspace::git::Repo::go_pkg_version`]), when the package is in git;
//! - `PKG_HASH`: the package's tag (its content hash);
//! - `PKG_IMAGE`: the image name, `org/image`.
//!
//! Labels: `org.opencontainers.image.source` (the `gitrepo`, when the package is in git),
//! `org.opencontainers.image.revision` (the commit, when in git and clean) and
//! `org.mobyproject.config` (the `config` section of `build.yml` as JSON, when present).

use std::collections::BTreeMap;

/// What LinuxKit's automatic arguments and labels are made from (the workspace module
/// knows these; kiln's builder only formats them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinuxkitInfo {
    /// `org/image`.
    pub image: String,
    /// The package's tag (content hash).
    pub pkg_hash: String,
    /// `gitrepo` from `build.yml`.
    pub git_repo: Option<String>,
    /// Whether the package is in a git work tree.
    pub in_git: bool,
    /// The commit of `HEAD` when the package has no uncommitted changes.
    pub clean_commit: Option<String>,
    /// `HEAD`'s Go module version (set in git, clean or not).
    pub go_pkg_version: Option<String>,
    /// The `config` section of `build.yml`, serialised as JSON.
    pub config_json: Option<String>,
}

/// `buildArgs` from `build.yml` plus LinuxKit's automatic ones where the user set none.
pub fn linuxkit_build_args(
    info: &LinuxkitInfo,
    user: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut args = user.clone();
    let mut default = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            args.entry(k.to_owned()).or_insert_with(|| v.to_owned());
        }
    };
    default("SOURCE", info.git_repo.as_deref());
    default("REVISION", info.clean_commit.as_deref());
    default("GOPKGVERSION", info.go_pkg_version.as_deref());
    default("PKG_HASH", Some(&info.pkg_hash));
    default("PKG_IMAGE", Some(&info.image));
    args
}

/// The labels LinuxKit puts on a package image.
pub fn linuxkit_labels(info: &LinuxkitInfo) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if info.in_git {
        if let Some(repo) = &info.git_repo {
            labels.insert("org.opencontainers.image.source".to_owned(), repo.clone());
        }
        if let Some(commit) = &info.clean_commit {
            labels.insert(
                "org.opencontainers.image.revision".to_owned(),
                commit.clone(),
            );
        }
    }
    if let Some(config) = &info.config_json {
        labels.insert("org.mobyproject.config".to_owned(), config.clone());
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> LinuxkitInfo {
        LinuxkitInfo {
            image: "linuxkit/init".into(),
            pkg_hash: "45a1ad5919f0b6acf0f0cf730e9434abfae11fe6".into(),
            git_repo: Some("https://github.com/linuxkit/linuxkit".into()),
            in_git: true,
            clean_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            go_pkg_version: Some("v0.0.0-20240102030405-0123456789ab".into()),
            config_json: Some(r#"{"binds":["/a:/a"]}"#.into()),
        }
    }

    #[test]
    fn automatic_args_never_override_the_users() {
        let mut user = BTreeMap::new();
        user.insert("REVISION".to_owned(), "mine".to_owned());
        user.insert("OTHER".to_owned(), "x".to_owned());
        let args = linuxkit_build_args(&info(), &user);
        assert_eq!(args["REVISION"], "mine");
        assert_eq!(args["OTHER"], "x");
        assert_eq!(args["SOURCE"], "https://github.com/linuxkit/linuxkit");
        assert_eq!(args["GOPKGVERSION"], "v0.0.0-20240102030405-0123456789ab");
        assert_eq!(args["PKG_HASH"], "45a1ad5919f0b6acf0f0cf730e9434abfae11fe6");
        assert_eq!(args["PKG_IMAGE"], "linuxkit/init");
    }

    #[test]
    fn dirty_or_gitless_packages_get_fewer() {
        // Dirty: no revision; the Go version of HEAD still (as LinuxKit).
        let mut i = info();
        i.clean_commit = None;
        let args = linuxkit_build_args(&i, &BTreeMap::new());
        assert!(!args.contains_key("REVISION"));
        assert_eq!(args["GOPKGVERSION"], "v0.0.0-20240102030405-0123456789ab");
        let labels = linuxkit_labels(&i);
        assert!(labels.contains_key("org.opencontainers.image.source"));
        assert!(!labels.contains_key("org.opencontainers.image.revision"));
        // Outside git.
        i.in_git = false;
        i.git_repo = None;
        i.go_pkg_version = None;
        let args = linuxkit_build_args(&i, &BTreeMap::new());
        assert!(!args.contains_key("GOPKGVERSION") && !args.contains_key("SOURCE"));
        let labels = linuxkit_labels(&i);
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            ["org.mobyproject.config"]
        );
    }

    #[test]
    fn labels_of_a_clean_package() {
        let labels = linuxkit_labels(&info());
        assert_eq!(labels["org.mobyproject.config"], r#"{"binds":["/a:/a"]}"#);
        assert_eq!(
            labels["org.opencontainers.image.revision"],
            "0123456789abcdef0123456789abcdef01234567"
        );
    }
}
