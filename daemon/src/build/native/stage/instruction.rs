//! Applying one instruction to a stage: its config (ENV, LABEL, USER, CMD, ...) and,
//! for `WORKDIR`, its tree; `COPY`/`ADD` go to `copy_step`.

use std::collections::{BTreeMap, BTreeSet};

use super::super::NativeError;
use super::super::image::{HealthConfig, parse_go_duration};
use super::super::tree::{clean, join};
use crate::build::dockerfile::{CommandLine, Healthcheck, Instruction, Located};

use super::user::resolve_user;
use super::{Run, StageState};

impl Run<'_, '_> {
    pub(super) fn apply(
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
                        .map_err(|e| self.fail(line, e))?;
                    for p in tree
                        .mkdir_all(&real, 0o755, uid, gid, self.shared.input.source_date_epoch)
                        .map_err(|e| self.fail(line, e))?
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
                        keys.extend(expose_keys(word).map_err(|e| self.fail(line, e))?);
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
            Instruction::Run(r) => self.run_step(i, st, r, ins, log)?,
        }
        Ok(())
    }

    /// The process a RUN, CMD or ENTRYPOINT in `c`'s form runs: exec form as written,
    /// shell form through SHELL (default `/bin/sh -c`), as BuildKit builds it.
    pub(super) fn command(&self, st: &StageState, c: &CommandLine) -> Vec<String> {
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
}

fn json(v: &Option<Vec<String>>) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// An `EXPOSE` word that names no port.
#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("invalid proto {proto:?} in EXPOSE {spec}")]
    Proto { proto: String, spec: String },
    #[error("invalid port {0:?} in EXPOSE: use PORT[/PROTO] or START-END[/PROTO]")]
    Port(String),
}

/// `80`, `80/udp`, `8000-8002/tcp` as `ExposedPorts` keys.
fn expose_keys(spec: &str) -> Result<Vec<String>, ExposeError> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(ExposeError::Proto {
            proto,
            spec: spec.to_owned(),
        });
    }
    let bad = || ExposeError::Port(spec.to_owned());
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
