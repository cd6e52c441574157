//! In-process tests through the router: every request goes through `Service::handle`
//! exactly as hyper would hand it over, against a real cache in a temp directory.
//! Bad input is checked for its status, its error code, and that the cache is unchanged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kiln_shared::digest::Digest;
use kiln_shared::reference::{RepoName, Tag};
use serde_json::{Value, json};

use super::accept::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use super::host::HostGuard;
use super::{BoxFuture, Hooks, ManifestMiss, PullEvent, Service, UploadLimits};
use crate::cache::Cache;
use crate::oci::Descriptor;

const PEER: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    4242,
));

struct Reg {
    _dir: tempfile::TempDir,
    cache: Arc<Cache>,
    svc: Service,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {:?}", self.body))
            .to_owned()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    #[track_caller]
    fn is_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.code().as_str()),
            (status, code),
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }
}

fn sha(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest::from_sha256_bytes(&sha2::Sha256::digest(bytes).into())
}

impl Reg {
    fn new() -> Reg {
        Reg::with(Hooks::default(), Duration::from_secs(3600))
    }

    fn with(hooks: Hooks, ttl: Duration) -> Reg {
        Reg::build(
            hooks,
            UploadLimits {
                idle: ttl,
                ..UploadLimits::default()
            },
            false,
        )
    }

    fn build(hooks: Hooks, uploads: UploadLimits, allow_delete: bool) -> Reg {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
        let svc = Service::new(
            Arc::clone(&cache),
            HostGuard::new(["registry.lan"]),
            uploads,
            allow_delete,
            hooks,
        );
        Reg {
            _dir: dir,
            cache,
            svc,
        }
    }

    async fn send<B>(&self, req: Request<B>) -> Answer
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display + std::fmt::Debug,
    {
        let resp = self.svc.handle(req, PEER).await;
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn req(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost:5000");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(body.into())).unwrap()).await
    }

    async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> Answer {
        self.req(Method::GET, uri, headers, Bytes::new()).await
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let d = sha(data);
        let a = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[],
                data.to_vec(),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        d
    }

    async fn push_manifest(&self, repo: &str, reference: &str, mt: &str, body: &str) -> Answer {
        self.req(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", mt)],
            body.to_owned(),
        )
        .await
    }

    /// An image in `repo`: config and one layer pushed, manifest returned (not pushed).
    async fn image(&self, repo: &str, arch: &str) -> String {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let layer = format!("layer of {arch}");
        let c = self.push_blob(repo, config.as_bytes()).await;
        let l = self.push_blob(repo, layer.as_bytes()).await;
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.to_string(), "size": layer.len()}],
        })
        .to_string()
    }

    /// Every file under the cache with its contents' digest: what "nothing was written"
    /// compares.
    fn snapshot(&self) -> BTreeMap<String, Digest> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Digest>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else if p.file_name().unwrap() != ".lock" {
                    out.insert(
                        p.strip_prefix(root).unwrap().display().to_string(),
                        sha(&std::fs::read(&p).unwrap()),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.cache.root(), self.cache.root(), &mut out);
        out
    }
}

