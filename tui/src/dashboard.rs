//! The dashboard's runtime: the terminal (entered, and restored on exit and on panic),
//! and one loop that selects over terminal input, messages from kilnd and, only while a
//! build runs, a one-second tick. It draws only after a message changed the model.

use std::io::{IsTerminal, Stdout};
use std::time::Duration;

use anyhow::Context;
use crossterm::event::{DisableMouseCapture, EnableMouseCapture, Event as TermEvent, EventStream};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use futures_util::StreamExt;
use kiln_shared::protocol::{BuildResponse, CancelResponse, GcResponse, now_ms};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::app::{Cmd, Model, Msg, update};
use crate::client::{Client, backoff};
use crate::ui;

/// Messages from background tasks that may wait before the loop takes them.
const CHANNEL: usize = 256;
/// Messages handled before a draw, so a flood (a fast log) still lets keys through.
const MAX_BATCH: usize = 512;
/// Log lines per message.
const LOG_BATCH: usize = 1000;

/// Restores the terminal when dropped, whichever way the dashboard ends.
struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

fn restore() {
    // Best effort: each step may fail if the previous one did; the rest should still run.
    let _ = disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<Self> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        let mut stdout = std::io::stdout();
        if let Err(e) = execute!(stdout, EnterAlternateScreen, EnableMouseCapture) {
            restore();
            return Err(e).context("cannot set up the terminal");
        }
        let terminal = match Terminal::new(CrosstermBackend::new(stdout)) {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(e).context("cannot set up the terminal");
            }
        };
        Ok(TerminalGuard { terminal })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Connects to the event stream and forwards it, reconnecting with backoff for ever.
fn spawn_feed(client: Client, tx: mpsc::Sender<Msg>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            if tx.send(Msg::Connecting).await.is_err() {
                return;
            }
            let error = match client.events().await {
                Ok(mut lines) => {
                    attempt = 0;
                    loop {
                        match lines.next_item().await {
                            Ok(Some(item)) => {
                                if tx.send(Msg::Stream(item)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "kilnd closed the event stream".to_owned(),
                            Err(e) => break kiln_shared::error::chain(&e),
                        }
                    }
                }
                Err(e) => kiln_shared::error::chain(&e),
            };
            attempt = attempt.saturating_add(1);
            tracing::info!(%error, attempt, "event stream lost; reconnecting");
            if tx.send(Msg::Disconnected { error, attempt }).await.is_err() {
                return;
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    })
}

fn spawn_log(
    client: Client,
    build: kiln_shared::protocol::BuildId,
    tx: mpsc::Sender<Msg>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Ok(false): the dashboard stopped listening.
        let followed = async {
            let mut lines = client.log(&build, true).await?;
            while let Some(batch) = lines.next_batch(LOG_BATCH).await? {
                let msg = Msg::LogLines {
                    build: build.clone(),
                    lines: batch,
                };
                if tx.send(msg).await.is_err() {
                    return Ok(false);
                }
            }
            Ok::<_, crate::client::ClientError>(true)
        }
        .await;
        let msg = match followed {
            Ok(true) => Msg::LogEnded { build },
            Ok(false) => return,
            Err(error) => Msg::LogFailed { build, error },
        };
        let _ = tx.send(msg).await;
    })
}

fn spawn_action(client: Client, cmd: Cmd, tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        let msg = match cmd {
            Cmd::Build(req) => match client.post::<_, BuildResponse>("/build", &req).await {
                Ok(r) => Msg::Done(describe_build(&req.package, &r)),
                Err(e) => Msg::Failed(e),
            },
            Cmd::Cancel(req) => match client.post::<_, CancelResponse>("/cancel", &req).await {
                Ok(r) if r.cancelled.is_empty() => Msg::Done("nothing was cancelled".into()),
                Ok(r) => Msg::Done(format!("cancelled {} build(s)", r.cancelled.len())),
                Err(e) => Msg::Failed(e),
            },
            Cmd::Gc => match client
                .post::<_, GcResponse>("/gc", &serde_json::json!({}))
                .await
            {
                Ok(r) => Msg::Done(format!(
                    "GC freed {} ({} blobs) in {}",
                    ui::fmt::bytes(r.gc.freed_bytes),
                    r.gc.removed_blobs,
                    ui::fmt::duration_ms(r.gc.duration_ms)
                )),
                Err(e) => Msg::Failed(e),
            },
            Cmd::Quit | Cmd::Reconnect | Cmd::FollowLog(_) => return,
        };
        let _ = tx.send(msg).await;
    });
}

