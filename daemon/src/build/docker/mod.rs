//! The `docker` builder: one BuildKit build per (package, tag, arch) on a Docker engine,
//! exported by having the engine push the image into kilnd's registry as
//! `org/image:tag-<arch>`; the caller then merges that manifest into the package's index
//! (`Cache::merge_arch`).
//!
//! Docker 20.10 without the containerd image store can export neither OCI layouts nor
//! multi-platform images, so each platform is built on its own and leaves the engine by
//! `docker push`; the push sends compressed, hashed layers and skips those the registry
//! already holds. Nothing stays behind in the engine: the local tag is removed after the
//! push, and after a failure or cancellation too.

pub mod context;
pub mod engine;
mod engine_tag;
mod explain;
pub mod linuxkit;
pub mod progress;
pub mod push;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use kiln_shared::reference::ImageRef;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use context::{BuildContext, ContextError};
pub use engine::{Endpoint, Engine, EngineError, Engines, parse_engine_flag};
pub use engine_tag::{EngineTag, RemoveError};
pub use explain::explain;
pub use linuxkit::{LinuxkitInfo, linuxkit_build_args, linuxkit_labels};
pub use progress::{LogLine, LogSource};
pub use push::{ManifestError, PushStats, fetch_manifest};

use crate::oci::{Descriptor, Platform};
use engine_tag::remove_bounded;
use progress::Steps;

/// One architecture's build of a package.
#[derive(Debug, Clone)]
pub struct DockerBuild {
    /// The package directory (the build context).
    pub context_dir: PathBuf,
    /// The Dockerfile: absolute, or relative to `context_dir` (`build.yml`'s `dockerfile`
    /// override, else `Dockerfile`).
    pub dockerfile: PathBuf,
    /// `extra-sources`: (absolute source path, destination inside the context).
    pub extra_sources: Vec<(PathBuf, String)>,
    /// `org/image:tag`.
    pub image: ImageRef,
    /// `amd64`, `arm64`, `riscv64`, ...
    pub arch: String,
    /// All build args (see [`linuxkit_build_args`]).
    pub build_args: BTreeMap<String, String>,
    /// All labels (see [`linuxkit_labels`]).
    pub labels: BTreeMap<String, String>,
    /// `build.yml`'s `network: true`: network mode `host`, else `none`.
    pub network: bool,
    /// `build.yml`'s `disable-cache`.
    pub no_cache: bool,
}

impl DockerBuild {
    /// `linux/<arch>` (as BuildKit takes it).
    pub fn platform_string(&self) -> String {
        let p = platform_for_arch(&self.arch);
        match &p.variant {
            Some(v) => format!("linux/{}/{v}", p.architecture),
            None => format!("linux/{}", p.architecture),
        }
    }
}

/// The OCI platform kiln records for a LinuxKit arch name (`arm` is `arm/v7`).
pub fn platform_for_arch(arch: &str) -> Platform {
    match arch {
        "arm" => Platform::linux("arm", Some("v7")),
        a => Platform::linux(a, None),
    }
}

/// What a finished build produced.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The manifest the engine pushed, as the registry serves it at `tag-<arch>`.
    pub manifest: Descriptor,
    /// The engine's image id (config digest).
    pub image_id: Option<String>,
    pub duration: Duration,
    /// Of `duration`, the time until the engine had built the image (the rest is the
    /// push).
    pub build_time: Duration,
    /// Steps answered from BuildKit's cache.
    pub cache_hits: usize,
    /// Steps that ran.
    pub steps_run: usize,
    pub push: PushStats,
}

