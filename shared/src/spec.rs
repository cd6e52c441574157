//! The `build.yml` of a package, in LinuxKit's format (`pkglib.go`, `pkgInfo`), as
//! serde types that reject what LinuxKit would choke on later.
//!
//! Every field that can be checked without the file system is checked while
//! deserializing, so the YAML reader can name the line and column of a bad value.
//! Checks that need the package directory (symlinks, existence) live in the daemon.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::reference::RepoName;

/// LinuxKit's default organisation (`NewPkgInfo`).
pub const DEFAULT_ORG: &str = "linuxkit";
/// LinuxKit's default tag template.
pub const DEFAULT_TAG_TEMPLATE: &str = "{{.Hash}}";
/// LinuxKit's default Dockerfile name.
pub const DEFAULT_DOCKERFILE: &str = "Dockerfile";

/// A package's `build.yml`, with LinuxKit's defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// The image name below `org` (required).
    pub image: ImageName,
    #[serde(default = "default_org")]
    pub org: ImageName,
    /// The tag template; only `{{.Hash}}` is known.
    #[serde(default)]
    pub tag: TagTemplate,
    /// The Dockerfile, relative to the package and inside it.
    #[serde(default = "default_dockerfile")]
    pub dockerfile: SubPath,
    #[serde(default = "default_arches", deserialize_with = "de_arches")]
    pub arches: Vec<Arch>,
    /// `src:dst` pairs: directories outside the package copied into the build context.
    #[serde(default, rename = "extra-sources")]
    pub extra_sources: Vec<ExtraSource>,
    #[serde(default)]
    pub gitrepo: Option<String>,
    #[serde(default)]
    pub network: bool,
    #[serde(default, rename = "disable-cache")]
    pub disable_cache: bool,
    /// The image config (LinuxKit's `moby.ImageConfig`), kept as JSON.
    #[serde(default)]
    pub config: Option<ImageConfig>,
    #[serde(default, rename = "buildArgs")]
    pub build_args: Vec<BuildArg>,
    #[serde(default)]
    pub depends: Depends,
}

fn default_org() -> ImageName {
    ImageName(DEFAULT_ORG.to_owned())
}
fn default_dockerfile() -> SubPath {
    SubPath(DEFAULT_DOCKERFILE.to_owned())
}
fn default_arches() -> Vec<Arch> {
    vec![Arch::Amd64, Arch::Arm64, Arch::Riscv64]
}

fn de_arches<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Arch>, D::Error> {
    // A visitor, so that the YAML reader attaches the position of the list to errors.
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Arch>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of arches (amd64, arm64, riscv64, s390x)")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Arch>, A::Error> {
            let mut arches = Vec::new();
            while let Some(a) = seq.next_element::<Arch>()? {
                if arches.contains(&a) {
                    return Err(de::Error::custom(format!("arch {a} is listed twice")));
                }
                arches.push(a);
            }
            if arches.is_empty() {
                return Err(de::Error::custom(
                    "arches is empty: list at least one of amd64, arm64, riscv64, s390x, or drop the key for the default",
                ));
            }
            Ok(arches)
        }
        // `arches:` with no value: LinuxKit reads it as no list, so the default arches
        // (linuxkit's own pkg/bpftrace says `arches:` with nothing after it).
        fn visit_unit<E: de::Error>(self) -> Result<Vec<Arch>, E> {
            Ok(default_arches())
        }
        fn visit_none<E: de::Error>(self) -> Result<Vec<Arch>, E> {
            Ok(default_arches())
        }
    }
    d.deserialize_any(V)
}

