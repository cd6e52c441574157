use std::path::PathBuf;

use super::*;
use crate::digest::Digest;
use crate::reference::Tag;

fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

fn digest(c: char) -> Digest {
    Digest::from_hex(&c.to_string().repeat(64)).unwrap()
}

fn summary(id: &str, outcome: BuildOutcome) -> BuildSummary {
    BuildSummary {
        id: id.into(),
        tag: tag("abc123"),
        outcome,
        duration_ms: 1500,
        digest: (outcome == BuildOutcome::Ok).then(|| digest('d')),
        error: (outcome == BuildOutcome::Failed).then(|| "step 2/3: exit code 1".to_owned()),
        cache_hits: 1,
        steps: 3,
        builder: (outcome == BuildOutcome::Ok).then_some(BuiltBy::Native),
        finished_at_ms: 1_700_000_001_500,
        pulled_from: None,
    }
}

fn queued(id: &str, arch: &str) -> QueuedBuild {
    QueuedBuild {
        id: id.into(),
        package: "linuxkit/hello".into(),
        arch: arch.into(),
        tag: tag("abc123"),
        reason: "files changed".into(),
    }
}

fn running(id: &str, arch: &str) -> RunningBuild {
    RunningBuild {
        id: id.into(),
        package: "linuxkit/hello".into(),
        arch: arch.into(),
        tag: tag("abc123"),
        builder: "native".into(),
        started_at_ms: 1_700_000_000_000,
        progress: None,
    }
}

fn added() -> Event {
    Event::PackageAdded {
        package: PackageInfo {
            name: "linuxkit/hello".into(),
            dir: "/ws/hello".into(),
            tag: None,
            archs: vec!["amd64".into(), "arm64".into()],
        },
    }
}

/// One of every event, in an order a daemon could emit them.
fn every_event() -> Vec<Event> {
    vec![
        added(),
        Event::TargetPlanned {
            package: "linuxkit/hello".into(),
            arch: "amd64".into(),
            tag: tag("abc123"),
        },
        Event::TargetPlanned {
            package: "linuxkit/hello".into(),
            arch: "arm64".into(),
            tag: tag("abc123"),
        },
        Event::FilesChanged {
            paths: vec!["/ws/hello/Dockerfile".into()],
            packages: vec!["linuxkit/hello".into()],
            at_ms: 1_699_999_999_000,
        },
        Event::Queued {
            build: queued("b1", "amd64"),
        },
        Event::Queued {
            build: queued("b2", "arm64"),
        },
        Event::Started {
            build: running("b1", "amd64"),
        },
        Event::Progress {
            build: "b1".into(),
            progress: Progress {
                current: 2,
                total: 3,
                step: "COPY hello /".into(),
            },
        },
        Event::Finished {
            package: "linuxkit/hello".into(),
            arch: "amd64".into(),
            summary: summary("b1", BuildOutcome::Ok),
        },
        Event::Started {
            build: running("b2", "arm64"),
        },
        Event::Failed {
            package: "linuxkit/hello".into(),
            arch: "arm64".into(),
            summary: summary("b2", BuildOutcome::Failed),
        },
        Event::ServedFromCache {
            package: "linuxkit/hello".into(),
            arch: "arm64".into(),
            tag: tag("abc123"),
            digest: digest('e'),
        },
        Event::Pulled {
            pull: Pull {
                reference: "linuxkit/hello:abc123".into(),
                digest: digest('d'),
                client: Some("docker/20.10".into()),
                at_ms: 1_700_000_002_000,
            },
        },
        Event::CacheStats {
            stats: CacheStats {
                dir: "/cache".into(),
                bytes_used: 10 << 20,
                bytes_cap: Some(1 << 30),
                blobs: 12,
                references: 4,
                hits: 3,
                misses: 1,
                last_gc: None,
                on_demand_blobs: 2,
                on_demand_bytes: 4096,
            },
        },
        Event::GcFinished {
            gc: GcSummary {
                finished_at_ms: 1_700_000_003_000,
                duration_ms: 20,
                removed_blobs: 2,
                freed_bytes: 4096,
            },
        },
        Event::WatchError {
            error: "inotify watch limit reached".into(),
        },
        Event::WatchRecovered,
        Event::PackageError {
            package: "linuxkit/broken".into(),
            dir: "/ws/broken".into(),
            error: "/ws/broken/build.yml:3:1: unknown field `imagee`".into(),
            archs: vec![],
        },
        Event::Queued {
            build: queued("b3", "amd64"),
        },
        Event::Cancelled {
            package: "linuxkit/hello".into(),
            arch: "amd64".into(),
            summary: summary("b3", BuildOutcome::Cancelled),
        },
        Event::PackageRemoved {
            package: "linuxkit/broken".into(),
        },
        Event::Upstreams {
            upstreams: vec![UpstreamInfo {
                name: "registry.example:5000/team".into(),
                push: true,
                state: "down".into(),
                error: Some("Connection refused (os error 111)".into()),
            }],
        },
        Event::Pushed {
            push: Box::new(PushResult {
                package: "linuxkit/hello".into(),
                tag: tag("abc123"),
                upstream: "registry.example:5000/team".into(),
                references: vec![
                    "registry.example:5000/team/linuxkit/hello:abc123-amd64".into(),
                    "registry.example:5000/team/linuxkit/hello:abc123".into(),
                ],
                error: None,
                duration_ms: 120,
                at_ms: 1_700_000_004_000,
                next_try_at_ms: None,
            }),
        },
    ]
}