/// Why a build failed. Each message names the image, arch and engine and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DockerBuildError {
    #[error("{image} ({arch}): {source}")]
    Context {
        image: String,
        arch: String,
        #[source]
        source: ContextError,
    },
    #[error("{image} ({arch}): {source}")]
    Engine {
        image: String,
        arch: String,
        #[source]
        source: EngineError,
    },
    #[error(
        "{image} ({arch}): the Docker engine at {endpoint} went away during the build \
         ({detail}); it stopped or restarted. kiln builds again on the next change (or \
         `kiln build`); check the engine (`docker info`, its log)"
    )]
    EngineLost {
        image: String,
        arch: String,
        endpoint: String,
        detail: String,
    },
    #[error("{image} ({arch}): step {step:?} failed: {error}{}", tail_text(.tail))]
    StepFailed {
        image: String,
        arch: String,
        step: String,
        error: String,
        /// The step's last output lines.
        tail: Vec<String>,
    },
    #[error("{image} ({arch}): the build failed on {endpoint}: {message}")]
    BuildFailed {
        image: String,
        arch: String,
        endpoint: String,
        message: String,
    },
    #[error(
        "{image} ({arch}): the engine at {endpoint} could not push to the registry at \
         {registry}: {message}"
    )]
    Push {
        image: String,
        arch: String,
        endpoint: String,
        registry: String,
        message: String,
    },
    #[error("{image} ({arch}): cannot read the pushed manifest back")]
    Manifest {
        image: String,
        arch: String,
        #[source]
        source: push::ManifestError,
    },
    #[error("{image} ({arch}): cancelled")]
    Cancelled { image: String, arch: String },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  | {}", tail.join("\n  | "))
    }
}

/// One JSON message of the engine's build stream.
#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    aux: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "errorDetail")]
    error_detail: Option<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
}

/// The reference the engine builds and pushes: `<push_to>/org/image:tag-<arch>`.
pub fn push_reference(build: &DockerBuild, push_to: &str) -> (String, String) {
    (
        format!("{push_to}/{}", build.image.repo),
        format!("{}-{}", build.image.tag, build.arch),
    )
}

