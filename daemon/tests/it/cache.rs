//! The cache under crashes and concurrency: a writer process killed at random moments
//! never leaves a corrupt blob or a dangling reference; gc never removes what
//! `index.json` reaches, whatever the graph, and neither disturbs a reader streaming a
//! blob it deletes nor loses a blob a writer is re-uploading.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_daemon::cache::{Cache, GcOptions, fsck, gc, stats};
use kiln_daemon::oci::{
    AnyManifest, Descriptor, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Platform,
    is_index, is_manifest,
};
use kiln_shared::digest::Digest;
use kiln_shared::reference::ImageRef;
use sha2::{Digest as _, Sha256};

/// xorshift64*: small, seedable, good enough to pick moments and shapes.
struct Rng(u64);

impl Rng {
    fn from_time() -> (Rng, u64) {
        let seed = match std::env::var("KILN_TEST_SEED") {
            Ok(s) => s.parse().expect("KILN_TEST_SEED is a u64"),
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        };
        (Rng::new(seed), seed)
    }

    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_sha256_bytes(&Sha256::digest(bytes).into())
}

fn set_mtime(path: &Path, t: SystemTime) {
    File::open(path).unwrap().set_modified(t).unwrap();
}

// ---------------------------------------------------------------------------------------
// The crash test.

const CHILD_ENV: &str = "KILN_IT_CRASH_WRITER";
const READY: &str = "kiln-crash-writer-ready";
const PACKAGES: [&str; 4] = ["org/a:1", "org/b:1", "org/c:2", "org/d:3"];
const ARCHES: [(&str, &str, Option<&str>); 3] = [
    ("amd64", "amd64", None),
    ("arm64", "arm64", None),
    ("armv7", "arm", Some("v7")),
];

/// Not a test on its own: the entry point of the writer process that the crash test
/// starts (re-executing this test binary) and kills. Without the variable it does nothing.
#[test]
fn crash_writer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (seed, root) = spec.split_once(':').unwrap();
    run_writer(Path::new(root), seed.parse().unwrap());
}

/// Writes images, merges architectures, moves and removes references, flushes usage and
/// collects garbage, forever (until killed).
fn run_writer(root: &Path, seed: u64) -> ! {
    let cache = Cache::open(root).unwrap();
    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout();
    // libtest may have printed "test ... " on the same line: a token that cannot be
    // mistaken.
    writeln!(out, "{READY}").unwrap();
    out.flush().unwrap();
    loop {
        let names: Vec<String> = cache
            .index()
            .unwrap()
            .refs()
            .map(|(n, _)| n.to_owned())
            .collect();
        let any_name = |rng: &mut Rng| names.get(rng.below(names.len() as u64) as usize);
        match rng.below(20) {
            0..=15 => write_image(&cache, &mut rng),
            16 => {
                if let Some(name) = any_name(&mut rng) {
                    cache.remove_ref(name).unwrap();
                }
            }
            17 => {
                if let Some(name) = any_name(&mut rng) {
                    let desc = cache.index().unwrap().get(name).unwrap().clone();
                    let alias = format!("docker.io/org/alias:{}", rng.below(3));
                    cache.set_ref(&alias, desc).unwrap();
                }
            }
            18 => {
                if let Some(name) = any_name(&mut rng) {
                    cache.touch_ref(name);
                }
                cache.flush_usage().unwrap();
            }
            _ => {
                let cap = rng.chance(50).then(|| rng.below(4 << 20));
                gc(&cache, gc_now(cap)).unwrap();
            }
        }
    }
}

fn gc_now(max_size: Option<u64>) -> GcOptions {
    GcOptions {
        max_size,
        grace: Duration::ZERO,
        dry_run: false,
    }
}

/// One architecture's image of a random package: layers streamed in chunks, a config, a
/// manifest, merged into the package's index.
fn write_image(cache: &Cache, rng: &mut Rng) {
    let package: ImageRef = PACKAGES[rng.below(4) as usize].parse().unwrap();
    let (suffix, arch, variant) = ARCHES[rng.below(3) as usize];
    let mut layers = Vec::new();
    for _ in 0..=rng.below(3) {
        let len = if rng.chance(25) {
            rng.below(256 << 10)
        } else {
            rng.below(8 << 10)
        } as usize;
        let bytes = rng.bytes(len);
        let mut w = cache.blob_writer().unwrap();
        for chunk in bytes.chunks(32 << 10) {
            w.write_bytes(chunk).unwrap();
        }
        let d = w.finish(Some(&sha256(&bytes)), Some(len as u64)).unwrap();
        layers.push(Descriptor::new(OCI_LAYER_GZIP, d, len as u64));
    }
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","created":"{}"}}"#,
        rng.next()
    );
    let config_d = cache.put_blob(config.as_bytes()).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, config_d, config.len() as u64),
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let d = cache.put_blob(&bytes).unwrap();
    cache
        .merge_arch(
            &package,
            suffix,
            Platform::linux(arch, variant),
            Descriptor::new(OCI_MANIFEST, d, bytes.len() as u64),
            None,
        )
        .unwrap();
}

