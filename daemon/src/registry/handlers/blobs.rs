//! Blobs: GET/HEAD (with ranges), DELETE of an unreferenced blob. A GET of a blob on
//! demand fetches it from its upstream first (`cache::ondemand`); 503 if it cannot.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use kiln_shared::digest::Digest;
use kiln_shared::reference::RepoName;

use super::*;
use crate::registry::body::RegBody;
use crate::registry::error::OciError;
use crate::registry::range::{RangeAnswer, blob_range};
use crate::registry::service::Service;

/// A blob as the cache has it.
enum Found {
    /// Local: the open file and its size.
    File(std::fs::File, u64),
    /// On demand from an upstream (`cache::ondemand`), with its recorded size.
    OnDemand(u64),
}

impl Service {
    /// Opens a blob, or finds it on demand; a HEAD leases it from gc (see below). Only a
    /// blob missing here is looked up in the record of blobs on demand.
    async fn find_blob(&self, digest: &Digest, head: bool) -> Result<Found, OciError> {
        let path = self.cache.blob_path(digest);
        let d = digest.clone();
        let cache = Arc::clone(&self.cache);
        blocking(move || {
            if head {
                // A client that HEADs a blob skips its upload and references it in the
                // manifest it pushes next: lease it from gc until then.
                cache.touch_blob(&d).map_err(internal)?;
            }
            match std::fs::File::open(&path) {
                Ok(f) => {
                    let meta = f.metadata().map_err(|source| OciError::Io {
                        what: path.display().to_string(),
                        source,
                    })?;
                    if !meta.is_file() {
                        return Err(OciError::BlobUnknown(d));
                    }
                    Ok(Found::File(f, meta.len()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match cache.on_demand(&d).map_err(internal)? {
                        Some(from) => Ok(Found::OnDemand(from.size)),
                        None => Err(OciError::BlobUnknown(d)),
                    }
                }
                Err(source) => Err(OciError::Io {
                    what: path.display().to_string(),
                    source,
                }),
            }
        })
        .await
    }

    pub(in crate::registry) async fn get_blob(
        &self,
        digest: &Digest,
        head: bool,
        headers: &HeaderMap,
    ) -> Result<Resp, OciError> {
        let mut found = self.find_blob(digest, head).await?;
        if matches!(found, Found::OnDemand(_)) && !head {
            // A blob on demand is fetched from its upstream, then served from the cache.
            self.cache.ensure_blob(digest).await.map_err(|e| match e {
                e @ crate::cache::CacheError::OnDemand(_) => {
                    OciError::Unavailable(e.to_string(), digest.clone())
                }
                e => internal(e),
            })?;
            found = self.find_blob(digest, head).await?;
        }
        let (file, size) = match found {
            Found::File(f, size) => (Some(f), size),
            Found::OnDemand(size) if head => (None, size),
            Found::OnDemand(_) => return Err(OciError::BlobUnknown(digest.clone())),
        };
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
        let mut r = Response::new(match file {
            Some(file) if !head => RegBody::file(file, start, len),
            _ => RegBody::empty(),
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
    pub(in crate::registry) async fn delete_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let (cache, d) = (Arc::clone(&self.cache), digest.clone());
        let users = blocking(move || Ok(view.users_of(&cache, &d))).await?;
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
                Err(source) => Err(OciError::Io {
                    what: format!("removing blob {d}"),
                    source,
                }),
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
}
