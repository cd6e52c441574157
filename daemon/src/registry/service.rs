//! The request handler: Host check, routing, then one function per OCI operation, each
//! returning a response or an [`OciError`]. It is generic over the request body, so
//! tests drive it in-process with in-memory bodies and kilnd with hyper's.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body;
use kiln_shared::digest::Digest;
use kiln_shared::reference::{RepoName, Tag};
use serde_json::json;

use super::accept::{Accepts, ManifestKind, Negotiated, negotiate};
use super::body::RegBody;
use super::error::OciError;
use super::host::HostGuard;
use super::manifest::MAX_MANIFEST_SIZE;
use super::query;
use super::range::{RangeAnswer, blob_range, upload_range};
use super::route::Route;
use super::uploads::{Session, Uploads};
use super::view::{self, Stored, View, digest_ref_name, tag_ref_name};
use super::{Hooks, PullEvent};
use crate::cache::{BlobWriter, Cache, CacheError, set_ref_in};
use crate::oci::Descriptor;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
/// How many request-body bytes are gathered before one write to the blob file.
const WRITE_BATCH: usize = 1 << 20;

type Resp = Response<RegBody>;

/// Everything a request needs: the cache, the view of it, uploads, hooks.
#[derive(Debug)]
pub struct Service {
    cache: Arc<Cache>,
    guard: HostGuard,
    uploads: Uploads,
    view: RwLock<Arc<View>>,
    rebuild: tokio::sync::Mutex<()>,
    hooks: Hooks,
}

