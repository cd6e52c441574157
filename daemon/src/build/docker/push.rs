//! Export: the engine pushes the built image to a registry on loopback (kilnd's own; the
//! engine talks plain HTTP to loopback registries), then kiln removes the local tag so
//! nothing is left behind, and reads the pushed manifest back from that registry.
//!
//! Only missing blobs travel: the engine asks the registry for each layer first and
//! reports "Layer already exists" for those it skips; [`PushStats`] counts both.

use bollard::Docker;
use bollard::query_parameters::{PushImageOptions, RemoveImageOptions};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_shared::digest::Digest;
use sha2::{Digest as _, Sha256};

use crate::oci::{DOCKER_MANIFEST, Descriptor, OCI_INDEX, OCI_MANIFEST};

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Layers the engine uploaded.
    pub pushed: usize,
    /// Layers the registry already had.
    pub existing: usize,
    /// The manifest the engine pushed, from its final message
    /// (`<tag>: digest: sha256:... size: N`); the engine (20.10) always pushes a Docker
    /// v2 schema 2 manifest.
    pub manifest: Option<Descriptor>,
}

/// Reads the engine's last push message, `<tag>: digest: sha256:<hex> size: <n>`.
fn parse_pushed(status: &str, tag: &str) -> Option<Descriptor> {
    let rest = status.strip_prefix(tag)?.strip_prefix(": digest: ")?;
    let (digest, size) = rest.split_once(" size: ")?;
    Some(Descriptor::new(
        DOCKER_MANIFEST,
        digest.parse().ok()?,
        size.trim().parse().ok()?,
    ))
}

/// Why a push failed.
#[derive(Debug)]
pub(crate) enum PushError {
    /// The engine reported an error (the registry refused, could not be reached, ...).
    Engine(String),
    /// The connection to the engine itself failed.
    Connection(String),
}

/// Pushes `repo:tag` (where `repo` starts with the registry's `host:port/`). Progress
/// lines go to `status`.
pub(crate) async fn push(
    docker: &Docker,
    repo: &str,
    tag: &str,
    status: &mut (dyn FnMut(String) + Send),
) -> Result<PushStats, PushError> {
    let options = PushImageOptions {
        tag: Some(tag.to_owned()),
        platform: None,
    };
    let mut stream = docker.push_image(repo, Some(options), None);
    let mut stats = PushStats::default();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { message, .. }
            | bollard::errors::Error::DockerStreamError { error: message } => {
                PushError::Engine(message)
            }
            other => PushError::Connection(kiln_shared::error::chain(&other)),
        })?;
        if let Some(e) = info.error_detail.and_then(|d| d.message).or(info.error) {
            return Err(PushError::Engine(e));
        }
        let Some(s) = info.status else { continue };
        // Per-layer progress ("Pushing" with a byte count) is noise in a log.
        if s == "Pushing" || s == "Preparing" || s == "Waiting" {
            continue;
        }
        // The engine reports each layer once as "Pushed" or "Layer already exists".
        match s.as_str() {
            "Pushed" => stats.pushed += 1,
            "Layer already exists" => stats.existing += 1,
            _ => {
                if let Some(d) = parse_pushed(&s, tag) {
                    stats.manifest = Some(d);
                }
            }
        }
        status(s);
    }
    Ok(stats)
}

/// Removes the local image `reference` (the tag kiln built), pruning what only it used.
/// A reference that is already gone is fine.
pub(crate) async fn remove_local(
    docker: &Docker,
    reference: &str,
) -> Result<(), bollard::errors::Error> {
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
    };
    match docker.remove_image(reference, Some(options), None).await {
        Ok(_) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why the pushed manifest could not be read back from the registry.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("GET {uri}")]
    Request {
        uri: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("GET {uri}")]
    Connect {
        uri: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("GET {uri}")]
    Body {
        uri: String,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {uri}: {status}: {body}")]
    Status {
        uri: String,
        status: hyper::StatusCode,
        /// The start of the registry's answer (its OCI error JSON).
        body: String,
    },
    #[error(
        "GET {uri}: the registry says the manifest is {claimed} but its bytes hash to {digest}"
    )]
    DigestMismatch {
        uri: String,
        claimed: String,
        digest: Digest,
    },
}

/// Reads the manifest `repo:tag` from the registry at `registry` (`host:port`, plain
/// HTTP) and describes it: media type, digest of the exact bytes, size. If the registry
/// sends `Docker-Content-Digest`, it must agree.
pub async fn fetch_manifest(
    registry: &str,
    repo: &str,
    tag: &str,
) -> Result<Descriptor, ManifestError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{registry}/v2/{repo}/manifests/{tag}");
    let req = hyper::Request::get(&uri)
        .header(
            hyper::header::ACCEPT,
            format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}, {OCI_INDEX}"),
        )
        .body(Empty::new())
        .map_err(|source| ManifestError::Request {
            uri: uri.clone(),
            source,
        })?;
    let resp = client
        .request(req)
        .await
        .map_err(|source| ManifestError::Connect {
            uri: uri.clone(),
            source,
        })?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    let claimed = header("docker-content-digest");
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ManifestError::Body {
            uri: uri.clone(),
            source,
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(ManifestError::Status {
            uri,
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
        });
    }
    let digest = Digest::from_sha256_bytes(&Sha256::digest(&body).into());
    if let Some(claimed) = claimed {
        if claimed != digest.to_string() {
            return Err(ManifestError::DigestMismatch {
                uri,
                claimed,
                digest,
            });
        }
    }
    let media_type = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
        .or(content_type)
        .unwrap_or_else(|| DOCKER_MANIFEST.to_owned());
    Ok(Descriptor::new(media_type, digest, body.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pushed_digest() {
        let d = parse_pushed(
            "t1-arm64: digest: sha256:65a707faae850851664e0e9a550d0d98a6b6a3c0b10be857db04047bf22e5f49 size: 734",
            "t1-arm64",
        )
        .unwrap();
        assert_eq!(d.media_type, DOCKER_MANIFEST);
        assert_eq!(d.size, 734);
        assert_eq!(
            d.digest.hex(),
            "65a707faae850851664e0e9a550d0d98a6b6a3c0b10be857db04047bf22e5f49"
        );
        assert!(parse_pushed("other: digest: sha256:00 size: 1", "t1-arm64").is_none());
        assert!(parse_pushed("t1-arm64: digest: nonsense size: 1", "t1-arm64").is_none());
    }
}
