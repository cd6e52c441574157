//! A package: a directory with a valid `build.yml`, its paths resolved and checked
//! against the file system (the Dockerfile inside the package, extra sources inside
//! the workspace root, no symlink escaping).

use std::path::{Component, Path, PathBuf};

use kiln_shared::reference::RepoName;
use kiln_shared::spec::{Arch, BuildSpec};

use super::spec::{SpecError, parse_build_yml};

/// The name of the file that makes a directory a package.
pub const BUILD_YML: &str = "build.yml";

/// A package that kiln can tag and build.
#[derive(Debug, Clone, PartialEq)]
pub struct Package {
    /// The package directory, canonical.
    pub dir: PathBuf,
    /// The workspace root it was found under, canonical.
    pub root: PathBuf,
    pub spec: BuildSpec,
    /// `org/image`.
    pub repo: RepoName,
    /// The Dockerfile, absolute and inside `dir`.
    pub dockerfile: PathBuf,
    pub arches: Vec<Arch>,
    /// Extra source directories (absolute, canonical) and where they go in the build
    /// context (a clean Unix path).
    pub extra_sources: Vec<(PathBuf, String)>,
}

/// Why a directory with a `build.yml` is not a usable package.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    #[error("{}: cannot read: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{}: org/image is not a valid repository name: {message}", file.display())]
    Name { file: PathBuf, message: String },
    #[error("{}: dockerfile {path:?}: {reason}", file.display())]
    Dockerfile {
        file: PathBuf,
        path: String,
        reason: String,
    },
    #[error("{}: extra-sources {source_spec:?}: {reason}", file.display())]
    ExtraSource {
        file: PathBuf,
        source_spec: String,
        reason: String,
    },
    #[error("package {} disappeared while it was read", dir.display())]
    Vanished { dir: PathBuf },
}

fn io_err(path: &Path, e: &std::io::Error) -> PackageError {
    PackageError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Lexically normalises an absolute path (`.` and `..` removed).
pub fn clean_abs(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

impl Package {
    /// Loads the package in `dir`, found under workspace root `root`.
    pub fn load(dir: &Path, root: &Path) -> Result<Package, PackageError> {
        let dir = match std::fs::canonicalize(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PackageError::Vanished {
                    dir: dir.to_owned(),
                });
            }
            Err(e) => return Err(io_err(dir, &e)),
        };
        let root = std::fs::canonicalize(root).map_err(|e| io_err(root, &e))?;
        Package::load_canonical(dir, root)
    }

    /// [`Package::load`] for a `dir` and `root` that are already canonical (as the
    /// workspace walk gives them: it follows no symlinks).
    pub fn load_canonical(dir: PathBuf, root: PathBuf) -> Result<Package, PackageError> {
        let file = dir.join(BUILD_YML);
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PackageError::Vanished { dir });
            }
            Err(e) => return Err(io_err(&file, &e)),
        };
        let spec = parse_build_yml(&file, &text)?;
        let repo = spec.repo_name().map_err(|e| PackageError::Name {
            file: file.clone(),
            message: e.to_string(),
        })?;

        // The Dockerfile: a file inside the package, also after resolving symlinks.
        let df_err = |reason: String| PackageError::Dockerfile {
            file: file.clone(),
            path: spec.dockerfile.to_string(),
            reason,
        };
        let dockerfile = clean_abs(&dir.join(spec.dockerfile.as_str()));
        // A plain file named directly in the package needs no symlink resolution.
        let direct = dockerfile.parent() == Some(dir.as_path())
            && dockerfile.symlink_metadata().is_ok_and(|m| m.is_file());
        let resolved = if direct {
            Ok(dockerfile.clone())
        } else {
            std::fs::canonicalize(&dockerfile)
        };
        let real = match resolved {
            Ok(real) => real,
            // A package without its Dockerfile still has a tag (its files' hash), as
            // `linuxkit pkg show-tag` computes it; planning it says the file is missing
            // (`Package::missing_dockerfile`).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dockerfile.clone(),
            Err(e) => return Err(df_err(format!("cannot read {}: {e}", dockerfile.display()))),
        };
        // (A missing one is lexically inside the package: `dockerfile` is a clean
        // relative path.)
        if real.exists() {
            if !real.starts_with(&dir) {
                return Err(df_err(format!(
                    "resolves to {}, outside the package: the Dockerfile must be inside {}",
                    real.display(),
                    dir.display()
                )));
            }
            if !real.is_file() {
                return Err(df_err(format!("{} is not a file", real.display())));
            }
        }

        // Extra sources: directories inside the workspace root. LinuxKit allows any
        // directory in a git repository; kiln must also watch it, so it stays in the root.
        let mut extra_sources = Vec::new();
        for es in &spec.extra_sources {
            let xs_err = |reason: String| PackageError::ExtraSource {
                file: file.clone(),
                source_spec: es.to_string(),
                reason,
            };
            let src = clean_abs(&dir.join(&es.src));
            let real = std::fs::canonicalize(&src)
                .map_err(|e| xs_err(format!("cannot resolve {}: {e}", src.display())))?;
            if !real.starts_with(&root) {
                return Err(xs_err(format!(
                    "{} leaves the workspace root {}: kiln only reads sources it watches",
                    real.display(),
                    root.display()
                )));
            }
            if !real.is_dir() {
                return Err(xs_err(format!(
                    "{} is not a directory: LinuxKit takes whole directories",
                    real.display()
                )));
            }
            extra_sources.push((real, es.dst.clone()));
        }

        Ok(Package {
            arches: spec.arches.clone(),
            dir,
            root,
            repo,
            dockerfile: real,
            extra_sources,
            spec,
        })
    }

    /// Why it cannot be built for want of its Dockerfile (none when the file is there).
    pub fn missing_dockerfile(&self) -> Option<PackageError> {
        (!self.dockerfile.exists()).then(|| PackageError::Dockerfile {
            file: self.build_yml(),
            path: self.spec.dockerfile.to_string(),
            reason: format!(
                "{} does not exist: create it or set `dockerfile` in build.yml",
                self.dockerfile.display()
            ),
        })
    }

    /// The build.yml path.
    pub fn build_yml(&self) -> PathBuf {
        self.dir.join(BUILD_YML)
    }
}
