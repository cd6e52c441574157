//! The per-step cache of RUN: a step's result (its layer) keyed by everything that can
//! change it, the chain ID of the root it runs on and the step's resolved command, env,
//! working directory, user, network and mounts, for the platform. A COPY needs no entry
//! here: the same content gives the same layer bytes, so the chain a later RUN starts
//! from, and its key, stay the same when only a file copied after it changed.
//!
//! Entries are small JSON files under `<cache>/.kiln/steps/`, written whole (temp file,
//! rename); an entry whose layer blob GC removed is a miss.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_shared::digest::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cache::Cache;
use crate::oci::Descriptor;

/// What a RUN step's result depends on.
#[derive(Debug, Clone, Serialize)]
pub struct StepKey {
    /// Chain ID of the stage's layers before the step (`None`: an empty root).
    pub parent: Option<String>,
    pub platform: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: (u64, u64),
    pub network: bool,
    /// The mounts, each with what identifies its content.
    pub mounts: Vec<String>,
}

impl StepKey {
    fn id(&self) -> String {
        let json = serde_json::to_vec(&(1u32, self)).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// A cached step's layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub layer: Descriptor,
    pub diff_id: Digest,
}

#[derive(Debug, Clone)]
pub struct StepCache {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("the step cache {}: {source}", dir.display())]
pub struct StepCacheError {
    dir: PathBuf,
    #[source]
    source: io::Error,
}

impl StepCache {
    pub fn open(cache: &Cache) -> Result<StepCache, StepCacheError> {
        StepCache::at(&cache.root().join(".kiln").join("steps"))
    }

    fn at(dir: &Path) -> Result<StepCache, StepCacheError> {
        fs::create_dir_all(dir).map_err(|source| StepCacheError {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(StepCache {
            dir: dir.to_owned(),
        })
    }

    /// The step's layer, when it ran before and its blob is still in `cache`.
    pub fn get(&self, cache: &Cache, key: &StepKey) -> Option<StepResult> {
        let bytes = fs::read(self.dir.join(key.id())).ok()?;
        let r: StepResult = serde_json::from_slice(&bytes).ok()?;
        matches!(cache.blob_size(&r.layer.digest), Ok(Some(_))).then_some(r)
    }

    /// Records a step's layer; a failure to record only costs a re-run later.
    pub fn put(&self, key: &StepKey, layer: &Descriptor, diff_id: &Digest) {
        let r = StepResult {
            layer: layer.clone(),
            diff_id: diff_id.clone(),
        };
        let id = key.id();
        let written = serde_json::to_vec(&r)
            .map_err(io::Error::other)
            .and_then(|b| {
                let mut tmp = tempfile::Builder::new()
                    .prefix(".step-")
                    .tempfile_in(&self.dir)?;
                io::Write::write_all(&mut tmp, &b)?;
                tmp.persist(self.dir.join(&id)).map_err(|e| e.error)?;
                Ok(())
            });
        if let Err(e) = written {
            tracing::warn!("cannot record RUN step {id} in {}: {e}", self.dir.display());
        }
    }
}
