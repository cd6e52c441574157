//! The record and its invariants. The source here is another cache directory (the one a
//! push came from); fetching through a real upstream is tested in `tests/it/upstream.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::cache::{GcOptions, fsck, gc, stats};
use crate::oci::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};

/// Serves blobs from `from` (or fails with `fail`), counting the fetches.
#[derive(Debug)]
struct Layout {
    from: Arc<Cache>,
    fail: Option<String>,
    fetches: AtomicUsize,
}

impl BlobSource for Layout {
    fn fetch<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        digest: &'a Digest,
        from: &'a OnDemand,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = &self.fail {
                return Err(e.clone());
            }
            let bytes = self
                .from
                .read_blob(digest, u64::MAX)
                .map_err(|e| e.to_string())?;
            if from.is_document() {
                return cache
                    .land_document(&bytes, digest, from)
                    .map_err(|e| e.to_string());
            }
            let mut w = cache.blob_writer().map_err(|e| e.to_string())?;
            w.write_bytes(&bytes).map_err(|e| e.to_string())?;
            w.finish(Some(digest), Some(from.size))
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// Installs `up` as the source of `here`'s blobs on demand; returns it, to count fetches.
fn serve_from(up: &Arc<Cache>, here: &Cache) -> Arc<Layout> {
    let source = Arc::new(Layout {
        from: Arc::clone(up),
        fail: None,
        fetches: AtomicUsize::new(0),
    });
    here.set_blob_source(Arc::clone(&source) as Arc<dyn BlobSource>);
    source
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An image made in `up`; `here` gets its manifest only, its config and layer recorded
/// on demand (as a lazy fetch lands them). Returns the manifest and the blobs on demand.
fn lazy_image(up: &Cache, here: &Cache, seed: u8) -> (Descriptor, Vec<(Digest, OnDemand)>) {
    let layer = vec![seed; 1000];
    let layer_d = up.put_blob(&layer).unwrap();
    let config = format!(r#"{{"seed":{seed}}}"#);
    let config_d = up.put_blob(config.as_bytes()).unwrap();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor::new(OCI_CONFIG, config_d.clone(), config.len() as u64),
        "layers": [Descriptor::new(OCI_LAYER_GZIP, layer_d.clone(), layer.len() as u64)],
    });
    let bytes = serde_json::to_vec(&m).unwrap();
    let d = here.put_blob(&bytes).unwrap();
    let from = |size| OnDemand {
        upstream: "up.example:5000/team".into(),
        repo: "team/org/x".into(),
        image: "org/x".into(),
        size,
        media_type: None,
        recorded: 0,
    };
    (
        Descriptor::new(OCI_MANIFEST, d, bytes.len() as u64),
        vec![
            (config_d, from(config.len() as u64)),
            (layer_d, from(layer.len() as u64)),
        ],
    )
}

fn caches() -> (tempfile::TempDir, Arc<Cache>, Arc<Cache>) {
    let dir = tempfile::tempdir().unwrap();
    let up = Arc::new(Cache::open(&dir.path().join("up")).unwrap());
    let here = Arc::new(Cache::open(&dir.path().join("here")).unwrap());
    (dir, up, here)
}

