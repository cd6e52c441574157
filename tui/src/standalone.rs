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

/// `kiln build --cache DIR PKG...`: kilnd's planner, queue and builders, in this process.
pub async fn build(
    packages: Vec<String>,
    arch: Option<String>,
    force: bool,
    builder: Option<String>,
    cache: PathBuf,
    engines: Vec<String>,
) -> anyhow::Result<Outcome> {
    use clap::Parser;
    use kiln_daemon::daemon::{OneOff, build_once};
    use kiln_daemon::schedule::Outcome as Built;

    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    // The workspace: each package directory's git repository (or its parent directory);
    // image names are looked up under the current directory.
    let mut roots: Vec<PathBuf> = Vec::new();
    for p in &packages {
        let path = Path::new(p);
        let root = if path.join(kiln_daemon::workspace::BUILD_YML).exists() {
            workspace_root(&std::fs::canonicalize(path)?)
        } else {
            workspace_root(&cwd)
        };
        if !roots.iter().any(|r| root.starts_with(r)) {
            roots.retain(|r| !r.starts_with(&root));
            roots.push(root);
        }
    }
    // kilnd's own configuration rules: these flags, then KILN_*, then kiln.toml.
    let mut args = vec!["kilnd".into(), "--cache".into(), cache.into_os_string()];
    if let Some(b) = &builder {
        args.extend(["--builder".into(), b.into()]);
    }
    for e in &engines {
        args.extend(["--engine".into(), e.into()]);
    }
    args.extend(roots.iter().map(|r| r.clone().into_os_string()));
    let config = kiln_daemon::config::Config::load(
        kiln_daemon::config::Args::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    let results = build_once(
        OneOff {
            roots: config.roots,
            cache: config.cache,
            packages,
            arch,
            force,
            builders: config.builders,
            engines: config.engines,
            jobs: config.jobs,
            // No upstreams here: the fallbacks are the images.
            imports: config
                .imports
                .into_iter()
                .chain(config.fallback_imports)
                .collect(),
        },
        |line| println!("{line}"),
    )
    .await?;
    let mut outcome = Outcome::Success;
    for r in results {
        match r.outcome {
            Ok(Built::Built(_)) => {}
            Ok(Built::Failed(e)) | Err(e) => {
                eprintln!("kiln: {} ({}): {e}", r.package, r.arch);
                outcome = Outcome::Failure;
            }
            Ok(Built::Cancelled(e)) => {
                eprintln!("kiln: {} ({}): cancelled: {e}", r.package, r.arch);
                outcome = Outcome::Failure;
            }
        }
    }
    Ok(outcome)
}

/// The workspace a directory belongs to: the nearest directory above it with a
/// `kiln.toml` (within its git repository), else its git repository, else its parent.
fn workspace_root(dir: &Path) -> PathBuf {
    let top = kiln_daemon::workspace::git::find_top(dir);
    for d in dir.ancestors() {
        if d.join("kiln.toml").is_file() {
            return d.to_path_buf();
        }
        if top.as_deref() == Some(d) {
            break;
        }
    }
    top.or_else(|| dir.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| dir.to_path_buf())
}
