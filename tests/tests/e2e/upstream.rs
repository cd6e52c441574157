//! Upstream registries (issue 14), with Debian's `docker-registry` as the upstream on a
//! free loopback port: a team cache that kilnd A pushes to and kilnd B fetches from
//! with no builds and the same digests; a change on B builds only what changed and
//! pushes it; a dirty tag is never pushed; wrong credentials (TLS + htpasswd) and an
//! unreachable upstream leave local builds working with a clear message; the native
//! builder builds `FROM` an image only the upstream has; `docker pull` through kilnd
//! fetches from the upstream once, then from the cache; a failed push is retried on a
//! timer, and one still owed when kilnd stops is pushed by the next kilnd on the cache;
//! a base image whose registry cannot be reached fails the build naming it; a team cache
//! is fetched lazily (each package's index only) and each manifest and blob is read from
//! the upstream once, when a client (docker, skopeo), a build or `kiln pull` first needs
//! it, with a clear error once the upstream is gone.

use std::time::Duration;

use kiln_shared::protocol::{BuiltBy, Snapshot};
use kiln_tests::api::{describe, digests_of, package_ok, settled, tag_of};
use kiln_tests::registry::{REGISTRY_PASSWORD, REGISTRY_USER};
use kiln_tests::workspace::{registry_digest, write_package};
use kiln_tests::{
    BUSYBOX, Dir, Kilnd, KilndOptions, Registry, busybox_layout, cmd, docker, skopeo, target_bin,
};

const TIMEOUT: Duration = Duration::from_secs(180);

/// Two native packages for two arches, the second built on the first, committed. Their
/// content is unique to `tmp` (a nonce), so no image of another test (in the shared
/// engine: its layers would make a `docker pull` skip blobs) is the same.
fn team_workspace(tmp: &Dir) -> Dir {
    let ws = Dir::new(&format!("{}-ws", tmp.name()));
    write_package(
        &ws,
        "one",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY one.txt /one.txt\n",
    );
    ws.write("one/one.txt", format!("one {}\n", tmp.name()));
    write_package(
        &ws,
        "two",
        &["amd64", "arm64"],
        "FROM kiln/one\nCOPY two.txt /two.txt\n",
    );
    ws.write("two/two.txt", "two\n");
    ws.git_init();
    ws.git_commit_all("two packages");
    ws
}

fn both_ok(s: &Snapshot) -> bool {
    settled(s) && package_ok(s, "kiln/one") && package_ok(s, "kiln/two")
}

/// Every target's last result was fetched (`pulled_from`), none built.
fn pulled(s: &Snapshot, package: &str) -> bool {
    s.packages[package].targets.values().all(|t| {
        t.last
            .as_ref()
            .is_some_and(|l| l.pulled_from.is_some() && l.digest == t.digest)
    })
}

fn pushed(s: &Snapshot, package: &str, tag: &str) -> bool {
    s.pushes
        .get(package)
        .is_some_and(|p| p.tag.as_str() == tag && p.error.is_none())
}

