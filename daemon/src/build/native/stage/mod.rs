//! Walking the stages for one platform: `FROM` (scratch, a stage, or an image in the
//! cache), then each instruction against the stage's config and tree, with BuildKit's
//! variable scoping (global `ARG`s in `FROM` lines, redeclared in a stage to be used
//! there; automatic platform args; `ENV` over `ARG`).

mod copy_step;
mod instruction;
mod run_step;
mod user;

pub use instruction::ExposeError;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use super::image::{History, ImageConfig, parse_platform, rfc3339};
use super::layer::Layer;
use super::tree::{Node, Tree};
use super::{BaseResolver, NativeBuild, NativeError, Refusal, StepError};
use crate::build::dockerfile::lex::expand;
use crate::build::dockerfile::platform_args;
use crate::build::dockerfile::{CopyArgs, Dockerfile, Instruction, MountKind, RunMount};
use crate::cache::Cache;

/// Image configs are small; a larger one is refused rather than read into memory.
const CONFIG_LIMIT: u64 = 4 * 1024 * 1024;
use crate::oci::{
    DOCKER_LAYER_GZIP, Descriptor, ImageManifest, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST,
    Platform,
};

/// State shared by the platforms of one build: the context (read once) and the layers
/// already written (the same tree paths give the same layer, so a `COPY` identical on
/// every arch is compressed once).
pub(super) struct Shared<'a> {
    cache: &'a Cache,
    df: &'a Dockerfile,
    input: &'a NativeBuild,
    resolver: &'a dyn BaseResolver,
    context: Option<Tree>,
    memo: HashMap<[u8; 32], Layer>,
    /// Steps walked (each stage's FROM and instructions, every platform), and the RUN
    /// steps of those the step cache answered.
    pub(super) steps: u32,
    pub(super) cache_hits: u32,
}

#[derive(Clone)]
struct StageState {
    config: ImageConfig,
    layers: Vec<Descriptor>,
    /// The root filesystem, materialised on first need.
    tree: Option<Tree>,
    tree_has_content: bool,
    args: Vec<(String, String)>,
    cmd_set: bool,
}

impl<'a> Shared<'a> {
    pub(super) fn new(
        cache: &'a Cache,
        df: &'a Dockerfile,
        input: &'a NativeBuild,
        resolver: &'a dyn BaseResolver,
    ) -> Self {
        Shared {
            cache,
            df,
            input,
            resolver,
            context: None,
            memo: HashMap::new(),
            steps: 0,
            cache_hits: 0,
        }
    }

    /// Builds the target stage for `platform`; writes its config and manifest blobs and
    /// returns the manifest's descriptor.
    pub(super) fn build_platform(
        &mut self,
        platform: &Platform,
        suffix: &str,
        log: &mut dyn FnMut(String),
    ) -> Result<Descriptor, NativeError> {
        let spool = super::tree::new_spool(self.cache.tmp_dir()).map_err(|e| {
            NativeError::Invalid(format!(
                "cannot create a spool file in {}: {e}",
                self.cache.tmp_dir().display()
            ))
        })?;
        let mut run = Run {
            shared: self,
            platform: platform.clone(),
            suffix: suffix.to_owned(),
            spool,
            auto: Vec::new(),
            global: Vec::new(),
            states: Vec::new(),
            needs_content: Vec::new(),
            in_chain: Vec::new(),
            image_trees: HashMap::new(),
        };
        run.run(log)
    }
}

struct Run<'s, 'a> {
    shared: &'s mut Shared<'a>,
    platform: Platform,
    suffix: String,
    spool: Arc<File>,
    auto: Vec<(String, String)>,
    /// Global args (name, value if set), automatic ones first.
    global: Vec<(String, Option<String>)>,
    states: Vec<Option<StageState>>,
    needs_content: Vec<bool>,
    in_chain: Vec<bool>,
    image_trees: HashMap<String, Tree>,
}

enum Base {
    Scratch,
    Stage(usize),
    Image(String),
}

impl Run<'_, '_> {
    fn df(&self) -> &Dockerfile {
        self.shared.df
    }

