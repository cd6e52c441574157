//! One upstream registry through the `oci-client` crate: look up a tag, copy an image's
//! graph into the cache (only the blobs it lacks, each streamed into a verifying blob
//! writer), and push an image's graph from the cache (only the blobs the upstream lacks).
//!
//! Two pieces are written here because `oci-client` 0.15 has no call for them:
//! - it has no blob HEAD, so whether the upstream has a blob is asked with a ranged GET
//!   of its first byte (`Range: bytes=0-0`, through the client's own authentication): a
//!   404 means missing; a registry that ignores Range answers 200 and the body is
//!   dropped unread;
//! - its blob push takes the blob in memory (`push_blob(&[u8])`), so a blob is read from
//!   the cache whole before it is pushed.
//!
//! Streaming a blob with verification is the crate's (`pull_blob_stream` checks the
//! digest); the cache's blob writer checks digest and size again before the blob becomes
//! visible, so nothing unverified ever lands.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use http::HeaderValue;
use kiln_shared::digest::Digest;
use kiln_shared::protocol::UpstreamInfo;
use kiln_shared::reference::{ImageRef, RepoName};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use super::health::Tracker;
use super::{
    AuthFiles, CONNECT_TIMEOUT, Fetched, Pushed, UpstreamError, UpstreamSpec, api_host, cache_name,
    digest_str, read_index,
};
use crate::cache::{Cache, CacheError, MANIFEST_LIMIT};
use crate::oci::{
    AnyManifest, Descriptor, OCI_INDEX, OCI_MANIFEST, Platform, is_index, is_manifest,
};

/// The manifest media types kiln asks for (all it can store; none is converted).
const ACCEPT: &[&str] = &[
    crate::oci::OCI_INDEX,
    crate::oci::OCI_MANIFEST,
    crate::oci::DOCKER_MANIFEST_LIST,
    crate::oci::DOCKER_MANIFEST,
];

/// Blobs copied at once per image.
const PARALLEL: usize = 4;

/// How long a read from an upstream may stall before the transfer fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// An upstream with its client, credentials and health.
pub struct Remote {
    spec: UpstreamSpec,
    host: String,
    client: Client,
    /// Never logged: `Remote`'s Debug leaves it out.
    auth: RegistryAuth,
    health: Tracker,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("spec", &self.spec)
            .field("health", &self.info().state)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub fn new(spec: UpstreamSpec, auth: &AuthFiles) -> Result<Remote, UpstreamError> {
        let mut extra_root_certificates = Vec::new();
        if let Some(path) = &spec.ca_file {
            let data = std::fs::read(path).map_err(|e| UpstreamError::CaFile {
                upstream: spec.to_string(),
                path: path.clone(),
                message: e.to_string(),
            })?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if spec.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            use_monolithic_push: true,
            platform_resolver: None,
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| UpstreamError::CaFile {
            upstream: spec.to_string(),
            path: spec.ca_file.clone().unwrap_or_default(),
            message: e.to_string(),
        })?;
        let auth = auth.credentials_for(&spec.registry)?;
        Ok(Remote {
            host: api_host(&spec.registry).to_owned(),
            spec,
            client,
            auth,
            health: Tracker::default(),
        })
    }

    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    pub fn info(&self) -> UpstreamInfo {
        self.health.info(self.spec.to_string(), self.spec.push)
    }

    /// The repository `repo` has on this upstream (under its prefix).
    fn repo(&self, repo: &str) -> String {
        match &self.spec.prefix {
            Some(p) => format!("{p}/{repo}"),
            None => repo.to_owned(),
        }
    }

