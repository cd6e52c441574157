//! The log pane: the open build's newest lines, following, scrolled, searched.
//!
//! Only the lines that fit are looked at: a frame costs the pane's height, whatever the
//! number of lines held.

use std::ops::Range;

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};

use super::{border, dim};
use crate::app::{Focus, Model};

/// The indices of the lines shown in a pane `height` lines high.
pub fn visible(model: &Model, height: usize) -> Range<usize> {
    let len = model.log.lines.len();
    let end = len - model.log.scroll.min(len);
    end.saturating_sub(height)..end
}

fn highlighted(line: &str, needle: &str) -> Line<'static> {
    if needle.is_empty() {
        return Line::raw(line.to_owned());
    }
    // ASCII case folding keeps byte offsets, so the matches index the original line.
    let hay = line.to_ascii_lowercase();
    let needle = needle.to_ascii_lowercase();
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some(i) = hay[at..].find(&needle) {
        let start = at + i;
        let end = start + needle.len();
        spans.push(Span::raw(line[at..start].to_owned()));
        spans.push(Span::styled(
            line[start..end].to_owned(),
            Style::new().bg(Color::Yellow).fg(Color::Black),
        ));
        at = end;
    }
    spans.push(Span::raw(line[at..].to_owned()));
    Line::from(spans)
}

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let log = &model.log;
    let focused = model.focus == Focus::Log;
    let mut title = String::from(" log ");
    if let (Some((p, a)), Some(b)) = (&log.target, &log.build) {
        title.push_str(&format!("{p} {a} · build {b} · "));
        title.push_str(if log.error.is_some() {
            "unavailable "
        } else if log.scroll > 0 {
            "scrolled "
        } else if log.ended {
            "done "
        } else {
            "following "
        });
    }
    let block = Block::bordered().title(title).border_style(border(focused));
    let inner = block.inner(area);
    let height = usize::from(inner.height);
    let lines: Vec<Line> = if log.build.is_none() {
        let selected_error = model
            .selected
            .as_ref()
            .and_then(|n| model.snapshot.as_ref()?.packages.get(n)?.error.clone());
        if let Some(e) = selected_error {
            let para = Paragraph::new(Line::styled(e, Style::new().fg(Color::Red)))
                .wrap(Wrap { trim: false })
                .block(block);
            frame.render_widget(para, area);
            return;
        }
        vec![Line::styled("Enter opens the selected build's log", dim())]
    } else {
        let range = visible(model, height);
        let mut out = Vec::with_capacity(height);
        if range.start == 0 && log.dropped > 0 {
            out.push(Line::styled(
                format!("… {} earlier lines dropped", log.dropped),
                dim(),
            ));
        }
        out.extend(log.lines.range(range).map(|l| highlighted(l, &log.search)));
        if let Some(e) = &log.error {
            out.push(Line::styled(e.clone(), Style::new().fg(Color::Red)));
        }
        if out.len() > height {
            out.drain(..out.len() - height);
        }
        out
    };
    frame.render_widget(Paragraph::new(lines).block(block), area);
}
