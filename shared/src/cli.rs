//! The arguments of the commands that work without a running kilnd (`gc`, `fsck`,
//! `show-tag`, `build --cache`), declared once: `kilnd` runs them as its one-off
//! commands, and `kiln` parses the same arguments to choose between the running kilnd and
//! becoming `kilnd <command>`. Behind the `cli` feature, so what else kiln-shared holds
//! stays serde and thiserror only.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;

/// `gc`: collect garbage on a cache.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// The cache directory [default: kilnd's, $XDG_CACHE_HOME/kiln]
    #[arg(long, env = "KILN_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Drop references, least recently used first, until the cache fits (e.g. 10G,
    /// 500MiB).
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
    /// Say what would be freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `fsck`: check a cache.
#[derive(Debug, Clone, Args)]
pub struct FsckArgs {
    /// The cache directory [default: $XDG_CACHE_HOME/kiln]
    #[arg(long, env = "KILN_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Remove leftovers and corrupt blobs, and drop references whose images are broken.
    #[arg(long)]
    pub repair: bool,
}

/// `show-tag`: the tags of package directories.
#[derive(Debug, Clone, Args)]
pub struct ShowTagArgs {
    /// Package directories.
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
}

/// `build`: build packages now and wait.
#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// Packages: directories or image names (`org/image`).
    #[arg(required = true, value_name = "PKG")]
    pub packages: Vec<String>,
    /// Build only this architecture.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Build even if the tag is already in the cache.
    #[arg(long)]
    pub force: bool,
    /// native or docker [default: kilnd's choice for the package: native where it can
    /// do all of the Dockerfile]
    #[arg(long, value_name = "BUILDER")]
    pub builder: Option<String>,
    /// Build without a running kilnd, into this cache directory.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Without a running kilnd: a Docker engine for a platform, PLATFORM=ENDPOINT
    /// (repeatable).
    #[arg(long = "engine", value_name = "PLATFORM=ENDPOINT", requires = "cache")]
    pub engines: Vec<String>,
}

/// Arguments as a command line again: what `kiln` passes to `kilnd <command>`. Written
/// beside the declarations so both change together (the tests parse them back).
fn flag(out: &mut Vec<OsString>, name: &str, value: Option<impl Into<OsString>>) {
    if let Some(v) = value {
        out.push(name.into());
        out.push(v.into());
    }
}

fn switch(out: &mut Vec<OsString>, name: &str, on: bool) {
    if on {
        out.push(name.into());
    }
}

impl GcArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        flag(&mut out, "--cache", self.cache.clone());
        flag(&mut out, "--max-size", self.max_size.clone());
        switch(&mut out, "--dry-run", self.dry_run);
        out
    }
}

impl FsckArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        flag(&mut out, "--cache", self.cache.clone());
        switch(&mut out, "--repair", self.repair);
        out
    }
}

impl ShowTagArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        // After `--`, a directory named like a flag stays a directory.
        std::iter::once("--".into())
            .chain(self.dirs.iter().map(|d| d.clone().into_os_string()))
            .collect()
    }
}

impl BuildArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        flag(&mut out, "--cache", self.cache.clone());
        flag(&mut out, "--arch", self.arch.clone());
        switch(&mut out, "--force", self.force);
        flag(&mut out, "--builder", self.builder.clone());
        for e in &self.engines {
            flag(&mut out, "--engine", Some(e));
        }
        // After `--`, a package named like a flag stays a package.
        out.push("--".into());
        out.extend(self.packages.iter().map(OsString::from));
        out
    }
}

#[cfg(test)]
mod tests {
    use clap::{Parser, Subcommand};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, Subcommand)]
    enum Command {
        Gc(GcArgs),
        Fsck(FsckArgs),
        ShowTag(ShowTagArgs),
        Build(BuildArgs),
    }

    fn parse(command: &str, args: Vec<OsString>) -> Command {
        let argv = ["prog".into(), command.into()].into_iter().chain(args);
        Cli::try_parse_from(argv).unwrap().command
    }

    #[test]
    fn arguments_survive_the_command_line() {
        let gc = GcArgs {
            cache: Some("/c".into()),
            max_size: Some("10G".into()),
            dry_run: true,
        };
        let Command::Gc(back) = parse("gc", gc.to_args()) else {
            panic!()
        };
        assert_eq!(
            (back.cache, back.max_size, back.dry_run),
            (gc.cache, gc.max_size, gc.dry_run)
        );

        let fsck = FsckArgs {
            cache: None,
            repair: true,
        };
        let Command::Fsck(back) = parse("fsck", fsck.to_args()) else {
            panic!()
        };
        assert_eq!((back.cache, back.repair), (None, true));

        let show = ShowTagArgs {
            dirs: vec!["--odd".into(), "pkg".into()],
        };
        let Command::ShowTag(back) = parse("show-tag", show.to_args()) else {
            panic!()
        };
        assert_eq!(back.dirs, show.dirs);

        let build = BuildArgs {
            packages: vec!["-p".into(), "org/a".into()],
            arch: Some("arm64".into()),
            force: true,
            builder: Some("docker".into()),
            cache: Some("/c".into()),
            engines: vec!["linux/arm64=tcp://h:2375".into(), "unix:///s".into()],
        };
        let Command::Build(back) = parse("build", build.to_args()) else {
            panic!()
        };
        assert_eq!(
            (
                back.packages,
                back.arch,
                back.force,
                back.builder,
                back.cache,
                back.engines
            ),
            (
                build.packages,
                build.arch,
                build.force,
                build.builder,
                build.cache,
                build.engines
            )
        );
    }
}
