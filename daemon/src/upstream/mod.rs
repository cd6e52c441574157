//! Upstreams: the registries beyond localhost that kiln reads targets and base images
//! from, and pushes what it builds to (a team cache, Docker Hub, GHCR, Harbor, zot...).
//!
//! The wire protocol is the `oci-client` crate's (but for plain reads of an upstream that
//! asks for no credentials: see [`remote`]); what is here is kiln's part: which
//! upstream to ask for what name (a workspace target `org/image:tag` is
//! `PREFIX/org/image:tag` on each upstream in turn; `alpine` is `docker.io/library/alpine`
//! on Docker Hub, whose API host is `registry-1.docker.io`, or on a mirror), credentials
//! from where users keep them ([`auth`]), copying an image's graph into the cache with
//! every digest and size verified and pushing one from it with only the missing blobs
//! ([`remote`]), and the up/down state of each upstream, so that one that cannot be
//! reached costs a short timeout and is then skipped until a retry ([`health`]).
//!
//! Documents are copied bit for bit: a manifest keeps its bytes, digest and media type.

mod auth;
mod health;
mod remote;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kiln_shared::digest::Digest;
use kiln_shared::protocol::UpstreamInfo;
use kiln_shared::reference::{ImageRef, RepoName};
use oci_client::Reference;

use crate::cache::{BlobSource, Cache, CacheError, OnDemand};
use crate::oci::{Descriptor, ImageIndex, Platform, is_index};

pub use auth::{AuthError, AuthFiles};
pub use remote::Remote;

/// Docker Hub's name in references, and the host that serves its registry API.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// How long connecting to an upstream may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong talking to an upstream. Messages name the upstream and the image and
/// never carry credentials.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0:?} is invalid: give REGISTRY[/PREFIX], e.g. registry.example:5000/team")]
    Spec(String),
    #[error("upstream {upstream}: CA file {path}: {message}")]
    CaFile {
        upstream: String,
        path: PathBuf,
        message: String,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("upstream {upstream}: cannot set up its client: {detail}")]
    Client { upstream: String, detail: String },
    #[error("image name {name:?} is invalid: {message}")]
    Name { name: String, message: String },
    #[error(
        "upstream {upstream} refused the credentials for {image} ({detail}); check `docker login {upstream}` or the auth file"
    )]
    Unauthorized {
        upstream: String,
        image: String,
        detail: String,
    },
    #[error("upstream {upstream} cannot be reached ({detail}); retrying in {}s", retry.as_secs())]
    Unreachable {
        upstream: String,
        detail: String,
        retry: Duration,
    },
    #[error("upstream {upstream} is down ({detail}); next try in {}s", retry.as_secs())]
    Down {
        upstream: String,
        detail: String,
        retry: Duration,
    },
    #[error("upstream {upstream}, {image}: {detail}")]
    Registry {
        upstream: String,
        image: String,
        detail: String,
    },
    #[error("upstream {upstream}, {image}: {source}")]
    Cache {
        upstream: String,
        image: String,
        #[source]
        source: CacheError,
    },
    #[error("{image} is not in any upstream (asked {asked})")]
    NotFound { image: String, asked: String },
}

/// One upstream as configured: `REGISTRY[/PREFIX]` plus its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// `host[:port]` as users write it (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository prefix: `org/image` is `PREFIX/org/image` there.
    pub prefix: Option<String>,
    /// Plain HTTP (the default for loopback registries, as docker does).
    pub insecure: bool,
    /// Extra CA certificate (PEM) to trust for this upstream.
    pub ca_file: Option<PathBuf>,
    /// Push what kiln builds there.
    pub push: bool,
    /// A mirror of Docker Hub: asked for `docker.io` images only, never pushed to.
    pub mirror: bool,
}

impl FromStr for UpstreamSpec {
    type Err = UpstreamError;

