//! The native builder: builds a Dockerfile in-process into the cache, deterministically:
//! the same inputs give byte-identical layers, configs, manifests and digests on every run
//! and machine. Without `RUN` it needs nothing of the host (any architecture, no
//! emulation); a `RUN` runs in a container (`runtime`) on an overlay of the stage's
//! snapshots (`snapshot`), its changes become the layer (`diff`), and each step's result is
//! cached by its inputs (`steps`). Foreign architectures run under qemu-user.
//!
//! `build` walks the stages the target needs, applies each instruction to an image
//! config and, for `COPY`/`ADD`/`WORKDIR`, to an in-memory tree of the stage's root
//! filesystem; every `COPY`/`ADD` (and a `WORKDIR` that creates a directory, as BuildKit
//! does) becomes one layer holding the paths it changed and their parent directories.
//! Each arch's config and OCI manifest land in the cache with `Cache::merge_arch`, exactly
//! where the docker builder's output lands.

mod context;
mod copy;
mod diff;
mod image;
mod layer;
mod mounts;
mod refuse;
pub mod runtime;
pub mod snapshot;
mod stage;
mod steps;
mod tree;
mod unpack;

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_shared::reference::ImageRef;
use tokio_util::sync::CancellationToken;

use crate::build::dockerfile::{Dockerfile, DockerfileError};
use crate::cache::{Cache, CacheError};
use crate::oci::{Descriptor, Platform, is_index, is_manifest};

pub use context::{ContextError, match_component};
pub use image::{ImageConfig, RunConfig};
pub use layer::{CHUNK, LEVEL, Layer, LayerError};
pub use refuse::{Capabilities, Refusal, auto_reason, native_supports};
pub use snapshot::Snapshots;

/// What to build: the lead maps a workspace package to this.
#[derive(Debug, Clone)]
pub struct NativeBuild {
    /// The build context (the package directory).
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    /// Files or directories from outside the package, placed in the context:
    /// (absolute source, destination path inside the context).
    pub extra_sources: Vec<(PathBuf, String)>,
    /// `org/image:tag`.
    pub image: ImageRef,
    /// (architecture, variant), e.g. ("amd64", None), ("arm", Some("v7")).
    pub arches: Vec<(String, Option<String>)>,
    pub build_args: BTreeMap<String, String>,
    /// Labels added to the final image's config (as `docker build --label`).
    pub labels: BTreeMap<String, String>,
    /// `SOURCE_DATE_EPOCH`: every mtime and `created` time (default 0).
    pub source_date_epoch: i64,
    /// The stage to build (`--target`); the last stage when `None`.
    pub target: Option<String>,
    /// Whether RUN steps share the host's network (`network: true` in build.yml); a step's
    /// `--network` overrides it.
    pub network: bool,
    /// Run every RUN step again (`disable-cache: true` in build.yml).
    pub no_cache: bool,
    /// Stops the build: a running RUN step is killed and its container, mount and
    /// directory removed.
    pub cancel: CancellationToken,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The multi-arch index `image:tag` now names.
    pub index: Descriptor,
    /// Each arch's manifest, by arch suffix (`image:tag-<suffix>`).
    pub per_arch: Vec<(String, Descriptor)>,
}

