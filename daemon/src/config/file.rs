//! `kiln.toml` as written: serde types that refuse unknown keys; [`super::Config`]
//! validates them.

use std::path::PathBuf;

use serde::Deserialize;

/// `kiln.toml`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default)]
    pub registry: FileRegistry,
    #[serde(default)]
    pub api: FileApi,
    #[serde(default)]
    pub build: FileBuild,
    #[serde(default)]
    pub watch: FileWatch,
    /// Images to import into the cache at start, from OCI image layouts.
    #[serde(default)]
    pub import: Vec<Import>,
    /// Per-package settings, by image name (`org/image`).
    #[serde(default)]
    pub packages: std::collections::BTreeMap<String, FilePackage>,
    /// Upstream registries, in the order they are asked.
    #[serde(default)]
    pub upstream: Vec<FileUpstream>,
}

/// `[[upstream]]`: a registry kiln fetches from (and pushes to, with `push = true`).
/// Credentials are never here: they come from docker's config.json or the auth file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileUpstream {
    /// `host[:port]`.
    pub registry: String,
    /// Repository prefix: `org/image` is `PREFIX/org/image` there.
    pub prefix: Option<String>,
    /// Plain HTTP [default: true for loopback registries].
    pub insecure: Option<bool>,
    /// A CA certificate (PEM) to trust, relative to kiln.toml.
    pub ca_file: Option<PathBuf>,
    pub push: Option<bool>,
    /// A mirror of Docker Hub (asked for docker.io images only).
    pub mirror: Option<bool>,
}

/// `[packages."org/image"]`: settings of one package (build.yml stays LinuxKit's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePackage {
    pub builder: Option<String>,
}

/// `[[import]]`: an image taken from an OCI image layout (a base image made without a
/// registry) into the cache, so that a `FROM` can name it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// The layout directory (relative to kiln.toml).
    pub layout: PathBuf,
    /// The reference name inside the layout, e.g. `docker.io/kiln/busybox:latest`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The name in the cache (`org/image:tag`); default: the same as `ref`.
    pub name: Option<String>,
    /// Only when the upstreams cannot give the image (offline): the name is resolved
    /// through the upstreams first, as any base, and this layout stands in when they
    /// fail. Without it, the layout is the image (imported at start, never looked up).
    #[serde(default)]
    pub fallback: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    pub dir: Option<PathBuf>,
    #[serde(rename = "max-size")]
    pub max_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBuild {
    pub jobs: Option<usize>,
    pub builder: Option<String>,
    /// Platform -> engine endpoint.
    pub engines: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWatch {
    #[serde(rename = "quiet-ms")]
    pub quiet_ms: Option<u64>,
    #[serde(rename = "dev-tag")]
    pub dev_tag: Option<String>,
    #[serde(rename = "pull-wait")]
    pub pull_wait: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRegistry {
    pub listen: Option<Vec<String>>,
    #[serde(rename = "allow-hosts")]
    pub allow_hosts: Option<Vec<String>>,
    #[serde(rename = "allow-delete")]
    pub allow_delete: Option<bool>,
    /// Upload sessions open at once.
    #[serde(rename = "max-uploads")]
    pub max_uploads: Option<usize>,
    /// Bytes all unfinished uploads may hold together (e.g. "32G").
    #[serde(rename = "max-upload-bytes")]
    pub max_upload_bytes: Option<String>,
    /// Seconds an upload may stay idle before it is dropped.
    #[serde(rename = "upload-idle")]
    pub upload_idle: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    pub socket: Option<PathBuf>,
}
