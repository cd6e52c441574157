use std::process::Command;

use super::*;
use crate::oci::{Descriptor, OCI_MANIFEST, Platform};
use kiln_shared::reference::ImageRef;

fn cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("c")).unwrap();
    (dir, cache)
}

fn tmp_files(cache: &Cache) -> usize {
    fs::read_dir(cache.tmp_dir()).unwrap().count()
}

#[test]
fn open_creates_an_empty_layout_and_reopens_it() {
    let (dir, cache) = cache();
    let root = cache.root().to_owned();
    assert_eq!(
        fs::read_to_string(root.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    assert!(cache.index().unwrap().entry_count() == 0);
    drop(cache);
    Cache::open(&root).unwrap();
    drop(dir);
}

#[test]
fn open_refuses_a_directory_that_is_not_a_layout() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let err = Cache::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    assert!(!dir.path().join("oci-layout").exists());
}

#[test]
fn blobs_are_verified_before_they_become_visible() {
    let (_dir, cache) = cache();
    let d = cache.put_blob(b"hello").unwrap();
    assert_eq!(
        d.to_string(),
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert_eq!(cache.read_blob(&d, 100).unwrap(), b"hello");

    let mut w = cache.blob_writer().unwrap();
    w.write_bytes(b"other").unwrap();
    let err = w.finish(Some(&d), None).unwrap_err();
    assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");

    let mut w = cache.blob_writer().unwrap();
    w.write_bytes(b"hello").unwrap();
    let err = w.finish(Some(&d), Some(4)).unwrap_err();
    assert!(matches!(err, CacheError::SizeMismatch { .. }), "{err}");

    let mut w = cache.blob_writer().unwrap();
    w.write_bytes(b"dropped").unwrap();
    drop(w);

    assert_eq!(fs::read_dir(cache.blobs_dir()).unwrap().count(), 1);
    assert_eq!(tmp_files(&cache), 0);
    assert!(matches!(
        cache.read_blob(&d, 2),
        Err(CacheError::BlobTooLarge { .. })
    ));
}

#[test]
fn index_never_names_a_missing_blob() {
    let (_dir, cache) = cache();
    let missing = Digest::from_sha256_bytes(&[7; 32]);
    let err = cache
        .set_ref(
            "docker.io/a/b:c",
            Descriptor::new(OCI_MANIFEST, missing.clone(), 1),
        )
        .unwrap_err();
    assert!(matches!(err, CacheError::DanglingReference { .. }), "{err}");
    assert!(cache.index().unwrap().get("docker.io/a/b:c").is_none());

    let d = cache.put_blob(b"{}").unwrap();
    cache
        .set_ref(
            "docker.io/a/b:c",
            Descriptor::new(OCI_MANIFEST, d.clone(), 2),
        )
        .unwrap();
    assert_eq!(
        cache
            .index()
            .unwrap()
            .get("docker.io/a/b:c")
            .unwrap()
            .digest,
        d
    );
    assert!(cache.remove_ref("docker.io/a/b:c").unwrap());
    assert!(!cache.remove_ref("docker.io/a/b:c").unwrap());
}

#[test]
fn merge_arch_replaces_the_same_platform_and_is_deterministic() {
    let (_dir, cache) = cache();
    let image: ImageRef = "org/img:t1".parse().unwrap();
    let m1 = cache.put_blob(br#"{"m":1}"#).unwrap();
    let m2 = cache.put_blob(br#"{"m":2}"#).unwrap();
    let m3 = cache.put_blob(br#"{"m":3}"#).unwrap();
    let arm = Platform::linux("arm64", None);
    let amd = Platform::linux("amd64", None);
    cache
        .merge_arch(
            &image,
            "arm64",
            arm.clone(),
            Descriptor::new(OCI_MANIFEST, m1, 7),
            None,
        )
        .unwrap();
    let both = cache
        .merge_arch(
            &image,
            "amd64",
            amd.clone(),
            Descriptor::new(OCI_MANIFEST, m2.clone(), 7),
            None,
        )
        .unwrap();
    let replaced = cache
        .merge_arch(
            &image,
            "arm64",
            arm.clone(),
            Descriptor::new(OCI_MANIFEST, m3.clone(), 7),
            None,
        )
        .unwrap();
    assert_ne!(both.digest, replaced.digest);

    let view = cache.index().unwrap();
    assert_eq!(
        view.get("docker.io/org/img:t1").unwrap().digest,
        replaced.digest
    );
    assert_eq!(view.get("docker.io/org/img:t1-arm64").unwrap().digest, m3);
    assert_eq!(view.get("docker.io/org/img:t1-amd64").unwrap().digest, m2);
    let idx = cache.read_manifest(&replaced.digest).unwrap();
    let plats: Vec<_> = idx
        .manifests
        .iter()
        .map(|d| d.platform.clone().unwrap().architecture)
        .collect();
    assert_eq!(plats, ["amd64", "arm64"]);

    // The same images merged in another order into another cache give the same digest.
    let (_dir2, other) = self::cache();
    for (body, suffix, p) in [(r#"{"m":2}"#, "amd64", &amd), (r#"{"m":3}"#, "arm64", &arm)] {
        let d = other.put_blob(body.as_bytes()).unwrap();
        other
            .merge_arch(
                &image,
                suffix,
                p.clone(),
                Descriptor::new(OCI_MANIFEST, d, 7),
                None,
            )
            .unwrap();
    }
    assert_eq!(
        other
            .index()
            .unwrap()
            .get("docker.io/org/img:t1")
            .unwrap()
            .digest,
        replaced.digest
    );
}

#[test]
fn the_view_follows_writes_by_other_processes() {
    let (_dir, cache) = cache();
    let d = cache.put_blob(b"x").unwrap();
    assert!(cache.index().unwrap().get("docker.io/a/b:c").is_none());
    // Another writer (LinuxKit, another kilnd) replaces index.json.
    let body = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1,"annotations":{{"org.opencontainers.image.ref.name":"docker.io/a/b:c"}}}}]}}"#
    );
    write_atomic(cache.root(), "index.json", body.as_bytes()).unwrap();
    assert_eq!(
        cache
            .index()
            .unwrap()
            .get("docker.io/a/b:c")
            .unwrap()
            .digest,
        d
    );
}

