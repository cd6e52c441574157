//! The view: a pure function of the [`Model`], one module per pane. Drawing never
//! changes the model; the same layout function tells `update` where the panes are.

mod activity;
mod cache;
pub mod fmt;
mod footer;
mod help;
pub mod log;
mod packages;
mod title;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};

use crate::app::{Input, Model};

/// Where each pane goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Areas {
    pub title: Rect,
    pub packages: Rect,
    pub log: Rect,
    pub cache: Rect,
    pub activity: Rect,
    /// The last action's result or the line being typed (height 0 when there is none).
    pub message: Rect,
    pub footer: Rect,
}

/// The width of the cache pane.
const CACHE_WIDTH: u16 = 28;

/// Splits the screen. The packages table takes what its rows need, up to 45% of the
/// height; the log and cache panes share the rest.
pub fn layout(area: Rect, model: &Model) -> Areas {
    let rows = u16::try_from(model.row_count()).unwrap_or(u16::MAX);
    let max_top = (area.height.saturating_mul(45) / 100).max(5);
    let top = rows.saturating_add(3).clamp(5, max_top);
    let message = u16::from(model.notice.is_some() || model.input != Input::Keys);
    let [title, packages, bottom, activity, message, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(top),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(message),
        Constraint::Length(1),
    ])
    .areas(area);
    let cache_width = if bottom.width >= 60 { CACHE_WIDTH } else { 0 };
    let [log, cache] =
        Layout::horizontal([Constraint::Min(20), Constraint::Length(cache_width)]).areas(bottom);
    Areas {
        title,
        packages,
        log,
        cache,
        activity,
        message,
        footer,
    }
}

/// Draws the whole screen.
pub fn view(model: &Model, frame: &mut Frame) {
    let areas = layout(frame.area(), model);
    title::draw(model, frame, areas.title);
    packages::draw(model, frame, areas.packages);
    log::draw(model, frame, areas.log);
    if areas.cache.width > 0 {
        cache::draw(model, frame, areas.cache);
    }
    activity::draw(model, frame, areas.activity);
    footer::draw_message(model, frame, areas.message);
    footer::draw(frame, areas.footer);
    if model.help {
        help::draw(frame, frame.area());
    }
}

/// The style of a pane border, brighter when the pane has the focus.
fn border(focused: bool) -> Style {
    if focused {
        Style::new().fg(Color::Cyan)
    } else {
        Style::new().fg(Color::DarkGray)
    }
}

fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

#[cfg(test)]
mod tests;