/// A reference in a manifest path.
enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Service {
    pub fn new(cache: Arc<Cache>, guard: HostGuard, upload_ttl: Duration, hooks: Hooks) -> Self {
        Service {
            cache,
            guard,
            uploads: Uploads::new(upload_ttl),
            view: RwLock::new(Arc::new(View::default())),
            rebuild: tokio::sync::Mutex::new(()),
            hooks,
        }
    }

    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Resp
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut resp = match self.dispatch(req, peer).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        resp.headers_mut()
            .insert("docker-distribution-api-version", API_VERSION);
        resp
    }

    async fn dispatch<B>(&self, req: Request<B>, peer: SocketAddr) -> Result<Resp, OciError>
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        match host {
            Some(h) if self.guard.allows(h) => {}
            Some(h) => {
                return Err(OciError::Denied(format!(
                    "Host {h:?} is not a loopback name or a configured registry host: \
                     add it to the registry's allowed hosts to serve it"
                )));
            }
            None => {
                return Err(OciError::Denied(
                    "the request has no Host header; the registry answers only requests \
                     naming a loopback or configured host"
                        .into(),
                ));
            }
        }
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let q = parts.uri.query();
        let m = &parts.method;
        let route = Route::parse(path).ok_or_else(|| OciError::NotFound(path.to_owned()))?;
        let not_allowed = |what: &'static str| OciError::MethodNotAllowed {
            method: m.to_string(),
            what,
        };
        match route {
            Route::Base => match *m {
                Method::GET | Method::HEAD => {
                    Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}")))
                }
                _ => Err(not_allowed("/v2/")),
            },
            Route::Catalog => match *m {
                Method::GET => self.catalog(q).await,
                _ => Err(not_allowed("the catalog")),
            },
            Route::Manifest { name, reference } => {
                let repo = repo_name(name)?;
                let reference = parse_reference(reference)?;
                match *m {
                    Method::GET | Method::HEAD => {
                        self.get_manifest(&repo, reference, m == Method::HEAD, &parts.headers, peer)
                            .await
                    }
                    Method::PUT => {
                        self.put_manifest(&repo, reference, &parts.headers, body)
                            .await
                    }
                    Method::DELETE => self.delete_manifest(&repo, reference).await,
                    _ => Err(not_allowed("manifests")),
                }
            }
            Route::Blob { name, digest } => {
                let repo = repo_name(name)?;
                let digest = parse_digest(digest)?;
                match *m {
                    Method::GET | Method::HEAD => {
                        self.get_blob(&digest, m == Method::HEAD, &parts.headers)
                            .await
                    }
                    Method::DELETE => self.delete_blob(&repo, &digest).await,
                    _ => Err(not_allowed("blobs")),
                }
            }
            Route::UploadStart { name } => {
                let repo = repo_name(name)?;
                match *m {
                    Method::POST => self.start_upload(&repo, q, &parts.headers, body).await,
                    _ => Err(not_allowed("blob uploads")),
                }
            }
            Route::Upload { name, id } => {
                let repo = repo_name(name)?;
                match *m {
                    Method::GET => self.upload_status(&repo, id).await,
                    Method::PATCH => self.patch_upload(&repo, id, &parts.headers, body).await,
                    Method::PUT => self.finish_upload(&repo, id, q, &parts.headers, body).await,
                    Method::DELETE => self.cancel_upload(&repo, id).await,
                    _ => Err(not_allowed("blob uploads")),
                }
            }
            Route::Tags { name } => {
                let repo = repo_name(name)?;
                match *m {
                    Method::GET => self.tags(&repo, q).await,
                    _ => Err(not_allowed("tag lists")),
                }
            }
            Route::Referrers { name, digest } => {
                repo_name(name)?;
                let digest = parse_digest(digest)?;
                match *m {
                    Method::GET => self.referrers(&digest, q).await,
                    _ => Err(not_allowed("referrers")),
                }
            }
        }
    }

    // ---------------------------------------------------------------- the view

    /// The view of the cache as it is now: the cache stats `index.json`; the view is
    /// rebuilt only if the file changed.
    async fn view(&self) -> Result<Arc<View>, OciError> {
        let source = self.cache.index().map_err(internal)?;
        let current = self.current_view();
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &source))
        {
            return Ok(current);
        }
        let _one_rebuild = self.rebuild.lock().await;
        let current = self.current_view();
        let source = self.cache.index().map_err(internal)?;
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &source))
        {
            return Ok(current);
        }
        let cache = Arc::clone(&self.cache);
        let fresh = blocking(move || Ok(Arc::new(View::build(&cache, source, &current)))).await?;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    fn current_view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }

    // ---------------------------------------------------------------- pull

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: Reference,
        head: bool,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Resp, OciError> {
        let accepts = Accepts::from_headers(headers);
        let mut view = self.view().await?;
        let (stored, by_tag) = match &reference {
            Reference::Tag(tag) => {
                if view.tag(repo.as_str(), tag.as_str()).is_none() {
                    view = self.ask_miss_hook(repo, tag).await?;
                }
                let tagged = view
                    .tag(repo.as_str(), tag.as_str())
                    .ok_or_else(|| manifest_unknown(repo, tag.as_str()))?;
                // For `gc --max-size`: least recently pulled goes first. No I/O.
                self.cache.touch_ref(&tagged.ref_name);
                (Arc::clone(&tagged.stored), true)
            }
            Reference::Digest(d) => {
                if let Some(name) = view
                    .repos
                    .get(repo.as_str())
                    .and_then(|r| r.untagged.get(d))
                {
                    self.cache.touch_ref(name);
                }
                (self.manifest_by_digest(&view, repo, d).await?, false)
            }
        };
        let served = match negotiate(stored.kind(), accepts, by_tag) {
            Negotiated::Serve => stored,
            Negotiated::Refuse(msg) => return Err(OciError::ManifestUnknown(msg.to_owned())),
            Negotiated::DefaultPlatform => {
                let child = stored
                    .info
                    .children
                    .iter()
                    .find(|c| {
                        c.os.as_deref() == Some("linux")
                            && c.architecture.as_deref() == Some("amd64")
                    })
                    .ok_or_else(|| {
                        OciError::ManifestUnknown(format!(
                            "{repo} is a manifest list without a linux/amd64 image, and the \
                             client does not accept manifest lists"
                        ))
                    })?;
                let m = self.manifest_by_digest(&view, repo, &child.digest).await?;
                if m.kind() == ManifestKind::DockerManifest
                    && !accepts.contains(ManifestKind::DockerManifest)
                {
                    return Err(OciError::ManifestInvalid(
                        "Schema 2 manifest not supported by client".into(),
                    ));
                }
                m
            }
        };
        if if_none_match(headers, &served.digest) {
            let mut r = Response::new(RegBody::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut().insert(header::ETAG, served.etag.clone());
            r.headers_mut()
                .insert(DOCKER_CONTENT_DIGEST, served.digest_header.clone());
            return Ok(r);
        }
        let mut r = Response::new(if head {
            RegBody::empty()
        } else {
            RegBody::full(served.bytes.clone())
        });
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, served.content_type.clone());
        h.insert(header::CONTENT_LENGTH, served.length.clone());
        h.insert(DOCKER_CONTENT_DIGEST, served.digest_header.clone());
        h.insert(header::ETAG, served.etag.clone());
        if !head && let Some(on_pull) = &self.hooks.on_pull {
            on_pull(PullEvent {
                repo: repo.clone(),
                reference: match &reference {
                    Reference::Tag(t) => t.to_string(),
                    Reference::Digest(d) => d.to_string(),
                },
                digest: served.digest.clone(),
                media_type: served.kind().media_type(),
                peer,
            });
        }
        Ok(r)
    }

    async fn ask_miss_hook(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<View>, OciError> {
        let Some(hook) = &self.hooks.manifest_miss else {
            return Err(manifest_unknown(repo, tag.as_str()));
        };
        match hook.on_miss(repo.clone(), tag.clone()).await {
            Ok(true) => self.view().await,
            Ok(false) => Err(manifest_unknown(repo, tag.as_str())),
            Err(msg) => Err(OciError::ManifestUnknown(format!(
                "{repo}:{tag} is not in the cache and could not be made: {msg}"
            ))),
        }
    }

    /// A manifest by digest: one the view holds, or any blob of the cache that is a
    /// manifest (blobs are shared by all repositories).
    async fn manifest_by_digest(
        &self,
        view: &View,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Stored>, OciError> {
        if let Some(s) = view.manifests.get(digest) {
            return Ok(Arc::clone(s));
        }
        let cache = Arc::clone(&self.cache);
        let d = digest.clone();
        let unknown = || {
            OciError::ManifestUnknown(format!(
                "manifest {digest} is not in the cache (asked as {repo}@{digest})"
            ))
        };
        match blocking(move || {
            Ok(match cache.blob_size(&d).map_err(internal)? {
                Some(size) if size <= MAX_MANIFEST_SIZE as u64 => {
                    view::read_stored(&cache, &d, None).ok()
                }
                _ => None,
            })
        })
        .await?
        {
            Some(s) => Ok(Arc::new(s)),
            None => Err(unknown()),
        }
    }

    async fn get_blob(
        &self,
        digest: &Digest,
        head: bool,
        headers: &HeaderMap,
    ) -> Result<Resp, OciError> {
        let path = self.cache.blob_path(digest);
        let d = digest.clone();
        let (file, size) = blocking(move || match std::fs::File::open(&path) {
            Ok(f) => {
                let meta = f
                    .metadata()
                    .map_err(|e| OciError::Internal(format!("{}: {e}", path.display())))?;
                if !meta.is_file() {
                    return Err(OciError::BlobUnknown(d));
                }
                Ok((f, meta.len()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(OciError::BlobUnknown(d)),
            Err(e) => Err(OciError::Internal(format!("{}: {e}", path.display()))),
        })
        .await?;
        let etag = HeaderValue::from_str(&format!("\"{digest}\"")).map_err(internal)?;
        let digest_hv = HeaderValue::from_str(&digest.to_string()).map_err(internal)?;
        if if_none_match(headers, digest) {
            let mut r = Response::new(RegBody::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut().insert(header::ETAG, etag);
            r.headers_mut().insert(DOCKER_CONTENT_DIGEST, digest_hv);
            return Ok(r);
        }
        let range = headers
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap_or("invalid"));
        let (status, start, len) = match blob_range(range, size) {
            RangeAnswer::Whole => (StatusCode::OK, 0, size),
            RangeAnswer::Part { start, len } => (StatusCode::PARTIAL_CONTENT, start, len),
            RangeAnswer::Unsatisfiable => {
                let mut r = OciError::RangeInvalid(format!(
                    "range {:?} is not satisfiable for blob {digest} of {size} bytes",
                    range.unwrap_or("")
                ))
                .into_response();
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).map_err(internal)?,
                );
                return Ok(r);
            }
        };
        let mut r = Response::new(if head {
            RegBody::empty()
        } else {
            RegBody::file(file, start, len)
        });
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, OCTET_STREAM);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(DOCKER_CONTENT_DIGEST, digest_hv);
        h.insert(header::ETAG, etag);
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=31536000"),
        );
        if status == StatusCode::PARTIAL_CONTENT {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
                    .map_err(internal)?,
            );
        }
        Ok(r)
    }

    async fn tags(&self, repo: &RepoName, q: Option<&str>) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let entry = view
            .repos
            .get(repo.as_str())
            .ok_or_else(|| OciError::NameUnknown(repo.to_string()))?;
        let names: Vec<&str> = entry.tags.keys().map(String::as_str).collect();
        let (page, next) = paginate(&names, q)?;
        paged(
            json!({ "name": repo.as_str(), "tags": page }),
            &format!("/v2/{repo}/tags/list"),
            next,
        )
    }

    async fn catalog(&self, q: Option<&str>) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let names = view.repo_names();
        let (page, next) = paginate(&names, q)?;
        paged(json!({ "repositories": page }), "/v2/_catalog", next)
    }

    async fn referrers(&self, subject: &Digest, q: Option<&str>) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let filter = query::param(q, "artifactType");
        let list = view
            .referrers
            .get(subject)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let manifests: Vec<serde_json::Value> = list
            .iter()
            .filter(|r| {
                filter
                    .as_deref()
                    .is_none_or(|f| r.artifact_type.as_deref() == Some(f))
            })
            .map(|r| {
                let mut d = json!({
                    "mediaType": r.media_type,
                    "digest": r.digest.to_string(),
                    "size": r.size,
                });
                if let Some(at) = &r.artifact_type {
                    d["artifactType"] = json!(at);
                }
                if !r.annotations.is_empty() {
                    d["annotations"] = json!(r.annotations);
                }
                d
            })
            .collect();
        let body = json!({
            "schemaVersion": 2,
            "mediaType": super::accept::OCI_INDEX,
            "manifests": manifests,
        });
        let mut r = Response::new(RegBody::full(Bytes::from(body.to_string())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(super::accept::OCI_INDEX),
        );
        if filter.is_some() {
            r.headers_mut().insert(
                "oci-filters-applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        Ok(r)
    }

    // ---------------------------------------------------------------- push: blobs

    async fn start_upload<B>(
        &self,
        repo: &RepoName,
        q: Option<&str>,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError>
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        if let Some(mount) = query::param(q, "mount") {
            let digest = parse_digest(&mount)?;
            let cache = Arc::clone(&self.cache);
            let d = digest.clone();
            if blocking(move || cache.blob_size(&d).map_err(internal))
                .await?
                .is_some()
            {
                return blob_created(repo, &digest);
            }
            // Not here: fall through to a new upload, as the spec says.
        }
        let digest = query::param(q, "digest")
            .map(|d| parse_digest(&d))
            .transpose()?;
        let cache = Arc::clone(&self.cache);
        let mut writer = Some(blocking(move || cache.blob_writer().map_err(internal)).await?);
        if let Some(digest) = digest {
            // Monolithic upload: the whole blob in this request.
            let expected_len = content_length(headers)?;
            let written = write_body(&mut writer, body, self.uploads.ttl()).await?;
            check_length(expected_len, written)?;
            finish_writer(writer, digest.clone()).await?;
            return blob_created(repo, &digest);
        }
        let has_body = content_length(headers)?.is_some_and(|n| n > 0);
        if has_body {
            write_body(&mut writer, body, self.uploads.ttl()).await?;
        }
        let Some(w) = writer else {
            return Err(OciError::Internal("blob writer lost".into()));
        };
        let (id, slot) = self.uploads.start(repo.as_str(), w);
        let session = slot.lock().await;
        upload_accepted(repo, &id, &session, StatusCode::ACCEPTED)
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<Resp, OciError> {
        let session = self.session(repo, id).await?;
        upload_accepted(repo, id, &session, StatusCode::NO_CONTENT)
    }

    async fn patch_upload<B>(
        &self,
        repo: &RepoName,
        id: &str,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError>
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut session = self.session(repo, id).await?;
        session.touch();
        let expected = self.chunk_expectation(repo, id, &session, headers)?;
        let result = write_body(&mut session.writer, body, self.uploads.ttl()).await;
        let checked = result.and_then(|n| check_length(expected, n));
        if let Err(e) = checked {
            // The session's bytes no longer match what the client believes: drop it.
            session.writer = None;
            self.uploads.remove(id);
            return Err(e);
        }
        session.touch();
        upload_accepted(repo, id, &session, StatusCode::ACCEPTED)
    }

    /// Checks a chunk's `Content-Range` against the session; returns the chunk length
    /// the request announces (by `Content-Range` or `Content-Length`).
    fn chunk_expectation(
        &self,
        repo: &RepoName,
        id: &str,
        session: &Session,
        headers: &HeaderMap,
    ) -> Result<Option<u64>, OciError> {
        let length = content_length(headers)?;
        let Some(cr) = headers.get(header::CONTENT_RANGE) else {
            return Ok(length);
        };
        let cr = cr.to_str().unwrap_or("");
        let Some((first, last)) = upload_range(cr) else {
            return Err(OciError::RangeInvalid(format!(
                "Content-Range {cr:?} is malformed: expected \"<first>-<last>\""
            )));
        };
        let offset = session.offset();
        if first != offset {
            return Err(OciError::RangeInvalid(format!(
                "chunk starts at byte {first} but upload {id} of {repo} has {offset} bytes: \
                 send the chunk that starts at {offset}"
            )));
        }
        let n = last - first + 1;
        if let Some(len) = length
            && len != n
        {
            return Err(OciError::RangeInvalid(format!(
                "Content-Range {cr:?} announces {n} bytes but Content-Length is {len}"
            )));
        }
        Ok(Some(n))
    }

    async fn finish_upload<B>(
        &self,
        repo: &RepoName,
        id: &str,
        q: Option<&str>,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError>
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        let digest = match query::param(q, "digest") {
            Some(d) => parse_digest(&d)?,
            None => {
                return Err(OciError::DigestInvalid(
                    "finishing an upload needs ?digest=sha256:<hex>".into(),
                ));
            }
        };
        let mut session = self.session(repo, id).await?;
        session.touch();
        let expected = self.chunk_expectation(repo, id, &session, headers)?;
        // From here on the session ends, whatever happens.
        self.uploads.remove(id);
        let n = write_body(&mut session.writer, body, self.uploads.ttl()).await?;
        check_length(expected, n)?;
        finish_writer(session.writer.take(), digest.clone()).await?;
        blob_created(repo, &digest)
    }

    async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<Resp, OciError> {
        let mut session = self.session(repo, id).await?;
        self.uploads.remove(id);
        // Drops the writer, and with it the temp file, now.
        session.writer = None;
        let mut r = Response::new(RegBody::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        Ok(r)
    }

    /// The live session `id` of `repo`, locked for this request. A session that
    /// finished or failed while this request waited for it is unknown.
    async fn session(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Session>, OciError> {
        let unknown = || OciError::BlobUploadUnknown(id.to_owned());
        let slot = self.uploads.get(id).ok_or_else(unknown)?;
        let session = slot.lock_owned().await;
        if session.repo != repo.as_str() || session.writer.is_none() {
            return Err(unknown());
        }
        Ok(session)
    }

    async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let users = view.users_of(digest);
        if !users.is_empty() {
            return Err(OciError::Unsupported(format!(
                "blob {digest} is used by manifest {} (kiln's cache shares blobs between \
                 all repositories): delete the manifests that use it, then run `kiln cache gc`",
                users[0]
            )));
        }
        let cache = Arc::clone(&self.cache);
        let d = digest.clone();
        let removed = blocking(move || {
            let _lock = cache.lock().map_err(internal)?;
            match std::fs::remove_file(cache.blob_path(&d)) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(OciError::Internal(format!("removing blob {d}: {e}"))),
            }
        })
        .await?;
        if !removed {
            return Err(OciError::BlobUnknown(digest.clone()));
        }
        tracing::info!(%repo, %digest, "blob deleted");
        let mut r = Response::new(RegBody::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        Ok(r)
    }

    // ---------------------------------------------------------------- push: manifests

    async fn put_manifest<B>(
        &self,
        repo: &RepoName,
        reference: Reference,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError>
    where
        B: Body<Data = Bytes> + Send + Unpin,
        B::Error: std::fmt::Display,
    {
        if content_length(headers)?.is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
            return Err(too_large());
        }
        let bytes = read_limited(body, MAX_MANIFEST_SIZE).await?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let info = super::manifest::parse(&bytes, content_type)?;
        let cache = Arc::clone(&self.cache);
        let repo_s = repo.as_str().to_owned();
        let (digest, subject) = blocking(move || {
            for d in info
                .blobs
                .iter()
                .chain(info.children.iter().map(|c| &c.digest))
            {
                if cache.blob_size(d).map_err(internal)?.is_none() {
                    return Err(OciError::ManifestBlobUnknown(d.clone()));
                }
            }
            let digest = Digest::from_sha256_bytes(&sha256(&bytes));
            if let Reference::Digest(want) = &reference
                && *want != digest
            {
                return Err(OciError::DigestInvalid(format!(
                    "manifest digest is {digest}, not {want} as the URL says"
                )));
            }
            cache.put_blob(&bytes).map_err(internal)?;
            let mut desc =
                Descriptor::new(info.kind.media_type(), digest.clone(), bytes.len() as u64);
            desc.artifact_type = info
                .artifact_type
                .clone()
                .filter(|_| info.subject.is_some());
            cache
                .update_index(|index| {
                    match &reference {
                        Reference::Tag(tag) => {
                            set_ref_in(index, &tag_ref_name(&repo_s, tag.as_str()), desc);
                            // The tag now keeps it; a digest-only name is redundant.
                            let by_digest = digest_ref_name(&repo_s, &digest);
                            index
                                .manifests
                                .retain(|d| d.ref_name() != Some(by_digest.as_str()));
                        }
                        Reference::Digest(_) => {
                            let prefix =
                                format!("{}/{repo_s}:", kiln_shared::reference::DEFAULT_DOMAIN);
                            let tagged = index.manifests.iter().any(|d| {
                                d.digest == digest
                                    && d.ref_name().is_some_and(|n| n.starts_with(&prefix))
                            });
                            if !tagged {
                                set_ref_in(index, &digest_ref_name(&repo_s, &digest), desc);
                            }
                        }
                    }
                    Ok(())
                })
                .map_err(internal)?;
            Ok((digest, info.subject))
        })
        .await?;
        tracing::info!(%repo, %digest, "manifest pushed");
        let mut r = created(&format!("/v2/{repo}/manifests/{digest}"), &digest)?;
        if let Some(subject) = subject {
            r.headers_mut().insert(
                "oci-subject",
                HeaderValue::from_str(&subject.to_string()).map_err(internal)?,
            );
        }
        Ok(r)
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: Reference,
    ) -> Result<Resp, OciError> {
        let cache = Arc::clone(&self.cache);
        let repo_s = repo.as_str().to_owned();
        let what = match &reference {
            Reference::Tag(t) => format!("{repo}:{t}"),
            Reference::Digest(d) => format!("{repo}@{d}"),
        };
        let removed = blocking(move || {
            cache
                .update_index(|index| {
                    let before = index.manifests.len();
                    match &reference {
                        Reference::Tag(tag) => {
                            let name = tag_ref_name(&repo_s, tag.as_str());
                            index
                                .manifests
                                .retain(|d| d.ref_name() != Some(name.as_str()));
                        }
                        Reference::Digest(digest) => {
                            index.manifests.retain(|d| {
                                !(d.digest == *digest
                                    && d.ref_name().and_then(view::RefName::parse).is_some_and(
                                        |r| match r {
                                            view::RefName::Tag { repo, .. }
                                            | view::RefName::Digest { repo, .. } => repo == repo_s,
                                        },
                                    ))
                            });
                        }
                    }
                    Ok(before - index.manifests.len())
                })
                .map_err(internal)
        })
        .await?;
        if removed == 0 {
            return Err(OciError::ManifestUnknown(format!(
                "{what} is not in the cache"
            )));
        }
        tracing::info!(%what, "manifest deleted");
        let mut r = Response::new(RegBody::empty());
        *r.status_mut() = StatusCode::ACCEPTED;
        Ok(r)
    }
}

// -------------------------------------------------------------------- helpers

fn repo_name(name: &str) -> Result<RepoName, OciError> {
    name.parse()
        .map_err(|e: kiln_shared::reference::ReferenceError| OciError::NameInvalid(e.to_string()))
}

fn parse_digest(s: &str) -> Result<Digest, OciError> {
    s.parse()
        .map_err(|e: kiln_shared::digest::DigestError| OciError::DigestInvalid(e.to_string()))
}

fn parse_reference(s: &str) -> Result<Reference, OciError> {
    if s.contains(':') {
        parse_digest(s).map(Reference::Digest)
    } else {
        s.parse()
            .map(Reference::Tag)
            .map_err(|e: kiln_shared::reference::ReferenceError| {
                OciError::TagInvalid(e.to_string())
            })
    }
}

fn manifest_unknown(repo: &RepoName, tag: &str) -> OciError {
    OciError::ManifestUnknown(format!("{repo}:{tag} is not in the cache"))
}

fn internal(e: impl std::fmt::Display) -> OciError {
    OciError::Internal(e.to_string())
}

fn too_large() -> OciError {
    OciError::TooLarge(format!(
        "manifest is larger than {MAX_MANIFEST_SIZE} bytes, the most a registry accepts"
    ))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OciError::Internal(format!("blocking task failed: {e}")))?
}

fn json_response(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(RegBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn if_none_match(headers: &HeaderMap, digest: &Digest) -> bool {
    let d = digest.to_string();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
                .any(|t| t == d)
        })
    })
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, OciError> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| OciError::SizeInvalid("Content-Length is not a number".into()))
        })
        .transpose()
}

