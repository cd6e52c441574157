//! The build context: what the engine sees of a package, sent as a tar stream.
//!
//! [`BuildContext::scan`] walks the package (and each `extra-sources` tree) once, applies
//! `.dockerignore`, and refuses anything that would let the engine read outside the
//! package: a symlink whose target leaves its tree. The tar is then written from that list
//! on a blocking task, straight into the request body ([`BuildContext::into_stream`]), so a
//! large package is never held in memory. Entries are sorted by name, owners are 0:0 and
//! names carry no user or group, so the same files always give the same stream.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::build::dockerignore::{DockerIgnore, IgnoreError, go_clean};

/// The name under which a Dockerfile that lives outside the package is added.
pub const OUTSIDE_DOCKERFILE_NAME: &str = ".kiln.Dockerfile";

/// Why a build context cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{link}: symlink to {target:?} leaves {tree}; the build context may only hold files \
         inside the package (copy the file in, or list its directory in extra-sources)"
    )]
    SymlinkEscapes {
        link: PathBuf,
        target: PathBuf,
        tree: PathBuf,
    },
    #[error("{path}: {source}")]
    Ignore {
        path: PathBuf,
        #[source]
        source: IgnoreError,
    },
    #[error(
        "extra-sources destination {dst:?} (from {src}) leaves the build context: give a \
         path inside it"
    )]
    BadDestination { src: PathBuf, dst: String },
    #[error("Dockerfile {path} is not a regular file")]
    DockerfileNotAFile { path: PathBuf },
    #[error("{path} changed while it was being sent to the engine (it was {expected} bytes)")]
    FileChanged { path: PathBuf, expected: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { src: PathBuf, size: u64 },
    Symlink { target: PathBuf },
}

#[derive(Debug, Clone)]
struct Entry {
    /// The path inside the context: relative, `/`-separated, no trailing `/`.
    name: String,
    kind: Kind,
    mode: u32,
    mtime: u64,
}

/// A scanned build context, ready to be streamed.
#[derive(Debug, Clone)]
pub struct BuildContext {
    entries: Vec<Entry>,
    dockerfile_name: String,
}

impl BuildContext {
    /// Scans `package_dir` (honouring its `.dockerignore`), the Dockerfile (`dockerfile`,
    /// absolute or relative to the package; the Dockerfile and `.dockerignore` are always
    /// sent, as Docker does, though `.dockerignore` may hide them from `COPY`), and each
    /// extra source tree `(src, dst)`, placed at `dst`.
    pub fn scan(
        package_dir: &Path,
        dockerfile: &Path,
        extra_sources: &[(PathBuf, String)],
    ) -> Result<BuildContext, ContextError> {
        let root = fs::canonicalize(package_dir).map_err(io_err(package_dir))?;
        let ignore_path = root.join(".dockerignore");
        let ignore = match fs::read_to_string(&ignore_path) {
            Ok(text) => DockerIgnore::parse(&text).map_err(|source| ContextError::Ignore {
                path: ignore_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
            Err(e) => return Err(io_err(&ignore_path)(e)),
        };

        let dockerfile_abs = if dockerfile.is_absolute() {
            dockerfile.to_owned()
        } else {
            root.join(dockerfile)
        };
        let dockerfile_real = fs::canonicalize(&dockerfile_abs).map_err(io_err(&dockerfile_abs))?;
        let dockerfile_meta = fs::metadata(&dockerfile_real).map_err(io_err(&dockerfile_real))?;
        if !dockerfile_meta.is_file() {
            return Err(ContextError::DockerfileNotAFile {
                path: dockerfile_abs,
            });
        }
        // A Dockerfile inside the package is named by its place there (found by its
        // lexical path, so a Dockerfile that is itself an in-package symlink still works).
        let inside = dockerfile_abs
            .strip_prefix(&root)
            .ok()
            .or_else(|| dockerfile_real.strip_prefix(&root).ok())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|rel| !rel.is_empty() && !go_clean(rel).starts_with(".."));

        let mut entries = Vec::new();
        let always: Vec<String> = [inside.clone(), Some(".dockerignore".to_owned())]
            .into_iter()
            .flatten()
            .map(|s| go_clean(&s))
            .collect();
        walk(&root, &root, "", &ignore, &always, &mut entries)?;

        for (src, dst) in extra_sources {
            // An absolute destination is a place in the context, as LinuxKit writes extra
            // sources into the context's tar (`../shared:/shared` is `shared/`), and as
            // the native builder reads them.
            let rooted = go_clean(dst);
            let dst_clean = match rooted.trim_start_matches('/') {
                "" => ".".to_owned(),
                rel => rel.to_owned(),
            };
            if dst_clean.starts_with("..") {
                return Err(ContextError::BadDestination {
                    src: src.clone(),
                    dst: dst.clone(),
                });
            }
            let src_real = fs::canonicalize(src).map_err(io_err(src))?;
            let prefix = if dst_clean == "." {
                String::new()
            } else {
                dst_clean.clone()
            };
            // The directories leading to `dst`.
            let mut parent = String::new();
            for part in prefix.split('/').filter(|p| !p.is_empty()) {
                parent = join(&parent, part);
                entries.push(Entry {
                    name: parent.clone(),
                    kind: Kind::Dir,
                    mode: 0o755,
                    mtime: 0,
                });
            }
            let meta = fs::metadata(&src_real).map_err(io_err(&src_real))?;
            if meta.is_dir() {
                let mut sub = Vec::new();
                walk(
                    &src_real,
                    &src_real,
                    "",
                    &DockerIgnore::default(),
                    &[],
                    &mut sub,
                )?;
                for mut e in sub {
                    e.name = join(&prefix, &e.name);
                    entries.push(e);
                }
            } else {
                let name = if prefix.is_empty() {
                    src_real
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                } else {
                    // The last component is the file's own name in the context.
                    entries.pop();
                    prefix.clone()
                };
                entries.push(Entry {
                    name,
                    kind: Kind::File {
                        src: src_real.clone(),
                        size: meta.len(),
                    },
                    mode: meta.permissions().mode() & 0o7777,
                    mtime: mtime(&meta),
                });
            }
        }

        // Extra sources are applied after the package's own files: `.dockerignore` then
        // filters the combined tree, as if they had been copied into the package.
        let dockerfile_name = match inside {
            Some(rel) => go_clean(&rel),
            None => {
                entries.push(Entry {
                    name: OUTSIDE_DOCKERFILE_NAME.to_owned(),
                    kind: Kind::File {
                        src: dockerfile_real.clone(),
                        size: dockerfile_meta.len(),
                    },
                    mode: 0o644,
                    mtime: mtime(&dockerfile_meta),
                });
                OUTSIDE_DOCKERFILE_NAME.to_owned()
            }
        };
        let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
        // Later entries (extra sources) replace earlier ones of the same name.
        entries.reverse();
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            if seen.insert(e.name.clone()) {
                kept.push(e);
            }
        }
        // An excluded directory is not sent even when an exception re-includes something
        // inside it (as Docker does): the unpacking side creates the missing parents.
        kept.retain(|e| {
            e.name == dockerfile_name || e.name == ".dockerignore" || !ignore.excludes(&e.name)
        });
        kept.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(BuildContext {
            entries: kept,
            dockerfile_name,
        })
    }

