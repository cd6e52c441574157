//! Reads from an upstream that asks for no credentials, one request each: a manifest
//! (GET, or HEAD for its digest) and a blob (GET, streamed). `oci-client` would send
//! `GET /v2/` before each of them (see [`super`]); these requests go out alone, on a
//! reqwest client of their own, and answer with `oci-client`'s errors so that one
//! classification ([`super::not_found`], [`super::unauthorized`]) serves both paths. A
//! 401 here hands the upstream to `oci-client`'s token flow.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::Reference;
use oci_client::client::SizedStream;
use oci_client::errors::{OciDistributionError, OciEnvelope};
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use sha2::{Digest as _, Sha256};

use super::USER_AGENT;
use crate::cache::MANIFEST_LIMIT;
use crate::upstream::UpstreamSpec;

/// The client: the timeouts of `oci-client`'s, and `ca` trusted besides the system's.
pub(super) fn client(
    ca: Option<&[u8]>,
    connect: Duration,
    read: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(read)
        .user_agent(USER_AGENT);
    if let Some(pem) = ca {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
    }
    builder.build()
}

/// `scheme://host/v2/repo/KIND/reference`, as `oci-client` writes it.
fn url(spec: &UpstreamSpec, reference: &Reference, kind: &str, at: &str) -> String {
    let scheme = if spec.insecure { "http" } else { "https" };
    format!(
        "{scheme}://{}/v2/{}/{kind}/{at}",
        reference.resolve_registry(),
        reference.repository()
    )
}

fn manifest_url(spec: &UpstreamSpec, reference: &Reference) -> String {
    let at = reference.digest().or(reference.tag()).unwrap_or("latest");
    url(spec, reference, "manifests", at)
}

/// A manifest's bytes (at most the cache's manifest limit).
pub(super) async fn manifest(
    http: &reqwest::Client,
    spec: &UpstreamSpec,
    reference: &Reference,
    accept: &[&str],
) -> Result<Vec<u8>, OciDistributionError> {
    let url = manifest_url(spec, reference);
    let res = http
        .get(&url)
        .header(ACCEPT, accept.join(", "))
        .send()
        .await?;
    let status = res.status();
    if res.content_length().is_some_and(|n| n > MANIFEST_LIMIT) {
        return Err(too_big(&url));
    }
    let mut body = Vec::new();
    let mut chunks = res.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk?);
        if body.len() as u64 > MANIFEST_LIMIT {
            return Err(too_big(&url));
        }
    }
    match status {
        StatusCode::OK => Ok(body),
        s => Err(status_error(s, &body, &url)),
    }
}

/// The digest of the manifest `reference` names: HEAD, and GET if the registry sends
/// no `Docker-Content-Digest`.
pub(super) async fn manifest_digest(
    http: &reqwest::Client,
    spec: &UpstreamSpec,
    reference: &Reference,
    accept: &[&str],
) -> Result<String, OciDistributionError> {
    let url = manifest_url(spec, reference);
    let res = http
        .head(&url)
        .header(ACCEPT, accept.join(", "))
        .send()
        .await?;
    match res.status() {
        StatusCode::OK => {}
        s => return Err(status_error(s, &[], &url)),
    }
    if let Some(d) = res
        .headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
    {
        return Ok(d.to_owned());
    }
    let body = manifest(http, spec, reference, accept).await?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&body))))
}

/// A blob's bytes, streamed (the cache's blob writer checks digest and size).
pub(super) async fn blob(
    http: &reqwest::Client,
    spec: &UpstreamSpec,
    reference: &Reference,
    digest: &str,
) -> Result<SizedStream, OciDistributionError> {
    let url = url(spec, reference, "blobs", digest);
    let res = http.get(&url).send().await?;
    let status = res.status();
    if status != StatusCode::OK {
        let body = res.bytes().await.unwrap_or_default();
        return Err(status_error(status, &body, &url));
    }
    Ok(SizedStream {
        content_length: res.content_length(),
        digest_header_value: None,
        stream: res.bytes_stream().map_err(std::io::Error::other).boxed(),
    })
}

fn too_big(url: &str) -> OciDistributionError {
    OciDistributionError::SpecViolationError(format!(
        "{url}: the manifest is larger than {MANIFEST_LIMIT} bytes"
    ))
}

/// A status other than 200 as `oci-client` reports it: 401 as unauthorized, a client
/// error with the registry's error envelope when it sent one, else the status and body.
fn status_error(status: StatusCode, body: &[u8], url: &str) -> OciDistributionError {
    if status == StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError {
            url: url.to_owned(),
        };
    }
    if status.is_client_error()
        && let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(body)
    {
        return OciDistributionError::RegistryError {
            envelope,
            url: url.to_owned(),
        };
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url: url.to_owned(),
        message: String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::remote::{not_found, unauthorized};

    #[test]
    fn statuses_classify_as_oci_client_reports_them() {
        let unknown = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert!(not_found(&status_error(
            StatusCode::NOT_FOUND,
            unknown,
            "u"
        )));
        assert!(not_found(&status_error(StatusCode::NOT_FOUND, b"", "u")));
        assert!(unauthorized(&status_error(
            StatusCode::UNAUTHORIZED,
            b"",
            "u"
        )));
        let denied = br#"{"errors":[{"code":"DENIED","message":"no"}]}"#;
        assert!(unauthorized(&status_error(
            StatusCode::FORBIDDEN,
            denied,
            "u"
        )));
        let e = status_error(StatusCode::INTERNAL_SERVER_ERROR, b"boom", "u");
        assert!(!not_found(&e) && !unauthorized(&e));
        assert!(e.to_string().contains("boom"));
    }

    #[test]
    fn urls_follow_the_distribution_spec() {
        let spec: UpstreamSpec = "127.0.0.1:5000".parse().unwrap();
        let r = Reference::with_tag("127.0.0.1:5000".into(), "a/b".into(), "t".into());
        assert_eq!(
            manifest_url(&spec, &r),
            "http://127.0.0.1:5000/v2/a/b/manifests/t"
        );
        let d = format!("sha256:{}", "0".repeat(64));
        let r = Reference::with_digest("reg.example".into(), "a/b".into(), d.clone());
        let spec: UpstreamSpec = "reg.example".parse().unwrap();
        assert_eq!(
            manifest_url(&spec, &r),
            format!("https://reg.example/v2/a/b/manifests/{d}")
        );
        assert_eq!(
            url(&spec, &r, "blobs", &d),
            format!("https://reg.example/v2/a/b/blobs/{d}")
        );
    }
}