#[test]
fn blobs_on_demand_are_consistent_counted_apart_and_fetched_once_on_read() {
    let (dir, up, here) = caches();
    let (desc, on_demand) = lazy_image(&up, &here, 1);
    here.record_on_demand(&on_demand).unwrap();
    here.set_ref("docker.io/org/x:t", desc.clone()).unwrap();

    // Durable: a reopened cache knows them.
    drop(here);
    let here = Arc::new(Cache::open(&dir.path().join("here")).unwrap());
    let (config, layer) = (&on_demand[0].0, &on_demand[1].0);
    let got = here.on_demand(layer).unwrap().unwrap();
    assert!(got.recorded > 0, "recorded when: {got:?}");
    assert_eq!(OnDemand { recorded: 0, ..got }, on_demand[1].1);
    let report = fsck(&here, false).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        report.on_demand.get("up.example:5000/team"),
        Some(&(2, 1000 + on_demand[0].1.size))
    );
    assert!(
        report
            .to_string()
            .contains("2 blob(s) (1010 B) on demand from up.example:5000/team"),
        "{report}"
    );
    let s = stats(&here).unwrap();
    assert_eq!((s.blobs, s.on_demand), (1, 2), "{s}");
    // gc keeps the records a reference reaches, and frees nothing for them.
    let g = gc(&here, GcOptions::default()).unwrap();
    assert_eq!((g.on_demand_dropped, g.blobs_removed), (0, 0), "{g}");

    let source = serve_from(&up, &here);
    let rt = rt();
    assert_eq!(
        rt.block_on(here.ensure_blob(config)).unwrap(),
        Some(on_demand[0].1.size)
    );
    assert_eq!(rt.block_on(here.ensure_graph(&desc)).unwrap(), 1000);
    assert_eq!(rt.block_on(here.ensure_graph(&desc)).unwrap(), 0);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    assert!(here.on_demand_all().unwrap().is_empty());
    assert_eq!(here.read_blob(layer, 4096).unwrap(), vec![1; 1000]);
    let report = fsck(&here, false).unwrap();
    assert!(report.is_clean() && report.on_demand.is_empty(), "{report}");
    // A blob neither here nor recorded is unknown, as before.
    let other = up.put_blob(b"elsewhere").unwrap();
    assert_eq!(rt.block_on(here.ensure_blob(&other)).unwrap(), None);
}

#[test]
fn a_blob_on_demand_that_cannot_be_fetched_says_what_and_what_to_do() {
    let (_dir, up, here) = caches();
    let (desc, on_demand) = lazy_image(&up, &here, 2);
    here.record_on_demand(&on_demand).unwrap();
    here.set_ref("docker.io/org/x:t", desc.clone()).unwrap();
    let rt = rt();
    let err = rt.block_on(here.ensure_graph(&desc)).unwrap_err();
    assert!(err.to_string().contains("no upstream"), "{err}");
    here.set_blob_source(Arc::new(Layout {
        from: up,
        fail: Some("connection refused".into()),
        fetches: AtomicUsize::new(0),
    }));
    let layer = &on_demand[1].0;
    let err = rt.block_on(here.ensure_blob(layer)).unwrap_err();
    let msg = err.to_string();
    for part in [
        &layer.to_string(),
        "of org/x",
        "on demand from up.example:5000/team",
        "connection refused",
        "kiln pull org/x",
        "kiln build --force org/x",
    ] {
        assert!(msg.contains(part), "{part:?} missing: {msg}");
    }
    // Nothing changed: still on demand, still consistent.
    assert!(here.on_demand(layer).unwrap().is_some());
    assert!(fsck(&here, false).unwrap().is_clean());
}

#[test]
fn a_crash_between_record_and_index_leaves_a_consistent_cache_and_gc_forgets_the_rest() {
    let (dir, up, here) = caches();
    // Recorded, then "killed" before the index named the image: the record is extra.
    let (_, orphan) = lazy_image(&up, &here, 3);
    here.record_on_demand(&orphan).unwrap();
    drop(here);
    let here = Cache::open(&dir.path().join("here")).unwrap();
    let report = fsck(&here, false).unwrap();
    assert!(report.is_clean() && report.on_demand.is_empty(), "{report}");
    assert_eq!(
        stats(&here).unwrap().on_demand_bytes,
        1000 + orphan[0].1.size
    );
    // An image that was named and is dropped again: its records go too; a named one
    // keeps its own.
    let (gone, gone_blobs) = lazy_image(&up, &here, 4);
    here.record_on_demand(&gone_blobs).unwrap();
    here.set_ref("docker.io/org/x:gone", gone).unwrap();
    let (kept, kept_blobs) = lazy_image(&up, &here, 5);
    here.record_on_demand(&kept_blobs).unwrap();
    here.set_ref("docker.io/org/x:kept", kept).unwrap();
    here.remove_ref("docker.io/org/x:gone").unwrap();
    // Within the grace period, a record nothing names may be a landing's that has not
    // named it yet: kept.
    let g = gc(&here, GcOptions::default()).unwrap();
    assert_eq!(g.on_demand_dropped, 0, "{g}");
    let past_grace = || GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    };
    let dry = gc(
        &here,
        GcOptions {
            dry_run: true,
            ..past_grace()
        },
    )
    .unwrap();
    assert_eq!(dry.on_demand_dropped, 4);
    assert_eq!(here.on_demand_all().unwrap().len(), 6);
    let g = gc(&here, past_grace()).unwrap();
    assert_eq!(g.on_demand_dropped, 4, "{g}");
    assert!(g.to_string().contains("forgot 4 blobs on demand"), "{g}");
    let left: Vec<Digest> = here.on_demand_all().unwrap().into_keys().collect();
    let mut want: Vec<Digest> = kept_blobs.into_iter().map(|(d, _)| d).collect();
    want.sort();
    assert_eq!(left, want);
    assert!(fsck(&here, false).unwrap().is_clean());
}

