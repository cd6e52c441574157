//! `kiln`'s commands against the real kilnd: errors from kilnd reach the user,
//! `kiln build` waits for the outcome, a followed log arrives whole and in order,
//! `kiln up` reuses the kilnd of its workspace and refuses another's; and the commands
//! that need no kilnd (`build --cache`, `fsck`, `gc`), which run kilnd's one-off commands
//! under kiln's name, with kiln's flags, output and exit codes.

use std::time::Duration;

use kiln_tests::workspace::{busybox_kiln_toml, write_package};
use kiln_tests::{Dir, Kilnd, KilndOptions, cmd, target_bin};

const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

fn kiln(kilnd: &Kilnd) -> kiln_tests::Cmd {
    cmd(target_bin("kiln")).arg("--socket").arg(kilnd.socket())
}

#[test]
fn build_waits_for_the_outcome_and_kilnd_errors_reach_the_user() {
    let ws = Dir::new("ws");
    write_package(&ws, "ok", &["amd64"], "FROM scratch\nCOPY a.txt /a.txt\n");
    ws.write("ok/a.txt", "a\n");
    write_package(
        &ws,
        "broken",
        &["amd64"],
        "FROM scratch\nCOPY missing.txt /\n",
    );
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    kiln(&kilnd)
        .args(["build", "kiln/ok", "--force"])
        .timeout(BUILD_TIMEOUT)
        .run();
    let failed = kiln(&kilnd)
        .args(["build", "kiln/broken"])
        .timeout(BUILD_TIMEOUT)
        .run_fails();
    assert_eq!(failed.status.code(), Some(1), "{failed}");
    // A build's log fails as the build did, followed or not.
    for follow in [&[][..], &["--follow"][..]] {
        kiln(&kilnd)
            .args(["logs", "kiln/ok", "--arch", "amd64"])
            .args(follow)
            .run();
        let out = kiln(&kilnd)
            .args(["logs", "kiln/broken", "--arch", "amd64"])
            .args(follow)
            .run_fails();
        assert_eq!(out.status.code(), Some(1), "{out}");
    }
    let unknown = kiln(&kilnd).args(["build", "x/y"]).run_fails();
    assert_eq!(unknown.status.code(), Some(1), "{unknown}");
    assert!(
        unknown
            .stderr_str()
            .contains("kilnd answered 404 Not Found: no package \"x/y\""),
        "{unknown}"
    );
    let status = kiln(&kilnd).args(["status"]).stdout();
    assert!(status.contains("kiln/ok"), "{status}");
}

/// A build printing 10,000 lines: a follower gets every line, in order, and ends with
/// the build.
#[test]
fn a_followed_log_of_ten_thousand_lines_arrives_whole() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    write_package(
        &ws,
        "flood",
        &["amd64"],
        "FROM kiln/busybox:latest\nRUN seq 1 10000\n",
    );
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    kilnd.events().wait_built(BUILD_TIMEOUT, "kiln/flood");
    let log = kiln(&kilnd)
        .args(["logs", "kiln/flood", "--arch", "amd64", "--follow"])
        .stdout();
    let numbers: Vec<u32> = log
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .filter(|n| *n >= 1)
        .collect();
    let start = numbers
        .iter()
        .position(|n| *n == 1)
        .unwrap_or_else(|| panic!("no line 1 in the log:\n{log}"));
    assert_eq!(
        numbers[start..start + 10_000],
        (1..=10_000).collect::<Vec<u32>>(),
        "the RUN's lines, in order"
    );
}

#[test]
fn up_reuses_the_kilnd_of_its_workspace_and_refuses_another_workspaces() {
    let tmp = Dir::new("up");
    let ws = tmp.mkdir("ws");
    let other = tmp.mkdir("other");
    let kilnd = Kilnd::start(&[&ws], KilndOptions::default());
    // A non-canonical spelling of the same directory matches.
    let out = kiln(&kilnd)
        .args(["up", "--no-dashboard"])
        .arg(tmp.join("ws/../ws"))
        .stdout();
    assert!(out.contains("kilnd already runs for"), "{out}");
    let refused = kiln(&kilnd)
        .args(["up", "--no-dashboard"])
        .arg(&other)
        .run_fails();
    let msg = refused.stderr_str();
    assert!(msg.contains("already runs"), "{refused}");
    assert!(
        msg.contains(&format!("pid {}", kilnd.pid())) && msg.contains("--socket"),
        "{refused}"
    );
}

#[test]
fn without_kilnd_build_fsck_and_gc_work_on_a_cache_directory() {
    let tmp = Dir::new("standalone");
    write_package(
        &tmp,
        "ws/hello",
        &["amd64"],
        "FROM scratch\nCOPY hi.txt /\n",
    );
    tmp.write("ws/hello/hi.txt", "hi\n");
    let cache = tmp.join("cache");
    let kiln = || cmd(target_bin("kiln")).env("KILN_SOCKET", tmp.join("none.sock"));
    kiln()
        .args(["build", "--cache"])
        .arg(&cache)
        .arg(tmp.join("ws/hello"))
        .timeout(BUILD_TIMEOUT)
        .run();
    let tag = kiln().arg("show-tag").arg(tmp.join("ws/hello")).stdout();
    assert!(tag.starts_with("kiln/hello:"), "{tag}");
    let index = std::fs::read_to_string(cache.join("index.json")).unwrap();
    assert!(index.contains(&format!("docker.io/{tag}")), "{index}");
    let fsck = kiln().args(["fsck", "--cache"]).arg(&cache).stdout();
    assert!(!fsck.is_empty(), "fsck printed no report");
    kiln()
        .args(["gc", "--dry-run", "--cache"])
        .arg(&cache)
        .run();
    // A directory that is not a cache: kiln's message and exit code.
    let not = kiln()
        .args(["fsck", "--cache"])
        .arg(tmp.join("ws"))
        .run_fails();
    assert_eq!(not.status.code(), Some(1), "{not}");
    assert!(
        not.stderr_str().starts_with(&format!(
            "kiln: {} is not a kiln cache",
            tmp.join("ws").display()
        )),
        "{not}"
    );
    // A bad size is a usage error, reported under kiln's name.
    let bad = kiln()
        .args(["gc", "--max-size", "lots", "--cache"])
        .arg(&cache)
        .run_fails();
    assert!(bad.stderr_str().starts_with("kiln: --max-size"), "{bad}");
}

#[test]
fn without_kilnd_installed_the_standalone_commands_say_what_to_do() {
    let tmp = Dir::new("alone");
    let alone = tmp.join("kiln");
    std::fs::copy(target_bin("kiln"), &alone).unwrap();
    let out = cmd(&alone)
        .env("PATH", tmp.path())
        .args(["fsck", "--cache"])
        .arg(tmp.path())
        .run_fails();
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr_str()
            .contains("this command needs kilnd: install it next to kiln or on PATH"),
        "{out}"
    );
}
