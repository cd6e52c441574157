//! Blob uploads: monolithic and chunked (POST, PATCH, PUT), status, cancel, mount.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use kiln_shared::digest::Digest;
use kiln_shared::reference::RepoName;

use super::*;
use crate::cache::{BlobWriter, CacheError};
use crate::registry::body::RegBody;
use crate::registry::error::OciError;
use crate::registry::range::upload_range;
use crate::registry::service::Service;
use crate::registry::uploads::Full;
use crate::registry::uploads::Session;

impl Service {
    pub(in crate::registry) async fn start_upload<B: ReqBody>(
        &self,
        repo: &RepoName,
        q: Option<&str>,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError> {
        if let Some(mount) = query::param(q, "mount") {
            let digest = parse_digest(&mount)?;
            let cache = Arc::clone(&self.cache);
            let d = digest.clone();
            // A lease, as for a HEAD: the client references it next.
            if blocking(move || cache.touch_blob(&d).map_err(internal))
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
        self.uploads.admit().map_err(|full| {
            let why = match full {
                Full::Sessions(n) => format!("{n} uploads are in progress"),
                Full::Bytes(n) => format!("uploads in progress hold {n} bytes"),
            };
            OciError::TooManyRequests(format!(
                "{why}, the most this registry takes at once; retry when some finish or \
                 expire (idle uploads expire after {}s)",
                self.uploads.ttl().as_secs()
            ))
        })?;
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
            return Err(OciError::Internal("blob writer lost"));
        };
        let (id, slot) = self.uploads.start(repo.as_str(), w);
        let session = slot.lock().await;
        upload_accepted(repo, &id, &session, StatusCode::ACCEPTED)
    }

    pub(in crate::registry) async fn upload_status(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<Resp, OciError> {
        let session = self.session(repo, id).await?;
        upload_accepted(repo, id, &session, StatusCode::NO_CONTENT)
    }

    pub(in crate::registry) async fn patch_upload<B: ReqBody>(
        &self,
        repo: &RepoName,
        id: &str,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError> {
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

    pub(in crate::registry) async fn finish_upload<B: ReqBody>(
        &self,
        repo: &RepoName,
        id: &str,
        q: Option<&str>,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError> {
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

    pub(in crate::registry) async fn cancel_upload(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<Resp, OciError> {
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
}

/// Streams a request body into the writer in batches, each written off the async
/// threads. Returns the bytes written. On error the writer is gone (its temp file too).
/// A body that sends nothing for `idle` is abandoned: a client that stalls mid-chunk
/// cannot keep an upload (and its session lock) alive forever.
async fn write_body<B: ReqBody>(
    writer: &mut Option<BlobWriter>,
    mut body: B,
    idle: Duration,
) -> Result<u64, OciError> {
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
        if done || batch_len >= WRITE_BATCH {
            let Some(mut w) = writer.take() else {
                return Err(OciError::Internal("blob writer lost"));
            };
            let chunks = std::mem::take(&mut batch);
            let w = blocking(move || {
                for c in &chunks {
                    w.write_bytes(c).map_err(internal)?;
                }
                if done {
                    // Until the next request of the upload, no descriptor is held.
                    w.park().map_err(internal)?;
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