    /// The Dockerfile's path inside the context (the build's `dockerfile` parameter).
    pub fn dockerfile_name(&self) -> &str {
        &self.dockerfile_name
    }

    /// The context's paths, in tar order (for tests and logs).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The total size of the files in the context.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Writes the context as a tar to `w` (blocking).
    pub fn write_tar<W: Write>(&self, w: W) -> Result<(), ContextError> {
        let mut tar = tar::Builder::new(w);
        tar.mode(tar::HeaderMode::Deterministic);
        let broken = |source: io::Error| ContextError::Io {
            path: PathBuf::from("<build context stream>"),
            source,
        };
        for e in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.mode);
            h.set_mtime(e.mtime);
            h.set_uid(0);
            h.set_gid(0);
            match &e.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{}/", e.name), io::empty())
                        .map_err(broken)?;
                }
                Kind::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    tar.append_link(&mut h, &e.name, target).map_err(broken)?;
                }
                Kind::File { src, size } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(*size);
                    let f = fs::File::open(src).map_err(io_err(src))?;
                    let mut reader = Exact {
                        inner: f.take(*size),
                        left: *size,
                    };
                    if let Err(err) = tar.append_data(&mut h, &e.name, &mut reader) {
                        if err.kind() == io::ErrorKind::UnexpectedEof {
                            return Err(ContextError::FileChanged {
                                path: src.clone(),
                                expected: *size,
                            });
                        }
                        return Err(broken(err));
                    }
                }
            }
        }
        tar.into_inner().map_err(broken)?.flush().map_err(broken)?;
        Ok(())
    }

    /// Streams the tar from a blocking task. The stream ends with an error item if the
    /// tar cannot be written; dropping the stream stops the task.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(8);
        tokio::task::spawn_blocking(move || {
            let writer = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            if let Err(e) = self.write_tar(writer) {
                // A receiver that is gone (the build was dropped) needs no error.
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }
}

const CHUNK: usize = 256 * 1024;

struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the build was stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A reader that fails if its source ends before the promised size.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}/{b}"),
    }
}

fn mtime(meta: &fs::Metadata) -> u64 {
    u64::try_from(meta.mtime()).unwrap_or(0)
}

/// Walks `dir` (inside `tree`), adding entries named `rel/...`. Excluded directories are
/// skipped unless an exception might re-include something inside them.
fn walk(
    tree: &Path,
    dir: &Path,
    rel: &str,
    ignore: &DockerIgnore,
    always: &[String],
    out: &mut Vec<Entry>,
) -> Result<(), ContextError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let path = child.path();
        let name = join(rel, &child.file_name().to_string_lossy());
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let excluded = !always.contains(&name) && ignore.excludes(&name);
        let ft = meta.file_type();
        if ft.is_dir() {
            let holds_always = always.iter().any(|a| {
                a.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            });
            if excluded && !ignore.has_exclusions() && !holds_always {
                continue;
            }
            out.push(Entry {
                name: name.clone(),
                kind: Kind::Dir,
                mode: meta.permissions().mode() & 0o7777,
                mtime: mtime(&meta),
            });
            walk(tree, &path, &name, ignore, always, out)?;
        } else if excluded {
            continue;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err(&path))?;
            let resolved = go_clean(&join(rel_parent(&name), &target.to_string_lossy()));
            if target.is_absolute() || resolved == ".." || resolved.starts_with("../") {
                return Err(ContextError::SymlinkEscapes {
                    link: path,
                    target,
                    tree: tree.to_owned(),
                });
            }
            out.push(Entry {
                name,
                kind: Kind::Symlink { target },
                mode: 0o777,
                mtime: mtime(&meta),
            });
        } else if ft.is_file() {
            out.push(Entry {
                name,
                kind: Kind::File {
                    src: path,
                    size: meta.len(),
                },
                mode: meta.permissions().mode() & 0o7777,
                mtime: mtime(&meta),
            });
        } else {
            // Sockets, fifos and devices have no place in a build context (Docker skips
            // them too).
            tracing::debug!(path = %path.display(), "skipping a special file in the build context");
        }
    }
    Ok(())
}

fn rel_parent(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

#[cfg(test)]
mod tests;
