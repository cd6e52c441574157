//! The docker-builder issue's acceptance, against the real kilnd, the Docker engine (arm64
//! under qemu), docker and skopeo: the examples workspace builds for both platforms and
//! every example image runs; a second kilnd on the same cache builds nothing; a change to the base rebuilds
//! its dependents and nothing else; a failed arch blocks neither the other arch nor other
//! packages and keeps its log; a `FROM` cycle is an error naming it.

use std::time::Duration;

use kiln_shared::protocol::{BuildOutcome, TargetStatus};
use kiln_tests::api::{describe, digests_of, package_ok, tag_of};
use kiln_tests::workspace::{
    busybox_kiln_toml, copy_examples, index_platforms, registry_digest, registry_manifest,
    write_package,
};
use kiln_tests::{Dir, Kilnd, KilndOptions, PulledImage, cmd, docker, git, target_bin, wait_until};

/// Long enough for a few docker builds (arm64 under qemu) on a loaded two-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

const EXAMPLES: [&str; 5] = [
    "kiln/app",
    "kiln/base",
    "kiln/extras",
    "kiln/hello",
    "kiln/hello-site",
];

/// `kiln --socket S ARGS...`.
fn kiln(kilnd: &Kilnd) -> kiln_tests::Cmd {
    cmd(target_bin("kiln")).arg("--socket").arg(kilnd.socket())
}

