//! `RUN --mount`s made ready for the runtime: a cache mount is a directory kept under
//! `<cache>/.kiln/cache-mounts/`, one per id and architecture (what one arch's build
//! puts there is of no use, or harm, to another's), shared by every build (`sharing=
//! locked` and `private` hold a lock on it for the step); a tmpfs is a fresh tmpfs; a bind
//! mount from the build context is the context's directory or file, read-only unless
//! `rw` (writes then land in a copy, never in the package). What each mount contributes
//! to the step's cache key: a cache mount only its target (its content is a cache), a
//! bind mount the content it shows.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};

use super::runtime::ExtraMount;
use super::snapshot::Snapshots;
use super::tree::{clean, join};
use crate::build::dockerfile::{MountKind, RunMount, Sharing};

/// Why a mount cannot be made: refused (the docker builder can do it) or failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let what = what.into();
    move |source| MountError::Io { what, source }
}

/// The mounts of one step, held for as long as the step runs (locks, copies).
#[derive(Debug, Default)]
pub struct MountPlan {
    pub mounts: Vec<ExtraMount>,
    /// What the mounts contribute to the step's cache key.
    pub key: Vec<String>,
    _locks: Vec<Flock<File>>,
}

/// Prepares `parsed` for a step whose working directory is `cwd`, on the architecture
/// `arch`, in a build whose context is `context`; `from_roots` holds, for each `from=`
/// of a bind mount, the mounted root of that stage or image and its chain ID.
pub fn plan(
    parsed: &[RunMount],
    cwd: &str,
    arch: &str,
    snapshots: &Snapshots,
    context: &Path,
    from_roots: &BTreeMap<String, (PathBuf, String)>,
) -> Result<MountPlan, MountError> {
    let mut plan = MountPlan::default();
    for m in parsed {
        let target = if m.target.starts_with('/') {
            format!("/{}", clean(&m.target))
        } else {
            format!("/{}", clean(&join(&clean(cwd), &m.target)))
        };
        if target == "/" {
            return Err(MountError::Invalid(
                "a mount cannot replace the root (target=/)".into(),
            ));
        }
        match m.kind {
            MountKind::Secret | MountKind::Ssh => {
                return Err(MountError::Refused(format!(
                    "RUN --mount=type={} is not supported by the native builder",
                    m.kind.as_str()
                )));
            }
            MountKind::Tmpfs => {
                plan.key.push(format!("tmpfs:{target}:{:?}", m.size));
                plan.mounts.push(ExtraMount::Tmpfs {
                    target,
                    size: m.size,
                });
            }
            MountKind::Cache => {
                if m.from.is_some() {
                    return Err(MountError::Refused(
                        "RUN --mount=type=cache,from=... is not supported by the native builder"
                            .into(),
                    ));
                }
                let id = m.id.clone().unwrap_or_else(|| target.clone());
                let name = hex::encode(Sha256::digest(format!("{id}\0{arch}")));
                let base = snapshots
                    .work_dir()
                    .parent()
                    .unwrap_or(snapshots.work_dir())
                    .join("cache-mounts");
                let dir = base.join(&name);
                if !dir.is_dir() {
                    fs::create_dir_all(&base)
                        .map_err(io_err(format!("creating {}", base.display())))?;
                    let tmp = base.join(format!(".{name}.tmp-{}", std::process::id()));
                    let _ = fs::remove_dir_all(&tmp);
                    fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(m.mode.unwrap_or(0o755)))
                        .map_err(io_err(format!("chmod {}", tmp.display())))?;
                    std::os::unix::fs::chown(
                        &tmp,
                        Some(m.uid.unwrap_or(0) as u32),
                        Some(m.gid.unwrap_or(0) as u32),
                    )
                    .map_err(io_err(format!("chown {}", tmp.display())))?;
                    if fs::rename(&tmp, &dir).is_err() {
                        let _ = fs::remove_dir_all(&tmp);
                    }
                }
                if matches!(m.sharing, Sharing::Locked | Sharing::Private) {
                    let lock_path = base.join(format!("{name}.lock"));
                    let f = File::create(&lock_path)
                        .map_err(io_err(format!("creating {}", lock_path.display())))?;
                    let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| {
                        MountError::Io {
                            what: format!("locking {}", lock_path.display()),
                            source: e.into(),
                        }
                    })?;
                    plan._locks.push(lock);
                }
                plan.key.push(format!("cache:{target}"));
                plan.mounts.push(ExtraMount::Bind {
                    target,
                    source: dir,
                    readonly: m.readonly,
                });
            }
            MountKind::Bind => {
                if !m.readonly {
                    return Err(MountError::Refused(
                        "RUN --mount=type=bind,rw is not supported by the native builder yet"
                            .into(),
                    ));
                }
                let rel = clean(m.source.as_deref().unwrap_or("."));
                let (base, identity) = match &m.from {
                    Some(from) => {
                        let (root, chain) = from_roots.get(from).ok_or_else(|| {
                            MountError::Invalid(format!("--mount from={from}: not prepared"))
                        })?;
                        (root.as_path(), Some(chain))
                    }
                    None => (context, None),
                };
                let root = base
                    .canonicalize()
                    .map_err(io_err(format!("the mount source {}", base.display())))?;
                let source = root.join(&rel).canonicalize().map_err(io_err(format!(
                    "--mount source {rel:?} in the build context"
                )))?;
                if !source.starts_with(&root) {
                    return Err(MountError::Invalid(format!(
                        "--mount source {rel:?} leads outside {}",
                        m.from.as_deref().unwrap_or("the build context")
                    )));
                }
                // A stage's or image's content is its chain ID; the context's is hashed.
                let digest = match identity {
                    Some(chain) => format!("{chain}:{rel}"),
                    None => content_hash(&source)
                        .map_err(io_err(format!("reading {}", source.display())))?,
                };
                plan.key.push(format!("bind:{target}:{digest}"));
                plan.mounts.push(ExtraMount::Bind {
                    target,
                    source,
                    readonly: true,
                });
            }
        }
    }
    Ok(plan)
}

/// A hash of the names, modes, owners and contents under `path`.
fn content_hash(path: &Path) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(path.to_owned(), String::new())];
    while let Some((p, rel)) = stack.pop() {
        let m = p.symlink_metadata()?;
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(m.mode().to_le_bytes());
        h.update(m.uid().to_le_bytes());
        h.update(m.gid().to_le_bytes());
        if m.is_dir() {
            let mut names: Vec<String> = fs::read_dir(&p)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for n in names.into_iter().rev() {
                stack.push((p.join(&n), join(&rel, &n)));
            }
        } else if m.file_type().is_symlink() {
            h.update(fs::read_link(&p)?.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            let mut f = File::open(&p)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}