    fn err(&self, line: usize, message: impl Into<String>) -> NativeError {
        NativeError::Instruction {
            path: self.df().path.clone(),
            line,
            arch: self.suffix.clone(),
            message: message.into(),
        }
    }

    /// The instruction at `line` failed on `source`.
    fn fail(&self, line: usize, source: impl Into<StepError>) -> NativeError {
        NativeError::Step {
            path: self.df().path.clone(),
            line,
            arch: self.suffix.clone(),
            source: Box::new(source.into()),
        }
    }

    fn refuse(&self, line: usize, what: impl Into<String>) -> NativeError {
        NativeError::Refused(Refusal {
            path: self.df().path.clone(),
            line,
            what: what.into(),
        })
    }

    fn global_vars(&self) -> Vec<(String, String)> {
        self.global
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    fn expand_global(&self, word: &str, line: usize) -> Result<String, NativeError> {
        expand(word, self.df().escape, &self.global_vars()).map_err(|e| self.fail(line, e))
    }

    fn base_of(&self, i: usize) -> Result<Base, NativeError> {
        let stage = &self.df().stages[i];
        let name = self.expand_global(&stage.base, stage.line)?;
        if name.eq_ignore_ascii_case("scratch") {
            return Ok(Base::Scratch);
        }
        Ok(match self.df().stage_index(&name, i) {
            Some(j) if self.df().stages[j].name.is_some() => Base::Stage(j),
            _ => Base::Image(name),
        })
    }

    fn copy_from_stage(
        &self,
        i: usize,
        from: &str,
        line: usize,
    ) -> Result<Option<usize>, NativeError> {
        let name = self.expand_global(from, line)?;
        Ok(self.df().stage_index(&name, i))
    }

    fn run(&mut self, log: &mut dyn FnMut(String)) -> Result<Descriptor, NativeError> {
        let target_platform = self.platform.clone();
        self.auto = platform_args(&target_platform);
        self.global = self
            .auto
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        let global_args = self.df().global_args.clone();
        for decl in &global_args {
            for a in &decl.value {
                let value = match self.shared.input.build_args.get(&a.name) {
                    Some(v) => Some(v.clone()),
                    None => match &a.default {
                        Some(d) => Some(self.expand_global(d, decl.line)?),
                        None => None,
                    },
                };
                self.global.push((a.name.clone(), value));
            }
        }

        // Which stages the target needs, which need file contents (sources of
        // COPY --from), and which are in the target's FROM chain (their layers are
        // written; the others only update trees).
        let n = self.df().stages.len();
        let target = match &self.shared.input.target {
            Some(t) => self.df().stage_index(t, n).ok_or_else(|| {
                NativeError::Invalid(format!(
                    "{}: no stage named {t:?} to build",
                    self.df().path.display()
                ))
            })?,
            None => n - 1,
        };
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut from_sources = vec![false; n];
        let mut bases: Vec<Option<usize>> = vec![None; n];
        // Stages a `RUN --mount=type=bind,from=` shows: built first, with layers.
        let mut mount_sources = Vec::new();
        for i in 0..n {
            if let Base::Stage(j) = self.base_of(i)? {
                deps[i].push(j);
                bases[i] = Some(j);
            }
            for ins in &self.df().stages[i].instructions {
                if let Instruction::Copy(CopyArgs { from: Some(f), .. }) = &ins.value
                    && let Some(j) = self.copy_from_stage(i, f, ins.line)?
                {
                    deps[i].push(j);
                    from_sources[j] = true;
                }
                if let Instruction::Run(r) = &ins.value {
                    for m in &r.mounts {
                        if let Ok(RunMount {
                            kind: MountKind::Bind,
                            from: Some(f),
                            ..
                        }) = RunMount::parse(m)
                            && let Some(j) = self.copy_from_stage(i, &f, ins.line)?
                        {
                            deps[i].push(j);
                            mount_sources.push(j);
                        }
                    }
                }
            }
        }
        let mut reachable = vec![false; n];
        let mut stack = vec![target];
        while let Some(i) = stack.pop() {
            if !reachable[i] {
                reachable[i] = true;
                stack.extend(&deps[i]);
            }
        }
        self.needs_content = vec![false; n];
        for i in (0..n).rev() {
            if from_sources[i] && reachable[i] {
                let mut k = Some(i);
                while let Some(s) = k {
                    self.needs_content[s] = true;
                    k = bases[s];
                }
            }
        }
        // Layers are written for the target's chain, and for every stage a RUN runs on
        // (the step needs the stage's snapshots).
        self.in_chain = vec![false; n];
        let has_run = |s: usize| {
            self.df().stages[s]
                .instructions
                .iter()
                .any(|l| matches!(l.value, Instruction::Run(_)))
        };
        let starts: Vec<usize> = std::iter::once(target)
            .chain((0..n).filter(|&s| reachable[s] && has_run(s)))
            .chain(mount_sources)
            .collect();
        for start in starts {
            let mut k = Some(start);
            while let Some(s) = k {
                self.in_chain[s] = true;
                k = bases[s];
            }
        }

        self.states = vec![None; n];
        for (i, reachable) in reachable.iter().enumerate() {
            if !reachable {
                continue;
            }
            let stage = self.df().stages[i].clone();
            log(format!("[{} {}/{}] {}", self.suffix, i + 1, n, stage.text));
            self.shared.steps += 1;
            let mut st = self.start_stage(i)?;
            for ins in &stage.instructions {
                log(format!("[{} {}/{}] {}", self.suffix, i + 1, n, ins.text));
                self.shared.steps += 1;
                self.apply(i, &mut st, ins, log)?;
            }
            self.states[i] = Some(st);
        }
        let Some(mut st) = self.states[target].take() else {
            return Err(NativeError::Invalid(
                "the target stage was not built".into(),
            ));
        };
        let epoch = self.shared.input.source_date_epoch;
        if !self.shared.input.labels.is_empty() {
            let labels = st.config.config.labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.shared.input.labels {
                labels.insert(k.clone(), v.clone());
            }
        }
        st.config.created = Some(rfc3339(epoch));
        st.config.architecture = target_platform.architecture.clone();
        st.config.os = target_platform.os.clone();
        st.config.variant = target_platform.variant.clone();
        let cache = self.shared.cache;
        let config = serde_json::to_vec(&st.config).map_err(|source| NativeError::Serialise {
            what: "the image config",
            source,
        })?;
        let config_digest = cache.put_blob(&config)?;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config: Descriptor::new(OCI_CONFIG, config_digest, config.len() as u64),
            layers: st.layers,
            subject: None,
            annotations: BTreeMap::new(),
            extra: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&manifest).map_err(|source| NativeError::Serialise {
            what: "the manifest",
            source,
        })?;
        let digest = cache.put_blob(&bytes)?;
        log(format!("[{}] manifest {digest}", self.suffix));
        Ok(Descriptor::new(OCI_MANIFEST, digest, bytes.len() as u64))
    }

