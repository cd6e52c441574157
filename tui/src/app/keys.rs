//! What keys and the mouse do to the model: moving, searching, opening a log, asking
//! kilnd to build or cancel.

use super::*;

pub(super) fn on_mouse(model: &mut Model, mouse: MouseEvent, cmds: &mut Vec<Cmd>) -> bool {
    let up = match mouse.kind {
        MouseEventKind::ScrollUp => true,
        MouseEventKind::ScrollDown => false,
        _ => return false,
    };
    let areas = crate::ui::layout(model.area, model);
    if areas.log.contains(Position::new(mouse.column, mouse.row)) {
        #[allow(clippy::cast_possible_wrap)] // WHEEL_LINES is 3.
        let lines = WHEEL_LINES as isize;
        model.log.scroll_by(if up { lines } else { -lines });
    } else {
        model.move_selection(!up);
        follow_selection(model, cmds);
    }
    true
}

pub(super) fn on_key(model: &mut Model, key: KeyEvent, cmds: &mut Vec<Cmd>) -> bool {
    if key.kind == KeyEventKind::Release {
        return false;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        model.quit = true;
        cmds.push(Cmd::Quit);
        return true;
    }
    match model.input {
        Input::Filter | Input::Search => return on_input_key(model, key),
        Input::Keys => {}
    }
    if model.help {
        // Any key closes the help; q still quits.
        model.help = false;
        if key.code == KeyCode::Char('q') {
            model.quit = true;
            cmds.push(Cmd::Quit);
        }
        return true;
    }
    let had_notice = model.notice.take().is_some();
    let changed = match key.code {
        KeyCode::Char('q') => {
            model.quit = true;
            cmds.push(Cmd::Quit);
            true
        }
        KeyCode::Char('?') => {
            model.help = true;
            true
        }
        KeyCode::Esc => {
            if !model.filter.is_empty() {
                model.filter.clear();
                model.fix_selection();
            }
            model.focus = Focus::Packages;
            true
        }
        KeyCode::Tab | KeyCode::BackTab => {
            model.focus = match model.focus {
                Focus::Packages => Focus::Log,
                Focus::Log => Focus::Packages,
            };
            true
        }
        KeyCode::Up | KeyCode::Char('k') => {
            match model.focus {
                Focus::Packages => {
                    model.move_selection(false);
                    follow_selection(model, cmds);
                }
                Focus::Log => model.log.scroll_by(1),
            }
            true
        }
        KeyCode::Down | KeyCode::Char('j') => {
            match model.focus {
                Focus::Packages => {
                    model.move_selection(true);
                    follow_selection(model, cmds);
                }
                Focus::Log => model.log.scroll_by(-1),
            }
            true
        }
        KeyCode::Left | KeyCode::Char('h') => {
            model.arch = model.arch.saturating_sub(1);
            follow_selection(model, cmds);
            true
        }
        KeyCode::Right | KeyCode::Char('l') => {
            let n = model.archs().len();
            model.arch = (model.arch + 1).min(n.saturating_sub(1));
            follow_selection(model, cmds);
            true
        }
        KeyCode::PageUp => {
            let page = model.log_page();
            model
                .log
                .scroll_by(isize::try_from(page).unwrap_or(isize::MAX));
            true
        }
        KeyCode::PageDown => {
            let page = model.log_page();
            model
                .log
                .scroll_by(-isize::try_from(page).unwrap_or(isize::MAX));
            true
        }
        KeyCode::Home => {
            model.log.scroll = model.log.lines.len().saturating_sub(1);
            model.log.current = None;
            true
        }
        KeyCode::End | KeyCode::Char('G') => {
            model.log.scroll = 0;
            model.log.current = None;
            true
        }
        KeyCode::Enter => open_log(model, cmds),
        KeyCode::Char('r') => build(model, false, cmds),
        KeyCode::Char('R') => build(model, true, cmds),
        KeyCode::Char('c') => cancel(model, cmds),
        KeyCode::Char('g') => {
            model.notice("collecting garbage…", false);
            cmds.push(Cmd::Gc);
            true
        }
        KeyCode::Char('f') => {
            model.input = Input::Filter;
            model.input_buf = model.filter.clone();
            true
        }
        KeyCode::Char('/') => {
            model.input = Input::Search;
            model.input_buf.clear();
            true
        }
        KeyCode::Char('n') => search_again(model, false),
        KeyCode::Char('N') => search_again(model, true),
        _ => false,
    };
    changed || had_notice
}

