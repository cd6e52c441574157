use std::fs::File;

use super::*;
use crate::oci::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};

fn cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    (dir, cache)
}

fn age(cache: &Cache, d: &Digest, by: Duration) {
    File::open(cache.blob_path(d))
        .unwrap()
        .set_modified(SystemTime::now() - by)
        .unwrap();
}

const HOUR: Duration = Duration::from_secs(3600);

/// A manifest with one layer of `layer_len` bytes (and an optional subject), named
/// `name` in index.json when given. Every blob is an hour old.
fn image(
    cache: &Cache,
    name: Option<&str>,
    seed: u8,
    layer_len: usize,
    subject: Option<&Descriptor>,
) -> (Descriptor, Vec<Digest>) {
    let layer = vec![seed; layer_len];
    let layer_d = cache.put_blob(&layer).unwrap();
    let config = format!(r#"{{"seed":{seed}}}"#);
    let config_d = cache.put_blob(config.as_bytes()).unwrap();
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, config_d.clone(), config.len() as u64),
        "layers": [Descriptor::new(OCI_LAYER_GZIP, layer_d.clone(), layer.len() as u64)],
    });
    if let Some(s) = subject {
        m["subject"] = serde_json::to_value(s).unwrap();
    }
    let bytes = serde_json::to_vec(&m).unwrap();
    let d = cache.put_blob(&bytes).unwrap();
    let desc = Descriptor::new(OCI_MANIFEST, d.clone(), bytes.len() as u64);
    match name {
        Some(n) => cache.set_ref(n, desc.clone()).unwrap(),
        None => cache
            .update_index_locked(|i| {
                i.manifests.push(desc.clone());
                Ok(())
            })
            .unwrap(),
    }
    let all = vec![d, config_d, layer_d];
    for b in &all {
        age(cache, b, HOUR);
    }
    (desc, all)
}

fn exists(cache: &Cache, d: &Digest) -> bool {
    cache.blob_path(d).exists()
}

