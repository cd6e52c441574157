//! Test fixtures: a daemon state with every kind of row, and key helpers.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kiln_shared::digest::Digest;
use kiln_shared::protocol::*;
use ratatui::layout::Rect;

use crate::app::{Model, Msg, update};

pub fn tag(s: &str) -> kiln_shared::reference::Tag {
    s.parse().unwrap()
}

pub fn digest(c: char) -> Digest {
    Digest::from_hex(&c.to_string().repeat(64)).unwrap()
}

pub const T0: u64 = 1_700_000_000_000;

pub fn summary(id: &str, outcome: BuildOutcome, ms: u64) -> BuildSummary {
    BuildSummary {
        id: id.into(),
        tag: tag("4f2a9c1be07d3355"),
        outcome,
        duration_ms: ms,
        digest: (outcome == BuildOutcome::Ok).then(|| digest('a')),
        error: (outcome == BuildOutcome::Failed).then(|| "RUN make: exit code 2".into()),
        cache_hits: 2,
        steps: 4,
        builder: (outcome == BuildOutcome::Ok).then_some(kiln_shared::protocol::BuiltBy::Native),
        finished_at_ms: T0 + ms,
        pulled_from: None,
    }
}

fn package(name: &str, archs: &[&str]) -> Event {
    Event::PackageAdded {
        package: PackageInfo {
            name: name.into(),
            dir: format!("/ws/{}", name.rsplit('/').next().unwrap()).into(),
            tag: Some(tag("4f2a9c1be07d3355")),
            archs: archs.iter().map(|a| (*a).to_owned()).collect(),
        },
    }
}

/// Events a daemon could have emitted: one package ok, one building, one failed, one
/// queued, one broken.
pub fn events() -> Vec<Event> {
    let mut e = vec![
        package("linuxkit/alpine", &["amd64", "arm64"]),
        package("linuxkit/hello", &["amd64", "arm64"]),
        package("linuxkit/init", &["amd64", "arm64"]),
        package("linuxkit/runc", &["amd64"]),
    ];
    for (p, a) in [
        ("linuxkit/alpine", "amd64"),
        ("linuxkit/alpine", "arm64"),
        ("linuxkit/hello", "amd64"),
        ("linuxkit/hello", "arm64"),
        ("linuxkit/init", "amd64"),
        ("linuxkit/init", "arm64"),
        ("linuxkit/runc", "amd64"),
    ] {
        e.push(Event::TargetPlanned {
            package: p.into(),
            arch: a.into(),
            tag: tag("4f2a9c1be07d3355"),
        });
    }
    let queued = |id: &str, p: &str, a: &str| QueuedBuild {
        id: id.into(),
        package: p.into(),
        arch: a.into(),
        tag: tag("4f2a9c1be07d3355"),
        reason: "files changed".into(),
    };
    let running = |id: &str, p: &str, a: &str| RunningBuild {
        id: id.into(),
        package: p.into(),
        arch: a.into(),
        tag: tag("4f2a9c1be07d3355"),
        builder: "native".into(),
        started_at_ms: T0,
        progress: None,
    };
    for (id, p, a, outcome, ms) in [
        ("b1", "linuxkit/alpine", "amd64", BuildOutcome::Ok, 1500),
        ("b2", "linuxkit/alpine", "arm64", BuildOutcome::Ok, 2300),
        ("b3", "linuxkit/init", "amd64", BuildOutcome::Failed, 800),
    ] {
        e.push(Event::Queued {
            build: queued(id, p, a),
        });
        e.push(Event::Started {
            build: running(id, p, a),
        });
        let summary = summary(id, outcome, ms);
        e.push(match outcome {
            BuildOutcome::Ok => Event::Finished {
                package: p.into(),
                arch: a.into(),
                summary,
            },
            _ => Event::Failed {
                package: p.into(),
                arch: a.into(),
                summary,
            },
        });
    }
    e.push(Event::Queued {
        build: queued("b4", "linuxkit/hello", "amd64"),
    });
    e.push(Event::Started {
        build: running("b4", "linuxkit/hello", "amd64"),
    });
    e.push(Event::Progress {
        build: "b4".into(),
        progress: Progress {
            current: 2,
            total: 4,
            step: "COPY . /".into(),
        },
    });
    e.push(Event::Queued {
        build: queued("b5", "linuxkit/hello", "arm64"),
    });
    e.push(Event::ServedFromCache {
        package: "linuxkit/init".into(),
        arch: "arm64".into(),
        tag: tag("4f2a9c1be07d3355"),
        digest: digest('c'),
    });
    e.push(Event::PackageError {
        package: "linuxkit/runc".into(),
        dir: "/ws/runc".into(),
        error: "/ws/runc/build.yml:2:1: unknown field `imagee`, expected one of `image`, `org`"
            .into(),
        archs: vec![],
    });
    e.push(Event::CacheStats {
        stats: CacheStats {
            dir: "/cache".into(),
            bytes_used: 734 << 20,
            bytes_cap: Some(2 << 30),
            blobs: 41,
            references: 12,
            hits: 30,
            misses: 10,
            last_gc: Some(GcSummary {
                finished_at_ms: T0 - 3_600_000,
                duration_ms: 120,
                removed_blobs: 3,
                freed_bytes: 5 << 20,
            }),
            on_demand_blobs: 0,
            on_demand_bytes: 0,
        },
    });
    e.push(Event::Pulled {
        pull: Pull {
            reference: "linuxkit/alpine:4f2a9c1be07d3355".into(),
            digest: digest('a'),
            client: None,
            at_ms: T0 + 5000,
        },
    });
    e
}

pub fn snapshot() -> Snapshot {
    let mut s = Snapshot::new(
        "0.1.0",
        4242,
        vec!["/ws".into()],
        vec!["127.0.0.1:5000".into()],
    );
    for e in events() {
        s.apply(&e);
    }
    s
}

/// A model connected to [`snapshot`], 80x24, at `T0 + 12s`.
pub fn model() -> Model {
    let mut m = Model::new(
        "/run/user/0/kiln/kilnd.sock".into(),
        Rect::new(0, 0, 80, 24),
    );
    update(
        &mut m,
        Msg::Stream(StreamItem::Snapshot {
            snapshot: Box::new(snapshot()),
        }),
    );
    update(&mut m, Msg::Tick(T0 + 12_000));
    m
}

pub fn key(c: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

pub fn ch(c: char) -> Msg {
    key(KeyCode::Char(c))
}

/// Sends `text` as typed characters.
pub fn type_text(m: &mut Model, text: &str) {
    for c in text.chars() {
        update(m, ch(c));
    }
}