fn upstream_tags(up: &Registry, repo: &str) -> Vec<String> {
    let out = skopeo()
        .args(["list-tags", "--tls-verify=false"])
        .arg(format!("docker://{}/{repo}", up.addr()))
        .stdout();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut tags: Vec<String> = v["Tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags
}

/// The options of a kilnd of the team: `up` as upstream, pushing.
fn team_opts(up: &Registry) -> KilndOptions {
    KilndOptions::default()
        .arg("--upstream")
        .arg(up.addr())
        .arg("--push")
}

/// kilnd A builds both packages of `ws` and pushes them to `up` (tag-<arch> and tag, as
/// LinuxKit does), then stops; returns its last state.
fn a_builds_and_pushes(up: &Registry, ws: &Dir) -> Snapshot {
    let a = Kilnd::start(&[ws.path()], team_opts(up));
    let a_events = a.events();
    let built = a_events.wait(TIMEOUT, "A to build both packages", both_ok);
    let (one, two) = (tag_of(&built, "kiln/one"), tag_of(&built, "kiln/two"));
    assert!(!pulled(&built, "kiln/one"), "A had nothing to fetch");
    let a_state = a_events.wait(TIMEOUT, "A to push both", |s| {
        pushed(s, "kiln/one", &one) && pushed(s, "kiln/two", &two)
    });
    assert_eq!(
        upstream_tags(up, "kiln/two"),
        [two.clone(), format!("{two}-amd64"), format!("{two}-arm64")]
    );
    assert_eq!(
        registry_digest(up.addr(), &format!("kiln/two:{two}")),
        registry_digest(&a.registry(), &format!("kiln/two:{two}"))
    );
    a_state
}

#[test]
fn a_team_cache_pushed_by_one_kilnd_serves_another_with_no_builds() {
    let up = Registry::start();
    let tmp = Dir::new("team");
    let ws = team_workspace(&tmp);
    let opts = || team_opts(&up);
    let a_state = a_builds_and_pushes(&up, &ws);
    let two = tag_of(&a_state, "kiln/two");
    let a_digests = (
        digests_of(&a_state, "kiln/one"),
        digests_of(&a_state, "kiln/two"),
    );

    // B, with an empty cache: every target is fetched, none built, same digests.
    let b = Kilnd::start(&[ws.path()], opts());
    let b_events = b.events();
    let s = b_events.wait(TIMEOUT, "B to serve both packages", both_ok);
    assert!(
        pulled(&s, "kiln/one") && pulled(&s, "kiln/two"),
        "B built something:\n{}",
        describe(&s)
    );
    assert_eq!(
        (digests_of(&s, "kiln/one"), digests_of(&s, "kiln/two")),
        a_digests
    );
    let summary = s.packages["kiln/two"].targets["amd64"]
        .last
        .clone()
        .unwrap();
    assert_eq!(summary.pulled_from.as_deref(), Some(up.addr()));
    assert!(
        s.upstreams
            .iter()
            .any(|u| u.name == up.addr() && u.state == "up")
    );

    // A committed change on B: only `two` is built, and pushed.
    ws.write("two/two.txt", "two, changed\n");
    ws.git_commit_all("change two");
    // The save and the commit are two changes: B may build the save's dirty tag first.
    let s = b_events.wait(TIMEOUT, "B to build the committed change", |s| {
        let tag = tag_of(s, "kiln/two");
        both_ok(s) && tag != two && !tag.contains("-dirty")
    });
    let two_b = tag_of(&s, "kiln/two");
    assert!(pulled(&s, "kiln/one"), "one was rebuilt:\n{}", describe(&s));
    assert!(
        !pulled(&s, "kiln/two"),
        "two was not built:\n{}",
        describe(&s)
    );
    b_events.wait(TIMEOUT, "B to push the change", |s| {
        pushed(s, "kiln/two", &two_b)
    });
    assert!(upstream_tags(&up, "kiln/two").contains(&two_b));

    // An uncommitted change: a dirty tag, built here and never pushed.
    ws.write("two/two.txt", "two, dirty\n");
    let s = b_events.wait(TIMEOUT, "B to build the dirty tag", |s| {
        both_ok(s) && tag_of(s, "kiln/two").contains("-dirty")
    });
    let dirty = tag_of(&s, "kiln/two");
    assert!(!pulled(&s, "kiln/two"));
    // A later push event would name it; the upstream never has it.
    assert!(
        !upstream_tags(&up, "kiln/two")
            .iter()
            .any(|t| t.contains("-dirty")),
        "{dirty} reached the upstream"
    );
    assert_ne!(
        b_events.snapshot().pushes["kiln/two"].tag.as_str(),
        dirty.as_str()
    );
}

#[test]
fn wrong_credentials_and_an_unreachable_upstream_leave_local_builds_working() {
    let up = Registry::start_secure();
    let tmp = Dir::new("creds");
    let ws = Dir::new(&format!("{}-ws", tmp.name()));
    write_package(&ws, "solo", &["amd64"], "FROM scratch\nCOPY a /a\n");
    ws.write("solo/a", "a\n");
    ws.write(
        "kiln.toml",
        format!(
            "[[upstream]]\nregistry = \"{}\"\ninsecure = false\nca-file = \"{}\"\npush = true\n",
            up.addr(),
            up.ca().unwrap().display()
        ),
    );
    // The right password: built here (the upstream is empty), then pushed over TLS.
    let good = up.docker_config(&tmp.join("good"), REGISTRY_USER, REGISTRY_PASSWORD);
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().env("DOCKER_CONFIG", &good),
    );
    let ev = k.events();
    let s = ev.wait(TIMEOUT, "solo to build", |s| both_ok_one(s, "kiln/solo"));
    let tag = tag_of(&s, "kiln/solo");
    ev.wait(TIMEOUT, "solo to be pushed", |s| {
        pushed(s, "kiln/solo", &tag)
    });
    drop(ev);
    drop(k);

    // A wrong password: the local build still works; the log and the push say why.
    ws.write("solo/a", "a, again\n");
    let bad = up.docker_config(&tmp.join("bad"), REGISTRY_USER, "not-the-password");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().env("DOCKER_CONFIG", &bad),
    );
    let ev = k.events();
    let s = ev.wait(TIMEOUT, "solo to build", |s| both_ok_one(s, "kiln/solo"));
    let tag = tag_of(&s, "kiln/solo");
    let s = ev.wait(TIMEOUT, "the push to fail", |s| {
        s.pushes
            .get("kiln/solo")
            .is_some_and(|p| p.tag.as_str() == tag && p.error.is_some())
    });
    let error = s.pushes["kiln/solo"].error.clone().unwrap();
    assert!(
        error.contains(up.addr()) && error.contains("credentials"),
        "{error}"
    );
    assert!(!error.contains("not-the-password"), "{error}");
    assert!(!k.stderr().contains("not-the-password"));
    drop(ev);
    drop(k);

    // Nothing listens there: one short try, marked down, built here.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let ws2 = Dir::new(&format!("{}-ws2", tmp.name()));
    write_package(
        &ws2,
        "solo",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY a /a\n",
    );
    ws2.write("solo/a", "b\n");
    let k = Kilnd::start(
        &[ws2.path()],
        KilndOptions::default().arg("--upstream").arg(&addr),
    );
    let s = k
        .events()
        .wait(TIMEOUT, "solo to build", |s| both_ok_one(s, "kiln/solo"));
    let u = s.upstreams.iter().find(|u| u.name == addr).unwrap();
    assert_eq!(u.state, "down", "{:?}", s.upstreams);
    assert!(u.error.as_ref().unwrap().contains("refused"), "{u:?}");
}

