//! One upstream registry through the `oci-client` crate: its client (one per upstream,
//! so tokens and connections are reused), credentials and health, and the one call
//! every read starts with, a manifest by tag or digest. Copying an image's graph into the
//! cache is [`fetch`]'s, pushing one from the cache is [`push`]'s.
//!
//! Clients are built at first use, not when kilnd starts: each one is a TLS context, for
//! which OpenSSL parses the system's whole CA bundle (twice, through native-tls), about
//! 100 ms of CPU; Docker Hub's is then built only when a `docker.io` image is needed.
//!
//! Three pieces are written here because `oci-client` 0.15 has no call for them:
//! - reads without credentials ([`plain`]): its token cache holds only tokens, so a
//!   client holding any auth, even anonymous, sends `GET /v2/` before every request to a
//!   registry that asks for none (`get_auth_token` in its client.rs finds no token and
//!   authenticates again), which doubles the requests of a fetch. An upstream with no
//!   credentials is read with plain GETs until it answers 401; from then on (Docker Hub,
//!   which wants a token even for anonymous pulls) `oci-client`'s token flow takes over,
//!   one probe and token per repository, kept while the token is valid;
//! - it has no blob HEAD, so whether the upstream has a blob is asked with a ranged GET
//!   of its first byte (`Range: bytes=0-0`, through the client's own authentication): a
//!   404 means missing; a registry that ignores Range answers 200 and the body is
//!   dropped unread;
//! - its blob push takes the blob in memory (`push_blob(&[u8])`), so a blob is read from
//!   the cache whole before it is pushed.
//!
//! Streaming a blob with verification is the crate's (`pull_blob_stream` checks the
//! digest) or, for plain reads, the cache's blob writer's, which checks digest and size
//! before the blob becomes visible, so nothing unverified ever lands.

mod fetch;
mod plain;
mod push;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_shared::digest::Digest;
use kiln_shared::protocol::UpstreamInfo;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, watch};

use super::health::Tracker;
use super::{AuthFiles, CONNECT_TIMEOUT, UpstreamError, UpstreamSpec, api_host, digest_str};
use crate::cache::CacheError;
use crate::oci::{AnyManifest, Descriptor, OCI_INDEX, OCI_MANIFEST};

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

const USER_AGENT: &str = concat!("kiln/", env!("CARGO_PKG_VERSION"));