fn folded() -> Snapshot {
    let mut s = Snapshot::new(
        "0.1.0",
        42,
        vec!["/ws".into()],
        vec!["127.0.0.1:5000".into()],
    );
    for e in every_event() {
        s.apply(&e);
    }
    s
}

#[test]
fn wire_format_of_events() {
    insta::assert_json_snapshot!("events", every_event());
}

#[test]
fn wire_format_of_snapshot() {
    insta::assert_json_snapshot!("snapshot", folded());
}

#[test]
fn wire_format_of_requests_and_stream() {
    let items = serde_json::json!({
        "build_request": BuildRequest { package: "linuxkit/hello".into(), arch: Some("arm64".into()), force: true, builder: None },
        "build_response": BuildResponse { builds: vec![queued("b4", "arm64")], up_to_date: vec!["amd64".into()] },
        "cancel_request": CancelRequest { build: Some("b4".into()), ..CancelRequest::default() },
        "cancel_response": CancelResponse { cancelled: vec!["b4".into()] },
        "gc_response": GcResponse { gc: GcSummary { finished_at_ms: 1, duration_ms: 2, removed_blobs: 3, freed_bytes: 4 } },
        "error": ErrorBody { error: "no package \"x\"".into() },
        "version": VersionInfo { protocol: PROTOCOL_VERSION, daemon_version: "0.1.0".into() },
        "stream_event": StreamItem::Event { seq: 7, event: Event::WatchRecovered },
        "ready": Ready { registry: vec!["127.0.0.1:5000".into(), "[::1]:5000".into()], socket: "/run/user/1/kiln/kilnd.sock".into(), pid: 4321 },
    });
    insta::assert_json_snapshot!("requests", items);
}

#[test]
fn every_event_round_trips() {
    for e in every_event() {
        let json = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e, "{json}");
    }
    let s = folded();
    let item = StreamItem::Snapshot {
        snapshot: Box::new(s.clone()),
    };
    let back: StreamItem = serde_json::from_str(&serde_json::to_string(&item).unwrap()).unwrap();
    assert_eq!(back, item);
}

