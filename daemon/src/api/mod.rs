//! The control API: HTTP/1.1 over a unix socket (mode 0600) that the `kiln` dashboard and
//! CLI talk to. Reads come from the event [`Bus`]; writes (build, cancel, gc) go to the
//! daemon core as [`ControlRequest`]s with a reply channel, so this module knows nothing
//! about scheduling or the cache.

mod body;
mod routes;
mod socket;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::control::ControlRequest;

/// Why the API could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create the socket directory {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "a kilnd already answers on {path}: stop it (or use `kiln` with it), or pass another --socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket: remove it or pass another --socket")]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {path}: {error}")]
    RemoveStale {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen on {path}: {error}")]
    Bind {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot make {path} private (mode 0600): {error}")]
    Permissions {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("accepting a connection on {path} failed: {error}")]
    Accept {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A bound API socket, not yet serving. Binding first lets kilnd report readiness.
#[derive(Debug)]
pub struct Api {
    listener: UnixListener,
    path: PathBuf,
}

impl Api {
    /// Binds `path` with mode 0600, creating its directory with mode 0700 if missing. A
    /// stale socket (nobody answers) is replaced; a live one is refused.
    pub async fn bind(path: &Path) -> Result<Api, ApiError> {
        let listener = socket::bind(path).await?;
        Ok(Api {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` completes, then removes the socket file.
    pub async fn serve(
        self,
        bus: Bus,
        control: mpsc::Sender<ControlRequest>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ApiError> {
        let streams = TaskTracker::new();
        let state = routes::State::new(bus, control, streams.clone());
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, std::convert::Infallible>(routes::handle(req, state).await) }
                            });
                            if let Err(e) = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                            {
                                tracing::debug!(error = %e, "API connection ended with an error");
                            }
                        });
                    }
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "accepting an API connection failed; continuing");
                    }
                    Err(error) => break Err(ApiError::Accept { path: self.path.clone(), error }),
                }
            }
        };
        // A connection's streaming body goes with it, and its feeding task sees that.
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        streams.close();
        streams.wait().await;
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the API socket");
        }
        result
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    // Out of file descriptors or a connection reset before accept: keep serving.
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::ENOBUFS
                | libc::ENOMEM
        )
    )
}

/// Binds `socket` and serves forever (until the task is dropped).
pub async fn serve(
    socket: &Path,
    bus: Bus,
    control: mpsc::Sender<ControlRequest>,
) -> Result<(), ApiError> {
    Api::bind(socket)
        .await?
        .serve(bus, control, std::future::pending())
        .await
}
