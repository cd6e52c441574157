//! Manifests: negotiation, refused pushes, paging, referrers, deletes, the view, the
//! miss hook.

use super::*;

#[tokio::test]
async fn manifests_by_tag_and_digest_with_negotiation() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let d = sha(body.as_bytes());
    let put = r.push_manifest("org/img", "v1", OCI_MANIFEST, &body).await;
    assert_eq!(put.status, StatusCode::CREATED, "{:?}", put.body);
    assert_eq!(put.header("docker-content-digest"), d.to_string());
    assert_eq!(put.header("location"), format!("/v2/org/img/manifests/{d}"));
    assert_eq!(
        r.cache
            .index()
            .unwrap()
            .get("docker.io/org/img:v1")
            .unwrap()
            .digest,
        d
    );

    let accept = [("accept", OCI_MANIFEST)];
    assert!(r.cache.last_used().unwrap().is_empty());
    for uri in [
        "/v2/org/img/manifests/v1".to_owned(),
        format!("/v2/org/img/manifests/{d}"),
    ] {
        let a = r.get(&uri, &accept).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(&a.body[..], body.as_bytes(), "stored bytes, unchanged");
        assert_eq!(a.header("content-type"), OCI_MANIFEST);
        assert_eq!(a.header("docker-content-digest"), d.to_string());
        assert_eq!(a.header("content-length"), body.len().to_string());
        assert_eq!(a.header("etag"), format!("\"{d}\""));
        let h = r.req(Method::HEAD, &uri, &accept, Bytes::new()).await;
        assert_eq!(h.status, StatusCode::OK);
        assert!(h.body.is_empty());
        assert_eq!(h.header("content-length"), body.len().to_string());
    }
    // Pulls by tag are recorded for `gc --max-size`.
    let used = r.cache.last_used().unwrap();
    assert_eq!(used.keys().collect::<Vec<_>>(), ["docker.io/org/img:v1"]);
    // registry:2: an OCI manifest only for clients that accept it.
    r.get("/v2/org/img/manifests/v1", &[])
        .await
        .is_error(404, "MANIFEST_UNKNOWN");
    r.get("/v2/org/img/manifests/v1", &[("accept", DOCKER_MANIFEST)])
        .await
        .is_error(404, "MANIFEST_UNKNOWN");
    let nm = r
        .get(
            "/v2/org/img/manifests/v1",
            &[
                ("accept", OCI_MANIFEST),
                ("if-none-match", &format!("\"{d}\"")),
            ],
        )
        .await;
    assert_eq!(nm.status, StatusCode::NOT_MODIFIED);

    // A Docker manifest list, and a Docker manifest pushed by digest for its amd64 entry.
    let docker = body.replace(OCI_MANIFEST, DOCKER_MANIFEST);
    let dd = sha(docker.as_bytes());
    let put = r
        .push_manifest("org/img", &dd.to_string(), DOCKER_MANIFEST, &docker)
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    let arm = r.image("org/img", "arm64").await;
    let arm_d = sha(arm.as_bytes());
    r.push_manifest("org/img", &arm_d.to_string(), OCI_MANIFEST, &arm)
        .await;
    let list = json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": arm_d.to_string(), "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": DOCKER_MANIFEST, "digest": dd.to_string(), "size": docker.len(), "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    })
    .to_string();
    let ld = sha(list.as_bytes());
    assert_eq!(
        r.push_manifest("org/img", "multi", DOCKER_LIST, &list)
            .await
            .status,
        StatusCode::CREATED
    );
    let a = r
        .get("/v2/org/img/manifests/multi", &[("accept", DOCKER_LIST)])
        .await;
    assert_eq!(a.header("docker-content-digest"), ld.to_string());
    assert_eq!(a.header("content-type"), DOCKER_LIST);
    // A client that does not take lists gets the linux/amd64 image by tag...
    let a = r
        .get(
            "/v2/org/img/manifests/multi",
            &[("accept", DOCKER_MANIFEST)],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("docker-content-digest"), dd.to_string());
    assert_eq!(&a.body[..], docker.as_bytes());
    // ...and the list itself by digest.
    let a = r.get(&format!("/v2/org/img/manifests/{ld}"), &[]).await;
    assert_eq!(a.header("docker-content-digest"), ld.to_string());
    r.get("/v2/org/img/manifests/multi", &[])
        .await
        .is_error(400, "MANIFEST_INVALID");
    // Children pushed by digest only stay reachable under a digest name.
    let index = r.cache.index().unwrap();
    assert!(index.get(&format!("docker.io/org/img@{arm_d}")).is_some());
    let a = r
        .get(&format!("/v2/org/img/manifests/{arm_d}"), &accept)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let tags = r.get("/v2/org/img/tags/list", &[]).await.json();
    assert_eq!(tags, json!({"name": "org/img", "tags": ["multi", "v1"]}));
}

