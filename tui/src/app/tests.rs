//! `update` unit tests: each message's effect on the model and the commands it returns.

use crossterm::event::{KeyCode, KeyModifiers, MouseEvent, MouseEventKind};
use kiln_shared::protocol::*;

use super::*;
use crate::testing::*;

#[test]
fn snapshot_connects_and_selects_the_first_package() {
    let m = model();
    assert_eq!(m.conn, Conn::Connected);
    assert_eq!(m.selected.as_deref(), Some("linuxkit/alpine"));
    assert_eq!(m.archs(), vec!["amd64", "arm64"]);
    assert!(m.dirty);
}

#[test]
fn arrows_and_jk_move_the_selection_within_bounds() {
    let mut m = model();
    update(&mut m, key(KeyCode::Up));
    assert_eq!(m.selected.as_deref(), Some("linuxkit/alpine"));
    update(&mut m, ch('j'));
    update(&mut m, key(KeyCode::Down));
    assert_eq!(m.selected.as_deref(), Some("linuxkit/init"));
    for _ in 0..10 {
        update(&mut m, ch('j'));
    }
    assert_eq!(m.selected.as_deref(), Some("linuxkit/runc"));
    update(&mut m, ch('k'));
    assert_eq!(m.selected.as_deref(), Some("linuxkit/init"));
    update(&mut m, key(KeyCode::Right));
    update(&mut m, key(KeyCode::Right));
    assert_eq!(m.selected_arch().as_deref(), Some("arm64"));
    update(&mut m, ch('h'));
    assert_eq!(m.selected_arch().as_deref(), Some("amd64"));
}

#[test]
fn unknown_keys_and_mouse_moves_do_not_redraw() {
    let mut m = model();
    m.dirty = false;
    assert!(update(&mut m, ch('z')).is_empty());
    update(
        &mut m,
        Msg::Mouse(MouseEvent {
            kind: MouseEventKind::Moved,
            column: 3,
            row: 3,
            modifiers: KeyModifiers::NONE,
        }),
    );
    update(&mut m, Msg::Tick(T0 + 99_000_000));
    assert!(m.dirty, "a tick redraws while a build runs (elapsed time)");
    m.dirty = false;
    let mut idle = m.clone();
    idle.snapshot.as_mut().unwrap().running.clear();
    update(&mut idle, Msg::Tick(T0));
    assert!(
        !idle.dirty,
        "a tick with nothing running changes nothing on screen"
    );
    assert!(!idle.animating());
}

#[test]
fn enter_opens_the_log_of_the_selected_build() {
    let mut m = model();
    // linuxkit/alpine amd64 finished as b1.
    let cmds = update(&mut m, key(KeyCode::Enter));
    assert_eq!(cmds, vec![Cmd::FollowLog("b1".into())]);
    assert_eq!(m.log.build, Some("b1".into()));
    assert_eq!(
        m.log.target,
        Some(("linuxkit/alpine".into(), "amd64".into()))
    );
    // A build in flight wins over the last one: hello amd64 runs b4.
    update(&mut m, ch('j'));
    assert_eq!(
        update(&mut m, key(KeyCode::Enter)),
        vec![Cmd::FollowLog("b4".into())]
    );
    // A target never built says so; one of a package that cannot be built says why.
    update(&mut m, ch('j'));
    update(&mut m, key(KeyCode::Right));
    assert!(update(&mut m, key(KeyCode::Enter)).is_empty());
    let n = m.notice.clone().unwrap();
    assert!(
        n.error && n.text.contains("has not been built"),
        "{}",
        n.text
    );
    update(&mut m, ch('j'));
    update(&mut m, key(KeyCode::Left));
    assert!(update(&mut m, key(KeyCode::Enter)).is_empty());
    let n = m.notice.clone().unwrap();
    assert!(
        n.error
            && n.text.contains("linuxkit/runc cannot be built")
            && n.text.contains("unknown field `imagee`"),
        "{}",
        n.text
    );
}

