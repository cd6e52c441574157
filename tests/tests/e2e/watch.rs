//! The watch issue's tests, against the real kilnd and its file watcher: a save rebuilds
//! only what it affects and a revert is served from the cache; saves without new content,
//! editor temporaries and `.git` writes build nothing; a burst of saves ends with the last
//! content served; packages come and go; a pull waits for a build or names its failure;
//! at inotify's watch limit kilnd says so and keeps seeing saves by polling.
//!
//! "Nothing was built" is checked after a barrier: a later save to another package, whose
//! build proves that kilnd has handled every earlier file event (they arrive in order).

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_shared::protocol::{Snapshot, TargetStatus};
use kiln_tests::api::{describe, digests_of, package_ok, settled, tag_of};
use kiln_tests::machine::{ExclusiveToken, Sysctl, exclusive};
use kiln_tests::workspace::{
    busybox_kiln_toml, index_platforms, registry_digest, registry_has, registry_manifest,
    write_package,
};
use kiln_tests::{Dir, Events, Kilnd, KilndOptions, PulledImage, cmd, docker, target_bin};

/// Long enough for a few docker builds (arm64 under qemu) on a loaded two-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list
        .iter()
        .map(|(p, a)| ((*p).to_owned(), (*a).to_owned()))
        .collect();
    v.sort();
    v
}

/// `kiln show-tag DIR`: the tag of a package's content, computed apart from kilnd.
fn show_tag(dir: &std::path::Path) -> String {
    let out = cmd(target_bin("kiln")).arg("show-tag").arg(dir).stdout();
    out.rsplit_once(':')
        .map(|(_, t)| t.to_owned())
        .unwrap_or_else(|| panic!("kiln show-tag printed no org/image:tag: {out}"))
}

/// Saves `file` with new content and waits until `package` is built at its new tag.
fn barrier(ws: &Dir, events: &Events, file: &str, content: &str, package: &str) -> Snapshot {
    let before = tag_of(&events.snapshot(), package);
    ws.write(file, content);
    events.wait(
        BUILD_TIMEOUT,
        format!("{package} to be rebuilt after a save of {file}"),
        |s| settled(s) && package_ok(s, package) && tag_of(s, package) != before,
    )
}