/// An index made in `up` over one manifest (a config and a layer); `here` gets the index
/// only and the manifest recorded on demand (as a lazy fetch lands a package's tag).
/// Returns the index, the manifest, and the manifest's record.
fn lazy_index(up: &Cache, here: &Cache) -> (Descriptor, Descriptor, OnDemand) {
    let (manifest, children) = lazy_image(up, up, 7);
    let manifest_bytes = up.read_blob(&manifest.digest, u64::MAX).unwrap();
    let mut entry = manifest.clone();
    entry.platform =
        Some(serde_json::from_str(r#"{"os":"linux","architecture":"amd64"}"#).unwrap());
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_INDEX,
        "manifests": [entry],
    }))
    .unwrap();
    let index_d = here.put_blob(&index).unwrap();
    up.put_blob(&index).unwrap();
    assert_eq!(children.len(), 2);
    let from = OnDemand {
        upstream: "up.example:5000/team".into(),
        repo: "team/org/x".into(),
        image: "org/x".into(),
        size: manifest_bytes.len() as u64,
        media_type: Some(OCI_MANIFEST.into()),
        recorded: 0,
    };
    (
        Descriptor::new(crate::oci::OCI_INDEX, index_d, index.len() as u64),
        manifest,
        from,
    )
}

#[test]
fn a_manifest_on_demand_is_named_and_brings_the_record_of_its_blobs_before_it_lands() {
    let (_dir, up, here) = caches();
    let (index, manifest, from) = lazy_index(&up, &here);

    // A name may point at a manifest on demand, never at a blob neither here nor recorded.
    let err = here
        .set_ref("docker.io/org/x:t-amd64", manifest.clone())
        .unwrap_err();
    assert!(matches!(err, CacheError::DanglingReference { .. }), "{err}");
    here.record_on_demand(&[(manifest.digest.clone(), from.clone())])
        .unwrap();
    here.set_ref("docker.io/org/x:t", index.clone()).unwrap();
    here.set_ref("docker.io/org/x:t-amd64", manifest.clone())
        .unwrap();
    let report = fsck(&here, false).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        report.on_demand.get("up.example:5000/team"),
        Some(&(1, from.size))
    );
    let g = gc(&here, GcOptions::default()).unwrap();
    assert_eq!((g.on_demand_dropped, g.blobs_removed), (0, 0), "{g}");

    // A crash inside land_document, after its blobs were recorded and before it landed:
    // consistent, and gc forgets the records nothing reaches (the manifest is not here).
    let doc = up.read_blob(&manifest.digest, u64::MAX).unwrap();
    let wrong = OnDemand {
        size: from.size + 1,
        ..from.clone()
    };
    let err = here
        .land_document(&doc, &manifest.digest, &wrong)
        .unwrap_err();
    assert!(matches!(err, CacheError::SizeMismatch { .. }), "{err}");
    assert_eq!(here.on_demand_all().unwrap().len(), 1, "nothing recorded");
    let parsed: AnyManifest = serde_json::from_slice(&doc).unwrap();
    let children: Vec<(Digest, OnDemand)> = parsed
        .children()
        .map(|c| {
            let child = OnDemand {
                size: c.size,
                media_type: None,
                ..from.clone()
            };
            (c.digest.clone(), child)
        })
        .collect();
    here.record_on_demand(&children).unwrap();
    assert!(fsck(&here, false).unwrap().is_clean());
    let past_grace = GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    };
    let g = gc(&here, past_grace).unwrap();
    assert_eq!(g.on_demand_dropped, 2, "{g}");

    // Read through the index: the manifest comes first, with the record of its config
    // and layer, then those.
    let source = serve_from(&up, &here);
    let rt = rt();
    let fetched = rt.block_on(here.ensure_graph(&index)).unwrap();
    let config_size = parsed.config.as_ref().unwrap().size;
    assert_eq!(fetched, from.size + config_size + 1000);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 3);
    assert!(here.on_demand_all().unwrap().is_empty());
    let report = fsck(&here, false).unwrap();
    assert!(report.is_clean() && report.on_demand.is_empty(), "{report}");
}

