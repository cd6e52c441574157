//! kilnd: the kiln daemon. Parses the command line, sets up logging and hands over to
//! [`kiln_daemon::daemon::run`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kiln_daemon::config::{Args, Config};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    // Colour codes only on a terminal: `kiln up` sends this log to a file.
    tracing_subscriber::fmt()
        .with_ansi(kiln_shared::term::colour(std::io::stderr().is_terminal()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
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
