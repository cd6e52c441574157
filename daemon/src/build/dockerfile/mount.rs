//! `RUN --mount=...` values, read as BuildKit's `instructions/commands_runmount.go` reads
//! them: comma-separated `key=value` fields (a field may be quoted), `type=bind` by
//! default, `target`/`dst`/`destination`, `source`/`src`, `from`, `ro`/`readonly`,
//! `rw`/`readwrite`, and per type `id`, `sharing`, `mode`, `uid`, `gid`, `size`.

use crate::cache::{SizeError, parse_size};

/// What a mount is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MountKind::Bind => "bind",
            MountKind::Cache => "cache",
            MountKind::Tmpfs => "tmpfs",
            MountKind::Secret => "secret",
            MountKind::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// One parsed `--mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountKind,
    /// Absolute or relative to the working directory, as written.
    pub target: String,
    /// A path in the context or in `from` (bind, cache).
    pub source: Option<String>,
    /// A stage or image to take `source` from (bind, cache).
    pub from: Option<String>,
    pub readonly: bool,
    /// The cache's id (the target by default).
    pub id: Option<String>,
    pub sharing: Sharing,
    /// Octal permission bits of a new cache directory (0755 by default).
    pub mode: Option<u32>,
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    /// Bytes of a tmpfs (unlimited when `None`).
    pub size: Option<u64>,
}

/// Why a `--mount` value is not one (BuildKit's `--mount` fields).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("unsupported mount type {0:?}")]
    Type(String),
    #[error("{key}={value}: expected true or false")]
    NotABool { key: String, value: String },
    #[error("{0} needs a value ({0}=...)")]
    NoValue(String),
    #[error("sharing={0}: expected shared, private or locked")]
    Sharing(String),
    #[error("mode={value}: expected an octal mode")]
    Mode {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("{key}={value}: expected a number")]
    Number {
        key: String,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("size: {0}")]
    Size(#[source] SizeError),
    #[error("unexpected key {0:?} in --mount")]
    Key(String),
    #[error("a mount needs a target (target=/path)")]
    NoTarget,
    #[error("a tmpfs mount takes no source or from")]
    TmpfsSource,
    #[error("unterminated quote")]
    Quote,
}

impl RunMount {
    /// Parses one `--mount` value (after variable expansion).
    pub fn parse(value: &str) -> Result<RunMount, MountError> {
        let fields = split_fields(value)?;
        let mut kind = MountKind::Bind;
        for f in &fields {
            if let Some(("type", t)) = f.split_once('=') {
                kind = match t {
                    "bind" => MountKind::Bind,
                    "cache" => MountKind::Cache,
                    "tmpfs" => MountKind::Tmpfs,
                    "secret" => MountKind::Secret,
                    "ssh" => MountKind::Ssh,
                    t => return Err(MountError::Type(t.to_owned())),
                };
            }
        }
        let mut m = RunMount {
            kind,
            target: String::new(),
            source: None,
            from: None,
            readonly: matches!(kind, MountKind::Bind | MountKind::Secret | MountKind::Ssh),
            id: None,
            sharing: Sharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            size: None,
        };
        for f in &fields {
            let (key, value) = match f.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
                None => (f.to_ascii_lowercase(), None),
            };
            let flag = |v: Option<&str>| match v {
                None | Some("true") => Ok(true),
                Some("false") => Ok(false),
                Some(v) => Err(MountError::NotABool {
                    key: key.clone(),
                    value: v.to_owned(),
                }),
            };
            let need = |v: Option<&str>| {
                v.map(str::to_owned)
                    .ok_or_else(|| MountError::NoValue(key.clone()))
            };
            match key.as_str() {
                "type" => {}
                "target" | "dst" | "destination" => m.target = need(value)?,
                "source" | "src" => m.source = Some(need(value)?),
                "from" => m.from = Some(need(value)?),
                "ro" | "readonly" => m.readonly = flag(value)?,
                "rw" | "readwrite" => m.readonly = !flag(value)?,
                "id" => m.id = Some(need(value)?),
                "sharing" => {
                    m.sharing = match need(value)?.as_str() {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        s => return Err(MountError::Sharing(s.to_owned())),
                    }
                }
                "mode" => {
                    let v = need(value)?;
                    m.mode = Some(
                        u32::from_str_radix(&v, 8)
                            .map_err(|source| MountError::Mode { value: v, source })?,
                    );
                }
                "uid" | "gid" => {
                    let v = need(value)?;
                    let n = v.parse::<u64>().map_err(|source| MountError::Number {
                        key: key.clone(),
                        value: v,
                        source,
                    })?;
                    if key == "uid" {
                        m.uid = Some(n);
                    } else {
                        m.gid = Some(n);
                    }
                }
                "size" => m.size = Some(parse_size(&need(value)?).map_err(MountError::Size)?),
                // Secret and ssh options: the native builder refuses those mounts.
                "required" | "env" => {}
                k => return Err(MountError::Key(k.to_owned())),
            }
        }
        if m.target.is_empty() && !matches!(m.kind, MountKind::Secret | MountKind::Ssh) {
            return Err(MountError::NoTarget);
        }
        if m.kind == MountKind::Tmpfs && (m.source.is_some() || m.from.is_some()) {
            return Err(MountError::TmpfsSource);
        }
        Ok(m)
    }
}

/// Comma-separated fields; a field may be quoted (`"a,b"`), as in a CSV record.
fn split_fields(value: &str) -> Result<Vec<String>, MountError> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(MountError::Quote);
    }
    fields.push(cur);
    Ok(fields
        .into_iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_buildkit_mount_fields() {
        let m = RunMount::parse("type=cache,target=/root/.cache,id=go,sharing=locked,mode=0700")
            .unwrap();
        assert_eq!(m.kind, MountKind::Cache);
        assert_eq!(m.target, "/root/.cache");
        assert_eq!(m.id.as_deref(), Some("go"));
        assert_eq!(m.sharing, Sharing::Locked);
        assert_eq!(m.mode, Some(0o700));
        assert!(!m.readonly);
        let b = RunMount::parse("target=/src,from=build,source=/out,rw").unwrap();
        assert_eq!(b.kind, MountKind::Bind);
        assert!(!b.readonly);
        assert_eq!(b.from.as_deref(), Some("build"));
        let t = RunMount::parse("type=tmpfs,dst=/tmp,size=64m").unwrap();
        assert_eq!(t.size, Some(64 << 20));
        let t = RunMount::parse("type=tmpfs,dst=/tmp,size=1.5g").unwrap();
        assert_eq!(t.size, Some(3 << 29));
        assert_eq!(
            RunMount::parse("type=cache").unwrap_err(),
            MountError::NoTarget
        );
        assert!(matches!(
            RunMount::parse("type=tmpfs,target=/t,size=big"),
            Err(MountError::Size(_))
        ));
        assert_eq!(
            RunMount::parse("type=nfs,target=/x").unwrap_err(),
            MountError::Type("nfs".into())
        );
        assert_eq!(
            RunMount::parse("target=/x,bogus=1").unwrap_err(),
            MountError::Key("bogus".into())
        );
    }
}
