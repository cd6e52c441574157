//! Walking the stages for one platform: `FROM` (scratch, a stage, or an image in the
//! cache), then each instruction against the stage's config and tree, with BuildKit's
//! variable scoping (global `ARG`s in `FROM` lines, redeclared in a stage to be used
//! there; automatic platform args; `ENV` over `ARG`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::copy::{self, CopyError, CopyOpts};
use super::image::{
    HealthConfig, History, ImageConfig, parse_go_duration, parse_platform, rfc3339,
};
use super::layer::{Layer, write_layer};
use super::refuse::is_octal_mode;
use super::tree::{Content, Kind, Node, Tree, clean, join, parent};
use super::{BaseResolver, NativeBuild, NativeError, Refusal, context};
use crate::build::dockerfile::lex::expand;
use crate::build::dockerfile::platform_args;
use crate::build::dockerfile::{
    CommandLine, CopyArgs, Dockerfile, Healthcheck, Instruction, Located,
};
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
        expand(word, self.df().escape, &self.global_vars()).map_err(|e| self.err(line, e))
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
        self.in_chain = vec![false; n];
        let mut k = Some(target);
        while let Some(s) = k {
            self.in_chain[s] = true;
            k = bases[s];
        }

        self.states = vec![None; n];
        for (i, reachable) in reachable.iter().enumerate() {
            if !reachable {
                continue;
            }
            let stage = self.df().stages[i].clone();
            log(format!("[{} {}/{}] {}", self.suffix, i + 1, n, stage.text));
            let mut st = self.start_stage(i)?;
            for ins in &stage.instructions {
                log(format!("[{} {}/{}] {}", self.suffix, i + 1, n, ins.text));
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
        let config = serde_json::to_vec(&st.config)
            .map_err(|e| NativeError::Invalid(format!("serialising the image config: {e}")))?;
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
        let bytes = serde_json::to_vec(&manifest)
            .map_err(|e| NativeError::Invalid(format!("serialising the manifest: {e}")))?;
        let digest = cache.put_blob(&bytes)?;
        log(format!("[{}] manifest {digest}", self.suffix));
        Ok(Descriptor::new(OCI_MANIFEST, digest, bytes.len() as u64))
    }

    fn start_stage(&mut self, i: usize) -> Result<StageState, NativeError> {
        let stage = self.df().stages[i].clone();
        let platform = match &stage.platform {
            Some(p) => {
                let p = self.expand_global(p, stage.line)?;
                parse_platform(&p).map_err(|e| self.err(stage.line, e))?
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
            .map_err(|e| self.err(line, e))?;
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
        expand(word, self.df().escape, &self.vars(st)).map_err(|e| self.err(line, e))
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

    fn apply(
        &mut self,
        i: usize,
        st: &mut StageState,
        ins: &Located<Instruction>,
        log: &mut dyn FnMut(String),
    ) -> Result<(), NativeError> {
        let line = ins.line;
        match &ins.value {
            Instruction::Env(pairs) | Instruction::Label(pairs) => {
                let is_env = matches!(ins.value, Instruction::Env(_));
                let mut out = Vec::new();
                for (k, v) in pairs {
                    out.push((self.x(st, k, line)?, self.x(st, v, line)?));
                }
                let text = out
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                for (k, v) in out {
                    if is_env {
                        st.config.config.set_env(&k, &v);
                    } else {
                        st.config
                            .config
                            .labels
                            .get_or_insert_with(BTreeMap::new)
                            .insert(k, v);
                    }
                }
                let kw = if is_env { "ENV" } else { "LABEL" };
                self.history(st, format!("{kw} {text}"), true);
            }
            Instruction::Arg(decls) => {
                for a in decls {
                    let value = if let Some(v) = self.shared.input.build_args.get(&a.name)
                        && !self.auto.iter().any(|(k, _)| *k == a.name)
                    {
                        Some(v.clone())
                    } else if let Some((_, v)) = self.auto.iter().find(|(k, _)| *k == a.name) {
                        Some(v.clone())
                    } else if let Some(d) = &a.default {
                        Some(self.x(st, d, line)?)
                    } else {
                        self.global
                            .iter()
                            .rev()
                            .find(|(k, _)| *k == a.name)
                            .and_then(|(_, v)| v.clone())
                    };
                    if let Some(v) = value {
                        st.args.push((a.name.clone(), v));
                    }
                }
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                let is_add = matches!(ins.value, Instruction::Add(_));
                self.copy(i, st, c, is_add, ins, log)?;
            }
            Instruction::Workdir(w) => {
                let w = self.x(st, w, line)?;
                let cur = st.config.config.working_dir.clone().unwrap_or_default();
                let wd = if w.starts_with('/') {
                    clean(&w)
                } else {
                    clean(&join(&clean(&cur), &w))
                };
                st.config.config.working_dir = Some(format!("/{wd}"));
                let mut changed = BTreeSet::new();
                if !wd.is_empty() {
                    self.ensure_tree(st, self.needs_content[i], line)?;
                    let user = st.config.config.user.clone().unwrap_or_default();
                    let tree = st.tree.as_mut().ok_or_else(|| self.err(line, "no tree"))?;
                    let (uid, gid) = if user.is_empty() {
                        (0, 0)
                    } else {
                        resolve_user(tree, &user)
                            .map_err(|e| self.err(line, format!("USER {user}: {e}")))?
                    };
                    let real = tree
                        .resolve(&wd, true, false)
                        .map_err(|e| self.err(line, e.to_string()))?;
                    for p in tree
                        .mkdir_all(&real, 0o755, uid, gid, self.shared.input.source_date_epoch)
                        .map_err(|e| self.err(line, e.to_string()))?
                    {
                        changed.insert(p);
                    }
                }
                if wd.is_empty() {
                    self.history(st, "WORKDIR /".into(), true);
                } else {
                    // BuildKit makes the directory with a file operation, which is a
                    // layer even when the directory exists (then an empty one).
                    self.commit_layer(i, st, changed, format!("WORKDIR /{wd}"), line, log)?;
                }
            }
            Instruction::User(u) => {
                let u = self.x(st, u, line)?;
                st.config.config.user = Some(u.clone());
                self.history(st, format!("USER {u}"), true);
            }
            Instruction::Expose(ports) => {
                let mut keys = Vec::new();
                for p in ports {
                    for word in self.x(st, p, line)?.split_whitespace() {
                        keys.extend(expose_keys(word).map_err(|e| self.err(line, e))?);
                    }
                }
                let map = st
                    .config
                    .config
                    .exposed_ports
                    .get_or_insert_with(BTreeMap::new);
                for k in &keys {
                    map.insert(k.clone(), Default::default());
                }
                self.history(st, format!("EXPOSE map[{}]", keys.join(" ")), true);
            }
            Instruction::Volume(vols) => {
                let mut out = Vec::new();
                for v in vols {
                    let v = self.x(st, v, line)?;
                    if v.trim().is_empty() {
                        return Err(self.err(line, "VOLUME specified can not be an empty string"));
                    }
                    out.push(v);
                }
                let map = st.config.config.volumes.get_or_insert_with(BTreeMap::new);
                for v in &out {
                    map.insert(v.clone(), Default::default());
                }
                self.history(st, format!("VOLUME [{}]", out.join(" ")), true);
            }
            Instruction::Entrypoint(c) => {
                st.config.config.entrypoint = Some(self.command(st, c));
                if !st.cmd_set {
                    st.config.config.cmd = None;
                }
                self.history(
                    st,
                    format!("ENTRYPOINT {}", json(&st.config.config.entrypoint)),
                    true,
                );
            }
            Instruction::Cmd(c) => {
                st.config.config.cmd = Some(self.command(st, c));
                st.cmd_set = true;
                self.history(st, format!("CMD {}", json(&st.config.config.cmd)), true);
            }
            Instruction::StopSignal(s) => {
                let s = self.x(st, s, line)?;
                if !valid_signal(&s) {
                    return Err(self.err(line, format!("invalid signal: {s}")));
                }
                st.config.config.stop_signal = Some(s.clone());
                self.history(st, format!("STOPSIGNAL {s}"), true);
            }
            Instruction::Shell(v) => {
                st.config.config.shell = Some(v.clone());
                self.history(st, format!("SHELL {}", json(&Some(v.clone()))), true);
            }
            Instruction::Healthcheck(h) => {
                let hc = match h {
                    Healthcheck::None => HealthConfig {
                        test: vec!["NONE".into()],
                        ..HealthConfig::default()
                    },
                    Healthcheck::Check {
                        test,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => {
                        let dur = |name: &str, v: &Option<String>| -> Result<i64, NativeError> {
                            let Some(v) = v else { return Ok(0) };
                            let d = parse_go_duration(v)
                                .map_err(|e| self.err(line, format!("--{name}: {e}")))?;
                            if d != 0 && d < 1_000_000 {
                                return Err(self
                                    .err(line, format!("--{name} {v:?} cannot be less than 1ms")));
                            }
                            Ok(d)
                        };
                        let test = match test {
                            CommandLine::Exec(v) => {
                                let mut t = vec!["CMD".to_owned()];
                                t.extend(v.iter().cloned());
                                t
                            }
                            CommandLine::Shell(s) => vec!["CMD-SHELL".to_owned(), s.clone()],
                        };
                        let retries = match retries {
                            Some(r) => {
                                r.parse::<i64>().ok().filter(|r| *r >= 0).ok_or_else(|| {
                                    self.err(
                                        line,
                                        format!(
                                            "--retries {r:?} must be a whole number, 0 or more"
                                        ),
                                    )
                                })?
                            }
                            None => 0,
                        };
                        HealthConfig {
                            test,
                            interval: dur("interval", interval)?,
                            timeout: dur("timeout", timeout)?,
                            start_period: dur("start-period", start_period)?,
                            start_interval: dur("start-interval", start_interval)?,
                            retries,
                        }
                    }
                };
                st.config.config.healthcheck = Some(hc);
                self.history(st, ins.text.clone(), true);
            }
            Instruction::Maintainer(m) => {
                let m = self.x(st, m, line)?;
                st.config.author = Some(m.clone());
                self.history(st, format!("MAINTAINER {m}"), true);
            }
            Instruction::OnBuild(expr) => {
                st.config
                    .config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(expr.clone());
                self.history(st, format!("ONBUILD {expr}"), true);
            }
            Instruction::Run { .. } => {
                return Err(self.refuse(line, "RUN needs a container to run commands"));
            }
        }
        Ok(())
    }

    fn command(&self, st: &StageState, c: &CommandLine) -> Vec<String> {
        match c {
            CommandLine::Exec(v) => v.clone(),
            CommandLine::Shell(s) => {
                let mut v = st
                    .config
                    .config
                    .shell
                    .clone()
                    .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
                v.push(s.clone());
                v
            }
        }
    }

    fn copy(
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
                Some(u32::from_str_radix(&m, 8).map_err(|e| self.err(line, e.to_string()))?)
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
                    |e| match e {
                        CopyError::Failed(m) => self.err(line, format!("{kw} {m}")),
                        CopyError::Unsupported(m) => self.refuse(line, m),
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
    fn commit_layer(
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

fn json(v: &Option<Vec<String>>) -> String {
    serde_json::to_string(v).unwrap_or_default()
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
                }
            }
        }
        h.update([0]);
    }
    h.finalize().into()
}

/// Resolves `user[:group]` (names or ids) through the tree's `/etc/passwd` and
/// `/etc/group`, as BuildKit does: a numeric user without a group gets gid = uid; a named
/// user without a group gets their primary group.
pub(super) fn resolve_user(tree: &Tree, spec: &str) -> Result<(u64, u64), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err("expected user[:group], with names or numeric ids".into());
    }
    let read = |file: &str| -> Result<String, String> {
        let p = tree.resolve(file, true, false).map_err(|e| e.to_string())?;
        let node = tree.get(&p).ok_or_else(|| {
            format!(
                "/{file} does not exist in the image, so names cannot be resolved; use numeric ids"
            )
        })?;
        let bytes = node.read_all().map_err(|e| format!("/{file}: {e}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let lookup = |file: &str, name: &str, field: usize| -> Result<Vec<u64>, String> {
        let text = read(file)?;
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() > field {
                let ids = f[2..=field]
                    .iter()
                    .map(|s| s.parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("/{file}: malformed line for {name}"))?;
                return Ok(ids);
            }
        }
        Err(format!("{name} is not in /{file}"))
    };
    let (uid, mut gid) = match user.parse::<u64>() {
        Ok(u) => (u, u),
        Err(_) => {
            let ids = lookup("etc/passwd", user, 3)?;
            (ids[0], ids[1])
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u64>() {
            Ok(g) => g,
            Err(_) => lookup("etc/group", g, 2)?[0],
        };
    }
    Ok((uid, gid))
}

/// `80`, `80/udp`, `8000-8002/tcp` as `ExposedPorts` keys.
fn expose_keys(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto {proto:?} in EXPOSE {spec}"));
    }
    let bad = || format!("invalid port {spec:?} in EXPOSE: use PORT[/PROTO] or START-END[/PROTO]");
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = ports.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(bad());
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    NAMES.contains(&name)
        || name
            .strip_prefix("RTMIN")
            .or_else(|| name.strip_prefix("RTMAX"))
            .is_some_and(|r| r.is_empty() || r.trim_start_matches(['+', '-']).parse::<u8>().is_ok())
}
