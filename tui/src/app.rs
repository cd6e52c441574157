//! The dashboard's state and its one way to change: messages in, [`update`] changes the
//! [`Model`] and returns [`Cmd`]s for the outside world (requests to kilnd, log
//! streams, quitting). The view (`ui`) is a pure function of the model.

use std::collections::VecDeque;
use std::path::PathBuf;

use kiln_shared::error::chain;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEvent, MouseEventKind};
use kiln_shared::protocol::{
    BuildId, BuildRequest, CancelRequest, Event, PackageState, Snapshot, StreamItem, TargetState,
};
use ratatui::layout::{Position, Rect};

mod keys;
mod rows;

use keys::{on_key, on_mouse};
use rows::RowIndex;

use crate::client::ClientError;

/// Log lines the dashboard keeps (the newest).
pub const LOG_CAPACITY: usize = 10_000;
/// Lines a mouse wheel notch scrolls.
const WHEEL_LINES: usize = 3;

/// The connection to kilnd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    Connecting,
    Connected,
    Disconnected { error: String, attempt: u32 },
}

/// Which pane the arrow keys move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Packages,
    Log,
}

/// What typed characters go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Keys,
    Filter,
    Search,
}

/// A line at the bottom: the result of the last action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

/// The log pane: one build's lines, the newest [`LOG_CAPACITY`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPane {
    /// (package, arch) whose builds the pane follows.
    pub target: Option<(String, String)>,
    pub build: Option<BuildId>,
    pub lines: VecDeque<String>,
    /// Lines dropped from the front (here or by kilnd).
    pub dropped: u64,
    /// Lines scrolled up from the bottom; 0 follows new lines.
    pub scroll: usize,
    /// The build's log is complete.
    pub ended: bool,
    pub error: Option<String>,
    /// The last search.
    pub search: String,
    /// Lines held that match the search.
    pub matches: usize,
    /// Which of them (1-based, oldest first) the last `/`, `n` or `N` went to; cleared
    /// when the view moves otherwise.
    pub current: Option<usize>,
}

impl LogPane {
    /// Shows `build` of `target` (or, with no build, says it has none).
    fn reset(&mut self, target: (String, String), build: Option<BuildId>) {
        let search = std::mem::take(&mut self.search);
        *self = LogPane {
            target: Some(target),
            build,
            search,
            ..LogPane::default()
        };
    }

    fn matches(&self, line: &str) -> bool {
        !self.search.is_empty()
            && line
                .to_ascii_lowercase()
                .contains(&self.search.to_ascii_lowercase())
    }

    /// Adds lines as a terminal would show them: the dashboard draws cells, and a
    /// build's own escape codes or carriage returns would scramble them.
    fn push(&mut self, lines: Vec<String>) {
        let added = lines.len();
        for line in lines {
            let line = match kiln_shared::term::plain(&line) {
                std::borrow::Cow::Borrowed(b) if b.len() == line.len() => line,
                shown => shown.into_owned(),
            };
            if self.lines.len() == LOG_CAPACITY
                && let Some(old) = self.lines.pop_front()
            {
                self.dropped += 1;
                if self.matches(&old) {
                    self.matches -= 1;
                    self.current = self.current.and_then(|c| c.checked_sub(1));
                }
            }
            if self.matches(&line) {
                self.matches += 1;
            }
            self.lines.push_back(line);
        }
        if self.scroll > 0 {
            // Keep the lines the reader looks at in place.
            self.scroll = (self.scroll + added).min(self.lines.len().saturating_sub(1));
        }
    }

    fn scroll_by(&mut self, up: isize) {
        let max = self.lines.len().saturating_sub(1);
        self.scroll = self.scroll.saturating_add_signed(up).min(max);
        self.current = None;
    }

    /// Sets the search and counts its matches.
    fn set_search(&mut self, search: String) {
        self.search = search;
        self.current = None;
        self.matches = self.lines.iter().filter(|l| self.matches(l)).count();
    }

    /// Scrolls to the previous (`back`: older, up) or next (newer, down) match of the
    /// search from the line now at the bottom of the view, wrapping around, as `N` and
    /// `n` do in less and vim; true if one was found.
    fn find(&mut self, back: bool) -> bool {
        if self.search.is_empty() || self.lines.is_empty() {
            return false;
        }
        let len = self.lines.len();
        let bottom = len - 1 - self.scroll.min(len - 1);
        let hit = |i: &usize| self.matches(&self.lines[*i]);
        let found = if back {
            (0..bottom)
                .rev()
                .find(hit)
                .or_else(|| (bottom..len).rev().find(hit))
        } else {
            (bottom + 1..len)
                .find(hit)
                .or_else(|| (0..=bottom).find(hit))
        };
        let Some(i) = found else {
            return false;
        };
        let current = (0..=i).filter(hit).count();
        self.scroll = len - 1 - i;
        self.current = Some(current);
        true
    }
}

