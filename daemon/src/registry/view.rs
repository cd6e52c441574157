//! The registry's in-memory picture of the cache, built from `index.json` and the
//! manifests it reaches: repositories and their tags, every reachable manifest's bytes
//! with its response headers ready, and the referrers of each subject. A manifest GET is
//! a hash lookup and a reference-count increment; nothing is parsed or read per request.
//!
//! The view follows the cache's references (the cache stats its files per call and
//! re-reads them only when they changed, so LinuxKit's and kilnd's own writes are both
//! seen). A version derived from the last one by names set (a landing, a push, `dev`
//! moving) is followed by applying just those names: the maps are persistent, and the
//! cache's reference maps diff in what changed, so a landing costs the registry what it
//! changed, not the size of the cache. Anything else (names removed, a new epoch of the
//! index: another writer's rewrite, gc) rebuilds the view, reusing every manifest the
//! previous one held (they are content-addressed) and reading only new ones. Between
//! rebuilds a manifest whose last name moved elsewhere stays servable by digest, as the
//! distribution registry serves an untagged manifest until it is collected.
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

use std::collections::BTreeMap;
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
#[derive(Debug, Clone)]
pub struct Tagged {
    pub target: Target,
    /// The reference name as `index.json` spells it, for usage records.
    pub ref_name: String,
}

/// What a name serves.
#[derive(Debug, Clone)]
pub enum Target {
    /// A manifest the view holds.
    Held(Arc<Stored>),
    /// A manifest on demand from an upstream (`cache::ondemand`: the per-arch manifests of
    /// a lazily fetched index), fetched on the first GET.
    OnDemand { digest: Digest, media_type: String },
}

impl Target {
    pub fn digest(&self) -> &Digest {
        match self {
            Target::Held(stored) => &stored.digest,
            Target::OnDemand { digest, .. } => digest,
        }
    }
}

/// A repository's names.
#[derive(Debug, Default, Clone)]
pub struct Repo {
    pub tags: imbl::OrdMap<String, Tagged>,
    /// Manifests named by digest only (`<repo>@sha256:…`), with their names.
    pub untagged: imbl::OrdMap<Digest, String>,
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
    pub foreign: imbl::HashSet<String>,
    /// The cache view this was built from (compared by pointer).
    pub source: Option<Arc<IndexView>>,
    pub repos: imbl::HashMap<String, Repo>,
    pub manifests: imbl::HashMap<Digest, Arc<Stored>>,
    pub referrers: imbl::HashMap<Digest, Vec<Referrer>>,
    /// Manifests named or listed while they were on demand: once fetched they are on
    /// disk, but not in `manifests` until the view is rebuilt.
    pub on_demand: imbl::HashSet<Digest>,
}

