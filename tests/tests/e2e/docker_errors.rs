//! The docker builder in Dockerfile terms, against the real kilnd and Docker engine: the
//! README's `extra-sources: [../shared:/shared]` builds as with the native builder, and
//! engine errors name the Dockerfile line and what to do (an image neither in the
//! workspace nor in kilnd's cache, a step's exit code and last output, no network), once.

use std::time::Duration;

use kiln_shared::protocol::{BuildOutcome, Snapshot};
use kiln_tests::api::settled;
use kiln_tests::workspace::{busybox_kiln_toml, write_package};
use kiln_tests::{Dir, Kilnd, KilndOptions, cmd, target_bin};

const TIMEOUT: Duration = Duration::from_secs(300);

fn last(s: &Snapshot, package: &str) -> Option<(BuildOutcome, String)> {
    let l = s
        .packages
        .get(package)?
        .targets
        .get("amd64")?
        .last
        .as_ref()?;
    Some((l.outcome, l.error.clone().unwrap_or_default()))
}

#[test]
fn docker_builds_take_absolute_extra_sources_and_say_engine_errors_in_dockerfile_terms() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    ws.write("shared/lib.txt", "shared\n");
    write_package(
        &ws,
        "extras",
        &["amd64"],
        "FROM kiln/busybox:latest\nCOPY shared/ /x/\nRUN test \"$(cat /x/lib.txt)\" = shared\n",
    );
    let yml = std::fs::read_to_string(ws.join("extras/build.yml")).unwrap();
    ws.write(
        "extras/build.yml",
        format!("{yml}extra-sources:\n  - ../shared:/shared\n"),
    );
    write_package(
        &ws,
        "nosuch",
        &["amd64"],
        "FROM kiln/nosuchimage:1.0\nRUN true\n",
    );
    write_package(
        &ws,
        "fails",
        &["amd64"],
        "FROM kiln/busybox:latest\nRUN echo one && echo two >&2 && exit 3\n",
    );
    write_package(
        &ws,
        "offline",
        &["amd64"],
        "FROM kiln/busybox:latest\nRUN wget -q -O- http://example.com/\n",
    );
    let kilnd = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().arg("--builder").arg("docker"),
    );
    let events = kilnd.events();
    let s = events.wait(TIMEOUT, "every build ended", |s| {
        settled(s)
            && ["kiln/extras", "kiln/nosuch", "kiln/fails", "kiln/offline"]
                .iter()
                .all(|p| last(s, p).is_some())
    });
    let (outcome, error) = last(&s, "kiln/extras").unwrap();
    assert_eq!(outcome, BuildOutcome::Ok, "{error}");

    let (outcome, error) = last(&s, "kiln/nosuch").unwrap();
    assert_eq!(outcome, BuildOutcome::Failed);
    let df = ws.join("nosuch/Dockerfile").canonicalize().unwrap();
    assert!(
        error.contains(&format!("{}:1:1: FROM kiln/nosuchimage:1.0:", df.display()))
            && error.contains("neither a workspace package nor in kilnd's cache"),
        "{error}"
    );

    let (_, error) = last(&s, "kiln/fails").unwrap();
    assert!(
        error.contains("fails/Dockerfile:2:1: RUN echo one")
            && error.contains("exited with code 3")
            && error.contains("| one")
            && error.contains("| two"),
        "{error}"
    );

    let (_, error) = last(&s, "kiln/offline").unwrap();
    assert!(
        error.contains("offline/Dockerfile:2:1: RUN wget")
            && error.contains("build.yml has no `network: true`"),
        "{error}"
    );

    // The engine's error is in the log once (the failed step's line); the outcome says
    // it in Dockerfile terms.
    let log = cmd(target_bin("kiln"))
        .arg("--socket")
        .arg(kilnd.socket())
        .args(["logs", "kiln/nosuch"])
        .output()
        .unwrap()
        .stdout_str();
    let step = "ERROR [internal] load metadata for docker.io/kiln/nosuchimage:1.0: ";
    let engine_said = log
        .lines()
        .find_map(|l| l.strip_prefix(step))
        .unwrap_or_else(|| panic!("no failed step line in the log:\n{log}"));
    assert_eq!(log.matches(engine_said).count(), 1, "{log}");
    assert_eq!(
        log.matches("FROM kiln/nosuchimage:1.0:").count(),
        1,
        "{log}"
    );
}