#[test]
fn a_save_rebuilds_only_its_package_arches_and_dependents_and_a_revert_serves_the_earlier_digest() {
    let ws = Dir::new("ws");
    write_package(
        &ws,
        "lib",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY lib.txt /lib.txt\n",
    );
    ws.write("lib/lib.txt", "lib v1\n");
    write_package(
        &ws,
        "dep",
        &["arm64"],
        "FROM kiln/lib\nCOPY dep.txt /dep.txt\n",
    );
    ws.write("dep/dep.txt", "dep\n");
    write_package(
        &ws,
        "solo",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY solo.txt /solo.txt\n",
    );
    ws.write("solo/solo.txt", "solo v1\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let registry = kilnd.registry();
    let events = kilnd.events();
    let v1 = events.wait(BUILD_TIMEOUT, "everything built", |s| {
        settled(s)
            && ["kiln/lib", "kiln/dep", "kiln/solo"]
                .iter()
                .all(|p| package_ok(s, p))
    });
    let lib_v1 = registry_digest(&registry, &format!("kiln/lib:{}", tag_of(&v1, "kiln/lib")));
    assert_eq!(registry_digest(&registry, "kiln/lib:dev"), lib_v1);

    // A save in lib: lib (both arches) and dep (its one arch) are rebuilt, solo is not.
    let mark = events.mark();
    barrier(&ws, &events, "lib/lib.txt", "lib v2\n", "kiln/lib");
    let v2 = events.wait(BUILD_TIMEOUT, "dep rebuilt on the new lib", |s| {
        settled(s) && package_ok(s, "kiln/dep") && tag_of(s, "kiln/dep") != tag_of(&v1, "kiln/dep")
    });
    assert_eq!(
        events.queued_targets_since(mark),
        pairs(&[
            ("kiln/lib", "amd64"),
            ("kiln/lib", "arm64"),
            ("kiln/dep", "arm64")
        ])
    );
    assert_eq!(tag_of(&v2, "kiln/solo"), tag_of(&v1, "kiln/solo"));
    assert_eq!(digests_of(&v2, "kiln/solo"), digests_of(&v1, "kiln/solo"));
    assert_ne!(registry_digest(&registry, "kiln/lib:dev"), lib_v1);

    // The revert: the earlier tags and digests come back from the cache, no build.
    let mark = events.mark();
    ws.write("lib/lib.txt", "lib v1\n");
    let back = events.wait(BUILD_TIMEOUT, "lib and dep back at their first tags", |s| {
        settled(s)
            && ["kiln/lib", "kiln/dep"]
                .iter()
                .all(|p| package_ok(s, p) && tag_of(s, p) == tag_of(&v1, p))
    });
    for p in ["kiln/lib", "kiln/dep"] {
        assert_eq!(digests_of(&back, p), digests_of(&v1, p), "{p}");
    }
    barrier(&ws, &events, "solo/solo.txt", "solo v2\n", "kiln/solo");
    assert_eq!(
        events.queued_targets_since(mark),
        pairs(&[("kiln/solo", "amd64"), ("kiln/solo", "arm64")]),
        "the revert built something"
    );
    assert_eq!(registry_digest(&registry, "kiln/lib:dev"), lib_v1);
    assert_eq!(
        registry_digest(&registry, "kiln/dep:dev"),
        registry_digest(&registry, &format!("kiln/dep:{}", tag_of(&v1, "kiln/dep")))
    );
    assert_eq!(events.resyncs(), 0, "the event recorder lagged");
}

#[test]
fn saves_without_new_content_editor_temporaries_and_git_writes_start_no_build() {
    let ws = Dir::new("ws");
    ws.git_init();
    write_package(
        &ws,
        "quiet",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY f.txt /f.txt\n",
    );
    ws.write("quiet/f.txt", "the same bytes\n");
    write_package(
        &ws,
        "sentinel",
        &["amd64"],
        "FROM scratch\nCOPY s.txt /s.txt\n",
    );
    ws.write("sentinel/s.txt", "s0\n");
    ws.git_commit_all("packages");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let start = events.wait(BUILD_TIMEOUT, "both packages built", |s| {
        settled(s) && package_ok(s, "kiln/quiet") && package_ok(s, "kiln/sentinel")
    });
    let mark = events.mark();

    let file = ws.join("quiet/f.txt");
    // Each kind of noise is followed by a barrier (a real save in the sentinel package):
    // a retag of quiet running while an editor temporary exists would count the
    // temporary as an untracked file, as LinuxKit does, and that is not what is tested.
    let mut n = 0;
    let mut sentinel = |what: &str| {
        n += 1;
        let s = barrier(
            &ws,
            &events,
            "sentinel/s.txt",
            &format!("s{n}\n"),
            "kiln/sentinel",
        );
        assert_eq!(
            events.queued_targets_since(mark),
            vec![("kiln/sentinel".to_owned(), "amd64".to_owned()); n],
            "{what} started a build: {:?}\nquiet's tag at the start: {}\n{}",
            events.queued_since(mark),
            tag_of(&start, "kiln/quiet"),
            describe(&s)
        );
        assert_eq!(
            tag_of(&s, "kiln/quiet"),
            tag_of(&start, "kiln/quiet"),
            "{what}"
        );
        s
    };

    // 100 saves of the same bytes, 100 touches.
    for _ in 0..100 {
        fs::write(&file, "the same bytes\n").unwrap();
    }
    for _ in 0..100 {
        let f = fs::File::options().write(true).open(&file).unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
    }
    sentinel("a save of the same bytes or a touch");

    // 100 editor temporaries (vim, emacs, JetBrains), made and removed as editors do.
    for i in 0..100 {
        let name = match i % 6 {
            0 => format!(".f{i}.txt.swp"),
            1 => "4913".to_owned(),
            2 => format!("f{i}.txt~"),
            3 => format!("#f{i}.txt#"),
            4 => format!(".#f{i}.txt"),
            _ => format!("f{i}.txt___jb_tmp___"),
        };
        let path = ws.write(format!("quiet/{name}"), format!("temp {i}\n"));
        fs::remove_file(path).unwrap();
    }
    sentinel("an editor temporary");

    // Writes under .git: files, a commit of the same tree, an index refresh.
    for i in 0..100 {
        ws.write(format!(".git/kiln-e2e-{i}"), format!("{i}\n"));
    }
    ws.git(&["commit", "-q", "--allow-empty", "-m", "nothing new"]);
    ws.git(&["status", "--porcelain"]);
    let after = sentinel("a write under .git");
    assert_eq!(tag_of(&after, "kiln/quiet"), tag_of(&start, "kiln/quiet"));
    assert_eq!(events.resyncs(), 0, "the event recorder lagged");
}

#[test]
fn a_burst_of_saves_during_builds_ends_with_the_last_content_served() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    // A RUN: the docker builder, so each build takes long enough for saves to land in it.
    let pkg = write_package(
        &ws,
        "burst",
        &["amd64", "arm64"],
        "FROM kiln/busybox:latest\nCOPY msg /msg\nRUN cp /msg /msg.copy\n",
    );
    ws.write("burst/msg", "v0\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let registry = kilnd.registry();
    let events = kilnd.events();
    events.wait_built(BUILD_TIMEOUT, &pkg);

    // Each save lands while the build of the previous one runs. The temp dir's name in
    // the content: the engine's build cache cannot answer these builds from earlier runs.
    let nonce = ws.name();
    for i in 1..=4 {
        let before = tag_of(&events.snapshot(), &pkg);
        ws.write("burst/msg", format!("v{i} {nonce}\n"));
        events.wait(
            BUILD_TIMEOUT,
            format!("a build of save {i} to start"),
            |s| {
                s.running
                    .iter()
                    .any(|b| b.package == pkg && b.tag.as_str() != before)
            },
        );
    }
    ws.write("burst/msg", format!("last {nonce}\n"));
    let expected = show_tag(&ws.join("burst"));
    let s = events.wait(BUILD_TIMEOUT, "the last save to be built", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == expected
    });
    assert_eq!(tag_of(&s, &pkg), expected);

    // `dev` and the current tag serve the same index, of both platforms, of the last content.
    let current = format!("{pkg}:{expected}");
    let dev = format!("{pkg}:dev");
    assert_eq!(
        registry_digest(&registry, &dev),
        registry_digest(&registry, &current)
    );
    assert_eq!(
        index_platforms(&registry_manifest(&registry, &dev)),
        ["linux/amd64", "linux/arm64"]
    );
    for platform in ["linux/amd64", "linux/arm64"] {
        let image = PulledImage::pull(&format!("{registry}/{dev}"), platform);
        assert_eq!(
            image.run(&["cat", "/msg", "/msg.copy"]),
            format!("last {nonce}\nlast {nonce}"),
            "{platform}"
        );
    }
}