/// Why a native build failed.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// The Dockerfile needs something the native builder cannot do exactly.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// An instruction failed (a missing source, an unknown user, ...).
    #[error("{}:{line}: {message} ({arch})", path.display())]
    Instruction {
        path: PathBuf,
        line: usize,
        arch: String,
        message: String,
    },
    /// A COPY or ADD failed.
    #[error("{}:{line}: {instruction} {source} ({arch})", path.display())]
    Copy {
        path: PathBuf,
        line: usize,
        arch: String,
        /// `COPY` or `ADD`.
        instruction: &'static str,
        #[source]
        source: Box<copy::CopyError>,
    },
    /// An instruction failed on an error of its own (a snapshot, the step cache, a
    /// base that does not resolve, ...), kept as the source.
    #[error("{}:{line}: {source} ({arch})", path.display())]
    Step {
        path: PathBuf,
        line: usize,
        arch: String,
        #[source]
        source: Box<StepError>,
    },
    #[error("build context: {0}")]
    Context(#[from] ContextError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Invalid(String),
    #[error("serialising {what}: {source}")]
    Serialise {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the build was cancelled")]
    Cancelled,
}

/// What an instruction failed on ([`NativeError::Step`]).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    StepCache(#[from] steps::StepCacheError),
    #[error(transparent)]
    Emulator(#[from] runtime::NoEmulator),
    #[error(transparent)]
    Expand(#[from] crate::build::dockerfile::lex::ExpandError),
    #[error(transparent)]
    Platform(#[from] image::BadPlatform),
    #[error(transparent)]
    Base(#[from] ResolveError),
    #[error(transparent)]
    Path(#[from] tree::ResolveError),
    #[error(transparent)]
    Expose(#[from] stage::ExposeError),
    #[error("not an octal mode: {0}")]
    Mode(#[from] std::num::ParseIntError),
}

/// Why a `FROM` (or `COPY --from`) name does not resolve to an image in the cache.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{name}: {source}")]
    Digest {
        name: String,
        #[source]
        source: kiln_shared::digest::DigestError,
    },
    #[error("{name}: {source}")]
    Cache {
        name: String,
        #[source]
        source: CacheError,
    },
    #[error("{name} is not in the cache (looked for {looked}); build or pull it first")]
    NotInCache { name: String, looked: String },
    #[error("workspace package {reference} is not built yet; build it before its dependents")]
    NotBuilt { reference: String },
    #[error("{name} is a {media_type}, not an image")]
    NotAnImage { name: String, media_type: String },
    #[error("{name} has no image for {platform}; build it for that platform first")]
    NoPlatform { name: String, platform: String },
}

/// Finds the image a `FROM` (or `COPY --from`) names, for one platform.
pub trait BaseResolver: Sync {
    /// The single-platform manifest for `name` (as written after expansion, e.g.
    /// `alpine:3.20`, `org/pkg:tag`, `name@sha256:...`) at `platform`; the manifest and
    /// its blobs must be in `cache`. The error says what is missing and what to do.
    fn resolve(
        &self,
        cache: &Cache,
        name: &str,
        platform: &Platform,
    ) -> Result<Descriptor, ResolveError>;
}

fn cache_err(name: &str) -> impl FnOnce(CacheError) -> ResolveError + '_ {
    move |source| ResolveError::Cache {
        name: name.to_owned(),
        source,
    }
}

/// Resolves names through the cache's `index.json` (`docker.io/<name>`, `library/` for
/// single-component names, tag `latest` by default, `@sha256:` digests), picking the
/// platform's manifest from an index.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheResolver;

impl BaseResolver for CacheResolver {
    fn resolve(
        &self,
        cache: &Cache,
        name: &str,
        platform: &Platform,
    ) -> Result<Descriptor, ResolveError> {
        let desc = if let Some((_, digest)) = name.split_once('@') {
            let digest: kiln_shared::digest::Digest =
                digest.parse().map_err(|source| ResolveError::Digest {
                    name: name.to_owned(),
                    source,
                })?;
            let manifest = cache.read_manifest(&digest).map_err(cache_err(name))?;
            let media_type = manifest
                .media_type
                .clone()
                .unwrap_or_else(|| crate::oci::OCI_MANIFEST.to_owned());
            let size = cache
                .blob_size(&digest)
                .map_err(cache_err(name))?
                .unwrap_or(0);
            Descriptor::new(media_type, digest, size)
        } else {
            let index = cache.index().map_err(cache_err(name))?;
            let candidates = cache_names(name);
            candidates
                .iter()
                .find_map(|c| index.get(c).cloned())
                .ok_or_else(|| ResolveError::NotInCache {
                    name: name.to_owned(),
                    looked: candidates.join(", "),
                })?
        };
        pick_platform(cache, name, desc, platform)
    }
}

/// Resolves workspace packages by repository name (whatever tag the `FROM` line has, or
/// none) to the tag the workspace builds, then anything else as [`CacheResolver`] does.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceResolver {
    /// Repository (`org/image`) -> the package's current reference.
    pub packages: BTreeMap<String, ImageRef>,
    /// Base names (as the Dockerfile writes them) -> the digest the package pins them
    /// to (its `kiln.lock`).
    pub pinned: BTreeMap<String, kiln_shared::digest::Digest>,
}

impl BaseResolver for WorkspaceResolver {
    fn resolve(
        &self,
        cache: &Cache,
        name: &str,
        platform: &Platform,
    ) -> Result<Descriptor, ResolveError> {
        if let Some(digest) = self.pinned.get(name) {
            let base = name.split('@').next().unwrap_or(name);
            return CacheResolver.resolve(cache, &format!("{base}@{digest}"), platform);
        }
        let repo = repository_of(name);
        let Some(r) = self.packages.get(repo) else {
            return CacheResolver.resolve(cache, name, platform);
        };
        let index = cache.index().map_err(cache_err(name))?;
        let desc = index
            .get(&r.cache_name())
            .cloned()
            .ok_or_else(|| ResolveError::NotBuilt {
                reference: r.to_string(),
            })?;
        pick_platform(cache, name, desc, platform)
    }
}

/// `org/image` of `docker.io/org/image:tag@sha256:...`.
pub fn repository_of(name: &str) -> &str {
    let name = name.split('@').next().unwrap_or(name);
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].find(':') {
        Some(i) => &name[..slash + i],
        None => name,
    }
}

/// The `index.json` names a `FROM` name may have.
pub fn cache_names(name: &str) -> Vec<String> {
    let last = name.rsplit('/').next().unwrap_or(name);
    let name = if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_domain {
        return vec![name];
    }
    let mut v = vec![format!("docker.io/{name}")];
    if !name.contains('/') {
        v.push(format!("docker.io/library/{name}"));
    }
    v.push(name);
    v
}

/// From an index, the manifest for `platform` (an arm64 variant of `v8` or none match
/// each other); a manifest is taken as it is.
pub fn pick_platform(
    cache: &Cache,
    name: &str,
    desc: Descriptor,
    platform: &Platform,
) -> Result<Descriptor, ResolveError> {
    if is_manifest(&desc.media_type) {
        return Ok(desc);
    }
    if !is_index(&desc.media_type) {
        return Err(ResolveError::NotAnImage {
            name: name.to_owned(),
            media_type: desc.media_type,
        });
    }
    let index = cache.read_manifest(&desc.digest).map_err(cache_err(name))?;
    let norm = |v: Option<&str>, arch: &str| match (arch, v) {
        ("arm64", Some("v8")) => None,
        (_, v) => v.map(str::to_owned),
    };
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == platform.os
                    && p.architecture == platform.architecture
                    && norm(p.variant.as_deref(), &p.architecture)
                        == norm(platform.variant.as_deref(), &platform.architecture)
            })
        })
        .cloned()
        .ok_or_else(|| ResolveError::NoPlatform {
            name: name.to_owned(),
            platform: image::platform_string(platform),
        })
}

