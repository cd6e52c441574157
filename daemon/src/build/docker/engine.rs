//! Docker engines: where a build runs. An endpoint is `unix:///path` or `tcp://host:port`
//! (the default is `DOCKER_HOST`, else the local socket); one engine may be configured per
//! platform (`--engine linux/arm64=tcp://host:2375`), so a native arm64 machine builds
//! arm64.
//!
//! [`Engine`] wraps a bollard client (API version negotiated, so a 20.10 engine's API 1.41
//! is used) for everything but the build request itself. `POST /build` is sent here on a
//! connection of its own: bollard cannot drive a BuildKit build without a session (its
//! `buildkit` feature insists on one) and, without that feature, stops at the first
//! `moby.buildkit.trace` progress message, which it cannot parse. A 20.10 engine takes a
//! BuildKit build with the context as the request body and no session.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The engine used when neither `--engine` nor `DOCKER_HOST` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "unix:///var/run/docker.sock";

/// How long connecting to (and pinging) an engine may take before it counts as
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// bollard's per-request timeout. Builds do not use it (they have their own connection);
/// a push of a large image may take long, and cancellation is kiln's own.
const REQUEST_TIMEOUT_SECS: u64 = 3600;

/// Why an engine cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(
        "invalid Docker engine endpoint {0:?}: expected unix:///path/to/docker.sock or \
         tcp://host:port"
    )]
    BadEndpoint(String),
    #[error(
        "invalid --engine {0:?}: expected PLATFORM=ENDPOINT, e.g. \
         linux/arm64=tcp://host:2375"
    )]
    BadFlag(String),
    #[error(
        "cannot reach the Docker engine at {endpoint}: {}; start dockerd or set \
         DOCKER_HOST / --engine",
        kiln_shared::error::Chain(&**.source)
    )]
    Unreachable {
        endpoint: Endpoint,
        /// Shared: the engine's state is reported to every build that asks.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "cannot reach the Docker engine at {endpoint}: no answer within {timeout:?}; start \
         dockerd or set DOCKER_HOST / --engine"
    )]
    NoAnswer {
        endpoint: Endpoint,
        timeout: Duration,
    },
}