#[test]
fn the_open_log_follows_the_selected_arch_and_package() {
    let mut m = model();
    // Nothing open: moving opens nothing.
    assert!(update(&mut m, key(KeyCode::Right)).is_empty());
    update(&mut m, key(KeyCode::Left));
    update(&mut m, key(KeyCode::Enter));
    assert_eq!(m.log.build, Some("b1".into()));
    // alpine arm64 was built as b2.
    assert_eq!(
        update(&mut m, key(KeyCode::Right)),
        vec![Cmd::FollowLog("b2".into())]
    );
    assert_eq!(
        m.log.target,
        Some(("linuxkit/alpine".into(), "arm64".into()))
    );
    // hello arm64 is queued as b5.
    assert_eq!(update(&mut m, ch('j')), vec![Cmd::FollowLog("b5".into())]);
    // runc arm64 does not exist, runc amd64 was never built: the pane says so.
    update(&mut m, ch('j'));
    update(&mut m, ch('j'));
    update(&mut m, key(KeyCode::Left));
    assert_eq!(m.log.target, Some(("linuxkit/runc".into(), "amd64".into())));
    assert_eq!(m.log.build, None);
}

#[test]
fn log_lines_for_another_build_are_ignored() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    m.dirty = false;
    update(
        &mut m,
        Msg::LogLines {
            build: "zzz".into(),
            lines: vec!["x".into()],
        },
    );
    assert!(m.log.lines.is_empty());
    assert!(!m.dirty);
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["step 1".into()],
        },
    );
    assert_eq!(m.log.lines, ["step 1"]);
    assert!(m.dirty);
    update(&mut m, Msg::LogEnded { build: "b1".into() });
    assert!(m.log.ended);
}

#[test]
fn the_log_pane_follows_the_next_build_of_its_target() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["old".into()],
        },
    );
    let seq = m.snapshot.as_ref().unwrap().seq;
    let cmds = update(
        &mut m,
        Msg::Stream(StreamItem::Event {
            seq: seq + 1,
            event: Event::Queued {
                build: QueuedBuild {
                    id: "b9".into(),
                    package: "linuxkit/alpine".into(),
                    arch: "amd64".into(),
                    tag: tag("4f2a9c1be07d3355"),
                    reason: "requested".into(),
                },
            },
        }),
    );
    assert_eq!(cmds, vec![Cmd::FollowLog("b9".into())]);
    assert!(m.log.lines.is_empty());
    // Started for the same build does not restart the stream.
    let cmds = update(
        &mut m,
        Msg::Stream(StreamItem::Event {
            seq: seq + 2,
            event: Event::Started {
                build: RunningBuild {
                    id: "b9".into(),
                    package: "linuxkit/alpine".into(),
                    arch: "amd64".into(),
                    tag: tag("4f2a9c1be07d3355"),
                    builder: "native".into(),
                    started_at_ms: T0,
                    progress: None,
                },
            },
        }),
    );
    assert!(cmds.is_empty());
}

#[test]
fn a_gap_in_event_numbers_reconnects_instead_of_guessing() {
    let mut m = model();
    let before = m.snapshot.clone();
    let seq = before.as_ref().unwrap().seq;
    let cmds = update(
        &mut m,
        Msg::Stream(StreamItem::Event {
            seq: seq + 2,
            event: Event::WatchRecovered,
        }),
    );
    assert_eq!(cmds, vec![Cmd::Reconnect]);
    assert_eq!(m.snapshot, before);
}

