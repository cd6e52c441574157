//! The command line: `kiln` (the dashboard), `kiln up`, and the commands that talk to a
//! running kilnd. The arguments of the commands that also work without one (`gc`,
//! `fsck`, `show-tag`, `build`) are kilnd's own ([`kiln_shared::cli`]), declared once.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_shared::cli::{BuildArgs, FsckArgs, GcArgs, ShowTagArgs};

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
        /// Start kilnd and wait until it is ready, but do not open the dashboard (also
        /// what happens without a terminal).
        #[arg(long)]
        no_dashboard: bool,
        #[command(flatten)]
        kilnd: Box<KilndFlags>,
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
    Build(BuildArgs),
    /// Fetch packages (their current tags, every arch unless --arch) or any image
    /// (`alpine:3.20`) from kilnd's upstream registries into the cache, without building.
    Pull {
        /// Packages (directories or `org/image`) or images (`alpine:3.20`).
        #[arg(required = true, value_name = "PKG|IMAGE")]
        names: Vec<String>,
        /// Fetch only this architecture of the packages.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
    },
    /// Push packages' current tags from the cache to the upstreams that take pushes
    /// (`tag-<arch>` per arch and the index as `tag`, as `linuxkit pkg push` does).
    Push {
        /// Packages: directories or image names (`org/image`).
        #[arg(required = true, value_name = "PKG")]
        packages: Vec<String>,
    },
    /// Print the log of a package's build in flight, else its last one; exit 1 if that
    /// build failed or was cancelled.
    Logs {
        /// The package (`org/image`).
        #[arg(value_name = "PKG")]
        package: String,
        /// The architecture [default: the one that failed, else the host's]
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
        /// Only the package's builds for this architecture.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// One build by id.
        #[arg(long, value_name = "ID", conflicts_with_all = ["package", "arch"])]
        build: Option<String>,
    },
    /// Collect garbage: through the running kilnd, or directly on a cache when none runs
    /// or when --cache or --max-size is given.
    Gc(GcArgs),
    /// Check the cache: every blob hashes to its name, every reference resolves, and
    /// leftovers of interrupted writes are listed.
    Fsck(FsckArgs),
    /// Print `org/image:tag` for each package directory, as `linuxkit pkg show-tag`.
    ShowTag(ShowTagArgs),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// kilnd's options, which `kiln up` passes to the kilnd it starts (kilnd checks them;
/// `kilnd --help` says more). Its socket is kiln's `--socket`.
#[derive(Debug, Default, clap::Args)]
#[command(next_help_heading = "kilnd options (for the kilnd that kiln up starts)")]
pub struct KilndFlags {
    /// The OCI image-layout cache directory [default: $XDG_CACHE_HOME/kiln]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Address for the registry to listen on, IP:PORT or NAME:PORT (repeatable)
    /// [default: 127.0.0.1:5000 and [::1]:5000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Host name the registry answers to besides loopback names (repeatable)
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Serve DELETE of manifests and blobs on the registry
    #[arg(long)]
    pub allow_delete: bool,
    /// Configuration file [default: kiln.toml in the workspace, if present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Builds at once [default: the number of cores]
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<String>,
    /// auto, native or docker [default: auto]
    #[arg(long, value_name = "BUILDER")]
    pub builder: Option<String>,
    /// A Docker engine for a platform, PLATFORM=ENDPOINT (repeatable)
    #[arg(long = "engine", value_name = "PLATFORM=ENDPOINT")]
    pub engines: Vec<String>,
    /// Longest a save waits for a file still open for writing or a new directory to fill, in ms [default: 50]
    #[arg(long, value_name = "MS")]
    pub quiet_ms: Option<String>,
    /// The moving tag that follows each package's newest build [default: dev]
    #[arg(long, value_name = "TAG")]
    pub dev_tag: Option<String>,
    /// How long a pull of a tag being built waits for it, in seconds [default: 120]
    #[arg(long, value_name = "SECONDS")]
    pub pull_wait: Option<String>,
    /// Size cap of the cache for garbage collection (e.g. 20G)
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
    /// An upstream registry, REGISTRY[/PREFIX] (repeatable)
    #[arg(long = "upstream", value_name = "REGISTRY[/PREFIX]")]
    pub upstreams: Vec<String>,
    /// Push every target kiln builds to the upstreams
    #[arg(long)]
    pub push: bool,
    /// A mirror of Docker Hub, asked for docker.io images first (repeatable)
    #[arg(long = "mirror", value_name = "REGISTRY[/PREFIX]")]
    pub mirrors: Vec<String>,
}

impl KilndFlags {
    /// The flags as kilnd's command line.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = Vec::new();
        let mut one = |flag: &str, value: Option<std::ffi::OsString>| {
            if let Some(v) = value {
                out.push(flag.into());
                out.push(v);
            }
        };
        one("--cache", self.cache.clone().map(Into::into));
        one("--config", self.config.clone().map(Into::into));
        one("--jobs", self.jobs.clone().map(Into::into));
        one("--builder", self.builder.clone().map(Into::into));
        one("--quiet-ms", self.quiet_ms.clone().map(Into::into));
        one("--dev-tag", self.dev_tag.clone().map(Into::into));
        one("--pull-wait", self.pull_wait.clone().map(Into::into));
        one("--max-size", self.max_size.clone().map(Into::into));
        for (flag, values) in [
            ("--listen", &self.listen),
            ("--allow-host", &self.allow_hosts),
            ("--engine", &self.engines),
            ("--upstream", &self.upstreams),
            ("--mirror", &self.mirrors),
        ] {
            for v in values {
                one(flag, Some(v.into()));
            }
        }
        for (flag, on) in [("--allow-delete", self.allow_delete), ("--push", self.push)] {
            if on {
                out.push(flag.into());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every argument of every command, with the path of commands leading to it, that
    /// has no description in `--help`.
    fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.get_help().is_none() && !a.is_hide_set() {
                out.push(format!("{path} {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                out.push(format!("{path} {}", sub.get_name()));
            }
            undescribed(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_argument_says_what_it_is() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        undescribed(&cmd, "kiln", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:?}");
    }

    #[test]
    fn up_passes_kilnd_options_through() {
        let cli = Cli::try_parse_from([
            "kiln",
            "up",
            "ws",
            "--listen",
            "localhost:5001",
            "--cache",
            "/c",
            "--listen",
            "127.0.0.1:0",
            "--push",
            "-j",
            "2",
        ])
        .unwrap();
        let Some(Command::Up { dir, kilnd, .. }) = cli.command else {
            panic!("not up: {cli:?}");
        };
        assert_eq!(dir, Some(PathBuf::from("ws")));
        let args: Vec<String> = kilnd
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--cache",
                "/c",
                "--jobs",
                "2",
                "--listen",
                "localhost:5001",
                "--listen",
                "127.0.0.1:0",
                "--push"
            ]
        );
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