/// Builds `build` for its arch on `engine`, has the engine push the image to the registry
/// at `push_to` (`127.0.0.1:PORT`, kilnd's) as `org/image:tag-<arch>`, and returns the
/// pushed manifest as that registry serves it, with the tag left in the engine: the
/// caller lands the manifest, then removes the tag ([`EngineTag::remove`]). Log lines go
/// to `log` as they come. Cancelling `cancel` stops the build (the engine aborts it when
/// its connection closes); after a failure or cancellation the engine's tag is removed
/// before this returns.
pub async fn build_arch(
    engine: &Engine,
    build: &DockerBuild,
    push_to: &str,
    log: &mut (dyn FnMut(LogLine) + Send),
    cancel: CancellationToken,
) -> Result<(BuildOutcome, EngineTag), DockerBuildError> {
    let started = Instant::now();
    let image = build.image.to_string();
    let arch = build.arch.clone();
    let endpoint = engine.endpoint().to_string();
    let mut emit = |source: LogSource, step: Option<String>, text: String| {
        log(LogLine {
            at_ms: started.elapsed().as_millis() as u64,
            source,
            step,
            text,
        })
    };
    let cancelled = || DockerBuildError::Cancelled {
        image: image.clone(),
        arch: arch.clone(),
    };

    if push_to.starts_with('[') || push_to.contains('/') || !push_to.contains(':') {
        return Err(DockerBuildError::Push {
            image: image.clone(),
            arch: arch.clone(),
            endpoint: endpoint.clone(),
            registry: push_to.to_owned(),
            message: "the engine needs the registry as HOST:PORT with an IPv4 address or a \
                      name (image references cannot hold IPv6 literals); use 127.0.0.1:PORT"
                .into(),
        });
    }
    let docker = tokio::select! {
        r = engine.client() => r.map_err(|source| DockerBuildError::Engine {
            image: image.clone(),
            arch: arch.clone(),
            source,
        })?,
        () = cancel.cancelled() => return Err(cancelled()),
    };

    let (dir, df, extra) = (
        build.context_dir.clone(),
        build.dockerfile.clone(),
        build.extra_sources.clone(),
    );
    let (repo, tag) = push_reference(build, push_to);
    let reference = format!("{repo}:{tag}");
    // While the context is scanned, remove what an earlier build that lost its engine may
    // have left under this name (building over it would leave a dangling image).
    let (scanned, stale) = tokio::join!(
        tokio::task::spawn_blocking(move || BuildContext::scan(&dir, &df, &extra)),
        remove_bounded(&docker, &reference),
    );
    if let Err(e) = stale {
        tracing::debug!(%reference, error = %kiln_shared::error::Chain(&e), "cannot remove a stale tag before building");
    }
    let ctx = scanned
        .map_err(|e| DockerBuildError::Context {
            image: image.clone(),
            arch: arch.clone(),
            source: ContextError::Io {
                path: build.context_dir.clone(),
                source: io::Error::other(e.to_string()),
            },
        })?
        .map_err(|source| DockerBuildError::Context {
            image: image.clone(),
            arch: arch.clone(),
            source,
        })?;
    emit(
        LogSource::Kiln,
        None,
        format!(
            "building {image} for {} on {endpoint} (context: {} entries, {} bytes)",
            build.platform_string(),
            ctx.names().count(),
            ctx.file_bytes()
        ),
    );

    let query = build_query(build, &ctx, &reference);
    // From here on the engine may hold the tag: it is removed whatever happens.
    let engine_tag = EngineTag {
        docker: Some(docker.clone()),
        reference: reference.clone(),
    };
    let result = run_build(
        engine, &docker, &query, ctx, &mut emit, &cancel, &image, &arch,
    )
    .await;
    let mut built_at = Duration::ZERO;
    let result = match result {
        Ok((image_id, steps)) => {
            built_at = started.elapsed();
            emit(LogSource::Kiln, None, format!("pushing {reference}"));
            let mut status = |s: String| emit(LogSource::Kiln, None, format!("push: {s}"));
            let pushed = tokio::select! {
                r = push::push(&docker, &repo, &tag, &mut status) => r.map_err(|e| match e {
                    push::PushError::Engine(message) => DockerBuildError::Push {
                        image: image.clone(),
                        arch: arch.clone(),
                        endpoint: endpoint.clone(),
                        registry: push_to.to_owned(),
                        message,
                    },
                    push::PushError::Connection(detail) => DockerBuildError::EngineLost {
                        image: image.clone(),
                        arch: arch.clone(),
                        endpoint: endpoint.clone(),
                        detail: format!("while pushing: {detail}"),
                    },
                }),
                () = cancel.cancelled() => Err(cancelled()),
            };
            pushed.map(|push| (image_id, steps, push))
        }
        Err(e) => Err(e),
    };
    if matches!(
        result,
        Err(DockerBuildError::EngineLost { .. } | DockerBuildError::Engine { .. })
    ) {
        engine.forget_version();
    }
    let result = match result {
        Ok(r) => Ok(r),
        Err(e) => {
            // Clean up in the engine before reporting the failure (a dropped future
            // leaves it to the tag's Drop).
            if let Err(why) = engine_tag.remove().await {
                emit(
                    LogSource::Kiln,
                    None,
                    format!(
                        "warning: cannot remove {reference} from the engine: {}",
                        kiln_shared::error::Chain(&why)
                    ),
                );
            }
            return Err(e);
        }
    };
    let (image_id, steps, push) = result?;
    // The engine's last push message names the manifest; ask the registry only if it
    // did not (an engine that words it otherwise).
    let manifest = match &push.manifest {
        Some(d) => d.clone(),
        None => match fetch_manifest(push_to, &build.image.repo.to_string(), &tag).await {
            Ok(d) => d,
            Err(source) => {
                let _ = engine_tag.remove().await;
                return Err(DockerBuildError::Manifest {
                    image: image.clone(),
                    arch: arch.clone(),
                    source,
                });
            }
        },
    };
    let outcome = BuildOutcome {
        manifest,
        image_id,
        duration: started.elapsed(),
        build_time: built_at,
        cache_hits: steps.cache_hits(),
        steps_run: steps.executed(),
        push,
    };
    emit(
        LogSource::Kiln,
        None,
        format!(
            "built {image} for {} in {:.2}s (build {:.2}s, push {:.2}s): {} ({} steps cached, {} run; {} layers pushed, {} already there)",
            build.platform_string(),
            outcome.duration.as_secs_f64(),
            outcome.build_time.as_secs_f64(),
            (outcome.duration - outcome.build_time).as_secs_f64(),
            outcome.manifest.digest,
            outcome.cache_hits,
            outcome.steps_run,
            outcome.push.pushed,
            outcome.push.existing,
        ),
    );
    Ok((outcome, engine_tag))
}

