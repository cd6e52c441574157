//! View snapshot tests on ratatui's TestBackend, and the log-flood test. Durations,
//! clock times, hashes (digests and tags) and socket paths are filtered out of the
//! snapshots, so a fixture's timing or content hash changing does not churn them.

use crossterm::event::KeyCode;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::*;
use crate::app::{LOG_CAPACITY, Model, Msg, update};
use crate::testing::*;

/// Asserts a screen snapshot with the unstable parts masked.
macro_rules! assert_screen {
    ($name:literal, $screen:expr) => {
        insta::assert_snapshot!($name, redact(&$screen))
    };
    ($screen:expr) => {
        insta::assert_snapshot!(redact(&$screen))
    };
}

/// Masks hashes (digests, tags: 12+ lowercase hex digits) with `#`, durations
/// (`850ms`, `1.5s`, `2m03s`, `1h02m`) with `~` and clock times (`HH:MM:SS`) with `9`,
/// keeping every character in its column so the layout stays reviewable.
fn redact(screen: &str) -> String {
    fn is_duration(t: &str) -> bool {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some(n) = t.strip_suffix("ms") {
            return digits(n);
        }
        if let Some((h, m)) = t.split_once('h') {
            return digits(h) && m.len() == 3 && m.ends_with('m') && digits(&m[..2]);
        }
        if let Some((m, s)) = t.split_once('m') {
            return digits(m) && s.len() == 3 && s.ends_with('s') && digits(&s[..2]);
        }
        if let Some(n) = t.strip_suffix('s') {
            let (a, b) = n.split_once('.').unwrap_or((n, "0"));
            return digits(a) && digits(b);
        }
        false
    }
    let mut out = String::with_capacity(screen.len());
    for line in screen.lines() {
        let chars: Vec<char> = line.chars().collect();
        let mut masked = chars.clone();
        // Clock times.
        for i in 0..chars.len().saturating_sub(7) {
            let w = &chars[i..i + 8];
            let d = |j: usize| w[j].is_ascii_digit();
            if d(0) && d(1) && w[2] == ':' && d(3) && d(4) && w[5] == ':' && d(6) && d(7) {
                for c in &mut masked[i..i + 8] {
                    if *c != ':' {
                        *c = '9';
                    }
                }
            }
        }
        // Tokens of letters, digits and dots.
        let mut i = 0;
        while i < chars.len() {
            if !(chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            let token: String = chars[start..i].iter().collect();
            let hash = token.len() >= 12
                && token
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            let mask = if hash {
                Some('#')
            } else if is_duration(&token) {
                Some('~')
            } else {
                None
            };
            if let Some(m) = mask {
                for c in &mut masked[start..i] {
                    *c = m;
                }
            }
        }
        out.extend(masked);
        out.push('\n');
    }
    out
}

#[test]
fn redaction_keeps_columns() {
    assert_eq!(
        redact("│ab 4f2a9c1be07d 2.3s 800ms 2m03s 1h02m 12s 21:13:20 UTC x1.5"),
        "│ab ############ ~~~~ ~~~~~ ~~~~~ ~~~~~ ~~~ 99:99:99 UTC x1.5\n"
    );
}

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
    assert_screen!(render(&model(), 80, 24));
}

#[test]
fn dashboard_120x32() {
    let mut m = model();
    update(&mut m, Msg::Resize(120, 32));
    assert_screen!(render(&m, 120, 32));
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
    assert_screen!(render(&m, 80, 24));
}

#[test]
fn package_error_shows_in_the_log_pane() {
    let mut m = model();
    for _ in 0..3 {
        update(&mut m, ch('j'));
    }
    assert_screen!(render(&m, 80, 24));
}

#[test]
fn filter_prompt() {
    let mut m = model();
    update(&mut m, ch('f'));
    type_text(&mut m, "hel");
    assert_screen!(render(&m, 80, 24));
}

#[test]
fn help_overlay() {
    let mut m = model();
    update(&mut m, ch('?'));
    assert_screen!(render(&m, 80, 24));
}

