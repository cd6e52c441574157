//! Benchmark driver for `scripts/bench-native` (run it through that script).
//!
//! - `small <package-dir> <work-dir> <runs>`: builds the package natively for amd64 and
//!   arm64 `runs` times, each into a fresh cache; prints each time and the median.
//! - `gen <dir> <bytes> <files>`: writes `files` files of pseudo-random text-like data
//!   (`bytes` in total) and a `FROM scratch` / `COPY data /data` Dockerfile.
//! - `large <package-dir> <work-dir>`: builds that package for amd64 into a fresh cache.
//! - `gzip <dir> <bytes>`: compresses the first `bytes` of the generated data on one
//!   thread, in the builder's chunks and level: the gzip rate of one core.
//!
//! Results are printed as `key=value` lines for the script.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_daemon::build::native::{CHUNK, CacheResolver, LEVEL, NativeBuild, build};
use kiln_daemon::cache::Cache;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["small", pkg, work, runs] => small(Path::new(pkg), Path::new(work), runs.parse()?),
        ["gen", dir, bytes, files] => generate(Path::new(dir), bytes.parse()?, files.parse()?),
        ["large", pkg, work] => large(Path::new(pkg), Path::new(work)),
        ["gzip", dir, bytes] => gzip_rate(Path::new(dir), bytes.parse()?),
        _ => bail!("usage: bench_native small|gen|large|gzip ... (see the source)"),
    }
}

fn input(pkg: &Path, arches: &[&str]) -> anyhow::Result<NativeBuild> {
    Ok(NativeBuild {
        context: pkg.to_owned(),
        dockerfile: pkg.join("Dockerfile"),
        extra_sources: Vec::new(),
        image: "kiln/bench:native".parse()?,
        arches: arches.iter().map(|a| (a.to_string(), None)).collect(),
        build_args: BTreeMap::new(),
        labels: BTreeMap::new(),
        source_date_epoch: 0,
        target: None,
        network: false,
        no_cache: false,
        cancel: Default::default(),
    })
}

fn dir_bytes(p: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

fn small(pkg: &Path, work: &Path, runs: usize) -> anyhow::Result<()> {
    let input = input(pkg, &["amd64", "arm64"])?;
    let bytes = dir_bytes(pkg)?;
    let mut times = Vec::new();
    for i in 0..runs {
        let root = work.join(format!("small-{i}"));
        let _ = std::fs::remove_dir_all(&root);
        let cache = Cache::open(&root)?;
        let t = Instant::now();
        let out = build(&cache, &input, &CacheResolver, &mut |_| {})?;
        let s = t.elapsed().as_secs_f64();
        println!("run {i}: {:.1} ms  index {}", s * 1e3, out.index.digest);
        times.push(s);
        std::fs::remove_dir_all(&root)?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("small_bytes={bytes}");
    println!("small_native_s={median:.6}");
    Ok(())
}

fn generate(dir: &Path, bytes: u64, files: u64) -> anyhow::Result<()> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY data /data\n")?;
    let per = bytes / files;
    const ALPHABET: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,;:-_/()=+*";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; per as usize];
    for f in 0..files {
        let sub = data.join(format!("{:03}", f / 100));
        if f % 100 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        for b in buf.iter_mut() {
            // xorshift64*: fast, deterministic, not very compressible.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            *b = ALPHABET[(r >> 58) as usize % ALPHABET.len()];
        }
        std::fs::File::create(sub.join(format!("f{f:05}")))?.write_all(&buf)?;
    }
    println!("generated_bytes={}", per * files);
    Ok(())
}

fn large(pkg: &Path, work: &Path) -> anyhow::Result<()> {
    let input = input(pkg, &["amd64"])?;
    let root = work.join("large");
    let _ = std::fs::remove_dir_all(&root);
    let cache = Cache::open(&root)?;
    let bytes = dir_bytes(&pkg.join("data"))?;
    let cpu0 = cpu_seconds()?;
    let t = Instant::now();
    let mut lines = Vec::new();
    build(&cache, &input, &CacheResolver, &mut |l| lines.push(l))?;
    let s = t.elapsed().as_secs_f64();
    println!("large_cpu_s={:.2}", cpu_seconds()? - cpu0);
    for l in lines.iter().filter(|l| l.contains("layer")) {
        println!("{l}");
    }
    std::fs::remove_dir_all(&root)?;
    println!("large_bytes={bytes}");
    println!("large_native_s={s:.3}");
    Ok(())
}

fn gzip_rate(dir: &Path, bytes: usize) -> anyhow::Result<()> {
    let mut data = Vec::with_capacity(bytes);
    let mut paths: Vec<PathBuf> = Vec::new();
    for d in std::fs::read_dir(dir.join("data"))? {
        for f in std::fs::read_dir(d?.path())? {
            paths.push(f?.path());
        }
    }
    paths.sort();
    for p in paths {
        if data.len() >= bytes {
            break;
        }
        std::fs::File::open(&p)
            .with_context(|| p.display().to_string())?
            .read_to_end(&mut data)?;
    }
    data.truncate(bytes);
    let cpu0 = cpu_seconds()?;
    let t = Instant::now();
    let mut out = 0usize;
    for chunk in data.chunks(CHUNK) {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(LEVEL));
        enc.write_all(chunk)?;
        out += enc.finish()?.len();
    }
    let s = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;
    println!("gzip_one_core_mbps={:.1}", data.len() as f64 / s / 1e6);
    println!(
        "gzip_one_core_cpu_mbps={:.1}",
        data.len() as f64 / cpu / 1e6
    );
    println!("gzip_ratio={:.3}", out as f64 / data.len() as f64);
    Ok(())
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat`, in seconds;
/// `CLK_TCK` comes from the environment (the script passes `getconf CLK_TCK`).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz: f64 = std::env::var("CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    Ok(ticks / hz)
}
