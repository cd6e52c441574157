//! `kiln up [DIR]`: make sure a kilnd runs for DIR (starting one in the background if
//! none does), wait until it is ready, then open the dashboard.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_shared::protocol::Ready;

use crate::cli::KilndFlags;
use crate::client::Client;

/// How long kilnd may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How often the ready file is looked for.
const POLL: Duration = Duration::from_millis(50);

/// kiln's state directory (logs): `$XDG_STATE_HOME/kiln`, else `~/.local/state/kiln`.
pub fn state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_STATE_HOME")
        .map(|d| d.join("kiln"))
        .or_else(|| env("HOME").map(|h| h.join(".local/state/kiln")))
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-state"))
}

/// What `ensure` found or did.
#[derive(Debug)]
pub enum Started {
    AlreadyRunning,
    Started { ready: Ready, log: PathBuf },
}

/// The log file of the kilnd on `socket`: one per socket (one kilnd per socket), so two
/// workspaces' kilnds never share one. `/run/user/0/kiln/kilnd.sock` logs to
/// `kilnd@run-user-0-kiln-kilnd.sock.log`.
pub fn log_path(state: &Path, socket: &Path) -> PathBuf {
    let flat: String = socket
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    state.join(format!("kilnd@{flat}.log"))
}

/// Makes sure a kilnd for `dir` answers on the client's socket, starting one with
/// `flags` if none does.
pub async fn ensure(client: &Client, dir: &Path, flags: &KilndFlags) -> anyhow::Result<Started> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot open the workspace {}", dir.display()))?;
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: give kiln up a workspace directory",
            dir.display()
        );
    }
    match client.state().await {
        Ok(s) if s.roots.iter().any(|r| r == &dir) => return Ok(Started::AlreadyRunning),
        Ok(s) => {
            let roots: Vec<String> = s.roots.iter().map(|r| r.display().to_string()).collect();
            bail!(
                "a kilnd for {} already runs on {}: stop it (pid {}), or give this workspace its own socket with --socket",
                roots.join(" "),
                client.socket().display(),
                s.pid
            );
        }
        Err(e) if e.is_unreachable() => {}
        Err(e) => return Err(e.into()),
    }
    let state = state_dir();
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create kiln's state directory {}", state.display()))?;
    let log_path = log_path(&state, client.socket());
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open kilnd's log {}", log_path.display()))?;
    // Where this start's lines begin: an earlier kilnd's lines are not this one's story.
    let start_offset = log
        .metadata()
        .with_context(|| format!("cannot read kilnd's log {}", log_path.display()))?
        .len();
    let ready_path = state.join(format!("kilnd-{}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready_path);
    let kilnd = crate::standalone::kilnd_path();
    let mut child = Command::new(&kilnd)
        .arg(&dir)
        .arg("--socket")
        .arg(client.socket())
        .arg("--ready-file")
        .arg(&ready_path)
        .args(flags.to_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share kilnd's log file")?)
        .stderr(log)
        // Its own process group: the terminal's Ctrl-C and hangup do not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {}: install kilnd next to kiln or on PATH",
                kilnd.display()
            )
        })?;
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready_path)
            && let Ok(ready) = serde_json::from_str::<Ready>(&text)
        {
            let _ = std::fs::remove_file(&ready_path);
            // Reap kilnd if it exits while this kiln still runs (the dashboard), so it
            // does not linger as a zombie; once kiln exits, init adopts it.
            std::thread::spawn(move || child.wait());
            return Ok(Started::Started {
                ready,
                log: log_path,
            });
        }
        if let Some(status) = child.try_wait().context("cannot wait for kilnd")? {
            bail!(
                "kilnd exited ({status}) before it was ready:\n{}\n(its log: {})",
                lines_since(&log_path, start_offset, 40),
                log_path.display()
            );
        }
        if start.elapsed() > READY_DEADLINE {
            bail!(
                "kilnd (pid {}) was not ready after {}s; its log: {}\n{}",
                child.id(),
                READY_DEADLINE.as_secs(),
                log_path.display(),
                lines_since(&log_path, start_offset, 40)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last `n` lines written to `path` from byte `offset` on.
fn lines_since(path: &Path, offset: u64, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_socket_has_its_own_log() {
        let state = Path::new("/state");
        let a = log_path(state, Path::new("/run/user/0/kiln/kilnd.sock"));
        let b = log_path(state, Path::new("/tmp/other/kilnd.sock"));
        assert_eq!(a, Path::new("/state/kilnd@run-user-0-kiln-kilnd.sock.log"));
        assert_ne!(a, b);
    }

    #[test]
    fn a_failed_start_shows_its_own_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("k.log");
        std::fs::write(&log, "old kilnd: listening\nold kilnd: stopped\n").unwrap();
        let offset = std::fs::metadata(&log).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"kilnd: cannot listen on 127.0.0.1:5000\n").unwrap();
        assert_eq!(
            lines_since(&log, offset, 40),
            "kilnd: cannot listen on 127.0.0.1:5000"
        );
    }

    #[tokio::test]
    async fn a_missing_workspace_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = ensure(
            &Client::new(dir.path().join("k.sock")),
            &dir.path().join("nope"),
            &KilndFlags::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cannot open the workspace"), "{e}");
    }
}