fn check_length(expected: Option<u64>, got: u64) -> Result<(), OciError> {
    match expected {
        Some(n) if n != got => Err(OciError::SizeInvalid(format!(
            "the request announced {n} bytes but sent {got}"
        ))),
        _ => Ok(()),
    }
}

/// Streams a request body into the writer in batches, each written off the async
/// threads. Returns the bytes written. On error the writer is gone (its temp file too).
/// A body that sends nothing for `idle` is abandoned: a client that stalls mid-chunk
/// cannot keep an upload (and its session lock) alive forever.
async fn write_body<B>(
    writer: &mut Option<BlobWriter>,
    mut body: B,
    idle: Duration,
) -> Result<u64, OciError>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: std::fmt::Display,
{
    if writer.is_none() {
        return Err(OciError::BlobUploadInvalid(
            "this upload failed earlier; start a new one".into(),
        ));
    }
    let mut total = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    loop {
        let Ok(frame) = tokio::time::timeout(idle, body.frame()).await else {
            *writer = None;
            return Err(OciError::BlobUploadInvalid(format!(
                "the request body stalled for {}s after {} bytes; the upload was dropped",
                idle.as_secs(),
                total + batch_len as u64
            )));
        };
        let done = match frame {
            None => true,
            Some(Err(e)) => {
                *writer = None;
                return Err(OciError::BlobUploadInvalid(format!(
                    "the request body broke off after {} bytes: {e}",
                    total + batch_len as u64
                )));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    batch_len += data.len();
                    batch.push(data);
                }
                false
            }
        };
        if (done && batch_len > 0) || batch_len >= WRITE_BATCH {
            let Some(mut w) = writer.take() else {
                return Err(OciError::Internal("blob writer lost".into()));
            };
            let chunks = std::mem::take(&mut batch);
            let w = blocking(move || {
                for c in &chunks {
                    w.write_bytes(c).map_err(internal)?;
                }
                Ok(w)
            })
            .await?;
            *writer = Some(w);
            total += batch_len as u64;
            batch_len = 0;
        }
        if done {
            return Ok(total);
        }
    }
}