    /// `REGISTRY[/PREFIX]`, with `http://` or `https://` allowed in front to force the
    /// scheme.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UpstreamError::Spec(s.to_owned());
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
            Some(_) => return Err(bad()),
            None => (None, s),
        };
        let rest = rest.trim_end_matches('/');
        let (registry, prefix) = match rest.split_once('/') {
            Some((r, p)) => (r, Some(p)),
            None => (rest, None),
        };
        let host_ok = !registry.is_empty()
            && registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
        if !host_ok {
            return Err(bad());
        }
        if let Some(p) = prefix
            && p.parse::<RepoName>().is_err()
        {
            return Err(bad());
        }
        Ok(UpstreamSpec {
            registry: registry.to_owned(),
            prefix: prefix.map(str::to_owned),
            insecure: match scheme {
                Some("http") => true,
                Some(_) => false,
                None => is_loopback(registry),
            },
            ca_file: None,
            push: false,
            mirror: false,
        })
    }
}

impl std::fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            Some(p) => write!(f, "{}/{p}", self.registry),
            None => f.write_str(&self.registry),
        }
    }
}

/// Whether `host[:port]` names this machine (docker talks plain HTTP to those).
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host that serves `registry`'s API (`docker.io` is `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    match registry {
        DOCKER_HUB | "index.docker.io" => DOCKER_HUB_API,
        r => r,
    }
}

/// An image name as docker reads it: `alpine` is `docker.io/library/alpine:latest`,
/// `ghcr.io/o/i@sha256:...` keeps its registry and digest.
pub fn parse_image(name: &str) -> Result<Reference, UpstreamError> {
    name.parse::<Reference>().map_err(|e| UpstreamError::Name {
        name: name.to_owned(),
        message: e.to_string(),
    })
}

/// The name an image from an upstream gets in the cache's `index.json`: its full
/// reference (`docker.io/library/alpine:3.20`, `ghcr.io/o/i@sha256:...`), which is what
/// the builders look up for a `FROM`.
pub fn cache_name(image: &Reference) -> String {
    let base = format!("{}/{}", image.registry(), image.repository());
    match (image.tag(), image.digest()) {
        (_, Some(d)) => format!("{base}@{d}"),
        (Some(t), None) => format!("{base}:{t}"),
        (None, None) => format!("{base}:latest"),
    }
}

/// What a fetch brought into the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The upstream it came from (`registry[/prefix]`).
    pub upstream: String,
    /// The image's top descriptor (an index or a manifest), as the upstream has it.
    pub desc: Descriptor,
    /// Bytes that were not in the cache before.
    pub bytes: u64,
    pub elapsed: Duration,
}

/// What the upstream holds of a package's tag, now in the cache with all it reaches (or,
/// lazily, with what it reaches recorded on demand).
#[derive(Debug, Clone)]
pub struct FetchedPackage {
    /// The upstream it came from (`registry[/prefix]`).
    pub upstream: String,
    /// The multi-arch index `tag`, as the upstream has it, when it has one (every
    /// manifest it lists is in the cache too, or on demand).
    pub index: Option<Descriptor>,
    /// Each wanted arch it has: the arch suffix and the manifest's descriptor with its
    /// platform (the index's entry verbatim, when there is an index).
    pub archs: Vec<(String, Descriptor)>,
    /// Bytes that were not in the cache before.
    pub bytes: u64,
    /// What a lazy fetch left upstream (manifests, configs, layers), to record before the
    /// index names them (see `cache::ondemand`).
    pub on_demand: Vec<(Digest, OnDemand)>,
    pub elapsed: Duration,
}

/// What a push sent.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub upstream: String,
    /// The references written (`org/image:tag-<arch>`, `org/image:tag`).
    pub references: Vec<String>,
    /// Bytes uploaded (blobs the upstream lacked).
    pub bytes: u64,
    pub elapsed: Duration,
}

/// The configured upstreams, in the order they are asked.
#[derive(Debug)]
pub struct Upstreams {
    remotes: Vec<Arc<Remote>>,
    /// For registries met in image names (not configured as upstreams).
    auth: AuthFiles,
}