fn both_ok_one(s: &Snapshot, package: &str) -> bool {
    settled(s) && package_ok(s, package)
}

/// Puts the busybox base into the upstream only, as `kiln/busybox:latest`.
fn busybox_upstream() -> Registry {
    let up = Registry::start();
    skopeo()
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{BUSYBOX}", busybox_layout().display()))
        .arg(format!("docker://{}/kiln/busybox:latest", up.addr()))
        .run();
    up
}

#[test]
fn the_native_builder_builds_from_an_image_only_the_upstream_has() {
    let up = busybox_upstream();
    let ws = Dir::new("from-upstream");
    write_package(
        &ws,
        "onbusy",
        &["amd64", "arm64"],
        "FROM kiln/busybox:latest\nCOPY hi /hi\n",
    );
    ws.write("onbusy/hi", "hi\n");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default()
            .arg("--upstream")
            .arg(up.addr())
            .arg("--builder")
            .arg("native"),
    );
    let s = k.events().wait(TIMEOUT, "onbusy to build", |s| {
        both_ok_one(s, "kiln/onbusy")
    });
    assert!(!pulled(&s, "kiln/onbusy"), "it was built, not fetched");
    // The base is in kilnd's registry now too, with the upstream's digest.
    assert_eq!(
        registry_digest(&k.registry(), "kiln/busybox:latest"),
        registry_digest(up.addr(), "kiln/busybox:latest")
    );
}

#[test]
fn docker_pulls_through_kilnd_once_then_from_its_cache() {
    let up = busybox_upstream();
    let ws = Dir::new("pull-through");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().arg("--upstream").arg(up.addr()),
    );
    let image = format!("{}/kiln/busybox:latest", k.registry());
    let blobs_before = up.requests("GET", "/blobs/");
    docker().args(["pull", "-q", &image]).run();
    let blobs_first = up.requests("GET", "/blobs/");
    assert!(
        blobs_first > blobs_before,
        "nothing was read from the upstream"
    );
    docker().args(["rmi", &image]).run();
    let all_before = up.requests("GET", "/") + up.requests("HEAD", "/");
    docker().args(["pull", "-q", &image]).run();
    assert_eq!(
        up.requests("GET", "/") + up.requests("HEAD", "/"),
        all_before,
        "the second pull asked the upstream"
    );
    docker().args(["rmi", &image]).run();
    // Pushes to kilnd keep working beside the pull-through.
    skopeo()
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{BUSYBOX}", busybox_layout().display()))
        .arg(format!("docker://{}/mine/busybox:1", k.registry()))
        .run();
    assert_eq!(
        registry_digest(&k.registry(), "mine/busybox:1"),
        registry_digest(up.addr(), "kiln/busybox:latest")
    );
}

