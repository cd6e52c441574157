//! Manifests: GET/HEAD by tag or digest (with `Accept` negotiation and the
//! build-on-pull hook), PUT (checked against the stored blobs), DELETE.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use kiln_shared::digest::Digest;
use kiln_shared::reference::{Reference, RepoName, Tag};

use super::*;
use crate::cache::{Cache, CacheError};
use crate::oci::Descriptor;
use crate::registry::PullEvent;
use crate::registry::accept::{Accepts, ManifestKind, Negotiated, negotiate};
use crate::registry::body::RegBody;
use crate::registry::error::OciError;
use crate::registry::manifest::ManifestInfo;
use crate::registry::service::Service;
use crate::registry::view::{self, Stored, Target, View, digest_ref_name, tag_ref_name};

impl Service {
    pub(in crate::registry) async fn get_manifest(
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
                let stored = match &tagged.target {
                    Target::Held(stored) => Arc::clone(stored),
                    Target::OnDemand { digest, media_type } => {
                        self.on_demand_manifest(digest, Some(media_type)).await?
                    }
                };
                (stored, true)
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
                reference: reference.clone(),
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

    /// A manifest on demand (`cache::ondemand`), fetched from its upstream into the cache
    /// (once, however many ask), then read from there. An upstream that cannot give it
    /// is 503 with what to do, as for a blob.
    async fn on_demand_manifest(
        &self,
        digest: &Digest,
        media_type: Option<&str>,
    ) -> Result<Arc<Stored>, OciError> {
        let held = self.cache.ensure_blob(digest).await.map_err(|e| match e {
            e @ CacheError::OnDemand(_) => OciError::Unavailable(e.to_string(), digest.clone()),
            e => internal(e),
        })?;
        if held.is_none() {
            // Neither here nor recorded any more (gc went by): as if never named.
            return Err(OciError::ManifestUnknown(format!(
                "manifest {digest} is not in the cache"
            )));
        }
        let (cache, d) = (Arc::clone(&self.cache), digest.clone());
        let media_type = media_type.map(str::to_owned);
        let stored = blocking(move || view::read_stored(&cache, &d, media_type.as_deref())).await?;
        Ok(Arc::new(stored))
    }

    /// A manifest by digest: one the view holds, any blob of the cache that is a manifest
    /// (blobs are shared by all repositories), or a manifest on demand.
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
        enum Found {
            Here(Arc<Stored>),
            OnDemand(Option<String>),
        }
        let found = blocking(move || {
            Ok(match cache.blob_size(&d).map_err(internal)? {
                Some(size) if size <= MAX_MANIFEST_SIZE as u64 => {
                    view::read_stored(&cache, &d, None)
                        .ok()
                        .map(|s| Found::Here(Arc::new(s)))
                }
                Some(_) => None,
                None => cache
                    .on_demand(&d)
                    .map_err(internal)?
                    .filter(|from| from.is_document())
                    .map(|from| Found::OnDemand(from.media_type)),
            })
        })
        .await?;
        match found {
            Some(Found::Here(s)) => Ok(s),
            Some(Found::OnDemand(media_type)) => {
                self.on_demand_manifest(digest, media_type.as_deref()).await
            }
            None => Err(unknown()),
        }
    }
    pub(in crate::registry) async fn put_manifest<B: ReqBody>(
        &self,
        repo: &RepoName,
        reference: Reference,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Resp, OciError> {
        if content_length(headers)?.is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
            return Err(too_large());
        }
        let bytes = read_limited(body, MAX_MANIFEST_SIZE).await?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let info = crate::registry::manifest::parse(&bytes, content_type)?;
        let cache = Arc::clone(&self.cache);
        let repo_s = repo.as_str().to_owned();
        let (digest, subject) = blocking(move || {
            let digest = Digest::from_sha256_bytes(&sha256(&bytes));
            if let Reference::Digest(want) = &reference
                && *want != digest
            {
                return Err(OciError::DigestInvalid(format!(
                    "manifest digest is {digest}, not {want} as the URL says"
                )));
            }
            // A refused manifest writes nothing: check before storing its blob.
            check_references(&cache, &info)?;
            // Its own blob: unreferenced, and young for gc, until the index names it.
            cache.put_blob(&bytes).map_err(internal)?;
            let mut desc =
                Descriptor::new(info.kind.media_type(), digest.clone(), bytes.len() as u64);
            desc.artifact_type = info
                .artifact_type
                .clone()
                .filter(|_| info.subject.is_some());
            // Checked again under the writer lock, in the commit that names it: gc sweeps
            // under the same lock, so nothing checked there can go before index.json names
            // it. The 201 goes out once that commit is durable.
            let subject = info.subject.clone();
            let named = digest.clone();
            let cache2 = Arc::clone(&cache);
            cache.update_refs(move |edit| {
                check_references(&cache2, &info)?;
                match &reference {
                    Reference::Tag(tag) => {
                        edit.set(&tag_ref_name(&repo_s, tag.as_str()), desc)?;
                        // The tag now keeps it; a digest-only name is redundant.
                        edit.remove(&digest_ref_name(&repo_s, &named));
                    }
                    Reference::Digest(_) => {
                        let prefix =
                            format!("{}/{repo_s}:", kiln_shared::reference::DEFAULT_DOMAIN);
                        let tagged = edit
                            .refs_with_prefix(&prefix)
                            .iter()
                            .any(|(_, d)| d.digest == named);
                        if !tagged {
                            edit.set(&digest_ref_name(&repo_s, &named), desc)?;
                        }
                    }
                }
                Ok::<_, OciError>(())
            })?;
            Ok((digest, subject))
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

    pub(in crate::registry) async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: Reference,
    ) -> Result<Resp, OciError> {
        let cache = Arc::clone(&self.cache);
        let repo_s = repo.as_str().to_owned();
        let what = reference.qualified(repo);
        let removed = blocking(move || {
            cache
                .update_refs(move |edit| {
                    let names: Vec<String> = match &reference {
                        Reference::Tag(tag) => vec![tag_ref_name(&repo_s, tag.as_str())],
                        Reference::Digest(digest) => edit
                            .refs()
                            .into_iter()
                            .filter(|(n, d)| {
                                d.digest == *digest
                                    && view::RefName::parse(n).is_some_and(|r| match r {
                                        view::RefName::Tag { repo, .. }
                                        | view::RefName::Digest { repo, .. } => repo == repo_s,
                                    })
                            })
                            .map(|(n, _)| n)
                            .collect(),
                    };
                    Ok::<_, CacheError>(names.iter().filter(|n| edit.remove(n)).count())
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

/// Checks every blob a manifest references against the cache, as the caller holds the
/// writer lock: present (and leased from gc: its mtime is refreshed), of the size its
/// descriptor says, and, for an index entry that claims to be a manifest, a manifest of
/// that kind (the content tells it). Writes nothing.
fn check_references(cache: &Cache, info: &ManifestInfo) -> Result<(), OciError> {
    let present = |digest: &Digest, field: &str, size: u64| {
        // A blob on demand is as good as one in place: its upstream holds it.
        let stored = match cache.touch_blob(digest).map_err(internal)? {
            Some(size) => size,
            None => cache
                .on_demand(digest)
                .map_err(internal)?
                .map(|from| from.size)
                .ok_or_else(|| OciError::ManifestBlobUnknown(digest.clone()))?,
        };
        if stored != size {
            return Err(OciError::SizeInvalid(format!(
                "{field} says blob {digest} is {size} bytes, but the stored blob is {stored} \
                 bytes: fix the descriptor's size"
            )));
        }
        Ok(())
    };
    for b in &info.blobs {
        present(&b.digest, &b.field, b.size)?;
    }
    for (i, c) in info.children.iter().enumerate() {
        let field = format!("manifests[{i}]");
        present(&c.digest, &field, c.size)?;
        let declared = (!c.media_type.is_empty()).then_some(c.media_type.as_str());
        let claims_manifest = declared.is_none_or(|mt| ManifestKind::from_media_type(mt).is_some());
        if declared.is_some_and(is_image_blob_type) {
            return Err(OciError::ManifestInvalid(format!(
                "{field} is a {} blob: an index lists manifests, not layers or configs",
                c.media_type
            )));
        }
        if !claims_manifest {
            // Another artifact type (an attestation stored as a plain blob): its size
            // is all the cache can tell.
            continue;
        }
        let not_manifest = |why: String| {
            OciError::ManifestInvalid(format!(
                "{field} names blob {}, which is not a manifest: {why}",
                c.digest
            ))
        };
        if c.size > MAX_MANIFEST_SIZE as u64 {
            return Err(not_manifest(format!(
                "{} bytes is more than a manifest may be",
                c.size
            )));
        }
        let kind = match cache.on_demand(&c.digest).map_err(internal)? {
            // A manifest on demand (a lazily fetched index's child): its record says what
            // it is; its upstream holds the bytes.
            Some(from) if from.is_document() => from.media_type.unwrap_or_default(),
            Some(_) => return Err(not_manifest("it is recorded as a plain blob".into())),
            None => {
                let bytes = cache
                    .read_blob(&c.digest, MAX_MANIFEST_SIZE as u64)
                    .map_err(internal)?;
                let child = crate::registry::manifest::parse(&bytes, None)
                    .map_err(|e| not_manifest(e.to_string()))?;
                child.kind.media_type().to_owned()
            }
        };
        if let Some(mt) = declared
            && kind != mt
        {
            return Err(not_manifest(format!(
                "the descriptor says {mt}, the content is {kind}"
            )));
        }
    }
    Ok(())
}

/// Media types of image layers and configs: never an index entry.
fn is_image_blob_type(mt: &str) -> bool {
    mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs.")
        || mt == "application/vnd.oci.image.config.v1+json"
        || mt == "application/vnd.docker.container.image.v1+json"
}