#[test]
fn build_request_defaults_optional_fields() {
    let r: BuildRequest = serde_json::from_str(r#"{"package":"a/b"}"#).unwrap();
    assert_eq!(
        r,
        BuildRequest {
            package: "a/b".into(),
            arch: None,
            force: false,
            builder: None,
        }
    );
}

#[test]
fn apply_counts_every_event() {
    let s = folded();
    assert_eq!(s.seq, every_event().len() as u64);
}

#[test]
fn build_lifecycle_moves_target_status() {
    let mut s = Snapshot::default();
    s.apply(&added());
    let status = |s: &Snapshot, a: &str| s.packages["linuxkit/hello"].targets[a].status;
    assert_eq!(status(&s, "amd64"), TargetStatus::Idle);
    s.apply(&Event::Queued {
        build: queued("b1", "amd64"),
    });
    assert_eq!(status(&s, "amd64"), TargetStatus::Queued);
    assert_eq!(s.queue.len(), 1);
    s.apply(&Event::Started {
        build: running("b1", "amd64"),
    });
    assert_eq!(status(&s, "amd64"), TargetStatus::Building);
    assert!(s.queue.is_empty());
    assert_eq!(s.running.len(), 1);
    s.apply(&Event::Finished {
        package: "linuxkit/hello".into(),
        arch: "amd64".into(),
        summary: summary("b1", BuildOutcome::Ok),
    });
    let t = &s.packages["linuxkit/hello"].targets["amd64"];
    assert_eq!(t.status, TargetStatus::Ok);
    assert_eq!(t.digest, Some(digest('d')));
    assert_eq!(t.build, None);
    assert!(s.running.is_empty());
    assert_eq!(status(&s, "arm64"), TargetStatus::Idle);
}

#[test]
fn superseded_build_does_not_overwrite_newer_status() {
    let mut s = Snapshot::default();
    s.apply(&added());
    s.apply(&Event::Started {
        build: running("old", "amd64"),
    });
    s.apply(&Event::Queued {
        build: queued("new", "amd64"),
    });
    s.apply(&Event::Cancelled {
        package: "linuxkit/hello".into(),
        arch: "amd64".into(),
        summary: summary("old", BuildOutcome::Cancelled),
    });
    let t = &s.packages["linuxkit/hello"].targets["amd64"];
    assert_eq!(t.status, TargetStatus::Queued);
    assert_eq!(t.build, Some("new".into()));
    assert_eq!(t.last.as_ref().map(|l| l.id.clone()), Some("old".into()));
    assert!(s.running.is_empty());
    assert_eq!(s.queue.len(), 1);
}

#[test]
fn new_tag_resets_a_finished_target_but_keeps_its_last_build() {
    let mut s = folded();
    s.apply(&Event::TargetPlanned {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        tag: tag("fff000"),
    });
    let t = &s.packages["linuxkit/hello"].targets["arm64"];
    assert_eq!(t.status, TargetStatus::Idle);
    assert_eq!(t.digest, None);
    assert!(t.last.is_some());
}

#[test]
fn re_adding_a_package_keeps_targets_of_remaining_archs() {
    let mut s = folded();
    s.apply(&Event::PackageAdded {
        package: PackageInfo {
            name: "linuxkit/hello".into(),
            dir: "/ws/hello".into(),
            tag: Some(tag("abc123")),
            archs: vec!["amd64".into(), "riscv64".into()],
        },
    });
    let p = &s.packages["linuxkit/hello"];
    assert_eq!(
        p.targets.keys().collect::<Vec<_>>(),
        vec!["amd64", "riscv64"]
    );
    assert!(p.targets["amd64"].last.is_some());
    assert_eq!(p.targets["riscv64"], TargetState::default());
}

#[test]
fn build_of_prefers_the_build_in_flight_then_the_latest() {
    let mut s = folded();
    assert_eq!(
        s.build_of("linuxkit/hello", Some("arm64")),
        Some("b2".into())
    );
    assert_eq!(
        s.build_of("linuxkit/hello", Some("amd64")),
        Some("b3".into())
    );
    let mut later = summary("b5", BuildOutcome::Ok);
    later.finished_at_ms += 10;
    s.apply(&Event::Finished {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        summary: later,
    });
    assert_eq!(s.build_of("linuxkit/hello", None), Some("b5".into()));
    s.apply(&Event::Queued {
        build: queued("b9", "amd64"),
    });
    assert_eq!(s.build_of("linuxkit/hello", None), Some("b9".into()));
    assert_eq!(s.build_of("nope", None), None);
    assert_eq!(s.build_of("linuxkit/hello", Some("s390x")), None);
}

#[test]
fn hit_ratio() {
    let mut c = CacheStats::default();
    assert_eq!(c.hit_ratio(), None);
    c.hits = 3;
    c.misses = 1;
    assert_eq!(c.hit_ratio(), Some(0.75));
}

#[test]
fn default_cache_dir_prefers_xdg_then_home() {
    assert_eq!(
        default_cache_dir_from(Some("/x".into()), Some("/h".into())),
        Some(PathBuf::from("/x/kiln"))
    );
    assert_eq!(
        default_cache_dir_from(Some("".into()), Some("/h".into())),
        Some(PathBuf::from("/h/.cache/kiln"))
    );
    assert_eq!(default_cache_dir_from(None, Some("".into())), None);
}

#[test]
fn default_socket_prefers_the_runtime_dir() {
    assert_eq!(
        default_socket_path(Some("/run/user/1".into()), "/c".into()),
        PathBuf::from("/run/user/1/kiln/kilnd.sock")
    );
    assert_eq!(
        default_socket_path(Some("relative".into()), "/c".into()),
        PathBuf::from("/c/kilnd.sock")
    );
    assert_eq!(
        default_socket_path(None, "/c".into()),
        PathBuf::from("/c/kilnd.sock")
    );
}

/// A revert while a build of the newer tag runs: the reverted tag is in the cache, so the
/// target is served (ok, with its digest) at once; the build's cancellation is history
/// (`last`), not the target's state, and no duration is the state's.
#[test]
fn a_revert_during_a_build_is_served_and_the_cancelled_build_is_history() {
    let mut s = Snapshot::default();
    s.apply(&added());
    let old = tag("0ld000");
    let planned = |t: &Tag| Event::TargetPlanned {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        tag: t.clone(),
    };
    s.apply(&planned(&old));
    s.apply(&Event::ServedFromCache {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        tag: old.clone(),
        digest: digest('a'),
    });
    // An edit: the new tag (abc123) builds.
    s.apply(&planned(&tag("abc123")));
    s.apply(&Event::Queued {
        build: queued("b7", "arm64"),
    });
    s.apply(&Event::Started {
        build: running("b7", "arm64"),
    });
    assert_eq!(
        s.started_at(&s.packages["linuxkit/hello"].targets["arm64"]),
        Some(1_700_000_000_000)
    );
    // The revert: the old tag is served from the cache while b7 still runs.
    s.apply(&planned(&old));
    s.apply(&Event::ServedFromCache {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        tag: old.clone(),
        digest: digest('a'),
    });
    s.apply(&Event::Cancelled {
        package: "linuxkit/hello".into(),
        arch: "arm64".into(),
        summary: summary("b7", BuildOutcome::Cancelled),
    });
    let t = &s.packages["linuxkit/hello"].targets["arm64"];
    assert_eq!(t.status, TargetStatus::Ok);
    assert_eq!(t.tag.as_ref(), Some(&old));
    assert_eq!(t.digest, Some(digest('a')));
    assert_eq!(t.build, None);
    assert_eq!(t.last.as_ref().map(|l| l.id.clone()), Some("b7".into()));
    assert_eq!(t.settled_by(), None, "b7's duration is not the state's");
    assert!(s.running.is_empty());
}

/// The last build's duration goes with the state it made, and only with it.
#[test]
fn settled_by_is_the_build_that_made_the_state() {
    let mut s = Snapshot::default();
    s.apply(&added());
    s.apply(&Event::Queued {
        build: queued("b1", "amd64"),
    });
    s.apply(&Event::Started {
        build: running("b1", "amd64"),
    });
    s.apply(&Event::Finished {
        package: "linuxkit/hello".into(),
        arch: "amd64".into(),
        summary: summary("b1", BuildOutcome::Ok),
    });
    let t = |s: &Snapshot| s.packages["linuxkit/hello"].targets["amd64"].clone();
    assert_eq!(t(&s).settled_by().map(|l| l.duration_ms), Some(1500));
    // A rebuild: building, and the earlier build's duration is not its.
    s.apply(&Event::Queued {
        build: queued("b2", "amd64"),
    });
    s.apply(&Event::Started {
        build: running("b2", "amd64"),
    });
    assert_eq!(t(&s).status, TargetStatus::Building);
    assert_eq!(t(&s).settled_by(), None);
    assert_eq!(s.started_at(&t(&s)), Some(1_700_000_000_000));
}

/// A package that cannot be built keeps its row under its name, with its error and
/// its arches (idle: no tag of it is current), its builds as history; planning it again
/// (the file fixed) clears the error.
#[test]
fn a_package_error_keeps_the_row_until_it_is_planned_again() {
    let mut s = folded();
    s.apply(&Event::PackageError {
        package: "linuxkit/hello".into(),
        dir: "/ws/hello".into(),
        error: "/ws/hello/Dockerfile:3:1: unknown instruction COPYY".into(),
        archs: vec!["amd64".into(), "arm64".into()],
    });
    let p = &s.packages["linuxkit/hello"];
    assert!(p.error.as_deref().unwrap().contains("Dockerfile:3:1"));
    assert_eq!(p.tag, None);
    assert_eq!(p.targets.keys().collect::<Vec<_>>(), vec!["amd64", "arm64"]);
    for t in p.targets.values() {
        assert_eq!(t.status, TargetStatus::Idle);
        assert_eq!(
            (t.tag.as_ref(), t.digest.as_ref(), t.build.as_ref()),
            (None, None, None)
        );
        assert!(t.last.is_some());
    }
    // A build.yml that does not say its arches: the row keeps its own.
    s.apply(&Event::PackageError {
        package: "linuxkit/hello".into(),
        dir: "/ws/hello".into(),
        error: "/ws/hello/build.yml:2:9: unknown arch".into(),
        archs: vec![],
    });
    assert_eq!(s.packages["linuxkit/hello"].targets.len(), 2);
    s.apply(&Event::TargetPlanned {
        package: "linuxkit/hello".into(),
        arch: "amd64".into(),
        tag: tag("abc123"),
    });
    assert_eq!(s.packages["linuxkit/hello"].error, None);
}