/// The suffix of an arch's reference (`image:tag-<suffix>`): the architecture, with the
/// variant appended when there is one (`arm-v7`).
pub fn arch_suffix(arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{arch}-{v}"),
        None => arch.to_owned(),
    }
}

/// Builds `input` for each of its arches into `cache` and lands the result under
/// `input.image` (and `image:tag-<arch>`). `log` receives one line per step.
pub fn build(
    cache: &Cache,
    input: &NativeBuild,
    resolver: &dyn BaseResolver,
    log: &mut dyn FnMut(String),
) -> Result<BuildOutput, NativeError> {
    let built = build_images(cache, input, resolver, log)?;
    let mut index = None;
    let mut per_arch = Vec::new();
    for (suffix, platform, manifest) in built.images {
        index = Some(cache.merge_arch(&input.image, &suffix, platform, manifest.clone(), None)?);
        per_arch.push((suffix, manifest));
    }
    let index = index.ok_or_else(|| NativeError::Invalid("no architecture was built".into()))?;
    log(format!("{} -> {}", input.image, index.digest));
    Ok(BuildOutput { index, per_arch })
}

/// Builds `input` for each of its arches: the blobs go into `cache`, nothing is named
/// yet. Returns each arch's suffix, platform and manifest, for [`Cache::merge_arch`].
pub fn build_images(
    cache: &Cache,
    input: &NativeBuild,
    resolver: &dyn BaseResolver,
    log: &mut dyn FnMut(String),
) -> Result<NativeImages, NativeError> {
    let df = Dockerfile::read(&input.dockerfile)?;
    native_supports(&df, Capabilities::host())?;
    if input.arches.is_empty() {
        return Err(NativeError::Invalid(format!(
            "{}: no architectures to build",
            input.image
        )));
    }
    let mut shared = stage::Shared::new(cache, &df, input, resolver);
    let mut built = Vec::new();
    for (arch, variant) in &input.arches {
        let platform = Platform::linux(arch, variant.as_deref());
        let suffix = arch_suffix(arch, variant.as_deref());
        let manifest = shared.build_platform(&platform, &suffix, log)?;
        built.push((suffix, platform, manifest));
    }
    Ok(NativeImages {
        images: built,
        steps: shared.steps,
        cache_hits: shared.cache_hits,
    })
}

/// What [`build_images`] built.
#[derive(Debug, Clone)]
pub struct NativeImages {
    /// Each arch's suffix, platform and manifest, for [`Cache::merge_arch`].
    pub images: Vec<(String, Platform, Descriptor)>,
    /// Steps walked, and RUN steps the step cache answered.
    pub steps: u32,
    pub cache_hits: u32,
}

#[cfg(test)]
mod tests;