/// LinuxKit's `config` (a `moby.ImageConfig`), kept as a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ImageConfig(pub serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for ImageConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping (LinuxKit's image config)")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<ImageConfig, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.insert(k, v);
                }
                Ok(ImageConfig(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl BuildSpec {
    /// `org/image`.
    pub fn repo_name(&self) -> Result<RepoName, crate::reference::ReferenceError> {
        format!("{}/{}", self.org.0, self.image.0).parse()
    }
}

/// An architecture LinuxKit builds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
    Riscv64,
    S390x,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Amd64, Arch::Arm64, Arch::Riscv64, Arch::S390x];

    /// The GOARCH-style name used in `build.yml` and OCI platforms.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Riscv64 => "riscv64",
            Arch::S390x => "s390x",
        }
    }

    /// The architecture this process runs on, if LinuxKit builds for it.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            "riscv64" => Some(Arch::Riscv64),
            "s390x" => Some(Arch::S390x),
            _ => None,
        }
    }

    /// The OCI platform, e.g. `linux/arm64`.
    pub fn platform(self) -> &'static str {
        match self {
            Arch::Amd64 => "linux/amd64",
            Arch::Arm64 => "linux/arm64",
            Arch::Riscv64 => "linux/riscv64",
            Arch::S390x => "linux/s390x",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a spec value is invalid. Reported with the YAML position by the reader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecValueError {
    #[error("unknown arch {0:?}: expected one of amd64, arm64, riscv64, s390x")]
    Arch(String),
    #[error("{0}")]
    Invalid(String),
}

impl FromStr for Arch {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| SpecValueError::Arch(s.to_owned()))
    }
}

/// Serde for a type that has `FromStr` and `Display`, the error carrying the reason.
macro_rules! str_serde {
    ($t:ty, $expecting:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

str_serde!(Arch, "an arch name (amd64, arm64, riscv64, s390x)");

/// `image` or `org`: one or more OCI name components.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageName(String);

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ImageName {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpecValueError::Invalid(
                "the name is empty: give a lowercase image name such as \"alpine\"".into(),
            ));
        }
        s.parse::<RepoName>()
            .map_err(|e| SpecValueError::Invalid(e.to_string()))?;
        Ok(ImageName(s.to_owned()))
    }
}

str_serde!(ImageName, "a lowercase image name such as \"alpine\"");

/// The `tag` template. LinuxKit runs it through Go's text/template with only `Hash`
/// defined; kiln accepts literal text and `{{.Hash}}` actions (spaces and `-` trim
/// markers allowed), which is everything that can produce a tag there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate {
    source: String,
    parts: Vec<TagPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagPart {
    Text(String),
    Hash,
}

impl Default for TagTemplate {
    fn default() -> Self {
        TagTemplate {
            source: DEFAULT_TAG_TEMPLATE.to_owned(),
            parts: vec![TagPart::Hash],
        }
    }
}

impl TagTemplate {
    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The tag for a package hash.
    pub fn render(&self, hash: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TagPart::Text(t) => out.push_str(t),
                TagPart::Hash => out.push_str(hash),
            }
        }
        out
    }
}

impl fmt::Display for TagTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for TagTemplate {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // LinuxKit: an empty template means the default.
        if s.is_empty() {
            return Ok(TagTemplate::default());
        }
        let mut parts = Vec::new();
        let mut rest = s;
        let mut trim_next = false;
        while !rest.is_empty() {
            let (text, after) = match rest.find("{{") {
                Some(i) => (&rest[..i], Some(&rest[i + 2..])),
                None => (rest, None),
            };
            let mut text = if trim_next { text.trim_start() } else { text };
            let Some(after) = after else {
                push_text(&mut parts, text);
                break;
            };
            let Some(close) = after.find("}}") else {
                return Err(SpecValueError::Invalid(format!(
                    "tag template {s:?} has an unclosed \"{{{{\": write {{{{.Hash}}}}"
                )));
            };
            let mut inner = &after[..close];
            if let Some(x) = inner.strip_prefix("- ") {
                text = text.trim_end();
                inner = x;
            }
            trim_next = false;
            if let Some(x) = inner.strip_suffix(" -") {
                trim_next = true;
                inner = x;
            }
            if inner.trim() != ".Hash" {
                return Err(SpecValueError::Invalid(format!(
                    "tag template {s:?} uses {{{{{inner}}}}}: only {{{{.Hash}}}} is defined"
                )));
            }
            push_text(&mut parts, text);
            parts.push(TagPart::Hash);
            rest = &after[close + 2..];
        }
        let t = TagTemplate {
            source: s.to_owned(),
            parts,
        };
        // The longest hash LinuxKit makes: 40 hex, "-dirty-", 7 hex.
        let sample = t.render(&format!("{}-dirty-{}", "a".repeat(40), "b".repeat(7)));
        if sample.parse::<crate::reference::Tag>().is_err() {
            return Err(SpecValueError::Invalid(format!(
                "tag template {s:?} gives tags like {sample:?}, which is not a valid tag: use [A-Za-z0-9_.-], at most 128 characters"
            )));
        }
        Ok(t)
    }
}

