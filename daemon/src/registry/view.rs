//! The registry's in-memory picture of the cache, built from `index.json` and the
//! manifests it reaches: repositories and their tags, every reachable manifest's bytes
//! with its response headers ready, and the referrers of each subject. A manifest GET is
//! a hash lookup and a reference-count increment; nothing is parsed or read per request.
//!
//! The view is rebuilt when the cache's `index.json` view changes (the cache stats the
//! file per call and re-reads it only when it changed, so LinuxKit's and kilnd's own
//! writes are both seen). Manifests are content-addressed, so a rebuild reuses every
//! manifest the previous view already held and reads only new ones.
//!
//! Reference names (`org.opencontainers.image.ref.name` in `index.json`):
//! - `docker.io/<repo>:<tag>`: a tag, as LinuxKit writes them (`<repo>` without the
//!   `docker.io/` prefix is the repository clients use; names of other registries such
//!   as `ghcr.io/x/y:t` appear as repository `ghcr.io/x/y`);
//! - `docker.io/<repo>@sha256:<hex>`: a manifest pushed to `<repo>` by digest only
//!   (children of a multi-arch push, referrers such as signatures). kiln writes these
//!   so that untagged manifests stay named, hence reachable for gc and for the catalog;
//!   tools that parse names as `name:tag` should skip names holding `@`;
//! - `<host>:<port>/<repo>:<tag>` (LinuxKit keeps what it pulled from a registry on a
//!   port so, e.g. `127.0.0.1:5099/library/busybox:1.0`): no repository name may hold
//!   the `:`, so it is served as `<repo>:<tag>`, unless a `docker.io/` name already
//!   holds that tag; either way the first view that sees the name logs it once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use kiln_shared::digest::Digest;
use kiln_shared::reference::{DEFAULT_DOMAIN, ImageRef};

use super::accept::ManifestKind;
use super::manifest::{self, MAX_MANIFEST_SIZE, ManifestInfo};
use crate::cache::{Cache, IndexView};

/// How deep indexes may nest before the view stops following them.
const MAX_DEPTH: usize = 4;

/// One stored manifest, ready to be served.
#[derive(Debug)]
pub struct Stored {
    pub digest: Digest,
    pub bytes: Bytes,
    pub info: ManifestInfo,
    pub content_type: HeaderValue,
    pub digest_header: HeaderValue,
    pub etag: HeaderValue,
    pub length: HeaderValue,
}

impl Stored {
    /// Parses manifest bytes whose digest is already known to be `digest`.
    pub fn new(
        digest: Digest,
        bytes: Bytes,
        media_type: Option<&str>,
    ) -> Result<Self, super::error::OciError> {
        let info = manifest::parse(&bytes, media_type)?;
        let hv = |s: String| HeaderValue::from_str(&s).map_err(super::error::OciError::from);
        Ok(Stored {
            content_type: HeaderValue::from_static(info.kind.media_type()),
            digest_header: hv(digest.to_string())?,
            etag: hv(format!("\"{digest}\""))?,
            length: HeaderValue::from(bytes.len()),
            digest,
            bytes,
            info,
        })
    }

    pub fn kind(&self) -> ManifestKind {
        self.info.kind
    }
}

/// A tag and the `index.json` name it came from.
#[derive(Debug)]
pub struct Tagged {
    pub stored: Arc<Stored>,
    /// The reference name as `index.json` spells it, for usage records.
    pub ref_name: String,
}

/// A repository's names.
#[derive(Debug, Default)]
pub struct Repo {
    pub tags: BTreeMap<String, Tagged>,
    /// Manifests named by digest only (`<repo>@sha256:…`), with their names.
    pub untagged: BTreeMap<Digest, String>,
}

/// A referrer of a subject, as the referrers API lists it.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub digest: Digest,
    pub media_type: &'static str,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

/// The picture of one version of `index.json`.
#[derive(Debug, Default)]
pub struct View {
    /// Names of another registry's host that were logged (served under another name,
    /// or not served): each is logged once, not on every rebuild.
    pub foreign: std::collections::HashSet<String>,
    /// The cache view this was built from (compared by pointer).
    pub source: Option<Arc<IndexView>>,
    pub repos: HashMap<String, Repo>,
    pub manifests: HashMap<Digest, Arc<Stored>>,
    pub referrers: HashMap<Digest, Vec<Referrer>>,
}

