//! kilnd's configuration: command-line flags, `KILN_*` environment variables and
//! `kiln.toml`, merged in that order of precedence over the defaults, then validated into
//! the [`Config`] the rest of the daemon uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use std::time::Duration;

use clap::Parser;
use kiln_shared::reference::Tag;

use crate::cache::parse_size;
use crate::plan::{BuilderMode, Builders};
use crate::upstream::UpstreamSpec;

mod file;

pub use file::*;

/// The registry's default port.
pub const DEFAULT_PORT: u16 = 5000;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {source}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A `--listen` entry, or one of `registry.listen` in the config file `path`.
    #[error("{}: {source}", listen_origin(.path.as_deref()))]
    Listen {
        path: Option<PathBuf>,
        #[source]
        source: ListenError,
    },
    #[error("{0}")]
    Builder(#[source] crate::plan::UnknownBuilder),
    #[error(transparent)]
    Upstream(Box<crate::upstream::UpstreamError>),
    #[error("cannot read the current directory: {0}")]
    Cwd(#[source] std::io::Error),
    #[error("dev tag: {0}")]
    DevTag(#[source] kiln_shared::reference::ReferenceError),
    #[error("max-size: {0}")]
    MaxSize(#[source] crate::cache::SizeError),
    #[error("{0}")]
    Invalid(String),
}

/// Where a `--listen` entry came from, as [`ConfigError::Listen`] names it.
fn listen_origin(file: Option<&Path>) -> String {
    match file {
        Some(p) => format!("config file {}: registry.listen", p.display()),
        None => "--listen".to_owned(),
    }
}

/// kilnd's flags as a daemon (`kilnd [OPTIONS] [ROOT]...`; main.rs adds the one-off
/// commands).
#[derive(Debug, Clone, Parser)]
#[command(name = "kilnd", version, about, long_about = None)]
pub struct Args {
    /// Workspace roots to watch (directories holding packages). Default: the current
    /// directory.
    #[arg(value_name = "ROOT")]
    pub roots: Vec<PathBuf>,

    /// The OCI image-layout cache directory [default: $XDG_CACHE_HOME/kiln]
    #[arg(long, env = "KILN_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,

    /// Address for the registry to listen on, as IP:PORT or NAME:PORT (a name listens on
    /// every address it resolves to; repeatable; port 0 picks a free port)
    /// [default: 127.0.0.1:5000 and [::1]:5000]
    #[arg(long, env = "KILN_LISTEN", value_name = "ADDR", value_delimiter = ',')]
    pub listen: Vec<String>,

    /// Host name the registry answers to besides loopback names (repeatable); needed when
    /// listening on a non-loopback address.
    #[arg(
        long = "allow-host",
        env = "KILN_ALLOW_HOST",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allow_hosts: Vec<String>,

    /// Serve DELETE of manifests and blobs on the registry (off by default: the registry
    /// has no authentication, and any local user can reach it)
    #[arg(long, env = "KILN_ALLOW_DELETE")]
    pub allow_delete: bool,

    /// The control socket [default: $XDG_RUNTIME_DIR/kiln/kilnd.sock, else
    /// <cache>/kilnd.sock]
    #[arg(long, env = "KILN_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Write the bound addresses here (JSON) once kilnd is ready.
    #[arg(long, env = "KILN_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Configuration file [default: kiln.toml at the first root, if present]
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Builds at once [default: the number of cores]
    #[arg(long, short = 'j', env = "KILN_JOBS", value_name = "N")]
    pub jobs: Option<usize>,

    /// Which builder builds packages: auto (native, RUN steps in runc, where it can do
    /// all of the Dockerfile, else docker), native or docker [default: auto]
    #[arg(long, env = "KILN_BUILDER", value_name = "BUILDER")]
    pub builder: Option<String>,

    /// A Docker engine for a platform, as PLATFORM=ENDPOINT (repeatable), e.g.
    /// linux/arm64=tcp://arm-host:2375. Other platforms use DOCKER_HOST or the local
    /// socket.
    #[arg(
        long = "engine",
        env = "KILN_ENGINE",
        value_name = "PLATFORM=ENDPOINT",
        value_delimiter = ','
    )]
    pub engines: Vec<String>,

    /// Longest a save waits for a file still open for writing or a new directory to fill, in ms [default: 50]
    #[arg(long, env = "KILN_QUIET_MS", value_name = "MS")]
    pub quiet_ms: Option<u64>,

    /// The moving tag that follows each package's newest successful build [default: dev]
    #[arg(long, env = "KILN_DEV_TAG", value_name = "TAG")]
    pub dev_tag: Option<String>,

    /// How long a pull of a tag being built waits for the build, in seconds [default: 120]
    #[arg(long, env = "KILN_PULL_WAIT", value_name = "SECONDS")]
    pub pull_wait: Option<u64>,

    /// Size cap of the cache for garbage collection (e.g. 20G) [default: none]
    #[arg(long, env = "KILN_MAX_SIZE", value_name = "SIZE")]
    pub max_size: Option<String>,

    /// An upstream registry that targets and base images are fetched from before
    /// building, in order, as REGISTRY[/PREFIX] (repeatable; loopback ones are plain HTTP)
    #[arg(
        long = "upstream",
        env = "KILN_UPSTREAM",
        value_name = "REGISTRY[/PREFIX]",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,

    /// Push every target kiln builds to the upstreams
    #[arg(long, env = "KILN_PUSH")]
    pub push: bool,

    /// A mirror of Docker Hub, asked for docker.io images before Docker Hub (repeatable)
    #[arg(
        long = "mirror",
        env = "KILN_MIRROR",
        value_name = "REGISTRY[/PREFIX]",
        value_delimiter = ','
    )]
    pub mirrors: Vec<String>,
}

