//! The tag a build leaves in the engine, and its removal: nothing stays behind in the
//! engine once a build has landed, failed or been cancelled.

use std::time::Duration;

use super::push;

/// The tag a build leaves in the engine (`<registry>/org/image:tag-<arch>`). The image
/// is served from kilnd's registry as soon as it has landed in the cache; the engine's
/// copy is then removed by [`EngineTag::remove`], off the path to serving. Dropped
/// without that (a cancelled or failed build), it is removed in the background.
pub struct EngineTag {
    pub(super) docker: Option<bollard::Docker>,
    pub(super) reference: String,
}

impl std::fmt::Debug for EngineTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EngineTag").field(&self.reference).finish()
    }
}

impl EngineTag {
    /// The reference the tag names.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Removes the tag (and what only it used) from the engine.
    pub async fn remove(mut self) -> Result<(), RemoveError> {
        match self.docker.take() {
            Some(docker) => remove_bounded(&docker, &self.reference).await,
            None => Ok(()),
        }
    }
}

impl Drop for EngineTag {
    fn drop(&mut self) {
        if let (Some(docker), Ok(rt)) = (self.docker.take(), tokio::runtime::Handle::try_current())
        {
            let reference = std::mem::take(&mut self.reference);
            rt.spawn(async move {
                if let Err(e) = remove_bounded(&docker, &reference).await {
                    tracing::warn!(%reference, error = %kiln_shared::error::Chain(&e), "cannot remove an abandoned build's image");
                }
            });
        }
    }
}

/// How long removing a tag may take before kiln gives up on it (an engine that accepts
/// connections but does not answer).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an engine's tag could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error(transparent)]
    Engine(#[from] bollard::errors::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

pub(super) async fn remove_bounded(
    docker: &bollard::Docker,
    reference: &str,
) -> Result<(), RemoveError> {
    tokio::time::timeout(CLEANUP_TIMEOUT, push::remove_local(docker, reference))
        .await
        .map_err(|_| RemoveError::Timeout(CLEANUP_TIMEOUT))?
        .map_err(RemoveError::from)
}
