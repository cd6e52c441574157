//! Running the real clients (docker, skopeo, git, ...) from a test, with a deadline and a
//! failure message that says everything needed to understand the failure without running
//! it again: the command line, where it ran, its exit status, its stdout and its stderr.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a command may run unless [`Cmd::timeout`] says otherwise. Generous: an arm64
/// `docker build` under qemu is slow on two cores.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A command to run: `cmd("skopeo").args(["inspect", "--raw", r]).run()`.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a command did not give the outcome asked for.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?}; killed it\n{output}")]
    Timeout {
        command: String,
        timeout: Duration,
        output: Box<Output>,
    },
    #[error("{0}")]
    Failed(Box<Output>),
    #[error("`{command}` succeeded, but it was expected to fail\n{output}", command = .0.command, output = .0)]
    Succeeded(Box<Output>),
}

/// A command running `program` (see [`program_path`] for docker).
pub fn cmd(program: impl AsRef<OsStr>) -> Cmd {
    Cmd {
        program: program.as_ref().to_owned(),
        args: Vec::new(),
        env: Vec::new(),
        dir: None,
        stdin: None,
        timeout: DEFAULT_TIMEOUT,
    }
}

/// The Docker client: `$KILN_DOCKER`, else Debian's `/usr/bin/docker` (it speaks the engine's
/// API version; a newer client elsewhere on PATH may not), else `docker` from PATH.
pub fn docker() -> Cmd {
    cmd(program_path("docker"))
}

/// `skopeo`.
pub fn skopeo() -> Cmd {
    cmd("skopeo")
}

/// `git` with a fixed identity and no signing, whatever the user's configuration says.
pub fn git() -> Cmd {
    cmd("git").args([
        "-c",
        "user.name=kiln tests",
        "-c",
        "user.email=tests@kiln.invalid",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "init.defaultBranch=main",
    ])
}

/// Where to find `program`; only docker has a preference (see [`docker`]).
pub fn program_path(program: &str) -> PathBuf {
    if program == "docker" {
        if let Some(p) = std::env::var_os("KILN_DOCKER") {
            return PathBuf::from(p);
        }
        let debian = Path::new("/usr/bin/docker");
        if debian.exists() {
            return debian.to_owned();
        }
    }
    PathBuf::from(program)
}