/// The registry's upload bounds from `[registry]`, over the defaults.
fn registry_uploads(
    r: &FileRegistry,
    file: Option<&Path>,
) -> Result<crate::registry::UploadLimits, ConfigError> {
    let err = |message: String| ConfigError::Parse {
        path: file.map(Path::to_path_buf).unwrap_or_default(),
        message,
    };
    let mut limits = crate::registry::UploadLimits::default();
    if let Some(n) = r.max_uploads {
        if n == 0 {
            return Err(err("registry.max-uploads must be at least 1".into()));
        }
        limits.max_sessions = n;
    }
    if let Some(s) = &r.max_upload_bytes {
        limits.max_bytes =
            parse_size(s).map_err(|e| err(format!("registry.max-upload-bytes: {e}")))?;
    }
    if let Some(secs) = r.upload_idle {
        if secs == 0 {
            return Err(err("registry.upload-idle must be at least 1 second".into()));
        }
        limits.idle = Duration::from_secs(secs);
    }
    Ok(limits)
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub roots: Vec<PathBuf>,
    pub cache: PathBuf,
    /// Addresses to bind, and whether they are kilnd's defaults (a default that cannot be
    /// bound, such as `[::1]` on a host without IPv6, is a warning, not an error).
    pub listen: Vec<SocketAddr>,
    pub skip_unavailable: bool,
    pub allow_hosts: Vec<String>,
    pub allow_delete: bool,
    pub uploads: crate::registry::UploadLimits,
    pub socket: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub jobs: usize,
    pub builders: Builders,
    /// `PLATFORM=ENDPOINT` entries, file first, flags after (later ones win).
    pub engines: Vec<String>,
    pub quiet: Duration,
    pub dev_tag: Tag,
    pub pull_wait: Duration,
    pub max_size: Option<u64>,
    /// Images to import at start: (layout, reference inside it, full cache name).
    pub imports: Vec<(PathBuf, String, String)>,
    /// Images to import only when the upstreams cannot give them (`fallback = true`).
    pub fallback_imports: Vec<(PathBuf, String, String)>,
    /// Upstream registries: Docker Hub mirrors first, then the others, each in order.
    pub upstreams: Vec<UpstreamSpec>,
}

