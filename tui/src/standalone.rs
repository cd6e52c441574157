//! The commands that work on a workspace or a cache directly, with no kilnd: `show-tag`,
//! `fsck`, and `gc` when no kilnd runs (or a cache or size cap is named).

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_daemon::cache::{Cache, GcOptions, fsck, gc, parse_size};
use kiln_daemon::plan::show_tags as tags;

use crate::commands::Outcome;

/// The cache named on the command line, else kilnd's default.
pub fn cache_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => Ok(kiln_daemon::config::default_cache_dir()?),
    }
}

fn open(dir: &Path) -> anyhow::Result<Cache> {
    if !dir.join("oci-layout").exists() {
        anyhow::bail!(
            "{} is not a kiln cache (no oci-layout file); name one with --cache DIR",
            dir.display()
        );
    }
    Cache::open(dir).with_context(|| format!("cannot open the cache {}", dir.display()))
}

/// `kiln show-tag DIR...`: `org/image:tag` per package, as kilnd tags it.
pub fn show_tags(dirs: &[PathBuf]) -> Outcome {
    let mut outcome = Outcome::Success;
    for r in tags(dirs) {
        match r {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("kiln: {e}");
                outcome = Outcome::Failure;
            }
        }
    }
    outcome
}

/// `kiln fsck`: prints the report; fails when the cache is not clean.
pub fn run_fsck(dir: &Path, repair: bool) -> anyhow::Result<Outcome> {
    let cache = open(dir)?;
    let report = fsck(&cache, repair)?;
    println!("{report}");
    Ok(if report.is_clean() {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

/// `kiln gc` on a cache directory.
pub fn run_gc(dir: &Path, max_size: Option<&str>, dry_run: bool) -> anyhow::Result<Outcome> {
    let cache = open(dir)?;
    let max_size = max_size.map(parse_size).transpose().context("--max-size")?;
    let report = gc(
        &cache,
        GcOptions {
            max_size,
            dry_run,
            ..GcOptions::default()
        },
    )?;
    println!("{report}");
    Ok(Outcome::Success)
}
