//! Times the cache's maintenance on a synthetic cache: fills a cache directory with images
//! (manifests, configs, layers), then measures `stats`, `fsck` and `gc` (with a size cap
//! that drops half the references).
//!
//! `cargo run -p kiln-daemon --example cache_bench -- [IMAGES] [LAYER_BYTES] [DIR]`
//! (defaults: 200 images of 4 layers of 1 MiB, a temp directory).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln_daemon::cache::{Cache, GcOptions, fsck, gc, stats};
use kiln_daemon::oci::{Descriptor, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use kiln_shared::size::format_size;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let images: u64 = args.next().map_or(Ok(200), |a| a.parse())?;
    let layer_bytes: usize = args.next().map_or(Ok(1 << 20), |a| a.parse())?;
    let tmp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map_or_else(|| tmp.path().join("cache"), Into::into);
    let cache = Cache::open(&dir).context("opening the cache")?;

    let t = Instant::now();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut layer = vec![0u8; layer_bytes];
    for i in 0..images {
        let mut layers = Vec::new();
        for _ in 0..4 {
            for chunk in layer.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let bytes = state.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let d = cache.put_blob(&layer)?;
            layers.push(Descriptor::new(OCI_LAYER_GZIP, d, layer_bytes as u64));
        }
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#);
        let config_d = cache.put_blob(config.as_bytes())?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": Descriptor::new(OCI_CONFIG, config_d, config.len() as u64),
            "layers": layers,
        }))?;
        let d = cache.put_blob(&manifest)?;
        cache.set_ref(
            &format!("docker.io/bench/img{i}:1"),
            Descriptor::new(OCI_MANIFEST, d, manifest.len() as u64),
        )?;
    }
    println!("fill: {images} images in {:.2?}", t.elapsed());

    let t = Instant::now();
    let s = stats(&cache)?;
    println!("stats: {s} in {:.2?}", t.elapsed());

    let t = Instant::now();
    let report = fsck(&cache, false)?;
    let took = t.elapsed();
    println!(
        "fsck: {} blobs, {} in {took:.2?} ({}/s), clean: {}",
        report.blobs_checked,
        format_size(report.bytes_checked),
        format_size((report.bytes_checked as f64 / took.as_secs_f64()) as u64),
        report.is_clean()
    );

    let t = Instant::now();
    let report = gc(
        &cache,
        GcOptions {
            max_size: Some(s.blob_bytes / 2),
            grace: Duration::ZERO,
            dry_run: false,
        },
    )?;
    println!(
        "gc to half: {} in {:.2?}",
        report.to_string().lines().next().unwrap_or_default(),
        t.elapsed()
    );
    let t = Instant::now();
    let report = gc(&cache, GcOptions::default())?;
    println!(
        "gc, nothing to do: {} in {:.2?}",
        report.to_string().lines().next().unwrap_or_default(),
        t.elapsed()
    );
    Ok(())
}
