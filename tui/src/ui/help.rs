//! The help overlay.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{bold, border};

const HELP: [(&str, &str); 17] = [
    ("↑ ↓  j k", "select a package (or scroll the log)"),
    ("← →  h l", "select an architecture"),
    ("Tab", "move the focus: packages / log"),
    ("Enter", "open the log; it follows the selection"),
    ("PgUp PgDn", "scroll the log; the wheel too"),
    ("Home End G", "log top / follow new lines"),
    ("/", "search the log (newest match first)"),
    ("n N", "next / previous match (count in title)"),
    ("r", "build the selected target"),
    ("R", "rebuild it, even if cached"),
    ("c", "cancel its build"),
    ("g", "collect garbage in the cache"),
    ("f", "filter packages by name"),
    ("Esc", "clear the filter"),
    ("?", "this help"),
    ("q", "quit"),
    ("", "any key closes this help"),
];

pub(super) fn draw(frame: &mut Frame, area: Rect) {
    let height = u16::try_from(HELP.len()).unwrap_or(u16::MAX) + 2;
    let [v] = Layout::vertical([Constraint::Length(height)])
        .flex(Flex::Center)
        .areas(area);
    let [popup] = Layout::horizontal([Constraint::Length(52)])
        .flex(Flex::Center)
        .areas(v);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<12}"), bold()),
                Span::raw(*what),
            ])
        })
        .collect();
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys ").border_style(border(true))),
        popup,
    );
}
