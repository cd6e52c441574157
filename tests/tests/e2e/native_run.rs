//! RUN steps in kiln's native builder (runc on overlay snapshots, arm64 under qemu),
//! against the real kilnd with no Docker engine reachable from it: the examples' `app`
//! builds for both arches and runs in the engine as pulled; a save of a file only a late
//! COPY reads re-runs no RUN, a save of a file a RUN reads re-runs it; a cancelled RUN
//! leaves no mount, container or directory, and neither does a killed kilnd once the next
//! one starts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_shared::protocol::BuiltBy;
use kiln_tests::api::{describe, package_ok, tag_of};
use kiln_tests::workspace::{busybox_kiln_toml, copy_examples, write_package};
use kiln_tests::{Dir, Kilnd, KilndOptions, PulledImage, cmd, target_bin};

const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// kilnd's environment: no Docker engine at all.
const NO_ENGINE: &str = "unix:///nonexistent";

fn kiln(kilnd: &Kilnd) -> kiln_tests::Cmd {
    cmd(target_bin("kiln")).arg("--socket").arg(kilnd.socket())
}

fn options(cache: &Path) -> KilndOptions {
    KilndOptions::default()
        .cache(cache)
        .env("DOCKER_HOST", NO_ENGINE)
}

fn log_of(kilnd: &Kilnd, package: &str, arch: &str) -> String {
    kiln(kilnd).args(["logs", package, "--arch", arch]).stdout()
}

/// What a RUN step leaves while it runs, or after: overlay mounts under the cache,
/// `kiln-*` directories, runc containers.
fn leftovers(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let cache = cache.canonicalize().unwrap_or_else(|_| cache.to_owned());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("/proc/self/mountinfo: {e}"));
    for line in mountinfo.lines() {
        if line.contains(&*cache.to_string_lossy()) {
            out.push(format!("mount: {line}"));
        }
    }
    let run = cache.join(".kiln/run");
    if let Ok(entries) = std::fs::read_dir(&run) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("kiln-") {
                out.push(format!("directory: {}", e.path().display()));
            }
        }
    }
    let runc_root = run.join(".runc");
    if runc_root.exists() {
        let list = cmd("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .stdout();
        out.extend(list.lines().map(|l| format!("container: {l}")));
    }
    out
}

