//! A package as planned: its tag, the workspace packages it follows, its builder. The
//! planner writes the package table; the control layer and the runner read it. It lives
//! here, below both, so that neither has to know the other.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use kiln_shared::reference::{ImageRef, Tag};

use super::{GitMeta, Package};

/// The builder chosen for one package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderKind {
    Native,
    Docker,
}

impl BuilderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuilderKind::Native => "native",
            BuilderKind::Docker => "docker",
        }
    }
}

/// A package as planned: what the runner builds.
#[derive(Debug, Clone)]
pub struct Planned {
    pub pkg: Package,
    pub tag: Tag,
    /// The workspace packages it follows, at their current tags.
    pub deps: Vec<(String, Tag)>,
    pub builder: BuilderKind,
    /// `auto` chose the builder (see `schedule::Job::fallback`).
    pub auto: bool,
    /// What LinuxKit's build args and labels take from git.
    pub git: GitMeta,
    /// When its files were read for the tag (just before): a build must not land if one
    /// of them changed after this (see `watch::Touched`).
    pub at: std::time::Instant,
}

impl Planned {
    pub fn image(&self) -> ImageRef {
        ImageRef::new(self.pkg.repo.clone(), self.tag.clone())
    }

    pub fn archs(&self) -> Vec<String> {
        self.pkg
            .arches
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect()
    }
}

/// The packages as last planned, by repository (`org/image`).
pub type PackageTable = RwLock<BTreeMap<String, Arc<Planned>>>;