/// A reference name from `index.json`, understood.
#[derive(Debug, PartialEq, Eq)]
pub enum RefName {
    Tag { repo: String, tag: String },
    Digest { repo: String, digest: Digest },
}

impl RefName {
    /// A name of another registry given with a port, `<host>:<port>/<rest>`: the host,
    /// and `rest` read as a docker.io name.
    fn foreign(name: &str) -> Option<(&str, RefName)> {
        let (host, rest) = name.split_once('/')?;
        if !host.contains(':') || rest.contains('@') {
            return None;
        }
        let r = ImageRef::from_cache_name(&format!("{DEFAULT_DOMAIN}/{rest}")).ok()?;
        Some((
            host,
            RefName::Tag {
                repo: r.repo.as_str().to_owned(),
                tag: r.tag.as_str().to_owned(),
            },
        ))
    }

    pub fn parse(name: &str) -> Option<RefName> {
        if let Some((repo, digest)) = name.split_once('@') {
            let repo = repo
                .strip_prefix("docker.io/")
                .or_else(|| repo.strip_prefix("index.docker.io/"))
                .unwrap_or(repo);
            let _: kiln_shared::reference::RepoName = repo.parse().ok()?;
            return Some(RefName::Digest {
                repo: repo.to_owned(),
                digest: digest.parse().ok()?,
            });
        }
        let r = ImageRef::from_cache_name(name).ok()?;
        Some(RefName::Tag {
            repo: r.repo.as_str().to_owned(),
            tag: r.tag.as_str().to_owned(),
        })
    }
}

/// The cache reference name of a tag.
pub fn tag_ref_name(repo: &str, tag: &str) -> String {
    format!("{DEFAULT_DOMAIN}/{repo}:{tag}")
}

/// The cache reference name that keeps a manifest pushed by digest.
pub fn digest_ref_name(repo: &str, digest: &Digest) -> String {
    format!("{DEFAULT_DOMAIN}/{repo}@{digest}")
}

impl View {
    /// Builds the view of `source`, reusing manifests of `previous`. Reads manifest blobs
    /// from disk: call from a blocking context.
    pub fn build(cache: &Cache, source: Arc<IndexView>, previous: &View) -> View {
        let mut view = View {
            source: None,
            ..View::default()
        };
        let mut foreign = Vec::new();
        for (name, desc) in source.refs() {
            let Some(parsed) = RefName::parse(name) else {
                match RefName::foreign(name) {
                    Some((host, RefName::Tag { repo, tag })) => {
                        foreign.push((name, host, repo, tag, desc));
                    }
                    _ => tracing::debug!(
                        name,
                        "index.json name is not a registry reference; skipped"
                    ),
                }
                continue;
            };
            let Some(stored) = view.load(cache, previous, &desc.digest, Some(&desc.media_type), 0)
            else {
                continue;
            };
            match parsed {
                RefName::Tag { repo, tag } => {
                    let tagged = Tagged {
                        stored,
                        ref_name: name.to_owned(),
                    };
                    view.repos.entry(repo).or_default().tags.insert(tag, tagged);
                }
                RefName::Digest { repo, digest } => {
                    let untagged = &mut view.repos.entry(repo).or_default().untagged;
                    untagged.insert(digest, name.to_owned());
                }
            }
        }
        // Names of other registries' hosts come last: a docker.io name keeps its tag.
        for (name, host, repo, tag, desc) in foreign {
            let taken = view
                .repos
                .get(&repo)
                .and_then(|r| r.tags.get(&tag))
                .map(|t| t.ref_name.clone());
            let first = !previous.foreign.contains(name);
            view.foreign.insert(name.to_owned());
            if let Some(owner) = taken {
                if first {
                    tracing::info!(
                        name,
                        "index.json name of registry {host} is not served: {repo}:{tag} is {owner}"
                    );
                }
                continue;
            }
            let Some(stored) = view.load(cache, previous, &desc.digest, Some(&desc.media_type), 0)
            else {
                continue;
            };
            if first {
                tracing::info!(
                    name,
                    "index.json name of registry {host} is served as {repo}:{tag} (no repository \
                     name may hold the host's port)"
                );
            }
            let tagged = Tagged {
                stored,
                ref_name: name.to_owned(),
            };
            view.repos.entry(repo).or_default().tags.insert(tag, tagged);
        }
        for stored in view.manifests.values() {
            if let Some(subject) = &stored.info.subject {
                view.referrers
                    .entry(subject.clone())
                    .or_default()
                    .push(Referrer {
                        digest: stored.digest.clone(),
                        media_type: stored.kind().media_type(),
                        size: stored.bytes.len() as u64,
                        artifact_type: stored.info.artifact_type.clone(),
                        annotations: stored.info.annotations.clone(),
                    });
            }
        }
        for list in view.referrers.values_mut() {
            list.sort_by(|a, b| a.digest.cmp(&b.digest));
        }
        view.source = Some(source);
        view
    }

