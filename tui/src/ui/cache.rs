//! The cache pane: size against the cap, blobs (and those on demand from upstreams),
//! references, hit ratio, last GC, and the upstream registries with whether each answers.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::symbols;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};

use super::{border, dim, fmt};
use crate::app::Model;

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let block = Block::bordered()
        .title(" cache ")
        .border_style(border(false));
    let Some(s) = &model.snapshot else {
        frame.render_widget(block, area);
        return;
    };
    let c = &s.cache;
    let mut lines = Vec::new();
    let size = match c.bytes_cap {
        Some(cap) => format!("{} / {}", fmt::bytes(c.bytes_used), fmt::bytes(cap)),
        None => format!("{} (no cap)", fmt::bytes(c.bytes_used)),
    };
    lines.push(Line::raw(size));
    if let Some(cap) = c.bytes_cap.filter(|&cap| cap > 0) {
        let width = usize::from(area.width.saturating_sub(2));
        let filled =
            usize::try_from(u128::from(c.bytes_used.min(cap)) * width as u128 / u128::from(cap))
                .unwrap_or(width);
        let ratio = c.bytes_used.saturating_mul(100) / cap;
        let color = if ratio >= 90 {
            Color::Red
        } else if ratio >= 70 {
            Color::Yellow
        } else {
            Color::Green
        };
        lines.push(Line::from(vec![
            Span::styled(
                symbols::line::THICK_HORIZONTAL.repeat(filled),
                Style::new().fg(color),
            ),
            Span::styled(symbols::line::HORIZONTAL.repeat(width - filled), dim()),
        ]));
    }
    lines.push(Line::from(vec![
        Span::raw(format!("{} blobs", c.blobs)),
        Span::styled(" · ", dim()),
        Span::raw(format!("{} refs", c.references)),
    ]));
    if let Some(d) = fmt::on_demand(c) {
        lines.push(Line::styled(format!("+ {d}"), dim()));
    }
    lines.push(Line::raw(match c.hit_ratio() {
        Some(r) => format!(
            "hit ratio {:.0}% ({}/{})",
            r * 100.0,
            c.hits,
            c.hits + c.misses
        ),
        None => "hit ratio -".to_owned(),
    }));
    match &c.last_gc {
        Some(gc) => {
            lines.push(Line::raw(format!(
                "last GC {} UTC",
                fmt::clock(gc.finished_at_ms)
            )));
            lines.push(Line::styled(
                format!(
                    "  freed {}, {} blobs",
                    fmt::bytes(gc.freed_bytes),
                    gc.removed_blobs
                ),
                dim(),
            ));
        }
        None => lines.push(Line::styled("no GC yet", dim())),
    }
    for u in &s.upstreams {
        let (glyph, color) = match u.state.as_str() {
            "up" => ("●", Color::Green),
            "down" => ("✗", Color::Red),
            _ => ("◌", Color::DarkGray),
        };
        let mut spans = vec![
            Span::styled(format!("{glyph} {} ", u.state), Style::new().fg(color)),
            Span::raw(u.name.clone()),
        ];
        if u.push {
            spans.push(Span::styled(" (push)", dim()));
        }
        lines.push(Line::from(spans));
        if let Some(e) = &u.error {
            lines.push(Line::styled(format!("  {e}"), Style::new().fg(Color::Red)));
        }
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block),
        area,
    );
}
