//! git's formats as kiln reads and writes them: the stat data of `git ls-files
//! --debug`, NUL-separated records, blob ids, and path quoting as `core.quotePath` does.

use std::collections::BTreeMap;
use std::path::Path;

use super::GitError;

/// What `git ls-files --debug` shows of an entry's stat data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStat {
    pub ctime_ns: i128,
    pub mtime_ns: i128,
    pub ino: u64,
    pub size: u64,
}

/// Splits a `ls-files -z --debug` chunk into the five debug lines of the previous
/// record (if one is expected) and the next record.
pub(super) fn split_debug(chunk: &[u8], expect_debug: bool) -> (Option<&[u8]>, &[u8]) {
    if !expect_debug {
        return (None, chunk);
    }
    let mut end = 0;
    for _ in 0..5 {
        match chunk[end..].iter().position(|&b| b == b'\n') {
            Some(i) => end += i + 1,
            None => return (None, &chunk[chunk.len()..]),
        }
    }
    (Some(&chunk[..end]), &chunk[end..])
}

/// Parses "  ctime: S:NS\n  mtime: S:NS\n  dev: D\tino: I\n  uid: U\tgid: G\n  size: Z\tflags: F\n".
pub(super) fn parse_index_stat(debug: &[u8]) -> Option<IndexStat> {
    let text = std::str::from_utf8(debug).ok()?;
    let mut st = IndexStat {
        ctime_ns: -1,
        mtime_ns: -1,
        ino: 0,
        size: 0,
    };
    let time = |v: &str| -> Option<i128> {
        let (s, ns) = v.split_once(':')?;
        Some(s.parse::<i128>().ok()? * 1_000_000_000 + ns.parse::<i128>().ok()?)
    };
    let mut seen = 0;
    for field in text
        .split(['\n', '\t'])
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        let (k, v) = field.split_once(": ")?;
        match k {
            "ctime" => st.ctime_ns = time(v)?,
            "mtime" => st.mtime_ns = time(v)?,
            "ino" => st.ino = v.parse().ok()?,
            "size" => st.size = v.parse().ok()?,
            _ => continue,
        }
        seen += 1;
    }
    (seen == 4).then_some(st)
}

/// `rel/` (or empty for the top).
pub fn dir_prefix(rel: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p
}

pub(super) fn parse_record(
    rec: &[u8],
    top: &Path,
    what: &str,
) -> Result<(u32, String, Vec<u8>), GitError> {
    let bad = || GitError {
        dir: top.to_owned(),
        args: what.to_owned(),
        message: format!("cannot read record {:?}", String::from_utf8_lossy(rec)),
    };
    let tab = rec.iter().position(|&b| b == b'\t').ok_or_else(bad)?;
    let head = std::str::from_utf8(&rec[..tab]).map_err(|_| bad())?;
    let mut f = head.split(' ');
    let mode = u32::from_str_radix(f.next().ok_or_else(bad)?, 8).map_err(|_| bad())?;
    let second = f.next().ok_or_else(bad)?;
    // ls-tree: "<mode> <type> <oid>"; ls-files -s: "<mode> <oid> <stage>".
    let oid = if what == "ls-tree" {
        f.next().ok_or_else(bad)?
    } else {
        second
    };
    Ok((mode, oid.to_owned(), rec[tab + 1..].to_vec()))
}

pub(super) fn diff_keys<V: PartialEq>(
    old: &BTreeMap<Vec<u8>, V>,
    new: &BTreeMap<Vec<u8>, V>,
    out: &mut Vec<Vec<u8>>,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(k.clone());
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(k.clone());
        }
    }
}

/// git's blob id of some content: sha1 of `blob <len>\0<content>`.
pub fn blob_oid(content: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    hex::encode(h.finalize())
}

/// How `git ls-files` prints a path with `core.quotePath` on (git's `quote_c_style`):
/// quoted, with C escapes, if it holds `"`, `\`, a control byte or a byte >= 0x80.
/// With `core.quotePath` off (`quote_high` false), bytes >= 0x80 pass through.
pub fn quote_path(name: &[u8], quote_high: bool) -> Vec<u8> {
    let special =
        |b: u8| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f || (quote_high && b > 0x7f);
    let needs = name.iter().any(|&b| special(b));
    if !needs {
        return name.to_vec();
    }
    let mut out = vec![b'"'];
    for &b in name {
        let esc: Option<u8> = match b {
            0x07 => Some(b'a'),
            0x08 => Some(b'b'),
            b'\t' => Some(b't'),
            b'\n' => Some(b'n'),
            0x0b => Some(b'v'),
            0x0c => Some(b'f'),
            b'\r' => Some(b'r'),
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            _ => None,
        };
        match esc {
            Some(e) => out.extend_from_slice(&[b'\\', e]),
            None if special(b) => {
                out.extend_from_slice(format!("\\{b:03o}").as_bytes());
            }
            None => out.push(b),
        }
    }
    out.push(b'"');
    out
}