#[test]
fn a_build_whose_files_change_while_it_runs_does_not_land_under_its_tag() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    let nonce = ws.name();
    // A build long enough to save during it, and a save whose writer keeps the file open
    // until the build has finished (within a quiet window longer than the build): the save
    // is planned only then, so only the runner's own check can keep the build (which may
    // have read the new file) from landing.
    let pkg = write_package(
        &ws,
        "slow",
        &["amd64"],
        "FROM kiln/busybox:latest\nCOPY msg /msg\nRUN sleep 3\n",
    );
    ws.write("slow/msg", format!("first {nonce}\n"));
    let first = show_tag(&ws.join("slow"));
    let kilnd = Kilnd::start(
        &[ws.path()],
        KilndOptions::default().arg("--quiet-ms=120000"),
    );
    let registry = kilnd.registry();
    let events = kilnd.events();
    events.wait(BUILD_TIMEOUT, "the first build to start", |s| {
        s.running.iter().any(|b| b.package == pkg)
    });
    let mut writer = fs::File::create(ws.join("slow/msg")).unwrap();
    std::io::Write::write_all(&mut writer, format!("second {nonce}\n").as_bytes()).unwrap();
    let second = show_tag(&ws.join("slow"));
    let s = events.wait(BUILD_TIMEOUT, "the first build to end", |s| {
        s.running.is_empty() && s.packages[&pkg].targets["amd64"].last.is_some()
    });
    drop(writer);
    let last = s.packages[&pkg].targets["amd64"].last.clone().unwrap();
    assert_eq!(
        (last.tag.as_str(), last.outcome),
        (
            first.as_str(),
            kiln_shared::protocol::BuildOutcome::Cancelled
        ),
        "{}",
        describe(&s)
    );
    let why = last.error.unwrap_or_default();
    assert!(why.contains("changed while it was built"), "{why}");
    assert!(
        !registry_has(&registry, &format!("{pkg}:{first}")),
        "the build landed under the tag of the content it started from"
    );
    // The save, planned once its writer closed the file, is built and served.
    let s = events.wait(BUILD_TIMEOUT, "the save to be built", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == second
    });
    assert_eq!(tag_of(&s, &pkg), second);
    let image = PulledImage::pull(&format!("{registry}/{pkg}:{second}"), "linux/amd64");
    assert_eq!(image.run(&["cat", "/msg"]), format!("second {nonce}"));
}