/// Where an engine listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `tcp://host:port` (or `http://host:port`) or an absolute
    /// socket path.
    pub fn parse(s: &str) -> Result<Endpoint, EngineError> {
        let bad = || EngineError::BadEndpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        let rest = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("http://"))
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || rest.contains('/') {
            return Err(bad());
        }
        Ok(Endpoint::Tcp(rest.to_owned()))
    }

    /// `DOCKER_HOST` if set, else the local socket.
    pub fn from_env() -> Result<Endpoint, EngineError> {
        match std::env::var("DOCKER_HOST") {
            Ok(s) if !s.is_empty() => Endpoint::parse(&s),
            _ => Endpoint::parse(DEFAULT_ENDPOINT),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Parses one `--engine PLATFORM=ENDPOINT` flag (or `kiln.toml` entry) into
/// `("linux/arm64", "tcp://host:2375")`. The platform is `os/arch[/variant]`.
pub fn parse_engine_flag(flag: &str) -> Result<(String, String), EngineError> {
    let bad = || EngineError::BadFlag(flag.to_owned());
    let (platform, endpoint) = flag.split_once('=').ok_or_else(bad)?;
    let platform = platform.trim();
    let parts: Vec<&str> = platform.split('/').collect();
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| valid_part(p)) {
        return Err(bad());
    }
    let endpoint = endpoint.trim();
    Endpoint::parse(endpoint)?;
    Ok((platform.to_owned(), endpoint.to_owned()))
}

/// A Docker engine kiln can build on.
#[derive(Debug, Clone)]
pub struct Engine {
    endpoint: Endpoint,
    docker: Docker,
    /// The client with the API version agreed with the engine, once known.
    negotiated: Arc<Mutex<Option<Docker>>>,
}

impl Engine {
    /// A client for `endpoint` (default: `DOCKER_HOST`, else the local socket), without
    /// talking to it yet.
    pub fn new(endpoint: Option<&str>) -> Result<Engine, EngineError> {
        let endpoint = match endpoint {
            Some(s) => Endpoint::parse(s)?,
            None => Endpoint::from_env()?,
        };
        let docker = match &endpoint {
            Endpoint::Unix(p) => Docker::connect_with_unix(
                &p.to_string_lossy(),
                REQUEST_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            ),
            Endpoint::Tcp(a) => {
                Docker::connect_with_http(a, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
            }
        }
        .map_err(|e| EngineError::Unreachable {
            endpoint: endpoint.clone(),
            source: Arc::new(e),
        })?;
        Ok(Engine {
            endpoint,
            docker,
            negotiated: Arc::default(),
        })
    }

    /// Connects to the engine at `endpoint` (default: `DOCKER_HOST`, else the local
    /// socket) and checks that it answers.
    pub async fn connect(endpoint: Option<&str>) -> Result<Engine, EngineError> {
        let engine = Engine::new(endpoint)?;
        engine.client().await?;
        Ok(engine)
    }

    /// A client that speaks the lower of the engine's API version and bollard's (a 20.10
    /// engine refuses bollard's newer default). The first call asks the engine (and is the
    /// reachability check); later calls reuse the answer until [`Engine::forget_version`].
    pub async fn client(&self) -> Result<Docker, EngineError> {
        if let Some(d) = self.lock_negotiated().as_ref() {
            return Ok(d.clone());
        }
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, self.docker.clone().negotiate_version())
            .await
            .map_err(|_| EngineError::NoAnswer {
                endpoint: self.endpoint.clone(),
                timeout: CONNECT_TIMEOUT,
            })?
            .map_err(|e| EngineError::Unreachable {
                endpoint: self.endpoint.clone(),
                source: Arc::new(e),
            })?;
        *self.lock_negotiated() = Some(docker.clone());
        Ok(docker)
    }

    /// Makes the next [`Engine::client`] ask the engine again (after the engine went
    /// away: it may come back as another version).
    pub fn forget_version(&self) {
        *self.lock_negotiated() = None;
    }

    fn lock_negotiated(&self) -> std::sync::MutexGuard<'_, Option<Docker>> {
        self.negotiated.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `POST /build?query` with `body` as the context on a connection of its own.
    /// The returned guard owns the connection: dropping it closes the connection, which
    /// makes the engine cancel the build.
    pub(crate) async fn post_build<S>(
        &self,
        client: &Docker,
        query: &str,
        body: S,
    ) -> Result<(hyper::Response<Incoming>, ConnectionGuard), io::Error>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Sync + 'static,
    {
        let body: BoxBody<Bytes, io::Error> =
            BodyExt::boxed(StreamBody::new(body.map(|r| r.map(Frame::data))));
        let v = client.client_version();
        let path = format!("/v{}.{}/build?{query}", v.major_version, v.minor_version);
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, "docker")
            .header(hyper::header::CONTENT_TYPE, "application/x-tar")
            .body(body)
            .map_err(io::Error::other)?;
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(p))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                send(s, req).await
            }
            Endpoint::Tcp(a) => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(a))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                s.set_nodelay(true)?;
                send(s, req).await
            }
        }
    }
}

/// Owns a build's connection task; dropping it aborts the connection.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(tokio::task::JoinHandle<()>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<S>(
    io: S,
    req: hyper::Request<BoxBody<Bytes, io::Error>>,
) -> Result<(hyper::Response<Incoming>, ConnectionGuard), io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    let guard = ConnectionGuard(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "build connection ended");
        }
    }));
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| io::Error::other(kiln_shared::error::chain(&e)))?;
    Ok((resp, guard))
}

/// Which engine builds which platform: a default plus per-platform overrides.
#[derive(Debug)]
pub struct Engines {
    default: Option<String>,
    per_platform: BTreeMap<String, String>,
    clients: Mutex<HashMap<String, Arc<Engine>>>,
}