    fn start_stage(&mut self, i: usize) -> Result<StageState, NativeError> {
        let stage = self.df().stages[i].clone();
        let platform = match &stage.platform {
            Some(p) => {
                let p = self.expand_global(p, stage.line)?;
                parse_platform(&p).map_err(|e| self.fail(stage.line, e))?
            }
            None => self.platform.clone(),
        };
        let st = match self.base_of(i)? {
            Base::Scratch => StageState {
                config: ImageConfig::scratch(&platform),
                layers: Vec::new(),
                tree: Some(Tree::new(Node::dir(0o755, 0, 0, 0))),
                tree_has_content: true,
                args: Vec::new(),
                cmd_set: false,
            },
            Base::Stage(j) => {
                let Some(src) = self.states[j].clone() else {
                    return Err(self.err(stage.line, format!("stage {} was not built", stage.base)));
                };
                StageState {
                    args: Vec::new(),
                    cmd_set: false,
                    ..src
                }
            }
            Base::Image(name) => {
                let (config, layers) = self.load_image(&name, &platform, stage.line)?;
                StageState {
                    config,
                    layers,
                    tree: None,
                    tree_has_content: false,
                    args: Vec::new(),
                    cmd_set: false,
                }
            }
        };
        if st
            .config
            .config
            .on_build
            .as_ref()
            .is_some_and(|v| !v.is_empty())
        {
            return Err(self.refuse(
                stage.line,
                format!(
                    "FROM {}: the base has ONBUILD triggers, which must run in this build",
                    stage.base
                ),
            ));
        }
        Ok(st)
    }