fn build_query(build: &DockerBuild, ctx: &BuildContext, reference: &str) -> String {
    let json = |m: &BTreeMap<String, String>| {
        // A map of strings always serialises.
        serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("version", "2")
        .append_pair("t", reference)
        .append_pair("dockerfile", ctx.dockerfile_name())
        .append_pair("platform", &build.platform_string())
        .append_pair("networkmode", if build.network { "host" } else { "none" })
        .append_pair("rm", "1")
        .append_pair("forcerm", "1");
    if build.no_cache {
        query.append_pair("nocache", "1");
    }
    if !build.build_args.is_empty() {
        query.append_pair("buildargs", &json(&build.build_args));
    }
    if !build.labels.is_empty() {
        query.append_pair("labels", &json(&build.labels));
    }
    query.finish()
}

type Emit<'a> = dyn FnMut(LogSource, Option<String>, String) + Send + 'a;

#[allow(clippy::too_many_arguments)]
async fn run_build(
    engine: &Engine,
    docker: &bollard::Docker,
    query: &str,
    ctx: BuildContext,
    emit: &mut Emit<'_>,
    cancel: &CancellationToken,
    image: &str,
    arch: &str,
) -> Result<(Option<String>, Steps), DockerBuildError> {
    let endpoint = engine.endpoint().to_string();
    let lost = |detail: String| DockerBuildError::EngineLost {
        image: image.to_owned(),
        arch: arch.to_owned(),
        endpoint: endpoint.clone(),
        detail,
    };
    let cancelled = || DockerBuildError::Cancelled {
        image: image.to_owned(),
        arch: arch.to_owned(),
    };
    let (resp, _conn) = tokio::select! {
        r = engine.post_build(docker, query, ctx.into_stream()) => r.map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::ConnectionRefused {
                DockerBuildError::Engine {
                    image: image.to_owned(),
                    arch: arch.to_owned(),
                    source: EngineError::Unreachable { endpoint: engine.endpoint().clone(), source: std::sync::Arc::new(e) },
                }
            } else {
                lost(e.to_string())
            }
        })?,
        () = cancel.cancelled() => return Err(cancelled()),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = tokio::select! {
            r = body.collect() => r.map(|c| c.to_bytes()).unwrap_or_default(),
            () = cancel.cancelled() => return Err(cancelled()),
        };
        let text = String::from_utf8_lossy(&bytes);
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| text.trim().to_owned());
        return Err(DockerBuildError::BuildFailed {
            image: image.to_owned(),
            arch: arch.to_owned(),
            endpoint,
            message: format!("{status}: {message}"),
        });
    }

    let mut steps = Steps::default();
    let mut image_id = None;
    let mut pending: Vec<u8> = Vec::new();
    let mut error: Option<String> = None;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        let data: Bytes = match frame {
            None => break,
            Some(Err(e)) => return Err(lost(kiln_shared::error::chain(&e))),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        pending.extend_from_slice(data.chunk());
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            handle_line(&line, &mut steps, &mut image_id, &mut error, emit);
        }
    }
    if !pending.is_empty() {
        let line = std::mem::take(&mut pending);
        handle_line(&line, &mut steps, &mut image_id, &mut error, emit);
    }
    if let Some(message) = error {
        if let Some((step, error, tail)) = steps.failed_step() {
            return Err(DockerBuildError::StepFailed {
                image: image.to_owned(),
                arch: arch.to_owned(),
                step,
                error,
                tail,
            });
        }
        return Err(DockerBuildError::BuildFailed {
            image: image.to_owned(),
            arch: arch.to_owned(),
            endpoint,
            message,
        });
    }
    if image_id.is_none() {
        return Err(lost(
            "the connection closed before the engine reported a result".into(),
        ));
    }
    Ok((image_id, steps))
}