#[tokio::test]
async fn base_endpoint_and_host_guard() {
    let r = Reg::new();
    let a = r.get("/v2/", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("docker-distribution-api-version"), "registry/2.0");
    for host in [
        "localhost",
        "127.0.0.1:5000",
        "[::1]:5000",
        "registry.lan:5000",
    ] {
        let req = Request::get("/v2/")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(r.send(req).await.status, StatusCode::OK, "{host}");
    }
    for host in [
        "evil.example",
        "evil.example:5000",
        "127.0.0.1.evil.example",
    ] {
        let req = Request::get("/v2/org/x/manifests/v1")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        r.send(req).await.is_error(403, "DENIED");
    }
    // No Host: a bad request (RFC 9112 3.2).
    let req = Request::get("/v2/").body(Full::new(Bytes::new())).unwrap();
    r.send(req).await.is_error(400, "DENIED");
    // An absolute-form request carries its authority in the URI.
    let req = Request::get("http://evil.example/v2/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    r.send(req).await.is_error(403, "DENIED");
}

#[tokio::test]
async fn malformed_names_digests_references_and_paths_change_nothing() {
    let r = Reg::new();
    let repo = "org/img";
    let m = r.image(repo, "amd64").await;
    assert_eq!(
        r.push_manifest(repo, "v1", OCI_MANIFEST, &m).await.status,
        StatusCode::CREATED
    );
    let before = r.snapshot();
    let cases: &[(Method, &str, u16, &str)] = &[
        (
            Method::GET,
            "/v2/../../etc/passwd/manifests/v1",
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/%2e%2e/%2e%2e/etc/manifests/v1",
            400,
            "NAME_INVALID",
        ),
        (Method::GET, "/v2/Org/Img/manifests/v1", 400, "NAME_INVALID"),
        (Method::GET, "/v2//manifests/v1", 400, "NAME_INVALID"),
        (
            Method::GET,
            "/v2/org//img/manifests/v1",
            400,
            "NAME_INVALID",
        ),
        (
            Method::PUT,
            "/v2/org/../img/manifests/v1",
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/manifests/.hidden",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::HEAD,
            "/v2/org/img/manifests/-x",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::PUT,
            "/v2/org/img/manifests/.hidden",
            400,
            "TAG_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/manifests/sha256:abc",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/manifests/sha256:../../../../etc/passwd",
            404,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            "/v2/org/img/blobs/sha256:..%2f..%2findex.json",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/blobs/index.json",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::DELETE,
            "/v2/org/img/blobs/sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::POST,
            "/v2/org/img/blobs/uploads/?digest=sha256:nope",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::POST,
            "/v2/org/img/blobs/uploads/?mount=../x&from=org/other",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/blobs/uploads/..%2f..%2f..%2fetc%2fpasswd",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        (
            Method::PUT,
            "/v2/org/img/blobs/uploads/0123456789abcdef0123456789abcdef?digest=sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/org/img/referrers/sha256:zz",
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/org/img/tags/list?n=many",
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        (Method::GET, "/v2/no/such/tags/list", 404, "NAME_UNKNOWN"),
        (
            Method::GET,
            "/v2/org/img/manifests/v2",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/org/img/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            404,
            "BLOB_UNKNOWN",
        ),
        (Method::GET, "/v1/org/img/manifests/v1", 404, "UNSUPPORTED"),
        (Method::GET, "/etc/passwd", 404, "UNSUPPORTED"),
        (Method::GET, "/v2/org/img/things/x", 404, "UNSUPPORTED"),
        (Method::POST, "/v2/org/img/manifests/v1", 405, "UNSUPPORTED"),
        (
            Method::PATCH,
            "/v2/org/img/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            405,
            "UNSUPPORTED",
        ),
        (Method::DELETE, "/v2/_catalog", 405, "UNSUPPORTED"),
    ];
    for (method, uri, status, code) in cases {
        let a = r.req(method.clone(), uri, &[], b"{}".to_vec()).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (*status, *code),
            "{method} {uri}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            a.json()["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    assert_eq!(r.snapshot(), before, "bad requests must not write");
}

#[tokio::test]
async fn blobs_are_served_with_ranges() {
    let r = Reg::new();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    let d = r.push_blob("org/img", &data).await;
    let uri = format!("/v2/org/img/blobs/{d}");
    let a = r.get(&uri, &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(&a.body[..], &data[..]);
    assert_eq!(a.header("content-length"), "3000");
    assert_eq!(a.header("docker-content-digest"), d.to_string());
    assert_eq!(a.header("etag"), format!("\"{d}\""));
    // Any repository name serves any blob of the cache.
    assert_eq!(
        r.get(&format!("/v2/other/repo/blobs/{d}"), &[])
            .await
            .status,
        StatusCode::OK
    );

    let head = r.req(Method::HEAD, &uri, &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "3000");

    let part = r.get(&uri, &[("range", "bytes=100-199")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.body[..], &data[100..200]);
    assert_eq!(part.header("content-range"), "bytes 100-199/3000");
    let tail = r.get(&uri, &[("range", "bytes=-10")]).await;
    assert_eq!(&tail.body[..], &data[2990..]);
    let open = r.get(&uri, &[("range", "bytes=2999-")]).await;
    assert_eq!(&open.body[..], &data[2999..]);

    for bad in [
        "bytes=3000-",
        "bytes=10-5",
        "bytes=x-y",
        "lines=1-2",
        "bytes=-0",
    ] {
        let a = r.get(&uri, &[("range", bad)]).await;
        a.is_error(416, "RANGE_INVALID");
        assert_eq!(a.header("content-range"), "bytes */3000", "{bad}");
    }
    let cached = r.get(&uri, &[("if-none-match", &format!("\"{d}\""))]).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
}

#[tokio::test]
async fn chunked_upload_session() {
    let r = Reg::new();
    let data = b"hello, chunked world";
    let d = sha(data);
    let start = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(start.status, StatusCode::ACCEPTED);
    let loc = start.header("location").to_owned();
    assert!(loc.starts_with("/v2/org/img/blobs/uploads/"), "{loc}");
    assert_eq!(start.header("range"), "0-0");
    let id = start.header("docker-upload-uuid").to_owned();
    assert!(loc.ends_with(&id));

    let a = r
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "0-4"), ("content-length", "5")],
            &data[..5],
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(a.header("range"), "0-4");
    // Out of order: the chunk after a gap, then a repeated chunk.
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "10-14")],
        &data[10..15],
    )
    .await
    .is_error(416, "RANGE_INVALID");
    r.req(Method::PATCH, &loc, &[("content-range", "0-4")], &data[..5])
        .await
        .is_error(416, "RANGE_INVALID");
    // Another repository cannot touch the session.
    r.get(&format!("/v2/org/other/blobs/uploads/{id}"), &[])
        .await
        .is_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A chunk without Content-Range is appended (docker's streaming upload).
    let a = r.req(Method::PATCH, &loc, &[], &data[5..12]).await;
    assert_eq!(a.header("range"), "0-11");
    let status = r.get(&loc, &[]).await;
    assert_eq!(status.status, StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), "0-11");
    assert_eq!(status.header("docker-upload-uuid"), id);
    // Finishing needs the digest.
    r.req(Method::PUT, &loc, &[], Bytes::new())
        .await
        .is_error(400, "DIGEST_INVALID");
    let done = r
        .req(
            Method::PUT,
            &format!("{loc}?digest={}", d.to_string().replace(':', "%3A")),
            &[],
            &data[12..],
        )
        .await;
    assert_eq!(done.status, StatusCode::CREATED, "{:?}", done.body);
    assert_eq!(done.header("location"), format!("/v2/org/img/blobs/{d}"));
    assert_eq!(done.header("docker-content-digest"), d.to_string());
    assert_eq!(
        &r.get(&format!("/v2/org/img/blobs/{d}"), &[]).await.body[..],
        data
    );
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(std::fs::read_dir(r.cache.tmp_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn failed_uploads_leave_nothing() {
    let r = Reg::new();
    let before = r.snapshot();
    let data = b"some blob bytes";
    let wrong = sha(b"other bytes");

    // Monolithic with the wrong digest.
    r.req(
        Method::POST,
        &format!("/v2/org/img/blobs/uploads/?digest={wrong}"),
        &[],
        &data[..],
    )
    .await
    .is_error(400, "DIGEST_INVALID");
    // Session finished with the wrong digest: the session is gone too.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[], &data[..]).await;
    r.req(
        Method::PUT,
        &format!("{loc}?digest={wrong}"),
        &[],
        Bytes::new(),
    )
    .await
    .is_error(400, "DIGEST_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");

    // A body shorter than its Content-Length (what hyper reports as a body error).
    let d = sha(data);
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"some "))),
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        )),
    ];
    let req = Request::post(format!("/v2/org/img/blobs/uploads/?digest={d}"))
        .header("host", "localhost")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    r.send(req).await.is_error(400, "BLOB_UPLOAD_INVALID");
    // A body that does not match its announced length.
    r.req(
        Method::POST,
        &format!("/v2/org/img/blobs/uploads/?digest={d}"),
        &[("content-length", "99")],
        &data[..],
    )
    .await
    .is_error(400, "SIZE_INVALID");
    // A chunk longer than its Content-Range says kills the session.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[("content-range", "0-3")], &data[..])
        .await
        .is_error(400, "SIZE_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "0-1x")],
        &data[..2],
    )
    .await
    .is_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A malformed Content-Range.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "bytes=a-b")],
        &data[..],
    )
    .await
    .is_error(416, "RANGE_INVALID");
    // Cancelled upload.
    let del = r.req(Method::DELETE, &loc, &[], Bytes::new()).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    r.req(Method::DELETE, &loc, &[], Bytes::new())
        .await
        .is_error(404, "BLOB_UPLOAD_UNKNOWN");

    assert_eq!(r.snapshot(), before, "failed uploads must leave no file");
    assert!(r.svc.uploads().is_empty());
}