#[test]
fn unreferenced_blobs_go_once_older_than_the_grace_period() {
    let (_dir, cache) = cache();
    let (_, kept) = image(&cache, Some("docker.io/a/b:1"), 1, 100, None);
    let old = cache.put_blob(b"old garbage").unwrap();
    age(&cache, &old, HOUR);
    let young = cache.put_blob(b"young garbage").unwrap();

    let dry = gc(
        &cache,
        GcOptions {
            dry_run: true,
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!((dry.blobs_removed, dry.bytes_freed), (1, 11));
    assert!(exists(&cache, &old), "a dry run removes nothing");
    assert!(
        dry.to_string()
            .starts_with("would free 11 B: 1 blob, 0 references"),
        "{dry}"
    );

    let report = gc(&cache, GcOptions::default()).unwrap();
    assert_eq!((report.blobs_removed, report.bytes_freed), (1, 11));
    assert_eq!((report.young_kept, report.young_bytes), (1, 13));
    assert_eq!(report.bytes_after, report.bytes_before - 11);
    assert!(!exists(&cache, &old));
    assert!(exists(&cache, &young));
    assert!(kept.iter().all(|d| exists(&cache, d)));
    assert!(
        report
            .to_string()
            .contains("kept 1 unreferenced blob (13 B) written in the last 600s"),
        "{report}"
    );
    let empty = fs::read_dir(cache.root().join(".kiln/trash"))
        .unwrap()
        .count();
    assert_eq!(empty, 0, "the trash is emptied");

    // A blob written again is fresh again.
    age(&cache, &young, HOUR);
    cache.put_blob(b"young garbage").unwrap();
    let report = gc(&cache, GcOptions::default()).unwrap();
    assert_eq!(report.blobs_removed, 0);
    assert!(exists(&cache, &young));
}

#[test]
fn over_the_cap_the_least_recently_used_references_go_first() {
    let (_dir, cache) = cache();
    let (_, a) = image(&cache, Some("docker.io/o/a:1"), 1, 1000, None);
    let (b_desc, b) = image(&cache, Some("docker.io/o/b:1"), 2, 1000, None);
    let (_, c) = image(&cache, Some("docker.io/o/c:1"), 3, 1000, None);
    // A second name for b's manifest, and a signature of b, unnamed as the registry
    // keeps referrers.
    cache
        .set_ref("docker.io/o/b:alias", b_desc.clone())
        .unwrap();
    let (_, sig) = image(&cache, None, 4, 10, Some(&b_desc));
    // a has no record: it counts as used when its manifest was written (an hour ago).
    let now = SystemTime::now();
    cache.touch_ref_at("docker.io/o/b:1", now - Duration::from_secs(1800));
    cache.touch_ref_at("docker.io/o/b:alias", now - Duration::from_secs(1700));
    cache.flush_usage().unwrap();
    cache.touch_ref_at("docker.io/o/c:1", now); // not flushed: gc still sees it

    let total = crate::cache::stats(&cache).unwrap().blob_bytes;
    let cap = total - 1000;
    let report = gc(
        &cache,
        GcOptions {
            max_size: Some(cap),
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.refs_dropped, ["docker.io/o/a:1"], "{report}");
    assert!(a.iter().all(|d| !exists(&cache, d)));
    assert!(b.iter().chain(&c).chain(&sig).all(|d| exists(&cache, d)));
    assert!(report.bytes_after <= cap && report.still_over.is_none());

    // Dropping b's names takes its signature along.
    let report = gc(
        &cache,
        GcOptions {
            max_size: Some(report.bytes_after - 1),
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        report.refs_dropped,
        [
            "docker.io/o/b:1".to_owned(),
            "docker.io/o/b:alias".to_owned(),
            sig[0].to_string()
        ],
        "{report}"
    );
    assert!(b.iter().chain(&sig).all(|d| !exists(&cache, d)));
    assert!(c.iter().all(|d| exists(&cache, d)));
    let view = cache.index().unwrap();
    assert_eq!(view.entry_count(), 1);
    assert!(view.get("docker.io/o/c:1").is_some());
    let usage = cache.last_used().unwrap();
    assert!(
        !usage.contains_key("docker.io/o/b:1"),
        "dropped names are forgotten"
    );

    // A cap nothing can meet: everything goes, and the report says so.
    let young = cache.put_blob(b"in flight").unwrap();
    let report = gc(
        &cache,
        GcOptions {
            max_size: Some(1),
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.refs_dropped, ["docker.io/o/c:1"]);
    assert_eq!(report.bytes_after, 9);
    assert!(exists(&cache, &young));
    assert_eq!(report.still_over, Some(1));
    assert!(
        report.to_string().contains("still over the cap of 1 B"),
        "{report}"
    );
}

#[test]
fn gc_refuses_to_guess_when_a_manifest_is_unreadable() {
    let (_dir, cache) = cache();
    let (desc, blobs) = image(&cache, Some("docker.io/o/a:1"), 1, 10, None);
    let garbage = cache.put_blob(b"garbage").unwrap();
    age(&cache, &garbage, HOUR);
    fs::write(cache.blob_path(&desc.digest), b"{not json").unwrap();
    let err = gc(&cache, GcOptions::default()).unwrap_err();
    assert!(err.to_string().contains("kiln fsck --repair"), "{err}");
    assert!(blobs.iter().chain([&garbage]).all(|d| exists(&cache, d)));
}

#[test]
fn a_blob_refreshed_during_removal_is_put_back() {
    let (_dir, cache) = cache();
    let d = cache.put_blob(b"racing").unwrap();
    let trash = cache.root().join(".kiln/trash");
    fs::create_dir_all(&trash).unwrap();
    // The listing saw it old, but a writer refreshed it since: gc finds a fresh mtime
    // once the blob is parked, and restores it.
    let cutoff = SystemTime::now() - Duration::from_secs(60);
    assert!(matches!(
        remove_blob(&cache, &trash, &d, cutoff).unwrap(),
        Removal::Refreshed
    ));
    assert_eq!(cache.read_blob(&d, 100).unwrap(), b"racing");
    age(&cache, &d, HOUR);
    assert!(matches!(
        remove_blob(&cache, &trash, &d, cutoff).unwrap(),
        Removal::Removed
    ));
    assert!(!exists(&cache, &d));
    assert!(matches!(
        remove_blob(&cache, &trash, &d, cutoff).unwrap(),
        Removal::Gone
    ));
    // A writer whose blob vanished under it installs its own copy.
    assert_eq!(cache.put_blob(b"racing").unwrap(), d);
    assert!(exists(&cache, &d));
}

#[test]
fn sizes_parse_in_powers_of_1024() {
    for (input, bytes) in [
        ("1048576", 1u64 << 20),
        ("0", 0),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("10GB", 10 << 30),
        ("500MiB", 500 << 20),
        ("500 mib", 500 << 20),
        ("1.5K", 1536),
        ("1_000kb", 1_024_000),
        ("12B", 12),
        (" 2T ", 2 << 40),
    ] {
        assert_eq!(parse_size(input), Ok(bytes), "{input}");
    }
}

#[test]
fn bad_sizes_say_why() {
    for bad in [
        "",
        "G",
        "-1G",
        "1.2.3G",
        "10 gigs",
        "99999999999999999999999999999999999999999",
    ] {
        let err = parse_size(bad).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{bad:?}")) && msg.contains("500MiB"),
            "{msg}"
        );
    }
}

#[test]
fn a_dangling_reference_stops_gc_before_it_drops_anything() {
    let (_dir, cache) = cache();
    let (a, _) = image(&cache, Some("docker.io/o/a:1"), 1, 1000, None);
    image(&cache, Some("docker.io/o/b:1"), 2, 1000, None);
    fs::remove_file(cache.blob_path(&a.digest)).unwrap();
    // Without a cap, gc sweeps around the dangling entry.
    gc(&cache, GcOptions::default()).unwrap();
    // Under a cap, b goes first (a was used recently) and a is kept: dangling.
    cache.touch_ref("docker.io/o/a:1");
    let err = gc(
        &cache,
        GcOptions {
            max_size: Some(500),
            ..GcOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("kiln fsck --repair"), "{err}");
    assert_eq!(cache.index().unwrap().entry_count(), 2);
}
