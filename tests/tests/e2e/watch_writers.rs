//! Saves are planned at once, without the quiet window, so kilnd may read a file while it
//! is being written. These tests write in place the ways editors and shells do, while
//! kilnd runs, and check that what they leave half written is never kept: no build of a
//! half-written state lands, `dev` ends at the last content, and a same-bytes rewrite ends
//! at the clean tag `kiln show-tag` gives.

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use kiln_shared::protocol::{BuildOutcome, Event};
use kiln_tests::api::{describe, package_ok, settled, tag_of};
use kiln_tests::workspace::{busybox_kiln_toml, registry_digest, registry_has, write_package};
use kiln_tests::{Dir, Events, Kilnd, KilndOptions, PulledImage, cmd, target_bin};

/// Long enough for a few builds (arm64 under qemu) on a loaded two-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// A quiet window no test waits out: every change here is reported because its writer
/// closed the file, not because a window passed.
const NO_WINDOW: &str = "--quiet-ms=600000";

/// `kiln show-tag DIR`: the tag of a package's content, computed apart from kilnd.
fn show_tag(dir: &std::path::Path) -> String {
    let out = cmd(target_bin("kiln")).arg("show-tag").arg(dir).stdout();
    out.rsplit_once(':')
        .map(|(_, t)| t.to_owned())
        .unwrap_or_else(|| panic!("kiln show-tag printed no org/image:tag: {out}"))
}

