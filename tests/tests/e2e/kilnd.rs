//! kilnd's lifetime as a user meets it: it starts on a workspace, says when it is ready
//! (ready file and ready line), listens where it says, stops cleanly on SIGTERM, and
//! refuses a bad command line with a message that says what is wrong.

use std::net::TcpStream;

use kiln_tests::kilnd::KilndError;
use kiln_tests::{Dir, Kilnd, KilndOptions, cmd, target_bin};

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
