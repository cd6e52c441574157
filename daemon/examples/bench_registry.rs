//! Serves a cache directory with kiln's registry, for `scripts/bench-registry` and for
//! trying clients by hand: `bench_registry <cache-dir> [addr]`. Prints the bound
//! address on stdout once it accepts connections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_daemon::cache::Cache;
use kiln_daemon::registry::{self, Hooks, RegistryConfig};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: bench_registry <cache-dir> [addr]"))?,
    );
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cache = Arc::new(Cache::open(&dir)?);
        let reg = registry::bind(RegistryConfig {
            listen: vec![addr],
            skip_unavailable: false,
            ..RegistryConfig::default()
        })
        .await?;
        println!("{}", reg.local_addrs()[0]);
        reg.serve(
            cache,
            Hooks::default(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        Ok(())
    })
}