#[test]
fn kiln_pull_and_kiln_push_go_through_kilnd() {
    let up = busybox_upstream();
    let ws = Dir::new("pull-push");
    write_package(&ws, "solo", &["amd64"], "FROM scratch\nCOPY a /a\n");
    ws.write("solo/a", "a\n");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default()
            .arg("--upstream")
            .arg(up.addr())
            .arg("--push"),
    );
    k.events()
        .wait(TIMEOUT, "solo to build", |s| both_ok_one(s, "kiln/solo"));
    let kiln = || cmd(target_bin("kiln")).arg("--socket").arg(k.socket());

    let out = kiln().args(["push", "kiln/solo"]).stdout();
    assert!(out.contains(&format!("pushed to {}", up.addr())), "{out}");
    let out = kiln().args(["pull", "kiln/solo"]).stdout();
    assert!(out.contains("already in the cache"), "{out}");
    // Any image: fetched whole into kilnd's cache, then served by its registry.
    let out = kiln().args(["pull", "kiln/busybox:latest"]).stdout();
    assert!(out.contains(&format!("from {}", up.addr())), "{out}");
    assert_eq!(
        registry_digest(&k.registry(), "kiln/busybox:latest"),
        registry_digest(up.addr(), "kiln/busybox:latest")
    );
    let failed = kiln().args(["pull", "kiln/absent:1"]).run_fails();
    // Docker Hub (asked last for docker.io names) is out of reach here: said so.
    let said = failed.stderr_str();
    assert!(
        said.contains("kiln/absent:1")
            && (said.contains("not in any upstream") || said.contains("cannot be reached")),
        "{said}"
    );
}

/// A loopback address nothing listens on (yet).
fn closed_addr() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"));
    let addr = closed
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    drop(closed);
    addr.to_string()
}

#[test]
fn a_failed_push_is_retried_on_a_timer_until_the_upstream_takes_it() {
    let addr = closed_addr();
    let ws = Dir::new("push-retry");
    write_package(&ws, "solo", &["amd64"], "FROM scratch\nCOPY a /a\n");
    ws.write("solo/a", "a\n");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default()
            .arg("--upstream")
            .arg(&addr)
            .arg("--push"),
    );
    let ev = k.events();
    // (The push starts once the arch lands, before the build counts as finished.)
    let s = ev.wait(TIMEOUT, "the build to end and the push to fail", |s| {
        settled(s) && s.pushes.get("kiln/solo").is_some_and(|p| p.error.is_some())
    });
    let tag = tag_of(&s, "kiln/solo");
    assert!(
        package_ok(&s, "kiln/solo"),
        "the build must not fail: {}",
        describe(&s)
    );
    let push = &s.pushes["kiln/solo"];
    assert!(push.next_try_at_ms.is_some(), "{push:?}");
    let status = cmd(target_bin("kiln"))
        .arg("--socket")
        .arg(k.socket())
        .arg("status")
        .stdout();
    assert!(
        status.contains(&format!("push of kiln/solo:{tag} to {addr} failed"))
            && status.contains("next try in"),
        "{status}"
    );
    // The upstream comes up; nothing else happens: the timer pushes.
    let up = Registry::start_at(&addr);
    ev.wait(TIMEOUT, "the retried push", |s| {
        pushed(s, "kiln/solo", &tag)
    });
    assert_eq!(
        upstream_tags(&up, "kiln/solo"),
        vec![tag.clone(), format!("{tag}-amd64")]
    );
}

