//! No acknowledged write is lost and no bad descriptor is stored (issue 12): manifests
//! are checked against the blobs they name, and gc and pushes agree on what is in use.

use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::cache::{GcOptions, fsck, gc};

const LAYER_MT: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Makes a blob look old to gc.
fn age(r: &Reg, d: &Digest) {
    std::fs::File::open(r.cache.blob_path(d))
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

fn digests(manifest: &str) -> (Digest, Digest) {
    let v: Value = serde_json::from_str(manifest).unwrap();
    let d = |p: &Value| p["digest"].as_str().unwrap().parse().unwrap();
    (d(&v["config"]), d(&v["layers"][0]))
}

#[tokio::test]
async fn descriptors_that_do_not_match_the_stored_blob_are_refused() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let (config, _) = digests(&body);
    let big = vec![7u8; 100_000];
    let layer = r.push_blob("org/img", &big).await;
    let mut v: Value = serde_json::from_str(&body).unwrap();
    v["layers"] = json!([{"mediaType": LAYER_MT, "digest": layer.to_string(), "size": 7}]);
    let before = r.snapshot();
    let a = r
        .push_manifest("org/img", "v1", OCI_MANIFEST, &v.to_string())
        .await;
    a.is_error(400, "SIZE_INVALID");
    assert!(
        a.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("layers[0]")
    );
    v["layers"][0]["size"] = json!(big.len());
    v["config"]["size"] = json!(1);
    r.push_manifest("org/img", "v1", OCI_MANIFEST, &v.to_string())
        .await
        .is_error(400, "SIZE_INVALID");
    assert_eq!(r.snapshot(), before, "a refused manifest writes nothing");

    // Indexes: a child of the wrong size, a layer posing as a manifest, a layer, a
    // manifest of another kind than its descriptor says.
    let good = r.push_manifest("org/img", "amd", OCI_MANIFEST, &body).await;
    assert_eq!(good.status, StatusCode::CREATED);
    let m = sha(body.as_bytes());
    let before = r.snapshot();
    let index = |mt: &str, d: &Digest, size: usize| {
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": mt, "digest": d.to_string(), "size": size,
             "platform": {"os": "linux", "architecture": "amd64"}}]})
        .to_string()
    };
    r.push_manifest(
        "org/img",
        "i",
        OCI_INDEX,
        &index(OCI_MANIFEST, &m, body.len() + 1),
    )
    .await
    .is_error(400, "SIZE_INVALID");
    r.push_manifest(
        "org/img",
        "i",
        OCI_INDEX,
        &index(OCI_MANIFEST, &layer, big.len()),
    )
    .await
    .is_error(400, "MANIFEST_INVALID");
    r.push_manifest(
        "org/img",
        "i",
        OCI_INDEX,
        &index(LAYER_MT, &layer, big.len()),
    )
    .await
    .is_error(400, "MANIFEST_INVALID");
    r.push_manifest(
        "org/img",
        "i",
        OCI_INDEX,
        &index(DOCKER_MANIFEST, &m, body.len()),
    )
    .await
    .is_error(400, "MANIFEST_INVALID");
    assert_eq!(r.snapshot(), before, "a refused index writes nothing");
    let a = r
        .push_manifest(
            "org/img",
            "i",
            OCI_INDEX,
            &index(OCI_MANIFEST, &m, body.len()),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let _ = config;
    let report = fsck(&r.cache, false).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test]
