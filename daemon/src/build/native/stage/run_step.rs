//! `RUN`: the step's inputs resolved (command from SHELL or `/bin/sh -c`, ENV, the
//! stage's ARG values, USER, WORKDIR, network, mounts), looked up in the per-step cache by
//! its parent chain and those inputs, and otherwise run in a container on the stage's
//! snapshots; its upper directory becomes the layer and the snapshot of the new chain.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;

use super::super::diff::diff;
use super::super::layer::write_layer;
use super::super::runtime::{self, STANDARD_MOUNTS, Step};
use super::super::snapshot::Snapshots;
use super::super::steps::{StepCache, StepKey};
use super::super::{NativeError, mounts};
use super::user::resolve_user;
use super::{Run, StageState};
use crate::build::dockerfile::{Located, MountKind, RunArgs};
use crate::build::native::image::rfc3339;

/// `PATH` of a step whose image sets none, as BuildKit gives it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Run<'_, '_> {
    pub(super) fn run_step(
        &mut self,
        i: usize,
        st: &mut StageState,
        r: &RunArgs,
        ins: &Located<crate::build::dockerfile::Instruction>,
        log: &mut dyn FnMut(String),
    ) -> Result<(), NativeError> {
        let line = ins.line;
        if let Some(why) = super::super::refuse::run_refusal(r) {
            return Err(self.refuse(line, why));
        }
        let runtime_path =
            runtime::availability().map_err(|why| self.refuse(line, format!("RUN: {why}")))?;
        // The command, as BuildKit builds it.
        let args = self.command(st, &r.command);
        // ENV, then the stage's ARG values that ENV does not set.
        let env_pairs = st.config.config.env_pairs();
        let mut env: Vec<String> = env_pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut arg_env = Vec::new();
        for (k, v) in &st.args {
            if !env_pairs.iter().any(|(e, _)| e == k) && !arg_env.iter().any(|(a, _)| a == k) {
                arg_env.push((k.clone(), v.clone()));
            }
        }
        env.extend(arg_env.iter().map(|(k, v)| format!("{k}={v}")));
        if !env_pairs.iter().any(|(k, _)| k == "PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let cwd = st
            .config
            .config
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let user = st.config.config.user.clone().unwrap_or_default();
        let (uid, gid) = if user.is_empty() {
            (0, 0)
        } else {
            self.ensure_tree(st, self.needs_content[i], line)?;
            let tree = st.tree.as_ref().ok_or_else(|| self.err(line, "no tree"))?;
            resolve_user(tree, &user).map_err(|e| self.err(line, format!("USER {user}: {e}")))?
        };
        let network = match r.network.as_deref() {
            Some("host") => true,
            Some("none") => false,
            _ => self.shared.input.network,
        };
        let mut parsed = Vec::new();
        for m in &r.mounts {
            let m = self.x(st, m, line)?;
            parsed.push(
                crate::build::dockerfile::RunMount::parse(&m)
                    .map_err(|e| self.err(line, format!("--mount={m}: {e}")))?,
            );
        }

        let cache = self.shared.cache;
        let snapshots = Snapshots::open(cache).map_err(|e| self.fail(line, e))?;
        let chains = Snapshots::chain_ids(&st.config.rootfs.diff_ids);
        // Each stage or image a bind mount shows, mounted read-only for the step.
        let mut views = Vec::new();
        let mut from_roots = BTreeMap::new();
        for m in &parsed {
            let (MountKind::Bind, Some(from)) = (m.kind, &m.from) else {
                continue;
            };
            if from_roots.contains_key(from) {
                continue;
            }
            let (layers, diff_ids) = match self.df().stage_index(from, i) {
                Some(j) => {
                    let s = self.states[j].as_ref().ok_or_else(|| {
                        self.err(
                            line,
                            format!("--mount from={from}: that stage was not built"),
                        )
                    })?;
                    (s.layers.clone(), s.config.rootfs.diff_ids.clone())
                }
                None => {
                    let (config, layers) = self.load_image(from, &self.platform, line)?;
                    (layers, config.rootfs.diff_ids)
                }
            };
            let lowers = snapshots
                .ensure(cache, &layers, &diff_ids)
                .map_err(|e| self.fail(line, e))?;
            let view = runtime::View::mount(&snapshots, &lowers)
                .map_err(|e| self.err(line, format!("--mount from={from}: {e}")))?;
            let chain = Snapshots::chain_ids(&diff_ids)
                .last()
                .map_or_else(|| "scratch".to_owned(), ToString::to_string);
            from_roots.insert(from.clone(), (view.root(), chain));
            views.push(view);
        }
        let mut mount_plan = mounts::plan(
            &parsed,
            &cwd,
            &self.suffix,
            &snapshots,
            &self.shared.input.context,
            &from_roots,
        )
        .map_err(|e| match e {
            mounts::MountError::Refused(why) => self.refuse(line, why),
            e => self.err(line, e.to_string()),
        })?;
        let key = StepKey {
            parent: chains.last().map(ToString::to_string),
            platform: super::super::image::platform_string(&self.platform),
            args: args.clone(),
            env: env.clone(),
            cwd: cwd.clone(),
            user: (uid, gid),
            network,
            mounts: mount_plan.key.clone(),
        };
        let steps = StepCache::open(cache).map_err(|e| self.fail(line, e))?;
        let shown = ins.text.clone();
        let created_by = created_by(&args, &arg_env);
        if !self.shared.input.no_cache
            && let Some(hit) = steps.get(cache, &key)
        {
            log(format!("[{}] CACHED {shown}", self.suffix));
            self.shared.cache_hits += 1;
            self.push_run_layer(st, hit.layer, hit.diff_id, created_by, line)?;
            return Ok(());
        }
        runtime::check_emulator(&self.platform).map_err(|e| self.fail(line, e))?;
        let lowers = snapshots
            .ensure(cache, &st.layers, &st.config.rootfs.diff_ids)
            .map_err(|e| self.fail(line, e))?;
        let step = Step {
            args,
            env,
            cwd,
            uid: u32::try_from(uid).unwrap_or(u32::MAX),
            gid: u32::try_from(gid).unwrap_or(u32::MAX),
            network,
            mounts: std::mem::take(&mut mount_plan.mounts),
            lowers: lowers.clone(),
        };
        // The runtime's own mount points are left out; a `--mount` target that did not
        // exist stays as an empty directory, as BuildKit leaves it.
        let excluded: BTreeSet<String> = STANDARD_MOUNTS.iter().map(|s| (*s).to_owned()).collect();
        let started = std::time::Instant::now();
        let cancel = self.shared.input.cancel.clone();
        let suffix = self.suffix.clone();
        let mut out = |l: String| log(format!("[{suffix}] {l}"));
        let finished = runtime::run(&snapshots, &runtime_path, &step, &mut out, &|| {
            cancel.is_cancelled()
        })
        .map_err(|e| match e {
            runtime::RuntimeError::Cancelled => NativeError::Cancelled,
            e => self.err(line, format!("RUN: {e}")),
        })?;
        drop(mount_plan);
        drop(views);
        let d = diff(&finished.upper, &lowers, &excluded)
            .map_err(|e| self.err(line, format!("reading the changes of RUN: {e}")))?;
        let epoch = self.shared.input.source_date_epoch;
        let layer = write_layer(cache, &d.tree, &d.paths, epoch)?;
        drop(d);
        log(format!(
            "[{}] ran in {:.2}s; layer {} ({} bytes)",
            self.suffix,
            started.elapsed().as_secs_f64(),
            layer.desc.digest,
            layer.desc.size
        ));
        let mut with = st.config.rootfs.diff_ids.clone();
        with.push(layer.diff_id.clone());
        if let Some(chain) = Snapshots::chain_ids(&with).last() {
            snapshots
                .commit(&finished.upper, chain)
                .map_err(|e| self.fail(line, e))?;
        }
        drop(finished);
        steps.put(&key, &layer.desc, &layer.diff_id);
        self.push_run_layer(st, layer.desc, layer.diff_id, created_by, line)
    }

    /// Adds a RUN's layer to the stage: its layers, config and, when the stage's tree is
    /// materialised, the tree (so a later COPY or USER sees what the RUN made).
    fn push_run_layer(
        &mut self,
        st: &mut StageState,
        desc: crate::oci::Descriptor,
        diff_id: kiln_shared::digest::Digest,
        created_by: String,
        line: usize,
    ) -> Result<(), NativeError> {
        if let Some(tree) = st.tree.as_mut() {
            let path = self.shared.cache.blob_path(&desc.digest);
            let file = File::open(&path)
                .map_err(|e| self.err(line, format!("layer {}: {e}", desc.digest)))?;
            let reader = flate2::read::MultiGzDecoder::new(BufReader::new(file));
            let content = st.tree_has_content;
            let keep_all = |_: &str| true;
            let keep_ids = |p: &str| p == "etc/passwd" || p == "etc/group";
            let keep: &dyn Fn(&str) -> bool = if content { &keep_all } else { &keep_ids };
            tree.apply_layer(reader, Some(&self.spool), keep)
                .map_err(|e| self.err(line, format!("layer {}: {e}", desc.digest)))?;
        }
        st.layers.push(desc);
        st.config.rootfs.diff_ids.push(diff_id);
        st.config
            .history
            .push(crate::build::native::image::History {
                created: Some(rfc3339(self.shared.input.source_date_epoch)),
                created_by: Some(created_by),
                author: None,
                comment: Some("buildkit.dockerfile.v0".into()),
                empty_layer: false,
            });
        Ok(())
    }
}

/// BuildKit's history line of a RUN: `RUN |2 A=1 B=2 /bin/sh -c cmd # buildkit`.
fn created_by(args: &[String], arg_env: &[(String, String)]) -> String {
    let mut s = String::from("RUN ");
    if !arg_env.is_empty() {
        s.push_str(&format!("|{} ", arg_env.len()));
        for (k, v) in arg_env {
            s.push_str(&format!("{k}={v} "));
        }
    }
    s.push_str(&args.join(" "));
    s.push_str(" # buildkit");
    s
}