impl Config {
    /// Merges flags and environment (already in `args`) over `kiln.toml` over defaults.
    pub fn load(args: Args) -> Result<Config, ConfigError> {
        let cwd = std::env::current_dir().map_err(ConfigError::Cwd)?;
        let roots: Vec<PathBuf> = if args.roots.is_empty() {
            vec![cwd.clone()]
        } else {
            args.roots.iter().map(|r| cwd.join(r)).collect()
        };
        for root in &roots {
            if !root.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "workspace root {} is not a directory",
                    root.display()
                )));
            }
        }
        let (file, config_file) = match &args.config {
            Some(path) => (read_file_config(path)?, Some(path.clone())),
            None => {
                let path = roots[0].join("kiln.toml");
                if path.exists() {
                    (read_file_config(&path)?, Some(path))
                } else {
                    (FileConfig::default(), None)
                }
            }
        };
        let base = config_file
            .as_ref()
            .and_then(|p| p.parent())
            .map_or(cwd.clone(), Path::to_path_buf);

        let cache = match (args.cache, file.cache.dir) {
            (Some(dir), _) => cwd.join(dir),
            (None, Some(dir)) => base.join(dir),
            (None, None) => default_cache_dir()?,
        };

        let uploads = registry_uploads(&file.registry, config_file.as_deref())?;
        let allow_delete = args.allow_delete || file.registry.allow_delete.unwrap_or(false);
        let mut allow_hosts = if args.allow_hosts.is_empty() {
            file.registry.allow_hosts.unwrap_or_default()
        } else {
            args.allow_hosts
        };
        let listen_given = if args.listen.is_empty() {
            file.registry.listen.map(|l| (l, true))
        } else {
            Some((args.listen, false))
        };
        let (listen, skip_unavailable) = if let Some((list, in_file)) = listen_given {
            let mut addrs = Vec::new();
            let mut several = false;
            for entry in &list {
                let resolved = resolve_listen(entry).map_err(|source| ConfigError::Listen {
                    path: in_file.then(|| config_file.clone().unwrap_or_default()),
                    source,
                })?;
                several |= resolved.addrs.len() > 1;
                // A name the registry listens under is a name clients reach it by.
                if let Some(name) = resolved.name
                    && !allow_hosts.contains(&name)
                {
                    allow_hosts.push(name);
                }
                for a in resolved.addrs {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            (addrs, several)
        } else {
            (
                vec![
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DEFAULT_PORT),
                ],
                true,
            )
        };
        if listen.is_empty() {
            return Err(ConfigError::Invalid(
                "registry.listen is empty: give at least one address".into(),
            ));
        }

        let socket = match (args.socket, file.api.socket) {
            (Some(p), _) => cwd.join(p),
            (None, Some(p)) => base.join(p),
            (None, None) => default_socket(&cache),
        };

        let file_err = |message: String| ConfigError::Parse {
            path: config_file.clone().unwrap_or_default(),
            message,
        };
        // `--builder` decides for every package; else kiln.toml, per package first.
        let builders = match args.builder {
            Some(b) => Builders {
                default: b.parse().map_err(ConfigError::Builder)?,
                packages: Default::default(),
            },
            None => Builders {
                default: match file.build.builder {
                    Some(b) => b
                        .parse()
                        .map_err(|e| file_err(format!("build.builder: {e}")))?,
                    None => BuilderMode::Auto,
                },
                packages: file
                    .packages
                    .iter()
                    .filter_map(|(name, p)| p.builder.as_ref().map(|b| (name, b)))
                    .map(|(name, b)| {
                        let mode = b
                            .parse()
                            .map_err(|e| file_err(format!("packages.{name:?}.builder: {e}")))?;
                        Ok((name.clone(), mode))
                    })
                    .collect::<Result<_, ConfigError>>()?,
            },
        };
        let mut engines: Vec<String> = file
            .build
            .engines
            .unwrap_or_default()
            .into_iter()
            .map(|(p, e)| format!("{p}={e}"))
            .collect();
        engines.extend(args.engines);
        let dev_tag = args
            .dev_tag
            .or(file.watch.dev_tag)
            .unwrap_or_else(|| "dev".into());
        let dev_tag: Tag = dev_tag.parse().map_err(ConfigError::DevTag)?;
        let max_size = args
            .max_size
            .or(file.cache.max_size)
            .map(|s| parse_size(&s))
            .transpose()
            .map_err(ConfigError::MaxSize)?;
        let jobs = args
            .jobs
            .or(file.build.jobs)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        if jobs == 0 {
            return Err(ConfigError::Invalid("jobs must be at least 1".into()));
        }

        let (fallback_imports, imports): (Vec<_>, Vec<_>) =
            file.import.into_iter().partition(|i| i.fallback);
        let parse_import = |i: file::Import| {
            let name = match &i.name {
                Some(n) => n
                    .parse::<kiln_shared::reference::ImageRef>()
                    .map(|r| r.cache_name())
                    .map_err(|e| file_err(format!("import name: {e}")))?,
                None => i.reference.clone(),
            };
            Ok((base.join(&i.layout), i.reference, name))
        };
        let imports = imports
            .into_iter()
            .map(parse_import)
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let fallback_imports = fallback_imports
            .into_iter()
            .map(parse_import)
            .collect::<Result<Vec<_>, ConfigError>>()?;

        let upstreams = upstreams(
            &args.upstreams,
            &args.mirrors,
            args.push,
            file.upstream,
            &base,
            &file_err,
        )?;

        Ok(Config {
            upstreams,
            imports,
            fallback_imports,
            roots,
            cache,
            listen,
            skip_unavailable,
            allow_hosts,
            allow_delete,
            uploads,
            socket,
            ready_file: args.ready_file.map(|p| cwd.join(p)),
            config_file,
            jobs,
            builders,
            engines,
            quiet: Duration::from_millis(args.quiet_ms.or(file.watch.quiet_ms).unwrap_or(50)),
            dev_tag,
            pull_wait: Duration::from_secs(args.pull_wait.or(file.watch.pull_wait).unwrap_or(120)),
            max_size,
        })
    }
}