/// An upstream with its clients, credentials and health.
pub struct Remote {
    spec: UpstreamSpec,
    host: String,
    /// The CA certificate the spec names (PEM), read and checked when kilnd starts.
    ca: Option<Vec<u8>>,
    /// `oci-client`'s, built at first use.
    client: OnceCell<Client>,
    /// Plain reads while [`Remote::open`]: built at first use.
    plain: OnceCell<reqwest::Client>,
    /// Blobs being copied from this upstream, each with a receiver that wakes when the
    /// copy's sender is dropped ([`Remote::copy_blob`] copies a blob once however many
    /// ask at once).
    copying: Mutex<HashMap<Digest, watch::Receiver<()>>>,
    /// One push of an image at a time (see [`Remote::push_target`]): the gate of each
    /// image being pushed.
    pushing: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// The registry answered 401 to a request without credentials: from then on every
    /// request goes through `oci-client`'s token flow.
    challenged: AtomicBool,
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
        let ca = match &spec.ca_file {
            Some(path) => {
                let ca_error = |message: String| UpstreamError::CaFile {
                    upstream: spec.to_string(),
                    path: path.clone(),
                    message,
                };
                let data = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
                // Checked now (one certificate: cheap), so a bad file stops kilnd's start.
                reqwest::Certificate::from_pem(&data).map_err(|e| ca_error(e.to_string()))?;
                Some(data)
            }
            None => None,
        };
        let auth = auth.credentials_for(&spec.registry)?;
        Ok(Remote {
            host: api_host(&spec.registry).to_owned(),
            spec,
            ca,
            client: OnceCell::new(),
            plain: OnceCell::new(),
            copying: Mutex::default(),
            pushing: Mutex::default(),
            challenged: AtomicBool::new(false),
            auth,
            health: Tracker::default(),
        })
    }

    /// Whether requests go out without credentials: none are configured and the
    /// registry has not asked for any.
    fn open(&self) -> bool {
        matches!(self.auth, RegistryAuth::Anonymous) && !self.challenged.load(Ordering::Relaxed)
    }

    /// Builds the client reads will go through now (see [`super::Upstreams::warm`]).
    pub async fn warm(&self) {
        let built = if self.open() {
            self.plain().await.map(drop)
        } else {
            self.client().await.map(drop)
        };
        if let Err(e) = built {
            tracing::debug!("{e}");
        }
    }

    /// Runs `op`, and once more through the token flow if the registry refused it
    /// without credentials (as Docker Hub does until the client fetches a token).
    async fn challenged_once<T, F, Fut>(&self, op: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let was_open = self.open();
        match op().await {
            Err(UpstreamError::Unauthorized { .. }) if was_open => {
                tracing::debug!(upstream = %self.spec, "the upstream wants a token: asking for one");
                self.challenged.store(true, Ordering::Relaxed);
                op().await
            }
            other => other,
        }
    }

    /// `oci-client`'s client, built at first use (on a blocking thread: it loads the
    /// system's CA certificates), holding the credentials unless the upstream is
    /// [`open`](Remote::open).
    async fn client(&self) -> Result<&Client, UpstreamError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let config = ClientConfig {
                    protocol: if self.spec.insecure {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    extra_root_certificates: self
                        .ca
                        .iter()
                        .map(|data| Certificate {
                            encoding: CertificateEncoding::Pem,
                            data: data.clone(),
                        })
                        .collect(),
                    connect_timeout: Some(CONNECT_TIMEOUT),
                    read_timeout: Some(READ_TIMEOUT),
                    use_monolithic_push: true,
                    platform_resolver: None,
                    user_agent: USER_AGENT,
                    ..ClientConfig::default()
                };
                let built = tokio::task::spawn_blocking(move || Client::try_from(config)).await;
                match built {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(self.setup_error(e.to_string())),
                    Err(e) => Err(self.setup_error(e.to_string())),
                }
            })
            .await?;
        if !self.open() {
            client.store_auth_if_needed(&self.host, &self.auth).await;
        }
        Ok(client)
    }

    fn setup_error(&self, detail: String) -> UpstreamError {
        UpstreamError::Client {
            upstream: self.spec.to_string(),
            detail,
        }
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
        let unauthorized = unauthorized(&e);
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

    /// A blob's bytes as a stream: a plain GET while the upstream is
    /// [`open`](Remote::open), else through `oci-client` (which checks the digest too).
    async fn blob_stream(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
    ) -> Result<oci_client::client::SizedStream, UpstreamError> {
        let got = if self.open() {
            plain::blob(self.plain().await?, &self.spec, reference, &layer.digest).await
        } else {
            self.client()
                .await?
                .pull_blob_stream(reference, layer)
                .await
        };
        got.map_err(|e| self.error(&reference.whole(), e))
    }

    /// The digest of the manifest `reference` names (a HEAD), or the client's error.
    async fn manifest_digest(
        &self,
        reference: &Reference,
    ) -> Result<Result<String, OciDistributionError>, UpstreamError> {
        Ok(if self.open() {
            plain::manifest_digest(self.plain().await?, &self.spec, reference, ACCEPT).await
        } else {
            self.client()
                .await?
                .fetch_manifest_digest(reference, &self.auth)
                .await
        })
    }

    /// The client of plain reads, built at first use.
    async fn plain(&self) -> Result<&reqwest::Client, UpstreamError> {
        self.plain
            .get_or_try_init(|| async {
                let ca = self.ca.clone();
                let built = tokio::task::spawn_blocking(move || {
                    plain::client(ca.as_deref(), CONNECT_TIMEOUT, READ_TIMEOUT)
                })
                .await;
                match built {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(self.setup_error(e.to_string())),
                    Err(e) => Err(self.setup_error(e.to_string())),
                }
            })
            .await
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
        let got = if self.open() {
            plain::manifest(self.plain().await?, &self.spec, reference, ACCEPT).await
        } else {
            self.client()
                .await?
                .pull_manifest_raw(reference, &self.auth, ACCEPT)
                .await
                .map(|(bytes, _)| bytes)
        };
        match got {
            Ok(bytes) => {
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
}

fn oci_descriptor(desc: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: digest_str(&desc.digest),
        size: i64::try_from(desc.size).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    }
}

/// Whether the registry refused the credentials (or their absence).
fn unauthorized(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::ServerError { code, .. } => matches!(code, 401 | 403),
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        _ => false,
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
