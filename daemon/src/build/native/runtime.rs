//! Running one RUN step in a container, as BuildKit's OCI worker does: an overlay of the
//! stage's snapshots (lower, top first) and a fresh upper directory (`redirect_dir` and
//! `metacopy` off, so the upper directory holds whole files and plain whiteouts), an OCI
//! runtime bundle around it, and `runc run` to completion, its output streamed line by
//! line as it arrives.
//!
//! Everything a step makes is named with [`PREFIX`] under `<cache>/.kiln/run/` (its
//! directory, overlay mount point and container id alike): a cancelled or failed step is
//! killed, deleted and unmounted, and its directory removed, before `run` returns; what a
//! crashed kilnd left is removed by [`clean_stale`] when the next one starts.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use serde_json::json;

use super::snapshot::{PREFIX, SnapshotError, Snapshots};
use crate::oci::Platform;

/// How often a running step looks at its cancellation flag between output lines.
const CANCEL_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting the overlay at {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("starting {}: {source}", runtime.display())]
    Spawn {
        runtime: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the command exited with code {0}")]
    Exit(i32),
    #[error("the command was killed by signal {0}")]
    Signal(i32),
    #[error("cancelled")]
    Cancelled,
}

/// A mount of the step besides the standard ones.
#[derive(Debug, Clone)]
pub enum ExtraMount {
    /// A host directory or file bound at `target`.
    Bind {
        target: String,
        source: PathBuf,
        readonly: bool,
    },
    Tmpfs {
        target: String,
        size: Option<u64>,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Step {
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether the step shares the host's network (otherwise it gets its own, empty one).
    pub network: bool,
    pub mounts: Vec<ExtraMount>,
    /// The stage's snapshots, top first.
    pub lowers: Vec<PathBuf>,
}

/// The mount destinations every step has, relative (what the layer leaves out).
pub const STANDARD_MOUNTS: &[&str] = &["proc", "dev", "sys", "etc/hosts", "etc/resolv.conf"];

/// A step that ran: its upper directory (the changes), inside a work directory that is
/// removed when this is dropped (after the upper directory was moved out, or not).
#[derive(Debug)]
pub struct Finished {
    pub upper: PathBuf,
    work: PathBuf,
}

impl Drop for Finished {
    fn drop(&mut self) {
        remove_work(&self.work);
    }
}

/// The OCI runtime kilnd uses: `runc` on the PATH or in the system directories.
pub fn find_runtime() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
}

/// Why RUN steps cannot run on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("RUN steps need root (overlay mounts and runc); kilnd runs as another user")]
    NotRoot,
    #[error(
        "no OCI runtime: install runc (Debian: apt-get install runc) to build RUN steps natively"
    )]
    NoRuntime,
}

/// Whether RUN steps can run here (a runtime, and root for mounts), or why not.
pub fn availability() -> Result<PathBuf, Unavailable> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Unavailable::NotRoot);
    }
    find_runtime().ok_or(Unavailable::NoRuntime)
}

/// A foreign architecture's emulator is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "RUN for linux/{arch}: the qemu-{qemu} emulator {why} in binfmt_misc; run `update-binfmts --enable qemu-{qemu}` (Debian: apt-get install qemu-user-static binfmt-support)"
)]
pub struct NoEmulator {
    pub arch: String,
    pub qemu: String,
    pub why: &'static str,
}

/// For a foreign architecture, whether its qemu-user emulator is registered in
/// binfmt_misc with the F flag (so it works inside the container); the error names the
/// command that registers it.
pub fn check_emulator(platform: &Platform) -> Result<(), NoEmulator> {
    let host = super::super::dockerfile::host_platform();
    if platform.architecture == host.architecture
        || (host.architecture == "amd64" && platform.architecture == "386")
    {
        return Ok(());
    }
    let qemu = match platform.architecture.as_str() {
        "arm64" => "aarch64",
        "arm" => "arm",
        "386" => "i386",
        "amd64" => "x86_64",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        other => other,
    };
    let entry = Path::new("/proc/sys/fs/binfmt_misc").join(format!("qemu-{qemu}"));
    let text = fs::read_to_string(&entry).unwrap_or_default();
    let enabled = text.lines().next() == Some("enabled");
    let fixed = text
        .lines()
        .any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')));
    if enabled && fixed {
        return Ok(());
    }
    let why = if !enabled {
        "is not registered"
    } else {
        "is registered without the F flag, so it cannot run inside a container"
    };
    Err(NoEmulator {
        arch: platform.architecture.clone(),
        qemu: qemu.to_owned(),
        why,
    })
}