#[tokio::test]
async fn manifest_push_refusals_change_nothing() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let before = r.snapshot();
    let missing = sha(b"never pushed");
    let v: Value = serde_json::from_str(&body).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap().to_owned();
    let dangling = body.replace(&layer, &missing.to_string());
    let a = r
        .push_manifest("org/img", "v1", OCI_MANIFEST, &dangling)
        .await;
    a.is_error(400, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(
        a.json()["errors"][0]["detail"]["digest"],
        missing.to_string()
    );
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": missing.to_string(), "size": 3}]})
    .to_string();
    r.push_manifest("org/img", "v1", OCI_INDEX, &index)
        .await
        .is_error(400, "MANIFEST_BLOB_UNKNOWN");
    r.push_manifest("org/img", "v1", OCI_MANIFEST, "{not json")
        .await
        .is_error(400, "MANIFEST_INVALID");
    r.push_manifest("org/img", "v1", OCI_INDEX, &body)
        .await
        .is_error(400, "MANIFEST_INVALID");
    r.push_manifest("org/img", "v1", "application/json", &body)
        .await
        .is_error(400, "MANIFEST_INVALID");
    r.push_manifest("org/img", &missing.to_string(), OCI_MANIFEST, &body)
        .await
        .is_error(400, "DIGEST_INVALID");
    let huge = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(5 << 20)
    );
    r.push_manifest("org/img", "v1", OCI_MANIFEST, &huge)
        .await
        .is_error(413, "SIZE_INVALID");
    r.push_manifest("org/img", "bad:tag", OCI_MANIFEST, &body)
        .await
        .is_error(400, "DIGEST_INVALID");
    assert_eq!(
        r.snapshot(),
        before,
        "refused manifests must not be written"
    );
}

#[tokio::test]
async fn tag_and_catalog_paging() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    for tag in ["c", "a", "e", "b", "d"] {
        r.push_manifest("org/img", tag, OCI_MANIFEST, &body).await;
    }
    for repo in ["z/last", "a/first", "m/mid"] {
        r.push_manifest(repo, "t", OCI_MANIFEST, &body).await;
    }
    let a = r.get("/v2/org/img/tags/list?n=2", &[]).await;
    assert_eq!(a.json()["tags"], json!(["a", "b"]));
    assert_eq!(
        a.header("link"),
        "</v2/org/img/tags/list?last=b&n=2>; rel=\"next\""
    );
    let a = r.get("/v2/org/img/tags/list?n=2&last=b", &[]).await;
    assert_eq!(a.json()["tags"], json!(["c", "d"]));
    let a = r.get("/v2/org/img/tags/list?n=2&last=d", &[]).await;
    assert_eq!(a.json()["tags"], json!(["e"]));
    assert!(a.headers.get("link").is_none());
    let a = r.get("/v2/org/img/tags/list?n=0", &[]).await;
    assert_eq!(a.json()["tags"], json!([]));
    let a = r.get("/v2/org/img/tags/list?last=c", &[]).await;
    assert_eq!(a.json()["tags"], json!(["d", "e"]));

    let a = r.get("/v2/_catalog", &[]).await;
    assert_eq!(
        a.json()["repositories"],
        json!(["a/first", "m/mid", "org/img", "z/last"])
    );
    let a = r.get("/v2/_catalog?n=3", &[]).await;
    assert_eq!(
        a.json()["repositories"],
        json!(["a/first", "m/mid", "org/img"])
    );
    assert_eq!(
        a.header("link"),
        "</v2/_catalog?last=org/img&n=3>; rel=\"next\""
    );
    let a = r.get("/v2/_catalog?n=3&last=org%2Fimg", &[]).await;
    assert_eq!(a.json()["repositories"], json!(["z/last"]));
}

