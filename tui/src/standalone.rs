//! The commands that work on a workspace or a cache directly, with no kilnd running:
//! `show-tag`, `fsck`, `gc` on a cache and `build --cache`. kiln becomes (execs) the
//! kilnd binary's one-off command of the same name, under kiln's own name, so output,
//! exit code and signals are the command's own, and this crate links none of the daemon.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use kiln_shared::cli::{BuildArgs, FsckArgs, GcArgs, ShowTagArgs};
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
pub fn show_tags(args: &ShowTagArgs) -> anyhow::Result<Outcome> {
    exec("show-tag", args.to_args())
}

/// `kiln fsck`: prints the report; fails when the cache is not clean.
pub fn fsck(args: &FsckArgs) -> anyhow::Result<Outcome> {
    exec("fsck", args.to_args())
}

/// `kiln gc` on a cache directory.
pub fn gc(args: &GcArgs) -> anyhow::Result<Outcome> {
    exec("gc", args.to_args())
}

/// `kiln build --cache DIR PKG...`: kilnd's planner, queue and builders, once.
pub fn build(args: &BuildArgs) -> anyhow::Result<Outcome> {
    exec("build", args.to_args())
}

/// Becomes `kilnd COMMAND ARGS...` (named `kiln`, as the user typed it); returns only when that
/// cannot start.
fn exec(command: &str, args: Vec<OsString>) -> anyhow::Result<Outcome> {
    let kilnd = kilnd_path();
    tracing::debug!(kilnd = %kilnd.display(), command, ?args, "running kilnd's one-off command");
    let error = Command::new(&kilnd)
        .arg0("kiln")
        .arg(command)
        .args(&args)
        .exec();
    Err(anyhow::anyhow!(
        "cannot run {}: {error}; this command needs kilnd: install it next to kiln or on PATH",
        kilnd.display()
    ))
}
