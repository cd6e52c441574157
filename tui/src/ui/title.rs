//! The title line: the workspace, the registry, the connection.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::{bold, dim};
use crate::app::{Conn, Model};

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let (state, style) = match &model.conn {
        Conn::Connected => ("● connected".to_owned(), Style::new().fg(Color::Green)),
        Conn::Connecting => ("◌ connecting…".to_owned(), Style::new().fg(Color::Yellow)),
        Conn::Disconnected { attempt, .. } => (
            format!("✗ disconnected, retrying ({attempt})"),
            Style::new().fg(Color::Red),
        ),
    };
    let width = u16::try_from(state.chars().count()).unwrap_or(u16::MAX);
    let [left, right] =
        Layout::horizontal([Constraint::Min(0), Constraint::Length(width)]).areas(area);
    let mut spans = vec![Span::styled("kiln ", bold())];
    if let Some(s) = &model.snapshot {
        let roots: Vec<String> = s.roots.iter().map(|r| r.display().to_string()).collect();
        spans.push(Span::raw(roots.join(" ")));
        if !s.registry.is_empty() {
            spans.push(Span::styled("  registry ", dim()));
            spans.push(Span::raw(s.registry.join(" ")));
        }
    } else {
        spans.push(Span::styled(model.socket.display().to_string(), dim()));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), left);
    frame.render_widget(Paragraph::new(Span::styled(state, style)), right);
}
