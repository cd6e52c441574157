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
use super::{BoxFuture, Hooks, ManifestMiss, MissError, PullEvent, Service, UploadLimits};
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

mod abuse;
mod integrity;
mod manifests;
mod uploads;