#[tokio::test]
async fn abandoned_uploads_expire() {
    let r = Reg::with(Hooks::default(), Duration::ZERO);
    let before = r.snapshot();
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[], b"partial".to_vec()).await;
    assert_ne!(
        r.snapshot(),
        before,
        "the partial upload is a temp file in the cache"
    );
    assert_eq!(r.svc.uploads().expire(), 1);
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(r.snapshot(), before);
}

#[tokio::test]
async fn cross_repository_mount() {
    let r = Reg::new();
    let d = r.push_blob("org/a", b"shared layer").await;
    let a = r
        .req(
            Method::POST,
            &format!("/v2/org/b/blobs/uploads/?mount={d}&from=org/a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.header("location"), format!("/v2/org/b/blobs/{d}"));
    let missing = sha(b"not here");
    let a = r
        .req(
            Method::POST,
            &format!("/v2/org/b/blobs/uploads/?mount={missing}&from=org/a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "a failed mount starts an upload"
    );
    assert!(a.header("location").starts_with("/v2/org/b/blobs/uploads/"));
}

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
    assert!(r.cache.index().unwrap().index().manifests.is_empty());
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
    fn on_miss(&self, repo: RepoName, tag: Tag) -> BoxFuture<'static, Result<bool, String>> {
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
            "broken" => Err("build of org/img (amd64) failed: see `kiln logs org/img`".to_owned()),
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
    assert_eq!(pulls[0].reference, "buildable");
    assert_eq!(pulls[0].repo.as_str(), "org/img");
    assert_eq!(pulls[0].peer, PEER);
}

#[tokio::test]
async fn a_stalled_upload_body_is_dropped() {
    // The upload ttl is also how long a body may stall.
    let r = Reg::with(Hooks::default(), Duration::from_millis(200));
    let before = r.snapshot();
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    // Some bytes, then silence on an open connection.
    let first = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Frame::data(
        Bytes::from_static(b"partial"),
    ))]);
    let stalled = first.chain(futures_util::stream::pending());
    let req = Request::patch(&loc)
        .header("host", "localhost")
        .body(StreamBody::new(stalled))
        .unwrap();
    r.send(req).await.is_error(400, "BLOB_UPLOAD_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(r.snapshot(), before);
}

mod abuse;
mod integrity;