#[test]
fn examples_build_for_both_platforms_rebuild_nothing_again_and_a_base_change_rebuilds_dependents() {
    let tmp = Dir::new("examples");
    let ws = copy_examples(&tmp, "ws");
    // In git and committed, as in a clone: LinuxKit's revision label.
    git().args(["init", "-q"]).dir(&ws).run();
    git().args(["add", "-A"]).dir(&ws).run();
    git()
        .args(["commit", "-q", "-m", "examples"])
        .dir(&ws)
        .run();
    let commit = git().args(["rev-parse", "HEAD"]).dir(&ws).stdout();
    let cache = tmp.join("cache");
    let mut kilnd = Kilnd::start(&[&ws], KilndOptions::default().cache(&cache));
    let events = kilnd.events();
    let first = events.wait(BUILD_TIMEOUT, "every example to be built", |s| {
        EXAMPLES.iter().all(|p| package_ok(s, p)) && s.queue.is_empty() && s.running.is_empty()
    });
    assert_eq!(
        first
            .packages
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        EXAMPLES
    );
    // app has RUN steps: the docker builder built it.
    for arch in ["amd64", "arm64"] {
        let last = first.packages["kiln/app"].targets[arch]
            .last
            .as_ref()
            .unwrap_or_else(|| panic!("app {arch} was not built:\n{}", describe(&first)));
        assert_eq!(last.outcome, BuildOutcome::Ok);
    }
    let registry = kilnd.registry();
    let app_tag = tag_of(&first, "kiln/app");
    let app = format!("kiln/app:{app_tag}");

    // The registry serves an index of both platforms, and `dev` is the same image.
    let index = registry_manifest(&registry, &app);
    assert_eq!(
        index_platforms(&index),
        ["linux/amd64", "linux/arm64"],
        "{index}"
    );
    let app_digest = registry_digest(&registry, &app);
    assert_eq!(registry_digest(&registry, "kiln/app:dev"), app_digest);

    // Pulled per platform, it runs that platform's binaries (arm64 under qemu), on the
    // base of the workspace.
    for (platform, uname) in [("linux/arm64", "aarch64"), ("linux/amd64", "x86_64")] {
        let image = PulledImage::pull(&format!("{registry}/{app}"), platform);
        assert_eq!(image.run(&["uname", "-m"]), uname, "{platform}");
        // Built by a RUN for that platform, on the workspace's base.
        assert_eq!(image.run(&["cat", "/srv/arch"]), uname, "{platform}");
        assert!(
            image
                .run(&["cat", "/etc/kiln/base.conf"])
                .contains("hello from kiln/base"),
            "{platform}"
        );
        assert_eq!(
            image.inspect("{{index .Config.Labels \"org.opencontainers.image.revision\"}}"),
            commit,
            "{platform}"
        );
    }

    // Every example image runs with `docker run` as it is (its own CMD), on both arches:
    // base, extras and hello print, hello-site serves its pages with busybox's httpd. The
    // busybox they start from is pinned in their kiln.lock.
    for arch in ["amd64", "arm64"] {
        let platform = format!("linux/{arch}");
        let pull = |p: &str| {
            PulledImage::pull(&format!("{registry}/{p}:{}", tag_of(&first, p)), &platform)
        };
        assert!(
            pull("kiln/base").run(&[]).contains("hello from kiln/base"),
            "{arch}"
        );
        assert!(
            pull("kiln/extras").run(&[]).contains("Shared by packages"),
            "{arch}"
        );
        assert_eq!(
            pull("kiln/hello").run(&[]),
            format!("hello from Welcome to hello on {arch}, built by kiln."),
        );
        let site = pull("kiln/hello-site");
        let id = docker()
            .args(["run", "-d", "--pull", "never", "--network", "none"])
            .args(["--platform", &platform, site.reference()])
            .stdout();
        let mut page = String::new();
        wait_until(
            BUILD_TIMEOUT,
            format!("hello-site's httpd ({arch})"),
            || {
                docker()
                    .args(["exec", &id, "wget", "-qO-", "http://127.0.0.1:8080/"])
                    .try_run()
                    .is_ok_and(|o| {
                        page = o.stdout_str();
                        o.status.success()
                    })
            },
        );
        docker().args(["rm", "-f", &id]).run();
        assert!(page.contains("<h1>hello from kiln</h1>"), "{arch}: {page}");
    }
    for p in ["base", "hello"] {
        assert!(
            std::fs::read_to_string(ws.join(p).join("kiln.lock"))
                .is_ok_and(|l| l.contains("\"busybox:1.35.0\" = \"sha256:")),
            "{p}/kiln.lock"
        );
    }

    // A second kilnd on the same cache, nothing changed: everything is served from the
    // cache, no build is queued, the digests are the same.
    let (status, _) = kilnd.stop();
    assert!(status.success(), "{status}");
    drop(events);
    drop(kilnd);
    let kilnd = Kilnd::start(&[&ws], KilndOptions::default().cache(&cache));
    let events = kilnd.events();
    let again = events.wait(BUILD_TIMEOUT, "every example to be served", |s| {
        EXAMPLES.iter().all(|p| package_ok(s, p))
    });
    for p in EXAMPLES {
        assert_eq!(tag_of(&again, p), tag_of(&first, p), "{p}");
        assert_eq!(digests_of(&again, p), digests_of(&first, p), "{p}");
        for (arch, t) in &again.packages[p].targets {
            assert_eq!(
                t.last,
                None,
                "{p} {arch} was built again:\n{}",
                describe(&again)
            );
        }
    }
    assert_eq!(events.queued_since(0), [], "{}", describe(&again));
    let started: Vec<_> = events
        .since(0)
        .into_iter()
        .filter(|e| matches!(e, kiln_shared::protocol::Event::Started { .. }))
        .collect();
    assert_eq!(started, [], "{}", describe(&again));
    assert!(again.queue.is_empty() && again.running.is_empty());
    let registry = kilnd.registry();
    assert_eq!(registry_digest(&registry, &app), app_digest);

    // A change to the base: base and what follows it (app, extras) are rebuilt, for both
    // arches; hello and hello-site are not touched.
    let mark = events.mark();
    tmp.write(
        "ws/base/etc/kiln/base.conf",
        "# changed by the e2e test\ngreeting = \"hello from the changed base\"\n",
    );
    let changed = events.wait(BUILD_TIMEOUT, "base, app and extras to be rebuilt", |s| {
        ["kiln/base", "kiln/app", "kiln/extras"]
            .iter()
            .all(|p| package_ok(s, p) && tag_of(s, p) != tag_of(&first, p))
            && s.queue.is_empty()
            && s.running.is_empty()
    });
    let mut expected = Vec::new();
    for p in ["kiln/app", "kiln/base", "kiln/extras"] {
        for a in ["amd64", "arm64"] {
            expected.push((p.to_owned(), a.to_owned()));
        }
    }
    assert_eq!(events.queued_targets_since(mark), expected);
    for p in ["kiln/hello", "kiln/hello-site"] {
        assert_eq!(tag_of(&changed, p), tag_of(&first, p), "{p}");
        assert_eq!(digests_of(&changed, p), digests_of(&first, p), "{p}");
    }
    // The rebuilt app stands on the changed base.
    let new_app = format!("{registry}/kiln/app:{}", tag_of(&changed, "kiln/app"));
    let image = PulledImage::pull(&new_app, "linux/amd64");
    assert!(
        image
            .run(&["cat", "/etc/kiln/base.conf"])
            .contains("hello from the changed base")
    );
    assert_eq!(
        events.resyncs(),
        0,
        "the event recorder lagged: counts may miss events"
    );
}

#[test]
fn auto_builds_with_docker_what_the_native_builder_refuses_only_while_building() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    // Nothing in the Dockerfile tells that the archive is xz-compressed: auto picks the
    // native builder, which finds out when it reads the file.
    write_package(
        &ws,
        "unpack",
        &["amd64"],
        "FROM kiln/busybox:latest\nADD a.tar.xz /srv/\n",
    );
    ws.write("src/hello.txt", "unpacked by the engine\n");
    cmd("tar")
        .arg("-cJf")
        .arg(ws.join("unpack/a.tar.xz"))
        .arg("-C")
        .arg(ws.join("src"))
        .arg("hello.txt")
        .run();
    ws.remove("src");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let s = events.wait_settled(BUILD_TIMEOUT);
    assert!(package_ok(&s, "kiln/unpack"), "{}", describe(&s));
    let log = kiln(&kilnd)
        .args(["logs", "kiln/unpack", "--arch", "amd64"])
        .stdout();
    assert!(
        log.contains("xz-compressed") && log.contains("building with the docker builder instead"),
        "{log}"
    );
    let registry = kilnd.registry();
    let tag = tag_of(&s, "kiln/unpack");
    let image = PulledImage::pull(&format!("{registry}/kiln/unpack:{tag}"), "linux/amd64");
    assert_eq!(
        image.run(&["cat", "/srv/hello.txt"]),
        "unpacked by the engine"
    );
}

