//! `user[:group]` to numeric ids through the image's own `/etc/passwd` and `/etc/group`.

use super::super::tree::{ResolveError, Tree};

/// Why `user[:group]` does not resolve.
#[derive(Debug, thiserror::Error)]
pub(in crate::build::native) enum UserError {
    #[error("expected user[:group], with names or numeric ids")]
    Syntax,
    #[error("{0}")]
    Path(ResolveError),
    #[error("/{0} does not exist in the image, so names cannot be resolved; use numeric ids")]
    NoFile(&'static str),
    #[error("/{file}: {source}")]
    Read {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("/{file}: malformed line for {name}")]
    Malformed { file: &'static str, name: String },
    #[error("{name} is not in /{file}")]
    Unknown { file: &'static str, name: String },
}

/// Resolves `user[:group]` (names or ids) through the tree's `/etc/passwd` and
/// `/etc/group`, as BuildKit does: a numeric user without a group gets gid = uid; a named
/// user without a group gets their primary group.
pub(in crate::build::native) fn resolve_user(
    tree: &Tree,
    spec: &str,
) -> Result<(u64, u64), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(UserError::Syntax);
    }
    let read = |file: &'static str| -> Result<String, UserError> {
        let p = tree.resolve(file, true, false).map_err(UserError::Path)?;
        let node = tree.get(&p).ok_or(UserError::NoFile(file))?;
        let bytes = node
            .read_all()
            .map_err(|source| UserError::Read { file, source })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let lookup = |file: &'static str, name: &str, field: usize| -> Result<Vec<u64>, UserError> {
        let text = read(file)?;
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() > field {
                let ids = f[2..=field]
                    .iter()
                    .map(|s| s.parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| UserError::Malformed {
                        file,
                        name: name.to_owned(),
                    })?;
                return Ok(ids);
            }
        }
        Err(UserError::Unknown {
            file,
            name: name.to_owned(),
        })
    };
    let (uid, mut gid) = match user.parse::<u64>() {
        Ok(u) => (u, u),
        Err(_) => {
            let ids = lookup("etc/passwd", user, 3)?;
            (ids[0], ids[1])
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u64>() {
            Ok(g) => g,
            Err(_) => lookup("etc/group", g, 2)?[0],
        };
    }
    Ok((uid, gid))
}