/// Above this many changed names, rebuilding costs no more than following them.
const MAX_FOLLOWED: usize = 1024;

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
    /// The view of `source`, from `previous`: the names that changed applied when
    /// `source` follows `previous`'s by names set only, else built afresh. Reads manifest
    /// blobs from disk: call from a blocking context.
    pub fn next(cache: &Cache, source: Arc<IndexView>, previous: &View) -> View {
        match View::follow(cache, &source, previous) {
            Some(view) => view,
            None => View::build(cache, source, previous),
        }
    }

    /// `previous` with the names set between its source and `source` applied; `None`
    /// when that is not all that changed (see the module's documentation).
    fn follow(cache: &Cache, source: &Arc<IndexView>, previous: &View) -> Option<View> {
        let old = previous.source.as_ref()?;
        if old.epoch() != source.epoch() {
            return None;
        }
        let mut view = View {
            foreign: previous.foreign.clone(),
            source: None,
            repos: previous.repos.clone(),
            manifests: previous.manifests.clone(),
            referrers: previous.referrers.clone(),
            on_demand: previous.on_demand.clone(),
        };
        let mut fresh = Vec::new();
        for (i, item) in old.ref_map().diff(source.ref_map()).enumerate() {
            let (name, desc) = match item {
                imbl::ordmap::DiffItem::Add(n, d) => (n, d),
                imbl::ordmap::DiffItem::Update { new: (n, d), .. } => (n, d),
                imbl::ordmap::DiffItem::Remove(..) => return None,
            };
            // Names of another registry's host are served by precedence: rebuilt.
            let parsed = RefName::parse(name)?;
            if i >= MAX_FOLLOWED {
                return None;
            }
            let Some(target) = view.load_ref(cache, previous, desc, &mut fresh) else {
                continue;
            };
            view.name(parsed, name, target);
        }
        view.add_referrers(&fresh);
        view.source = Some(Arc::clone(source));
        Some(view)
    }

    /// Serves `target` under `name` (as `parsed`): a repository's tag, or a manifest it
    /// keeps by digest.
    fn name(&mut self, parsed: RefName, name: &str, target: Target) {
        match parsed {
            RefName::Tag { repo, tag } => {
                let tagged = Tagged {
                    target,
                    ref_name: name.to_owned(),
                };
                self.repos.entry(repo).or_default().tags.insert(tag, tagged);
            }
            RefName::Digest { repo, digest } => {
                let untagged = &mut self.repos.entry(repo).or_default().untagged;
                untagged.insert(digest, name.to_owned());
            }
        }
    }

    /// Lists `manifests` under the subjects they name.
    fn add_referrers(&mut self, manifests: &[Arc<Stored>]) {
        let mut touched = std::collections::HashSet::new();
        for stored in manifests {
            let Some(subject) = &stored.info.subject else {
                continue;
            };
            self.referrers
                .entry(subject.clone())
                .or_default()
                .push(Referrer {
                    digest: stored.digest.clone(),
                    media_type: stored.kind().media_type(),
                    size: stored.bytes.len() as u64,
                    artifact_type: stored.info.artifact_type.clone(),
                    annotations: stored.info.annotations.clone(),
                });
            touched.insert(subject);
        }
        for subject in touched {
            if let Some(list) = self.referrers.get_mut(subject) {
                list.sort_by(|a, b| a.digest.cmp(&b.digest));
                list.dedup_by(|a, b| a.digest == b.digest);
            }
        }
    }

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
            let Some(target) = view.load_ref(cache, previous, desc, &mut Vec::new()) else {
                continue;
            };
            view.name(parsed, name, target);
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
            let Some(target) = view.load_ref(cache, previous, desc, &mut Vec::new()) else {
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
                target,
                ref_name: name.to_owned(),
            };
            view.repos.entry(repo).or_default().tags.insert(tag, tagged);
        }
        let all: Vec<Arc<Stored>> = view.manifests.values().cloned().collect();
        view.add_referrers(&all);
        view.source = Some(source);
        view
    }

    /// Loads the manifest a reference names (see [`View::load`]), or finds it on demand.
    fn load_ref(
        &mut self,
        cache: &Cache,
        previous: &View,
        desc: &crate::oci::Descriptor,
        fresh: &mut Vec<Arc<Stored>>,
    ) -> Option<Target> {
        if let Some(stored) = self.load(
            cache,
            previous,
            &desc.digest,
            Some(&desc.media_type),
            0,
            fresh,
        ) {
            return Some(Target::Held(stored));
        }
        self.on_demand
            .contains(&desc.digest)
            .then(|| Target::OnDemand {
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
            })
    }

    /// Loads a manifest and, for an index, its children (children on demand are left to
    /// the manifest GET, which fetches them).
    /// Each manifest it adds to the view goes into `fresh` too.
    fn load(
        &mut self,
        cache: &Cache,
        previous: &View,
        digest: &Digest,
        media_type: Option<&str>,
        depth: usize,
        fresh: &mut Vec<Arc<Stored>>,
    ) -> Option<Arc<Stored>> {
        if let Some(s) = self.manifests.get(digest) {
            return Some(Arc::clone(s));
        }
        let stored = match previous.manifests.get(digest) {
            Some(s) => Arc::clone(s),
            None => match read_stored(cache, digest, media_type) {
                Ok(s) => Arc::new(s),
                Err(_) if is_on_demand(cache, digest) => {
                    self.on_demand.insert(digest.clone());
                    return None;
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cache manifest cannot be served");
                    self.on_demand.remove(digest);
                    return None;
                }
            },
        };
        self.manifests.insert(digest.clone(), Arc::clone(&stored));
        fresh.push(Arc::clone(&stored));
        if depth < MAX_DEPTH {
            for child in &stored.info.children {
                let mt = (!child.media_type.is_empty()).then_some(child.media_type.as_str());
                // Only manifests are loaded; other children (attestations stored as
                // plain blobs, say) stay blobs.
                if mt.is_some_and(|mt| ManifestKind::from_media_type(mt).is_none()) {
                    continue;
                }
                self.load(cache, previous, &child.digest, mt, depth + 1, fresh);
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

    /// The manifests of the view that use a blob, those fetched on demand since it was
    /// built included (read from disk: call from a blocking context).
    pub fn users_of(&self, cache: &Cache, blob: &Digest) -> Vec<Digest> {
        let uses = |m: &Stored| {
            m.digest == *blob
                || m.info.blobs.iter().any(|b| b.digest == *blob)
                || m.info.children.iter().any(|c| c.digest == *blob)
        };
        let mut users: Vec<Digest> = self
            .manifests
            .values()
            .filter(|m| uses(m))
            .map(|m| m.digest.clone())
            .collect();
        for d in &self.on_demand {
            if let Ok(m) = read_stored(cache, d, None)
                && uses(&m)
            {
                users.push(d.clone());
            }
        }
        users.sort();
        users
    }
}

/// Whether `digest` is a manifest on demand (not here, recorded as a document).
fn is_on_demand(cache: &Cache, digest: &Digest) -> bool {
    cache
        .on_demand(digest)
        .is_ok_and(|from| from.is_some_and(|f| f.is_document()))
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
    use crate::oci::{Descriptor, OCI_MANIFEST};

    /// What a view serves: each repository's tags and digest names, and the referrers.
    fn served(view: &View) -> Vec<String> {
        let mut out = Vec::new();
        for name in view.repo_names() {
            let repo = &view.repos[name];
            for (tag, t) in &repo.tags {
                out.push(format!("{name}:{tag} {}", t.target.digest()));
            }
            for d in repo.untagged.keys() {
                out.push(format!("{name}@{d}"));
            }
        }
        let mut referrers: Vec<String> = view
            .referrers
            .iter()
            .map(|(s, l)| {
                format!(
                    "{s} <- {:?}",
                    l.iter().map(|r| &r.digest).collect::<Vec<_>>()
                )
            })
            .collect();
        referrers.sort();
        out.extend(referrers);
        out
    }

    #[test]
    fn a_followed_view_serves_what_a_rebuilt_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        let config = cache.put_blob(b"{}").unwrap();
        let manifest = |n: u32, subject: Option<&Digest>| {
            let subject = subject.map_or(String::new(), |s| {
                format!(r#","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{s}","size":1}}"#)
            });
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[],"annotations":{{"n":"{n}"}}{subject}}}"#
            );
            let d = cache.put_blob(body.as_bytes()).unwrap();
            Descriptor::new(OCI_MANIFEST, d, body.len() as u64)
        };
        let (m1, m2) = (manifest(1, None), manifest(2, None));
        let sig = manifest(3, Some(&m1.digest));
        cache.set_ref("docker.io/a/b:1", m1.clone()).unwrap();
        let v0 = View::next(&cache, cache.index().unwrap(), &View::default());

        // Names set: followed (the manifest already held is the same one).
        cache.set_ref("docker.io/a/b:2", m2.clone()).unwrap();
        cache.set_ref("docker.io/a/b:1", m2.clone()).unwrap();
        cache
            .set_ref(&digest_ref_name("a/b", &sig.digest), sig.clone())
            .unwrap();
        cache.set_ref("docker.io/c/d:x", m1.clone()).unwrap();
        let source = cache.index().unwrap();
        let followed = View::follow(&cache, &source, &v0).expect("names set are followed");
        assert!(Arc::ptr_eq(
            &followed.manifests[&m1.digest],
            &v0.manifests[&m1.digest]
        ));
        let rebuilt = View::build(&cache, Arc::clone(&source), &View::default());
        assert_eq!(served(&followed), served(&rebuilt));
        assert_eq!(followed.referrers[&m1.digest].len(), 1);

        // A name removed: rebuilt.
        cache.remove_ref("docker.io/a/b:2").unwrap();
        let source = cache.index().unwrap();
        assert!(View::follow(&cache, &source, &followed).is_none());
        let next = View::next(&cache, Arc::clone(&source), &followed);
        assert!(next.tag("a/b", "2").is_none());
        assert_eq!(
            served(&next),
            served(&View::build(&cache, source, &View::default()))
        );
    }

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