/// Runs `step` to completion. `log` gets each output line as it arrives; `cancelled` is
/// asked between lines, and when it says so the container is killed and everything of
/// the step removed.
pub fn run(
    snapshots: &Snapshots,
    runtime: &Path,
    step: &Step,
    log: &mut dyn FnMut(String),
    cancelled: &dyn Fn() -> bool,
) -> Result<Finished, RuntimeError> {
    let work = snapshots.new_work()?;
    let mut guard = Guard {
        work: work.clone(),
        runtime: runtime.to_owned(),
        runc_root: runc_root(snapshots),
        mounted: false,
        container: false,
        keep: false,
    };
    let id = work
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or_default()
        .to_owned();
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { what, path, source }
    };
    let upper = work.join("upper");
    let ovl_work = work.join("work");
    let rootfs = work.join("rootfs");
    for d in [&upper, &ovl_work, &rootfs] {
        fs::create_dir(d).map_err(io("creating", d))?;
    }
    let mut lowers = step.lowers.clone();
    if lowers.is_empty() {
        // FROM scratch: overlayfs needs a lower directory.
        let empty = work.join("empty");
        fs::create_dir(&empty).map_err(io("creating", &empty))?;
        lowers.push(empty);
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_string_lossy().replace(':', "\\:"))
        .collect::<Vec<_>>()
        .join(":");
    let options = format!(
        "lowerdir={lowerdir},upperdir={},workdir={},redirect_dir=off,metacopy=off",
        upper.display(),
        ovl_work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|source| RuntimeError::Mount {
        path: rootfs.clone(),
        source,
    })?;
    guard.mounted = true;

    let hosts = work.join("hosts");
    fs::write(
        &hosts,
        "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    .map_err(io("writing", &hosts))?;
    let resolv = work.join("resolv.conf");
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    fs::write(&resolv, host_resolv).map_err(io("writing", &resolv))?;
    let config = bundle_config(step, &hosts, &resolv);
    let config_path = work.join("config.json");
    fs::write(&config_path, config.to_string()).map_err(io("writing", &config_path))?;

    let mut child = Command::new(runtime)
        .arg("--root")
        .arg(&guard.runc_root)
        .arg("run")
        .arg("--bundle")
        .arg(&work)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RuntimeError::Spawn {
            runtime: runtime.to_owned(),
            source,
        })?;
    guard.container = true;
    let status = stream(&mut child, log, cancelled, &guard, &id)?;
    guard.unmount();
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        return Err(match (status.code(), status.signal()) {
            (Some(c), _) => RuntimeError::Exit(c),
            (None, Some(s)) => RuntimeError::Signal(s),
            _ => RuntimeError::Exit(-1),
        });
    }
    // `runc run` deleted the container when its process ended.
    guard.container = false;
    guard.keep = true;
    Ok(Finished { upper, work })
}

