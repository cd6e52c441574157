//! kilnd: the kiln daemon. Parses the command line, sets up logging and hands over to
//! [`kiln_daemon::daemon::run`], or runs one of the one-off commands that `kiln` runs
//! ([`kiln_daemon::oneoff`]) and exits.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kiln_daemon::config::{Args, Config};
use kiln_daemon::oneoff::{self, OneOffCommand, Verdict};
use tracing_subscriber::EnvFilter;

/// kilnd: watches container packages, builds them into an OCI cache, serves it as a
/// registry on localhost:5000.
///
/// With a command, does that once and exits (a root named like a command is written
/// `./NAME`).
#[derive(Debug, Parser)]
#[command(name = "kilnd", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: Args,
    #[command(subcommand)]
    once: Option<OneOffCommand>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its work; a one-off command prints its report and only warnings.
    let default_level = if cli.once.is_some() { "warn" } else { "info" };
    // Colour codes only on a terminal: `kiln up` sends this log to a file.
    tracing_subscriber::fmt()
        .with_ansi(kiln_shared::term::colour(std::io::stderr().is_terminal()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(command) = cli.once {
        // `kiln` runs these under its own name (argv[0]), so its messages say `kiln:`.
        let prog = std::env::args_os()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "kilnd".into());
        return match runtime.block_on(oneoff::run(command, &prog)) {
            Ok(Verdict::Success) => ExitCode::SUCCESS,
            Ok(Verdict::Failure) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("{prog}: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(kiln_daemon::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kilnd: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
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

    #[test]
    fn every_one_off_argument_says_what_it_is() {
        let mut cmd = Cli::command();
        cmd.build();
        let missing: Vec<String> = cmd
            .get_subcommands()
            .flat_map(|sub| {
                let about = sub.get_about().is_none().then(|| sub.get_name().to_owned());
                let args = sub
                    .get_arguments()
                    .filter(|a| a.get_help().is_none() && !a.is_hide_set())
                    .map(|a| format!("{} {}", sub.get_name(), a.get_id()));
                about.into_iter().chain(args).collect::<Vec<_>>()
            })
            .collect();
        assert!(missing.is_empty(), "without a description: {missing:?}");
    }

    #[test]
    fn roots_and_one_off_commands() {
        let cli = Cli::try_parse_from(["kilnd", "ws", "--jobs", "2"]).unwrap();
        assert!(cli.once.is_none());
        assert_eq!(cli.serve.roots, vec![std::path::PathBuf::from("ws")]);
        let cli = Cli::try_parse_from(["kilnd", "fsck", "--cache", "/c", "--repair"]).unwrap();
        assert!(matches!(
            cli.once,
            Some(OneOffCommand::Fsck(kiln_shared::cli::FsckArgs {
                repair: true,
                ..
            }))
        ));
        let cli = Cli::try_parse_from(["kilnd", "./fsck"]).unwrap();
        assert!(cli.once.is_none());
    }
}
