//! The activity line: the queue, the running builds, the last pull, watcher trouble.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::{dim, fmt};
use crate::app::Model;

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let Some(s) = &model.snapshot else {
        return;
    };
    let sep = || Span::styled(" │ ", dim());
    let mut spans = Vec::new();
    if let Some(e) = &s.watch_error {
        spans.push(Span::styled(
            format!("watch: {e}"),
            Style::new().fg(Color::Red),
        ));
        spans.push(sep());
    }
    spans.push(Span::raw(format!("queue {}", s.queue.len())));
    spans.push(sep());
    if s.running.is_empty() {
        spans.push(Span::styled("idle", dim()));
    } else {
        let running: Vec<String> = s
            .running
            .iter()
            .map(|r| {
                let elapsed = model.now_ms.saturating_sub(r.started_at_ms);
                if model.now_ms >= r.started_at_ms && model.now_ms > 0 {
                    format!("{} {} {}", r.package, r.arch, fmt::duration_ms(elapsed))
                } else {
                    format!("{} {}", r.package, r.arch)
                }
            })
            .collect();
        spans.push(Span::styled(
            format!("building {}", running.join(", ")),
            Style::new().fg(Color::Cyan),
        ));
    }
    spans.push(sep());
    match &s.last_pull {
        Some(p) => spans.push(Span::raw(format!(
            "pulled {} {}",
            p.reference,
            fmt::clock(p.at_ms)
        ))),
        None => spans.push(Span::styled("no pulls yet", dim())),
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}
