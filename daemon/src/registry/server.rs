//! Listening sockets and the connection loop: HTTP/1.1 with keep-alive, one task per
//! connection, all of them owned by the serving future. Shutdown drains: every request
//! in flight is answered, and a push in flight finishes. A push is several requests
//! (POST, PATCH, PUT per blob, then the manifest), and the Docker engine opens a new
//! connection for each (its registry client disables keep-alive), so once the token is
//! cancelled the listeners stay open until no upload session has been in use for
//! [`DRAIN_IDLE`] (the next blob, or the manifest, follows at once; a session idle that
//! long is a client that went away); a connection closes once it has been idle that
//! long. The whole drain is bounded by kilnd's shutdown. `serve` returns when the last
//! connection has closed.
//! Accept errors (out of descriptors, typically) never stop the server: it waits for a
//! connection to close or backs off, and logs the streak once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::error::RegistryError;
use super::host::HostGuard;
use super::service::Service;
use super::{Hooks, RegistryConfig};
use crate::cache::Cache;

/// Bound listening sockets, ready to serve.
#[derive(Debug)]
pub struct Registry {
    listeners: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
    cfg: RegistryConfig,
}

/// Binds every configured address. Fails if one cannot be bound, except, for the default
/// addresses, one the machine does not have (`[::1]` without IPv6) while another is bound.
pub async fn bind(cfg: RegistryConfig) -> Result<Registry, RegistryError> {
    if cfg.listen.is_empty() {
        return Err(RegistryError::NoAddress);
    }
    let mut listeners = Vec::new();
    let mut skipped = Vec::new();
    for &addr in &cfg.listen {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e)
                if cfg.skip_unavailable
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
            {
                skipped.push((addr, e));
            }
            Err(source) => return Err(RegistryError::Bind { addr, source }),
        }
    }
    if listeners.is_empty() {
        return match skipped.pop() {
            Some((addr, source)) => Err(RegistryError::Bind { addr, source }),
            None => Err(RegistryError::NoAddress),
        };
    }
    for (addr, e) in skipped {
        tracing::warn!(%addr, error = %e, "default registry address unavailable; not listening there");
    }
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| RegistryError::Io {
            what: "the registry's bound address".into(),
            source,
        })?;
    Ok(Registry {
        listeners,
        addrs,
        cfg,
    })
}

impl Registry {
    /// The addresses actually bound (with the real port when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The request handler this registry will use, for in-process tests.
    pub fn service(&self, cache: Arc<Cache>, hooks: Hooks) -> Arc<Service> {
        let mut hosts = self.cfg.allowed_hosts.clone();
        // A configured non-loopback address is reachable by its IP literal.
        hosts.extend(
            self.addrs
                .iter()
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.ip().to_string()),
        );
        Arc::new(Service::new(
            cache,
            HostGuard::new(hosts),
            self.cfg.uploads,
            self.cfg.allow_delete,
            hooks,
        ))
    }

    /// Serves until `shutdown` is cancelled, then drains (module documentation).
    /// Errors of single connections are logged, not returned.
    pub async fn serve(self, cache: Arc<Cache>, hooks: Hooks, shutdown: CancellationToken) {
        let service = self.service(cache, hooks);
        let mut tasks = JoinSet::new();
        let close = CancellationToken::new();
        for listener in self.listeners {
            tasks.spawn(accept_loop(
                listener,
                Arc::clone(&service),
                close.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(close_when_drained(
            Arc::clone(&service),
            shutdown.clone(),
            close.clone(),
        ));
        let reaper = Arc::clone(&service);
        tasks.spawn(async move {
            let period =
                (reaper.uploads().ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        reaper.uploads().expire();
                    }
                    () = close.cancelled() => break,
                }
            }
        });
        while tasks.join_next().await.is_some() {}
    }
}

/// Once `shutdown` is cancelled, cancels `close` (the listeners close) when no upload
/// session has been in use for [`DRAIN_IDLE`]; checks again when that may be so.
async fn close_when_drained(
    service: Arc<Service>,
    shutdown: CancellationToken,
    close: CancellationToken,
) {
    shutdown.cancelled().await;
    loop {
        let quiet = service.uploads().quiet_for();
        if quiet >= DRAIN_IDLE {
            break;
        }
        tracing::debug!("registry: a push is in flight; listening until it ends");
        tokio::time::sleep(DRAIN_IDLE - quiet).await;
    }
    close.cancel();
}

/// After shutdown began: how long a connection must have been idle to be closed, and
/// how long the listeners stay open after the last upload session ended.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// How often a streak of accept errors is logged.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);

