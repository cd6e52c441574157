//! Times kiln's docker builder on a package whose one `COPY` source changes: each
//! iteration changes the file and builds every arch at once through
//! `kiln_daemon::docker_build::build_arch`, pushing into a registry, until each arch's
//! manifest is served. Driven by `scripts/bench-build`, which also times the by-hand loop.
//!
//! Usage: bench_build --registry HOST:PORT --package DIR [--iterations N]
//!        [--arches amd64,arm64] [--engine ENDPOINT]
//! Prints one line per iteration and, last, `kiln_median_ms <ms>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_daemon::docker_build::{DockerBuild, Engine, LogLine, build_arch};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = None;
    let mut package = None;
    let mut iterations = 5usize;
    let mut arches = vec!["amd64".to_owned(), "arm64".to_owned()];
    let mut endpoint = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--registry" => registry = Some(value()?),
            "--package" => package = Some(PathBuf::from(value()?)),
            "--iterations" => iterations = value()?.parse()?,
            "--arches" => arches = value()?.split(',').map(str::to_owned).collect(),
            "--engine" => endpoint = Some(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    let registry = registry.context("--registry HOST:PORT is required")?;
    let package = package.context("--package DIR is required")?;
    let engine = Engine::connect(endpoint.as_deref()).await?;
    let file = package.join("file");
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();

    let mut times = Vec::new();
    // Iteration 0 warms the engine's cache (base image, layers in the registry).
    for i in 0..=iterations {
        std::fs::write(
            &file,
            format!("content of iteration {i} at {:?}\n", Instant::now()),
        )?;
        let t0 = Instant::now();
        let mut builds = Vec::new();
        for arch in &arches {
            builds.push(DockerBuild {
                context_dir: package.clone(),
                dockerfile: "Dockerfile".into(),
                extra_sources: vec![],
                image: format!("bench/kiln:i{i}").parse()?,
                arch: arch.clone(),
                build_args: BTreeMap::new(),
                labels: BTreeMap::new(),
                network: false,
                no_cache: false,
            });
        }
        let futures = builds.iter().map(|b| {
            let engine = &engine;
            let registry = &registry;
            async move {
                let arch = &b.arch;
                let mut log = |l: LogLine| {
                    if verbose {
                        println!("  {arch} {:6} ms {}", l.at_ms, l.text);
                    }
                };
                build_arch(engine, b, registry, &mut log, CancellationToken::new()).await
            }
        });
        let results = futures_util::future::join_all(futures).await;
        let ms = t0.elapsed().as_millis();
        let mut summary = Vec::new();
        for (b, r) in builds.iter().zip(results) {
            let o = r?;
            summary.push(format!(
                "{} {} ({} cached, {} pushed, {} existing)",
                b.arch,
                o.manifest.digest.short(12),
                o.cache_hits,
                o.push.pushed,
                o.push.existing
            ));
        }
        let label = if i == 0 { "warm-up" } else { "kiln" };
        println!("{label} {i}: {ms} ms  {}", summary.join(", "));
        if i > 0 {
            times.push(ms);
        }
    }
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or(0);
    println!("kiln_median_ms {median}");
    Ok(())
}
