//! kiln's command line as a user meets it: `kiln up` hands kilnd its options, gives each
//! kilnd its own log (plain text, no colour codes) and, when kilnd cannot start, shows
//! that start's lines; `--listen localhost:PORT` is served under that name; `kiln`
//! without a terminal points to `kiln status`; `kiln logs` picks the same arch every time
//! (the failed one), prints the failure once and exits 1 for a failed build.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_shared::protocol::{Snapshot, TargetStatus};
use kiln_tests::api::{Api, describe};
use kiln_tests::workspace::write_package;
use kiln_tests::{Cmd, Dir, Kilnd, KilndOptions, cmd, machine, target_bin, wait_until};

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// `kiln` with its own state and runtime directories (so its kilnd logs land in the
/// test's temp dir) and colour allowed (NO_COLOR empty is NO_COLOR unset).
fn kiln(home: &Dir, socket: &Path) -> Cmd {
    cmd(target_bin("kiln"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("NO_COLOR", "")
        .arg("--socket")
        .arg(socket)
}

/// Stops the kilnd on a socket when dropped, test passed or not.
struct StopOnDrop {
    home: PathBuf,
    socket: PathBuf,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = cmd(target_bin("kiln"))
            .env("XDG_STATE_HOME", self.home.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("stop")
            .output();
    }
}

fn kilnd_logs(home: &Dir) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(home.join("state/kiln"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("kilnd@"))
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs
}

#[test]
fn kiln_up_passes_kilnd_options_and_gives_each_kilnd_its_own_plain_log() {
    let _machine = machine::shared();
    let home = Dir::new("home");
    let ws = Dir::new("ws");
    write_package(&ws, "hello", &["amd64"], "FROM scratch\nCOPY hello.txt /\n");
    ws.write("hello/hello.txt", "hello\n");
    let socket = home.join("a.sock");
    let cache = home.join("my-cache");
    let _stop = StopOnDrop {
        home: home.path().to_owned(),
        socket: socket.clone(),
    };
    // No terminal: kiln up starts kilnd, says so and does not try to draw.
    let out = kiln(&home, &socket)
        .arg("up")
        .arg(ws.path())
        .args(["--listen", "localhost:0", "--builder", "native"])
        .arg("--cache")
        .arg(&cache)
        .stdout();
    assert!(out.contains("kilnd (pid "), "{out}");
    assert!(
        cache.join("oci-layout").is_file(),
        "--cache was not passed: {out}"
    );
    let api = Api::new(&socket);
    let s: Snapshot = api.state();
    assert!(!s.registry.is_empty());
    // localhost:0 listens on loopback, and the registry answers Host: localhost:PORT.
    for addr in &s.registry {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        let code = cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-g"])
            .arg(format!("http://localhost:{}/v2/", addr.port()))
            .arg("--connect-to")
            .arg(format!("localhost:{}:{addr}", addr.port()))
            .stdout();
        assert_eq!(code, "200", "GET /v2/ on {addr} as localhost");
    }
    wait_until(BUILD_TIMEOUT, "hello built", || {
        api.state().packages.get("kiln/hello").is_some_and(|p| {
            p.targets
                .get("amd64")
                .is_some_and(|t| t.status == TargetStatus::Ok)
        })
    });

    // A second workspace on another socket: a kilnd of its own, a log of its own.
    let ws2 = Dir::new("ws2");
    let socket2 = home.join("b.sock");
    let _stop2 = StopOnDrop {
        home: home.path().to_owned(),
        socket: socket2.clone(),
    };
    kiln(&home, &socket2)
        .arg("up")
        .arg(ws2.path())
        .args(["--listen", "127.0.0.1:0", "--no-dashboard"])
        .arg("--cache")
        .arg(home.join("cache2"))
        .run();
    let logs = kilnd_logs(&home);
    assert_eq!(logs.len(), 2, "{logs:?}");
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("kilnd ready"), "{}: {text}", log.display());
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in {}: {text:?}",
            log.display()
        );
    }

    // The dashboard without a terminal: a pointer to kiln status, not a raw-mode error.
    let out = kiln(&home, &socket).run_fails();
    let stderr = out.stderr_str();
    assert!(stderr.contains("kiln status"), "{stderr}");
    assert!(!stderr.contains("raw mode"), "{stderr}");

    // A start that fails shows its own lines, not those of the earlier kilnd whose log
    // it shares (same socket).
    kiln(&home, &socket2).arg("stop").run();
    let out = kiln(&home, &socket2)
        .arg("up")
        .arg(ws2.path())
        .args(["--listen", "no-such-host.invalid:5000", "--no-dashboard"])
        .run_fails();
    let stderr = out.stderr_str();
    assert!(
        stderr.contains("no-such-host.invalid") && stderr.contains("before it was ready"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("kilnd ready"),
        "the earlier start's lines are shown: {stderr}"
    );
}

#[test]
fn kiln_logs_shows_the_failed_arch_once_and_exits_1() {
    let ws = Dir::new("ws");
    // arm64 has no file to copy: its build fails, amd64's succeeds.
    write_package(
        &ws,
        "half",
        &["amd64", "arm64"],
        "FROM scratch\nARG TARGETARCH\nCOPY only-$TARGETARCH.txt /x\n",
    );
    ws.write("half/only-amd64.txt", "amd64\n");
    let kilnd = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().arg("--builder").arg("native"),
    );
    let events = kilnd.events();
    let s = events.wait(BUILD_TIMEOUT, "amd64 ok, arm64 failed", |s| {
        s.packages.get("kiln/half").is_some_and(|p| {
            p.targets["amd64"].status == TargetStatus::Ok
                && p.targets["arm64"].status == TargetStatus::Failed
        })
    });
    let error = s.packages["kiln/half"].targets["arm64"]
        .last
        .as_ref()
        .and_then(|l| l.error.clone())
        .unwrap_or_else(|| panic!("no error\n{}", describe(&s)));
    let logs = || {
        cmd(target_bin("kiln"))
            .arg("--socket")
            .arg(kilnd.socket())
            .args(["logs", "kiln/half"])
    };
    let first = logs().run_fails();
    assert_eq!(first.status.code(), Some(1));
    let text = first.stdout_str();
    assert_eq!(
        text.matches(error.as_str()).count(),
        1,
        "the error {error:?} is not said exactly once:\n{text}"
    );
    assert!(
        first.stderr_str().contains("failed"),
        "{}",
        first.stderr_str()
    );
    // The same arch every time, whatever finished last.
    for _ in 0..3 {
        assert_eq!(logs().run_fails().stdout_str(), text);
    }
    let ok = logs().args(["--arch", "amd64"]).run();
    assert!(
        !ok.stdout_str().contains(error.as_str()),
        "{}",
        ok.stdout_str()
    );
}
