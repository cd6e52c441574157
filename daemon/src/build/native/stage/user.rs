//! `user[:group]` to numeric ids through the image's own `/etc/passwd` and `/etc/group`.

use super::super::tree::Tree;

/// Resolves `user[:group]` (names or ids) through the tree's `/etc/passwd` and
/// `/etc/group`, as BuildKit does: a numeric user without a group gets gid = uid; a named
/// user without a group gets their primary group.
pub(in crate::build::native) fn resolve_user(
    tree: &Tree,
    spec: &str,
) -> Result<(u64, u64), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err("expected user[:group], with names or numeric ids".into());
    }
    let read = |file: &str| -> Result<String, String> {
        let p = tree.resolve(file, true, false).map_err(|e| e.to_string())?;
        let node = tree.get(&p).ok_or_else(|| {
            format!(
                "/{file} does not exist in the image, so names cannot be resolved; use numeric ids"
            )
        })?;
        let bytes = node.read_all().map_err(|e| format!("/{file}: {e}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let lookup = |file: &str, name: &str, field: usize| -> Result<Vec<u64>, String> {
        let text = read(file)?;
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() > field {
                let ids = f[2..=field]
                    .iter()
                    .map(|s| s.parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("/{file}: malformed line for {name}"))?;
                return Ok(ids);
            }
        }
        Err(format!("{name} is not in /{file}"))
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