#[test]
fn connecting_then_disconnected() {
    let mut m = Model::new(
        "/run/user/0/kiln/kilnd.sock".into(),
        ratatui::layout::Rect::new(0, 0, 80, 24),
    );
    assert_screen!("connecting", render(&m, 80, 24));
    update(
        &mut m,
        Msg::Disconnected {
            error: "connection refused (os error 111)".into(),
            attempt: 3,
        },
    );
    assert_screen!("disconnected", render(&m, 80, 24));
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
            assert!(log::visible(&m, log_height, 78).len() <= log_height);
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

#[test]
fn last_and_digest_are_the_selected_arch_s() {
    // linuxkit/init: amd64 failed, arm64 is in the cache as digest c…; each arch is its
    // own image, so the row shows the selected column's digest, never another arch's.
    let mut m = model();
    let init_row = |m: &Model| {
        render(m, 120, 32)
            .lines()
            .find(|l| l.contains("linuxkit/init"))
            .map(str::to_owned)
            .unwrap()
    };
    let amd64 = init_row(&m);
    assert!(!amd64.contains("cccccccccccc"), "{amd64}");
    assert!(
        amd64.trim_end_matches(['│', ' ']).ends_with(" -"),
        "{amd64}"
    );
    update(&mut m, key(KeyCode::Right));
    let arm64 = init_row(&m);
    assert!(arm64.contains("cccccccccccc"), "{arm64}");
}

/// Applies `event` to the model as the next one of the stream.
fn apply(m: &mut Model, event: kiln_shared::protocol::Event) -> Vec<crate::app::Cmd> {
    let seq = m.snapshot.as_ref().unwrap().seq + 1;
    update(
        m,
        Msg::Stream(kiln_shared::protocol::StreamItem::Event { seq, event }),
    )
}

/// The screen's text with the style of the cell where `needle` starts.
fn style_at(t: &Terminal<TestBackend>, needle: &str) -> ratatui::style::Style {
    let s = screen(t);
    let (y, line) = s
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{s}"));
    let byte = line.find(needle).unwrap();
    let x = line[..byte].chars().count();
    t.backend().buffer()[(x as u16, y as u16)].style()
}

#[test]
fn long_log_lines_wrap_and_errors_are_red() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    let long = format!("error: {} THE-END", "word ".repeat(30));
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines: vec!["#1 [1/2] FROM scratch".into(), long, "done".into()],
        },
    );
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| view(&m, f)).unwrap();
    let s = screen(&t);
    assert!(s.contains("THE-END"), "the end of a long line is cut:\n{s}");
    assert_eq!(
        style_at(&t, "error: word").fg,
        Some(ratatui::style::Color::Red)
    );
    assert_eq!(style_at(&t, "THE-END").fg, Some(ratatui::style::Color::Red));
    assert_ne!(style_at(&t, "done").fg, Some(ratatui::style::Color::Red));
    assert_screen!(s);
}

#[test]
fn a_failed_build_s_log_is_titled_failed() {
    let mut m = model();
    // linuxkit/init amd64: build b3 failed.
    update(&mut m, ch('j'));
    update(&mut m, ch('j'));
    update(&mut m, key(KeyCode::Enter));
    assert_eq!(m.log.build, Some("b3".into()));
    update(&mut m, Msg::LogEnded { build: "b3".into() });
    let s = render(&m, 100, 24);
    assert!(s.contains("linuxkit/init amd64 · build b3 · failed"), "{s}");
    // An ok build's ended log is done.
    update(&mut m, ch('k'));
    update(&mut m, ch('k'));
    update(&mut m, Msg::LogEnded { build: "b1".into() });
    let s = render(&m, 100, 24);
    assert!(s.contains("linuxkit/alpine amd64 · build b1 · done"), "{s}");
}

#[test]
fn a_dirty_tag_does_not_look_like_the_clean_one() {
    let mut m = model();
    let clean = render(&m, 120, 32);
    let dirty: kiln_shared::reference::Tag =
        "4f2a9c1be07d33554f2a9c1be07d33554f2a9c1b-dirty-1a2b3c4"
            .parse()
            .unwrap();
    apply(
        &mut m,
        kiln_shared::protocol::Event::TargetPlanned {
            package: "linuxkit/alpine".into(),
            arch: "amd64".into(),
            tag: dirty,
        },
    );
    let s = render(&m, 120, 32);
    let row = |s: &str| {
        s.lines()
            .find(|l| l.contains("linuxkit/alpine"))
            .unwrap()
            .to_owned()
    };
    assert!(row(&s).contains("4f2a9c1b-dirty-1a2b3c4"), "{s}");
    assert_ne!(row(&s), row(&clean));
}

#[test]
fn the_selected_arch_shows_without_colour() {
    let mut m = model();
    let header = |m: &Model| {
        render(m, 100, 24)
            .lines()
            .find(|l| l.contains("PACKAGE"))
            .unwrap()
            .to_owned()
    };
    assert!(header(&m).contains("[amd64]") && !header(&m).contains("[arm64]"));
    update(&mut m, key(KeyCode::Right));
    assert!(header(&m).contains("[arm64]") && !header(&m).contains("[amd64]"));
}