/// A one-line summary of a build request's answer.
pub fn describe_build(package: &str, r: &BuildResponse) -> String {
    let mut parts: Vec<String> = r
        .builds
        .iter()
        .map(|b| format!("{} {} queued as {}", b.package, b.arch, b.id))
        .collect();
    if !r.up_to_date.is_empty() {
        parts.push(format!(
            "{package} {} up to date (R rebuilds anyway)",
            r.up_to_date.join(" ")
        ));
    }
    if parts.is_empty() {
        parts.push(format!("{package}: nothing to build"));
    }
    parts.join("; ")
}

fn to_msg(event: TermEvent) -> Option<Msg> {
    match event {
        TermEvent::Key(k) => Some(Msg::Key(k)),
        TermEvent::Mouse(m) => Some(Msg::Mouse(m)),
        TermEvent::Resize(w, h) => Some(Msg::Resize(w, h)),
        _ => None,
    }
}

/// Whether stdin and stdout are a terminal the dashboard can draw on and read keys from.
pub fn has_terminal() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// What `kiln` says when it has no terminal to draw on.
pub const NO_TERMINAL: &str = "the dashboard needs a terminal (stdin and stdout are not one): \
use `kiln status` (or `kiln status --json`) to read kilnd's state, `kiln logs PKG` for a build's log";

/// Runs the dashboard until the user quits.
pub async fn run(client: Client) -> anyhow::Result<()> {
    if !has_terminal() {
        anyhow::bail!(NO_TERMINAL);
    }
    let mut guard = TerminalGuard::enter()?;
    let size = guard
        .terminal
        .size()
        .context("cannot read the terminal size")?;
    let mut model = Model::new(
        client.socket().to_owned(),
        Rect::new(0, 0, size.width, size.height),
    );
    let (tx, mut rx) = mpsc::channel(CHANNEL);
    let mut feed = spawn_feed(client.clone(), tx.clone());
    let mut log: Option<JoinHandle<()>> = None;
    let mut input = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    update(&mut model, Msg::Tick(now_ms()));
    let result = loop {
        if model.dirty {
            model.dirty = false;
            if let Err(e) = guard.terminal.draw(|f| ui::view(&model, f)) {
                break Err(e).context("cannot draw to the terminal");
            }
        }
        let first = tokio::select! {
            ev = input.next() => match ev {
                Some(Ok(ev)) => to_msg(ev),
                Some(Err(e)) => break Err(e).context("cannot read the terminal"),
                None => break Ok(()),
            },
            Some(msg) = rx.recv() => Some(msg),
            _ = tick.tick(), if model.animating() => Some(Msg::Tick(now_ms())),
        };
        let mut msgs: Vec<Msg> = first.into_iter().collect();
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        for msg in msgs {
            for cmd in update(&mut model, msg) {
                match cmd {
                    Cmd::Quit => model.quit = true,
                    Cmd::Reconnect => {
                        feed.abort();
                        feed = spawn_feed(client.clone(), tx.clone());
                    }
                    Cmd::FollowLog(build) => {
                        if let Some(old) = log.take() {
                            old.abort();
                        }
                        log = Some(spawn_log(client.clone(), build, tx.clone()));
                    }
                    cmd @ (Cmd::Build(_) | Cmd::Cancel(_) | Cmd::Gc) => {
                        spawn_action(client.clone(), cmd, tx.clone());
                    }
                }
            }
        }
        if model.quit {
            break Ok(());
        }
    };
    feed.abort();
    if let Some(l) = log {
        l.abort();
    }
    drop(guard);
    result
}
