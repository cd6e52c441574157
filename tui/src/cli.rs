//! The command line: `kiln` (the dashboard), `kiln up`, and the commands that talk to a
//! running kilnd.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// kiln: the dashboard and command line for kilnd, the local container package builder.
///
/// With no command, opens the dashboard on the running kilnd.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
pub struct Cli {
    /// kilnd's control socket [default: $XDG_RUNTIME_DIR/kiln/kilnd.sock, else
    /// <cache>/kilnd.sock]
    #[arg(long, global = true, env = "KILN_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start kilnd for DIR in the background (unless one runs for it) and open the
    /// dashboard.
    Up {
        /// The workspace to watch [default: the current directory]
        dir: Option<PathBuf>,
        /// Start kilnd and wait until it is ready, but do not open the dashboard.
        #[arg(long)]
        no_dashboard: bool,
    },
    /// Open the dashboard (the default command).
    Dashboard,
    /// Stop the running kilnd (as SIGTERM does: builds in flight are abandoned, the cache
    /// stays whole) and wait until it has exited.
    Stop,
    /// Show packages, targets, the queue and the cache.
    Status {
        /// Print the daemon's state snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build packages now (all their architectures unless --arch) and wait for the
    /// result: through the running kilnd, or without one into --cache DIR.
    Build {
        /// Packages: directories or image names (`org/image`).
        #[arg(required = true, value_name = "PKG")]
        packages: Vec<String>,
        /// Build only this architecture.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// Build even if the tag is already in the cache.
        #[arg(long)]
        force: bool,
        /// native or docker [default: kilnd's choice for the package: native where it can
        /// do all of the Dockerfile]
        #[arg(long, value_name = "BUILDER")]
        builder: Option<String>,
        /// Build without kilnd, into this cache directory.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Without kilnd: a Docker engine for a platform, PLATFORM=ENDPOINT (repeatable).
        #[arg(long = "engine", value_name = "PLATFORM=ENDPOINT", requires = "cache")]
        engines: Vec<String>,
    },
    /// Fetch packages (their current tags, every arch unless --arch) or any image
    /// (`alpine:3.20`) from kilnd's upstream registries into the cache, without building.
    Pull {
        #[arg(required = true, value_name = "PKG|IMAGE")]
        names: Vec<String>,
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
    },
    /// Push packages' current tags from the cache to the upstreams that take pushes
    /// (`tag-<arch>` per arch and the index as `tag`, as `linuxkit pkg push` does).
    Push {
        #[arg(required = true, value_name = "PKG")]
        packages: Vec<String>,
    },
    /// Print the log of a package's current or last build.
    Logs {
        package: String,
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// Keep printing new lines until the build ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel builds: one by id, a package's, or all queued and running.
    Cancel {
        /// A package (all its builds unless --arch).
        package: Option<String>,
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// One build by id.
        #[arg(long, value_name = "ID", conflicts_with_all = ["package", "arch"])]
        build: Option<String>,
    },
    /// Collect garbage: through the running kilnd, or directly on a cache when none runs
    /// or when --cache or --max-size is given.
    Gc {
        /// The cache directory [default: kilnd's, $XDG_CACHE_HOME/kiln]
        #[arg(long, env = "KILN_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Drop references, least recently used first, until the cache fits (e.g. 10G,
        /// 500MiB).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Say what would be freed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the cache: every blob hashes to its name, every reference resolves, and
    /// leftovers of interrupted writes are listed.
    Fsck {
        /// The cache directory [default: $XDG_CACHE_HOME/kiln]
        #[arg(long, env = "KILN_CACHE", value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Remove leftovers and corrupt blobs, and drop references whose images are broken.
        #[arg(long)]
        repair: bool,
    },
    /// Print `org/image:tag` for each package directory, as `linuxkit pkg show-tag`.
    ShowTag {
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_is_global() {
        let cli = Cli::try_parse_from(["kiln", "status", "--socket", "/s", "--json"]).unwrap();
        assert_eq!(cli.socket, Some(PathBuf::from("/s")));
        assert!(matches!(cli.command, Some(Command::Status { json: true })));
    }

    #[test]
    fn cancel_by_build_excludes_package() {
        assert!(Cli::try_parse_from(["kiln", "cancel", "a/b", "--build", "b1"]).is_err());
    }
}