#[test]
fn a_push_still_owed_at_shutdown_is_pushed_by_the_next_kilnd() {
    let addr = closed_addr();
    let ws = Dir::new("push-owed");
    write_package(&ws, "solo", &["amd64"], "FROM scratch\nCOPY a /a\n");
    ws.write("solo/a", "a\n");
    let state = Dir::new("push-owed-state");
    let cache = state.join("cache");
    let options = || {
        KilndOptions::default()
            .cache(&cache)
            .arg("--upstream")
            .arg(&addr)
            .arg("--push")
    };
    let mut k = Kilnd::start(&[ws.path()], options());
    let s = k
        .events()
        .wait(TIMEOUT, "the build to end and the push to fail", |s| {
            settled(s) && s.pushes.get("kiln/solo").is_some_and(|p| p.error.is_some())
        });
    let tag = tag_of(&s, "kiln/solo");
    let (status, killed) = k.stop();
    assert!(status.success() && !killed, "kilnd exited with {status}");
    drop(k);
    // The upstream comes up while no kilnd runs; the next one pushes what is owed.
    let up = Registry::start_at(&addr);
    let k = Kilnd::start(&[ws.path()], options());
    k.events()
        .wait(TIMEOUT, "the owed push", |s| pushed(s, "kiln/solo", &tag));
    assert_eq!(
        upstream_tags(&up, "kiln/solo"),
        vec![tag.clone(), format!("{tag}-amd64")]
    );
}

#[test]
fn a_base_image_whose_registry_cannot_be_reached_fails_the_build_naming_it() {
    let addr = closed_addr();
    let ws = Dir::new("base-unreachable");
    write_package(
        &ws,
        "solo",
        &["amd64"],
        &format!("FROM {addr}/library/thing:1\nCOPY a /a\n"),
    );
    ws.write("solo/a", "a\n");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().arg("--builder").arg("native"),
    );
    let s = k.events().wait(TIMEOUT, "solo to fail", |s| {
        settled(s)
            && s.packages.get("kiln/solo").is_some_and(|p| {
                p.targets
                    .values()
                    .all(|t| t.status == kiln_shared::protocol::TargetStatus::Failed)
            })
    });
    let error = s.packages["kiln/solo"].targets["amd64"]
        .last
        .as_ref()
        .and_then(|l| l.error.clone())
        .unwrap();
    for said in [
        format!("{addr}/library/thing:1"),
        format!("upstream {addr} cannot be reached"),
        "[[upstream]]".to_owned(),
    ] {
        assert!(error.contains(&said), "{said:?} missing from: {error}");
    }
    assert!(!error.contains("pull it first"), "{error}");
    // The log ends with it too (and `kiln logs` of a failed build exits 1).
    let log = cmd(target_bin("kiln"))
        .arg("--socket")
        .arg(k.socket())
        .args(["logs", "kiln/solo"])
        .run_fails()
        .stdout_str();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("upstream {addr} cannot be reached")),
        "{log}"
    );
}

