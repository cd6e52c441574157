//! kiln: the dashboard and command line for kilnd.
//!
//! Exit codes: 0 success, 1 failure, 2 usage.

mod app;
mod cli;
mod client;
mod commands;
mod dashboard;
mod standalone;
#[cfg(test)]
mod testing;
mod ui;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use kiln_shared::cli::BuildArgs;
use kiln_shared::protocol::{BuildId, BuildRequest, CancelRequest, TransferRequest};

use crate::cli::{Cli, Command};
use crate::client::Client;
use crate::commands::Outcome;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let log = init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failure) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kiln: {e:#}");
            if let Some(log) = log {
                tracing::debug!(log = %log.display(), "error reported");
            }
            ExitCode::FAILURE
        }
    }
}

/// Logs go to a file (never to the terminal the dashboard draws on):
/// `<state dir>/kiln.log`, level from `KILN_LOG` (default `info`).
fn init_logging() -> Option<PathBuf> {
    let dir = up::state_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join("kiln.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ok()?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init()
        .ok()?;
    Some(path)
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let client = Client::new(cli.socket.unwrap_or_else(client::default_socket));
    match cli.command {
        None | Some(Command::Dashboard) => {
            dashboard::run(client).await?;
            Ok(Outcome::Success)
        }
        Some(Command::Up {
            dir,
            no_dashboard,
            kilnd,
        }) => {
            let dir = match dir {
                Some(d) => d,
                None => std::env::current_dir().context("cannot read the current directory")?,
            };
            // Without a terminal there is no dashboard to open: say what runs, and stop.
            let no_dashboard = no_dashboard || !dashboard::has_terminal();
            match up::ensure(&client, &dir, &kilnd).await? {
                up::Started::AlreadyRunning => {
                    tracing::info!("kilnd already runs for {}", dir.display());
                    if !kilnd.to_args().is_empty() {
                        eprintln!(
                            "kiln: kilnd already runs for {}; the kilnd options given do not change it (kiln stop, then kiln up with them)",
                            dir.display()
                        );
                    }
                    if no_dashboard {
                        println!(
                            "kilnd already runs for {} on {}",
                            dir.display(),
                            client.socket().display()
                        );
                    }
                }
                up::Started::Started { ready, log } => {
                    tracing::info!(pid = ready.pid, "started kilnd");
                    if no_dashboard {
                        println!(
                            "kilnd (pid {}) serves {} on {}; registry {}; log {}",
                            ready.pid,
                            dir.display(),
                            ready.socket.display(),
                            ready.registry.join(" "),
                            log.display()
                        );
                    }
                }
            }
            if !no_dashboard {
                dashboard::run(client).await?;
            }
            Ok(Outcome::Success)
        }
        Some(Command::Status { json }) => commands::status(&client, json).await,
        Some(Command::Stop) => commands::stop(&client).await,
        Some(Command::Build(args)) if args.cache.is_some() => standalone::build(&args),
        Some(Command::Build(BuildArgs {
            packages,
            arch,
            force,
            builder,
            ..
        })) => {
            let mut outcome = Outcome::Success;
            for package in packages {
                let req = BuildRequest {
                    package,
                    arch: arch.clone(),
                    force,
                    builder: builder.clone(),
                };
                if let Outcome::Failure = commands::build(&client, req).await? {
                    outcome = Outcome::Failure;
                }
            }
            Ok(outcome)
        }
        Some(Command::Pull { names, arch }) => {
            commands::transfer(&client, "/pull", TransferRequest { names, arch }).await
        }
        Some(Command::Push { packages }) => {
            let req = TransferRequest {
                names: packages,
                arch: None,
            };
            commands::transfer(&client, "/push", req).await
        }
        Some(Command::Logs {
            package,
            arch,
            follow,
        }) => commands::logs(&client, &package, arch.as_deref(), follow).await,
        Some(Command::Cancel {
            package,
            arch,
            build,
        }) => {
            commands::cancel(
                &client,
                CancelRequest {
                    build: build.map(BuildId),
                    package,
                    arch,
                },
            )
            .await
        }
        Some(Command::Gc(args)) => {
            if args.cache.is_none()
                && args.max_size.is_none()
                && !args.dry_run
                && kilnd_answers(&client).await
            {
                commands::gc(&client).await
            } else {
                standalone::gc(&args)
            }
        }
        Some(Command::Fsck(args)) => standalone::fsck(&args),
        Some(Command::ShowTag(args)) => standalone::show_tags(&args),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(Outcome::Success)
        }
    }
}

/// Whether a kilnd answers on the client's socket.
async fn kilnd_answers(client: &Client) -> bool {
    !matches!(client.state().await, Err(e) if e.is_unreachable())
}
