//! Crashes: kilnd is killed (SIGKILL) while clients push, while it builds, and while a
//! `kiln gc` runs on its cache, round after round on one cache. After each kill a checker
//! of its own (it shares no code with `kiln fsck`: it reads the OCI layout with serde_json
//! and sha2) checks that every blob hashes to its name, that every descriptor reachable
//! from `index.json` names a blob of its size, and that every push kilnd acknowledged
//! (201) is still there. Seeded (`KILN_CRASH_SEED`), a few dozen rounds, each ended by
//! an event (so many pushes acknowledged), not a timer.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kiln_tests::workspace::write_package;
use kiln_tests::{Dir, Kilnd, KilndOptions, target_bin};
use sha2::{Digest as _, Sha256};

const ROUNDS: u32 = 36;
const PUSHERS: usize = 2;

/// What the rounds did, for the closing line.
static REUSED: AtomicU64 = AtomicU64::new(0);
static GC_RUNS: AtomicU64 = AtomicU64::new(0);
static LOST_RACES: AtomicU64 = AtomicU64::new(0);

/// xorshift64*: enough randomness for sizes and kill points, the same for one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One HTTP/1.1 request on a fresh connection: the status and the headers, or `None`
/// when the connection failed (kilnd was killed).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).ok()?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// Pushes images until kilnd goes away; records every acknowledged (tag, digest).
/// Some images reuse a layer pushed earlier and left unreferenced (aged, so gc may
/// collect it): the client HEADs it and, on 200, does not upload it again.
fn pusher(
    addr: String,
    seed: u64,
    prefix: String,
    orphans: Vec<(String, usize)>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng(seed | 1);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (layer_d, layer_len) =
            match orphans.get(rng.below(orphans.len() as u64 * 2 + 1) as usize) {
                Some((d, len))
                    if matches!(
                        http(&addr, "HEAD", &format!("/v2/crash/img/blobs/{d}"), &[], b""),
                        Some((200, _))
                    ) =>
                {
                    REUSED.fetch_add(1, Ordering::Relaxed);
                    (d.clone(), *len)
                }
                _ => {
                    let len = 1024 + rng.below(200_000) as usize;
                    let layer = rng.bytes(len);
                    let d = sha(&layer);
                    match http(
                        &addr,
                        "POST",
                        &format!("/v2/crash/img/blobs/uploads/?digest={d}"),
                        &[],
                        &layer,
                    ) {
                        Some((201, _)) => (d, layer.len()),
                        Some((429, _)) => continue,
                        _ => return,
                    }
                }
            };
        // Pushed, then left unreferenced: later rounds reuse it.
        if rng.below(4) == 0 {
            let orphan = rng.bytes(512);
            if http(
                &addr,
                "POST",
                &format!("/v2/crash/img/blobs/uploads/?digest={}", sha(&orphan)),
                &[],
                &orphan,
            )
            .is_none()
            {
                return;
            }
        }
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":"{prefix}-{i}"}}"#);
        let config_d = sha(config.as_bytes());
        match http(
            &addr,
            "POST",
            &format!("/v2/crash/img/blobs/uploads/?digest={config_d}"),
            &[],
            config.as_bytes(),
        ) {
            Some((201, _)) => {}
            _ => return,
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d, "size": layer_len}],
        })
        .to_string();
        let tag = format!("{prefix}-{i}");
        match http(
            &addr,
            "PUT",
            &format!("/v2/crash/img/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            manifest.as_bytes(),
        ) {
            Some((201, _)) => acked.lock().unwrap().push((tag, sha(manifest.as_bytes()))),
            // gc won the race for a reused layer: refused, not acknowledged.
            Some((400, text)) if text.contains("MANIFEST_BLOB_UNKNOWN") => {
                LOST_RACES.fetch_add(1, Ordering::Relaxed);
            }
            Some((status, text)) if status >= 500 => panic!("push of {tag}: {text}"),
            Some(_) => {}
            None => return,
        }
    }
}