/// Polls the events seen after `mark` until `cond` holds on them (a deadline, no fixed
/// wait); returns them.
fn wait_events(
    events: &Events,
    mark: usize,
    what: &str,
    mut cond: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    loop {
        let seen = events.since(mark);
        if cond(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            describe(&events.snapshot())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The tags of `package` that builds landed (finished) or that were served from the
/// cache as current, in the events given.
fn landed_tags(seen: &[Event], package: &str) -> Vec<String> {
    seen.iter()
        .filter_map(|e| match e {
            Event::Finished {
                package: p,
                summary,
                ..
            } if p == package => Some(summary.tag.to_string()),
            Event::ServedFromCache {
                package: p, tag, ..
            } if p == package => Some(tag.to_string()),
            _ => None,
        })
        .collect()
}

/// What happened to `package` in the events given, one line each, with tags shortened
/// (for failure messages).
fn history(seen: &[Event], package: &str) -> String {
    let short = |t: &str| {
        t.split_once("-dirty-").map_or_else(
            || t[..8.min(t.len())].to_owned(),
            |(h, d)| format!("{}-dirty-{d}", &h[..8.min(h.len())]),
        )
    };
    seen.iter()
        .filter_map(|e| match e {
            Event::FilesChanged { packages, .. } if packages.iter().any(|p| p == package) => {
                Some("files changed".to_owned())
            }
            Event::TargetPlanned {
                package: p,
                arch,
                tag,
            } if p == package => Some(format!("planned {arch} {}", short(tag.as_str()))),
            Event::Started { build } if build.package == package => Some(format!(
                "started {} {}",
                build.arch,
                short(build.tag.as_str())
            )),
            Event::Finished {
                package: p,
                arch,
                summary,
            }
            | Event::Failed {
                package: p,
                arch,
                summary,
            }
            | Event::Cancelled {
                package: p,
                arch,
                summary,
            } if p == package => Some(format!(
                "{:?} {arch} {} {}",
                summary.outcome,
                short(summary.tag.as_str()),
                summary.error.as_deref().unwrap_or("")
            )),
            Event::ServedFromCache {
                package: p,
                arch,
                tag,
                ..
            } if p == package => Some(format!("served {arch} {}", short(tag.as_str()))),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn same_bytes_rewritten_in_place_while_kilnd_plans_end_at_the_clean_tag_and_land_no_other() {
    let ws = Dir::new("ws");
    ws.git_init();
    let pkg = write_package(
        &ws,
        "same",
        &["amd64", "arm64"],
        "FROM scratch\nCOPY f.txt /f.txt\n",
    );
    // Big enough that a truncation takes a while to finish (blocks to free).
    let bytes = "the same bytes, over and over\n".repeat(4096);
    let file = ws.write("same/f.txt", &bytes);
    ws.git_commit_all("same");
    let clean = show_tag(&ws.join("same"));
    assert!(!clean.contains("-dirty-"), "{clean}");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let registry = kilnd.registry();
    let events = kilnd.events();
    let start = events.wait_built(BUILD_TIMEOUT, &pkg);
    assert_eq!(tag_of(&start, &pkg), clean);
    let served = registry_digest(&registry, &format!("{pkg}:dev"));

    let mark = events.mark();
    let changes = |seen: &[Event]| {
        seen.iter()
            .filter(|e| matches!(e, Event::FilesChanged { .. }))
            .count()
    };
    // Rounds of rewrites, each into the plan of the one before: kilnd reads the file
    // while the next round truncates and writes it.
    for round in 0..20 {
        for i in 0..50 {
            if (round + i) % 2 == 0 {
                fs::write(&file, &bytes).unwrap();
            } else {
                // One fd: truncated, written in two parts, closed.
                let mut f = fs::File::create(&file).unwrap();
                let (a, b) = bytes.as_bytes().split_at(bytes.len() / 3);
                f.write_all(a).unwrap();
                f.write_all(b).unwrap();
            }
        }
        wait_events(&events, mark, "kilnd to plan the round", |seen| {
            changes(seen) > round
        });
    }
    let s = events.wait(BUILD_TIMEOUT, "kilnd to settle at the clean tag", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == clean
    });
    let seen = events.since(mark);
    let planned: Vec<String> = seen
        .iter()
        .filter_map(|e| match e {
            Event::TargetPlanned { package, tag, .. } if *package == pkg => Some(tag.to_string()),
            _ => None,
        })
        .collect();
    eprintln!(
        "{} changes, {} targets planned, {} of a tag other than {clean}",
        changes(&seen),
        planned.len(),
        planned.iter().filter(|t| **t != clean).count()
    );
    let wrong: Vec<String> = landed_tags(&seen, &pkg)
        .into_iter()
        .filter(|t| *t != clean)
        .collect();
    assert!(
        wrong.is_empty(),
        "tags of half-written reads landed or were served: {wrong:?}\n{}\n{}",
        history(&seen, &pkg),
        describe(&s)
    );
    assert_eq!(show_tag(&ws.join("same")), clean);
    assert_eq!(registry_digest(&registry, &format!("{pkg}:dev")), served);
    assert_eq!(events.resyncs(), 0, "the event recorder lagged");
}

#[test]
fn a_writer_that_truncates_then_writes_never_lands_the_empty_file_and_dev_ends_at_the_last_content()
{
    let ws = Dir::new("ws");
    ws.write("kiln.toml", busybox_kiln_toml());
    let nonce = ws.name();
    // A RUN that takes a while: a build started from the truncated file is still running
    // when the write that follows it comes.
    let pkg = write_package(
        &ws,
        "trunc",
        &["amd64"],
        "FROM kiln/busybox:latest\nCOPY msg /msg\nRUN sleep 3 && cp /msg /msg.copy\n",
    );
    let msg = ws.write("trunc/msg", format!("v0 {nonce}\n"));
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default().arg(NO_WINDOW));
    let registry = kilnd.registry();
    let events = kilnd.events();
    let v0 = tag_of(&events.wait_built(BUILD_TIMEOUT, &pkg), &pkg);

    // One fd: open(O_TRUNC), a pause, the write, close. The change is planned once the
    // file is closed (not after the window), and only its last content is ever planned.
    let mark = events.mark();
    let mut f = fs::File::create(&msg).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the writer's own pause
    f.write_all(format!("one fd {nonce}\n").as_bytes()).unwrap();
    drop(f);
    let one = show_tag(&ws.join("trunc"));
    let s = events.wait(BUILD_TIMEOUT, "the one-fd write to be built", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == one
    });
    let planned: Vec<String> = events
        .since(mark)
        .iter()
        .filter_map(|e| match e {
            Event::TargetPlanned { package, tag, .. } if *package == pkg => Some(tag.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        planned.iter().all(|t| *t == one),
        "a state other than the last ({one}) was planned: {planned:?}\n{}",
        describe(&s)
    );
    assert_eq!(
        registry_digest(&registry, &format!("{pkg}:dev")),
        registry_digest(&registry, &format!("{pkg}:{one}"))
    );

    // Two fds: `: > msg`, then a write. The empty file is closed, so it is planned and its
    // build starts; the write that follows supersedes it before it lands.
    let mark = events.mark();
    drop(fs::File::create(&msg).unwrap());
    let seen = wait_events(
        &events,
        mark,
        "a build of the empty file to start",
        |seen| {
            seen.iter()
                .any(|e| matches!(e, Event::Started { build } if build.package == pkg))
        },
    );
    let empty = seen
        .iter()
        .find_map(|e| match e {
            Event::Started { build } if build.package == pkg => Some(build.tag.to_string()),
            _ => None,
        })
        .unwrap();
    assert!(empty != one && empty != v0, "{empty}");
    fs::write(&msg, format!("two fds {nonce}\n")).unwrap();
    let two = show_tag(&ws.join("trunc"));
    let s = events.wait(BUILD_TIMEOUT, "the two-fd write to be built", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == two
    });
    let seen = events.since(mark);
    let landed = landed_tags(&seen, &pkg);
    assert!(
        !landed.contains(&empty),
        "the empty file's build landed: {landed:?}\n{}",
        describe(&s)
    );
    let ended = seen.iter().find_map(|e| match e {
        Event::Cancelled {
            package, summary, ..
        } if *package == pkg && summary.tag.as_str() == empty => Some(summary.outcome),
        _ => None,
    });
    assert_eq!(
        ended,
        Some(BuildOutcome::Cancelled),
        "the empty file's build was not superseded\n{}",
        describe(&s)
    );
    assert!(!registry_has(&registry, &format!("{pkg}:{empty}")));
    let dev = format!("{pkg}:dev");
    assert_eq!(
        registry_digest(&registry, &dev),
        registry_digest(&registry, &format!("{pkg}:{two}"))
    );
    let image = PulledImage::pull(&format!("{registry}/{dev}"), "linux/amd64");
    assert_eq!(
        image.run(&["cat", "/msg", "/msg.copy"]),
        format!("two fds {nonce}\ntwo fds {nonce}")
    );
}

#[test]
fn a_save_then_its_commit_ends_at_the_clean_tag() {
    let ws = Dir::new("ws");
    ws.git_init();
    let pkg = write_package(&ws, "commit", &["amd64"], "FROM scratch\nCOPY f /f\n");
    ws.write("commit/f", "v1\n");
    ws.git_commit_all("v1");
    let kilnd = Kilnd::start(&[ws.path()], KilndOptions::default());
    let events = kilnd.events();
    events.wait_built(BUILD_TIMEOUT, &pkg);
    // Saved (planned at once, dirty), then committed: no package file changes, the tag does.
    ws.write("commit/f", "v2\n");
    let dirty = show_tag(&ws.join("commit"));
    assert!(dirty.contains("-dirty-"), "{dirty}");
    events.wait(BUILD_TIMEOUT, "the save to be built", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == dirty
    });
    ws.git_commit_all("v2");
    let clean = show_tag(&ws.join("commit"));
    assert!(!clean.contains("-dirty-"), "{clean}");
    events.wait(BUILD_TIMEOUT, "the commit to give the clean tag", |s| {
        settled(s) && package_ok(s, &pkg) && tag_of(s, &pkg) == clean
    });
}
