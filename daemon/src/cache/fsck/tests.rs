use std::process::Command;
use std::time::Duration;

use super::*;
use crate::oci::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Platform};
use kiln_shared::reference::ImageRef;

struct Image {
    index: Digest,
    manifest: Digest,
    config: Digest,
    layer: Digest,
}

fn image(cache: &Cache, name: &str, layer: &[u8]) -> Image {
    let layer_d = cache.put_blob(layer).unwrap();
    let config = format!(r#"{{"architecture":"amd64","os":"linux","n":"{name}"}}"#);
    let config_d = cache.put_blob(config.as_bytes()).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, config_d.clone(), config.len() as u64),
        "layers": [Descriptor::new(OCI_LAYER_GZIP, layer_d.clone(), layer.len() as u64)],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_d = cache.put_blob(&bytes).unwrap();
    let image: ImageRef = name.parse().unwrap();
    let index = cache
        .merge_arch(
            &image,
            "amd64",
            Platform::linux("amd64", None),
            Descriptor::new(OCI_MANIFEST, manifest_d.clone(), bytes.len() as u64),
            None,
        )
        .unwrap();
    Image {
        index: index.digest,
        manifest: manifest_d,
        config: config_d,
        layer: layer_d,
    }
}

fn cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    (dir, cache)
}

/// The id of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn set_age(path: &Path, age: Duration) {
    File::open(path)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

#[test]
fn a_consistent_cache_is_clean() {
    let (_dir, cache) = cache();
    image(&cache, "org/a:1", b"layer a");
    image(&cache, "org/b:1", b"layer b");
    cache.put_blob(b"stray").unwrap();
    let report = fsck(&cache, false).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.blobs_checked, 9);
    assert_eq!(report.refs_checked, 4);
    assert_eq!((report.stray_blobs, report.stray_bytes), (1, 5));
    assert!(
        report.to_string().ends_with("the cache is consistent"),
        "{report}"
    );
}

#[test]
fn a_corrupt_blob_is_found_removed_and_its_references_dropped() {
    let (_dir, cache) = cache();
    let a = image(&cache, "org/a:1", b"layer a");
    image(&cache, "org/b:1", b"layer b");
    fs::write(cache.blob_path(&a.layer), b"layer A").unwrap();

    let report = fsck(&cache, false).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.corrupt.len(), 1, "{report}");
    assert_eq!(report.corrupt[0].digest, a.layer);
    assert!(!report.corrupt[0].removed);
    let lines: Vec<String> = report.bad_refs.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        lines,
        [format!(
            "docker.io/org/a:1 -> index {} -> manifest {} -> layer {} corrupt",
            a.index, a.manifest, a.layer
        )],
        "the layer is reported once, with the first path that reaches it"
    );
    assert!(
        report.to_string().contains("`kiln fsck --repair`"),
        "{report}"
    );
    assert!(
        cache.blob_path(&a.layer).exists(),
        "no repair without --repair"
    );

    let report = fsck(&cache, true).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(report.corrupt[0].removed);
    assert!(!cache.blob_path(&a.layer).exists());
    assert_eq!(
        report.refs_dropped,
        ["docker.io/org/a:1", "docker.io/org/a:1-amd64"]
    );
    let view = cache.index().unwrap();
    assert!(view.get("docker.io/org/a:1").is_none());
    assert!(view.get("docker.io/org/b:1").is_some());

    let after = fsck(&cache, false).unwrap();
    assert!(after.is_clean(), "{after}");
    // a's index, manifest and config are now unreferenced.
    assert_eq!(after.stray_blobs, 3);
}

