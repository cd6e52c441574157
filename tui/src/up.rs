//! `kiln up [DIR]`: make sure a kilnd runs for DIR (starting one in the background if
//! none does), wait until it is ready, then open the dashboard.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_shared::protocol::Ready;

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

/// Makes sure a kilnd for `dir` answers on the client's socket.
pub async fn ensure(client: &Client, dir: &Path) -> anyhow::Result<Started> {
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
    let log_path = state.join("kilnd.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open kilnd's log {}", log_path.display()))?;
    let ready_path = state.join(format!("kilnd-{}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready_path);
    let kilnd = crate::standalone::kilnd_path();
    let mut child = Command::new(&kilnd)
        .arg(&dir)
        .arg("--socket")
        .arg(client.socket())
        .arg("--ready-file")
        .arg(&ready_path)
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
                "kilnd exited ({status}) before it was ready:\n{}\n(full log: {})",
                tail(&log_path, 20),
                log_path.display()
            );
        }
        if start.elapsed() > READY_DEADLINE {
            bail!(
                "kilnd (pid {}) was not ready after {}s; its log: {}\n{}",
                child.id(),
                READY_DEADLINE.as_secs(),
                log_path.display(),
                tail(&log_path, 20)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_workspace_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = ensure(
            &Client::new(dir.path().join("k.sock")),
            &dir.path().join("nope"),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cannot open the workspace"), "{e}");
    }
}