fn handle_line(
    line: &[u8],
    steps: &mut Steps,
    image_id: &mut Option<String>,
    error: &mut Option<String>,
    emit: &mut Emit<'_>,
) {
    let line = line.trim_ascii();
    if line.is_empty() {
        return;
    }
    let msg: Message = match serde_json::from_slice(line) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, line = %String::from_utf8_lossy(line), "unexpected build message");
            return;
        }
    };
    if let Some(e) = msg.error_detail.and_then(|d| d.message).or(msg.error) {
        // Not logged here: the failed step's ERROR line has said it, and the build's
        // outcome line says it once more, in Dockerfile terms (`explain`).
        *error = Some(e);
        return;
    }
    match (msg.id.as_deref(), msg.aux) {
        (Some("moby.buildkit.trace"), Some(serde_json::Value::String(b64))) => {
            match progress::decode_trace(&b64) {
                Ok(status) => {
                    for (source, step, text) in steps.apply(status) {
                        emit(source, step, text);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "undecodable BuildKit trace"),
            }
        }
        (Some("moby.image.id"), Some(aux)) => {
            if let Some(id) = aux.get("ID").and_then(|v| v.as_str()) {
                *image_id = Some(id.to_owned());
            }
        }
        _ => {
            if let Some(s) = msg.stream {
                for l in s.lines().filter(|l| !l.trim().is_empty()) {
                    emit(LogSource::Kiln, None, l.to_owned());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DockerBuild {
        DockerBuild {
            context_dir: "/p".into(),
            dockerfile: "Dockerfile".into(),
            extra_sources: vec![],
            image: "kiln/hello:abc".parse().unwrap(),
            arch: "arm64".into(),
            build_args: BTreeMap::from([("A".to_owned(), "x y&z".to_owned())]),
            labels: BTreeMap::from([("org.mobyproject.config".to_owned(), "{\"a\":1}".to_owned())]),
            network: false,
            no_cache: true,
        }
    }

    #[test]
    fn query_carries_every_option() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let ctx = BuildContext::scan(d.path(), std::path::Path::new("Dockerfile"), &[]).unwrap();
        let b = sample();
        let (repo, tag) = push_reference(&b, "127.0.0.1:5000");
        assert_eq!(
            (repo.as_str(), tag.as_str()),
            ("127.0.0.1:5000/kiln/hello", "abc-arm64")
        );
        let query = build_query(&b, &ctx, &format!("{repo}:{tag}"));
        // What the engine reads back (Go's url.ParseQuery).
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let expected = [
            ("version", "2"),
            ("t", "127.0.0.1:5000/kiln/hello:abc-arm64"),
            ("dockerfile", "Dockerfile"),
            ("platform", "linux/arm64"),
            ("networkmode", "none"),
            ("rm", "1"),
            ("forcerm", "1"),
            ("nocache", "1"),
            ("buildargs", r#"{"A":"x y&z"}"#),
            ("labels", r#"{"org.mobyproject.config":"{\"a\":1}"}"#),
        ];
        assert_eq!(
            pairs,
            expected.map(|(k, v)| (k.to_owned(), v.to_owned())),
            "{query}"
        );
        assert!(!query.contains(' ') && !query.contains('"'), "{query}");
        let mut b = sample();
        b.network = true;
        b.no_cache = false;
        b.arch = "arm".into();
        let query = build_query(&b, &ctx, "r:t");
        assert!(query.contains("networkmode=host"), "{query}");
        assert!(query.contains("platform=linux%2Farm%2Fv7"), "{query}");
        assert!(!query.contains("nocache"), "{query}");
    }

    #[tokio::test]
    async fn an_ipv6_registry_address_is_refused_up_front() {
        // No engine listens there: the address is refused before any engine call.
        let engine = Engine::new(Some("tcp://127.0.0.1:1")).unwrap();
        let mut log = |_: LogLine| {};
        for bad in ["[::1]:5000", "127.0.0.1", "host:5000/path"] {
            let err = build_arch(&engine, &sample(), bad, &mut log, CancellationToken::new())
                .await
                .unwrap_err();
            assert!(
                matches!(err, DockerBuildError::Push { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("127.0.0.1:PORT"), "{err}");
        }
    }

    #[test]
    fn stream_messages_fold_into_results() {
        let mut steps = Steps::default();
        let mut id = None;
        let mut err = None;
        let mut lines = Vec::new();
        let mut emit = |s: LogSource, st: Option<String>, t: String| lines.push((s, st, t));
        handle_line(
            br#"{"id":"moby.image.id","aux":{"ID":"sha256:abc"}}"#,
            &mut steps,
            &mut id,
            &mut err,
            &mut emit,
        );
        handle_line(
            br#"{"errorDetail":{"message":"failed to solve: x"},"error":"failed to solve: x"}"#,
            &mut steps,
            &mut id,
            &mut err,
            &mut emit,
        );
        handle_line(b"not json\n", &mut steps, &mut id, &mut err, &mut emit);
        assert_eq!(id.as_deref(), Some("sha256:abc"));
        assert_eq!(err.as_deref(), Some("failed to solve: x"));
        // The error is kept for the outcome, not logged twice.
        assert!(lines.is_empty(), "{lines:?}");
    }
}
