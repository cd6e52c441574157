//! `COPY` and `ADD`: sources from the context, another stage or an image, applied to the
//! stage's tree, and the layer of what they changed (written once per identical change).

use std::collections::BTreeSet;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::super::copy::{self, CopyOpts};
use super::super::layer::write_layer;
use super::super::refuse::is_octal_mode;
use super::super::tree::{Content, Kind, Node, Tree, clean, join, parent};
use super::super::{NativeError, context};
use crate::build::dockerfile::{CopyArgs, Instruction, Located};

use super::user::resolve_user;
use super::{Run, StageState};

impl Run<'_, '_> {
    pub(super) fn copy(
        &mut self,
        i: usize,
        st: &mut StageState,
        c: &CopyArgs,
        is_add: bool,
        ins: &Located<Instruction>,
        log: &mut dyn FnMut(String),
    ) -> Result<(), NativeError> {
        let line = ins.line;
        let kw = if is_add { "ADD" } else { "COPY" };
        let mut sources = Vec::new();
        for s in &c.sources {
            sources.push(self.x(st, s, line)?);
        }
        let dest_raw = self.x(st, &c.dest, line)?;
        if sources.len() > 1 && !dest_raw.ends_with('/') {
            return Err(self.err(
                line,
                format!("when using {kw} with more than one source file, the destination must be a directory and end with a /"),
            ));
        }
        let wd = st.config.config.working_dir.clone().unwrap_or_default();
        let dest_dir = dest_raw.is_empty() || dest_raw == "." || dest_raw.ends_with('/');
        let dest = if dest_raw.starts_with('/') {
            clean(&dest_raw)
        } else {
            clean(&join(&clean(&wd), &dest_raw))
        };
        let chmod = match &c.chmod {
            Some(m) => {
                let m = self.x(st, m, line)?;
                if !is_octal_mode(&m) {
                    return Err(self.refuse(
                        line,
                        format!("{kw} --chmod={m} is not an octal mode (symbolic modes are not supported)"),
                    ));
                }
                Some(u32::from_str_radix(&m, 8).map_err(|e| self.fail(line, e))?)
            }
            None => None,
        };
        let chown_spec = match &c.chown {
            Some(u) => Some(self.x(st, u, line)?),
            None => None,
        };
        self.ensure_tree(st, self.needs_content[i], line)?;
        let chown = match &chown_spec {
            Some(u) => {
                let tree = st.tree.as_ref().ok_or_else(|| self.err(line, "no tree"))?;
                Some(
                    resolve_user(tree, u)
                        .map_err(|e| self.err(line, format!("--chown={u}: {e}")))?,
                )
            }
            None => None,
        };
        let opts = CopyOpts {
            chown,
            chmod,
            epoch: self.shared.input.source_date_epoch,
            unpack: is_add,
            confine: c.from.is_none(),
        };
        // The source tree: the context, another stage, or an image.
        let mut src_owned: Option<Tree> = None;
        let mut src_stage = None;
        if let Some(from) = &c.from {
            let name = self.expand_global(from, line)?;
            match self.df().stage_index(&name, i) {
                Some(j) => {
                    let Some(mut s) = self.states[j].take() else {
                        return Err(
                            self.err(line, format!("--from={name}: that stage was not built"))
                        );
                    };
                    let r = self.ensure_tree(&mut s, true, line);
                    self.states[j] = Some(s);
                    r?;
                    src_stage = Some(j);
                }
                None if name.eq_ignore_ascii_case("scratch") => {
                    src_owned = Some(Tree::new(Node::dir(0o755, 0, 0, 0)));
                }
                None => {
                    if !self.image_trees.contains_key(&name) {
                        let (_, layers) = self.load_image(&name, &self.platform, line)?;
                        let tree = self.materialise(&layers, true, line)?;
                        self.image_trees.insert(name.clone(), tree);
                    }
                    src_owned = self.image_trees.get(&name).cloned();
                }
            }
        } else if self.shared.context.is_none() {
            let input = self.shared.input;
            self.shared.context =
                Some(context::read_context(&input.context, &input.extra_sources)?);
        }
        let spool = Arc::clone(&self.spool);
        let mut changed = BTreeSet::new();
        {
            let src: &Tree = match (&src_owned, src_stage) {
                (Some(t), _) => t,
                (None, Some(j)) => self.states[j]
                    .as_ref()
                    .and_then(|s| s.tree.as_ref())
                    .ok_or_else(|| self.err(line, "source stage has no tree"))?,
                (None, None) => self
                    .shared
                    .context
                    .as_ref()
                    .ok_or_else(|| self.err(line, "no build context"))?,
            };
            let dst = st.tree.as_mut().ok_or_else(|| self.err(line, "no tree"))?;
            for s in &sources {
                copy::copy(dst, src, s, &dest, dest_dir, &opts, &spool, &mut changed).map_err(
                    |e| {
                        if e.is_refusal() {
                            self.refuse(line, e.to_string())
                        } else {
                            NativeError::Copy {
                                path: self.df().path.clone(),
                                line,
                                arch: self.suffix.clone(),
                                instruction: kw,
                                source: Box::new(e),
                            }
                        }
                    },
                )?;
            }
        }
        let created_by = format!("{kw} {} /{dest} # buildkit", sources.join(" "));
        self.commit_layer(i, st, changed, created_by, line, log)
    }