impl Upstreams {
    /// Sets up a client per upstream (its CA, its credentials). Docker Hub is always
    /// asked last for `docker.io` images, unless it is configured already.
    pub fn new(specs: &[UpstreamSpec], auth: &AuthFiles) -> Result<Upstreams, UpstreamError> {
        let mut remotes = specs
            .iter()
            .map(|s| Remote::new(s.clone(), auth).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if !remotes
            .iter()
            .any(|r| api_host(&r.spec().registry) == DOCKER_HUB_API && r.spec().prefix.is_none())
        {
            let hub = UpstreamSpec {
                registry: DOCKER_HUB.to_owned(),
                prefix: None,
                insecure: false,
                ca_file: None,
                push: false,
                mirror: true,
            };
            remotes.push(Arc::new(Remote::new(hub, auth)?));
        }
        Ok(Upstreams {
            remotes,
            auth: auth.clone(),
        })
    }

    /// Upstreams that hold workspace targets (not the Docker Hub mirrors).
    fn target_sources(&self) -> impl Iterator<Item = &Arc<Remote>> {
        self.remotes.iter().filter(|r| !r.spec().mirror)
    }

    /// Builds the clients that fetching workspace targets will use (each loads the
    /// system's CA certificates); a failure is left for the first fetch to report.
    pub async fn warm(self: Arc<Self>) {
        futures_util::future::join_all(self.target_sources().map(|r| r.warm())).await;
    }

    /// Whether any upstream holds workspace targets.
    pub fn has_target_sources(&self) -> bool {
        self.target_sources().next().is_some()
    }

    /// Whether any upstream takes pushes.
    pub fn pushes(&self) -> bool {
        self.remotes
            .iter()
            .any(|r| r.spec().push && !r.spec().mirror)
    }

    /// Each upstream's state, for the dashboard and `kiln status`.
    pub fn info(&self) -> Vec<UpstreamInfo> {
        self.remotes.iter().map(|r| r.info()).collect()
    }

    /// Fetches a workspace package's tag (`org/image:tag`) from the first upstream that
    /// has it, whole: the index `tag` with every manifest it lists (taken verbatim, so
    /// the cache then holds the upstream's index bit for bit), and for each wanted arch
    /// (suffix and platform) the index lacks, the manifest `tag-<arch>`. Only missing
    /// blobs are copied; `lazy`, configs and layers are left upstream, on demand. `None`
    /// when no reachable upstream has any wanted arch. Upstreams that are down are
    /// skipped; errors of the others are returned after trying the rest.
    pub async fn fetch_package(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        archs: &[(String, Platform)],
        lazy: bool,
    ) -> Result<Option<FetchedPackage>, UpstreamError> {
        let mut first_error = None;
        for remote in self.target_sources() {
            match remote.fetch_package(cache, image, archs, lazy).await {
                Ok(Some(found)) => return Ok(Some(found)),
                Ok(None) | Err(UpstreamError::Down { .. }) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Pushes every architecture of a target that the cache holds (`tag-<arch>` each,
    /// then the index as `tag`) to every upstream with `push`. `mount_from` names
    /// repositories (other packages, e.g. the bases this one is built on) whose blobs an
    /// upstream may mount instead of receiving them again.
    pub async fn push_target(
        &self,
        cache: &Arc<Cache>,
        image: &ImageRef,
        mount_from: &[RepoName],
    ) -> Vec<(String, Result<Pushed, UpstreamError>)> {
        let mut out = Vec::new();
        for remote in self
            .remotes
            .iter()
            .filter(|r| r.spec().push && !r.spec().mirror)
        {
            let result = remote.push_target(cache, image, mount_from).await;
            out.push((remote.spec().to_string(), result));
        }
        out
    }

    /// Fetches any image (`alpine:3.20`, `ghcr.io/o/i@sha256:...`) into the cache, whole
    /// (every platform of an index), and names it [`cache_name`]. A `docker.io` image is
    /// asked of the upstreams in order (the mirrors with `library/` names as they are,
    /// team upstreams under their prefix), then of Docker Hub; an image of another
    /// registry is asked of that registry (with the settings of an upstream configured
    /// for it, if any).
    pub async fn fetch_image(
        &self,
        cache: &Arc<Cache>,
        name: &str,
    ) -> Result<Fetched, UpstreamError> {
        let image = parse_image(name)?;
        let mut asked = Vec::new();
        let mut first_error = None;
        let candidates: Vec<Arc<Remote>> = if image.registry() == DOCKER_HUB {
            self.remotes.clone()
        } else {
            let own = self
                .remotes
                .iter()
                .find(|r| r.spec().registry == image.registry() && r.spec().prefix.is_none())
                .cloned();
            match own {
                Some(r) => vec![r],
                None => {
                    let mut spec: UpstreamSpec = image.registry().parse()?;
                    spec.mirror = true;
                    vec![Arc::new(Remote::new(spec, &self.auth)?)]
                }
            }
        };
        for remote in candidates {
            asked.push(remote.spec().to_string());
            match remote.fetch_image(cache, &image).await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| UpstreamError::NotFound {
            image: cache_name(&image),
            asked: asked.join(", "),
        }))
    }
}

/// Blobs on demand come from the upstream that named them, by its configured name.
impl BlobSource for Upstreams {
    fn fetch<'a>(
        &'a self,
        cache: &'a Arc<Cache>,
        digest: &'a Digest,
        from: &'a OnDemand,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some(remote) = self
                .target_sources()
                .find(|r| r.spec().to_string() == from.upstream)
            else {
                return Err(format!(
                    "kilnd is not configured with upstream {} any more",
                    from.upstream
                ));
            };
            remote
                .fetch_on_demand(cache, digest, from)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// The index of `desc` in the cache, parsed (for picking a platform's entry).
fn read_index(cache: &Cache, desc: &Descriptor) -> Result<Option<ImageIndex>, CacheError> {
    if !is_index(&desc.media_type) {
        return Ok(None);
    }
    let bytes = cache.read_blob(&desc.digest, crate::cache::MANIFEST_LIMIT)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| CacheError::Json {
            path: cache.blob_path(&desc.digest),
            source,
        })
}

/// A digest as `oci-client` takes it.
fn digest_str(d: &Digest) -> String {
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_registry_and_prefix() {
        let s: UpstreamSpec = "registry.example:5000/team".parse().unwrap();
        assert_eq!(s.registry, "registry.example:5000");
        assert_eq!(s.prefix.as_deref(), Some("team"));
        assert!(!s.insecure);
        let s: UpstreamSpec = "127.0.0.1:5001".parse().unwrap();
        assert!(s.insecure && s.prefix.is_none());
        let s: UpstreamSpec = "localhost:5001/a/b".parse().unwrap();
        assert!(s.insecure);
        assert_eq!(s.to_string(), "localhost:5001/a/b");
        let s: UpstreamSpec = "http://box:5000".parse().unwrap();
        assert!(s.insecure);
        let s: UpstreamSpec = "https://[::1]:5000".parse().unwrap();
        assert!(!s.insecure);
        for bad in ["", "ftp://x", "reg/UPPER", "a b", "/x"] {
            assert!(bad.parse::<UpstreamSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_hub_conventions() {
        let r = parse_image("alpine").unwrap();
        assert_eq!(cache_name(&r), "docker.io/library/alpine:latest");
        let r = parse_image("alpine:3.20").unwrap();
        assert_eq!(cache_name(&r), "docker.io/library/alpine:3.20");
        let r = parse_image("linuxkit/init:abc").unwrap();
        assert_eq!(cache_name(&r), "docker.io/linuxkit/init:abc");
        let r = parse_image("127.0.0.1:5001/kiln/busybox:latest").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5001");
        assert_eq!(cache_name(&r), "127.0.0.1:5001/kiln/busybox:latest");
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("ghcr.io"), "ghcr.io");
        assert!(is_loopback("localhost:5000") && is_loopback("[::1]:5000"));
        assert!(is_loopback("127.0.0.2") && !is_loopback("registry.example:5000"));
    }
}
