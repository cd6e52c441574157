//! The control requests (build, cancel, gc) that the API hands to the event loop with a
//! reply channel, and how the loop answers them.

use kiln_shared::protocol::{
    BuildId, BuildRequest, BuildResponse, CancelRequest, CancelResponse, GcResponse, QueuedBuild,
    TransferRequest, TransferResponse,
};
use kiln_shared::reference::arch_ref;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::Controller;
use crate::plan;
use crate::schedule::{CancelFilter, Outcome, QueueReason};
use crate::workspace::{BuilderKind, Planned};

/// Why the daemon core refused or failed a control request. Each maps to an HTTP status:
/// the refusals to theirs, the failures (which keep their source) to 500.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such package, arch or build (404).
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense (400), e.g. an arch the package does not list.
    #[error("{0}")]
    Invalid(String),
    /// It cannot be done now (409), e.g. a GC while one runs.
    #[error("{0}")]
    Conflict(String),
    /// The cache could not be read or changed.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The RUN snapshots could not be collected.
    #[error(transparent)]
    Snapshots(#[from] crate::build::native::snapshot::SnapshotError),
    /// The build queue has stopped.
    #[error(transparent)]
    Stopped(#[from] crate::schedule::Stopped),
    #[error("gc stopped: {0}")]
    GcStopped(#[source] tokio::task::JoinError),
}

/// What a control request answers.
pub type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A request for the daemon core, with the channel to answer it on.
#[derive(Debug)]
pub enum ControlRequest {
    Build {
        req: BuildRequest,
        reply: Reply<BuildResponse>,
    },
    Cancel {
        req: CancelRequest,
        reply: Reply<CancelResponse>,
    },
    Gc {
        reply: Reply<GcResponse>,
    },
    /// `kiln pull`: fetch from the upstreams without building.
    Pull {
        req: TransferRequest,
        reply: Reply<TransferResponse>,
    },
    /// `kiln push`: push what the cache holds to the push upstreams.
    Push {
        req: TransferRequest,
        reply: Reply<TransferResponse>,
    },
}

impl Controller {
    /// Answers a control request.
    pub async fn on_control(&mut self, req: ControlRequest) {
        match req {
            ControlRequest::Build { req, reply } => {
                let r = self.build_request(req).await.map(|(r, _)| r);
                let _ = reply.send(r);
            }
            ControlRequest::Cancel { req, reply } => {
                let _ = reply.send(self.cancel_request(req).await);
            }
            ControlRequest::Gc { reply } => self.gc(reply),
            ControlRequest::Pull { req, reply } => self.transfer(false, req, reply),
            ControlRequest::Push { req, reply } => self.transfer(true, req, reply),
        }
    }

    /// Queues the builds a request asks for (and the missing builds of the packages it
    /// follows); returns them, with a receiver of each one's outcome.
    pub async fn build_request(
        &mut self,
        req: BuildRequest,
    ) -> Result<(BuildResponse, Vec<oneshot::Receiver<Outcome>>), ControlError> {
        let p = self.planned(&req.package)?;
        let archs = match &req.arch {
            Some(a) if p.archs().contains(a) => vec![a.clone()],
            Some(a) => {
                return Err(ControlError::Invalid(format!(
                    "{} does not list arch {a} (it lists {})",
                    p.pkg.repo,
                    p.archs().join(", ")
                )));
            }
            None => p.archs(),
        };
        let builder = match req.builder.as_deref() {
            None => None,
            Some("native") => Some(BuilderKind::Native),
            Some("docker") => Some(BuilderKind::Docker),
            Some(b) => {
                return Err(ControlError::Invalid(format!(
                    "unknown builder {b:?}: use native or docker"
                )));
            }
        };
        let index = self.cache.index()?;
        let image = p.image();
        let mut jobs = Vec::new();
        let mut up_to_date = Vec::new();
        for arch in archs {
            if !req.force && index.get(&arch_ref(&image, &arch)).is_some() {
                up_to_date.push(arch);
            } else {
                plan::missing_deps(&self.table, &p, &arch, &index, &mut jobs);
                let mut job = plan::job(&p, &arch, req.force, QueueReason::Requested);
                if let Some(b) = builder {
                    job.builder = b;
                    job.fallback = false;
                }
                jobs.push(job);
            }
        }
        let joined = self.sched.submit_joined(jobs.clone()).await?;
        let (ids, waits): (Vec<BuildId>, Vec<_>) = joined.into_iter().unzip();
        let response = BuildResponse {
            builds: jobs
                .into_iter()
                .zip(ids)
                .map(|(j, id)| QueuedBuild {
                    id,
                    package: j.key.package,
                    arch: j.key.arch,
                    tag: j.tag,
                    reason: j.reason.to_string(),
                })
                .collect(),
            up_to_date,
        };
        Ok((response, waits))
    }

    /// The planned package a request names (`org/image` or its directory); a broken
    /// package is a conflict that says why it cannot be built.
    pub(super) fn planned(&self, package: &str) -> Result<Arc<Planned>, ControlError> {
        if let Some(p) = plan::find(&self.table, package) {
            return Ok(p);
        }
        let dir = std::fs::canonicalize(package).ok();
        if let Some(b) = self
            .broken
            .values()
            .find(|b| b.package == package || Some(&b.dir) == dir.as_ref())
        {
            return Err(ControlError::Conflict(format!(
                "{} cannot be built: {} (kilnd plans it again when the file is saved)",
                b.package, b.error
            )));
        }
        let known: Vec<String> = self
            .table
            .read()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        Err(ControlError::NotFound(format!(
            "no package {package:?} in the workspace (known: {})",
            known.join(", ")
        )))
    }

    async fn cancel_request(&mut self, req: CancelRequest) -> Result<CancelResponse, ControlError> {
        let ids = self
            .sched
            .cancel(CancelFilter {
                build_id: req.build,
                package: req.package,
                arch: req.arch,
                reason: None,
            })
            .await?;
        Ok(CancelResponse { cancelled: ids })
    }
}