#[test]
fn a_failed_arch_blocks_neither_the_other_arch_nor_other_packages_and_keeps_its_log() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    // The temp dir's name in the RUN: the engine's build cache cannot answer it, the
    // step runs (and logs) in this test.
    let nonce = ws.name();
    write_package(
        &ws,
        "picky",
        &["amd64", "arm64"],
        &format!(
            "FROM kiln/busybox:latest\n\
             RUN echo \"checking $(uname -m) for {nonce}\" && [ \"$(uname -m)\" != aarch64 ] && uname -m > /arch\n"
        ),
    );
    write_package(
        &ws,
        "other",
        &["amd64", "arm64"],
        "FROM kiln/busybox:latest\nCOPY note /note\n",
    );
    ws.write("other/note", "independent\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let s = events.wait_settled(BUILD_TIMEOUT);
    assert!(package_ok(&s, "kiln/other"), "{}", describe(&s));
    let picky = &s.packages["kiln/picky"];
    let amd64 = &picky.targets["amd64"];
    let arm64 = &picky.targets["arm64"];
    assert_eq!(amd64.status, TargetStatus::Ok, "{}", describe(&s));
    assert!(amd64.digest.is_some());
    assert_eq!(arm64.status, TargetStatus::Failed, "{}", describe(&s));
    let failed = arm64.last.as_ref().expect("a failed build has a summary");
    assert_eq!(failed.outcome, BuildOutcome::Failed);
    let error = failed.error.clone().unwrap_or_default();
    assert!(!error.is_empty(), "the failure says nothing");

    // The amd64 image is served and runs.
    let registry = kilnd.registry();
    let tag = picky.tag.as_ref().unwrap().to_string();
    let image = PulledImage::pull(&format!("{registry}/kiln/picky:{tag}-amd64"), "linux/amd64");
    assert_eq!(image.run(&["cat", "/arch"]), "x86_64");

    // The failure's log: the RUN's own output, and the failure.
    // A failed build's log: kiln logs fails as the build did.
    let log = kiln(&kilnd)
        .args(["logs", "kiln/picky", "--arch", "arm64"])
        .run_fails()
        .stdout_str();
    assert!(
        log.contains(&format!("checking aarch64 for {nonce}")),
        "{log}"
    );
    assert!(
        log.contains("error") || log.contains("exit code"),
        "the log does not say how the build ended:\n{log}"
    );
    let ok_log = kiln(&kilnd)
        .args(["logs", "kiln/picky", "--arch", "amd64"])
        .stdout();
    assert!(
        ok_log.contains(&format!("checking x86_64 for {nonce}")),
        "{ok_log}"
    );
}

#[test]
fn a_from_cycle_is_an_error_naming_it_and_other_packages_still_build() {
    let ws = Dir::new("ws");
    write_package(&ws, "a", &["amd64"], "FROM kiln/b\nCOPY f /a\n");
    write_package(&ws, "b", &["amd64"], "FROM kiln/a\nCOPY f /b\n");
    write_package(&ws, "c", &["amd64", "arm64"], "FROM scratch\nCOPY f /c\n");
    for p in ["a", "b", "c"] {
        ws.write(format!("{p}/f"), p);
    }
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let s = events.wait(BUILD_TIMEOUT, "c built, a and b in error", |s| {
        package_ok(s, "kiln/c")
            && ["kiln/a", "kiln/b"]
                .iter()
                .all(|p| s.packages.get(*p).is_some_and(|p| p.error.is_some()))
    });
    for p in ["kiln/a", "kiln/b"] {
        let error = s.packages[p].error.as_deref().unwrap_or_default();
        assert!(error.contains("cycle"), "{p}: {error}");
        assert!(
            error.contains("kiln/a") && error.contains("kiln/b"),
            "{p}: the error does not name the cycle: {error}"
        );
    }
    // Nothing was queued for the packages of the cycle.
    let queued = events.queued_targets_since(0);
    assert!(
        queued.iter().all(|(p, _)| p == "kiln/c"),
        "{queued:?}\n{}",
        describe(&s)
    );
    let status = kiln(&kilnd).args(["status"]).stdout();
    assert!(
        status.contains("cycle"),
        "kiln status does not show it:\n{status}"
    );
}
