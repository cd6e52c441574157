//! The one-off commands: `kilnd gc`, `kilnd fsck`, `kilnd show-tag` and `kilnd build`
//! work on a cache or a workspace directly, without a running daemon, and exit. `kiln`'s
//! commands of the same names run them (so the dashboard links none of the daemon); their
//! flags and output are those of `kiln`.

use std::path::{Path, PathBuf};

use kiln_shared::error::Chain;

use clap::{Parser, Subcommand};
use kiln_shared::cli::{BuildArgs, FsckArgs, GcArgs, ShowTagArgs};

use crate::cache::{Cache, CacheError, GcOptions, SizeError, fsck, gc, parse_size};
use crate::config::{Args, Config, ConfigError};
use crate::daemon::{DaemonError, OneOff, build_once};
use crate::schedule::Outcome as Built;

/// A command kilnd runs once and exits (rather than serving). The arguments are
/// [`kiln_shared::cli`]'s, which `kiln` parses too before it becomes this command.
#[derive(Debug, Clone, Subcommand)]
pub enum OneOffCommand {
    /// Collect garbage directly on a cache (no kilnd needed; `kiln gc` runs this when no
    /// kilnd answers, or when --cache or --max-size is given).
    Gc(GcArgs),
    /// Check the cache: every blob hashes to its name, every reference resolves, and
    /// leftovers of interrupted writes are listed.
    Fsck(FsckArgs),
    /// Print `org/image:tag` for each package directory, as `linuxkit pkg show-tag`.
    ShowTag(ShowTagArgs),
    /// Build packages into a cache directory (--cache DIR) without a running kilnd, and
    /// wait.
    Build(BuildArgs),
}

/// Why a one-off command could not do its work (as opposed to finding a problem it
/// reports, such as an unclean cache or a failed build).
#[derive(Debug, thiserror::Error)]
pub enum OneOffError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{} is not a kiln cache (no oci-layout file); name one with --cache DIR", .0.display())]
    NotACache(PathBuf),
    #[error("cannot open the cache {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: CacheError,
    },
    #[error("--max-size: {0}")]
    MaxSize(#[source] SizeError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot read the current directory: {0}")]
    Cwd(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    Package {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Flags(#[source] clap::Error),
    #[error(transparent)]
    Build(#[from] DaemonError),
    #[error(
        "build without a running kilnd needs the cache to build into: give --cache DIR \
         (`kiln build` without it asks the running kilnd)"
    )]
    NoCache,
}

/// How a one-off command ended when it could do its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything asked for is done and fine.
    Success,
    /// A problem found and already reported on stderr or stdout (a failed build, an
    /// unclean cache, a directory that is not a package).
    Failure,
}

/// Runs `command`, printing its report to stdout and problems to stderr prefixed with
/// `prog: `.
pub async fn run(command: OneOffCommand, prog: &str) -> Result<Verdict, OneOffError> {
    match command {
        OneOffCommand::Gc(GcArgs {
            cache,
            max_size,
            dry_run,
        }) => run_gc(&cache_dir(cache)?, max_size.as_deref(), dry_run),
        OneOffCommand::Fsck(FsckArgs { cache, repair }) => run_fsck(&cache_dir(cache)?, repair),
        OneOffCommand::ShowTag(ShowTagArgs { dirs }) => Ok(show_tags(&dirs, prog)),
        OneOffCommand::Build(BuildArgs {
            packages,
            arch,
            force,
            builder,
            cache,
            engines,
        }) => {
            let cache = cache.ok_or(OneOffError::NoCache)?;
            build(packages, arch, force, builder, cache, engines, prog).await
        }
    }
}

/// The cache named on the command line, else kilnd's default.
fn cache_dir(dir: Option<PathBuf>) -> Result<PathBuf, OneOffError> {
    match dir {
        Some(d) => Ok(d),
        None => Ok(crate::config::default_cache_dir()?),
    }
}

fn open(dir: &Path) -> Result<Cache, OneOffError> {
    if !dir.join("oci-layout").exists() {
        return Err(OneOffError::NotACache(dir.to_owned()));
    }
    Cache::open(dir).map_err(|source| OneOffError::Open {
        path: dir.to_owned(),
        source,
    })
}

/// `show-tag DIR...`: `org/image:tag` per package, as kilnd tags it.
fn show_tags(dirs: &[PathBuf], prog: &str) -> Verdict {
    let mut verdict = Verdict::Success;
    for r in crate::plan::show_tags(dirs) {
        match r {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("{prog}: {e}");
                verdict = Verdict::Failure;
            }
        }
    }
    verdict
}

/// `fsck`: prints the report; fails when the cache is not clean.
fn run_fsck(dir: &Path, repair: bool) -> Result<Verdict, OneOffError> {
    let cache = open(dir)?;
    let report = fsck(&cache, repair)?;
    println!("{report}");
    Ok(if report.is_clean() {
        Verdict::Success
    } else {
        Verdict::Failure
    })
}

/// `gc` on a cache directory.
fn run_gc(dir: &Path, max_size: Option<&str>, dry_run: bool) -> Result<Verdict, OneOffError> {
    let cache = open(dir)?;
    let max_size = max_size
        .map(parse_size)
        .transpose()
        .map_err(OneOffError::MaxSize)?;
    let report = gc(
        &cache,
        GcOptions {
            max_size,
            dry_run,
            ..GcOptions::default()
        },
    )?;
    println!("{report}");
    Ok(Verdict::Success)
}

/// `build --cache DIR PKG...`: kilnd's planner, queue and builders, once.
async fn build(
    packages: Vec<String>,
    arch: Option<String>,
    force: bool,
    builder: Option<String>,
    cache: PathBuf,
    engines: Vec<String>,
    prog: &str,
) -> Result<Verdict, OneOffError> {
    let cwd = std::env::current_dir().map_err(OneOffError::Cwd)?;
    // The workspace: each package directory's git repository (or its parent directory);
    // image names are looked up under the current directory.
    let mut roots: Vec<PathBuf> = Vec::new();
    for p in &packages {
        let path = Path::new(p);
        let root = if path.join(crate::workspace::BUILD_YML).exists() {
            let abs = std::fs::canonicalize(path).map_err(|source| OneOffError::Package {
                path: path.to_owned(),
                source,
            })?;
            workspace_root(&abs)
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
    let config = Config::load(Args::try_parse_from(args).map_err(OneOffError::Flags)?)?;
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
    let mut verdict = Verdict::Success;
    for r in results {
        match r.outcome {
            Ok(Built::Built(_)) => {}
            Ok(Built::Failed(e)) => {
                eprintln!("{prog}: {} ({}): {}", r.package, r.arch, Chain(&e));
                verdict = Verdict::Failure;
            }
            Err(e) => {
                eprintln!("{prog}: {} ({}): {}", r.package, r.arch, Chain(&e));
                verdict = Verdict::Failure;
            }
            Ok(Built::Cancelled(e)) => {
                eprintln!("{prog}: {} ({}): cancelled: {e}", r.package, r.arch);
                verdict = Verdict::Failure;
            }
        }
    }
    Ok(verdict)
}

/// The workspace a directory belongs to: the nearest directory above it with a
/// `kiln.toml` (within its git repository), else its git repository, else its parent.
fn workspace_root(dir: &Path) -> PathBuf {
    let top = crate::workspace::git::find_top(dir);
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
