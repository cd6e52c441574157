//! Listening sockets and the connection loop: HTTP/1.1 with keep-alive, one task per
//! connection, all of them owned by the serving future (dropping it closes everything).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

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

/// Binds every configured address. Fails if one cannot be bound, except an IPv6
/// loopback address on a machine without IPv6 while another address is bound.
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
                if addr.ip() == IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
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
        tracing::warn!(%addr, error = %e, "IPv6 loopback unavailable; registry not listening there");
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
            self.cfg.upload_ttl,
            hooks,
        ))
    }

    /// Serves until the returned future is dropped (which closes the listeners and every
    /// connection). Errors of single connections are logged, not returned.
    pub async fn serve(self, cache: Arc<Cache>, hooks: Hooks) {
        let service = self.service(cache, hooks);
        let mut tasks = JoinSet::new();
        for listener in self.listeners {
            tasks.spawn(accept_loop(listener, Arc::clone(&service)));
        }
        let reaper = Arc::clone(&service);
        tasks.spawn(async move {
            let period =
                (reaper.uploads().ttl() / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                reaper.uploads().expire();
            }
        });
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(listener: TcpListener, service: Arc<Service>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, typically: let a connection close
                        // before accepting again, rather than spinning.
                        tracing::warn!(error = %e, "registry accept failed");
                        if conns.join_next().await.is_none() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = Arc::clone(&service);
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let service = Arc::clone(&service);
                        async move { Ok::<_, std::convert::Infallible>(service.handle(req, peer).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(60))
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "registry connection ended with an error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
