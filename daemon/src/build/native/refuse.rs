//! What the native builder refuses, decided from the parsed Dockerfile alone, so that
//! `auto` can pick the docker builder before building anything.

use std::path::PathBuf;

use std::sync::OnceLock;

use crate::build::dockerfile::{CopyArgs, Dockerfile, Instruction, MountKind, RunArgs, RunMount};

/// An instruction the native builder cannot do exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}:{line}: {what}; the native builder cannot do this, use the docker builder (--builder docker)",
    path.display()
)]
pub struct Refusal {
    pub path: PathBuf,
    pub line: usize,
    /// What is refused and why, e.g. "RUN needs a container to run commands".
    pub what: String,
}

/// What this host lets the native builder do beyond writing layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// RUN steps: `Ok` when an OCI runtime and root are there, else why not.
    pub run: Result<(), super::runtime::Unavailable>,
}

impl Capabilities {
    /// This host's, found once per process (the runtime on the PATH, root).
    pub fn host() -> &'static Capabilities {
        static HOST: OnceLock<Capabilities> = OnceLock::new();
        HOST.get_or_init(|| Capabilities {
            run: super::runtime::availability().map(|_| ()),
        })
    }
}

/// `Ok` when the native builder can build `df` with `caps` (as far as the Dockerfile
/// alone tells; a base image with ONBUILD triggers or an ADD of an xz archive is refused
/// when found), else the first refused line.
pub fn native_supports(df: &Dockerfile, caps: &Capabilities) -> Result<(), Refusal> {
    let refuse = |line: usize, what: String| Refusal {
        path: df.path.clone(),
        line,
        what,
    };
    if let Some(syntax) = &df.syntax {
        let v = syntax.value.as_str();
        let known = ["docker/dockerfile", "docker.io/docker/dockerfile"];
        let base = v.split(['@', ':']).next().unwrap_or(v);
        if !known.contains(&base) {
            return Err(refuse(
                syntax.line,
                format!("# syntax={v} selects a custom frontend"),
            ));
        }
    }
    for stage in &df.stages {
        for l in &stage.instructions {
            let what = match &l.value {
                Instruction::Run(r) => match &caps.run {
                    Err(why) => Some(format!("RUN: {why}")),
                    Ok(()) => run_refusal(r),
                },
                Instruction::Copy(c) => copy_refusal("COPY", c),
                Instruction::Add(c) => copy_refusal("ADD", c).or_else(|| {
                    c.sources
                        .iter()
                        .find(|s| is_remote(s))
                        .map(|s| format!("ADD {s} downloads from the network"))
                }),
                _ => None,
            };
            if let Some(what) = what {
                return Err(refuse(l.line, what));
            }
        }
    }
    Ok(())
}

/// Why `auto` picks the builder it picks for the Dockerfile at `path`, for the build log.
pub fn auto_reason(path: &std::path::Path) -> String {
    match Dockerfile::read(path) {
        Err(e) => format!("the Dockerfile does not parse: {e}"),
        Ok(df) => match native_supports(&df, Capabilities::host()) {
            Ok(()) => {
                let runs = df
                    .stages
                    .iter()
                    .flat_map(|s| &s.instructions)
                    .any(|l| matches!(l.value, Instruction::Run(_)));
                if runs {
                    "the native builder does all of it, RUN steps in runc".into()
                } else {
                    "the native builder does all of it".into()
                }
            }
            Err(r) => format!(
                "line {}: {}, which only the docker builder does",
                r.line, r.what
            ),
        },
    }
}

/// What of a RUN the native builder cannot do (decided from the words as written; a
/// mount whose options hold variables is checked again once they are expanded).
pub fn run_refusal(r: &RunArgs) -> Option<String> {
    if r.heredoc {
        return Some("RUN with a heredoc (<<) is not supported".into());
    }
    if r.security.as_deref() == Some("insecure") {
        return Some("RUN --security=insecure is not supported".into());
    }
    for m in &r.mounts {
        let Ok(m) = RunMount::parse(m) else { continue };
        let what = match m.kind {
            MountKind::Secret | MountKind::Ssh => {
                format!("RUN --mount=type={} is not supported", m.kind.as_str())
            }
            MountKind::Bind if !m.readonly => {
                "RUN --mount=type=bind,rw is not supported yet".into()
            }
            MountKind::Cache if m.from.is_some() => {
                "RUN --mount=type=cache,from=... is not supported".into()
            }
            _ => continue,
        };
        return Some(what);
    }
    None
}

fn copy_refusal(keyword: &str, c: &CopyArgs) -> Option<String> {
    if c.heredoc {
        return Some(format!("{keyword} with a heredoc (<<) is not supported"));
    }
    if let Some((flag, _)) = c.other_flags.first() {
        return Some(format!("{keyword} --{flag} is not supported"));
    }
    if let Some(m) = &c.chmod
        && !m.contains('$')
        && !is_octal_mode(m)
    {
        return Some(format!(
            "{keyword} --chmod={m} is not an octal mode (symbolic modes are not supported)"
        ));
    }
    None
}

pub(super) fn is_octal_mode(m: &str) -> bool {
    !m.is_empty() && m.len() <= 4 && m.bytes().all(|b| (b'0'..=b'7').contains(&b))
}

fn is_remote(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://")
        || lower.starts_with("https://")
        || lower.starts_with("git@")
        || lower.starts_with("git://")
        || lower.starts_with("ssh://")
}
