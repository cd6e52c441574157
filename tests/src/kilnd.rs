//! The real `kilnd` in a test: started on workspace roots with a fresh cache, a registry on
//! a free loopback port, its own control socket and a ready file; awaited until the ready
//! file says everything listens; stopped when the test ends, with its stderr shown when
//! the test failed.
//!
//! The ready-file contract (kilnd writes it atomically once every service listens):
//! `{"registry": ["127.0.0.1:41234", ...], "socket": "/path/kilnd.sock", "pid": 123}`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::api::{Api, Events};
use crate::dir::Dir;
use crate::machine::{self, SharedToken};
use crate::process::{log_tail, stop_child};
use crate::wait::try_wait_for;

/// What kilnd wrote to its ready file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    pub registry: Vec<SocketAddr>,
    pub socket: PathBuf,
    pub pid: u32,
}

/// Why kilnd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum KilndError {
    #[error(
        "{bin} not found: {source}; build it first (`cargo build -p kiln-daemon --bin kilnd`; scripts/test does)"
    )]
    NotFound {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kilnd exited with {status} before it was ready; its stderr:\n{stderr}")]
    Exited { status: ExitStatus, stderr: String },
    #[error(
        "kilnd was not ready within {timeout:?} (no ready file at {ready_file}); its stderr:\n{stderr}"
    )]
    NotReady {
        timeout: Duration,
        ready_file: PathBuf,
        stderr: String,
    },
    #[error("kilnd's ready file {path} is not what the contract says ({reason}): {text}")]
    BadReadyFile {
        path: PathBuf,
        reason: String,
        text: String,
    },
}

/// How to start kilnd beyond the defaults (fresh cache, `--listen 127.0.0.1:0`).
#[derive(Debug, Clone)]
pub struct KilndOptions {
    binary: Option<PathBuf>,
    cache: Option<PathBuf>,
    listen: Vec<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    ready_timeout: Duration,
}

impl Default for KilndOptions {
    fn default() -> KilndOptions {
        KilndOptions {
            binary: None,
            cache: None,
            listen: vec!["127.0.0.1:0".to_owned()],
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            ready_timeout: Duration::from_secs(60),
        }
    }
}

impl KilndOptions {
    /// Another kilnd binary than the one built next to the test.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> KilndOptions {
        self.binary = Some(path.into());
        self
    }

    /// Use this cache directory (e.g. to restart kilnd on the cache of a previous run)
    /// instead of a fresh one.
    pub fn cache(mut self, dir: impl Into<PathBuf>) -> KilndOptions {
        self.cache = Some(dir.into());
        self
    }

    /// Replaces the listen addresses (default `127.0.0.1:0`).
    pub fn listen<I, S>(mut self, addrs: I) -> KilndOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.listen = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// One more command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> KilndOptions {
        self.args.push(arg.into());
        self
    }

    /// An environment variable for kilnd (other `KILN_*` variables are removed).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> KilndOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> KilndOptions {
        self.current_dir = Some(dir.into());
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> KilndOptions {
        self.ready_timeout = timeout;
        self
    }
}

/// A running kilnd; stopped on drop (SIGTERM, then SIGKILL after 10 s).
#[derive(Debug)]
pub struct Kilnd {
    child: Option<Child>,
    ready: Ready,
    cache: PathBuf,
    stderr: PathBuf,
    stdout: PathBuf,
    dir: Dir,
    /// Held while kilnd runs: no test changes machine-wide settings meanwhile.
    _machine: SharedToken,
}