async fn a_blob_a_client_headed_survives_gc_until_its_manifest_lands() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let (config, layer) = digests(&body);
    // Pushed long ago and never referenced: garbage, as far as gc can tell.
    age(&r, &config);
    age(&r, &layer);
    // A client checks the blobs (200: it skips their upload) ...
    for d in [&config, &layer] {
        let a = r
            .req(
                Method::HEAD,
                &format!("/v2/org/img/blobs/{d}"),
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    // ... gc runs ...
    let report = gc(&r.cache, GcOptions::default()).unwrap();
    assert_eq!(report.blobs_removed, 0, "{report}");
    // ... and the manifest that references them lands whole.
    let a = r.push_manifest("org/img", "v1", OCI_MANIFEST, &body).await;
    assert_eq!(a.status, StatusCode::CREATED);
    for d in [&config, &layer] {
        let a = r.get(&format!("/v2/org/img/blobs/{d}"), &[]).await;
        assert_eq!(a.status, StatusCode::OK, "{d} was collected");
    }
    let report = fsck(&r.cache, false).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test]
async fn a_manifest_put_checks_its_blobs_under_the_writer_lock() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let (_, layer) = digests(&body);
    let manifest = r.cache.blob_path(&sha(body.as_bytes()));
    // gc holds the lock, and removes the layer while the push waits for it.
    let lock = r.cache.lock().unwrap();
    let sweep = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The push has stored its manifest blob: it is at the lock now.
        while !manifest.exists() {
            assert!(Instant::now() < deadline, "the push never got to the lock");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::remove_file(r.cache.blob_path(&layer)).unwrap();
        drop(lock);
    };
    let (a, ()) = tokio::join!(r.push_manifest("org/img", "v1", OCI_MANIFEST, &body), sweep);
    // Not acknowledged, as its layer is gone; had it been, fsck would find it dangling.
    a.is_error(400, "MANIFEST_BLOB_UNKNOWN");
    assert!(
        r.cache
            .index()
            .unwrap()
            .get("docker.io/org/img:v1")
            .is_none()
    );
    let report = fsck(&r.cache, false).unwrap();
    assert!(report.is_clean(), "{report}");
}

/// Serves one blob held in memory, as an upstream would (through a verifying writer).
#[derive(Debug)]
struct Upstream(Vec<u8>);

impl crate::cache::BlobSource for Upstream {
    fn fetch<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        digest: &'a Digest,
        from: &'a crate::cache::OnDemand,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if from.is_document() {
                return cache
                    .land_document(&self.0, digest, from)
                    .map_err(|e| e.to_string());
            }
            let mut w = cache.blob_writer().map_err(|e| e.to_string())?;
            w.write_bytes(&self.0).map_err(|e| e.to_string())?;
            w.finish(Some(digest), Some(from.size))
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

#[tokio::test]
async fn a_blob_on_demand_is_headed_from_its_record_fetched_on_get_and_503_when_it_cannot_be() {
    let r = Reg::new();
    let layer = b"a layer left upstream".to_vec();
    let d = sha(&layer);
    r.cache
        .record_on_demand(&[(
            d.clone(),
            crate::cache::OnDemand {
                upstream: "up.example:5000".into(),
                repo: "team/org/x".into(),
                image: "org/x".into(),
                size: layer.len() as u64,
                media_type: None,
                recorded: 0,
            },
        )])
        .unwrap();
    let uri = format!("/v2/org/x/blobs/{d}");
    // HEAD answers from the record: nothing is fetched.
    let head = r.req(Method::HEAD, &uri, &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), layer.len().to_string());
    assert_eq!(r.cache.blob_size(&d).unwrap(), None);
    // No upstream to fetch it from: 503 with what and what to do; nothing written.
    let get = r.get(&uri, &[]).await;
    get.is_error(503, "UNAVAILABLE");
    let message = get.json()["errors"][0]["message"].to_string();
    assert!(
        message.contains("on demand from up.example:5000") && message.contains("kiln pull org/x"),
        "{message}"
    );
    assert_eq!(get.json()["errors"][0]["detail"]["digest"], d.to_string());
    assert!(get.headers.contains_key("retry-after"));
    assert_eq!(r.cache.blob_size(&d).unwrap(), None);
    // With its upstream: fetched, verified, served; then held here.
    r.cache.set_blob_source(Arc::new(Upstream(layer.clone())));
    let get = r.get(&uri, &[]).await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.body.as_ref(), layer.as_slice());
    assert_eq!(r.cache.blob_size(&d).unwrap(), Some(layer.len() as u64));
    assert!(r.cache.on_demand(&d).unwrap().is_none());
}

