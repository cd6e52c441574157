//! Referrers: the artifacts (signatures, SBOMs) whose `subject` is a manifest.

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use kiln_shared::digest::Digest;

use super::*;
use crate::registry::body::RegBody;
use crate::registry::error::OciError;
use crate::registry::service::Service;
use serde_json::json;

impl Service {
    pub(in crate::registry) async fn referrers(
        &self,
        subject: &Digest,
        q: Option<&str>,
    ) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let filter = query::param(q, "artifactType");
        let list = view
            .referrers
            .get(subject)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let manifests: Vec<serde_json::Value> = list
            .iter()
            .filter(|r| {
                filter
                    .as_deref()
                    .is_none_or(|f| r.artifact_type.as_deref() == Some(f))
            })
            .map(|r| {
                let mut d = json!({
                    "mediaType": r.media_type,
                    "digest": r.digest.to_string(),
                    "size": r.size,
                });
                if let Some(at) = &r.artifact_type {
                    d["artifactType"] = json!(at);
                }
                if !r.annotations.is_empty() {
                    d["annotations"] = json!(r.annotations);
                }
                d
            })
            .collect();
        let body = json!({
            "schemaVersion": 2,
            "mediaType": crate::registry::accept::OCI_INDEX,
            "manifests": manifests,
        });
        let mut r = Response::new(RegBody::full(Bytes::from(body.to_string())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::registry::accept::OCI_INDEX),
        );
        if filter.is_some() {
            r.headers_mut().insert(
                "oci-filters-applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        Ok(r)
    }
}