#[test]
fn missing_blobs_and_wrong_sizes_are_dangling_references() {
    let (_dir, cache) = cache();
    let a = image(&cache, "org/a:1", b"layer a");
    fs::remove_file(cache.blob_path(&a.config)).unwrap();
    let report = fsck(&cache, false).unwrap();
    let lines: Vec<String> = report.bad_refs.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        lines,
        [format!(
            "docker.io/org/a:1 -> index {} -> manifest {} -> config {} missing",
            a.index, a.manifest, a.config
        )]
    );

    let b = cache.put_blob(b"12345").unwrap();
    cache
        .update_index_locked(|i| {
            i.manifests.push(Descriptor::new("x/y", b.clone(), 4));
            Ok(())
        })
        .unwrap();
    let report = fsck(&cache, false).unwrap();
    assert_eq!(report.bad_refs.len(), 2, "{report}");
    assert_eq!(
        report.bad_refs[1].to_string(),
        format!("index.json entry -> blob {b} is 5 bytes, the descriptor says 4")
    );
    let report = fsck(&cache, true).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.refs_dropped.len(), 3);
    assert!(cache.index().unwrap().entry_count() == 0);
}

#[test]
fn leftovers_of_dead_writers_are_removed_and_live_writes_left_alone() {
    let (_dir, cache) = cache();
    image(&cache, "org/a:1", b"layer a");
    let dead = dead_pid();
    let me = std::process::id();
    let kiln = cache.root().join(".kiln");
    let hex = "ab".repeat(32);
    let dead_files = [
        cache.tmp_dir().join(format!("blob-{dead}-3")),
        cache.root().join(format!(".index.json.tmp-{dead}")),
        kiln.join(format!(".usage.json.tmp-{dead}")),
        kiln.join("trash").join(format!("{hex}-{dead}")),
    ];
    let live_files = [
        cache.tmp_dir().join(format!("blob-{me}-77")),
        cache.root().join(format!(".index.json.tmp-{me}")),
    ];
    fs::create_dir_all(kiln.join("trash")).unwrap();
    fs::create_dir_all(kiln.join("uploads").join("old")).unwrap();
    fs::create_dir_all(kiln.join("uploads").join("busy")).unwrap();
    for f in dead_files.iter().chain(&live_files) {
        fs::write(f, b"partial").unwrap();
    }
    let old_upload = kiln.join("uploads").join("old").join("data");
    fs::write(&old_upload, b"abandoned").unwrap();
    set_age(&old_upload, Duration::from_secs(25 * 3600));
    set_age(
        &kiln.join("uploads").join("old"),
        Duration::from_secs(25 * 3600),
    );
    // An old directory whose data is still being written is in use.
    let busy = kiln.join("uploads").join("busy");
    fs::write(busy.join("data"), b"uploading").unwrap();
    set_age(&busy, Duration::from_secs(25 * 3600));
    // Not a blob name: another tool's write in progress, or, when old, a leftover.
    let foreign_new = cache.blobs_dir().join(format!("{hex}.tmp123"));
    let foreign_old = cache.blobs_dir().join("junk");
    fs::write(&foreign_new, b"x").unwrap();
    fs::write(&foreign_old, b"xy").unwrap();
    set_age(&foreign_old, Duration::from_secs(30 * 3600));

    let report = fsck(&cache, false).unwrap();
    let mut found: Vec<&Path> = report.leftovers.iter().map(|l| l.path.as_path()).collect();
    found.sort();
    let mut expected: Vec<PathBuf> = dead_files.to_vec();
    expected.push(kiln.join("uploads").join("old"));
    expected.push(foreign_old.clone());
    expected.sort();
    assert_eq!(
        found,
        expected.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );
    assert!(report.corrupt.is_empty() && report.bad_refs.is_empty());
    // Leftovers are a warning: the cache itself is consistent.
    assert!(report.is_clean(), "{report}");
    assert!(report.to_string().contains("warning: leftover"), "{report}");
    assert!(
        report
            .to_string()
            .contains("leftover(s) of interrupted writes"),
        "{report}"
    );
    assert_eq!(report.in_progress.len(), 4, "{:?}", report.in_progress);
    assert!(
        report
            .to_string()
            .contains(&format!("temp file of a dead process (pid {dead})")),
        "{report}"
    );

    let report = fsck(&cache, true).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(
        report
            .leftovers
            .iter()
            .all(|l| l.removed && !l.path.exists())
    );
    for f in live_files.iter().chain([&foreign_new, &busy]) {
        assert!(f.exists(), "{} was removed", f.display());
    }
    let after = fsck(&cache, false).unwrap();
    assert!(after.is_clean() && after.leftovers.is_empty(), "{after}");
}