/// Flags (or `KILN_UPSTREAM`/`KILN_MIRROR`) replace kiln.toml's entries of their kind;
/// `--push` makes every non-mirror upstream take pushes.
fn upstreams(
    flags: &[String],
    mirror_flags: &[String],
    push: bool,
    file: Vec<FileUpstream>,
    base: &Path,
    file_err: &dyn Fn(String) -> ConfigError,
) -> Result<Vec<UpstreamSpec>, ConfigError> {
    let parse = |s: &str| {
        s.parse::<UpstreamSpec>()
            .map_err(|e| ConfigError::Upstream(Box::new(e)))
    };
    let mut from_file = Vec::new();
    for (i, u) in file.into_iter().enumerate() {
        let what = format!("upstream[{i}] ({})", u.registry);
        let mut spec: UpstreamSpec = match &u.prefix {
            Some(p) => format!("{}/{p}", u.registry),
            None => u.registry.clone(),
        }
        .parse()
        .map_err(|e| file_err(format!("{what}: {e}")))?;
        if let Some(insecure) = u.insecure {
            spec.insecure = insecure;
        }
        spec.ca_file = u.ca_file.map(|f| base.join(f));
        spec.push = u.push.unwrap_or(false);
        spec.mirror = u.mirror.unwrap_or(false);
        if spec.push && spec.mirror {
            return Err(file_err(format!(
                "{what}: a Docker Hub mirror is never pushed to; drop push or mirror"
            )));
        }
        from_file.push(spec);
    }
    let (file_mirrors, file_upstreams): (Vec<_>, Vec<_>) =
        from_file.into_iter().partition(|s| s.mirror);
    let mut mirrors = if mirror_flags.is_empty() {
        file_mirrors
    } else {
        mirror_flags
            .iter()
            .map(|s| {
                parse(s).map(|spec| UpstreamSpec {
                    mirror: true,
                    ..spec
                })
            })
            .collect::<Result<_, _>>()?
    };
    let mut others = if flags.is_empty() {
        file_upstreams
    } else {
        flags.iter().map(|s| parse(s)).collect::<Result<_, _>>()?
    };
    if push {
        for u in &mut others {
            u.push = true;
        }
    }
    mirrors.append(&mut others);
    Ok(mirrors)
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Toml {
        path: path.to_owned(),
        source,
    })
}

/// What one `--listen` entry stands for.
struct Listen {
    /// The host name, when the entry named one rather than an IP.
    name: Option<String>,
    addrs: Vec<SocketAddr>,
}

/// Why a `--listen` entry names no address.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0:?} is not an address such as 127.0.0.1:5000 or localhost:5000")]
    Shape(String),
    #[error("cannot resolve {host:?} (from {entry:?}): {source}")]
    Resolve {
        host: String,
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host:?} (from {entry:?}) resolves to no address")]
    NoAddress { host: String, entry: String },
}

/// `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`; a name is resolved (`localhost:5000` is
/// 127.0.0.1:5000 and [::1]:5000), as the registry clients that connect to it will.
fn resolve_listen(entry: &str) -> Result<Listen, ListenError> {
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Ok(Listen {
            name: None,
            addrs: vec![addr],
        });
    }
    let shape = || ListenError::Shape(entry.to_owned());
    let (host, port) = entry.rsplit_once(':').ok_or_else(shape)?;
    let port: u16 = port.parse().map_err(|_| shape())?;
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return Err(shape());
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|source| ListenError::Resolve {
            host: host.to_owned(),
            entry: entry.to_owned(),
            source,
        })?
        .fold(Vec::new(), |mut v, a| {
            if !v.contains(&a) {
                v.push(a);
            }
            v
        });
    if addrs.is_empty() {
        return Err(ListenError::NoAddress {
            host: host.to_owned(),
            entry: entry.to_owned(),
        });
    }
    Ok(Listen {
        name: Some(host.to_ascii_lowercase()),
        addrs,
    })
}

/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn default_cache_dir() -> Result<PathBuf, ConfigError> {
    kiln_shared::protocol::default_cache_dir().ok_or_else(|| {
        ConfigError::Invalid(
            "neither XDG_CACHE_HOME nor HOME is set: give the cache directory with --cache".into(),
        )
    })
}

/// `$XDG_RUNTIME_DIR/kiln/kilnd.sock`, else `<cache>/kilnd.sock`.
pub fn default_socket(cache: &Path) -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    kiln_shared::protocol::default_socket_path(runtime, cache.to_owned())
}

#[cfg(test)]
mod tests;