/// Forwards the container's output until it ends; kills it when cancelled.
fn stream(
    child: &mut Child,
    log: &mut dyn FnMut(String),
    cancelled: &dyn Fn() -> bool,
    guard: &Guard,
    id: &str,
) -> Result<std::process::ExitStatus, RuntimeError> {
    let (tx, rx) = sync_channel::<String>(256);
    let mut readers = Vec::new();
    let pipes: Vec<Box<dyn io::Read + Send>> = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for pipe in pipes {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if tx.send(text).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    // Once cancelled, the kill is sent again at every poll until the output ends: a
    // cancel that comes while `runc run` is still creating the container finds nothing
    // to kill yet (`runc kill` fails), and one try would leave the step running.
    let mut killed = false;
    loop {
        match rx.recv_timeout(CANCEL_POLL) {
            Ok(line) => log(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if killed || cancelled() {
            killed = true;
            guard.kill(id);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|source| RuntimeError::Io {
        what: "waiting for",
        path: guard.runtime.clone(),
        source,
    })?;
    if killed {
        return Err(RuntimeError::Cancelled);
    }
    Ok(status)
}

/// Undoes what a step made, whatever happens: the container, the mount, the directory.
struct Guard {
    work: PathBuf,
    runtime: PathBuf,
    runc_root: PathBuf,
    mounted: bool,
    container: bool,
    keep: bool,
}

impl Guard {
    fn kill(&self, id: &str) {
        let _ = Command::new(&self.runtime)
            .arg("--root")
            .arg(&self.runc_root)
            .args(["kill", "--all", id, "KILL"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn unmount(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.work.join("rootfs"), MntFlags::MNT_DETACH);
            self.mounted = false;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.container {
            let id = self.work.file_name().unwrap_or_default();
            let _ = Command::new(&self.runtime)
                .arg("--root")
                .arg(&self.runc_root)
                .args([OsStr::new("delete"), OsStr::new("--force"), id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.unmount();
        if !self.keep {
            remove_work(&self.work);
        }
    }
}

/// A read-only overlay of an image's or stage's snapshots (what `RUN --mount=type=bind,
/// from=...` shows), unmounted and removed when dropped.
#[derive(Debug)]
pub struct View {
    work: PathBuf,
}

impl View {
    /// Mounts `lowers` (top first) read-only under a fresh `kiln-*` work directory.
    pub fn mount(snapshots: &Snapshots, lowers: &[PathBuf]) -> Result<View, RuntimeError> {
        let work = snapshots.new_work()?;
        let view = View { work };
        let root = view.root();
        let empty = view.work.join("empty");
        for d in [&root, &empty] {
            fs::create_dir(d).map_err(|source| RuntimeError::Io {
                what: "creating",
                path: d.clone(),
                source,
            })?;
        }
        // Without an upper directory overlayfs wants two lower ones at least.
        let lowerdir = lowers
            .iter()
            .chain(std::iter::once(&empty))
            .map(|p| p.to_string_lossy().replace(':', "\\:"))
            .collect::<Vec<_>>()
            .join(":");
        nix::mount::mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(format!("lowerdir={lowerdir}").as_str()),
        )
        .map_err(|source| RuntimeError::Mount {
            path: root.clone(),
            source,
        })?;
        Ok(view)
    }

    /// The mounted root.
    pub fn root(&self) -> PathBuf {
        self.work.join("rootfs")
    }
}

impl Drop for View {
    fn drop(&mut self) {
        remove_work(&self.work);
    }
}

fn remove_work(work: &Path) {
    let _ = nix::mount::umount2(&work.join("rootfs"), MntFlags::MNT_DETACH);
    if let Err(e) = fs::remove_dir_all(work)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", work.display());
    }
}

fn runc_root(snapshots: &Snapshots) -> PathBuf {
    snapshots.work_dir().join(".runc")
}

/// Removes what a crashed kilnd left of its RUN steps: its containers (all those under
/// kiln's own runc root), the overlay mounts under the work directory, and the
/// `kiln-*` directories. Called when kilnd starts, before any build.
pub fn clean_stale(snapshots: &Snapshots) -> usize {
    let work = snapshots.work_dir();
    let root = runc_root(snapshots);
    let mut removed = 0;
    if let Some(runtime) = find_runtime()
        && let Ok(out) = Command::new(&runtime)
            .arg("--root")
            .arg(&root)
            .args(["list", "-q"])
            .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            if id.starts_with(PREFIX) {
                let _ = Command::new(&runtime)
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .status();
                removed += 1;
            }
        }
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: BTreeSet<PathBuf> = BTreeSet::new();
    for line in mounts.lines() {
        if let Some(target) = line.split(' ').nth(4) {
            let target = PathBuf::from(target.replace("\\040", " "));
            if target.starts_with(work) {
                targets.insert(target);
            }
        }
    }
    // Deepest first.
    for t in targets.iter().rev() {
        let _ = nix::mount::umount2(t, MntFlags::MNT_DETACH);
        removed += 1;
    }
    if let Ok(entries) = fs::read_dir(work) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
                remove_work(&e.path());
                removed += 1;
            }
        }
    }
    removed
}

/// The bundle's `config.json` (OCI runtime spec 1.0): the step's process, the standard
/// mounts (`/proc`, a `/dev` tmpfs, read-only `/sys`, `/etc/hosts`, `/etc/resolv.conf`),
/// Docker's default capabilities, and a network namespace unless the step has the host's.
fn bundle_config(step: &Step, hosts: &Path, resolv: &Path) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": hosts,
               "options": ["rbind", "ro"]}),
        json!({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
               "options": ["rbind", "ro"]}),
    ];
    for m in &step.mounts {
        mounts.push(match m {
            ExtraMount::Bind {
                target,
                source,
                readonly,
            } => json!({"destination": target, "type": "bind", "source": source,
                        "options": ["rbind", if *readonly { "ro" } else { "rw" }]}),
            ExtraMount::Tmpfs { target, size } => {
                let mut options = vec!["nosuid".to_owned(), "nodev".to_owned()];
                if let Some(s) = size {
                    options.push(format!("size={s}"));
                }
                json!({"destination": target, "type": "tmpfs", "source": "tmpfs",
                       "options": options})
            }
        });
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if !step.network {
        namespaces.push(json!({"type": "network"}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": step.uid, "gid": step.gid},
            "args": step.args,
            "env": step.env,
            "cwd": step.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "buildkitsandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}
