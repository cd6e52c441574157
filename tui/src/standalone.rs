//! The commands that work on a workspace or a cache directly, with no kilnd running:
//! `show-tag`, `fsck`, `gc` on a cache and `build --cache`. kiln becomes (execs) the
//! kilnd binary's one-off command of the same name, under kiln's own name, so output,
//! exit code and signals are the command's own, and this crate links none of the daemon.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::commands::Outcome;

/// The kilnd binary: next to this `kiln`, else on PATH.
pub fn kilnd_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kilnd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("kilnd"))
}

/// `kiln show-tag DIR...`: `org/image:tag` per package, as kilnd tags it.
pub fn show_tags(dirs: Vec<PathBuf>) -> anyhow::Result<Outcome> {
    let mut args: Vec<OsString> = vec!["show-tag".into()];
    args.extend(dirs.into_iter().map(PathBuf::into_os_string));
    exec(args)
}

/// `kiln fsck`: prints the report; fails when the cache is not clean.
pub fn fsck(cache: Option<PathBuf>, repair: bool) -> anyhow::Result<Outcome> {
    let mut args: Vec<OsString> = vec!["fsck".into()];
    push_cache(&mut args, cache);
    if repair {
        args.push("--repair".into());
    }
    exec(args)
}

/// `kiln gc` on a cache directory.
pub fn gc(
    cache: Option<PathBuf>,
    max_size: Option<String>,
    dry_run: bool,
) -> anyhow::Result<Outcome> {
    let mut args: Vec<OsString> = vec!["gc".into()];
    push_cache(&mut args, cache);
    if let Some(size) = max_size {
        args.extend(["--max-size".into(), size.into()]);
    }
    if dry_run {
        args.push("--dry-run".into());
    }
    exec(args)
}

/// `kiln build --cache DIR PKG...`: kilnd's planner, queue and builders, once.
pub fn build(
    packages: Vec<String>,
    arch: Option<String>,
    force: bool,
    builder: Option<String>,
    cache: PathBuf,
    engines: Vec<String>,
) -> anyhow::Result<Outcome> {
    let mut args: Vec<OsString> = vec!["build".into()];
    push_cache(&mut args, Some(cache));
    if let Some(arch) = arch {
        args.extend(["--arch".into(), arch.into()]);
    }
    if force {
        args.push("--force".into());
    }
    if let Some(builder) = builder {
        args.extend(["--builder".into(), builder.into()]);
    }
    for engine in engines {
        args.extend(["--engine".into(), engine.into()]);
    }
    // After `--`, a package named like a flag stays a package.
    args.push("--".into());
    args.extend(packages.into_iter().map(OsString::from));
    exec(args)
}

fn push_cache(args: &mut Vec<OsString>, cache: Option<PathBuf>) {
    if let Some(dir) = cache {
        args.extend(["--cache".into(), dir.into_os_string()]);
    }
}

/// Becomes `kilnd ARGS...` (named `kiln`, as the user typed it); returns only when that
/// cannot start.
fn exec(args: Vec<OsString>) -> anyhow::Result<Outcome> {
    let kilnd = kilnd_path();
    tracing::debug!(kilnd = %kilnd.display(), ?args, "running kilnd's one-off command");
    let error = Command::new(&kilnd).arg0("kiln").args(&args).exec();
    Err(anyhow::anyhow!(
        "cannot run {}: {error}; this command needs kilnd: install it next to kiln or on PATH",
        kilnd.display()
    ))
}