#[test]
fn a_new_package_is_picked_up_and_a_deleted_one_is_dropped() {
    let ws = Dir::new("ws");
    write_package(
        &ws,
        "first",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY f /f\n",
    );
    ws.write("first/f", "first\n");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    events.wait_built(BUILD_TIMEOUT, "kiln/first");

    // Written file by file, as a user would.
    write_package(
        &ws,
        "more/second",
        &["amd64", "arm64"],
        "FROM kiln/first\nCOPY s /s\n",
    );
    ws.write("more/second/s", "second\n");
    events.wait_built(BUILD_TIMEOUT, "kiln/second");
    let registry = kilnd.registry();
    let s = events.snapshot();
    assert_eq!(
        index_platforms(&registry_manifest(
            &registry,
            &format!("kiln/second:{}", tag_of(&s, "kiln/second"))
        )),
        ["linux/amd64", "linux/arm64"]
    );

    // A third package, moved in whole.
    let outside = Dir::new("outside");
    write_package(&outside, "third", &["amd64"], "FROM scratch\nCOPY t /t\n");
    outside.write("third/t", "third\n");
    fs::rename(outside.join("third"), ws.join("third")).unwrap();
    events.wait_built(BUILD_TIMEOUT, "kiln/third");

    // Deleted: it leaves the state and is not built again.
    let mark = events.mark();
    ws.remove("third");
    events.wait(BUILD_TIMEOUT, "kiln/third to leave the state", |s| {
        !s.packages.contains_key("kiln/third")
    });
    barrier(&ws, &events, "first/f", "first v2\n", "kiln/first");
    events.wait_built(BUILD_TIMEOUT, "kiln/second");
    let queued = events.queued_targets_since(mark);
    assert!(
        queued.iter().all(|(p, _)| p != "kiln/third"),
        "the deleted package was built: {queued:?}"
    );
    assert!(!events.snapshot().packages.contains_key("kiln/third"));
}

