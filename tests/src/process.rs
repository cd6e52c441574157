//! Child processes that a test starts and must not leave behind: stop them politely
//! (SIGTERM), then firmly (SIGKILL) after a grace period; show the end of their logs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::try_wait_for;

/// Sends SIGTERM, waits up to `grace` for the exit, then SIGKILLs. Returns the exit status,
/// and whether the child had to be killed.
pub fn stop_child(child: &mut Child, grace: Duration) -> (ExitStatus, bool) {
    if let Ok(Some(status)) = child.try_wait() {
        return (status, false);
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    if let Ok(status) = try_wait_for(grace, "the child to exit", || {
        child.try_wait().ok().flatten()
    }) {
        return (status, false);
    }
    let _ = child.kill();
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("reaping pid {pid} after SIGKILL: {e}"));
    (status, true)
}

/// The last `max` bytes of the file at `path` (whole lines), or a note that it is empty or
/// unreadable.
pub fn log_tail(path: &Path, max: u64) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return "(empty)".to_owned();
    }
    let start = len.saturating_sub(max);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return format!("(cannot seek in {})", path.display());
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    if start == 0 {
        return text.into_owned();
    }
    // Drop the partial first line.
    let whole = text.split_once('\n').map_or("", |(_, rest)| rest);
    format!("[... {start} bytes before ...]\n{whole}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    #[test]
    fn sigterm_is_enough_for_a_polite_child() {
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let (status, killed) = stop_child(&mut child, Duration::from_secs(10));
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert!(!killed);
    }

    #[test]
    fn sigkill_after_the_grace_period() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "trap '' TERM; echo trapped; while :; do sleep 1; done",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the trap is installed, or SIGTERM would still kill it.
        let mut line = [0u8; 8];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        let (status, killed) = stop_child(&mut child, Duration::from_millis(200));
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
        assert!(killed);
    }

    #[test]
    fn an_exited_child_is_just_reaped() {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let (status, killed) = stop_child(&mut child, Duration::from_secs(1));
        assert!(status.success());
        assert!(!killed);
    }

    #[test]
    fn log_tail_keeps_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(log_tail(&path, 1000), "first line\nsecond line\nthird\n");
        assert_eq!(log_tail(&path, 10), "[... 19 bytes before ...]\nthird\n");
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path, 10), "(empty)");
        assert!(log_tail(&dir.path().join("nope"), 10).starts_with("(cannot read "));
    }
}
