//! Shutting kilnd down while a real client pushes to its registry: the push in flight
//! finishes (every blob, then the manifest), kilnd exits cleanly, and what was pushed is
//! in the cache when kilnd starts again.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_tests::{Dir, Kilnd, KilndOptions, docker, skopeo, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The layer's size: incompressible, so that `docker push` (which gzips it as it sends)
/// is still uploading when kilnd is told to stop.
const LAYER_BYTES: u64 = 256 << 20;

/// An image built for this test; `docker rmi`'d when dropped.
struct BuiltImage(String);

impl Drop for BuiltImage {
    fn drop(&mut self) {
        let _ = docker().args(["rmi", "--force", &self.0]).output();
    }
}

#[test]
fn a_shutdown_during_a_push_lets_the_push_finish() {
    let ws = Dir::new("ws");
    let state = Dir::new("state");
    let cache = state.join("cache");
    let mut kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().cache(&cache));

    let ctx = Dir::new("ctx");
    let mut random = Vec::new();
    std::fs::File::open("/dev/urandom")
        .and_then(|f| f.take(LAYER_BYTES).read_to_end(&mut random))
        .unwrap_or_else(|e| panic!("reading /dev/urandom: {e}"));
    ctx.write("big", random);
    ctx.write("Dockerfile", "FROM scratch\nCOPY big /big\n");
    let repo = format!("kiln-e2e/shutdown-{}", std::process::id());
    let image = BuiltImage(format!("{}/{repo}:t", kilnd.registry()));
    docker()
        .args(["build", "--quiet", "-t", &image.0])
        .arg(ctx.path())
        .timeout(Duration::from_secs(300))
        .run();

    let mut push = Command::new("docker")
        .args(["push", &image.0])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("docker push: {e}"));
    // The layer's upload has begun once its temp file in the cache holds data.
    let tmp = cache.join(".kiln").join("tmp");
    wait_for(
        Duration::from_secs(120),
        "the layer upload to begin",
        || {
            let started = std::fs::read_dir(&tmp)
                .ok()?
                .filter_map(|e| e.ok()?.metadata().ok())
                .any(|m| m.len() > 0);
            started.then_some(())
        },
    );
    kill(Pid::from_raw(kilnd.pid() as i32), Signal::SIGTERM)
        .unwrap_or_else(|e| panic!("SIGTERM to kilnd: {e}"));
    assert!(
        matches!(push.try_wait(), Ok(None)),
        "the push ended before kilnd was told to stop: the test proves nothing"
    );

    let out = push
        .wait_with_output()
        .unwrap_or_else(|e| panic!("docker push: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "docker push failed across kilnd's shutdown:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in docker push's output:\n{stdout}"))
        .to_owned();
    let (status, killed) = kilnd.stop();
    assert!(
        status.success() && !killed,
        "kilnd exited with {status} (killed: {killed})"
    );
    drop(kilnd);

    // Started again on the same cache, kilnd serves the whole image it acknowledged.
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().cache(&cache));
    let served = skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/{repo}@{pushed}", kilnd.registry()))
        .stdout();
    assert!(served.contains("\"layers\""), "{served}");
    let layers = skopeo()
        .args([
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{len .Layers}}",
        ])
        .arg(format!("docker://{}/{repo}:t", kilnd.registry()))
        .stdout();
    assert_eq!(layers.trim(), "1");
}
