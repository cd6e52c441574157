//! The daemon's lifetime: open the cache, start every service, say when ready, run until
//! SIGINT or SIGTERM, then shut down cleanly.

use std::path::Path;

use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::cache::{Cache, CacheError};
use crate::config::Config;

/// Why kilnd stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What kilnd writes to `--ready-file` once every service listens.
#[derive(Debug, Serialize)]
pub struct Ready {
    pub registry: Vec<String>,
    pub socket: String,
    pub pid: u32,
}

/// Runs kilnd until a termination signal.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let cache_dir = config.cache.clone();
    let cache = tokio::task::spawn_blocking(move || Cache::open(&cache_dir)).await??;
    tracing::info!(cache = %cache.root().display(), "cache open");

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let ready = Ready {
        registry: Vec::new(),
        socket: config.socket.display().to_string(),
        pid: std::process::id(),
    };
    announce(&ready, config.ready_file.as_deref())?;

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// Prints the ready line and writes the ready file atomically.
fn announce(ready: &Ready, file: Option<&Path>) -> Result<(), DaemonError> {
    println!(
        "kilnd ready: registry {} api {}",
        ready.registry.join(" "),
        ready.socket
    );
    if let Some(path) = file {
        let err = |source| DaemonError::ReadyFile {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(ready).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
    }
    Ok(())
}
