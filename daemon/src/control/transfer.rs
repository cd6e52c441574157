//! `kiln pull` and `kiln push`: fetch packages (or any image) from the upstreams without
//! building, and push what the cache holds. Each request runs as its own task, so the
//! event loop keeps answering; each name gets one result line.

use std::sync::Arc;

use kiln_shared::protocol::{TransferRequest, TransferResponse, TransferResult};
use kiln_shared::reference::{RepoName, Tag, arch_ref};

use super::Controller;
use super::fetch::{land_all, report_pulled};
use super::push::{publish_upstreams, push_and_report};
use super::request::{ControlError, Reply};
use crate::build::docker::platform_for_arch;
use crate::bus::Bus;
use crate::cache::Cache;
use crate::plan;
use crate::upstream::Upstreams;
use crate::workspace::PackageTable;

/// What a transfer task needs.
struct Ctx {
    cache: Arc<Cache>,
    bus: Bus,
    table: Arc<PackageTable>,
    upstreams: Arc<Upstreams>,
    dev_tag: Tag,
}

impl Controller {
    /// Answers `kiln pull` (`push` false) or `kiln push` in a task of its own.
    pub(super) fn transfer(
        &self,
        push: bool,
        req: TransferRequest,
        reply: Reply<TransferResponse>,
    ) {
        let Some(upstreams) = self.cfg.upstreams.clone() else {
            let _ = reply.send(Err(ControlError::Invalid(
                "kilnd has no upstream registry".into(),
            )));
            return;
        };
        if push && !upstreams.pushes() {
            let _ = reply.send(Err(ControlError::Invalid(
                "no upstream takes pushes: start kilnd with --push, or set push = true on an \
                 [[upstream]] in kiln.toml"
                    .into(),
            )));
            return;
        }
        let ctx = Ctx {
            cache: Arc::clone(&self.cache),
            bus: self.bus.clone(),
            table: Arc::clone(&self.table),
            upstreams,
            dev_tag: self.cfg.dev_tag.clone(),
        };
        self.tasks.spawn(async move {
            let mut results = Vec::new();
            for name in &req.names {
                if push {
                    results.extend(ctx.push(name).await);
                } else {
                    results.extend(ctx.pull(name, req.arch.as_deref()).await);
                }
            }
            publish_upstreams(&ctx.upstreams, &ctx.bus);
            let _ = reply.send(Ok(TransferResponse { results }));
        });
    }
}

fn result(name: impl Into<String>, ok: bool, message: impl Into<String>) -> TransferResult {
    TransferResult {
        name: name.into(),
        ok,
        message: message.into(),
    }
}

fn dirty(tag: &Tag) -> bool {
    tag.as_str().contains("-dirty")
}