/// `kiln gc --cache` in a loop until told to stop; the one running then is killed
/// (SIGKILL, as kilnd is), by this thread, which holds it unreaped: no other process can
/// have its pid yet.
fn gc_loop(cache: PathBuf, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut child = Command::new(target_bin("kiln"))
            .args(["gc", "--cache"])
            .arg(&cache)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kiln gc");
        loop {
            if child.try_wait().expect("wait for kiln gc").is_some() {
                GC_RUNS.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if stop.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The independent checker: problems found, as lines.
fn check(cache: &Path, acked: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let blobs = cache.join("blobs/sha256");
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for e in fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = fs::read(e.path()).unwrap();
        let d = sha(&bytes);
        if d != format!("sha256:{name}") {
            problems.push(format!("blob {name} hashes to {d}"));
        }
        sizes.insert(format!("sha256:{name}"), bytes.len() as u64);
    }
    let index: serde_json::Value =
        match fs::read(cache.join("index.json")).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(v)) => v,
            other => return vec![format!("index.json unreadable: {other:?}")],
        };
    let name_of = |d: &serde_json::Value| {
        d["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    let in_file: Vec<(String, serde_json::Value)> = index["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|d| (name_of(&d), d))
        .collect();
    // The references are index.json with the refs journal applied (ARCHITECTURE.md):
    // both index.json alone (what other tools read) and the whole must be complete.
    let mut names: BTreeMap<String, serde_json::Value> = in_file.iter().cloned().collect();
    for (name, edit) in journal_records(cache) {
        match edit {
            serde_json::Value::Null => names.remove(&name),
            d => names.insert(name, d),
        };
    }
    let mut stack: Vec<(String, serde_json::Value)> = in_file
        .into_iter()
        .chain(
            names
                .iter()
                .map(|(n, d)| (format!("{n} (with the journal)"), d.clone())),
        )
        .collect();
    while let Some((from, d)) = stack.pop() {
        let digest = d["digest"].as_str().unwrap_or("").to_owned();
        let size = d["size"].as_u64();
        match sizes.get(&digest) {
            None => {
                problems.push(format!("{from}: {digest} is missing"));
                continue;
            }
            Some(&s) if Some(s) != size => {
                problems.push(format!(
                    "{from}: {digest} is {s} bytes, its descriptor says {size:?}"
                ));
                continue;
            }
            Some(_) => {}
        }
        let mt = d["mediaType"].as_str().unwrap_or("");
        if mt.contains("manifest") || mt.contains("index") {
            let doc: serde_json::Value =
                serde_json::from_slice(&fs::read(blobs.join(&digest[7..])).unwrap())
                    .unwrap_or_default();
            let here = format!("{from} -> {digest}");
            for child in doc["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(doc["layers"].as_array().into_iter().flatten())
            {
                if child["urls"].is_null() {
                    stack.push((here.clone(), child.clone()));
                }
            }
            if !doc["config"].is_null() {
                stack.push((here.clone(), doc["config"].clone()));
            }
        }
    }
    let names: BTreeMap<&str, &str> = names
        .iter()
        .filter_map(|(n, d)| Some((n.as_str(), d["digest"].as_str()?)))
        .collect();
    for (tag, digest) in acked {
        let name = format!("docker.io/crash/img:{tag}");
        match names.get(name.as_str()) {
            Some(d) if d == digest => {}
            Some(d) => problems.push(format!("acknowledged {tag} = {digest} now names {d}")),
            None => problems.push(format!("acknowledged {tag} = {digest} is lost")),
        }
    }
    problems
}

/// The whole records of the refs journal, in order: each line is `<sha256 hex of the
/// JSON> <JSON>`, the JSON a list of `[name, descriptor or null]`; a line that is not
/// whole (a torn append) ends it.
fn journal_records(cache: &Path) -> Vec<(String, serde_json::Value)> {
    let bytes = fs::read(cache.join(".kiln/refs.journal")).unwrap_or_default();
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let (Some(sum), Some(json)) = (line.get(..64), line.get(65..)) else {
            break;
        };
        if hex(&Sha256::digest(json)).as_bytes() != sum {
            break;
        }
        let Ok(edits) = serde_json::from_slice::<Vec<(String, serde_json::Value)>>(json) else {
            break;
        };
        out.extend(edits);
    }
    out
}

/// Makes every blob look an hour old, so that gc may collect what nothing references.
fn age_blobs(cache: &Path) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    for e in fs::read_dir(cache.join("blobs/sha256")).unwrap() {
        let f = fs::File::open(e.unwrap().path()).unwrap();
        f.set_modified(old).unwrap();
    }
}

