//! Benchmark for `scripts/bench-workspace`: discovers and tags every package under a
//! workspace (cold), then edits one file at a time and times the re-tag.
//!
//! Usage: bench_workspace ROOT [EDITS]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_daemon::workspace::{Tagger, Workspace};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().context("usage: bench_workspace ROOT [EDITS]")?);
    let edits: usize = args.next().map_or(Ok(21), |s| s.parse())?;

    let c0 = cpu();
    let t0 = Instant::now();
    let ws = Workspace::discover(std::slice::from_ref(&root));
    let discovered = t0.elapsed();
    let mut tagger = Tagger::new();
    let mut dirty = 0;
    let mut pkgs = Vec::new();
    for p in ws.packages.values() {
        pkgs.push(p.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    for tag in tagger.tag_all(&pkgs) {
        let tag = tag.map_err(|e| anyhow::anyhow!("{e}"))?;
        dirty += usize::from(tag.as_str().contains("dirty"));
    }
    let cold = t0.elapsed();
    let cold_cpu = cpu() - c0;
    println!(
        "cold: {} packages discovered in {:.1} ms, discovered and tagged in {:.1} ms wall, {:.1} ms CPU ({} files read, {dirty} dirty)",
        ws.packages.len(),
        ms(discovered),
        ms(cold),
        ms(cold_cpu),
        tagger.files_read()
    );
    if ws.packages.is_empty() {
        bail!("no packages under {}", root.display());
    }

    let pkgs: Vec<_> = ws
        .packages
        .values()
        .filter_map(|p| p.as_ref().ok())
        .collect();
    let mut times = Vec::new();
    let mut cpus = Vec::new();
    for i in 0..edits {
        let pkg = pkgs[(i * 37) % pkgs.len()];
        let file = pkg.dir.join("src/file0.txt");
        std::fs::write(&file, format!("edit {i}\n"))?;
        let c = cpu();
        let t = Instant::now();
        let before = tagger.files_read();
        let affected = tagger.invalidate(std::slice::from_ref(&file));
        let mut tags = Vec::new();
        for dir in &affected {
            if let Some(Ok(p)) = ws.packages.get(dir) {
                tags.push(tagger.tag(p).map_err(|e| anyhow::anyhow!("{e}"))?);
            }
        }
        let took = t.elapsed();
        cpus.push(cpu() - c);
        if affected.len() != 1 || !tags[0].as_str().contains("-dirty-") {
            bail!("edit {i}: affected {affected:?}, tags {tags:?}");
        }
        if i == 0 {
            println!(
                "first edit: {} re-tagged as {} ({} files read)",
                affected[0].display(),
                tags[0],
                tagger.files_read() - before
            );
        }
        times.push(took);
    }
    times.sort();
    cpus.sort();
    println!(
        "re-tag after editing one file: median {:.3} ms wall ({:.3} ms CPU), min {:.3} ms, max {:.3} ms over {edits} edits",
        ms(times[times.len() / 2]),
        ms(cpus[cpus.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
    Ok(())
}

/// User + system CPU time of this process (children excluded: git's own time is
/// wall time here).
fn cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer it is given.
    #[allow(unsafe_code)]
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