#[test]
fn a_writer_killed_at_any_moment_leaves_a_consistent_cache() {
    let (mut rng, seed) = Rng::from_time();
    eprintln!("crash test seed {seed} (rerun with KILN_TEST_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let cache = Cache::open(&root).unwrap();
    let exe = std::env::current_exe().unwrap();

    let started = Instant::now();
    let budget = Duration::from_secs(90);
    let (mut iterations, mut interrupted, mut most_refs) = (0u32, 0u32, 0u64);
    let mut live_checks = 0u32;
    while iterations < 200 && started.elapsed() < budget {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "cache::crash_writer_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, format!("{}:{}", rng.next(), root.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the writer runs (libtest prints its own lines first).
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.any(|l| l.is_ok_and(|l| l.contains(READY)));
        if !ready {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the writer did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The random moment: anywhere in the next 25 ms of writing.
        std::thread::sleep(Duration::from_micros(rng.below(25_000)));
        if iterations % 4 == 0 {
            // While the writer lives, its temp files are writes in progress, not leftovers,
            // and what it has committed is consistent.
            let live = fsck(&cache, false).unwrap();
            assert!(
                live.is_clean(),
                "fsck beside a live writer (seed {seed}):\n{live}"
            );
            live_checks += 1;
        }
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "the writer failed on its own (seed {seed}): {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let report = fsck(&cache, false).unwrap();
        assert!(
            report.corrupt.is_empty() && report.bad_refs.is_empty(),
            "iteration {iterations} (seed {seed}):\n{report}"
        );
        most_refs = most_refs.max(stats(&cache).unwrap().refs);
        if !report.leftovers.is_empty() {
            interrupted += 1;
            let repaired = fsck(&cache, true).unwrap();
            assert!(repaired.is_clean(), "{repaired}");
            let after = fsck(&cache, false).unwrap();
            assert!(
                after.is_clean() && after.leftovers.is_empty() && after.in_progress.is_empty(),
                "{after}"
            );
        } else {
            assert!(report.is_clean(), "{report}");
        }
        iterations += 1;
    }
    eprintln!(
        "{iterations} kills in {:.1?}: {interrupted} left temp files behind, up to {most_refs} \
         references, {live_checks} checks beside the live writer",
        started.elapsed()
    );
    assert!(iterations >= 20, "only {iterations} iterations ran");
    assert!(
        interrupted > 0,
        "no kill landed in the middle of a write in {iterations} tries"
    );
    assert!(most_refs > 0, "the writer never got as far as a reference");
}

// ---------------------------------------------------------------------------------------
// gc.

/// Every blob reachable from the cache's `index.json` (following the documents on disk).
fn reachable(cache: &Cache) -> HashSet<Digest> {
    let mut seen = HashSet::new();
    let mut stack: Vec<Descriptor> = cache.index().unwrap().entries().cloned().collect();
    while let Some(d) = stack.pop() {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        if is_index(&d.media_type) || is_manifest(&d.media_type) {
            let bytes = fs::read(cache.blob_path(&d.digest)).unwrap();
            let doc: AnyManifest = serde_json::from_slice(&bytes).unwrap();
            stack.extend(doc.children().cloned());
        }
    }
    seen
}

fn assert_intact(cache: &Cache, blobs: &HashSet<Digest>, context: &str) {
    for d in blobs {
        let bytes = fs::read(cache.blob_path(d))
            .unwrap_or_else(|e| panic!("{context}: reachable blob {d} is gone: {e}"));
        assert_eq!(sha256(&bytes), *d, "{context}: blob {d} is corrupt");
    }
}

/// A random graph of layers, configs, manifests (some with a subject), nested indexes and
/// `index.json` entries, named or not, with random ages and uses.
struct Graph {
    entries: Vec<Descriptor>,
    /// Unnamed-or-named entry key to its last use as gc should see it.
    last_used: HashMap<String, SystemTime>,
    /// Keys of entries that are referrers of an initially reachable subject.
    attached: HashSet<String>,
    /// Blobs nobody references, by whether they are old.
    garbage: Vec<(Digest, bool)>,
}

fn random_graph(cache: &Cache, rng: &mut Rng, round: u64) -> Graph {
    let now = SystemTime::now();
    let old = |rng: &mut Rng| now - Duration::from_secs(3600 + rng.below(36_000));
    let mut leaves = Vec::new();
    for i in 0..rng.below(30) + 1 {
        let mut bytes = format!("leaf {round} {i} ").into_bytes();
        let n = rng.below(4096) as usize;
        bytes.extend(rng.bytes(n));
        let d = cache.put_blob(&bytes).unwrap();
        leaves.push(Descriptor::new(OCI_LAYER_GZIP, d, bytes.len() as u64));
    }
    let mut docs: Vec<Descriptor> = Vec::new();
    let mut subjects: HashMap<Digest, Digest> = HashMap::new();
    for i in 0..rng.below(12) + 1 {
        let pick = |rng: &mut Rng| leaves[rng.below(leaves.len() as u64) as usize].clone();
        let config = pick(rng);
        let layers: Vec<Descriptor> = (0..rng.below(4)).map(|_| pick(rng)).collect();
        let mut m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config, "layers": layers,
            "annotations": {"n": format!("{round}-{i}")},
        });
        let subject = if !docs.is_empty() && rng.chance(40) {
            let s = docs[rng.below(docs.len() as u64) as usize].clone();
            m["subject"] = serde_json::to_value(&s).unwrap();
            Some(s.digest)
        } else {
            None
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let d = cache.put_blob(&bytes).unwrap();
        if let Some(s) = subject {
            subjects.insert(d.clone(), s);
        }
        docs.push(Descriptor::new(OCI_MANIFEST, d, bytes.len() as u64));
    }
    for i in 0..rng.below(4) {
        let children: Vec<Descriptor> = (0..rng.below(4) + 1)
            .map(|_| docs[rng.below(docs.len() as u64) as usize].clone())
            .collect();
        let idx = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children,
            "annotations": {"n": format!("{round}-index-{i}")},
        });
        let bytes = serde_json::to_vec(&idx).unwrap();
        let d = cache.put_blob(&bytes).unwrap();
        docs.push(Descriptor::new(OCI_INDEX, d, bytes.len() as u64));
    }
    let mut garbage = Vec::new();
    for i in 0..rng.below(10) {
        let mut bytes = format!("garbage {round} {i} ").into_bytes();
        let n = rng.below(2048) as usize;
        bytes.extend(rng.bytes(n));
        garbage.push((cache.put_blob(&bytes).unwrap(), rng.chance(70)));
    }

    // Ages: every referenced blob is old; garbage is old or young.
    let mut mtime = HashMap::new();
    for d in leaves.iter().chain(&docs) {
        let t = old(rng);
        set_mtime(&cache.blob_path(&d.digest), t);
        mtime.insert(d.digest.clone(), t);
    }
    for (d, is_old) in &garbage {
        if *is_old {
            set_mtime(&cache.blob_path(d), old(rng));
        }
    }

    let mut entries = Vec::new();
    let mut last_used = HashMap::new();
    let mut unnamed_seen = HashSet::new();
    for i in 0..rng.below(8) {
        let mut d = if rng.chance(85) {
            docs[rng.below(docs.len() as u64) as usize].clone()
        } else {
            leaves[rng.below(leaves.len() as u64) as usize].clone()
        };
        if rng.chance(75) {
            let name = format!("docker.io/t/r{i}:x");
            d.annotations
                .insert("org.opencontainers.image.ref.name".into(), name.clone());
            let t = now - Duration::from_secs(rng.below(100_000));
            cache.touch_ref_at(&name, t);
            last_used.insert(name, t);
        } else {
            if !unnamed_seen.insert(d.digest.clone()) {
                continue;
            }
            last_used.insert(d.digest.to_string(), mtime[&d.digest]);
        }
        entries.push(d);
    }
    cache
        .update_index_locked(|index| {
            index.manifests = entries.clone();
            Ok(())
        })
        .unwrap();
    let initially = reachable(cache);
    let attached = entries
        .iter()
        .filter(|d| {
            subjects
                .get(&d.digest)
                .is_some_and(|s| initially.contains(s))
        })
        .map(|d| {
            d.ref_name()
                .map_or_else(|| d.digest.to_string(), str::to_owned)
        })
        .collect();
    Graph {
        entries,
        last_used,
        attached,
        garbage,
    }
}