#[test]
fn readers_never_see_the_index_go_back_while_it_is_rewritten() {
    let (_dir, cache) = cache();
    let cache = std::sync::Arc::new(cache);
    let d = cache.put_blob(b"{}").unwrap();
    let desc = Descriptor::new(OCI_MANIFEST, d, 2);
    let name = |i: usize| format!("docker.io/kiln/count:{i}");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers check that the number of references they see never decreases: a view
    // that ran ahead of the file must not be replaced by the older file.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (cache, done) = (cache.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut seen, mut reads) = (0, 0u64);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let n = cache.index().unwrap().entry_count();
                    assert!(n >= seen, "went back from {seen} to {n} references");
                    seen = n;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 0..100 {
        cache.set_ref(&name(i), desc.clone()).unwrap();
        // Served as soon as set_ref returns, and on disk.
        assert!(cache.index().unwrap().get(&name(i)).is_some());
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    // On disk: index.json with the journal, and index.json alone once folded.
    assert_eq!(
        Cache::open(cache.root())
            .unwrap()
            .index()
            .unwrap()
            .ref_count(),
        100
    );
    cache.fold_refs().unwrap();
    let on_disk: crate::oci::ImageIndex =
        serde_json::from_slice(&fs::read(cache.root().join("index.json")).unwrap()).unwrap();
    assert_eq!(on_disk.manifests.len(), 100);
    assert_eq!(
        fs::read_dir(cache.root())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-"))
            .count(),
        0
    );
}

#[test]
fn the_lock_excludes_other_processes() {
    let (_dir, cache) = cache();
    let probe = r#"
import fcntl, sys
f = open(sys.argv[1], "r+")
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("held")
"#;
    let try_lock = || {
        let out = Command::new("python3")
            .args(["-c", probe])
            .arg(cache.root().join(".lock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let lock = cache.lock().unwrap();
    assert_eq!(try_lock(), "held");
    drop(lock);
    assert_eq!(try_lock(), "free");
}

#[test]
fn concurrent_reference_changes_are_grouped_and_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(Cache::open(&dir.path().join("c")).unwrap());
    let d = cache.put_blob(b"{}").unwrap();
    let desc = Descriptor::new(OCI_MANIFEST, d, 2);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (cache, desc) = (cache.clone(), desc.clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let name = format!("docker.io/g/t{t}:{i}");
                    cache.set_ref(&name, desc.clone()).unwrap();
                    // Acknowledged means served and on disk.
                    assert!(cache.index().unwrap().get(&name).is_some());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let reopened = Cache::open(cache.root()).unwrap();
    let view = reopened.index().unwrap();
    assert_eq!(view.ref_count(), 320);
    let writes = cache.group.writes();
    eprintln!("{writes} writes of index.json for 320 changes");
    assert!(
        writes < 320,
        "{writes} writes for 320 changes: nothing was grouped"
    );
}

#[test]
fn a_failed_change_leaves_the_others_of_its_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("c")).unwrap();
    let d = cache.put_blob(b"{}").unwrap();
    let missing: kiln_shared::digest::Digest =
        format!("sha256:{}", "0".repeat(64)).parse().unwrap();
    let err = cache
        .update_refs(move |edit| {
            edit.set(
                "docker.io/a/b:ok-first",
                Descriptor::new(OCI_MANIFEST, d, 2),
            )?;
            edit.set(
                "docker.io/a/b:gone",
                Descriptor::new(OCI_MANIFEST, missing, 2),
            )
        })
        .unwrap_err();
    assert!(matches!(err, CacheError::DanglingReference { .. }), "{err}");
    // Nothing of the failed change was written, not even its first edit.
    assert!(
        cache
            .index()
            .unwrap()
            .get("docker.io/a/b:ok-first")
            .is_none()
    );
    let d = cache.put_blob(b"{}").unwrap();
    cache
        .set_ref("docker.io/a/b:later", Descriptor::new(OCI_MANIFEST, d, 2))
        .unwrap();
    assert!(cache.index().unwrap().get("docker.io/a/b:later").is_some());
}

/// A manifest blob in `cache`, and its descriptor.
fn a_manifest(cache: &Cache) -> Descriptor {
    let d = cache.put_blob(b"{}").unwrap();
    Descriptor::new(OCI_MANIFEST, d, 2)
}

/// The names the cache's references hold now, in order.
fn names(cache: &Cache) -> Vec<String> {
    cache
        .index()
        .unwrap()
        .refs()
        .map(|(n, _)| n.to_owned())
        .collect()
}

fn journal(cache: &Cache) -> std::path::PathBuf {
    cache.root().join(".kiln").join(journal::JOURNAL_FILE)
}

fn names_on_disk(root: &Path) -> Vec<String> {
    let index: crate::oci::ImageIndex =
        serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
    let mut names: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.ref_name().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn a_commit_appends_to_the_journal_and_a_fold_writes_index_json_whole() {
    let (_dir, cache) = cache();
    let desc = a_manifest(&cache);
    cache.set_ref("docker.io/a/b:1", desc.clone()).unwrap();
    cache.set_ref("docker.io/a/b:2", desc.clone()).unwrap();
    assert!(cache.remove_ref("docker.io/a/b:1").unwrap());
    // index.json is the state before the journal; the journal holds the three commits.
    assert!(names_on_disk(cache.root()).is_empty());
    assert_eq!(cache.index().unwrap().unfolded(), 3);
    let reopened = Cache::open(cache.root()).unwrap();
    assert_eq!(names(&reopened), ["docker.io/a/b:2"]);

    cache.fold_refs().unwrap();
    assert_eq!(names_on_disk(cache.root()), ["docker.io/a/b:2"]);
    assert_eq!(fs::metadata(journal(&cache)).unwrap().len(), 0);
    assert_eq!(cache.index().unwrap().unfolded(), 0);
    // The other instance follows the fold, and appends to the new journal.
    reopened.set_ref("docker.io/a/b:3", desc).unwrap();
    assert!(cache.index().unwrap().get("docker.io/a/b:3").is_some());
}

#[test]
fn a_crash_between_the_folds_two_writes_replays_records_index_json_holds() {
    let (_dir, cache) = cache();
    let d = cache.put_blob(b"{}").unwrap();
    let e = cache.put_blob(b"[]").unwrap();
    cache
        .set_ref(
            "docker.io/a/b:1",
            Descriptor::new(OCI_MANIFEST, d.clone(), 2),
        )
        .unwrap();
    cache
        .set_ref("docker.io/a/b:2", Descriptor::new(OCI_MANIFEST, d, 2))
        .unwrap();
    cache
        .set_ref(
            "docker.io/a/b:1",
            Descriptor::new(OCI_MANIFEST, e.clone(), 2),
        )
        .unwrap();
    let before = fs::read(journal(&cache)).unwrap();
    cache.fold_refs().unwrap();
    // The crash: index.json is new, the journal still the old one.
    fs::write(journal(&cache), &before).unwrap();
    let reopened = Cache::open(cache.root()).unwrap();
    let view = reopened.index().unwrap();
    assert_eq!(view.ref_count(), 2);
    assert_eq!(view.get("docker.io/a/b:1").unwrap().digest, e);
    assert!(fsck(&reopened, false).unwrap().is_clean());
}

#[test]
fn a_torn_journal_record_counts_for_nothing_and_is_cut_off_by_the_next_commit() {
    let (_dir, cache) = cache();
    let desc = a_manifest(&cache);
    cache.set_ref("docker.io/a/b:1", desc.clone()).unwrap();
    cache.set_ref("docker.io/a/b:2", desc.clone()).unwrap();
    // A crash in the middle of the second append: half of its line on disk.
    let bytes = fs::read(journal(&cache)).unwrap();
    let first = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let torn = &bytes[..first + (bytes.len() - first) / 2];
    fs::write(journal(&cache), torn).unwrap();
    drop(cache);
    let (root, cache) = {
        let root = _dir.path().join("c");
        (root.clone(), Cache::open(&root).unwrap())
    };
    assert_eq!(names(&cache), ["docker.io/a/b:1"]);
    let report = fsck(&cache, false).unwrap();
    assert!(
        report.is_clean() && report.journal_torn && report.unfolded == 1,
        "{report}"
    );
    assert!(report.to_string().contains("torn record"), "{report}");
    let report = fsck(&cache, true).unwrap();
    assert!(!cache.index().unwrap().journal_torn(), "{report}");
    cache.set_ref("docker.io/a/b:3", desc).unwrap();
    let again = Cache::open(&root).unwrap();
    assert_eq!(names(&again), ["docker.io/a/b:1", "docker.io/a/b:3"]);
    assert!(!journal::decode(&fs::read(journal(&again)).unwrap()).torn);
}

#[test]
fn another_writers_appends_are_read_as_they_come_and_its_rewrite_is_folded_at_once() {
    let (_dir, a) = cache();
    let b = Cache::open(a.root()).unwrap();
    let d = a.put_blob(b"{}").unwrap();
    let desc = Descriptor::new(OCI_MANIFEST, d.clone(), 2);
    a.set_ref("docker.io/a/b:1", desc.clone()).unwrap();
    let seen = b.index().unwrap();
    assert!(seen.get("docker.io/a/b:1").is_some());
    a.set_ref("docker.io/a/b:2", desc.clone()).unwrap();
    let next = b.index().unwrap();
    assert!(next.get("docker.io/a/b:2").is_some());
    assert_eq!(
        next.epoch(),
        seen.epoch(),
        "a grown journal is read from where it was"
    );

    // LinuxKit rewrites index.json from the file alone (it knows nothing of the journal).
    let body = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":2,"annotations":{{"org.opencontainers.image.ref.name":"docker.io/lk/img:1"}}}}]}}"#
    );
    write_atomic(a.root(), "index.json", body.as_bytes()).unwrap();
    let view = a.index().unwrap();
    assert_eq!(view.ref_count(), 3, "its name and the journal's");
    a.set_ref("docker.io/a/b:3", desc).unwrap();
    assert_eq!(
        a.index().unwrap().unfolded(),
        0,
        "folded at the first commit after it"
    );
    assert_eq!(
        names_on_disk(a.root()),
        [
            "docker.io/a/b:1",
            "docker.io/a/b:2",
            "docker.io/a/b:3",
            "docker.io/lk/img:1"
        ]
    );
}

#[test]
fn the_journal_is_folded_when_it_has_grown() {
    let (_dir, cache) = cache();
    let desc = a_manifest(&cache);
    for i in 0..600 {
        cache
            .set_ref(&format!("docker.io/a/b:{i}"), desc.clone())
            .unwrap();
        assert!(cache.index().unwrap().unfolded() < 300, "commit {i}");
    }
    assert!(names_on_disk(cache.root()).len() >= 300);
    assert_eq!(
        Cache::open(cache.root())
            .unwrap()
            .index()
            .unwrap()
            .ref_count(),
        600
    );
}