#[test]
fn a_capped_gc_and_a_repair_rewrite_an_index_that_names_manifests_on_demand() {
    let (_dir, up, here) = caches();
    let (index, manifest, from) = lazy_index(&up, &here);
    here.record_on_demand(&[(manifest.digest.clone(), from)])
        .unwrap();
    here.set_ref("docker.io/org/x:t", index).unwrap();
    here.set_ref("docker.io/org/x:t-amd64", manifest).unwrap();
    // An image here, used long ago: a cap drops it and keeps the lazy one, which takes
    // (almost) no space.
    let (old, old_blobs) = lazy_image(&up, &here, 9);
    for (d, _) in &old_blobs {
        let bytes = up.read_blob(d, u64::MAX).unwrap();
        here.put_blob(&bytes).unwrap();
    }
    here.set_ref("docker.io/org/y:old", old).unwrap();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
    here.touch_ref_at("docker.io/org/y:old", long_ago);
    let g = gc(
        &here,
        GcOptions {
            max_size: Some(1000),
            grace: Duration::ZERO,
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        g.refs_dropped,
        vec!["docker.io/org/y:old".to_owned()],
        "{g}"
    );
    let index = here.index().unwrap();
    assert!(index.get("docker.io/org/x:t-amd64").is_some());
    assert!(fsck(&here, false).unwrap().is_clean());

    // A broken reference beside them: repair drops it and keeps the lazy ones.
    let lost = up.put_blob(b"lost").unwrap();
    here.put_blob(b"lost").unwrap();
    here.set_ref(
        "docker.io/org/z:lost",
        Descriptor::new(OCI_MANIFEST, lost.clone(), 4),
    )
    .unwrap();
    std::fs::remove_file(here.blob_path(&lost)).unwrap();
    let report = fsck(&here, true).unwrap();
    assert!(
        report
            .to_string()
            .contains("dropped reference docker.io/org/z:lost"),
        "{report}"
    );
    let index = here.index().unwrap();
    assert!(index.get("docker.io/org/z:lost").is_none());
    assert!(index.get("docker.io/org/x:t-amd64").is_some());
    assert!(fsck(&here, false).unwrap().is_clean());
}

#[test]
fn a_manifest_landing_on_demand_leases_the_blobs_it_names_that_are_here_from_gc() {
    let (_dir, up, here) = caches();
    let (_, manifest, from) = lazy_index(&up, &here);
    let doc = up.read_blob(&manifest.digest, u64::MAX).unwrap();
    let parsed: AnyManifest = serde_json::from_slice(&doc).unwrap();
    // Its config is here already, old garbage to gc (a dropped image shared it).
    let config = parsed.config.clone().unwrap();
    let bytes = up.read_blob(&config.digest, u64::MAX).unwrap();
    here.put_blob(&bytes).unwrap();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
    let file = std::fs::File::options()
        .write(true)
        .open(here.blob_path(&config.digest))
        .unwrap();
    file.set_modified(long_ago).unwrap();
    here.record_on_demand(&[(manifest.digest.clone(), from.clone())])
        .unwrap();

    here.land_document(&doc, &manifest.digest, &from).unwrap();
    let mtime = std::fs::metadata(here.blob_path(&config.digest))
        .unwrap()
        .modified()
        .unwrap();
    assert!(mtime > long_ago + Duration::from_secs(3600), "not leased");
    assert!(here.on_demand(&config.digest).unwrap().is_none());
    let layer = &parsed.layers[0].digest;
    assert_eq!(here.on_demand(layer).unwrap().map(|f| f.size), Some(1000));
    // Nothing names them yet: gc within the grace period takes neither the config nor
    // the layer's record (only the manifest's own, which is here now).
    let g = gc(&here, GcOptions::default()).unwrap();
    assert_eq!((g.blobs_removed, g.on_demand_dropped), (0, 1), "{g}");
    assert!(here.blob_size(&config.digest).unwrap().is_some());
    assert!(here.on_demand(layer).unwrap().is_some());
}
