//! The kilnd client: HTTP/1.1 over the control socket, one connection per request, the
//! protocol version sent and checked on every exchange, the NDJSON event stream and
//! followed logs read line by line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_shared::protocol::{
    API_PREFIX, BuildId, ErrorBody, PROTOCOL_HEADER, PROTOCOL_VERSION, Snapshot, StreamItem,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// Why talking to kilnd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach kilnd at {socket}: {error}; start it with `kiln up [DIR]` or pass --socket"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("talking to kilnd at {socket} failed: {error}")]
    Http {
        socket: PathBuf,
        #[source]
        error: hyper::Error,
    },
    #[error("kilnd answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error(
        "kilnd at {socket} speaks protocol version {theirs}, this kiln speaks {PROTOCOL_VERSION}: use kiln and kilnd from the same release"
    )]
    Version { socket: PathBuf, theirs: String },
    #[error("kilnd sent something this kiln cannot read: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("kilnd sent an event stream line that this kiln cannot read: {0}")]
    DecodeEvent(#[source] serde_json::Error),
    #[error("kilnd sent a line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot make the request: {0}")]
    Request(#[source] http::Error),
}

impl ClientError {
    /// True when no kilnd answers on the socket (as opposed to one answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// The default socket: kilnd's default, from the same environment.
pub fn default_socket() -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    kiln_shared::protocol::default_socket_path(runtime, default_cache_dir())
}

/// kilnd's default cache directory: `$KILN_CACHE`, else kilnd's own default
/// (`$XDG_CACHE_HOME/kiln`, `~/.cache/kiln`).
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("KILN_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(kiln_shared::protocol::default_cache_dir)
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-cache"))
}

/// A client for one socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Connect {
                    socket: self.socket.clone(),
                    error,
                })?;
        let http = |error| ClientError::Http {
            socket: self.socket.clone(),
            error,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "kilnd connection ended");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{API_PREFIX}{path}"))
            .header(http::header::HOST, "kilnd")
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(ClientError::Request)?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let theirs = resp
            .headers()
            .get(PROTOCOL_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        if theirs != PROTOCOL_VERSION.to_string() {
            return Err(ClientError::Version {
                socket: self.socket.clone(),
                theirs,
            });
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = collect(resp, &self.socket).await?;
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Status { status, message });
        }
        Ok(resp)
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.request(Method::GET, path, None).await?;
        decode(&collect(resp, &self.socket).await?)
    }

    /// POST a JSON document, read a JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        let resp = self.request(Method::POST, path, Some(body)).await?;
        decode(&collect(resp, &self.socket).await?)
    }

    pub async fn state(&self) -> Result<Snapshot, ClientError> {
        self.get("/state").await
    }

    /// The event stream: a snapshot, then events.
    pub async fn events(&self) -> Result<Lines, ClientError> {
        let resp = self.request(Method::GET, "/events", None).await?;
        Ok(Lines::new(resp.into_body(), self.socket.clone()))
    }

    /// A build's log, whole or followed until the build ends.
    pub async fn log(&self, build: &BuildId, follow: bool) -> Result<Lines, ClientError> {
        let path = format!(
            "/builds/{}/log{}",
            build.0,
            if follow { "?follow=1" } else { "" }
        );
        let resp = self.request(Method::GET, &path, None).await?;
        Ok(Lines::new(resp.into_body(), self.socket.clone()))
    }
}

async fn collect(resp: hyper::Response<Incoming>, socket: &Path) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|error| ClientError::Http {
            socket: socket.to_owned(),
            error,
        })?
        .to_bytes())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(ClientError::Decode)
}

/// The longest line accepted from a stream (a snapshot of a big workspace is one line).
const MAX_LINE: usize = 64 << 20;

/// A response body read as lines.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    socket: PathBuf,
    done: bool,
}

impl Lines {
    fn new(body: Incoming, socket: PathBuf) -> Self {
        Lines {
            body,
            buf: BytesMut::new(),
            socket,
            done: false,
        }
    }

    fn take_line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|&b| b == b'\n')?;
        let line = self.buf.split_to(i + 1);
        Some(String::from_utf8_lossy(&line[..i]).into_owned())
    }

    /// The next line, `None` at the end of the stream.
    pub async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(line) = self.take_line() {
                return Ok(Some(line));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = self.buf.split();
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(error)) => {
                    return Err(ClientError::Http {
                        socket: self.socket.clone(),
                        error,
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        if self.buf.len() + data.remaining() > MAX_LINE {
                            return Err(ClientError::LineTooLong(MAX_LINE));
                        }
                        self.buf
                            .extend_from_slice(&data.copy_to_bytes(data.remaining()));
                    }
                }
            }
        }
    }

    /// All lines available without waiting, up to `max`, after at least one (waiting for
    /// it). `None` at the end of the stream. Batching keeps a fast log from costing a
    /// message (and a redraw) per line.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<String>>, ClientError> {
        let Some(first) = self.next_line().await? else {
            return Ok(None);
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.take_line() {
                Some(l) => batch.push(l),
                None => break,
            }
        }
        Ok(Some(batch))
    }

    /// The next stream item of an event stream.
    pub async fn next_item(&mut self) -> Result<Option<StreamItem>, ClientError> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(ClientError::DecodeEvent),
        }
    }
}

/// The reconnect delay after `attempt` failed attempts: 100 ms doubling to 2 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)).min(2000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_daemon_is_unreachable_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::new(dir.path().join("none.sock"))
            .state()
            .await
            .unwrap_err();
        assert!(e.is_unreachable());
        assert!(e.to_string().contains("kiln up"), "{e}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(1600));
        assert_eq!(backoff(5), Duration::from_millis(2000));
        assert_eq!(backoff(60), Duration::from_millis(2000));
    }
}
