//! Unpacking one layer tar into a snapshot directory in overlayfs's format: files,
//! directories, links and device nodes with their owners, modes and mtimes; OCI
//! whiteouts become what overlayfs reads as one (a 0/0 character device for `.wh.name`,
//! `trusted.overlay.opaque=y` on the directory for `.wh..wh..opq`).
//!
//! The `tar` crate unpacks regular entries (and refuses paths that leave the directory,
//! through `..` or a symlink); devices, FIFOs and whiteouts are made here, since the
//! crate writes those as regular files.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid};

/// The overlayfs attribute that makes a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks the uncompressed layer `tar` into the existing directory `dest`.
pub fn unpack(tar: impl Read, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // Directory modes are set when the archive ends (a read-only directory could not
    // take its entries otherwise).
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let rel = relative(&entry.path()?)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let name = rel
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == OPAQUE_MARKER {
            let dir = safe_dir(dest, &parent)?;
            xattr::set(&dir, OPAQUE_XATTR, b"y")?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let dir = safe_dir(dest, &parent)?;
            let path = dir.join(hidden);
            remove_any(&path)?;
            mknod(&path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(io::Error::from)?;
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let dir = safe_dir(dest, &parent)?;
            let path = dir.join(&name);
            remove_any(&path)?;
            let h = entry.header();
            let flag = if kind.is_fifo() {
                SFlag::S_IFIFO
            } else if kind.is_block_special() {
                SFlag::S_IFBLK
            } else {
                SFlag::S_IFCHR
            };
            let major = h.device_major()?.unwrap_or(0);
            let minor = h.device_minor()?.unwrap_or(0);
            let mode = Mode::from_bits_truncate(h.mode()? & 0o7777);
            mknod(&path, flag, mode, makedev(major.into(), minor.into()))
                .map_err(io::Error::from)?;
            let (uid, gid) = (h.uid()?, h.gid()?);
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &path,
                Some(Uid::from_raw(u32::try_from(uid).unwrap_or(0))),
                Some(Gid::from_raw(u32::try_from(gid).unwrap_or(0))),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)?;
            continue;
        }
        if kind.is_dir() {
            dirs.push((rel.clone(), entry.header().clone()));
        }
        entry.unpack_in(dest)?;
    }
    // Deepest first, so a parent's mode cannot lock out its children.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (rel, h) in dirs {
        let path = dest.join(&rel);
        let mode = h.mode()? & 0o7777;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if let Ok(mtime) = h.mtime() {
            let t = filetime_of(mtime);
            let _ = nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
    }
    Ok(())
}

fn filetime_of(secs: u64) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(i64::try_from(secs).unwrap_or(0), 0)
}

/// A layer path as a relative path without `.` or `..`.
fn relative(p: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::other(format!(
                    "layer entry {} leaves the root",
                    p.display()
                )));
            }
        }
    }
    Ok(out)
}

/// `dest/rel`, created as directories if missing, refusing a path whose components
/// are symlinks (they could point outside `dest`).
fn safe_dir(dest: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match cur.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "layer entry below {} which is not a directory",
                    cur.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&cur)?,
            Err(e) => return Err(e),
        }
    }
    Ok(cur)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