#[test]
fn keys_r_build_shift_r_force_c_cancel_g_gc() {
    let mut m = model();
    update(&mut m, ch('j'));
    assert_eq!(
        update(&mut m, ch('r')),
        vec![Cmd::Build(BuildRequest {
            package: "linuxkit/hello".into(),
            arch: Some("amd64".into()),
            force: false,
            builder: None,
        })]
    );
    assert_eq!(
        update(&mut m, ch('R')),
        vec![Cmd::Build(BuildRequest {
            package: "linuxkit/hello".into(),
            arch: Some("amd64".into()),
            force: true,
            builder: None,
        })]
    );
    assert_eq!(
        update(&mut m, ch('c')),
        vec![Cmd::Cancel(CancelRequest {
            build: Some("b4".into()),
            package: None,
            arch: None
        })]
    );
    // Nothing to cancel on a finished target.
    update(&mut m, ch('k'));
    assert!(update(&mut m, ch('c')).is_empty());
    assert!(
        m.notice
            .as_ref()
            .unwrap()
            .text
            .contains("nothing to cancel")
    );
    assert_eq!(update(&mut m, ch('g')), vec![Cmd::Gc]);
}

#[test]
fn action_results_show_until_the_next_key() {
    let mut m = model();
    update(
        &mut m,
        Msg::Failed(crate::client::ClientError::Status {
            status: http::StatusCode::NOT_FOUND,
            message: "no package".into(),
        }),
    );
    assert!(m.notice.as_ref().unwrap().error);
    update(&mut m, ch('z'));
    assert_eq!(m.notice, None);
}

#[test]
fn filter_narrows_rows_and_keeps_a_valid_selection() {
    let mut m = model();
    update(&mut m, ch('f'));
    assert_eq!(m.input, Input::Filter);
    type_text(&mut m, "ru");
    assert_eq!(m.rows().len(), 1);
    assert_eq!(m.selected.as_deref(), Some("linuxkit/runc"));
    // While typing, keys are text: q does not quit.
    assert!(update(&mut m, ch('q')).is_empty());
    assert!(!m.quit);
    assert!(m.rows().is_empty());
    update(&mut m, key(KeyCode::Backspace));
    update(&mut m, key(KeyCode::Enter));
    assert_eq!(m.input, Input::Keys);
    assert_eq!(m.filter, "ru");
    update(&mut m, key(KeyCode::Esc));
    assert_eq!(m.filter, "");
    assert_eq!(m.rows().len(), 4);
}

fn with_log(lines: usize) -> Model {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    let lines = (0..lines).map(|i| format!("line {i}")).collect();
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines,
        },
    );
    m
}

#[test]
fn a_build_s_escape_codes_do_not_reach_the_screen() {
    let mut m = with_log(0);
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec![
                "\u{1b}[31merror:\u{1b}[0m red".into(),
                " 10%\r 60%\r100%".into(),
            ],
        },
    );
    assert_eq!(m.log.lines, ["error: red", "100%"]);
}

#[test]
fn the_log_keeps_the_newest_lines_only() {
    let mut m = with_log(LOG_CAPACITY + 250);
    assert_eq!(m.log.lines.len(), LOG_CAPACITY);
    assert_eq!(m.log.dropped, 250);
    assert_eq!(m.log.lines.front().map(String::as_str), Some("line 250"));
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["last".into()],
        },
    );
    assert_eq!(m.log.lines.back().map(String::as_str), Some("last"));
}

#[test]
fn scrolling_stops_following_and_end_resumes() {
    let mut m = with_log(100);
    update(&mut m, key(KeyCode::PageUp));
    assert!(m.log.scroll > 0);
    let at = m.log.scroll;
    // New lines keep the view where the reader is.
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["a".into(), "b".into()],
        },
    );
    assert_eq!(m.log.scroll, at + 2);
    update(&mut m, key(KeyCode::End));
    assert_eq!(m.log.scroll, 0);
    update(&mut m, key(KeyCode::Home));
    assert_eq!(m.log.scroll, 101);
    // Tab gives j/k to the log.
    update(&mut m, key(KeyCode::Tab));
    update(&mut m, ch('j'));
    assert_eq!(m.log.scroll, 100);
}