    /// Writes the layer of `changed` (plus parent directories) when the stage is in the
    /// target's chain; records history either way. Nothing changed gives an empty layer
    /// (a tar of two zero blocks), as BuildKit exports for a no-op file operation.
    pub(super) fn commit_layer(
        &mut self,
        i: usize,
        st: &mut StageState,
        changed: BTreeSet<String>,
        created_by: String,
        line: usize,
        log: &mut dyn FnMut(String),
    ) -> Result<(), NativeError> {
        if !self.in_chain[i] {
            self.history(st, created_by, false);
            return Ok(());
        }
        let tree = st.tree.as_ref().ok_or_else(|| self.err(line, "no tree"))?;
        let mut paths = BTreeSet::new();
        for p in &changed {
            let mut cur = p.as_str();
            while !cur.is_empty() && paths.insert(cur.to_owned()) {
                cur = parent(cur);
            }
        }
        let paths: Vec<String> = paths
            .into_iter()
            .filter(|p| tree.get(p).is_some())
            .collect();
        let epoch = self.shared.input.source_date_epoch;
        let key = layer_key(tree, &paths, epoch);
        let layer = match self.shared.memo.get(&key) {
            Some(l) => l.clone(),
            None => {
                let started = std::time::Instant::now();
                let l = write_layer(self.shared.cache, tree, &paths, epoch)?;
                log(format!(
                    "[{}] layer {} ({} entries, {} bytes, {} compressed, {:.2}s)",
                    self.suffix,
                    l.desc.digest,
                    paths.len(),
                    l.tar_size,
                    l.desc.size,
                    started.elapsed().as_secs_f64()
                ));
                self.shared.memo.insert(key, l.clone());
                l
            }
        };
        st.layers.push(layer.desc.clone());
        st.config.rootfs.diff_ids.push(layer.diff_id.clone());
        self.history(st, created_by, false);
        Ok(())
    }
}

/// What identifies a layer's bytes without reading file contents: every entry's path,
/// metadata and content location.
fn layer_key(tree: &Tree, paths: &[String], epoch: i64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(epoch.to_le_bytes());
    for p in paths {
        let Some(n) = tree.get(p) else { continue };
        h.update(p.as_bytes());
        h.update([0]);
        h.update(n.mode.to_le_bytes());
        h.update(n.uid.to_le_bytes());
        h.update(n.gid.to_le_bytes());
        match &n.kind {
            Kind::Dir => h.update(b"d"),
            Kind::Symlink(t) => {
                h.update(b"l");
                h.update(t.as_bytes());
            }
            Kind::Special {
                entry_type,
                major,
                minor,
            } => {
                h.update([b's', *entry_type]);
                h.update(major.to_le_bytes());
                h.update(minor.to_le_bytes());
            }
            Kind::File { content, size } => {
                h.update(b"f");
                h.update(size.to_le_bytes());
                match content {
                    Content::Path(path) => h.update(path.as_os_str().as_encoded_bytes()),
                    Content::Spool { spool, offset } => {
                        h.update((Arc::as_ptr(spool) as usize).to_le_bytes());
                        h.update(offset.to_le_bytes());
                    }
                    Content::Unread => h.update(b"?"),
                    Content::Empty => h.update(b"0"),
                }
            }
        }
        h.update([0]);
    }
    h.finalize().into()
}
