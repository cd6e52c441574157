//! Package errors where the user looks, against the real kilnd and kiln: a package that
//! cannot be built keeps its row under its `org/image` with its error (file:line:column
//! and what to do) in the state, `kiln status` and its JSON; every action on it says why
//! it cannot build; a dependent names its broken base; the rows follow the files (the
//! error clears when the file is fixed, a row goes when its package does); a target's
//! state is what the cache holds (a revert during a build is served, the build history).

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_shared::protocol::{BuildOutcome, Snapshot, TargetStatus};
use kiln_tests::api::{package_ok, settled, tag_of};
use kiln_tests::workspace::{busybox_kiln_toml, write_package};
use kiln_tests::{Dir, Kilnd, KilndOptions, cmd, target_bin, wait_until};

const TIMEOUT: Duration = Duration::from_secs(300);

/// `kiln --socket S ARGS...`.
fn kiln(kilnd: &Kilnd) -> kiln_tests::Cmd {
    cmd(target_bin("kiln")).arg("--socket").arg(kilnd.socket())
}

fn error_of(s: &Snapshot, package: &str) -> String {
    s.packages
        .get(package)
        .and_then(|p| p.error.clone())
        .unwrap_or_default()
}

fn rows(s: &Snapshot) -> BTreeSet<String> {
    s.packages.keys().cloned().collect()
}

#[test]
fn a_dockerfile_that_does_not_parse_keeps_its_row_and_its_dependent_names_the_broken_base() {
    let ws = Dir::new("ws");
    write_package(
        &ws,
        "hello",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY f /f\n",
    );
    ws.write("hello/f", "hello\n");
    write_package(&ws, "app", &["amd64"], "FROM kiln/hello\nCOPY a /a\n");
    ws.write("app/a", "app\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    events.wait(TIMEOUT, "both built", |s| {
        settled(s) && package_ok(s, "kiln/hello") && package_ok(s, "kiln/app")
    });

    ws.write("hello/Dockerfile", "FROM scratch\nCOPYY f /f\n");
    let s = events.wait(TIMEOUT, "hello and app in error", |s| {
        !error_of(s, "kiln/hello").is_empty() && !error_of(s, "kiln/app").is_empty()
    });
    let hello = error_of(&s, "kiln/hello");
    assert!(
        hello.contains("hello/Dockerfile:2:1: unknown instruction COPYY: did you mean COPY?"),
        "{hello}"
    );
    let app = error_of(&s, "kiln/app");
    assert!(
        app.contains("base package kiln/hello is broken") && app.contains("Dockerfile:2:1"),
        "the dependent does not name its broken base and where: {app}"
    );
    assert!(!app.contains("not in the cache"), "{app}");
    assert_eq!(
        rows(&s),
        BTreeSet::from(["kiln/app".to_owned(), "kiln/hello".to_owned()])
    );
    let p = &s.packages["kiln/hello"];
    assert_eq!(p.targets.keys().collect::<Vec<_>>(), ["amd64", "arm64"]);

    // kiln status and its JSON show it under its name.
    let status = kiln(&kilnd).args(["status"]).stdout();
    let line = status
        .lines()
        .find(|l| l.starts_with("kiln/hello"))
        .unwrap_or_else(|| panic!("no kiln/hello row:\n{status}"));
    assert!(line.contains("unknown instruction COPYY"), "{status}");
    let json: Snapshot =
        serde_json::from_str(&kiln(&kilnd).args(["status", "--json"]).stdout()).unwrap();
    assert_eq!(error_of(&json, "kiln/hello"), hello);

    // Asking to build it says why it cannot, on the API and in the CLI.
    let a = kilnd
        .api()
        .post("/build", &serde_json::json!({"package": "kiln/hello"}));
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(
        a.body.contains("kiln/hello cannot be built") && a.body.contains("COPYY"),
        "{}",
        a.body
    );
    let out = kiln(&kilnd).args(["build", "kiln/app"]).run_fails();
    let err = out.stderr_str();
    assert!(
        err.contains("kiln/app cannot be built") && err.contains("kiln/hello is broken"),
        "{err}"
    );

    // Fixed: the errors clear and both are served again.
    ws.write("hello/Dockerfile", "FROM scratch\nCOPY f /f\n");
    let s = events.wait(TIMEOUT, "both served again", |s| {
        settled(s) && package_ok(s, "kiln/hello") && package_ok(s, "kiln/app")
    });
    assert_eq!(error_of(&s, "kiln/hello"), "");
    assert_eq!(error_of(&s, "kiln/app"), "");
}

