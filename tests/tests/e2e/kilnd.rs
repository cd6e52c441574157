//! kilnd's lifetime as a user meets it: it starts on a workspace, says when it is ready
//! (ready file and ready line), listens where it says, stops cleanly on SIGTERM, and
//! refuses a bad command line with a message that says what is wrong.

use std::net::TcpStream;
use std::time::Duration;

use kiln_tests::kilnd::KilndError;
use kiln_tests::workspace::write_package;
use kiln_tests::{Dir, Kilnd, KilndOptions, cmd, skopeo, target_bin, wait_until};

#[test]
fn starts_reports_ready_and_stops_on_sigterm() {
    let ws = Dir::new("ws");
    let mut kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    assert!(kilnd.is_running());
    // The cache exists, as an OCI image layout, before kilnd says it is ready.
    assert!(
        kilnd.cache().join("oci-layout").is_file(),
        "{}",
        kilnd.cache().display()
    );
    let stdout = kilnd.stdout();
    assert!(stdout.contains("kilnd ready:"), "{stdout}");
    // Every registry address it reports is on loopback (by default) and accepts a connection.
    for addr in kilnd.registry_addrs() {
        assert!(addr.ip().is_loopback(), "{addr}");
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    }
    let (status, killed) = kilnd.stop();
    assert!(status.success(), "kilnd exited with {status} on SIGTERM");
    assert!(!killed, "kilnd needed SIGKILL");
}

#[test]
fn kiln_stop_stops_it_and_then_has_nothing_to_stop() {
    let ws = Dir::new("ws");
    let mut kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let socket = kilnd.socket().to_owned();
    let stop = || {
        cmd(target_bin("kiln"))
            .arg("--socket")
            .arg(&socket)
            .arg("stop")
            .stdout()
    };
    let out = stop();
    assert_eq!(out, format!("kilnd (pid {}) stopped", kilnd.pid()));
    assert!(!kilnd.is_running(), "kilnd still runs after kiln stop");
    let (status, killed) = kilnd.stop();
    assert!(status.success() && !killed, "kilnd exited with {status}");
    let out = stop();
    assert!(out.contains("nothing to stop"), "{out}");
}

#[test]
fn a_root_that_is_not_a_directory_is_refused() {
    let ws = Dir::new("ws");
    let file = ws.write("not-a-dir", "");
    match Kilnd::try_start(&[&file], KilndOptions::default()) {
        Err(KilndError::Exited { status, stderr }) => {
            assert!(!status.success());
            assert!(stderr.contains(&file.display().to_string()), "{stderr}");
            assert!(stderr.contains("not a directory"), "{stderr}");
        }
        Err(e) => panic!("expected kilnd to exit: {e}"),
        Ok(k) => panic!("kilnd started on a file root: {:?}", k.ready()),
    }
}

/// Other tools (LinuxKit, skopeo) read the cache's `index.json`. A landing goes into
/// kiln's refs journal first; kilnd folds it into `index.json` about a second after its
/// last landing, and when it stops, so other tools see what it built.
#[test]
fn what_kilnd_builds_reaches_index_json_for_other_tools() {
    let ws = Dir::new("ws");
    let image = write_package(&ws, "hello", &["amd64"], "FROM scratch\nCOPY hi.txt /\n");
    ws.write("hello/hi.txt", "hi\n");
    let mut kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    kilnd.events().wait_built(Duration::from_secs(120), &image);
    let tag = cmd(target_bin("kiln"))
        .arg("show-tag")
        .arg(ws.join("hello"))
        .stdout();
    let name = format!("docker.io/{tag}-amd64");
    let cache = kilnd.cache().to_owned();
    wait_until(
        Duration::from_secs(20),
        format!("index.json to name {name}"),
        || std::fs::read_to_string(cache.join("index.json")).is_ok_and(|s| s.contains(&name)),
    );
    let raw = skopeo()
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:{name}", cache.display()))
        .stdout();
    assert!(raw.contains("\"layers\""), "{raw}");
    let (status, killed) = kilnd.stop();
    assert!(status.success() && !killed, "kilnd exited with {status}");
    let journal = std::fs::metadata(cache.join(".kiln/refs.journal")).map_or(0, |m| m.len());
    assert_eq!(
        journal, 0,
        "kilnd stopped with reference changes not in index.json"
    );
}