    /// Loads a manifest and, for an index, its children.
    fn load(
        &mut self,
        cache: &Cache,
        previous: &View,
        digest: &Digest,
        media_type: Option<&str>,
        depth: usize,
    ) -> Option<Arc<Stored>> {
        if let Some(s) = self.manifests.get(digest) {
            return Some(Arc::clone(s));
        }
        let stored = match previous.manifests.get(digest) {
            Some(s) => Arc::clone(s),
            None => match read_stored(cache, digest, media_type) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cache manifest cannot be served");
                    return None;
                }
            },
        };
        self.manifests.insert(digest.clone(), Arc::clone(&stored));
        if depth < MAX_DEPTH {
            for child in &stored.info.children {
                let mt = (!child.media_type.is_empty()).then_some(child.media_type.as_str());
                // Only manifests are loaded; other children (attestations stored as
                // plain blobs, say) stay blobs.
                if mt.is_some_and(|mt| ManifestKind::from_media_type(mt).is_none()) {
                    continue;
                }
                self.load(cache, previous, &child.digest, mt, depth + 1);
            }
        }
        Some(stored)
    }

    /// The manifest a repository's tag names.
    pub fn tag(&self, repo: &str, tag: &str) -> Option<&Tagged> {
        self.repos.get(repo)?.tags.get(tag)
    }

    /// Sorted repository names.
    pub fn repo_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.repos.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Which reference names a blob, if any manifest of the view uses it.
    pub fn users_of(&self, blob: &Digest) -> Vec<Digest> {
        let mut users: Vec<Digest> = self
            .manifests
            .values()
            .filter(|m| {
                m.digest == *blob
                    || m.info.blobs.iter().any(|b| b.digest == *blob)
                    || m.info.children.iter().any(|c| c.digest == *blob)
            })
            .map(|m| m.digest.clone())
            .collect();
        users.sort();
        users
    }
}

/// Reads a manifest blob and checks it.
pub fn read_stored(
    cache: &Cache,
    digest: &Digest,
    media_type: Option<&str>,
) -> Result<Stored, super::error::OciError> {
    let bytes = cache.read_blob(digest, MAX_MANIFEST_SIZE as u64)?;
    Stored::new(digest.clone(), Bytes::from(bytes), media_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        assert_eq!(
            RefName::parse("docker.io/org/img:t1-arm64"),
            Some(RefName::Tag {
                repo: "org/img".into(),
                tag: "t1-arm64".into()
            })
        );
        let d = Digest::from_sha256_bytes(&[1; 32]);
        assert_eq!(
            RefName::parse(&digest_ref_name("org/img", &d)),
            Some(RefName::Digest {
                repo: "org/img".into(),
                digest: d.clone()
            })
        );
        assert_eq!(tag_ref_name("a/b", "c"), "docker.io/a/b:c");
        assert_eq!(RefName::parse("docker.io/org/img@sha256:xyz"), None);
        assert_eq!(RefName::parse("docker.io/Org/img:t"), None);
        assert_eq!(RefName::parse("no-tag"), None);
        assert_eq!(RefName::parse("127.0.0.1:5099/library/busybox:1.0"), None);
        assert_eq!(
            RefName::foreign("127.0.0.1:5099/library/busybox:1.0"),
            Some((
                "127.0.0.1:5099",
                RefName::Tag {
                    repo: "library/busybox".into(),
                    tag: "1.0".into()
                }
            ))
        );
        assert_eq!(RefName::foreign("ghcr.io/x/y:1"), None);
    }
}