    fn tagged(&self, repo: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), repo.to_owned(), tag.to_owned())
    }

    fn by_digest(&self, repo: &str, digest: &Digest) -> Reference {
        Reference::with_digest(self.host.clone(), repo.to_owned(), digest_str(digest))
    }

    /// Refuses at once while the upstream is down and not due for a retry.
    fn ready(&self) -> Result<(), UpstreamError> {
        match self.health.down() {
            Some((detail, retry)) => Err(UpstreamError::Down {
                upstream: self.spec.to_string(),
                detail,
                retry,
            }),
            None => Ok(()),
        }
    }

    /// Turns a client error into kiln's, marking the upstream down if it could not be
    /// reached.
    fn error(&self, image: &str, e: OciDistributionError) -> UpstreamError {
        let upstream = self.spec.to_string();
        if let OciDistributionError::RequestError(r) = &e
            && (r.is_connect() || r.is_timeout())
        {
            let detail = root_cause(r);
            let retry = self.health.failed(detail.clone());
            tracing::warn!(%upstream, %detail, retry_s = retry.as_secs(), "upstream unreachable");
            return UpstreamError::Unreachable {
                upstream,
                detail,
                retry,
            };
        }
        self.health.up();
        let unauthorized = match &e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => true,
            OciDistributionError::ServerError { code, .. } => matches!(code, 401 | 403),
            OciDistributionError::RegistryError { envelope, .. } => envelope
                .errors
                .iter()
                .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
            _ => false,
        };
        let detail = match &e {
            OciDistributionError::UnauthorizedError { .. } => "401 Unauthorized".to_owned(),
            other => other.to_string(),
        };
        if unauthorized {
            let detail = match self.auth {
                RegistryAuth::Anonymous => format!("{detail}, no credentials configured"),
                _ => detail,
            };
            return UpstreamError::Unauthorized {
                upstream,
                image: image.to_owned(),
                detail,
            };
        }
        UpstreamError::Registry {
            upstream,
            image: image.to_owned(),
            detail,
        }
    }

    fn cache_error(&self, image: &str, source: CacheError) -> UpstreamError {
        UpstreamError::Cache {
            upstream: self.spec.to_string(),
            image: image.to_owned(),
            source,
        }
    }

    /// A manifest or index by tag or digest: its bytes, digest and media type, or `None`
    /// if the upstream has no such name.
    async fn get_manifest(
        &self,
        reference: &Reference,
    ) -> Result<Option<(Vec<u8>, Descriptor)>, UpstreamError> {
        let shown = reference.whole();
        match self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPT)
            .await
        {
            Ok((bytes, _)) => {
                self.health.up();
                let digest = Digest::from_sha256_bytes(&Sha256::digest(&bytes).into());
                if let Some(want) = reference.digest()
                    && want != digest_str(&digest)
                {
                    return Err(UpstreamError::Registry {
                        upstream: self.spec.to_string(),
                        image: shown,
                        detail: format!("the upstream sent a manifest whose digest is {digest}"),
                    });
                }
                let doc: AnyManifest =
                    serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Registry {
                        upstream: self.spec.to_string(),
                        image: shown.clone(),
                        detail: format!("the manifest is not valid JSON: {e}"),
                    })?;
                let media_type = doc.media_type.clone().unwrap_or_else(|| {
                    if doc.manifests.is_empty() {
                        OCI_MANIFEST.to_owned()
                    } else {
                        OCI_INDEX.to_owned()
                    }
                });
                let desc = Descriptor::new(media_type, digest, bytes.len() as u64);
                Ok(Some((bytes, desc)))
            }
            Err(e) if not_found(&e) => {
                self.health.up();
                Ok(None)
            }
            Err(e) => Err(self.error(&shown, e)),
        }
    }

    /// One arch of a workspace target, as [`super::Upstreams::fetch_target`] says.
    pub async fn fetch_target(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        arch_suffix: &str,
        platform: &Platform,
    ) -> Result<Option<Fetched>, UpstreamError> {
        self.ready()?;
        let start = Instant::now();
        let repo = self.repo(image.repo.as_str());
        let tag = image.tag.as_str();
        let shown = format!("{image}-{arch_suffix}");
        let arch = self
            .get_manifest(&self.tagged(&repo, &format!("{tag}-{arch_suffix}")))
            .await?;
        if let Some((_, d)) = &arch
            && !is_manifest(&d.media_type)
        {
            return Err(UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image: shown,
                detail: format!("expected an image manifest, got {}", d.media_type),
            });
        }
        // The index's entry for it, verbatim (platform, annotations): the index kiln
        // writes from those entries is then the upstream's, bit for bit.
        let mut entry = None;
        if let Some((bytes, d)) = self.get_manifest(&self.tagged(&repo, tag)).await?
            && is_index(&d.media_type)
        {
            let index: crate::oci::ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.to_string(),
                    detail: format!("the index is not valid JSON: {e}"),
                })?;
            entry = index.manifests.into_iter().find(|e| match &arch {
                Some((_, d)) => e.digest == d.digest,
                None => e.platform.as_ref().is_some_and(|p| {
                    p.os == platform.os && p.architecture == platform.architecture
                }),
            });
        }
        let mut bytes = 0;
        let desc = match (entry, arch) {
            (Some(entry), _) => entry,
            (None, Some((doc, mut desc))) => {
                bytes += self.store(cache, &shown, &doc, &desc)?;
                desc.platform = Some(platform.clone());
                desc
            }
            (None, None) => return Ok(None),
        };
        bytes += self.copy_graph(cache, &repo, &desc).await?;
        Ok(Some(Fetched {
            upstream: self.spec.to_string(),
            desc,
            bytes,
            elapsed: start.elapsed(),
        }))
    }

    /// Any image, whole, named by its full reference in the cache.
    pub async fn fetch_image(
        &self,
        cache: &Arc<Cache>,
        image: &Reference,
    ) -> Result<Option<Fetched>, UpstreamError> {
        self.ready()?;
        let start = Instant::now();
        let repo = self.repo(image.repository());
        let reference = match (image.digest(), image.tag()) {
            (Some(d), _) => Reference::with_digest(self.host.clone(), repo.clone(), d.to_owned()),
            (None, t) => self.tagged(&repo, t.unwrap_or("latest")),
        };
        let Some((doc, desc)) = self.get_manifest(&reference).await? else {
            return Ok(None);
        };
        let name = cache_name(image);
        let mut bytes = self.store(cache, &name, &doc, &desc)?;
        bytes += self.copy_graph(cache, &repo, &desc).await?;
        cache
            .set_ref(&name, desc.clone())
            .map_err(|e| self.cache_error(&name, e))?;
        tracing::info!(image = %name, upstream = %self.spec, bytes, ms = start.elapsed().as_millis() as u64, "fetched");
        Ok(Some(Fetched {
            upstream: self.spec.to_string(),
            desc,
            bytes,
            elapsed: start.elapsed(),
        }))
    }

    /// Writes a document already in memory into the cache (verified); returns the bytes
    /// added.
    fn store(
        &self,
        cache: &Cache,
        image: &str,
        doc: &[u8],
        desc: &Descriptor,
    ) -> Result<u64, UpstreamError> {
        if cache
            .blob_size(&desc.digest)
            .map_err(|e| self.cache_error(image, e))?
            == Some(desc.size)
        {
            return Ok(0);
        }
        let mut w = cache
            .blob_writer()
            .map_err(|e| self.cache_error(image, e))?;
        w.write_bytes(doc).map_err(|e| self.cache_error(image, e))?;
        w.finish(Some(&desc.digest), Some(desc.size))
            .map_err(|e| self.cache_error(image, e))?;
        Ok(desc.size)
    }

    /// Copies what `desc` reaches into the cache, skipping blobs it holds; returns the
    /// bytes added. Every blob is verified by digest and size before it is visible.
    fn copy_graph<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        repo: &'a str,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            let image = format!("{repo}@{}", desc.digest);
            let have = cache
                .blob_size(&desc.digest)
                .map_err(|e| self.cache_error(&image, e))?
                == Some(desc.size);
            if !(is_index(&desc.media_type) || is_manifest(&desc.media_type)) {
                return if have {
                    Ok(0)
                } else {
                    self.copy_blob(cache, repo, desc).await
                };
            }
            let mut added = 0;
            let doc = if have {
                cache
                    .read_blob(&desc.digest, MANIFEST_LIMIT)
                    .map_err(|e| self.cache_error(&image, e))?
            } else {
                let Some((doc, got)) = self
                    .get_manifest(&self.by_digest(repo, &desc.digest))
                    .await?
                else {
                    return Err(UpstreamError::Registry {
                        upstream: self.spec.to_string(),
                        image,
                        detail: "the upstream names this manifest but does not have it".into(),
                    });
                };
                let mut want = got;
                want.size = desc.size;
                added += self.store(cache, &image, &doc, &want)?;
                doc
            };
            let parsed: AnyManifest =
                serde_json::from_slice(&doc).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.clone(),
                    detail: format!("not valid JSON: {e}"),
                })?;
            let children: Vec<Descriptor> = parsed.children().cloned().collect();
            let copies: Vec<_> = children
                .iter()
                .map(|c| self.copy_graph(cache, repo, c))
                .collect();
            let sizes: Vec<u64> = futures_util::stream::iter(copies)
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
            Ok(added + sizes.iter().sum::<u64>())
        }
        .boxed()
    }

    /// Streams one blob into the cache through a blob writer on a blocking thread (the
    /// network and the disk overlap); the writer verifies digest and size.
    async fn copy_blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
    ) -> Result<u64, UpstreamError> {
        let image = format!("{repo}@{}", desc.digest);
        let reference = self.by_digest(repo, &desc.digest);
        let layer = oci_descriptor(desc);
        let mut stream = self
            .client
            .pull_blob_stream(&reference, &layer)
            .await
            .map_err(|e| self.error(&image, e))?;
        let mut writer = cache
            .blob_writer()
            .map_err(|e| self.cache_error(&image, e))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
        let (digest, size) = (desc.digest.clone(), desc.size);
        let write = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                writer.write_bytes(&chunk)?;
                if writer.size() > size {
                    return Err(CacheError::SizeMismatch {
                        expected: size,
                        actual: writer.size(),
                    });
                }
            }
            writer.finish(Some(&digest), Some(size))
        });
        let mut failed = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = write.await.map_err(|e| UpstreamError::Registry {
            upstream: self.spec.to_string(),
            image: image.clone(),
            detail: format!("the blob writer stopped: {e}"),
        })?;
        if let Some(e) = failed {
            return Err(UpstreamError::Registry {
                upstream: self.spec.to_string(),
                image,
                detail: format!("reading the blob: {e}"),
            });
        }
        written.map_err(|e| self.cache_error(&image, e))?;
        Ok(size)
    }

    /// Pushes every arch of a target the cache holds (`tag-<arch>`), then its index
    /// (`tag`), skipping what the upstream has.
    pub async fn push_target(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        mount_from: &[RepoName],
    ) -> Result<Pushed, UpstreamError> {
        self.ready()?;
        let start = Instant::now();
        let shown = image.to_string();
        let name = image.cache_name();
        let view = cache.index().map_err(|e| self.cache_error(&shown, e))?;
        let index_desc = view
            .get(&name)
            .cloned()
            .ok_or_else(|| UpstreamError::Cache {
                upstream: self.spec.to_string(),
                image: shown.clone(),
                source: CacheError::Invalid(format!("{name} is not in the cache: build it first")),
            })?;
        let Some(index) =
            read_index(cache, &index_desc).map_err(|e| self.cache_error(&shown, e))?
        else {
            return Err(self.cache_error(
                &shown,
                CacheError::Invalid(format!("{name} is not a multi-arch index")),
            ));
        };
        let repo = self.repo(image.repo.as_str());
        let mounts: Vec<String> = mount_from
            .iter()
            .map(|r| self.repo(r.as_str()))
            .filter(|r| *r != repo)
            .collect();
        let arch_prefix = format!("{name}-");
        let mut references = Vec::new();
        let mut bytes = 0;
        for entry in &index.manifests {
            let Some(suffix) = view
                .refs()
                .find(|(n, d)| n.starts_with(&arch_prefix) && d.digest == entry.digest)
                .map(|(n, _)| n[arch_prefix.len()..].to_owned())
            else {
                continue;
            };
            let tag = format!("{}-{suffix}", image.tag);
            bytes += self
                .push_graph(cache, &repo, entry, Some(&tag), &mounts)
                .await?;
            references.push(format!("{}/{repo}:{tag}", self.spec.registry));
        }
        bytes += self
            .push_graph(cache, &repo, &index_desc, Some(image.tag.as_str()), &mounts)
            .await?;
        references.push(format!("{}/{repo}:{}", self.spec.registry, image.tag));
        tracing::info!(image = %shown, upstream = %self.spec, bytes, ms = start.elapsed().as_millis() as u64, "pushed");
        Ok(Pushed {
            upstream: self.spec.to_string(),
            references,
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Pushes `desc` and what it reaches (children first), under `tag` or by digest.
    fn push_graph<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        repo: &'a str,
        desc: &'a Descriptor,
        tag: Option<&'a str>,
        mounts: &'a [String],
    ) -> BoxFuture<'a, Result<u64, UpstreamError>> {
        async move {
            let image = format!("{repo}@{}", desc.digest);
            if !(is_index(&desc.media_type) || is_manifest(&desc.media_type)) {
                return self.push_blob(cache, repo, desc, mounts).await;
            }
            let reference = match tag {
                Some(t) => self.tagged(repo, t),
                None => self.by_digest(repo, &desc.digest),
            };
            // HEAD first: a manifest the upstream has under this name is done.
            match self
                .client
                .fetch_manifest_digest(&reference, &self.auth)
                .await
            {
                Ok(d) if d == digest_str(&desc.digest) => return Ok(0),
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(self.error(&image, e)),
            }
            let doc = cache
                .read_blob(&desc.digest, MANIFEST_LIMIT)
                .map_err(|e| self.cache_error(&image, e))?;
            let parsed: AnyManifest =
                serde_json::from_slice(&doc).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.clone(),
                    detail: format!("not valid JSON in the cache: {e}"),
                })?;
            let children: Vec<Descriptor> = parsed.children().cloned().collect();
            let pushes: Vec<_> = children
                .iter()
                .map(|c| self.push_graph(cache, repo, c, None, mounts))
                .collect();
            let sizes: Vec<u64> = futures_util::stream::iter(pushes)
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
            let content_type =
                HeaderValue::from_str(&desc.media_type).map_err(|e| UpstreamError::Registry {
                    upstream: self.spec.to_string(),
                    image: image.clone(),
                    detail: format!("media type {:?}: {e}", desc.media_type),
                })?;
            self.client
                .push_manifest_raw(&reference, doc, content_type)
                .await
                .map_err(|e| self.error(&image, e))?;
            Ok(sizes.iter().sum::<u64>() + desc.size)
        }
        .boxed()
    }

    /// One blob: nothing if the upstream has it, a mount if another repository there has
    /// it, else an upload.
    async fn push_blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        desc: &Descriptor,
        mounts: &[String],
    ) -> Result<u64, UpstreamError> {
        let image = format!("{repo}@{}", desc.digest);
        let reference = self.by_digest(repo, &desc.digest);
        // Make sure the credentials are known to the client before the first push call.
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth)
            .await;
        match self
            .client
            .pull_blob_stream_partial(&reference, &oci_descriptor(desc), 0, Some(1))
            .await
        {
            Ok(_) => return Ok(0),
            Err(OciDistributionError::ServerError { code: 416, .. }) => return Ok(0),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.error(&image, e)),
        }
        for from in mounts {
            let source = self.by_digest(from, &desc.digest);
            if self
                .client
                .mount_blob(&reference, &source, &digest_str(&desc.digest))
                .await
                .is_ok()
            {
                return Ok(0);
            }
        }
        let path = cache.blob_path(&desc.digest);
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| self.cache_error(&image, CacheError::Io { path, source: e }))?;
        self.client
            .push_blob(&reference, &data, &digest_str(&desc.digest))
            .await
            .map_err(|e| self.error(&image, e))?;
        Ok(desc.size)
    }
}

fn oci_descriptor(desc: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: digest_str(&desc.digest),
        size: i64::try_from(desc.size).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    }
}

/// Whether the registry said the name or blob does not exist.
fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
            matches!(
                x.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
            )
        }),
        OciDistributionError::RequestError(r) => r.status().is_some_and(|s| s.as_u16() == 404),
        _ => false,
    }
}

/// The innermost cause of a request error ("Connection refused (os error 111)"), which
/// says more than reqwest's "error sending request for url".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