/// Blobs that no descriptor of index.json names (directly: layers are reached through
/// manifests, which this skips; good enough to find orphans to reuse).
fn orphans(cache: &Path) -> Vec<(String, usize)> {
    let index = fs::read_to_string(cache.join("index.json")).unwrap_or_default()
        + &fs::read_to_string(cache.join(".kiln/refs.journal")).unwrap_or_default();
    let mut out = Vec::new();
    let mut referenced = String::new();
    let Ok(listing) = fs::read_dir(cache.join("blobs/sha256")) else {
        return out; // the first round: no cache yet
    };
    for e in listing {
        let p = e.unwrap().path();
        if let Ok(text) = fs::read_to_string(&p) {
            referenced.push_str(&text);
        }
    }
    for e in fs::read_dir(cache.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !index.contains(&name) && !referenced.contains(&name) {
            out.push((
                format!("sha256:{name}"),
                e.metadata().unwrap().len() as usize,
            ));
        }
    }
    out
}

#[test]
fn kill_9_during_pushes_builds_and_gc_loses_no_acknowledged_write() {
    let seed: u64 = std::env::var("KILN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b696c6e);
    eprintln!("crash test seed {seed} (set KILN_CRASH_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let ws = Dir::new("crash-ws");
    write_package(
        &ws,
        "pkg",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY data /data\n",
    );
    let cache_dir = Dir::new("crash-cache");
    let cache = cache_dir.join("cache");
    let started = Instant::now();
    let mut acked_total: Vec<(String, String)> = Vec::new();
    let mut kills = 0;
    for round in 0..ROUNDS {
        // A change to build on start: kilnd is killed while it builds, too.
        let len = 1 + rng.below(300_000) as usize;
        ws.write("pkg/data", rng.bytes(len));
        let reuse = orphans(&cache);
        let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().cache(&cache));
        let addr = kilnd.registry();
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let mut threads = Vec::new();
        for p in 0..PUSHERS {
            let (addr, acked, stop, reuse) = (
                addr.clone(),
                Arc::clone(&acked),
                Arc::clone(&stop),
                reuse.clone(),
            );
            let seed = rng.next();
            threads.push(std::thread::spawn(move || {
                pusher(addr, seed, format!("r{round}-p{p}"), reuse, acked, stop)
            }));
        }
        let gc = {
            let (cache, stop) = (cache.clone(), Arc::clone(&stop));
            std::thread::spawn(move || gc_loop(cache, stop))
        };
        // Kill after this many acknowledged pushes (0: as soon as it is up).
        let kill_after = rng.below(6) as usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < kill_after {
            assert!(
                Instant::now() < deadline,
                "round {round}: no pushes acknowledged in 20 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // kilnd is the harness's child, not reaped before `drop(kilnd)`: its pid is its.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(kilnd.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        gc.join().unwrap();
        drop(kilnd);
        kills += 1;
        acked_total.extend(acked.lock().unwrap().drain(..));
        let problems = check(&cache, &acked_total);
        assert!(
            problems.is_empty(),
            "round {round} (seed {seed}): {problems:#?}"
        );
        age_blobs(&cache);
    }
    // A clean start removes what the killed writers left.
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().cache(&cache));
    let me = kilnd.pid();
    let left: Vec<String> = fs::read_dir(cache.join(".kiln/tmp"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(&format!("blob-{me}-")))
        .collect();
    assert!(
        left.is_empty(),
        "temp files of dead writers after a restart: {left:?}"
    );
    drop(kilnd);
    let problems = check(&cache, &acked_total);
    assert!(
        problems.is_empty(),
        "after the last restart (seed {seed}): {problems:#?}"
    );
    eprintln!(
        "crash test: {kills} kill -9 rounds, {} acknowledged pushes all kept ({} reusing a layer \
         HEADed while gc ran, {} refused as gc took the layer first), {} gc runs, every blob \
         and reachable descriptor whole, in {:.1}s",
        acked_total.len(),
        REUSED.load(Ordering::Relaxed),
        LOST_RACES.load(Ordering::Relaxed),
        GC_RUNS.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}