fn push_text(parts: &mut Vec<TagPart>, text: &str) {
    if !text.is_empty() {
        parts.push(TagPart::Text(text.to_owned()));
    }
}

str_serde!(TagTemplate, "a tag template such as \"{{.Hash}}\"");

/// A relative path that stays inside the package and is not the package itself
/// (LinuxKit's `makeAbsSubpath`), checked lexically. Symlinks are checked by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubPath(String);

impl SubPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Normalises a `/`-separated relative path lexically; `None` if it climbs above its start.
pub fn clean_relative(p: &str) -> Option<Vec<&str>> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out)
}

impl FromStr for SubPath {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpecValueError::Invalid("the path is empty".into()));
        }
        if s.starts_with('/') {
            return Err(SpecValueError::Invalid(format!(
                "path {s:?} is absolute: give it relative to the package directory"
            )));
        }
        match clean_relative(s) {
            None => Err(SpecValueError::Invalid(format!(
                "path {s:?} leaves the package directory: it must stay inside it"
            ))),
            Some(c) if c.is_empty() => Err(SpecValueError::Invalid(format!(
                "path {s:?} is the package directory itself: name a file inside it"
            ))),
            Some(_) => Ok(SubPath(s.to_owned())),
        }
    }
}

str_serde!(SubPath, "a path relative to the package directory");

/// One `extra-sources` entry, `src:dst`: `src` a directory (relative to the package or
/// absolute), `dst` where it lands in the build context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExtraSource {
    pub src: String,
    /// Cleaned like Go's `path.Clean`.
    pub dst: String,
}

impl fmt::Display for ExtraSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.src, self.dst)
    }
}

impl FromStr for ExtraSource {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // pkglib.go NewFromConfig: strings.Split(source, ":") must give two parts.
        let parts: Vec<&str> = s.split(':').collect();
        let [src, dst] = parts[..] else {
            return Err(SpecValueError::Invalid(format!(
                "extra source {s:?} is not \"src:dst\" (exactly one ':')"
            )));
        };
        if src.is_empty() || dst.is_empty() {
            return Err(SpecValueError::Invalid(format!(
                "extra source {s:?} has an empty side: write \"src:dst\""
            )));
        }
        let abs = dst.starts_with('/');
        let Some(comps) = clean_relative(dst) else {
            return Err(SpecValueError::Invalid(format!(
                "extra source {s:?}: destination {dst:?} leaves the build context"
            )));
        };
        let joined = comps.join("/");
        let dst = match (abs, joined.is_empty()) {
            (true, _) => format!("/{joined}"),
            (false, true) => ".".to_owned(),
            (false, false) => joined,
        };
        Ok(ExtraSource {
            src: src.to_owned(),
            dst,
        })
    }
}

str_serde!(ExtraSource, "\"src:dst\"");

/// One `buildArgs` entry, `KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuildArg {
    pub key: String,
    pub value: String,
}

/// LinuxKit's special build-arg prefix (`buildarg.go`): `@lkt:pkg:PATH` is replaced by
/// that package's tag, `@lkt:pkgs:GLOB` by one arg per matching package.
pub const LKT_PREFIX: &str = "@lkt:";