async fn finish_writer(writer: Option<BlobWriter>, digest: Digest) -> Result<(), OciError> {
    let Some(w) = writer else {
        return Err(OciError::BlobUploadInvalid(
            "this upload failed earlier; start a new one".into(),
        ));
    };
    blocking(move || match w.finish(Some(&digest), None) {
        Ok(_) => Ok(()),
        Err(CacheError::DigestMismatch { expected, actual }) => Err(OciError::DigestInvalid(
            format!("uploaded content has digest {actual}, not {expected}; nothing was stored"),
        )),
        Err(e) => Err(internal(e)),
    })
    .await
}

async fn read_limited<B>(mut body: B, limit: usize) -> Result<Bytes, OciError>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| OciError::ManifestInvalid(format!("the request body broke off: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Result<Resp, OciError> {
    created(&format!("/v2/{repo}/blobs/{digest}"), digest)
}

/// `201 Created` for what now stands at `location` with `digest`.
fn created(location: &str, digest: &Digest) -> Result<Resp, OciError> {
    let mut r = Response::new(RegBody::empty());
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(location).map_err(internal)?,
    );
    h.insert(
        DOCKER_CONTENT_DIGEST,
        HeaderValue::from_str(&digest.to_string()).map_err(internal)?,
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(r)
}

fn upload_accepted(
    repo: &RepoName,
    id: &str,
    session: &Session,
    status: StatusCode,
) -> Result<Resp, OciError> {
    let mut r = Response::new(RegBody::empty());
    *r.status_mut() = status;
    let end = session.offset().saturating_sub(1);
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/v2/{repo}/blobs/uploads/{id}")).map_err(internal)?,
    );
    h.insert(
        header::RANGE,
        HeaderValue::from_str(&format!("0-{end}")).map_err(internal)?,
    );
    h.insert(
        DOCKER_UPLOAD_UUID,
        HeaderValue::from_str(id).map_err(internal)?,
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(r)
}

/// One page of names, and the `last` and `n` of the next page if more follow.
type Page<'a> = (Vec<&'a str>, Option<(&'a str, usize)>);

/// A JSON list page, with the `Link` header to the next page when there is one.
fn paged(
    body: serde_json::Value,
    path: &str,
    next: Option<(&str, usize)>,
) -> Result<Resp, OciError> {
    let mut r = json_response(StatusCode::OK, Bytes::from(body.to_string()));
    if let Some((last, n)) = next {
        let link = format!("<{path}?last={}&n={n}>; rel=\"next\"", query::encode(last));
        r.headers_mut().insert(
            header::LINK,
            HeaderValue::from_str(&link).map_err(internal)?,
        );
    }
    Ok(r)
}

/// Parses `n` and `last` and cuts one page of sorted `names`; returns the page and, if
/// more follow, the `last` and `n` of the next page.
fn paginate<'a>(names: &[&'a str], q: Option<&str>) -> Result<Page<'a>, OciError> {
    let n = match query::param(q, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            OciError::PaginationInvalid(format!("n={n:?} is not a number of entries"))
        })?),
        None => None,
    };
    let start = match query::param(q, "last") {
        Some(last) => names.partition_point(|x| *x <= last.as_str()),
        None => 0,
    };
    let rest = &names[start..];
    let take = n.unwrap_or(rest.len()).min(rest.len());
    let page = rest[..take].to_vec();
    let next = match (n, page.last()) {
        (Some(n), Some(last)) if take < rest.len() => Some((*last, n)),
        _ => None,
    };
    Ok((page, next))
}
