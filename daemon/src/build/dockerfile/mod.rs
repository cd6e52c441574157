//! Dockerfiles, parsed as BuildKit's dockerfile frontend reads them: parser directives at
//! the top, the escape character, line continuations (with comments and blank lines
//! inside), JSON exec form versus shell form, `--flags` on instructions, stages and the
//! global `ARG`s before the first `FROM`.
//!
//! Parsing keeps every word as written (quotes and `$VAR`s included): expansion depends on
//! the build (build args, the base image's `ENV`, the target platform) and happens when a
//! builder walks the stages, with [`lex::expand`]. Both builders use this parser: the
//! native builder to build, the docker builder to find `FROM`/`COPY --from` references
//! and to decide `auto`.

pub mod lex;
mod mount;
mod parse;
mod refs;

pub use mount::{MountError, MountKind, RunMount, Sharing};
pub use refs::{host_platform, platform_args};

use std::fmt;
use std::path::{Path, PathBuf};

/// A parse error: the Dockerfile, the line and column, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{}: {message}", path.display(), at(*line, *column))]
pub struct DockerfileError {
    pub path: PathBuf,
    pub line: usize,
    /// 1-based, where the instruction starts; 0 when unknown.
    pub column: usize,
    pub message: String,
}

/// `line:column`, or `line` when the column is unknown.
fn at(line: usize, column: usize) -> String {
    if column == 0 {
        line.to_string()
    } else {
        format!("{line}:{column}")
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub path: PathBuf,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// The `# syntax=` directive, with its line.
    pub syntax: Option<Located<String>>,
    /// `ARG`s before the first `FROM`: usable in `FROM` lines, and in a stage that
    /// redeclares them.
    pub global_args: Vec<Located<Vec<ArgDecl>>>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// Reads and parses the Dockerfile at `path`.
    pub fn read(path: &Path) -> Result<Dockerfile, DockerfileError> {
        let text = std::fs::read(path).map_err(|e| DockerfileError {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("cannot read the Dockerfile: {e}"),
        })?;
        let text = String::from_utf8(text).map_err(|e| DockerfileError {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("the Dockerfile is not UTF-8: {e}"),
        })?;
        Dockerfile::parse(path, &text)
    }

    /// Parses Dockerfile text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Dockerfile, DockerfileError> {
        parse::parse(path, text)
    }

    /// The index of the stage named `name` (case-insensitive) or numbered `name` among
    /// the stages before `before`.
    pub fn stage_index(&self, name: &str, before: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self.stages[..before.min(self.stages.len())]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Some(i);
        }
        name.parse::<usize>().ok().filter(|&i| i < before)
    }
}

/// A value with the line (1-based) where its instruction starts and the instruction as
/// written (continuations joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub line: usize,
    pub text: String,
    pub value: T,
}

/// One build stage: its `FROM` and the instructions after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub line: usize,
    /// The base as written (`scratch`, a stage name, or an image reference; may hold
    /// `$VAR`s from global args).
    pub base: String,
    /// `AS name`, lowercased.
    pub name: Option<String>,
    /// `--platform=...` as written.
    pub platform: Option<String>,
    pub text: String,
    pub instructions: Vec<Located<Instruction>>,
}

/// `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    /// The default as written (expanded when the ARG is reached).
    pub default: Option<String>,
}

/// `CMD`/`ENTRYPOINT`/`HEALTHCHECK CMD` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// JSON array form: used as is.
    Exec(Vec<String>),
    /// Shell form: run by the image's `SHELL` (default `/bin/sh -c`).
    Shell(String),
}

/// `COPY` and `ADD` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyArgs {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    /// Other flags (`--link`, `--parents`, `--exclude`, `--checksum`, `--keep-git-dir`),
    /// as (name, value).
    pub other_flags: Vec<(String, Option<String>)>,
    /// Whether a source is a heredoc (`<<EOF`).
    pub heredoc: bool,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    None,
    Check {
        test: CommandLine,
        interval: Option<String>,
        timeout: Option<String>,
        start_period: Option<String>,
        start_interval: Option<String>,
        retries: Option<String>,
    },
}

/// An instruction inside a stage, its words as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Arg(Vec<ArgDecl>),
    Copy(CopyArgs),
    Add(CopyArgs),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Volume(Vec<String>),
    Entrypoint(CommandLine),
    Cmd(CommandLine),
    StopSignal(String),
    Shell(Vec<String>),
    Healthcheck(Healthcheck),
    Maintainer(String),
    /// `ONBUILD <instruction>`: stored in the image config for images built FROM it.
    OnBuild(String),
    Run(RunArgs),
}

/// `RUN [--mount=...]... [--network=...] [--security=...] command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub command: CommandLine,
    /// Each `--mount` value as written (checked by [`RunMount::parse`] at parse time;
    /// builders expand variables in it first, then parse it again).
    pub mounts: Vec<String>,
    /// `--network`: `default`, `none` or `host`.
    pub network: Option<String>,
    /// `--security`: `sandbox` or `insecure`.
    pub security: Option<String>,
    /// Whether the command is a heredoc (`<<EOF`); its body is skipped.
    pub heredoc: bool,
}

impl Instruction {
    /// The instruction's keyword, uppercase.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Env(_) => "ENV",
            Instruction::Label(_) => "LABEL",
            Instruction::Arg(_) => "ARG",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Cmd(_) => "CMD",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Shell(_) => "SHELL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::OnBuild(_) => "ONBUILD",
            Instruction::Run(_) => "RUN",
        }
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandLine::Exec(v) => {
                let json = serde_json::to_string(v).map_err(|_| fmt::Error)?;
                f.write_str(&json)
            }
            CommandLine::Shell(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests;
