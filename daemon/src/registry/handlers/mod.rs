//! The handlers, one module per OCI resource (manifests, blobs, uploads, listing,
//! referrers), each an `impl Service` block over the thin [`Service`](super::Service),
//! and what they share: request parsing, response builders, the request-body bound.

mod blobs;
mod listing;
mod manifests;
mod referrers;
mod uploads;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body;
use kiln_shared::digest::Digest;
use kiln_shared::reference::{Reference, RepoName};

use super::body::RegBody;
use super::error::OciError;
use super::manifest::MAX_MANIFEST_SIZE;
use super::query;

pub(super) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
/// How many request-body bytes are gathered before one write to the blob file.
const WRITE_BATCH: usize = 1 << 20;

/// A response of the registry.
pub type Resp = Response<RegBody>;

/// What a request body must be for the handlers: hyper's `Incoming` in kilnd, in-memory
/// bodies in tests.
pub trait ReqBody: Body<Data = Bytes, Error: std::fmt::Display> + Send + Unpin {}
impl<B> ReqBody for B where B: Body<Data = Bytes, Error: std::fmt::Display> + Send + Unpin {}

/// The reference in a manifest path: a digest if it has a `:`, else a tag.
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
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

pub(super) fn repo_name(name: &str) -> Result<RepoName, OciError> {
    name.parse()
        .map_err(|e: kiln_shared::reference::ReferenceError| OciError::NameInvalid(e.to_string()))
}

pub(super) fn parse_digest(s: &str) -> Result<Digest, OciError> {
    s.parse()
        .map_err(|e: kiln_shared::digest::DigestError| OciError::DigestInvalid(e.to_string()))
}

pub(super) fn manifest_unknown(repo: &RepoName, tag: &str) -> OciError {
    OciError::ManifestUnknown(format!("{repo}:{tag} is not in the cache"))
}

/// An internal error, with its source kept (cache, header and task errors).
pub(super) fn internal(e: impl Into<OciError>) -> OciError {
    e.into()
}

pub(super) fn too_large() -> OciError {
    OciError::TooLarge(format!(
        "manifest is larger than {MAX_MANIFEST_SIZE} bytes, the most a registry accepts"
    ))
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Runs blocking file work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(OciError::Task)?
}

pub(super) fn json_response(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(RegBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

pub(super) fn if_none_match(headers: &HeaderMap, digest: &Digest) -> bool {
    let d = digest.to_string();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
                .any(|t| t == d)
        })
    })
}

pub(super) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, OciError> {
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

pub(super) fn check_length(expected: Option<u64>, got: u64) -> Result<(), OciError> {
    match expected {
        Some(n) if n != got => Err(OciError::SizeInvalid(format!(
            "the request announced {n} bytes but sent {got}"
        ))),
        _ => Ok(()),
    }
}

pub(super) async fn read_limited<B>(mut body: B, limit: usize) -> Result<Bytes, OciError>
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

pub(super) fn blob_created(repo: &RepoName, digest: &Digest) -> Result<Resp, OciError> {
    created(&format!("/v2/{repo}/blobs/{digest}"), digest)
}

/// `201 Created` for what now stands at `location` with `digest`.
pub(super) fn created(location: &str, digest: &Digest) -> Result<Resp, OciError> {
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
