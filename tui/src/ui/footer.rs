//! The bottom lines: the keys, always, and above them, when there is one, the line being
//! typed (filter, search) or the last action's result.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::{bold, dim};
use crate::app::{Input, Model};

const KEYS: [(&str, &str); 10] = [
    ("↑↓", "move"),
    ("←→", "arch"),
    ("⏎", "log"),
    ("r/R", "build"),
    ("c", "cancel"),
    ("g", "gc"),
    ("f", "filter"),
    ("/", "find"),
    ("?", "help"),
    ("q", "quit"),
];

pub(super) fn draw(frame: &mut Frame, area: Rect) {
    let line = Line::from(
        KEYS.iter()
            .flat_map(|(k, what)| {
                [
                    Span::styled(*k, bold()),
                    Span::styled(format!(" {what} "), dim()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    frame.render_widget(Paragraph::new(line), area);
}

pub(super) fn draw_message(model: &Model, frame: &mut Frame, area: Rect) {
    if area.height == 0 {
        return;
    }
    let line = match model.input {
        Input::Filter | Input::Search => {
            let label = if model.input == Input::Filter {
                "filter: "
            } else {
                "/"
            };
            Line::from(vec![
                Span::styled(label, bold()),
                Span::raw(model.input_buf.clone()),
                Span::styled("▏", Style::new().fg(Color::Cyan)),
                Span::styled("  Enter apply · Esc cancel", dim()),
            ])
        }
        Input::Keys => match &model.notice {
            Some(n) => Line::styled(
                n.text.clone(),
                Style::new().fg(if n.error { Color::Red } else { Color::Green }),
            ),
            None => return,
        },
    };
    frame.render_widget(Paragraph::new(line), area);
}