/// Everything the dashboard shows.
#[derive(Debug, Clone)]
pub struct Model {
    pub socket: PathBuf,
    pub conn: Conn,
    pub snapshot: Option<Snapshot>,
    /// The selected package (by name, so it survives packages coming and going).
    pub selected: Option<String>,
    /// The selected architecture column.
    pub arch: usize,
    pub focus: Focus,
    pub input: Input,
    pub input_buf: String,
    /// Packages whose name or directory contains this are shown.
    pub filter: String,
    pub log: LogPane,
    pub help: bool,
    pub notice: Option<Notice>,
    /// Unix ms, for elapsed times; advanced by [`Msg::Tick`].
    pub now_ms: u64,
    /// The terminal size.
    pub area: Rect,
    /// Set by `update` when the screen must be redrawn.
    pub dirty: bool,
    pub quit: bool,
    /// The shown rows and arch columns, kept as events arrive (O(log n) per event).
    index: RowIndex,
}

/// What happens to the dashboard.
#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    Mouse(MouseEvent),
    Resize(u16, u16),
    /// The event stream is (re)connecting.
    Connecting,
    Stream(StreamItem),
    Disconnected {
        error: String,
        attempt: u32,
    },
    LogLines {
        build: BuildId,
        lines: Vec<String>,
    },
    LogEnded {
        build: BuildId,
    },
    LogFailed {
        build: BuildId,
        error: ClientError,
    },
    /// An action (build, cancel, gc) succeeded or failed.
    Done(String),
    Failed(ClientError),
    Tick(u64),
}

/// What `update` asks the outside world to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Quit,
    /// Drop the event stream and connect again (after a gap in the event numbers).
    Reconnect,
    /// Stream this build's log (replacing any other log stream).
    FollowLog(BuildId),
    Build(BuildRequest),
    Cancel(CancelRequest),
    Gc,
}

impl Model {
    pub fn new(socket: PathBuf, area: Rect) -> Self {
        Model {
            socket,
            conn: Conn::Connecting,
            snapshot: None,
            selected: None,
            arch: 0,
            focus: Focus::Packages,
            input: Input::Keys,
            input_buf: String::new(),
            filter: String::new(),
            log: LogPane::default(),
            help: false,
            notice: None,
            now_ms: 0,
            area,
            dirty: true,
            quit: false,
            index: RowIndex::default(),
        }
    }

    /// The packages shown, in order.
    pub fn rows(&self) -> Vec<&PackageState> {
        let Some(s) = &self.snapshot else {
            return Vec::new();
        };
        if !self.index.is_for(&self.filter) {
            // The filter changed and no update ran since: answer from the snapshot.
            return RowIndex::build(s, &self.filter)
                .names()
                .iter()
                .filter_map(|n| s.packages.get(n))
                .collect();
        }
        self.index
            .names()
            .iter()
            .filter_map(|n| s.packages.get(n))
            .collect()
    }

    /// The shown packages from the `start`-th, at most `len` of them.
    pub fn visible_rows(&self, start: usize, len: usize) -> Vec<&PackageState> {
        let Some(s) = &self.snapshot else {
            return Vec::new();
        };
        if !self.index.is_for(&self.filter) {
            return self.rows().into_iter().skip(start).take(len).collect();
        }
        let names = self.index.names();
        names[start.min(names.len())..start.saturating_add(len).min(names.len())]
            .iter()
            .filter_map(|n| s.packages.get(n))
            .collect()
    }

    /// The widest shown name and tag (as the table shows the tag), in characters.
    pub fn row_widths(&self) -> (usize, usize) {
        match &self.snapshot {
            Some(s) if !self.index.is_for(&self.filter) => {
                RowIndex::build(s, &self.filter).widths()
            }
            _ => self.index.widths(),
        }
    }

    /// How many packages are shown.
    pub fn row_count(&self) -> usize {
        if self.index.is_for(&self.filter) {
            self.index.names().len()
        } else {
            self.rows().len()
        }
    }

    /// The architecture columns: every arch any package lists.
    pub fn archs(&self) -> Vec<String> {
        self.index.archs().cloned().collect()
    }

    /// The index of the selected row among [`Model::rows`].
    pub fn selected_row(&self) -> Option<usize> {
        let name = self.selected.as_deref()?;
        if self.index.is_for(&self.filter) {
            self.index.position(name)
        } else {
            self.rows().iter().position(|p| p.name == name)
        }
    }

    pub fn selected_arch(&self) -> Option<String> {
        self.archs().get(self.arch).cloned()
    }

    fn selected_target(&self) -> Option<(&PackageState, String, Option<&TargetState>)> {
        let name = self.selected.as_deref()?;
        let p = self.snapshot.as_ref()?.packages.get(name)?;
        let arch = self.selected_arch()?;
        let t = p.targets.get(&arch);
        Some((p, arch, t))
    }

    /// True while something on screen changes with time (elapsed build times).
    pub fn animating(&self) -> bool {
        self.conn == Conn::Connected
            && self
                .snapshot
                .as_ref()
                .is_some_and(|s| !s.running.is_empty())
    }