#[test]
fn a_base_image_is_pinned_in_kiln_lock_re_resolved_on_request_and_rebuilt_offline() {
    let up = busybox_upstream();
    let d1 = registry_digest(up.addr(), "kiln/busybox:latest");
    let ws = Dir::new("pinned");
    write_package(
        &ws,
        "onbusy",
        &["amd64"],
        "FROM kiln/busybox:latest\nCOPY hi /hi\n",
    );
    ws.write("onbusy/hi", "hi\n");
    let k = Kilnd::start(
        &[ws.path()],
        KilndOptions::default()
            .arg("--upstream")
            .arg(up.addr())
            .arg("--builder")
            .arg("native"),
    );
    let ev = k.events();
    let lock_names = |d: &str| format!("\"kiln/busybox:latest\" = \"{d}\"");
    // Resolved once, recorded: the lock names the upstream's digest, and the tag covers
    // the lock (kilnd and `kiln show-tag` agree).
    let s = ev.wait(TIMEOUT, "onbusy to build on its pinned base", |s| {
        both_ok_one(s, "kiln/onbusy") && ws.join("onbusy/kiln.lock").exists()
    });
    let lock1 = ws.read("onbusy/kiln.lock");
    assert!(lock1.contains(&lock_names(&d1)), "{lock1}");
    let tag1 = tag_of(&s, "kiln/onbusy");
    let show = cmd(target_bin("kiln"))
        .arg("show-tag")
        .arg(ws.join("onbusy"))
        .stdout();
    assert!(
        show.trim().ends_with(&format!(":{tag1}")),
        "{show} vs {tag1}"
    );
    let built1 = digests_of(&s, "kiln/onbusy");

    // The upstream's tag moves on; removing the entry resolves it again: a new digest in
    // the lock, so a new tag for the package.
    skopeo()
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{}/kiln/onbusy:{tag1}", k.registry()))
        .arg(format!("docker://{}/kiln/busybox:latest", up.addr()))
        .run();
    let d2 = registry_digest(up.addr(), "kiln/busybox:latest");
    assert_ne!(d1, d2);
    ws.remove("onbusy/kiln.lock");
    let s = ev.wait(TIMEOUT, "onbusy to build on the re-resolved base", |s| {
        both_ok_one(s, "kiln/onbusy")
            && std::fs::read_to_string(ws.join("onbusy/kiln.lock"))
                .is_ok_and(|l| l.contains(&lock_names(&d2)))
            && tag_of(s, "kiln/onbusy") != tag1
    });
    let tag2 = tag_of(&s, "kiln/onbusy");
    assert_ne!(digests_of(&s, "kiln/onbusy"), built1);

    // Offline, the old lock back: the old tag, and a forced rebuild takes the pinned
    // digest from the cache (the upstream's tag names another image now, and is gone).
    drop(up);
    ws.write("onbusy/kiln.lock", &lock1);
    let s = ev.wait(TIMEOUT, "onbusy back at its first tag", |s| {
        both_ok_one(s, "kiln/onbusy") && tag_of(s, "kiln/onbusy") == tag1
    });
    let before = s.packages["kiln/onbusy"].targets["amd64"]
        .last
        .as_ref()
        .map(|l| l.id.clone());
    cmd(target_bin("kiln"))
        .arg("--socket")
        .arg(k.socket())
        .args(["build", "kiln/onbusy", "--force"])
        .run();
    let s = ev.wait(TIMEOUT, "the forced rebuild", |s| {
        both_ok_one(s, "kiln/onbusy")
            && s.packages["kiln/onbusy"].targets["amd64"]
                .last
                .as_ref()
                .is_some_and(|l| Some(&l.id) != before.as_ref() && l.builder.is_some())
    });
    assert_eq!(
        digests_of(&s, "kiln/onbusy"),
        built1,
        "not rebuilt from {d1}"
    );
    assert_ne!(tag1, tag2);
}