impl Cmd {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs in `dir` instead of the test's current directory.
    pub fn dir(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Feeds `input` on stdin (otherwise stdin is empty).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(input.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// Runs the command; panics with the whole story unless it exits 0.
    pub fn run(&self) -> Output {
        self.try_run().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the command and returns its stdout as trimmed UTF-8; panics unless it exits 0.
    pub fn stdout(&self) -> String {
        self.run().stdout_str().trim().to_owned()
    }

    /// Runs the command; panics with the whole story if it exits 0 (or cannot run).
    pub fn run_fails(&self) -> Output {
        match self.output() {
            Ok(out) if out.status.success() => panic!("{}", CmdError::Succeeded(Box::new(out))),
            Ok(out) => out,
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs the command: an error unless it exits 0.
    pub fn try_run(&self) -> Result<Output, CmdError> {
        let out = self.output()?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(CmdError::Failed(Box::new(out)))
        }
    }

    /// Runs the command to its end (or its deadline), whatever its exit status.
    pub fn output(&self) -> Result<Output, CmdError> {
        let command = self.to_string();
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout can end everything it started.
            .process_group(0);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        let mut child = c.spawn().map_err(|source| CmdError::Spawn {
            command: command.clone(),
            source,
        })?;
        // Readers on their own threads: a child that fills one pipe while we wait on the
        // other would never finish.
        let input = self.stdin.clone();
        let stdin = child.stdin.take();
        let writer = thread::spawn(move || {
            if let (Some(mut pipe), Some(bytes)) = (stdin, input) {
                // A child that exits without reading all of it is not our failure.
                let _ = pipe.write_all(&bytes);
            }
        });
        let stdout = read_all(child.stdout.take());
        let stderr = read_all(child.stderr.take());

        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(1);
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    // The whole group: a shell's children would keep the pipes open.
                    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                    break child
                        .wait()
                        .unwrap_or_else(|e| panic!("reaping `{command}` after killing it: {e}"));
                }
                Ok(None) => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => panic!("waiting for `{command}`: {e}"),
            }
        };
        let _ = writer.join();
        let out = Output {
            command: command.clone(),
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if timed_out {
            return Err(CmdError::Timeout {
                command,
                timeout: self.timeout,
                output: Box::new(out),
            });
        }
        Ok(out)
    }
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

impl fmt::Display for Cmd {
    /// The command line as a shell would take it (with `cd DIR &&` when it has a directory).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.dir {
            write!(f, "cd {} && ", shell_quote(d.as_os_str()))?;
        }
        for (k, v) in &self.env {
            write!(f, "{}={} ", k.to_string_lossy(), shell_quote(v))?;
        }
        write!(f, "{}", shell_quote(&self.program))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        Ok(())
    }
}

/// `s` quoted for a POSIX shell when it needs to be.
fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "status:  {}", self.status)?;
        for (name, bytes) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if bytes.is_empty() {
                writeln!(f, "{name}:  (empty)")?;
            } else {
                writeln!(f, "{name}:")?;
                for line in String::from_utf8_lossy(bytes).lines() {
                    writeln!(f, "    {line}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_captures_stdout_and_stderr() {
        let out = cmd("sh").args(["-c", "echo out; echo err >&2"]).run();
        assert_eq!(out.stdout_str(), "out\n");
        assert_eq!(out.stderr_str(), "err\n");
    }

    #[test]
    fn failure_message_has_command_status_and_both_streams() {
        let err = cmd("sh")
            .args(["-c", "echo some output; echo the reason >&2; exit 3"])
            .try_run()
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("command: sh -c 'echo some output; echo the reason >&2; exit 3'"),
            "{msg}"
        );
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("    some output"), "{msg}");
        assert!(msg.contains("    the reason"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "exit status: 1")]
    fn run_panics_on_failure() {
        cmd("false").run();
    }

    #[test]
    fn run_fails_returns_the_failure() {
        let out = cmd("sh").args(["-c", "echo nope >&2; exit 7"]).run_fails();
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(out.stderr_str(), "nope\n");
    }

    #[test]
    #[should_panic(expected = "expected to fail")]
    fn run_fails_panics_on_success() {
        cmd("true").run_fails();
    }

    #[test]
    fn missing_program_says_which() {
        let err = cmd("kiln-no-such-program").try_run().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot start `kiln-no-such-program`"),
            "{err}"
        );
    }

    #[test]
    fn timeout_kills_the_command() {
        let started = Instant::now();
        // A shell whose child holds the pipes open: the whole group must go.
        let err = cmd("sh")
            .args(["-c", "sleep 30; echo never"])
            .timeout(Duration::from_millis(200))
            .try_run()
            .unwrap_err();
        assert!(matches!(err, CmdError::Timeout { .. }), "{err}");
        assert!(
            err.to_string().contains("did not finish within 200ms"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stdin_env_and_dir_reach_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let out = cmd("sh")
            .args(["-c", "cat; echo \"$KILN_X\"; pwd"])
            .stdin("from stdin\n")
            .env("KILN_X", "from env")
            .dir(dir.path())
            .stdout();
        let want = format!(
            "from stdin\nfrom env\n{}",
            dir.path().canonicalize().unwrap().display()
        );
        assert_eq!(out, want);
    }

    #[test]
    fn large_output_on_both_pipes_does_not_deadlock() {
        // 1 MiB on each stream, far beyond a pipe's buffer.
        let out = cmd("sh")
            .args([
                "-c",
                "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2",
            ])
            .run();
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr.len(), 1 << 20);
    }

    #[test]
    fn display_quotes_what_the_shell_would_split() {
        let c = cmd("docker")
            .args(["run", "--rm", "it's here", "a b", ""])
            .env("A", "x y")
            .dir("/tmp/some dir");
        assert_eq!(
            c.to_string(),
            "cd '/tmp/some dir' && A='x y' docker run --rm 'it'\\''s here' 'a b' ''"
        );
    }

    #[test]
    fn git_has_a_fixed_identity() {
        let dir = tempfile::tempdir().unwrap();
        git().args(["init", "-q"]).dir(dir.path()).run();
        git()
            .args(["commit", "-q", "--allow-empty", "-m", "first"])
            .dir(dir.path())
            .run();
        let author = git()
            .args(["log", "-1", "--format=%an <%ae>"])
            .dir(dir.path())
            .stdout();
        assert_eq!(author, "kiln tests <tests@kiln.invalid>");
    }
}