#[test]
fn a_pull_of_an_unbuilt_tag_waits_for_the_build_and_a_failing_build_answers_an_oci_error() {
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    let slow = write_package(
        &ws,
        "slow",
        &["amd64", "arm64"],
        // Unique per run: the engine's build cache cannot make it finish before the cancel.
        &format!(
            "FROM kiln/busybox:latest\nCOPY msg /msg\nRUN echo {} && cp /msg /msg.copy\n",
            ws.name()
        ),
    );
    ws.write("slow/msg", "built on pull\n");
    let broken = write_package(
        &ws,
        "broken",
        &["amd64"],
        "FROM kiln/busybox:latest\nRUN echo 'kiln-e2e: this step fails on purpose' && exit 3\n",
    );
    // One build at a time: slow's docker builds are cancelled before they can finish.
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().arg("--jobs").arg("1"));
    let kiln = || cmd(target_bin("kiln")).arg("--socket").arg(kilnd.socket());
    let out = kiln().args(["cancel", &slow]).stdout();
    let events = kilnd.events();
    let s = events.wait(BUILD_TIMEOUT, "broken to fail", |s| {
        settled(s) && s.packages[&broken].targets["amd64"].status == TargetStatus::Failed
    });
    for (arch, t) in &s.packages[&slow].targets {
        assert_eq!(
            t.status,
            TargetStatus::Cancelled,
            "slow {arch} was not cancelled (`kiln cancel {slow}` said {out:?}):\n{}",
            describe(&s)
        );
    }
    let tag = tag_of(&s, &slow);
    let registry = kilnd.registry();

    // The pull of the current tag builds it (both arches) and gets it.
    let mark = events.mark();
    let image = PulledImage::pull(&format!("{registry}/{slow}:{tag}"), "linux/arm64");
    assert_eq!(image.run(&["cat", "/msg.copy"]), "built on pull");
    let queued = events.queued_since(mark);
    assert!(
        !queued.is_empty()
            && queued
                .iter()
                .all(|b| b.package == slow && b.reason == "pulled"),
        "{queued:?}"
    );

    // A pull of the failing package answers the OCI error JSON naming the failure.
    let btag = tag_of(&s, &broken);
    let url = format!("http://{registry}/v2/{broken}/manifests/{btag}");
    let out = cmd("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-H"])
        .arg("Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
        .arg(&url)
        .stdout();
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert!(code.starts_with('4'), "{url} answered {code}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"));
    let err = &v["errors"][0];
    assert_eq!(err["code"], "MANIFEST_UNKNOWN", "{body}");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("failed") && message.contains(broken.as_str()),
        "the error does not name the failure: {body}"
    );
    let pull = docker()
        .args(["pull", "--platform", "linux/amd64"])
        .arg(format!("{registry}/{broken}:{btag}"))
        .run_fails();
    assert!(
        pull.stderr_str().contains("failed"),
        "docker pull does not show the failure:\n{pull}"
    );
}

/// Starts kilnd on `ws` with inotify's watch limit at 1 (restored as soon as kilnd has
/// started its watcher, before its ready file), so that it falls back to polling.
fn kilnd_at_the_inotify_limit(machine: &ExclusiveToken, ws: &Dir) -> Kilnd {
    let mut limit = Sysctl::set(machine, "fs/inotify/max_user_watches", "1");
    let start = Kilnd::try_start(&[ws.path()], KilndOptions::default());
    limit.restore();
    start.unwrap_or_else(|e| panic!("{e}"))
}

/// A workspace of two packages whose files were last written an hour ago.
fn old_workspace() -> Dir {
    let ws = Dir::new("ws");
    for p in ["p1", "p2"] {
        write_package(&ws, p, &["amd64"], "FROM scratch\nCOPY d/ /d/\n");
        let f = ws.write(format!("{p}/d/e/f"), p);
        // A whole second, so that a later mtime a millisecond on is in the same second.
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let hour_ago = UNIX_EPOCH + Duration::from_secs(secs - 3600);
        fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|f| f.set_modified(hour_ago))
            .unwrap_or_else(|e| panic!("set the mtime of {}: {e}", f.display()));
    }
    ws
}