#[test]
fn gc_never_removes_a_reachable_blob() {
    let (mut rng, seed) = Rng::from_time();
    eprintln!("gc property seed {seed} (rerun with KILN_TEST_SEED={seed})");
    let (mut dropped, mut attached, mut removed) = (0, 0, 0);
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let graph = random_graph(&cache, &mut rng, round);
        let context = format!("round {round} (seed {seed})");
        let before = reachable(&cache);
        // Every other round caps the cache below what its references hold, so that
        // references must go whenever there are any: a coin per round once left a
        // seed in which no cap reached a reference.
        let held: u64 = before
            .iter()
            .map(|d| fs::metadata(cache.blob_path(d)).unwrap().len())
            .sum();
        let max_size = (round % 2 == 1).then(|| rng.below(held));
        let report = gc(
            &cache,
            GcOptions {
                max_size,
                ..GcOptions::default()
            },
        )
        .unwrap();

        dropped += report.refs_dropped.len();
        attached += graph.attached.len();
        removed += report.blobs_removed;
        let after = reachable(&cache);
        assert_intact(&cache, &after, &context);
        assert!(after.is_subset(&before), "{context}");
        for (d, is_old) in &graph.garbage {
            if !before.contains(d) {
                assert_eq!(
                    cache.blob_path(d).exists(),
                    !is_old,
                    "{context}: garbage {d} (old: {is_old})"
                );
            }
        }
        let fsck = fsck(&cache, false).unwrap();
        assert!(fsck.is_clean(), "{context}: {fsck}");
        let now = stats(&cache).unwrap();
        assert_eq!(now.blob_bytes, report.bytes_after, "{context}: {report}");
        match max_size {
            None => {
                assert!(report.refs_dropped.is_empty(), "{context}");
                assert_eq!(before, after, "{context}");
                assert_eq!(
                    fsck.stray_blobs,
                    graph.garbage.iter().filter(|g| !g.1).count() as u64
                );
            }
            Some(cap) => {
                if report.still_over.is_none() {
                    assert!(now.blob_bytes <= cap, "{context}: {report}");
                } else {
                    // Only unreferenced young blobs and referrers may remain.
                    assert!(now.blob_bytes > cap, "{context}: {report}");
                }
                // Least recently used first: nothing kept is older than anything dropped
                // (artifacts attached to an image go with it, whatever their age).
                let dropped: HashSet<&String> = report.refs_dropped.iter().collect();
                let key = |d: &Descriptor| {
                    d.ref_name()
                        .map_or_else(|| d.digest.to_string(), str::to_owned)
                };
                let (mut newest_dropped, mut oldest_kept) = (None, None);
                for d in &graph.entries {
                    let k = key(d);
                    if graph.attached.contains(&k) {
                        continue;
                    }
                    let t = graph.last_used[&k];
                    if dropped.contains(&k) {
                        newest_dropped = newest_dropped.max(Some(t));
                    } else {
                        oldest_kept = Some(oldest_kept.map_or(t, |o: SystemTime| o.min(t)));
                    }
                }
                if let (Some(dropped), Some(kept)) = (newest_dropped, oldest_kept) {
                    assert!(dropped <= kept, "{context}: {report}");
                }
            }
        }
    }
    eprintln!(
        "gc property: {removed} blobs removed, {dropped} references dropped, {attached} referrers"
    );
    assert!(
        removed > 0 && dropped > 0,
        "the random graphs exercised nothing"
    );
}