pub(super) fn search_again(model: &mut Model, back: bool) -> bool {
    if model.log.search.is_empty() {
        model.notice("no search yet: press / to search the log", true);
    } else if !model.log.find(back) {
        let text = format!("{:?} not found in the log", model.log.search);
        model.notice(text, true);
    }
    true
}

pub(super) fn on_input_key(model: &mut Model, key: KeyEvent) -> bool {
    match key.code {
        KeyCode::Esc => {
            if model.input == Input::Filter {
                model.filter.clear();
                model.fix_selection();
            }
            model.input = Input::Keys;
            model.input_buf.clear();
        }
        KeyCode::Enter => {
            let text = std::mem::take(&mut model.input_buf);
            match model.input {
                Input::Filter => {
                    model.filter = text;
                    model.fix_selection();
                }
                Input::Search => {
                    model.log.set_search(text);
                    if !model.log.search.is_empty() {
                        // Search backwards from the bottom: the newest match first.
                        model.log.scroll = 0;
                        if !model.log.find(true) {
                            let t = format!("{:?} not found in the log", model.log.search);
                            model.notice(t, true);
                        }
                    }
                }
                Input::Keys => {}
            }
            model.input = Input::Keys;
        }
        KeyCode::Backspace => {
            model.input_buf.pop();
            if model.input == Input::Filter {
                model.filter = model.input_buf.clone();
                model.fix_selection();
            }
        }
        KeyCode::Char(c) => {
            model.input_buf.push(c);
            if model.input == Input::Filter {
                model.filter = model.input_buf.clone();
                model.fix_selection();
            }
        }
        _ => return false,
    }
    true
}

/// The selected target and its build in flight, else its last one.
fn selected_build(model: &Model) -> Option<((String, String), Option<BuildId>)> {
    let (p, arch, t) = model.selected_target()?;
    let build = t.and_then(|t| {
        t.build
            .clone()
            .or_else(|| t.last.as_ref().map(|l| l.id.clone()))
    });
    Some(((p.name.clone(), arch), build))
}

pub(super) fn open_log(model: &mut Model, cmds: &mut Vec<Cmd>) -> bool {
    let Some(((name, arch), build)) = selected_build(model) else {
        model.notice("no package selected", true);
        return true;
    };
    let Some(build) = build else {
        let error = model
            .snapshot
            .as_ref()
            .and_then(|s| s.packages.get(&name)?.error.clone());
        let text = match error {
            Some(e) => format!("{name} cannot be built: {e}"),
            None => {
                format!("{name} {arch} has not been built by this kilnd yet: press r to build it")
            }
        };
        model.notice(text, true);
        return true;
    };
    model.log.reset((name, arch), Some(build.clone()));
    cmds.push(Cmd::FollowLog(build));
    true
}

/// Once a log is open, it shows the selected target's: moving the selection (a package,
/// an arch with left/right) moves the log with it.
fn follow_selection(model: &mut Model, cmds: &mut Vec<Cmd>) {
    if model.log.target.is_none() {
        return;
    }
    let Some((target, build)) = selected_build(model) else {
        return;
    };
    if model.log.target.as_ref() == Some(&target) && model.log.build == build {
        return;
    }
    if let Some(b) = &build {
        cmds.push(Cmd::FollowLog(b.clone()));
    }
    model.log.reset(target, build);
}

pub(super) fn build(model: &mut Model, force: bool, cmds: &mut Vec<Cmd>) -> bool {
    let Some((p, arch, _)) = model.selected_target() else {
        model.notice("no package selected", true);
        return true;
    };
    let package = p.name.clone();
    model.notice(
        format!(
            "{} {package} {arch}…",
            if force {
                "force-rebuilding"
            } else {
                "building"
            }
        ),
        false,
    );
    // Follow the new build's log if the log pane shows this target.
    cmds.push(Cmd::Build(BuildRequest {
        package,
        arch: Some(arch),
        force,
        builder: None,
    }));
    true
}

pub(super) fn cancel(model: &mut Model, cmds: &mut Vec<Cmd>) -> bool {
    let Some((p, arch, t)) = model.selected_target() else {
        model.notice("no package selected", true);
        return true;
    };
    let Some(build) = t.and_then(|t| t.build.clone()) else {
        let text = format!(
            "nothing to cancel: {} {arch} is not queued or building",
            p.name
        );
        model.notice(text, true);
        return true;
    };
    cmds.push(Cmd::Cancel(CancelRequest {
        build: Some(build),
        package: None,
        arch: None,
    }));
    true
}