/// Polls (with a deadline) until `cond` holds.
fn poll(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_examples_app_builds_natively_without_an_engine_for_both_arches() {
    let tmp = Dir::new("native-app");
    let ws = copy_examples(&tmp, "ws");
    let cache = tmp.join("cache");
    let kilnd = Kilnd::start(&[&ws], options(&cache));
    let events = kilnd.events();
    let s = events.wait(BUILD_TIMEOUT, "kiln/base and kiln/app to be built", |s| {
        package_ok(s, "kiln/base") && package_ok(s, "kiln/app")
    });
    // `kiln status` says which builder built each target.
    let status = kiln(&kilnd).arg("status").stdout();
    let app_line = status
        .lines()
        .find(|l| l.starts_with("kiln/app "))
        .unwrap_or_else(|| panic!("no kiln/app in:\n{status}"));
    assert!(
        app_line.contains(", native)") && !app_line.contains(", docker)"),
        "{status}"
    );
    for arch in ["amd64", "arm64"] {
        let log = log_of(&kilnd, "kiln/app", arch);
        assert!(
            log.contains("with the native builder (auto: the native builder does all of it, RUN steps in runc)"),
            "{log}"
        );
        assert!(log.contains("ran in"), "the RUN did not run:\n{log}");
    }
    let registry = kilnd.registry();
    let app = format!("{registry}/kiln/app:{}", tag_of(&s, "kiln/app"));
    for (platform, uname) in [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64")] {
        let image = PulledImage::pull(&app, platform);
        assert_eq!(
            image.run(&[]).lines().next(),
            Some(&*format!("hello from {uname}"))
        );
        assert_eq!(image.run(&["cat", "/srv/arch"]), uname, "{platform}");
    }
    assert_eq!(leftovers(&cache), Vec::<String>::new());
}

#[test]
fn saves_rerun_only_the_run_steps_whose_inputs_changed() {
    let ws = Dir::new("native-steps");
    ws.write("kiln.toml", busybox_kiln_toml());
    let pkg = write_package(
        &ws,
        "steps",
        &["amd64", "arm64"],
        "FROM kiln/busybox:latest\n\
         COPY early /early\n\
         RUN cat /early > /from-early && rm /bin/ls\n\
         COPY late /late\n\
         CMD [\"cat\", \"/from-early\", \"/late\"]\n",
    );
    ws.write("steps/early", "early 1\n");
    ws.write("steps/late", "late 1\n");
    let cache = ws.join(".cache");
    let kilnd = Kilnd::start(&[ws.path()], options(&cache));
    let events = kilnd.events();
    let first = events.wait(BUILD_TIMEOUT, "the first build", |s| package_ok(s, &pkg));

    // Only the late COPY's file: the RUN is answered by the step cache on both arches.
    ws.write("steps/late", "late 2\n");
    let second = events.wait(BUILD_TIMEOUT, "the build after the late save", |s| {
        package_ok(s, &pkg) && tag_of(s, &pkg) != tag_of(&first, &pkg)
    });
    for arch in ["amd64", "arm64"] {
        let log = log_of(&kilnd, &pkg, arch);
        assert!(log.contains("CACHED RUN cat /early"), "{log}");
        assert!(!log.contains("ran in"), "{log}");
        // The build's summary counts the cached step and names the builder.
        let last = second.packages[&pkg].targets[arch]
            .last
            .as_ref()
            .unwrap_or_else(|| panic!("no last build:\n{}", describe(&second)));
        assert_eq!(last.cache_hits, 1, "{}", describe(&second));
        assert_eq!(last.builder, Some(BuiltBy::Native));
    }
    // The file the RUN reads: it runs again.
    ws.write("steps/early", "early 2\n");
    let third = events.wait(BUILD_TIMEOUT, "the build after the early save", |s| {
        package_ok(s, &pkg) && tag_of(s, &pkg) != tag_of(&second, &pkg)
    });
    for arch in ["amd64", "arm64"] {
        let log = log_of(&kilnd, &pkg, arch);
        assert!(!log.contains("CACHED RUN"), "{log}");
        assert!(log.contains("ran in"), "{log}");
    }
    // The whiteout of the deleted base file holds in the engine after a pull.
    let image = PulledImage::pull(
        &format!("{}/{pkg}:{}", kilnd.registry(), tag_of(&third, &pkg)),
        "linux/arm64",
    );
    assert_eq!(image.run(&[]), "early 2\nlate 2");
    let ls = kiln_tests::cmd::docker()
        .args(["run", "--rm", "--pull", "never", "--network", "none"])
        .args(["--platform", "linux/arm64", image.reference()])
        .args(["sh", "-c", "test -e /bin/ls && echo present || echo absent"])
        .stdout();
    assert_eq!(ls, "absent");
}

#[test]
fn a_cancelled_run_and_a_killed_kilnd_leave_nothing_behind() {
    let ws = Dir::new("native-cancel");
    ws.write("kiln.toml", busybox_kiln_toml());
    let pkg = write_package(
        &ws,
        "slow",
        &["amd64"],
        "FROM kiln/busybox:latest\nRUN echo started && sleep 600\n",
    );
    let cache: PathBuf = ws.join(".cache");
    let kilnd = Kilnd::start(&[ws.path()], options(&cache));
    let events = kilnd.events();
    events.wait(BUILD_TIMEOUT, "the slow build to run", |s| {
        s.running.iter().any(|r| r.package == pkg)
    });
    poll("the RUN's container", BUILD_TIMEOUT, || {
        leftovers(&cache)
            .iter()
            .any(|l| l.starts_with("container:"))
    });
    kiln(&kilnd).args(["cancel", &pkg]).run();
    let s = events.wait(BUILD_TIMEOUT, "the build to end", |s| s.running.is_empty());
    assert!(!package_ok(&s, &pkg), "{}", describe(&s));
    assert_eq!(leftovers(&cache), Vec::<String>::new());
    // The log of a cancelled build fails as the build did, followed or not.
    for follow in [&[][..], &["--follow"][..]] {
        let out = kiln(&kilnd)
            .args(["logs", &pkg, "--arch", "amd64"])
            .args(follow)
            .run_fails();
        assert_eq!(out.status.code(), Some(1), "{out}");
    }
    drop(events);
    drop(kilnd);

    // A kilnd killed mid-RUN leaves its container, mount and directory; the next kilnd
    // removes them when it starts.
    ws.write("slow/again", "x");
    let mut kilnd = Kilnd::start(&[ws.path()], options(&cache));
    poll("the RUN's container", BUILD_TIMEOUT, || {
        leftovers(&cache)
            .iter()
            .any(|l| l.starts_with("container:"))
    });
    cmd("kill").args(["-KILL", &kilnd.pid().to_string()]).run();
    poll("kilnd to die", BUILD_TIMEOUT, || !kilnd.is_running());
    assert_ne!(leftovers(&cache), Vec::<String>::new());
    // Only the RUN's process is left of it (runc's init): kill it as init would be.
    let kilnd = Kilnd::start(&[ws.path()], options(&cache));
    let events = kilnd.events();
    events.wait(BUILD_TIMEOUT, "the slow build to run again", |s| {
        s.running.iter().any(|r| r.package == pkg)
    });
    kiln(&kilnd).args(["cancel", &pkg]).run();
    events.wait(BUILD_TIMEOUT, "the build to end", |s| s.running.is_empty());
    assert_eq!(leftovers(&cache), Vec::<String>::new());
}
