//! The log pane: the open build's newest lines, following, scrolled, searched; long
//! lines wrap, errors and warnings stand out, the title says how the build ended.
//!
//! Only the lines that fit are looked at: a frame costs the pane's height, whatever the
//! number of lines held.

use std::ops::Range;

use kiln_shared::protocol::{BuildOutcome, TargetStatus};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use unicode_width::UnicodeWidthChar;

use super::{border, dim, fmt};
use crate::app::{Focus, Model};

/// Spaces a tab takes.
const TAB: &str = "    ";

/// The rows a line takes in a pane `width` columns wide.
fn rows(line: &str, width: usize) -> usize {
    let w: usize = line.chars().map(char_width).sum();
    w.div_ceil(width.max(1)).max(1)
}

fn char_width(c: char) -> usize {
    if c == '\t' {
        TAB.len()
    } else {
        c.width().unwrap_or(0)
    }
}

/// The indices of the lines shown in a pane `height` rows high and `width` wide: the
/// newest ones above the scroll position whose wrapped rows fit (the first may be cut).
pub fn visible(model: &Model, height: usize, width: usize) -> Range<usize> {
    let lines = &model.log.lines;
    let end = lines.len() - model.log.scroll.min(lines.len());
    let mut start = end;
    let mut used = 0;
    while start > 0 && used < height {
        start -= 1;
        used += rows(&lines[start], width);
    }
    start..end
}

/// How a log line reads: an error, a warning, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Plain,
}

/// Recognises the error and warning lines of kiln, BuildKit, compilers and package
/// managers: `error: ...`, `ERROR: ...`, `#5 ERROR ...`, `fatal: ...`, `E: ...`,
/// `warning: ...`, `WARN[0000] ...`, `cancelled: ...`.
pub fn severity(line: &str) -> Severity {
    let l = line.trim_start().to_ascii_lowercase();
    // BuildKit prefixes step output with `#N ` (and a time); look past it.
    let body = l
        .strip_prefix('#')
        .and_then(|rest| rest.split_once(' ').map(|(_, b)| b.trim_start()))
        .unwrap_or(&l);
    // A word at the start (before `:`, `[`, a space or the end) or before a colon
    // further on; a one-letter tag (apt's `E:`, `W:`) only before a colon.
    let word = |w: &str| {
        let follows: &[char] = if w.len() == 1 {
            &[':']
        } else {
            &[':', '[', ' ']
        };
        body.strip_prefix(w)
            .is_some_and(|rest| rest.starts_with(follows) || (w.len() > 1 && rest.is_empty()))
            || l.contains(&format!(" {w}:"))
    };
    if ["error", "fatal", "panic", "e"].iter().any(|w| word(w)) || l.contains("error[") {
        Severity::Error
    } else if ["warning", "warn", "w", "cancelled"]
        .iter()
        .any(|w| word(w))
    {
        Severity::Warning
    } else {
        Severity::Plain
    }
}

fn severity_style(s: Severity) -> Style {
    match s {
        Severity::Error => Style::new().fg(Color::Red),
        Severity::Warning => Style::new().fg(Color::Yellow),
        Severity::Plain => Style::new(),
    }
}

/// A log line as rows of at most `width` columns, coloured by its severity, with the
/// search's matches highlighted.
fn wrapped(line: &str, needle: &str, width: usize) -> Vec<Line<'static>> {
    let base = severity_style(severity(line));
    let hit = Style::new()
        .bg(Color::Yellow)
        .fg(Color::Black)
        .add_modifier(Modifier::BOLD);
    // Which bytes are in a match (ASCII case folding keeps byte offsets).
    let mut in_match = vec![false; line.len()];
    if !needle.is_empty() {
        let hay = line.to_ascii_lowercase();
        let needle = needle.to_ascii_lowercase();
        let mut at = 0;
        while let Some(i) = hay[at..].find(&needle) {
            let start = at + i;
            in_match[start..start + needle.len()].fill(true);
            at = start + needle.len();
        }
    }
    let width = width.max(1);
    let mut rows = Vec::new();
    let mut spans: Vec<Span<'static>> = Vec::new();
    let mut run = String::new();
    let mut run_style = base;
    let mut col = 0;
    for (i, c) in line.char_indices() {
        let style = if in_match[i] { hit } else { base };
        let w = char_width(c);
        if col + w > width && col > 0 {
            spans.push(Span::styled(std::mem::take(&mut run), run_style));
            rows.push(Line::from(std::mem::take(&mut spans)));
            col = 0;
        }
        if style != run_style && !run.is_empty() {
            spans.push(Span::styled(std::mem::take(&mut run), run_style));
        }
        run_style = style;
        if c == '\t' {
            run.push_str(TAB);
        } else {
            run.push(c);
        }
        col += w;
    }
    if !run.is_empty() {
        spans.push(Span::styled(run, run_style));
    }
    rows.push(Line::from(spans));
    rows
}

/// How the open build stands, for the title.
fn state_word(model: &Model) -> &'static str {
    let log = &model.log;
    if log.error.is_some() {
        return "unavailable";
    }
    if log.scroll > 0 {
        return "scrolled";
    }
    if !log.ended {
        return "following";
    }
    let outcome = log.target.as_ref().and_then(|(p, a)| {
        let t = model.snapshot.as_ref()?.packages.get(p)?.targets.get(a)?;
        t.last
            .as_ref()
            .filter(|l| Some(&l.id) == log.build.as_ref())
            .map(|l| l.outcome)
    });
    match outcome {
        Some(BuildOutcome::Failed) => "failed",
        Some(BuildOutcome::Cancelled) => "cancelled",
        Some(BuildOutcome::Ok) | None => "done",
    }
}