    fn load_image(
        &self,
        name: &str,
        platform: &Platform,
        line: usize,
    ) -> Result<(ImageConfig, Vec<Descriptor>), NativeError> {
        let cache = self.shared.cache;
        let desc = self
            .shared
            .resolver
            .resolve(cache, name, platform)
            .map_err(|e| self.fail(line, e))?;
        let manifest = cache
            .read_manifest(&desc.digest)
            .map_err(|e| self.err(line, format!("{name}: {e}")))?;
        let Some(config_desc) = manifest.config else {
            return Err(self.err(line, format!("{name}: the manifest has no config")));
        };
        let bytes = cache
            .read_blob(&config_desc.digest, CONFIG_LIMIT)
            .map_err(|e| self.err(line, format!("{name}: {e}")))?;
        let config: ImageConfig = serde_json::from_slice(&bytes)
            .map_err(|e| self.err(line, format!("{name}: invalid image config: {e}")))?;
        let layers = manifest
            .layers
            .into_iter()
            .map(|mut l| {
                if l.media_type == DOCKER_LAYER_GZIP {
                    l.media_type = OCI_LAYER_GZIP.to_owned();
                }
                l
            })
            .collect();
        Ok((config, layers))
    }

    /// Materialises a stage's tree from its layers, if not done yet.
    fn ensure_tree(
        &self,
        st: &mut StageState,
        content: bool,
        line: usize,
    ) -> Result<(), NativeError> {
        if st.tree.is_some() && (st.tree_has_content || !content) {
            return Ok(());
        }
        let tree = self.materialise(&st.layers, content, line)?;
        st.tree = Some(tree);
        st.tree_has_content = content;
        Ok(())
    }

    fn materialise(
        &self,
        layers: &[Descriptor],
        content: bool,
        line: usize,
    ) -> Result<Tree, NativeError> {
        let mut tree = Tree::new(Node::dir(0o755, 0, 0, 0));
        let keep_all = |_: &str| true;
        let keep_ids = |p: &str| p == "etc/passwd" || p == "etc/group";
        let keep: &dyn Fn(&str) -> bool = if content { &keep_all } else { &keep_ids };
        for l in layers {
            let path = self.shared.cache.blob_path(&l.digest);
            let file = File::open(&path)
                .map_err(|e| self.err(line, format!("base layer {}: {e}", l.digest)))?;
            let reader: Box<dyn Read> = if l.media_type.ends_with("gzip") {
                Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                    file,
                )))
            } else if l.media_type.ends_with(".tar") || l.media_type.ends_with("tar") {
                Box::new(std::io::BufReader::new(file))
            } else {
                return Err(self.refuse(
                    line,
                    format!(
                        "a base layer is {}, which the native builder cannot read",
                        l.media_type
                    ),
                ));
            };
            tree.apply_layer(reader, Some(&self.spool), keep)
                .map_err(|e| self.err(line, format!("base layer {}: {e}", l.digest)))?;
        }
        Ok(tree)
    }

    fn vars(&self, st: &StageState) -> Vec<(String, String)> {
        let mut v = st.args.clone();
        v.extend(st.config.config.env_pairs());
        v
    }

    fn x(&self, st: &StageState, word: &str, line: usize) -> Result<String, NativeError> {
        expand(word, self.df().escape, &self.vars(st)).map_err(|e| self.fail(line, e))
    }

    fn history(&self, st: &mut StageState, created_by: String, empty_layer: bool) {
        st.config.history.push(History {
            created: Some(rfc3339(self.shared.input.source_date_epoch)),
            created_by: Some(created_by),
            author: None,
            comment: Some("buildkit.dockerfile.v0".into()),
            empty_layer,
        });
    }
}
