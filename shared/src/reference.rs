//! Repository names, tags and image references, validated with the OCI Distribution
//! Spec grammar, and their mapping to the cache's LinuxKit-style reference names
//! (`docker.io/org/image:tag`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;

/// The registry host that LinuxKit writes into `org.opencontainers.image.ref.name`.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// Why a name, tag or reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "repository name {0:?} is invalid: use lowercase path components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/', at most 255 characters"
    )]
    Name(String),
    #[error(
        "tag {0:?} is invalid: use 1 to 128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
    )]
    Tag(String),
    #[error("reference {0:?} is invalid: expected \"org/image:tag\"")]
    Reference(String),
}

/// A repository name such as `linuxkit/alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl FromStr for RepoName {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 255 || !s.split('/').all(valid_component) {
            return Err(ReferenceError::Name(s.to_owned()));
        }
        Ok(RepoName(s.to_owned()))
    }
}

/// A tag such as `1.2` or a content hash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ReferenceError::Tag(s.to_owned()))
        }
    }
}

/// `org/image:tag`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    pub repo: RepoName,
    pub tag: Tag,
}

impl ImageRef {
    pub fn new(repo: RepoName, tag: Tag) -> Self {
        ImageRef { repo, tag }
    }

    /// The name LinuxKit stores in `index.json`: `docker.io/org/image:tag`.
    pub fn cache_name(&self) -> String {
        format!("{DEFAULT_DOMAIN}/{}:{}", self.repo.0, self.tag.0)
    }

    /// Reads a cache reference name back. Names without a domain are taken as they
    /// are; `docker.io/` is stripped, as is `library/` for single-component names.
    pub fn from_cache_name(name: &str) -> Result<Self, ReferenceError> {
        let rest = name
            .strip_prefix("docker.io/")
            .or_else(|| name.strip_prefix("index.docker.io/"))
            .unwrap_or(name);
        rest.parse()
    }
}

/// The cache name of one architecture's image: `docker.io/org/image:tag-<arch>`.
pub fn arch_ref(image: &ImageRef, arch: &str) -> String {
    format!("{}-{arch}", image.cache_name())
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The tag follows the last ':' after the last '/'.
        let slash = s.rfind('/').map_or(0, |i| i + 1);
        let Some(colon) = s[slash..].rfind(':').map(|i| slash + i) else {
            return Err(ReferenceError::Reference(s.to_owned()));
        };
        Ok(ImageRef {
            repo: s[..colon].parse()?,
            tag: s[colon + 1..].parse()?,
        })
    }
}

/// What names a manifest in a repository: a tag, or the manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// The reference as clients write it after the repository: `repo:tag` or
    /// `repo@sha256:...`.
    pub fn qualified(&self, repo: &RepoName) -> String {
        match self {
            Reference::Tag(t) => format!("{repo}:{t}"),
            Reference::Digest(d) => format!("{repo}@{d}"),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

macro_rules! string_newtype {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.to_string_inner(), f)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.to_string_inner())
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

impl RepoName {
    fn to_string_inner(&self) -> String {
        self.0.clone()
    }
}
impl Tag {
    fn to_string_inner(&self) -> String {
        self.0.clone()
    }
}
impl ImageRef {
    fn to_string_inner(&self) -> String {
        format!("{}:{}", self.repo.0, self.tag.0)
    }
}

string_newtype!(RepoName);
string_newtype!(Tag);
string_newtype!(ImageRef);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "linuxkit/alpine", "a.b/c__d/e---f", "org/image_x"] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a/../b", "a/./b", "a___b", "-a", "a.", "a..b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tags() {
        assert!("v1.2_3-x".parse::<Tag>().is_ok());
        assert!("_x".parse::<Tag>().is_ok());
        for bad in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn image_refs_and_cache_names() {
        let r: ImageRef = "linuxkit/alpine:abc".parse().unwrap();
        assert_eq!(r.cache_name(), "docker.io/linuxkit/alpine:abc");
        assert_eq!(
            ImageRef::from_cache_name("docker.io/linuxkit/alpine:abc").unwrap(),
            r
        );
        assert_eq!(r.to_string(), "linuxkit/alpine:abc");
        assert!("linuxkit/alpine".parse::<ImageRef>().is_err());
        assert!("localhost:5000/a".parse::<ImageRef>().is_err());
    }
}