/// A raw `GET` of a blob from kilnd's registry: (status line, body).
fn get_blob(registry: &str, repo: &str, digest: &str) -> (String, String) {
    use std::io::{Read, Write};
    let request = format!(
        "GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {registry}\r\nConnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    std::net::TcpStream::connect(registry)
        .and_then(|mut s| {
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut out)
        })
        .unwrap_or_else(|e| panic!("GET of {digest} from {registry}: {e}"));
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The config and layer digests of a manifest kilnd's registry serves.
fn blobs_of(registry: &str, reference: &str) -> Vec<String> {
    let raw = skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{registry}/{reference}"))
        .stdout();
    let m: serde_json::Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{reference}: {e}: {raw}"));
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().into_iter().flatten())
        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_team_cache_is_fetched_lazily_and_each_blob_is_read_upstream_once_on_first_use() {
    let up = Registry::start();
    let tmp = Dir::new("lazy");
    let ws = team_workspace(&tmp);
    let two = tag_of(&a_builds_and_pushes(&up, &ws), "kiln/two");

    // B fetches the workspace with no build and not one blob request: each package's
    // index only; its per-arch manifests, configs and layers stay upstream.
    let blobs_before = up.requests("GET", "/blobs/");
    let by_digest_before = up.requests("GET", "/manifests/sha256:");
    let b = Kilnd::start(&[ws.path()], team_opts(&up));
    let b_events = b.events();
    let s = b_events.wait(TIMEOUT, "B to serve both packages", both_ok);
    assert!(
        pulled(&s, "kiln/one") && pulled(&s, "kiln/two"),
        "B built something:\n{}",
        describe(&s)
    );
    assert_eq!(
        up.requests("GET", "/blobs/"),
        blobs_before,
        "B read blobs before anything asked for them"
    );
    assert_eq!(
        up.requests("GET", "/manifests/sha256:"),
        by_digest_before,
        "B read per-arch manifests before anything asked for them"
    );
    let kiln = || cmd(target_bin("kiln")).arg("--socket").arg(b.socket());
    // `kiln status` shows the blobs on demand apart.
    b_events.wait(TIMEOUT, "B's figures to count the blobs on demand", |s| {
        s.cache.on_demand_blobs > 0
    });
    let status = kiln().arg("status").stdout();
    assert!(status.contains("on demand"), "{status}");
    let fsck = cmd(target_bin("kiln"))
        .args(["fsck", "--cache"])
        .arg(b.cache())
        .stdout();
    assert!(
        fsck.contains(&format!("on demand from {}", up.addr())) && fsck.contains("consistent"),
        "{fsck}"
    );

    // docker pull of one platform of the index reads exactly that platform's manifest
    // (asked of B by digest) and blobs from the upstream, once.
    let index = format!("{}/kiln/two:{two}", b.registry());
    docker()
        .args(["pull", "-q", "--platform", "linux/amd64", &index])
        .run();
    let amd64 = format!("kiln/two:{two}-amd64");
    let wanted = blobs_of(&b.registry(), &amd64);
    let by_digest = up.requests("GET", "/manifests/sha256:");
    assert_eq!(by_digest, by_digest_before + 1, "{}", up.log());
    assert_eq!(
        up.requests("GET", "/blobs/") - blobs_before,
        wanted.len(),
        "expected exactly {wanted:?} from the upstream:\n{}",
        up.log()
    );
    docker().args(["rmi", &index]).run();
    let after_first = up.requests("GET", "/blobs/");
    // Again, and by the arch's own tag: nothing more from the upstream.
    let image = format!("{}/{amd64}", b.registry());
    for name in [&index, &image] {
        docker().args(["pull", "-q", name]).run();
        docker().args(["rmi", name]).run();
    }
    assert_eq!(
        up.requests("GET", "/blobs/"),
        after_first,
        "a second pull read the upstream"
    );
    assert_eq!(up.requests("GET", "/manifests/sha256:"), by_digest);
    // skopeo (another client) reads the same target from B without the upstream.
    let layout = tmp.path().join("copy");
    skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:x", layout.display()))
        .run();
    assert_eq!(up.requests("GET", "/blobs/"), after_first);

    // The native builder builds on a package fetched lazily (an uncommitted package:
    // a dirty tag, never looked up nor pushed): the base's blobs come first.
    let blobs_before = up.requests("GET", "/blobs/");
    write_package(
        &ws,
        "three",
        &["amd64"],
        "FROM kiln/one\nCOPY three.txt /three.txt\n",
    );
    ws.write("three/three.txt", "three\n");
    let s = b_events.wait(TIMEOUT, "B to build three on one", |s| {
        settled(s) && package_ok(s, "kiln/three")
    });
    let last = s.packages["kiln/three"].targets["amd64"].last.clone();
    assert_eq!(
        last.and_then(|l| l.builder),
        Some(BuiltBy::Native),
        "{}",
        describe(&s)
    );
    assert!(up.requests("GET", "/blobs/") > blobs_before);

    // `kiln pull` wants the bytes here: nothing of kiln/one is left on demand.
    let out = kiln().args(["pull", "kiln/one"]).stdout();
    assert!(out.contains("on demand"), "{out}");
    let out = kiln().args(["pull", "kiln/one"]).stdout();
    assert!(!out.contains("on demand"), "{out}");

    // The upstream gone: a blob still on demand fails with the OCI error JSON saying
    // what and what to do; local builds still work.
    let arm64_config = blobs_of(&b.registry(), &format!("kiln/two:{two}-arm64")).remove(0);
    drop(up);
    let (status, body) = get_blob(&b.registry(), "kiln/two", &arm64_config);
    assert!(status.contains("503"), "{status}\n{body}");
    assert!(
        body.contains("UNAVAILABLE")
            && body.contains(&arm64_config)
            && body.contains("kiln pull kiln/two"),
        "{body}"
    );
    let failed = kiln().args(["pull", "kiln/two"]).run_fails();
    let out = format!("{}{}", failed.stdout_str(), failed.stderr_str());
    assert!(
        out.contains("on demand from") && out.contains(&arm64_config),
        "{out}"
    );
    write_package(
        &ws,
        "four",
        &["amd64"],
        "FROM kiln/one\nCOPY four.txt /four.txt\n",
    );
    ws.write("four/four.txt", "four\n");
    b_events.wait(TIMEOUT, "B to build a new package offline", |s| {
        settled(s) && package_ok(s, "kiln/four")
    });
}