impl Kilnd {
    /// Starts kilnd on `roots` and waits until it is ready; panics with its stderr if it
    /// exits or is not ready in time.
    pub fn start<P: AsRef<Path>>(roots: &[P], options: KilndOptions) -> Kilnd {
        Kilnd::try_start(roots, options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Kilnd::start`], returning why it failed instead of panicking.
    pub fn try_start<P: AsRef<Path>>(
        roots: &[P],
        options: KilndOptions,
    ) -> Result<Kilnd, KilndError> {
        let machine = machine::shared();
        let bin = match options.binary {
            Some(b) => b,
            None => target_bin("kilnd"),
        };
        fs::metadata(&bin).map_err(|source| KilndError::NotFound {
            bin: bin.clone(),
            source,
        })?;
        let dir = Dir::new("kilnd");
        let cache = options.cache.unwrap_or_else(|| dir.join("cache"));
        let socket = dir.join("kilnd.sock");
        let ready_file = dir.join("ready.json");
        let stderr = dir.join("kilnd.stderr");
        let stdout = dir.join("kilnd.stdout");
        let create =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));

        let mut command = Command::new(&bin);
        command
            .args(roots.iter().map(AsRef::as_ref))
            .arg("--cache")
            .arg(&cache)
            .arg("--socket")
            .arg(&socket)
            .arg("--ready-file")
            .arg(&ready_file);
        for addr in &options.listen {
            command.arg("--listen").arg(addr);
        }
        command
            .args(&options.args)
            .stdin(Stdio::null())
            .stdout(create(&stdout))
            .stderr(create(&stderr));
        // The test's own environment must not configure kilnd behind its back.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KILN_") && key != "KILN_LOG" {
                command.env_remove(&key);
            }
        }
        // Its log goes to a file that a failing test prints: no colour codes in it.
        command.env("NO_COLOR", "1");
        if std::env::var_os("KILN_LOG").is_none() {
            command.env("KILN_LOG", "info,kiln_daemon=debug");
        }
        for (k, v) in &options.env {
            command.env(k, v);
        }
        if let Some(d) = &options.current_dir {
            command.current_dir(d);
        }
        let mut child = command.spawn().map_err(|source| KilndError::Spawn {
            bin: bin.clone(),
            source,
        })?;

        let waited = try_wait_for(options.ready_timeout, "kilnd's ready file", || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(KilndError::Exited {
                    status,
                    stderr: log_tail(&stderr, 64 * 1024),
                }));
            }
            // Written atomically (rename), so it exists whole or not at all.
            let text = fs::read_to_string(&ready_file).ok()?;
            Some(parse_ready(&ready_file, &text))
        });
        let ready = match waited {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                stop_child(&mut child, Duration::from_secs(10));
                return Err(e);
            }
            Err(_) => {
                stop_child(&mut child, Duration::from_secs(10));
                return Err(KilndError::NotReady {
                    timeout: options.ready_timeout,
                    ready_file,
                    stderr: log_tail(&stderr, 64 * 1024),
                });
            }
        };
        if ready.pid != child.id() {
            stop_child(&mut child, Duration::from_secs(10));
            return Err(KilndError::BadReadyFile {
                text: format!("{ready:?}"),
                path: ready_file,
                reason: format!("pid {} is not the child's pid {}", ready.pid, child.id()),
            });
        }
        Ok(Kilnd {
            child: Some(child),
            ready,
            cache,
            stderr,
            stdout,
            dir,
            _machine: machine,
        })
    }

    /// The first IPv4 registry address (`127.0.0.1:PORT`), else the first one: what a
    /// reference like `ADDR/org/image:tag` uses (the engine takes 127.0.0.0/8 as insecure).
    pub fn registry(&self) -> String {
        let addrs = &self.ready.registry;
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .unwrap_or_else(|| {
                panic!(
                    "kilnd's ready file lists no registry address: {:?}",
                    self.ready
                )
            });
        addr.to_string()
    }

    /// Every address the registry listens on.
    pub fn registry_addrs(&self) -> &[SocketAddr] {
        &self.ready.registry
    }

    /// The control API's unix socket.
    pub fn socket(&self) -> &Path {
        &self.ready.socket
    }

    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The cache directory (an OCI image layout).
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// kilnd's stderr so far (its log).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// kilnd's stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Whether kilnd is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops kilnd with SIGTERM (SIGKILL if it has not exited after 10 s); returns its exit
    /// status and whether it had to be killed. The temp dir (and a default cache) stays
    /// until the `Kilnd` is dropped.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("kilnd (pid {}) was already stopped", self.ready.pid));
        stop_child(&mut child, Duration::from_secs(10))
    }

    /// A client of its control API.
    pub fn api(&self) -> Api {
        Api::new(self.socket())
    }

    /// Follows its event stream from now on (see [`Events`]).
    pub fn events(&self) -> Events {
        self.api().events()
    }

    /// A file in kilnd's temp dir (e.g. for a kiln.toml the test passes with `--config`).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        let killed = match self.child.take() {
            Some(mut child) => stop_child(&mut child, Duration::from_secs(10)).1,
            None => false,
        };
        if std::thread::panicking() || killed {
            eprintln!(
                "--- kilnd (pid {}) stderr{} ---\n{}\n--- end of kilnd stderr ---",
                self.ready.pid,
                if killed {
                    ", killed after SIGTERM did not stop it"
                } else {
                    ""
                },
                log_tail(&self.stderr, 64 * 1024)
            );
        }
    }
}

/// Parses a ready file's text.
fn parse_ready(path: &Path, text: &str) -> Result<Ready, KilndError> {
    let bad = |reason: String| KilndError::BadReadyFile {
        path: path.to_owned(),
        reason,
        text: text.to_owned(),
    };
    let ready: Ready = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if ready.registry.iter().any(|a| a.port() == 0) {
        return Err(bad(
            "a registry address with port 0: the bound port must be reported".into(),
        ));
    }
    Ok(ready)
}

/// A binary of this workspace, built into the same target directory as the running test:
/// `target/<profile>/<name>` (the test runs from `target/<profile>/deps/`).
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the running test's executable: {e}"));
    let mut dir = exe.parent();
    while let Some(d) = dir {
        if d.file_name().is_some_and(|n| n == "deps") {
            if let Some(profile) = d.parent() {
                return profile.join(name);
            }
        }
        dir = d.parent();
    }
    // Not under deps/ (e.g. a copied test binary): next to it.
    exe.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_the_contract() {
        let text = r#"{"registry":["127.0.0.1:41234","[::1]:41234"],"socket":"/run/k/kilnd.sock","pid":123}"#;
        let ready = parse_ready(Path::new("r.json"), text).unwrap();
        assert_eq!(
            ready,
            Ready {
                registry: vec![
                    "127.0.0.1:41234".parse().unwrap(),
                    "[::1]:41234".parse().unwrap()
                ],
                socket: PathBuf::from("/run/k/kilnd.sock"),
                pid: 123,
            }
        );
    }

    #[test]
    fn rejects_what_breaks_the_contract() {
        for (text, why) in [
            (
                r#"{"registry":["127.0.0.1:0"],"socket":"/s","pid":1}"#,
                "port 0",
            ),
            (
                r#"{"registry":["localhost:5000"],"socket":"/s","pid":1}"#,
                "invalid socket address",
            ),
            (r#"{"registry":[],"socket":"/s"}"#, "missing field `pid`"),
            (
                r#"{"registry":[],"socket":"/s","pid":1,"extra":2}"#,
                "unknown field `extra`",
            ),
            (r#"{"registry":[],"socket":"/s","pid":1"#, "EOF"),
        ] {
            let err = parse_ready(Path::new("/x/ready.json"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(
                err.starts_with("kilnd's ready file /x/ready.json is not what the contract says"),
                "{err}"
            );
        }
    }

    #[test]
    fn target_bin_is_in_the_profile_dir() {
        // This unit test runs as target/<profile>/deps/kiln_tests-HASH.
        let bin = target_bin("kilnd");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(bin.parent(), exe.parent().unwrap().parent());
        assert_eq!(bin.file_name().unwrap(), "kilnd");
    }

    /// A stand-in for kilnd: a shell script that honours the command line's contract, so
    /// that the harness's own logic (arguments, waiting, errors, stopping) is tested here;
    /// the real kilnd is exercised by the e2e tests.
    fn fake_kilnd(dir: &Dir, body: &str) -> PathBuf {
        let script = dir.write(
            "fake-kilnd",
            format!(
                "#!/bin/sh\n\
                 # kilnd ROOT... --cache C --socket S --ready-file R --listen A...\n\
                 while [ $# -gt 0 ]; do\n\
                   case \"$1\" in\n\
                     --cache) cache=$2; shift 2;;\n\
                     --socket) socket=$2; shift 2;;\n\
                     --ready-file) ready=$2; shift 2;;\n\
                     --listen) listen=$2; shift 2;;\n\
                     --*) shift;;\n\
                     *) roots=\"$roots $1\"; shift;;\n\
                   esac\n\
                 done\n\
                 {body}\n"
            ),
        );
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// Like kilnd: the SIGTERM handler is in place before the ready file says so.
    const WRITE_READY: &str = "mkdir -p \"$cache\"; echo \"roots:$roots cache:$cache\" >&2\n\
         trap 'echo got TERM >&2; exit 0' TERM\n\
         printf '{\"registry\":[\"127.0.0.1:5123\"],\"socket\":\"%s\",\"pid\":%s}' \"$socket\" $$ > \"$ready.tmp\"\n\
         mv \"$ready.tmp\" \"$ready\"\n\
         while :; do sleep 1; done";

    #[test]
    fn waits_for_the_ready_file_and_stops_on_sigterm() {
        let d = Dir::new("fake");
        let ws = d.mkdir("ws");
        let bin = fake_kilnd(&d, &format!("sleep 0.2\n{WRITE_READY}"));
        let mut k = Kilnd::start(&[&ws], KilndOptions::default().binary(&bin));
        assert_eq!(k.registry(), "127.0.0.1:5123");
        assert!(k.socket().ends_with("kilnd.sock"));
        assert!(k.cache().is_dir());
        assert!(k.is_running());
        let log = k.stderr();
        assert!(
            log.contains(&format!(
                "roots: {} cache:{}",
                ws.display(),
                k.cache().display()
            )),
            "{log}"
        );
        let (status, killed) = k.stop();
        assert!(status.success(), "{status}");
        assert!(!killed);
        assert!(k.stderr().contains("got TERM"));
    }

    #[test]
    fn an_early_exit_reports_status_and_stderr() {
        let d = Dir::new("fake");
        let bin = fake_kilnd(
            &d,
            "echo 'kilnd: workspace root /nope is not a directory' >&2; exit 2",
        );
        let err = Kilnd::try_start(&["/nope"], KilndOptions::default().binary(&bin)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("kilnd exited with exit status: 2 before it was ready"),
            "{msg}"
        );
        assert!(
            msg.contains("workspace root /nope is not a directory"),
            "{msg}"
        );
    }

    #[test]
    fn never_ready_times_out_with_stderr_and_kills_it() {
        let d = Dir::new("fake");
        let bin = fake_kilnd(
            &d,
            "echo 'stuck opening the cache' >&2; echo $$ > \"$cache.pid\"; mkdir -p \"$cache\"; while :; do sleep 1; done",
        );
        let cache = d.join("cache");
        let err = Kilnd::try_start(
            &[d.path()],
            KilndOptions::default()
                .binary(&bin)
                .cache(&cache)
                .ready_timeout(Duration::from_millis(500)),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("kilnd was not ready within 500ms"), "{msg}");
        assert!(msg.contains("stuck opening the cache"), "{msg}");
        let pid: i32 = d.read("cache.pid").trim().parse().unwrap();
        // Stopped and reaped: the pid no longer exists.
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
        assert!(gone, "the fake kilnd {pid} still runs");
    }

    #[test]
    fn a_ready_file_with_another_pid_is_refused() {
        let d = Dir::new("fake");
        let bin = fake_kilnd(
            &d,
            "printf '{\"registry\":[\"127.0.0.1:5123\"],\"socket\":\"%s\",\"pid\":1}' \"$socket\" > \"$ready.tmp\"; mv \"$ready.tmp\" \"$ready\"; while :; do sleep 1; done",
        );
        let err = Kilnd::try_start(&[d.path()], KilndOptions::default().binary(&bin)).unwrap_err();
        assert!(
            err.to_string().contains("pid 1 is not the child's pid"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = Kilnd::try_start(&["/"], KilndOptions::default().binary("/nonexistent/kilnd"))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cargo build -p kiln-daemon --bin kilnd"),
            "{err}"
        );
    }

    #[test]
    fn options_env_reaches_kilnd() {
        let d = Dir::new("fake");
        let bin = fake_kilnd(
            &d,
            &format!("echo \"x=${{KILN_X:-unset}} log=$KILN_LOG\" >&2\n{WRITE_READY}"),
        );
        let k = Kilnd::start(
            &[d.path()],
            KilndOptions::default()
                .binary(&bin)
                .env("KILN_X", "from options")
                .env("KILN_LOG", "trace"),
        );
        let log = k.stderr();
        assert!(log.contains("x=from options log=trace"), "{log}");
    }
}