/// The shortest and longest pause after an accept error with no connection to wait for.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// Accepts until `close`; each connection drains once `shutdown` is cancelled.
async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    close: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    let mut backoff = BACKOFF.0;
    // Logged once a minute at most, with how many failed in between.
    let mut last_logged: Option<std::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        tokio::select! {
            () = close.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        unlogged += 1;
                        if last_logged.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                            tracing::warn!(
                                error = %e,
                                failures = unlogged,
                                connections = conns.len(),
                                "registry cannot accept connections (out of file descriptors?); \
                                 waiting for connections to close (logged once a minute)"
                            );
                            last_logged = Some(std::time::Instant::now());
                            unlogged = 0;
                        }
                        // A connection that closes frees a descriptor; without one, back
                        // off rather than spin.
                        tokio::select! {
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                            () = tokio::time::sleep(backoff) => {
                                backoff = (backoff * 2).min(BACKOFF.1);
                            }
                            () = close.cancelled() => break,
                        }
                        continue;
                    }
                };
                backoff = BACKOFF.0;
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, peer, Arc::clone(&service), shutdown.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// When a connection last had a request in flight.
#[derive(Debug)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<std::time::Instant>,
}

impl Activity {
    fn mark(&self, delta: isize) {
        use std::sync::atomic::Ordering::SeqCst;
        if delta > 0 {
            self.in_flight.fetch_add(1, SeqCst);
        } else {
            self.in_flight.fetch_sub(1, SeqCst);
        }
        if let Ok(mut last) = self.last.lock() {
            *last = std::time::Instant::now();
        }
    }

    /// How long the connection has been idle (zero while a request is in flight).
    fn idle(&self) -> Duration {
        if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last.lock().map_or(Duration::MAX, |l| l.elapsed())
    }
}

/// One connection, until the client closes it or, after shutdown, it has been idle for
/// [`DRAIN_IDLE`] and its request in flight is answered.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity {
        in_flight: 0.into(),
        last: std::sync::Mutex::new(std::time::Instant::now()),
    });
    let seen = Arc::clone(&activity);
    let svc = hyper::service::service_fn(move |req| {
        let service = Arc::clone(&service);
        let seen = Arc::clone(&seen);
        seen.mark(1);
        async move {
            let response = service.handle(req, peer).await;
            seen.mark(-1);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60))
        .keep_alive(true)
        .serve_connection(TokioIo::new(super::wire::Wire::new(stream)), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => loop {
            let idle = activity.idle();
            if idle >= DRAIN_IDLE {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            tokio::select! {
                r = conn.as_mut() => break r,
                () = tokio::time::sleep(DRAIN_IDLE - idle) => {}
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "registry connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(listen: &[&str], default: bool) -> RegistryConfig {
        RegistryConfig {
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            skip_unavailable: default,
            ..RegistryConfig::default()
        }
    }

    #[tokio::test]
    async fn binds_port_zero_and_reports_real_ports() {
        let reg = bind(cfg(&["127.0.0.1:0", "127.0.0.2:0"], false))
            .await
            .unwrap();
        let addrs = reg.local_addrs();
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|a| a.port() != 0));
        // The port is taken now: binding it again fails and says where.
        let err = bind(cfg(&[&addrs[0].to_string()], false))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Bind { addr, .. } if addr == addrs[0]),
            "{err}"
        );
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_default_address_is_skipped_an_explicit_one_fails() {
        // 192.0.2.1 (TEST-NET-1) is on no interface here.
        let reg = bind(cfg(&["127.0.0.1:0", "192.0.2.1:0"], true))
            .await
            .unwrap();
        assert_eq!(reg.local_addrs().len(), 1);
        let err = bind(cfg(&["127.0.0.1:0", "192.0.2.1:0"], false))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Bind { .. }), "{err}");
        let err = bind(cfg(&["192.0.2.1:0"], true)).await.unwrap_err();
        assert!(matches!(err, RegistryError::Bind { .. }), "{err}");
        assert!(matches!(
            bind(cfg(&[], false)).await,
            Err(RegistryError::NoAddress)
        ));
    }

    #[tokio::test]
    async fn configured_addresses_are_accepted_hosts() {
        let reg = bind(cfg(&["127.0.0.1:0"], false)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path()).unwrap());
        let svc = reg.service(cache, Hooks::default());
        let req = |host: &str| {
            http::Request::get("/v2/")
                .header("host", host)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        let peer = reg.local_addrs()[0];
        assert_eq!(svc.handle(req("127.0.0.1"), peer).await.status(), 200);
        assert_eq!(svc.handle(req("example.com"), peer).await.status(), 403);
    }
}