#[test]
fn kilnd_start_removes_what_dead_writers_left_and_nothing_else() {
    let (_dir, cache) = cache();
    image(&cache, "org/a:1", b"layer a");
    let dead = dead_pid();
    let me = std::process::id();
    let dead_file = cache.tmp_dir().join(format!("blob-{dead}-3"));
    let dead_index = cache.root().join(format!(".index.json.tmp-{dead}"));
    let live_file = cache.tmp_dir().join(format!("blob-{me}-78"));
    for f in [&dead_file, &dead_index, &live_file] {
        fs::write(f, vec![0u8; 4096]).unwrap();
    }
    let removed = cache.remove_leftovers().unwrap();
    let mut paths: Vec<&Path> = removed.iter().map(|l| l.path.as_path()).collect();
    paths.sort();
    let mut want = vec![dead_file.as_path(), dead_index.as_path()];
    want.sort();
    assert_eq!(paths, want);
    assert!(removed.iter().all(|l| l.removed));
    assert!(!dead_file.exists() && !dead_index.exists());
    assert!(live_file.exists(), "a live writer's temp file stays");
    let report = fsck(&cache, false).unwrap();
    assert!(report.is_clean() && report.leftovers.is_empty(), "{report}");
}

/// Puts a JSON document as a blob and names it in index.json.
fn put_doc(cache: &Cache, name: &str, media_type: &str, doc: &serde_json::Value) -> Descriptor {
    let bytes = serde_json::to_vec(doc).unwrap();
    let d = cache.put_blob(&bytes).unwrap();
    let desc = Descriptor::new(media_type, d, bytes.len() as u64);
    cache.set_ref(name, desc.clone()).unwrap();
    desc
}

#[test]
fn each_descriptor_is_judged_on_its_own() {
    let (_dir, cache) = cache();
    let a = image(&cache, "org/a:1", b"layer a");
    // b's manifest names a's layer (checked first, and fine there) with a wrong size.
    put_doc(
        &cache,
        "docker.io/org/b:1",
        OCI_MANIFEST,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor::new(OCI_CONFIG, a.config.clone(), cache.blob_size(&a.config).unwrap().unwrap()),
            "layers": [Descriptor::new(OCI_LAYER_GZIP, a.layer.clone(), 70)],
        }),
    );
    let report = fsck(&cache, false).unwrap();
    assert_eq!(report.bad_refs.len(), 1, "{report}");
    let bad = &report.bad_refs[0];
    assert_eq!(bad.digest, a.layer);
    assert_eq!(bad.path[0], "docker.io/org/b:1");
    assert!(
        matches!(bad.problem, Problem::SizeMismatch { expected: 70, .. }),
        "{report}"
    );
}

#[test]
fn repair_drops_only_the_broken_reference_never_an_intact_one() {
    let (_dir, cache) = cache();
    let a = image(&cache, "org/a:1", b"layer a");
    // A bogus index (checked before a's, by name) whose child is a's layer, called a
    // manifest.
    put_doc(
        &cache,
        "docker.io/aaa/bogus:1",
        crate::oci::OCI_INDEX,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::OCI_INDEX,
            "manifests": [Descriptor::new(OCI_MANIFEST, a.layer.clone(), b"layer a".len() as u64)],
        }),
    );
    let report = fsck(&cache, true).unwrap();
    assert_eq!(report.refs_dropped, ["docker.io/aaa/bogus:1"], "{report}");
    assert!(
        report
            .to_string()
            .contains("dropped reference docker.io/aaa/bogus:1"),
        "{report}"
    );
    let view = cache.index().unwrap();
    assert!(
        view.get("docker.io/org/a:1").is_some(),
        "a's intact tag was dropped"
    );
    assert!(view.get("docker.io/org/a:1-amd64").is_some());
    assert_eq!(view.entry_count(), 2);
    let after = fsck(&cache, false).unwrap();
    assert!(after.is_clean(), "{after}");
    let _ = a.index;
}