#[test]
fn a_broken_build_yml_keeps_the_last_known_name_and_rows_follow_the_files() {
    let ws = Dir::new("ws");
    write_package(
        &ws,
        "hello",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY f /f\n",
    );
    ws.write("hello/f", "hello\n");
    let good = std::fs::read_to_string(ws.join("hello/build.yml")).unwrap();
    // Broken from the start, never built: named by what its build.yml still says.
    ws.write("fresh/build.yml", "org: kiln\nimage: fresh\nnope: 1\n");
    ws.write("fresh/Dockerfile", "FROM scratch\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let s = events.wait(TIMEOUT, "hello built, fresh in error", |s| {
        settled(s) && package_ok(s, "kiln/hello") && !error_of(s, "kiln/fresh").is_empty()
    });
    assert!(error_of(&s, "kiln/fresh").contains("fresh/build.yml:3:1: unknown field `nope`"));
    let out = kiln(&kilnd).args(["logs", "kiln/fresh"]).run_fails();
    assert!(
        out.stderr_str().contains("kiln/fresh cannot be built")
            && out.stderr_str().contains("nope"),
        "{}",
        out.stderr_str()
    );

    // A typo in the arches: the row stays kiln/hello (not the directory), with the error.
    ws.write(
        "hello/build.yml",
        "org: kiln\nimage: hello\narches: [amd64, arm46]\n",
    );
    let s = events.wait(TIMEOUT, "hello in error", |s| {
        !error_of(s, "kiln/hello").is_empty()
    });
    assert!(
        error_of(&s, "kiln/hello").contains("hello/build.yml:3"),
        "{}",
        error_of(&s, "kiln/hello")
    );
    assert_eq!(
        rows(&s),
        BTreeSet::from(["kiln/fresh".to_owned(), "kiln/hello".to_owned()])
    );
    let a = kilnd.api().post(
        "/build",
        &serde_json::json!({"package": "kiln/hello", "arch": "amd64"}),
    );
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(a.body.contains("arm46"), "{}", a.body);
    let out = kiln(&kilnd).args(["build", "kiln/hello"]).run_fails();
    assert!(
        out.stderr_str().contains("kiln/hello cannot be built"),
        "{}",
        out.stderr_str()
    );

    // Restored: the error clears, and no row is left of the broken config.
    ws.write("hello/build.yml", &good);
    let s = events.wait(TIMEOUT, "hello served again", |s| {
        settled(s) && package_ok(s, "kiln/hello") && error_of(s, "kiln/hello").is_empty()
    });
    assert_eq!(
        rows(&s),
        BTreeSet::from(["kiln/fresh".to_owned(), "kiln/hello".to_owned()])
    );

    // A rename: the old row goes, without a restart; a removed package's row goes.
    ws.write(
        "hello/build.yml",
        good.replace("image: hello", "image: hello2"),
    );
    std::fs::remove_dir_all(ws.join("fresh")).unwrap();
    let s = events.wait(TIMEOUT, "only kiln/hello2 left", |s| {
        rows(s) == BTreeSet::from(["kiln/hello2".to_owned()])
    });
    assert!(package_ok(&s, "kiln/hello2") || s.packages["kiln/hello2"].error.is_none());
}

/// A revert while the newer content builds: the reverted tag is in the cache, so the
/// target is served (ok, up to date) at once and the newer build stops; its cancellation
/// is history (`last`), not the target's state.
#[test]
fn a_revert_during_a_build_is_served_from_the_cache_and_the_build_is_history() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    // v1 builds at once; v2's RUN takes a minute (the build's content, not a test wait).
    write_package(
        &ws,
        "slow",
        &["amd64"],
        "FROM kiln/busybox:latest\nCOPY f /f\nRUN if [ \"$(cat /f)\" = v2 ]; then sleep 60; fi\n",
    );
    ws.write("slow/f", "v1\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let v1 = events.wait(TIMEOUT, "v1 built", |s| {
        settled(s) && package_ok(s, "kiln/slow")
    });
    let v1_tag = tag_of(&v1, "kiln/slow");
    let target = |s: &Snapshot| s.packages["kiln/slow"].targets["amd64"].clone();

    ws.write("slow/f", "v2\n");
    let v2 = events.wait(TIMEOUT, "v2 building", |s| {
        let t = target(s);
        t.status == TargetStatus::Building && t.tag.as_ref().map(|t| t.as_str()) != Some(&v1_tag)
    });
    let v2_build = target(&v2).build.unwrap();
    // Its RUN runs (on v2's file) before the revert.
    wait_until(TIMEOUT, "v2's RUN step to start", || {
        let out = kiln(&kilnd).args(["logs", "kiln/slow"]).output().unwrap();
        out.stdout_str().contains("RUN if [")
    });
    ws.write("slow/f", "v1\n");
    let s = events.wait(TIMEOUT, "v1 served again and v2's build stopped", |s| {
        s.running.is_empty()
            && target(s).last.as_ref().is_some_and(|l| l.id == v2_build)
            && target(s).tag.as_ref().map(|t| t.as_str()) == Some(&v1_tag)
    });
    let t = target(&s);
    assert_eq!(t.status, TargetStatus::Ok, "{t:?}");
    assert_eq!(
        t.last.as_ref().map(|l| l.outcome),
        Some(BuildOutcome::Cancelled)
    );
    assert_eq!(t.tag.as_ref().map(|t| t.as_str()), Some(v1_tag.as_str()));
    assert!(t.digest.is_some() && t.build.is_none(), "{t:?}");
    let why = t
        .last
        .as_ref()
        .and_then(|l| l.error.clone())
        .unwrap_or_default();
    assert!(why.contains("served from the cache"), "{why}");
    // kiln status says so, with no duration of the cancelled build.
    let status = kiln(&kilnd).args(["status"]).stdout();
    let line = status
        .lines()
        .find(|l| l.starts_with("kiln/slow"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("amd64:ok (cached)"), "{status}");
}