impl BuildArg {
    /// The package path of an `@lkt:pkg:` value.
    pub fn lkt_pkg(&self) -> Option<&str> {
        self.value.strip_prefix(LKT_PREFIX)?.strip_prefix("pkg:")
    }
    /// The package glob of an `@lkt:pkgs:` value.
    pub fn lkt_pkgs(&self) -> Option<&str> {
        self.value.strip_prefix(LKT_PREFIX)?.strip_prefix("pkgs:")
    }
}

impl fmt::Display for BuildArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl FromStr for BuildArg {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((key, value)) = s.split_once('=') else {
            return Err(SpecValueError::Invalid(format!(
                "build arg {s:?} is not KEY=VALUE"
            )));
        };
        if key.is_empty() {
            return Err(SpecValueError::Invalid(format!(
                "build arg {s:?} has an empty key: write KEY=VALUE"
            )));
        }
        let arg = BuildArg {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        if arg.value.starts_with(LKT_PREFIX) {
            if arg.lkt_pkgs().is_some() && !key.contains('%') {
                return Err(SpecValueError::Invalid(format!(
                    "build arg {s:?}: a key for @lkt:pkgs: must contain '%' (replaced by each image name)"
                )));
            }
            if arg.lkt_pkg().is_none() && arg.lkt_pkgs().is_none() {
                return Err(SpecValueError::Invalid(format!(
                    "build arg {s:?}: unknown linuxkit value, expected @lkt:pkg:PATH or @lkt:pkgs:GLOB"
                )));
            }
        }
        Ok(arg)
    }
}

str_serde!(BuildArg, "a build arg KEY=VALUE");

/// `depends`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Depends {
    #[serde(default, rename = "docker-images")]
    pub docker_images: DockerImages,
}

/// `depends.docker-images`: images to pull and save into the build context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawDockerImages")]
pub struct DockerImages {
    pub list: Vec<PinnedImage>,
    #[serde(rename = "from-file")]
    pub from_file: Option<SubPath>,
    pub target: Option<SubPath>,
    #[serde(rename = "target-dir")]
    pub target_dir: Option<SubPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDockerImages {
    #[serde(default)]
    list: Vec<PinnedImage>,
    #[serde(default, rename = "from-file")]
    from_file: Option<SubPath>,
    #[serde(default)]
    target: Option<SubPath>,
    #[serde(default, rename = "target-dir")]
    target_dir: Option<SubPath>,
}

impl TryFrom<RawDockerImages> for DockerImages {
    type Error = SpecValueError;
    fn try_from(r: RawDockerImages) -> Result<Self, Self::Error> {
        // depends.go newDockerDepends.
        if r.target.is_some() && r.target_dir.is_some() {
            return Err(SpecValueError::Invalid(
                "docker-images: target and target-dir are mutually exclusive: keep one".into(),
            ));
        }
        if r.from_file.is_some() && !r.list.is_empty() {
            return Err(SpecValueError::Invalid(
                "docker-images: list and from-file are mutually exclusive: keep one".into(),
            ));
        }
        Ok(DockerImages {
            list: r.list,
            from_file: r.from_file,
            target: r.target,
            target_dir: r.target_dir,
        })
    }
}

/// An image reference pinned by digest (`name[:tag]@sha256:<64 hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PinnedImage(String);

impl PinnedImage {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PinnedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PinnedImage {
    type Err = SpecValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((name, digest)) = s.rsplit_once('@') else {
            return Err(SpecValueError::Invalid(format!(
                "image {s:?} lacks a digest: pin it as name@sha256:<64 hex>"
            )));
        };
        if name.is_empty() || digest.parse::<crate::digest::Digest>().is_err() {
            return Err(SpecValueError::Invalid(format!(
                "image {s:?} is not name@sha256:<64 lowercase hex>"
            )));
        }
        Ok(PinnedImage(s.to_owned()))
    }
}

str_serde!(PinnedImage, "an image pinned by digest, name@sha256:<hex>");

#[cfg(test)]
mod tests;
