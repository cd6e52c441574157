//! Reading a manifest: which of the four formats it is, that it is one (schema 2, the
//! members its format requires, well-formed digests), and what it points at (blobs,
//! child manifests with their platforms, a `subject`), for push validation, for the
//! manifest view and for the referrers API.

use std::collections::BTreeMap;

use kiln_shared::digest::Digest;
use serde::Deserialize;

use super::accept::ManifestKind;
use super::error::OciError;

/// Manifests above this size are refused, as registry:2 refuses them.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// What a manifest is and what it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    pub kind: ManifestKind,
    /// Config and layers (image manifests) that the cache must hold; layers with
    /// `urls` (foreign layers) are not required.
    pub blobs: Vec<Required>,
    /// Child manifests (indexes).
    pub children: Vec<Child>,
    pub subject: Option<Digest>,
    /// `artifactType`, else the config's media type (image manifests), for referrers.
    pub artifact_type: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

/// A blob an image manifest needs, as its descriptor says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Required {
    /// Where in the manifest: `config`, `layers[2]`.
    pub field: String,
    pub digest: Digest,
    pub size: u64,
}

/// An entry of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub os: Option<String>,
    pub architecture: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Vec<String>,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: Option<String>,
    architecture: Option<String>,
}

/// Parses and checks a manifest. `content_type`: the media type the client declared
/// (PUT) or the cache recorded, if any.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestInfo, OciError> {
    let raw: Raw = serde_json::from_slice(bytes)
        .map_err(|e| OciError::ManifestInvalid(format!("not a JSON manifest: {e}")))?;
    if raw.schema_version != Some(2) {
        return Err(OciError::ManifestInvalid(format!(
            "schemaVersion is {}, expected 2",
            raw.schema_version
                .map_or_else(|| "missing".to_owned(), |v| v.to_string())
        )));
    }
    let declared = content_type
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
        .filter(|ct| !ct.is_empty());
    let kind_of = |mt: &str| {
        ManifestKind::from_media_type(mt).ok_or_else(|| {
            OciError::ManifestInvalid(format!(
                "media type {mt:?} is not a manifest type kiln stores: use {}, {}, {} or {}",
                super::accept::OCI_MANIFEST,
                super::accept::OCI_INDEX,
                super::accept::DOCKER_MANIFEST,
                super::accept::DOCKER_LIST
            ))
        })
    };
    let kind = match (declared, raw.media_type.as_deref()) {
        (Some(d), m) => {
            let kind = kind_of(d)?;
            if let Some(m) = m
                && m != d
            {
                return Err(OciError::ManifestInvalid(format!(
                    "Content-Type {d:?} differs from the manifest's mediaType {m:?}"
                )));
            }
            kind
        }
        (None, Some(m)) => kind_of(m)?,
        (None, None) if raw.manifests.is_some() => ManifestKind::OciIndex,
        (None, None) => ManifestKind::OciManifest,
    };
    let mut info = ManifestInfo {
        kind,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: raw
            .subject
            .as_ref()
            .map(|s| digest(&s.digest, "subject"))
            .transpose()?,
        artifact_type: raw.artifact_type.clone(),
        annotations: raw.annotations,
    };
    if kind.is_index() {
        let Some(manifests) = raw.manifests else {
            return Err(OciError::ManifestInvalid(
                "an index needs a \"manifests\" list".into(),
            ));
        };
        for (i, m) in manifests.iter().enumerate() {
            let size = check_size(m, &format!("manifests[{i}]"))?;
            let d = digest(&m.digest, &format!("manifests[{i}]"))?;
            info.children.push(Child {
                digest: d,
                size,
                media_type: m.media_type.clone().unwrap_or_default(),
                os: m.platform.as_ref().and_then(|p| p.os.clone()),
                architecture: m.platform.as_ref().and_then(|p| p.architecture.clone()),
            });
        }
    } else {
        let Some(config) = raw.config else {
            return Err(OciError::ManifestInvalid(
                "an image manifest needs a \"config\" descriptor".into(),
            ));
        };
        info.blobs.push(Required {
            field: "config".into(),
            digest: digest(&config.digest, "config")?,
            size: check_size(&config, "config")?,
        });
        if info.artifact_type.is_none() {
            info.artifact_type = config.media_type.clone();
        }
        let Some(layers) = raw.layers else {
            return Err(OciError::ManifestInvalid(
                "an image manifest needs a \"layers\" list".into(),
            ));
        };
        for (i, l) in layers.iter().enumerate() {
            let field = format!("layers[{i}]");
            let size = check_size(l, &field)?;
            let digest = digest(&l.digest, &field)?;
            if l.urls.is_empty() {
                info.blobs.push(Required {
                    field,
                    digest,
                    size,
                });
            }
        }
    }
    Ok(info)
}

fn digest(s: &str, field: &str) -> Result<Digest, OciError> {
    s.parse()
        .map_err(|e| OciError::ManifestInvalid(format!("{field}: {e}")))
}

fn check_size(d: &RawDescriptor, field: &str) -> Result<u64, OciError> {
    u64::try_from(d.size)
        .map_err(|_| OciError::ManifestInvalid(format!("{field}: size {} is negative", d.size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::accept::{DOCKER_LIST, OCI_INDEX, OCI_MANIFEST};

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
              "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":2}},
              "layers":[{{"mediaType":"l","digest":"{D2}","size":3}},
                        {{"mediaType":"l","digest":"{D3}","size":3,"urls":["https://x"]}}]{extra}}}"#
        )
    }

    #[test]
    fn image_manifest() {
        let m = parse(
            image(&format!(
                r#","subject":{{"mediaType":"m","digest":"{D3}","size":1}}"#
            ))
            .as_bytes(),
            Some(OCI_MANIFEST),
        )
        .unwrap();
        assert_eq!(m.kind, ManifestKind::OciManifest);
        assert_eq!(
            m.blobs
                .iter()
                .map(|b| (b.digest.to_string(), b.size))
                .collect::<Vec<_>>(),
            [(D1.to_owned(), 2), (D2.to_owned(), 3)]
        );
        assert_eq!(m.subject, Some(D3.parse().unwrap()));
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"x","digest":"{D1}","size":5,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let m = parse(body.as_bytes(), None).unwrap();
        assert_eq!(m.kind, ManifestKind::DockerList);
        assert_eq!(m.children[0].architecture.as_deref(), Some("arm64"));
    }

    #[test]
    fn refusals() {
        let cases: Vec<(String, Option<&str>, &str)> = vec![
            ("not json".into(), None, "not a JSON"),
            (r#"{"schemaVersion":1}"#.into(), None, "schemaVersion is 1"),
            (image(""), Some(OCI_INDEX), "differs"),
            (image(""), Some("text/plain"), "not a manifest type"),
            (
                format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}"}}"#),
                None,
                "\"manifests\"",
            ),
            (
                format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#),
                None,
                "\"config\"",
            ),
            (
                image("").replace(D2, "sha256:../../etc/passwd"),
                None,
                "layers[0]",
            ),
            (
                image("").replace("\"size\":3", "\"size\":-3"),
                None,
                "negative",
            ),
        ];
        for (body, ct, want) in cases {
            let err = parse(body.as_bytes(), ct).unwrap_err();
            assert_eq!(err.code(), "MANIFEST_INVALID");
            assert!(err.to_string().contains(want), "{err} / {want}");
        }
    }
}