    fn notice(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice {
            text: text.into(),
            error,
        });
    }

    /// Keeps the selection on a shown package (and the rows on the filter).
    fn fix_selection(&mut self) {
        if !self.index.is_for(&self.filter)
            && let Some(s) = &self.snapshot
        {
            self.index.refilter(s, &self.filter);
        }
        let shown = self
            .selected
            .as_deref()
            .is_some_and(|n| self.index.position(n).is_some());
        if !shown {
            self.selected = self.index.names().first().cloned();
        }
        let n = self.index.arch_count();
        if n > 0 && self.arch >= n {
            self.arch = n - 1;
        }
    }

    fn move_selection(&mut self, down: bool) {
        let names = self.index.names();
        if names.is_empty() {
            return;
        }
        let i = self.selected_row().unwrap_or(0);
        let j = if down {
            (i + 1).min(names.len() - 1)
        } else {
            i.saturating_sub(1)
        };
        self.selected = Some(names[j].clone());
    }

    fn log_page(&self) -> usize {
        usize::from(
            crate::ui::layout(self.area, self)
                .log
                .height
                .saturating_sub(2),
        )
        .max(1)
    }
}

/// Applies one message. Sets `model.dirty` when the screen must change.
pub fn update(model: &mut Model, msg: Msg) -> Vec<Cmd> {
    let mut cmds = Vec::new();
    let dirty = match msg {
        Msg::Key(key) => on_key(model, key, &mut cmds),
        Msg::Mouse(mouse) => on_mouse(model, mouse, &mut cmds),
        Msg::Resize(w, h) => {
            model.area = Rect::new(0, 0, w, h);
            true
        }
        Msg::Connecting => {
            let changed = model.conn != Conn::Connecting;
            if !matches!(model.conn, Conn::Disconnected { .. }) {
                model.conn = Conn::Connecting;
            }
            changed && model.snapshot.is_none()
        }
        Msg::Disconnected { error, attempt } => {
            model.conn = Conn::Disconnected { error, attempt };
            true
        }
        Msg::Stream(item) => on_stream(model, item, &mut cmds),
        Msg::LogLines { build, lines } => {
            if model.log.build.as_ref() == Some(&build) {
                model.log.push(lines);
                true
            } else {
                false
            }
        }
        Msg::LogEnded { build } => {
            let ours = model.log.build.as_ref() == Some(&build);
            if ours {
                model.log.ended = true;
            }
            ours
        }
        Msg::LogFailed { build, error } => {
            let ours = model.log.build.as_ref() == Some(&build);
            if ours {
                model.log.error = Some(chain(&error));
                model.log.ended = true;
            }
            ours
        }
        Msg::Done(text) => {
            model.notice(text, false);
            true
        }
        Msg::Failed(e) => {
            model.notice(chain(&e), true);
            true
        }
        Msg::Tick(now) => {
            model.now_ms = now;
            model.animating()
        }
    };
    model.dirty |= dirty;
    cmds
}

fn on_stream(model: &mut Model, item: StreamItem, cmds: &mut Vec<Cmd>) -> bool {
    match item {
        StreamItem::Snapshot { snapshot } => {
            if model
                .snapshot
                .as_ref()
                .is_some_and(|old| old.pid != snapshot.pid)
            {
                // Another kilnd (a restart): its build ids mean other builds.
                model.log = LogPane::default();
            }
            model.index = RowIndex::build(&snapshot, &model.filter);
            model.snapshot = Some(*snapshot);
            model.conn = Conn::Connected;
        }
        StreamItem::Event { seq, event } => {
            let Some(s) = model.snapshot.as_mut() else {
                cmds.push(Cmd::Reconnect);
                return false;
            };
            if seq != s.seq + 1 {
                // Never show a state with a hole in it: start over from a snapshot.
                tracing::warn!(
                    expected = s.seq + 1,
                    got = seq,
                    "gap in the event stream; reconnecting"
                );
                cmds.push(Cmd::Reconnect);
                return false;
            }
            let touched = rows::package_of(&event);
            if let Some(name) = touched {
                model.index.forget(s, name);
            }
            s.apply(&event);
            if let Some(name) = touched {
                model.index.note(s, name);
            }
            follow_new_build(model, &event, cmds);
        }
    }
    model.fix_selection();
    true
}

/// When the target whose log is open starts a new build, the pane switches to it.
fn follow_new_build(model: &mut Model, event: &Event, cmds: &mut Vec<Cmd>) {
    let (id, package, arch) = match event {
        Event::Queued { build } => (&build.id, &build.package, &build.arch),
        Event::Started { build } => (&build.id, &build.package, &build.arch),
        _ => return,
    };
    let ours = model
        .log
        .target
        .as_ref()
        .is_some_and(|(p, a)| p == package && a == arch);
    if ours && model.log.build.as_ref() != Some(id) {
        model
            .log
            .reset((package.clone(), arch.clone()), Some(id.clone()));
        cmds.push(Cmd::FollowLog(id.clone()));
    }
}

#[cfg(test)]
mod tests;