fn title(model: &Model) -> Line<'static> {
    let log = &model.log;
    let mut spans = vec![Span::raw(" log ")];
    if let Some((p, a)) = &log.target {
        let mut head = format!("{p} {a} · ");
        match &log.build {
            Some(b) => head.push_str(&format!("build {b} · ")),
            None => head.push_str("not built "),
        }
        spans.push(Span::raw(head));
        if log.build.is_some() {
            let word = state_word(model);
            let style = match word {
                "failed" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                "cancelled" => Style::new().fg(Color::Magenta),
                _ => Style::new(),
            };
            spans.push(Span::styled(format!("{word} "), style));
        }
    }
    Line::from(spans)
}

/// The search and where the view is among its matches (`/needle 3/11`), for the
/// bottom border.
fn search_title(model: &Model) -> Option<Line<'static>> {
    let log = &model.log;
    if log.search.is_empty() || log.build.is_none() {
        return None;
    }
    let count = match log.current {
        Some(c) => format!("{c}/{}", log.matches),
        None if log.matches == 1 => "1 match".to_owned(),
        None => format!("{} matches", log.matches),
    };
    Some(Line::from(format!(" /{} {count} (n N) ", fmt::short(&log.search, 24))).right_aligned())
}

/// What the pane says when no build's log is open: the selected package's error, else
/// the selected target's last build in a line, and how to open its log.
fn idle_lines(model: &Model) -> Vec<Line<'static>> {
    let selected = model
        .selected
        .as_ref()
        .and_then(|n| model.snapshot.as_ref()?.packages.get(n));
    if let Some(e) = selected.and_then(|p| p.error.clone()) {
        return vec![Line::styled(e, Style::new().fg(Color::Red))];
    }
    let mut lines = Vec::new();
    // The build that made the target's state (a state served from the cache has none).
    if let (Some(p), Some(arch)) = (selected, model.selected_arch())
        && let Some(t) = p.targets.get(&arch)
    {
        let how = match t.settled_by() {
            Some(last) => Some(fmt::last_build(last)),
            None if t.status == TargetStatus::Ok => Some("in the cache".to_owned()),
            None => None,
        };
        if let Some(how) = how {
            lines.push(Line::raw(format!("{} {arch}: {how}", p.name)));
        }
    }
    if model.log.target.is_some() {
        lines.push(Line::styled(
            "not built by this kilnd yet: r builds it",
            dim(),
        ));
    } else {
        lines.push(Line::styled("Enter opens the selected build's log", dim()));
    }
    lines
}

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let log = &model.log;
    let focused = model.focus == Focus::Log;
    let mut block = Block::bordered()
        .title(title(model))
        .border_style(border(focused));
    if let Some(search) = search_title(model) {
        block = block.title_bottom(search);
    }
    let inner = block.inner(area);
    let (height, width) = (usize::from(inner.height), usize::from(inner.width));
    if log.build.is_none() {
        let para = Paragraph::new(idle_lines(model))
            .wrap(Wrap { trim: false })
            .block(block);
        frame.render_widget(para, area);
        return;
    }
    let range = visible(model, height, width);
    let mut out = Vec::with_capacity(height);
    if range.start == 0 && log.dropped > 0 {
        out.push(Line::styled(
            format!("… {} earlier lines dropped", log.dropped),
            dim(),
        ));
    }
    for l in log.lines.range(range) {
        out.extend(wrapped(l, &log.search, width));
    }
    if let Some(e) = &log.error {
        out.extend(
            wrapped(e, "", width)
                .into_iter()
                .map(|l| l.style(Style::new().fg(Color::Red))),
        );
    }
    if out.len() > height {
        out.drain(..out.len() - height);
    }
    frame.render_widget(Paragraph::new(out).block(block), area);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_warnings_are_told_apart() {
        for l in [
            "error: COPY missing.txt: no such file",
            "#7 ERROR: process \"/bin/sh -c make\" did not complete successfully: exit code: 2",
            "ERROR [2/3] RUN make",
            "fatal: not a git repository",
            "E: Unable to locate package nope",
            "src/main.c:3:1: error: expected ';'",
            "error[E0425]: cannot find value `x`",
        ] {
            assert_eq!(severity(l), Severity::Error, "{l}");
        }
        for l in [
            "warning: unused variable",
            "WARN[0000] no platform given",
            "#3 0.512 W: GPG error",
            "cancelled: superseded by a newer save",
        ] {
            assert_eq!(severity(l), Severity::Warning, "{l}");
        }
        for l in [
            "#5 [2/4] COPY . /",
            "0 errors, 0 warnings",
            "built in 1.5s",
            "Everything is fine",
        ] {
            assert_eq!(severity(l), Severity::Plain, "{l}");
        }
    }

    #[test]
    fn long_lines_wrap_to_the_width() {
        let line = "x".repeat(25);
        let rows = wrapped(&line, "", 10);
        let text: Vec<String> = rows.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["x".repeat(10), "x".repeat(10), "x".repeat(5)]);
        assert_eq!(super::rows(&line, 10), 3);
        // A match that spans a row break is highlighted on both rows.
        let rows = wrapped("aaaaaaaaabbbb", "bb", 10);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].spans[0].content, "bbb");
        assert_eq!(rows[1].spans[0].style.bg, Some(Color::Yellow));
        // Wide characters are not split.
        let rows = wrapped("ab漢字", "", 3);
        let text: Vec<String> = rows.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["ab", "漢", "字"]);
    }
}
