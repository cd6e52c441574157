//! The packages table: a row per package, a status cell per architecture.

use kiln_shared::digest::Digest;
use kiln_shared::protocol::{BuildSummary, TargetState, TargetStatus};
use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState};

use super::{border, dim, fmt};
use crate::app::{Conn, Focus, Model};

/// A status's glyph and colour.
pub fn glyph(status: TargetStatus) -> (&'static str, Color) {
    match status {
        TargetStatus::Idle => ("·", Color::DarkGray),
        TargetStatus::Queued => ("◌", Color::Yellow),
        TargetStatus::Building => ("⟳", Color::Cyan),
        TargetStatus::Ok => ("✓", Color::Green),
        TargetStatus::Failed => ("✗", Color::Red),
        TargetStatus::Cancelled => ("⊘", Color::Magenta),
    }
}

/// A target's cell; `selected` is `Some(focused)` for the selected one: reversed while
/// the table has the focus, underlined while the log has it.
fn status_cell(
    t: Option<&TargetState>,
    package_error: bool,
    selected: Option<bool>,
) -> Cell<'static> {
    let Some(t) = t else {
        return Cell::from(Span::styled("", dim()));
    };
    let (g, color) = glyph(t.status);
    let word = match (t.status, &t.progress) {
        (TargetStatus::Building, Some(p)) => format!("{}/{}", p.current, p.total),
        (TargetStatus::Idle, _) if package_error => "error".to_owned(),
        (TargetStatus::Cancelled, _) => "cancel".to_owned(),
        (s, _) => format!("{s:?}").to_lowercase(),
    };
    let color = if package_error { Color::Red } else { color };
    let style = match selected {
        Some(true) => Style::new().fg(color).add_modifier(Modifier::REVERSED),
        Some(false) => Style::new().fg(color).add_modifier(Modifier::UNDERLINED),
        None => Style::new().fg(color),
    };
    Cell::from(Span::styled(format!("{g} {word}"), style))
}

/// The LAST, BY and DIGEST cells of a row: the selected architecture's target (each arch
/// has its own image), the duration and builder of the build that made its state (not an
/// earlier build's, nor a cancelled build of another tag: a target served from the cache
/// shows none), and the digest in the cache for its tag.
fn last_and_digest(t: Option<&TargetState>) -> (Option<&BuildSummary>, Option<&Digest>) {
    let last = t.and_then(TargetState::settled_by);
    let digest = t
        .and_then(|t| t.digest.as_ref())
        .or_else(|| last.and_then(|l| l.digest.as_ref()));
    (last, digest)
}

pub(super) fn draw(model: &Model, frame: &mut Frame, area: Rect) {
    let focused = model.focus == Focus::Packages;
    let count = model.row_count();
    let title = if model.filter.is_empty() {
        format!(" packages ({count}) ")
    } else {
        format!(" packages ({count}) filter {:?} ", model.filter)
    };
    let block = Block::bordered().title(title).border_style(border(focused));
    if model.snapshot.is_none() {
        let text = match &model.conn {
            Conn::Disconnected { error, .. } => {
                format!("disconnected, retrying: {error}")
            }
            _ => format!("connecting to kilnd at {}…", model.socket.display()),
        };
        frame.render_widget(Paragraph::new(text).style(dim()).block(block), area);
        return;
    }
    if count == 0 {
        let text = if model.filter.is_empty() {
            "no packages: kilnd finds directories with a build.yml under its roots"
        } else {
            "no package matches the filter (Esc clears it)"
        };
        frame.render_widget(Paragraph::new(text).style(dim()).block(block), area);
        return;
    }
    let archs = model.archs();
    let selected_row = model.selected_row();
    let shown_arch = archs.get(model.arch);
    let mut header = vec![Cell::from("PACKAGE"), Cell::from("TAG")];
    // The selected arch's header is bracketed (visible without colour) and underlined:
    // LAST, BY, DIGEST and the log are about it.
    header.extend(archs.iter().enumerate().map(|(j, a)| {
        if j == model.arch {
            Cell::from(format!("[{a}]")).style(
                Style::new()
                    .add_modifier(Modifier::UNDERLINED | Modifier::BOLD)
                    .fg(Color::Reset),
            )
        } else {
            Cell::from(format!(" {a}"))
        }
    }));
    header.extend([Cell::from("LAST"), Cell::from("BY"), Cell::from("DIGEST")]);
    // Only the rows that fit are built (a frame costs what it shows, not the package
    // count): the window ends at the selected row once it is below the first screen, as
    // ratatui's own scrolling would place it.
    let fit = usize::from(area.height.saturating_sub(3)).max(1);
    let start = selected_row.map_or(0, |r| (r + 1).saturating_sub(fit));
    let shown_rows = model.visible_rows(start, fit);
    let body = shown_rows.iter().enumerate().map(|(i, p)| {
        let i = start + i;
        let error = p.error.is_some();
        let name_style = if error {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        let mut cells = vec![
            Cell::from(Span::styled(p.name.clone(), name_style)),
            Cell::from(Span::styled(
                p.tag
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |t| fmt::tag(t.as_str(), fmt::TAG_WIDTH)),
                dim(),
            )),
        ];
        for (j, a) in archs.iter().enumerate() {
            let sel = (selected_row == Some(i) && j == model.arch).then_some(focused);
            cells.push(status_cell(p.targets.get(a), error, sel));
        }
        let shown = shown_arch.and_then(|a| p.targets.get(a));
        let (last, digest) = last_and_digest(shown);
        // Building: how long so far.
        let started = shown.and_then(|t| model.snapshot.as_ref()?.started_at(t));
        cells.push(Cell::from(match (started, last) {
            (Some(at), _) => fmt::duration_ms(model.now_ms.saturating_sub(at)),
            (None, Some(l)) => fmt::duration_ms(l.duration_ms),
            (None, None) => "-".to_owned(),
        }));
        // Which builder made the image the last build landed (native, docker, cache).
        cells.push(Cell::from(Span::styled(
            last.and_then(|l| l.builder).map_or("-", |b| b.as_str()),
            dim(),
        )));
        cells.push(Cell::from(Span::styled(
            digest.map_or("-", |d| d.short(12)).to_owned(),
            dim(),
        )));
        Row::new(cells)
    });
    // The name column is as wide as the longest name (the rest of the width stays free at
    // the right rather than stretching the names away from their status).
    // Both widths are kept by the model as rows change, not measured here per frame.
    let (name_width, tag_width) = model.row_widths();
    let name_width = name_width.clamp(14, 48);
    // As wide as the shown tags: a dirty tag's `-dirty-` part is never cut.
    let tag_width = tag_width.max(fmt::TAG_WIDTH);
    let mut widths = vec![
        Constraint::Length(u16::try_from(name_width).unwrap_or(14)),
        Constraint::Length(u16::try_from(tag_width).unwrap_or(12)),
    ];
    widths.extend(
        archs
            .iter()
            .map(|a| Constraint::Length(u16::try_from(a.len().max(8) + 2).unwrap_or(10))),
    );
    widths.extend([
        Constraint::Length(7),
        Constraint::Length(6),
        // The digest gives way first when the width is short.
        Constraint::Max(12),
    ]);
    let table = Table::new(body, widths)
        .header(Row::new(header).style(dim()))
        .row_highlight_style(
            Style::new()
                .add_modifier(Modifier::BOLD)
                .bg(Color::Rgb(40, 40, 60)),
        )
        .highlight_symbol(Line::from("▶"))
        .block(block);
    let mut state = TableState::default().with_selected(selected_row.map(|r| r - start));
    frame.render_stateful_widget(table, area, &mut state);
}