#[test]
fn gc_removing_a_blob_does_not_disturb_a_reader_streaming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let (mut rng, _) = Rng::from_time();
    let bytes = rng.bytes(8 << 20);
    let d = cache.put_blob(&bytes).unwrap();
    set_mtime(
        &cache.blob_path(&d),
        SystemTime::now() - Duration::from_secs(3600),
    );

    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let path = cache.blob_path(&d);
    let reader = std::thread::spawn(move || {
        let mut f = File::open(path).unwrap();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact(&mut buf).unwrap();
        hasher.update(&buf);
        started_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Digest::from_sha256_bytes(&hasher.finalize().into())
    });
    started_rx.recv().unwrap();
    let report = gc(&cache, GcOptions::default()).unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert!(!cache.blob_path(&d).exists());
    go_tx.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), d, "the reader got every byte");
}

#[test]
fn gc_racing_a_writer_that_reuploads_an_old_blob_never_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let bytes: Arc<Vec<u8>> = Arc::new((0..64 << 10).map(|i| (i % 251) as u8).collect());
    let d = cache.put_blob(&bytes).unwrap();
    let name = "docker.io/r/x:1";
    for round in 0..200 {
        set_mtime(
            &cache.blob_path(&d),
            SystemTime::now() - Duration::from_secs(3600),
        );
        let barrier = Arc::new(Barrier::new(2));
        let writer = {
            let (cache, bytes, barrier) = (cache.clone(), bytes.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let d = cache.put_blob(&bytes).unwrap();
                // The upload is done: the manifest that names it lands next.
                cache.set_ref(name, Descriptor::new("application/octet-stream", d, 65536))
            })
        };
        barrier.wait();
        gc(&cache, GcOptions::default()).unwrap();
        writer
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: the writer lost its blob: {e}"));
        assert_intact(
            &cache,
            &HashSet::from([d.clone()]),
            &format!("round {round}"),
        );
        cache.remove_ref(name).unwrap();
    }
}