#[tokio::test]
async fn referrers_follow_subjects() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    let subject = sha(body.as_bytes());
    r.push_manifest("org/img", "v1", OCI_MANIFEST, &body).await;
    let empty = r.push_blob("org/img", b"{}").await;
    let mut sigs = Vec::new();
    for (kind, note) in [
        ("application/vnd.example.sig", "a"),
        ("application/vnd.example.sbom", "b"),
    ] {
        let art = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": kind,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": body.len()},
            "annotations": {"note": note},
        })
        .to_string();
        let d = sha(art.as_bytes());
        let a = r
            .push_manifest("org/img", &d.to_string(), OCI_MANIFEST, &art)
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        assert_eq!(a.header("oci-subject"), subject.to_string());
        sigs.push((d, kind, art.len()));
    }
    let a = r
        .get(&format!("/v2/org/img/referrers/{subject}"), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("content-type"), OCI_INDEX);
    let v = a.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    for m in v["manifests"].as_array().unwrap() {
        let (d, kind, size) = sigs
            .iter()
            .find(|s| s.0.to_string() == m["digest"])
            .unwrap();
        assert_eq!(m["artifactType"], *kind);
        assert_eq!(m["size"], *size);
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert!(m["annotations"]["note"].is_string(), "{d}");
    }
    let a = r
        .get(
            &format!("/v2/org/img/referrers/{subject}?artifactType=application%2Fvnd.example.sbom"),
            &[],
        )
        .await;
    assert_eq!(a.header("oci-filters-applied"), "artifactType");
    assert_eq!(a.json()["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(a.json()["manifests"][0]["digest"], sigs[1].0.to_string());
    let a = r
        .get(&format!("/v2/org/img/referrers/{}", sha(b"nothing")), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["manifests"], json!([]));
}

#[tokio::test]
async fn deletes() {
    let r = Reg::build(Hooks::default(), UploadLimits::default(), true);
    let body = r.image("org/img", "amd64").await;
    let d = sha(body.as_bytes());
    r.push_manifest("org/img", "v1", OCI_MANIFEST, &body).await;
    r.push_manifest("org/img", "v2", OCI_MANIFEST, &body).await;
    let layer: Digest = serde_json::from_str::<Value>(&body).unwrap()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A blob in use stays.
    r.req(
        Method::DELETE,
        &format!("/v2/org/img/blobs/{layer}"),
        &[],
        Bytes::new(),
    )
    .await
    .is_error(405, "UNSUPPORTED");
    let a = r
        .req(
            Method::DELETE,
            "/v2/org/img/manifests/v1",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    r.get("/v2/org/img/manifests/v1", &[("accept", OCI_MANIFEST)])
        .await
        .is_error(404, "MANIFEST_UNKNOWN");
    r.req(
        Method::DELETE,
        "/v2/org/img/manifests/v1",
        &[],
        Bytes::new(),
    )
    .await
    .is_error(404, "MANIFEST_UNKNOWN");
    // By digest: every name of the repository that points at it.
    let a = r
        .req(
            Method::DELETE,
            &format!("/v2/org/img/manifests/{d}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert!(r.cache.index().unwrap().entry_count() == 0);
    r.get("/v2/org/img/tags/list", &[])
        .await
        .is_error(404, "NAME_UNKNOWN");
    // Now the layer is unused.
    let a = r
        .req(
            Method::DELETE,
            &format!("/v2/org/img/blobs/{layer}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    r.get(&format!("/v2/org/img/blobs/{layer}"), &[])
        .await
        .is_error(404, "BLOB_UNKNOWN");
    r.req(
        Method::DELETE,
        &format!("/v2/org/img/blobs/{layer}"),
        &[],
        Bytes::new(),
    )
    .await
    .is_error(404, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn the_view_follows_cache_writes_made_elsewhere() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    r.get("/v2/org/img/manifests/v1", &[("accept", OCI_MANIFEST)])
        .await
        .is_error(404, "MANIFEST_UNKNOWN");
    // A builder lands an image through the cache API, as kilnd's builds do.
    let d = r.cache.put_blob(body.as_bytes()).unwrap();
    r.cache
        .merge_arch(
            &"org/img:v1".parse().unwrap(),
            "amd64",
            crate::oci::Platform::linux("amd64", None),
            Descriptor::new(OCI_MANIFEST, d.clone(), body.len() as u64),
            None,
        )
        .unwrap();
    let a = r
        .get(
            "/v2/org/img/manifests/v1-amd64",
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("docker-content-digest"), d.to_string());
    let a = r
        .get("/v2/org/img/manifests/v1", &[("accept", OCI_INDEX)])
        .await;
    assert_eq!(a.header("content-type"), OCI_INDEX);
    let idx = a.json();
    assert_eq!(idx["manifests"][0]["platform"]["architecture"], "amd64");
}

struct BuildOnMiss {
    cache: Arc<Cache>,
    body: String,
    asked: Mutex<Vec<String>>,
}

impl ManifestMiss for BuildOnMiss {
    fn on_miss(&self, repo: RepoName, tag: Tag) -> BoxFuture<'static, Result<bool, MissError>> {
        self.asked.lock().unwrap().push(format!("{repo}:{tag}"));
        let result = match tag.as_str() {
            "buildable" => {
                let d = self.cache.put_blob(self.body.as_bytes()).unwrap();
                self.cache
                    .set_ref(
                        &format!("docker.io/{repo}:{tag}"),
                        Descriptor::new(OCI_MANIFEST, d, self.body.len() as u64),
                    )
                    .unwrap();
                Ok(true)
            }
            "broken" => Err("build of org/img (amd64) failed: see `kiln logs org/img`".into()),
            _ => Ok(false),
        };
        Box::pin(async move { result })
    }
}

#[tokio::test]
async fn miss_hook_and_pull_events() {
    // The hook needs the cache the service uses: build the registry, then hook it up.
    let seed = Reg::new();
    let body = seed.image("org/img", "amd64").await;
    let cache = Arc::clone(&seed.cache);
    let hook = Arc::new(BuildOnMiss {
        cache: Arc::clone(&cache),
        body: body.clone(),
        asked: Mutex::new(Vec::new()),
    });
    let pulls: Arc<Mutex<Vec<PullEvent>>> = Arc::default();
    let sink = Arc::clone(&pulls);
    let hooks = Hooks {
        manifest_miss: Some(hook.clone()),
        on_pull: Some(Arc::new(move |e| sink.lock().unwrap().push(e))),
    };
    let svc = Service::new(
        Arc::clone(&cache),
        HostGuard::default(),
        UploadLimits::default(),
        false,
        hooks,
    );
    let get = |tag: &str| {
        Request::get(format!("/v2/org/img/manifests/{tag}"))
            .header("host", "localhost")
            .header("accept", OCI_MANIFEST)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let a = svc.handle(get("buildable"), PEER).await;
    assert_eq!(a.status(), StatusCode::OK);
    let d = sha(body.as_bytes());
    let a = svc.handle(get("unknown"), PEER).await;
    assert_eq!(a.status(), StatusCode::NOT_FOUND);
    let a = svc.handle(get("broken"), PEER).await;
    assert_eq!(a.status(), StatusCode::NOT_FOUND);
    let msg = a.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&msg).contains("kiln logs org/img"));
    // Served from the cache now: the hook is not asked again.
    let a = svc.handle(get("buildable"), PEER).await;
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(
        *hook.asked.lock().unwrap(),
        ["org/img:buildable", "org/img:unknown", "org/img:broken"]
    );
    let pulls = pulls.lock().unwrap();
    assert_eq!(pulls.len(), 2);
    assert_eq!(pulls[0].digest, d);
    assert_eq!(pulls[0].reference.to_string(), "buildable");
    assert_eq!(pulls[0].repo.as_str(), "org/img");
    assert_eq!(pulls[0].peer, PEER);
}

#[tokio::test]
async fn a_name_with_another_registrys_host_is_served_without_it() {
    let r = Reg::new();
    // As LinuxKit keeps what it pulled from a registry on a port.
    let body = r.image("x/y", "amd64").await;
    let d = r.cache.put_blob(body.as_bytes()).unwrap();
    let desc = Descriptor::new(OCI_MANIFEST, d.clone(), body.len() as u64);
    r.cache
        .set_ref("127.0.0.1:5099/library/busybox:1.0", desc)
        .unwrap();
    let a = r
        .get(
            "/v2/library/busybox/manifests/1.0",
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("docker-content-digest"), d.to_string());
    // A docker.io name of the same tag keeps it.
    let other = r.image("x/z", "arm64").await;
    let o = r.cache.put_blob(other.as_bytes()).unwrap();
    r.cache
        .set_ref(
            "docker.io/library/busybox:1.0",
            Descriptor::new(OCI_MANIFEST, o.clone(), other.len() as u64),
        )
        .unwrap();
    let a = r
        .get(
            "/v2/library/busybox/manifests/1.0",
            &[("accept", OCI_MANIFEST)],
        )
        .await;
    assert_eq!(a.header("docker-content-digest"), o.to_string());
}