impl Engines {
    /// `default` is the `--engine ENDPOINT` / `DOCKER_HOST` choice (None: the
    /// environment's); `flags` are `PLATFORM=ENDPOINT` entries (later ones win).
    pub fn new(default: Option<&str>, flags: &[String]) -> Result<Engines, EngineError> {
        if let Some(d) = default {
            Endpoint::parse(d)?;
        }
        let mut per_platform = BTreeMap::new();
        for f in flags {
            let (platform, endpoint) = parse_engine_flag(f)?;
            per_platform.insert(platform, endpoint);
        }
        Ok(Engines {
            default: default.map(str::to_owned),
            per_platform,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// As [`Engines::new`], from `kiln.toml`'s table of platform = endpoint entries.
    pub fn from_table(
        default: Option<&str>,
        table: &BTreeMap<String, String>,
    ) -> Result<Engines, EngineError> {
        let flags: Vec<String> = table.iter().map(|(p, e)| format!("{p}={e}")).collect();
        Engines::new(default, &flags)
    }

    /// The configured per-platform endpoints.
    pub fn per_platform(&self) -> &BTreeMap<String, String> {
        &self.per_platform
    }

    /// The engine for `platform` (`linux/arm64`), created on first use. Its API version
    /// is negotiated on the first build (see [`super::build_arch`]).
    pub fn engine_for(&self, platform: &str) -> Result<Arc<Engine>, EngineError> {
        let endpoint = self
            .per_platform
            .get(platform)
            .map(String::as_str)
            .or(self.default.as_deref());
        let key = endpoint.unwrap_or("").to_owned();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = clients.get(&key) {
            return Ok(Arc::clone(e));
        }
        let engine = Arc::new(Engine::new(endpoint)?);
        clients.insert(key, Arc::clone(&engine));
        Ok(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_display() {
        assert_eq!(
            Endpoint::parse("unix:///var/run/docker.sock").unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/run/d.sock").unwrap().to_string(),
            "unix:///run/d.sock"
        );
        assert_eq!(
            Endpoint::parse("tcp://10.0.0.2:2375").unwrap(),
            Endpoint::Tcp("10.0.0.2:2375".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://[::1]:2375").unwrap().to_string(),
            "tcp://[::1]:2375"
        );
        for bad in [
            "",
            "tcp://host",
            "tcp://:1",
            "ssh://h",
            "unix://rel",
            "tcp://h:99999",
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert!(e.to_string().contains("unix:///"), "{bad}: {e}");
        }
    }

    #[test]
    fn engine_flags_parse() {
        assert_eq!(
            parse_engine_flag("linux/arm64=tcp://host:2375").unwrap(),
            ("linux/arm64".into(), "tcp://host:2375".into())
        );
        assert_eq!(
            parse_engine_flag("linux/arm/v7=unix:///x.sock").unwrap().0,
            "linux/arm/v7"
        );
        for bad in [
            "linux/arm64",
            "arm64=tcp://h:1",
            "linux/arm64=h:1",
            "linux//x=tcp://h:1",
        ] {
            assert!(parse_engine_flag(bad).is_err(), "{bad}");
        }
        let e = parse_engine_flag("nope").unwrap_err();
        assert!(e.to_string().contains("linux/arm64=tcp://host:2375"), "{e}");
    }

    #[test]
    fn engines_pick_per_platform() {
        let engines = Engines::new(
            Some("unix:///var/run/docker.sock"),
            &["linux/arm64=tcp://127.0.0.1:2375".to_owned()],
        )
        .unwrap();
        assert_eq!(
            engines.engine_for("linux/arm64").unwrap().endpoint(),
            &Endpoint::Tcp("127.0.0.1:2375".into())
        );
        assert_eq!(
            engines.engine_for("linux/amd64").unwrap().endpoint(),
            &Endpoint::Unix("/var/run/docker.sock".into())
        );
        let table = BTreeMap::from([("linux/arm64".to_owned(), "tcp://h:1".to_owned())]);
        let from_toml = Engines::from_table(None, &table).unwrap();
        assert_eq!(from_toml.per_platform()["linux/arm64"], "tcp://h:1");
        let bad = BTreeMap::from([("arm64".to_owned(), "tcp://h:1".to_owned())]);
        assert!(Engines::from_table(None, &bad).is_err());
        let a = engines.engine_for("linux/arm64").unwrap();
        let b = engines.engine_for("linux/arm64").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one client per endpoint");
    }

    #[tokio::test]
    async fn unreachable_engine_says_where_and_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("nothing.sock");
        let e = Engine::connect(Some(&format!("unix://{}", sock.display())))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("unix://{}", sock.display())), "{msg}");
        assert!(
            msg.contains("start dockerd or set DOCKER_HOST / --engine"),
            "{msg}"
        );
        // A TCP port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Engine::connect(Some(&format!("tcp://127.0.0.1:{port}")))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("tcp://127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("refused"), "{msg}");
    }
}
