//! View snapshot tests on ratatui's TestBackend, and the log-flood test. The fixtures
//! (testing.rs) fix every time, duration and digest, so the screens are stable.

use crossterm::event::KeyCode;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::*;
use crate::app::{LOG_CAPACITY, Model, Msg, update};
use crate::testing::*;

fn render(model: &Model, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| view(model, f)).unwrap();
    screen(&t)
}

fn screen(t: &Terminal<TestBackend>) -> String {
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[test]
fn dashboard_80x24() {
    insta::assert_snapshot!(render(&model(), 80, 24));
}

#[test]
fn dashboard_120x32() {
    let mut m = model();
    update(&mut m, Msg::Resize(120, 32));
    insta::assert_snapshot!(render(&m, 120, 32));
}

#[test]
fn log_open_with_a_search() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    let lines = (1..=40)
        .map(|i| format!("#{i} [amd64 2/4] COPY . / step output {i}"))
        .collect();
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines,
        },
    );
    update(&mut m, ch('/'));
    type_text(&mut m, "output 25");
    update(&mut m, key(KeyCode::Enter));
    insta::assert_snapshot!(render(&m, 80, 24));
}

#[test]
fn package_error_shows_in_the_log_pane() {
    let mut m = model();
    for _ in 0..3 {
        update(&mut m, ch('j'));
    }
    insta::assert_snapshot!(render(&m, 80, 24));
}

#[test]
fn filter_prompt() {
    let mut m = model();
    update(&mut m, ch('f'));
    type_text(&mut m, "hel");
    insta::assert_snapshot!(render(&m, 80, 24));
}

#[test]
fn help_overlay() {
    let mut m = model();
    update(&mut m, ch('?'));
    insta::assert_snapshot!(render(&m, 80, 24));
}

#[test]
fn connecting_then_disconnected() {
    let mut m = Model::new(
        "/run/user/0/kiln/kilnd.sock".into(),
        ratatui::layout::Rect::new(0, 0, 80, 24),
    );
    insta::assert_snapshot!("connecting", render(&m, 80, 24));
    update(
        &mut m,
        Msg::Disconnected {
            error: "connection refused (os error 111)".into(),
            attempt: 3,
        },
    );
    insta::assert_snapshot!("disconnected", render(&m, 80, 24));
}

#[test]
fn disconnected_keeps_the_last_state() {
    let mut m = model();
    update(
        &mut m,
        Msg::Disconnected {
            error: "kilnd closed the event stream".into(),
            attempt: 1,
        },
    );
    let s = render(&m, 80, 24);
    assert!(
        s.lines().next().unwrap().contains("disconnected, retrying"),
        "{s}"
    );
    assert!(s.contains("linuxkit/alpine"));
}

#[test]
fn tiny_terminals_do_not_panic() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["x".repeat(500)],
        },
    );
    for (w, h) in [(80, 24), (79, 23), (40, 10), (20, 5), (1, 1), (0, 0)] {
        update(&mut m, Msg::Resize(w, h));
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| view(&m, f)).unwrap();
    }
}

/// 10,000 log lines a second for 6 simulated seconds, drawn at 100 frames a second (as
/// the dashboard batches them): the buffer stays at its cap, its allocation stops
/// growing, each frame looks at no more lines than fit, and the screen shows the newest
/// line after every frame.
#[test]
fn ten_thousand_log_lines_a_second_stay_bounded() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let log_height = usize::from(layout(m.area, &m).log.height - 2);
    let mut capacity_after_warmup = None;
    let mut n = 0u64;
    for second in 0..6 {
        for _frame in 0..100 {
            let lines: Vec<String> = (0..100)
                .map(|_| {
                    n += 1;
                    format!("#{n:07} RUN make -j4 all 2>&1 | tee build.log  [{second}s]")
                })
                .collect();
            update(
                &mut m,
                Msg::LogLines {
                    build: "b1".into(),
                    lines,
                },
            );
            assert!(m.dirty);
            t.draw(|f| view(&m, f)).unwrap();
            m.dirty = false;
            assert!(log::visible(&m, log_height).len() <= log_height);
            let newest = format!("#{n:07}");
            assert!(
                screen(&t).contains(&newest),
                "the newest line {newest} is on screen"
            );
        }
        assert!(m.log.lines.len() <= LOG_CAPACITY);
        if second == 1 {
            capacity_after_warmup = Some(m.log.lines.capacity());
        }
    }
    assert_eq!(n, 60_000);
    assert_eq!(m.log.lines.len(), LOG_CAPACITY);
    assert_eq!(m.log.dropped, 60_000 - LOG_CAPACITY as u64);
    assert_eq!(
        Some(m.log.lines.capacity()),
        capacity_after_warmup,
        "the buffer stopped growing"
    );
    assert!(m.log.lines.capacity() < 2 * LOG_CAPACITY);
}
