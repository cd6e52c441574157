//! Manifest media types and `Accept` negotiation, the way the distribution registry
//! (registry:2) does it: an OCI manifest or index is served only to a client that lists
//! its type; a Docker manifest list fetched by tag by a client that does not list it
//! is replaced by its linux/amd64 entry; a Docker schema 2 manifest is always served
//! (registry:2 would convert it to schema 1 for old clients; schema 1 is gone from
//! every client kiln supports, so that conversion is left out). `q=` values are ignored,
//! as registry:2 ignores them.

use http::HeaderMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The four manifest formats the registry stores and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ManifestKind {
    OciManifest,
    OciIndex,
    DockerManifest,
    DockerList,
}

impl ManifestKind {
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt {
            OCI_MANIFEST => Some(ManifestKind::OciManifest),
            OCI_INDEX => Some(ManifestKind::OciIndex),
            DOCKER_MANIFEST => Some(ManifestKind::DockerManifest),
            DOCKER_LIST => Some(ManifestKind::DockerList),
            _ => None,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciManifest => OCI_MANIFEST,
            ManifestKind::OciIndex => OCI_INDEX,
            ManifestKind::DockerManifest => DOCKER_MANIFEST,
            ManifestKind::DockerList => DOCKER_LIST,
        }
    }

    /// Whether manifests of this kind list other manifests.
    pub fn is_index(self) -> bool {
        matches!(self, ManifestKind::OciIndex | ManifestKind::DockerList)
    }

    fn bit(self) -> u8 {
        match self {
            ManifestKind::OciManifest => 1,
            ManifestKind::OciIndex => 2,
            ManifestKind::DockerManifest => 4,
            ManifestKind::DockerList => 8,
        }
    }
}

/// The manifest kinds a request's `Accept` headers list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepts(u8);

impl Accepts {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut bits = 0;
        for value in headers.get_all(http::header::ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mt = item.split(';').next().unwrap_or("").trim();
                // Media types are case-insensitive.
                for kind in [
                    ManifestKind::OciManifest,
                    ManifestKind::OciIndex,
                    ManifestKind::DockerManifest,
                    ManifestKind::DockerList,
                ] {
                    if mt.eq_ignore_ascii_case(kind.media_type()) {
                        bits |= kind.bit();
                    }
                }
            }
        }
        Accepts(bits)
    }

    pub fn contains(self, kind: ManifestKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// What to answer to a manifest GET, given what is stored and what the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// Serve the stored manifest.
    Serve,
    /// Serve the linux/amd64 entry of the stored Docker manifest list instead.
    DefaultPlatform,
    /// Refuse with MANIFEST_UNKNOWN and this message.
    Refuse(&'static str),
}

pub fn negotiate(stored: ManifestKind, accepts: Accepts, by_tag: bool) -> Negotiated {
    match stored {
        ManifestKind::OciManifest if !accepts.contains(stored) => Negotiated::Refuse(
            "OCI manifest found, but accept header does not support OCI manifests",
        ),
        ManifestKind::OciIndex if !accepts.contains(stored) => {
            Negotiated::Refuse("OCI index found, but accept header does not support OCI indexes")
        }
        ManifestKind::DockerList if by_tag && !accepts.contains(stored) => {
            Negotiated::DefaultPlatform
        }
        _ => Negotiated::Serve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accepts(values: &[&str]) -> Accepts {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        Accepts::from_headers(&h)
    }

    #[test]
    fn parses_lists_and_repeated_headers() {
        let a = accepts(&[
            "application/vnd.oci.image.manifest.v1+json; q=0.5, application/vnd.docker.distribution.manifest.v2+json",
            "Application/VND.OCI.image.index.v1+json",
        ]);
        assert!(a.contains(ManifestKind::OciManifest));
        assert!(a.contains(ManifestKind::OciIndex));
        assert!(a.contains(ManifestKind::DockerManifest));
        assert!(!a.contains(ManifestKind::DockerList));
        assert_eq!(accepts(&["*/*"]), Accepts::default());
    }

    #[test]
    fn negotiates_like_registry_2() {
        let none = Accepts::default();
        let docker = accepts(&[DOCKER_MANIFEST, DOCKER_LIST]);
        let all = accepts(&[DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX]);
        assert!(matches!(
            negotiate(ManifestKind::OciManifest, none, true),
            Negotiated::Refuse(_)
        ));
        assert!(matches!(
            negotiate(ManifestKind::OciIndex, docker, false),
            Negotiated::Refuse(_)
        ));
        assert_eq!(
            negotiate(ManifestKind::OciIndex, all, true),
            Negotiated::Serve
        );
        assert_eq!(
            negotiate(ManifestKind::DockerList, none, true),
            Negotiated::DefaultPlatform
        );
        // By digest, the stored list is served whatever the client says.
        assert_eq!(
            negotiate(ManifestKind::DockerList, none, false),
            Negotiated::Serve
        );
        assert_eq!(
            negotiate(ManifestKind::DockerManifest, none, true),
            Negotiated::Serve
        );
    }
}