#[test]
fn the_mouse_wheel_scrolls_the_pane_under_it() {
    let mut m = with_log(100);
    let areas = crate::ui::layout(m.area, &m);
    let wheel = |kind, column, row| {
        Msg::Mouse(MouseEvent {
            kind,
            column,
            row,
            modifiers: KeyModifiers::NONE,
        })
    };
    update(
        &mut m,
        wheel(MouseEventKind::ScrollUp, areas.log.x + 2, areas.log.y + 2),
    );
    assert_eq!(m.log.scroll, 3);
    update(
        &mut m,
        wheel(MouseEventKind::ScrollDown, areas.log.x + 2, areas.log.y + 2),
    );
    assert_eq!(m.log.scroll, 0);
    update(
        &mut m,
        wheel(
            MouseEventKind::ScrollDown,
            areas.packages.x + 2,
            areas.packages.y + 2,
        ),
    );
    assert_eq!(m.selected.as_deref(), Some("linuxkit/hello"));
}

#[test]
fn search_jumps_to_matches_newest_first() {
    let mut m = with_log(50);
    update(&mut m, ch('/'));
    type_text(&mut m, "LINE 1");
    update(&mut m, key(KeyCode::Enter));
    // Newest match of "line 1" (case-insensitive) is line 19: 30 lines above the bottom.
    assert_eq!(m.log.scroll, 30);
    assert_eq!((m.log.current, m.log.matches), (Some(11), 11));
    // N: the previous (older) match, as in less and vim; n: the next one.
    update(&mut m, ch('N'));
    assert_eq!(m.log.scroll, 31, "line 18");
    assert_eq!(m.log.current, Some(10));
    update(&mut m, ch('n'));
    assert_eq!(m.log.scroll, 30, "back to line 19");
    // Past the newest, n wraps around to the oldest (line 1).
    update(&mut m, ch('n'));
    assert_eq!(m.log.scroll, 48);
    assert_eq!(m.log.current, Some(1));
    update(&mut m, ch('/'));
    type_text(&mut m, "nope");
    update(&mut m, key(KeyCode::Enter));
    assert!(m.notice.as_ref().unwrap().text.contains("not found"));
}

#[test]
fn disconnect_keeps_the_last_state_and_says_so() {
    let mut m = model();
    update(
        &mut m,
        Msg::Disconnected {
            error: "connection refused".into(),
            attempt: 2,
        },
    );
    assert!(matches!(m.conn, Conn::Disconnected { attempt: 2, .. }));
    assert!(m.snapshot.is_some());
    assert!(!m.animating());
    update(
        &mut m,
        Msg::Stream(StreamItem::Snapshot {
            snapshot: Box::new(snapshot()),
        }),
    );
    assert_eq!(m.conn, Conn::Connected);
}

#[test]
fn help_and_quit() {
    let mut m = model();
    update(&mut m, ch('?'));
    assert!(m.help);
    assert!(update(&mut m, ch('x')).is_empty());
    assert!(!m.help);
    assert_eq!(update(&mut m, ch('q')), vec![Cmd::Quit]);
    assert!(m.quit);
    let mut m = model();
    let ctrl_c = Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    assert_eq!(update(&mut m, ctrl_c), vec![Cmd::Quit]);
}

#[test]
fn resize_is_remembered_for_layout() {
    let mut m = model();
    update(&mut m, Msg::Resize(100, 40));
    assert_eq!(m.area, Rect::new(0, 0, 100, 40));
}

#[test]
fn a_restarted_kilnd_closes_the_log_of_the_old_one() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    update(
        &mut m,
        Msg::Disconnected {
            error: "x".into(),
            attempt: 1,
        },
    );
    let mut same = snapshot();
    update(
        &mut m,
        Msg::Stream(StreamItem::Snapshot {
            snapshot: Box::new(same.clone()),
        }),
    );
    assert_eq!(
        m.log.build,
        Some("b1".into()),
        "a fresh snapshot of the same kilnd keeps it"
    );
    same.pid += 1;
    update(
        &mut m,
        Msg::Stream(StreamItem::Snapshot {
            snapshot: Box::new(same),
        }),
    );
    assert_eq!(m.log.build, None);
}