#[tokio::test]
async fn a_manifest_on_demand_is_named_fetched_on_get_with_the_record_of_its_blobs_and_503_when_it_cannot_be()
 {
    let r = Reg::new();
    // A lazily fetched package: its index here, its manifest (and what it names) upstream.
    let (config, layer) = (b"{}".to_vec(), b"a layer left upstream".to_vec());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&layer).to_string(), "size": layer.len()}],
    })
    .to_string();
    let m = sha(manifest.as_bytes());
    let from = crate::cache::OnDemand {
        upstream: "up.example:5000".into(),
        repo: "team/org/x".into(),
        image: "org/x".into(),
        size: manifest.len() as u64,
        media_type: Some(OCI_MANIFEST.into()),
        recorded: 0,
    };
    r.cache
        .record_on_demand(&[(m.clone(), from.clone())])
        .unwrap();
    let entry = json!({"mediaType": OCI_MANIFEST, "digest": m.to_string(), "size": manifest.len(),
        "platform": {"os": "linux", "architecture": "amd64"}});
    let index =
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}).to_string();
    // A client may push an index naming it: the record says it is a manifest.
    let put = r.push_manifest("org/x", "t", OCI_INDEX, &index).await;
    assert_eq!(put.status, StatusCode::CREATED, "{:?}", put.body);
    r.cache
        .set_ref(
            "docker.io/org/x:t-amd64",
            Descriptor::new(OCI_MANIFEST, m.clone(), manifest.len() as u64),
        )
        .unwrap();
    let tags = r.get("/v2/org/x/tags/list", &[]).await;
    assert_eq!(tags.json()["tags"], json!(["t", "t-amd64"]));

    // No upstream to fetch it from: 503 with what and what to do, by tag and by digest.
    let accept = [("accept", OCI_MANIFEST)];
    for reference in ["t-amd64".to_owned(), m.to_string()] {
        let get = r
            .get(&format!("/v2/org/x/manifests/{reference}"), &accept)
            .await;
        get.is_error(503, "UNAVAILABLE");
        let message = get.json()["errors"][0]["message"].to_string();
        assert!(message.contains("kiln pull org/x"), "{message}");
    }
    assert_eq!(r.cache.blob_size(&m).unwrap(), None);

    // With its upstream: fetched, verified, served by tag and by digest; what it names is
    // recorded on demand in turn, so the cache stays consistent.
    r.cache
        .set_blob_source(Arc::new(Upstream(manifest.clone().into_bytes())));
    let get = r.get("/v2/org/x/manifests/t-amd64", &accept).await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.body.as_ref(), manifest.as_bytes());
    assert_eq!(get.header("content-type"), OCI_MANIFEST);
    assert_eq!(get.header("docker-content-digest"), m.to_string());
    let get = r.get(&format!("/v2/org/x/manifests/{m}"), &accept).await;
    assert_eq!(get.body.as_ref(), manifest.as_bytes());
    assert!(r.cache.on_demand(&m).unwrap().is_none());
    assert_eq!(
        r.cache.on_demand(&sha(&layer)).unwrap().map(|f| f.size),
        Some(layer.len() as u64)
    );
    let report = fsck(&r.cache, false).unwrap();
    assert!(report.is_clean(), "{report}");
    // Its layer here now: a blob DELETE sees the manifest fetched since the view was
    // built as a user, and refuses.
    r.cache.put_blob(&layer).unwrap();
    r.req(
        Method::DELETE,
        &format!("/v2/org/x/blobs/{}", sha(&layer)),
        &[],
        Bytes::new(),
    )
    .await
    .is_error(405, "UNSUPPORTED");
    assert!(r.cache.blob_size(&sha(&layer)).unwrap().is_some());
}
