//! One domain error for everything a registry request can get wrong, and its single
//! mapping to the OCI error JSON (`{"errors":[{"code","message","detail"}]}`) with the
//! status codes of the OCI Distribution Spec (and distribution's `RANGE_INVALID` and
//! `TAG_INVALID`, which the spec leaves out but clients know).

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use kiln_shared::digest::Digest;
use serde_json::{Value, json};

use super::body::RegBody;

/// Seconds a client refused for load waits before it tries again.
const RETRY_AFTER: &str = "10";

/// Why a registry request failed, as the client will read it.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("blob {0} is not in the cache")]
    BlobUnknown(Digest),
    #[error("blob upload is invalid: {0}")]
    BlobUploadInvalid(String),
    #[error(
        "blob upload {0:?} is unknown: it finished, was cancelled or expired; start a new upload"
    )]
    BlobUploadUnknown(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("manifest references blob {0}, which is not in the cache: push the blob first")]
    ManifestBlobUnknown(Digest),
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(String),
    #[error("{0}")]
    ManifestUnknown(String),
    #[error("{0}")]
    NameInvalid(String),
    #[error("repository {0:?} is not in the cache")]
    NameUnknown(String),
    #[error("{0}")]
    SizeInvalid(String),
    #[error("{0}")]
    TagInvalid(String),
    #[error("{0}")]
    RangeInvalid(String),
    #[error("{0}")]
    PaginationInvalid(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    HostInvalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{method} is not allowed on {what}")]
    MethodNotAllowed { method: String, what: &'static str },
    #[error(
        "no registry endpoint at {0:?}: the OCI API has /v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest>, /v2/<name>/blobs/uploads/, /v2/<name>/tags/list, /v2/<name>/referrers/<digest> and /v2/_catalog"
    )]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A blob on demand its upstream cannot give now (down, or lost it).
    #[error("{0}")]
    Unavailable(String, Digest),
    #[error("internal error: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("internal error: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: a response header: {0}")]
    Header(#[from] http::header::InvalidHeaderValue),
    #[error("internal error: a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl OciError {
    /// The error code of the OCI error JSON.
    pub fn code(&self) -> &'static str {
        match self {
            OciError::BlobUnknown(_) => "BLOB_UNKNOWN",
            OciError::BlobUploadInvalid(_) => "BLOB_UPLOAD_INVALID",
            OciError::BlobUploadUnknown(_) => "BLOB_UPLOAD_UNKNOWN",
            OciError::DigestInvalid(_) => "DIGEST_INVALID",
            OciError::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            OciError::ManifestInvalid(_) => "MANIFEST_INVALID",
            OciError::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            OciError::NameInvalid(_) => "NAME_INVALID",
            OciError::NameUnknown(_) => "NAME_UNKNOWN",
            OciError::SizeInvalid(_) | OciError::TooLarge(_) => "SIZE_INVALID",
            OciError::TagInvalid(_) => "TAG_INVALID",
            OciError::RangeInvalid(_) => "RANGE_INVALID",
            OciError::PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            OciError::Denied(_) | OciError::HostInvalid(_) => "DENIED",
            OciError::Unsupported(_)
            | OciError::MethodNotAllowed { .. }
            | OciError::NotFound(_) => "UNSUPPORTED",
            OciError::TooManyRequests(_) => "TOOMANYREQUESTS",
            // distribution's code for 503.
            OciError::Unavailable(..) => "UNAVAILABLE",
            OciError::Cache(_)
            | OciError::Io { .. }
            | OciError::Header(_)
            | OciError::Task(_)
            | OciError::Internal(_) => "UNKNOWN",
        }
    }

    /// The HTTP status the spec gives the error.
    pub fn status(&self) -> StatusCode {
        match self {
            OciError::BlobUnknown(_)
            | OciError::BlobUploadUnknown(_)
            | OciError::ManifestUnknown(_)
            | OciError::NameUnknown(_)
            | OciError::NotFound(_) => StatusCode::NOT_FOUND,
            OciError::BlobUploadInvalid(_)
            | OciError::DigestInvalid(_)
            | OciError::ManifestBlobUnknown(_)
            | OciError::ManifestInvalid(_)
            | OciError::NameInvalid(_)
            | OciError::SizeInvalid(_)
            | OciError::TagInvalid(_)
            | OciError::PaginationInvalid(_)
            | OciError::HostInvalid(_) => StatusCode::BAD_REQUEST,
            OciError::RangeInvalid(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            OciError::Denied(_) => StatusCode::FORBIDDEN,
            OciError::Unsupported(_) | OciError::MethodNotAllowed { .. } => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            OciError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            OciError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            OciError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            OciError::Cache(_)
            | OciError::Io { .. }
            | OciError::Header(_)
            | OciError::Task(_)
            | OciError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The structured `detail` member.
    pub fn detail(&self) -> Value {
        match self {
            OciError::BlobUnknown(d)
            | OciError::ManifestBlobUnknown(d)
            | OciError::Unavailable(_, d) => {
                json!({ "digest": d.to_string() })
            }
            OciError::BlobUploadUnknown(id) => json!({ "uuid": id }),
            OciError::NameUnknown(n) => json!({ "name": n }),
            OciError::MethodNotAllowed { method, .. } => json!({ "method": method }),
            OciError::NotFound(p) => json!({ "path": p }),
            _ => json!({}),
        }
    }

    /// The response: status, OCI error JSON body, JSON content type.
    pub fn into_response(self) -> http::Response<RegBody> {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "registry request failed");
        } else {
            tracing::debug!(error = %self, code = self.code(), "registry request refused");
        }
        let body = json!({
            "errors": [{
                "code": self.code(),
                "message": self.to_string(),
                "detail": self.detail(),
            }]
        });
        let bytes = Bytes::from(body.to_string());
        let mut resp = http::Response::new(RegBody::full(bytes));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
        }
        resp
    }
}

/// Why the registry could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "cannot listen on {addr}: {source}; choose another address with --listen or stop what holds the port"
    )]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("no address to listen on: give at least one --listen address")]
    NoAddress,
    #[error(
        "{addr} is not a loopback address: add it to the registry's configured listen addresses explicitly (allow_non_loopback)"
    )]
    NotLoopback { addr: std::net::SocketAddr },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_oci_error_json() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        let resp = OciError::ManifestBlobUnknown(d.clone()).into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"]["digest"], d.to_string());
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("push the blob first")
        );
    }

    #[test]
    fn statuses_follow_the_spec() {
        assert_eq!(
            OciError::NameInvalid("x".into()).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            OciError::BlobUploadUnknown("x".into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            OciError::RangeInvalid("x".into()).status(),
            StatusCode::RANGE_NOT_SATISFIABLE
        );
        assert_eq!(OciError::Denied("x".into()).status(), StatusCode::FORBIDDEN);
    }
}