#[test]
fn at_the_inotify_watch_limit_kilnd_says_so_and_polling_still_sees_saves() {
    // Alone: lowering the limit would break every other test that watches files.
    let machine = exclusive();
    let ws = old_workspace();
    let kilnd = kilnd_at_the_inotify_limit(&machine, &ws);
    let events = kilnd.events();
    let s = events.wait(BUILD_TIMEOUT, "a watch error", |s| {
        s.watch_error.is_some() && settled(s) && package_ok(s, "kiln/p1")
    });
    let error = s.watch_error.clone().unwrap_or_default();
    assert!(error.contains("fs.inotify.max_user_watches = 1"), "{error}");
    assert!(
        error.contains("sysctl fs.inotify.max_user_watches="),
        "{error}"
    );
    // The polling fallback sees a save (it rescans every 2 s).
    let mark = events.mark();
    barrier(&ws, &events, "p1/d/e/f", "p1 v2", "kiln/p1");
    assert_eq!(
        events.queued_targets_since(mark),
        pairs(&[("kiln/p1", "amd64")])
    );
    drop(kilnd);
    drop(machine);
}

/// The polling fallback compares size, mtime to the nanosecond, inode and mode, so a save
/// whose mtime falls in the same second as before is still seen (made deterministic here
/// by giving the saved file an mtime in the same second, as `cp -p`, `tar -x` or
/// `rsync -t` do). notify's own poller, which compares whole seconds, missed it.
#[test]
fn at_the_inotify_watch_limit_a_save_in_the_same_mtime_second_is_seen() {
    let machine = exclusive();
    let ws = old_workspace();
    let kilnd = kilnd_at_the_inotify_limit(&machine, &ws);
    let events = kilnd.events();
    events.wait(BUILD_TIMEOUT, "p1 built", |s| {
        settled(s) && package_ok(s, "kiln/p1")
    });
    let file = ws.join("p1/d/e/f");
    let before = fs::metadata(&file).unwrap().modified().unwrap();
    let tag = tag_of(&events.snapshot(), "kiln/p1");
    fs::write(&file, "p1 saved again, longer than before").unwrap();
    fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(before + Duration::from_millis(1))
        .unwrap();
    events.wait(
        Duration::from_secs(30),
        "the poller to see the save (it rescans every 2 s)",
        |s| settled(s) && package_ok(s, "kiln/p1") && tag_of(s, "kiln/p1") != tag,
    );
    drop(kilnd);
    drop(machine);
}

/// kilnd issue (a design choice to make, not a slip): the watcher ignores editor
/// temporaries, but the tag counts them, as LinuxKit's does (an untracked file makes the
/// package `-dirty-` with a hash over its bytes). So while vim edits a file (its
/// `.f.txt.swp` exists), a save and its revert give two new dirty tags and two builds
/// instead of the earlier clean digest, and the swap file's later writes leave the
/// served tag different from `kiln show-tag`.
#[test]
#[ignore = "kilnd issue: editor swap files count in the tag but not as changes (see the doc comment)"]
fn a_revert_while_an_editor_swap_file_exists_serves_the_earlier_digest() {
    let ws = Dir::new("ws");
    ws.git_init();
    write_package(
        &ws,
        "edited",
        &["amd64"],
        "FROM scratch\nCOPY f.txt /f.txt\n",
    );
    ws.write("edited/f.txt", "v1\n");
    ws.git_commit_all("v1");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    let v1 = events.wait_built(BUILD_TIMEOUT, "kiln/edited");
    // vim opens the file: its swap file appears (and is written as the user types).
    ws.write("edited/.f.txt.swp", "vim swap 1\n");
    barrier(&ws, &events, "edited/f.txt", "v2\n", "kiln/edited");
    ws.write("edited/.f.txt.swp", "vim swap 2\n");
    let mark = events.mark();
    let v2 = tag_of(&events.snapshot(), "kiln/edited");
    ws.write("edited/f.txt", "v1\n");
    let s = events.wait(BUILD_TIMEOUT, "the revert to be handled", |s| {
        settled(s) && package_ok(s, "kiln/edited") && tag_of(s, "kiln/edited") != v2
    });
    assert_eq!(
        tag_of(&s, "kiln/edited"),
        tag_of(&v1, "kiln/edited"),
        "the revert did not give back the earlier tag; queued: {:?}",
        events.queued_since(mark)
    );
    assert_eq!(
        digests_of(&s, "kiln/edited"),
        digests_of(&v1, "kiln/edited")
    );
}