impl Ctx {
    /// A workspace package: each of its arches the cache lacks, from the upstreams, landed
    /// as a build would land. Anything else: the image, whole, under its full name.
    async fn pull(&self, name: &str, arch: Option<&str>) -> Vec<TransferResult> {
        let Some(p) = plan::find(&self.table, name) else {
            return vec![match self.upstreams.fetch_image(&self.cache, name).await {
                Ok(f) => result(
                    name,
                    true,
                    format!(
                        "pulled {} from {} in {} ms ({} bytes new)",
                        f.desc.digest,
                        f.upstream,
                        f.elapsed.as_millis(),
                        f.bytes
                    ),
                ),
                Err(e) => result(name, false, e.to_string()),
            }];
        };
        let image = p.image();
        let package = p.pkg.repo.to_string();
        if dirty(&p.tag) {
            return vec![result(
                format!("{image}"),
                false,
                "a dirty tag names uncommitted changes: it is never looked up upstream; build it",
            )];
        }
        let archs = match arch {
            Some(a) if p.archs().iter().any(|x| x == a) => vec![a.to_owned()],
            Some(a) => {
                return vec![result(
                    format!("{image}"),
                    false,
                    format!(
                        "{package} does not list arch {a} (it lists {})",
                        p.archs().join(", ")
                    ),
                )];
            }
            None => p.archs(),
        };
        let mut out = Vec::new();
        let index = self.cache.index().ok();
        let (mut cached, mut missing) = (Vec::new(), Vec::new());
        for a in archs {
            match index.as_ref().and_then(|i| i.get(&arch_ref(&image, &a))) {
                Some(d) => cached.push((a, d.clone())),
                None => missing.push(a),
            }
        }
        // A target fetched lazily is in the cache without its bytes: the user asks for
        // them here (e.g. to work offline).
        for (arch, desc) in cached {
            let shown = format!("{image} ({arch})");
            out.push(match self.cache.ensure_graph(&desc).await {
                Ok(0) => result(shown, true, "already in the cache"),
                Ok(bytes) => result(
                    shown,
                    true,
                    format!("already in the cache; fetched its {bytes} bytes on demand"),
                ),
                Err(e) => result(shown, false, e.to_string()),
            });
        }
        if missing.is_empty() {
            return out;
        }
        let wanted: Vec<_> = missing
            .iter()
            .map(|a| (a.clone(), platform_for_arch(a)))
            .collect();
        let fetched = match self
            .upstreams
            .fetch_package(&self.cache, &image, &wanted, false)
            .await
        {
            Ok(Some(f)) => f,
            Ok(None) => {
                out.extend(missing.iter().map(|arch| {
                    result(
                        format!("{image} ({arch})"),
                        false,
                        "in no upstream (kiln build builds it)",
                    )
                }));
                return out;
            }
            Err(e) => {
                out.extend(
                    missing
                        .iter()
                        .map(|arch| result(format!("{image} ({arch})"), false, e.to_string())),
                );
                return out;
            }
        };
        let current = plan::find(&self.table, &package).is_some_and(|c| c.tag == image.tag);
        let (cache, landed, dev) = (
            Arc::clone(&self.cache),
            (image.clone(), fetched.clone()),
            current.then(|| self.dev_tag.clone()),
        );
        let landing = tokio::task::spawn_blocking(move || {
            land_all(&cache, &[(&landed.0, &landed.1, dev.as_ref())])
        })
        .await;
        let landing = match landing {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("landing stopped: {e}")),
        };
        for arch in missing {
            let shown = format!("{image} ({arch})");
            let Some((_, desc)) = fetched.archs.iter().find(|(a, _)| *a == arch) else {
                out.push(result(
                    shown,
                    false,
                    "in no upstream (kiln build builds it)",
                ));
                continue;
            };
            match &landing {
                Ok(()) => {
                    report_pulled(&self.bus, &package, &arch, &image.tag, desc, &fetched);
                    out.push(result(
                        shown,
                        true,
                        format!(
                            "pulled {} from {} in {} ms ({} bytes new)",
                            desc.digest,
                            fetched.upstream,
                            fetched.elapsed.as_millis(),
                            fetched.bytes
                        ),
                    ));
                }
                Err(e) => out.push(result(shown, false, e.clone())),
            }
        }
        out
    }

    /// A workspace package's current tag, from the cache to every push upstream.
    async fn push(&self, name: &str) -> Vec<TransferResult> {
        let Some(p) = plan::find(&self.table, name) else {
            return vec![result(name, false, "no such package in the workspace")];
        };
        let image = p.image();
        if dirty(&p.tag) {
            return vec![result(
                format!("{image}"),
                false,
                "a dirty tag names uncommitted changes: it is never pushed; commit them first",
            )];
        }
        if !self
            .cache
            .index()
            .is_ok_and(|i| i.get(&image.cache_name()).is_some())
        {
            return vec![result(
                format!("{image}"),
                false,
                "not in the cache yet: `kiln build` it first",
            )];
        }
        let mounts: Vec<RepoName> = p.deps.iter().filter_map(|(r, _)| r.parse().ok()).collect();
        let package = p.pkg.repo.to_string();
        push_and_report(
            &self.upstreams,
            &self.cache,
            &self.bus,
            &package,
            &image,
            &mounts,
            None,
        )
        .await
        .into_iter()
        .map(|r| match r.error {
            None => result(
                format!("{image}"),
                true,
                format!(
                    "pushed to {} in {} ms: {}",
                    r.upstream,
                    r.duration_ms,
                    r.references.join(", ")
                ),
            ),
            Some(e) => result(format!("{image}"), false, e),
        })
        .collect()
    }
}