#[test]
fn the_footer_keeps_the_keys_while_a_message_shows() {
    let mut m = model();
    update(&mut m, ch('r'));
    assert!(m.notice.is_some());
    update(
        &mut m,
        Msg::Failed(crate::client::ClientError::Status {
            status: http::StatusCode::NOT_FOUND,
            message: "no package \"linuxkit/alpine\": a long reason".into(),
        }),
    );
    let s = render(&m, 80, 24);
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[23].contains("? help") && lines[23].contains("q quit"),
        "{s}"
    );
    assert!(lines[22].contains("a long reason"), "{s}");
    // Typing a filter keeps them too.
    update(&mut m, ch('f'));
    let s = render(&m, 80, 24);
    assert!(s.lines().nth(23).unwrap().contains("q quit"), "{s}");
    assert!(s.lines().nth(22).unwrap().starts_with("filter:"), "{s}");
}

#[test]
fn a_search_counts_its_matches_in_the_title() {
    let mut m = model();
    update(&mut m, key(KeyCode::Enter));
    let lines = (0..30).map(|i| format!("step {i}")).collect();
    update(
        &mut m,
        Msg::LogLines {
            build: "b1".into(),
            lines,
        },
    );
    update(&mut m, ch('/'));
    type_text(&mut m, "step 1");
    update(&mut m, key(KeyCode::Enter));
    // step 1, step 10..19: 11 matches; the newest first.
    assert!(render(&m, 100, 24).contains("/step 1 11/11"));
    update(&mut m, ch('N'));
    assert!(render(&m, 100, 24).contains("/step 1 10/11"));
    update(&mut m, ch('n'));
    assert!(render(&m, 100, 24).contains("/step 1 11/11"));
}

#[test]
fn upstream_states_and_pulled_targets_are_drawn() {
    use kiln_shared::protocol::{BuildOutcome, BuiltBy, Event, UpstreamInfo};
    let mut m = model();
    apply(
        &mut m,
        Event::Upstreams {
            upstreams: vec![
                UpstreamInfo {
                    name: "127.0.0.1:5001".into(),
                    push: true,
                    state: "up".into(),
                    error: None,
                },
                UpstreamInfo {
                    name: "team.example".into(),
                    push: false,
                    state: "down".into(),
                    error: Some("connect timed out".into()),
                },
            ],
        },
    );
    let mut pulled = summary("b6", BuildOutcome::Ok, 120);
    pulled.builder = Some(BuiltBy::Upstream);
    pulled.pulled_from = Some("127.0.0.1:5001".into());
    apply(
        &mut m,
        Event::Finished {
            package: "linuxkit/alpine".into(),
            arch: "arm64".into(),
            summary: pulled,
        },
    );
    update(&mut m, key(KeyCode::Right));
    let s = render(&m, 100, 30);
    assert!(s.contains("● up 127.0.0.1:5001 (push)"), "{s}");
    assert!(s.contains("✗ down team.example"), "{s}");
    assert!(s.contains("connect timed out"), "{s}");
    assert!(
        s.contains("linuxkit/alpine arm64: pulled from 127.0.0.1:5001 in 120 ms"),
        "{s}"
    );
    // A built target says it was built.
    update(&mut m, key(KeyCode::Left));
    let s = render(&m, 100, 30);
    assert!(
        s.contains("linuxkit/alpine amd64: built by native in"),
        "{s}"
    );
}

/// With more packages than fit, the rows around the selection are drawn (and only they
/// are built): moving down past the screen scrolls the table with it.
#[test]
fn many_packages_scroll_with_the_selection() {
    let mut m = model();
    for i in 0..300 {
        apply(
            &mut m,
            kiln_shared::protocol::Event::PackageAdded {
                package: kiln_shared::protocol::PackageInfo {
                    name: format!("many/p{i:03}"),
                    dir: format!("/ws/many/p{i:03}").into(),
                    tag: Some(tag("4f2a9c1be07d3355")),
                    archs: vec!["amd64".into()],
                },
            },
        );
    }
    let first = render(&m, 80, 24);
    assert!(first.contains("many/p000"), "{first}");
    for _ in 0..150 {
        update(&mut m, key(KeyCode::Down));
    }
    let moved = render(&m, 80, 24);
    let selected = moved
        .lines()
        .find(|l| l.contains('▶'))
        .unwrap_or_else(|| panic!("no selected row:\n{moved}"));
    assert!(selected.contains("many/p"), "{moved}");
    assert!(!moved.contains("many/p000"), "{moved}");
}
