//! The commands that talk to a running kilnd: status, stop, build, logs, cancel, gc.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_shared::protocol::{
    BuildId, BuildOutcome, BuildRequest, BuildResponse, BuildSummary, CancelRequest,
    CancelResponse, Event, GcResponse, PackageState, Snapshot, StreamItem, TargetState,
    TargetStatus, TransferRequest, TransferResponse,
};
use kiln_shared::spec::Arch;

use crate::client::Client;
use crate::ui::fmt;

/// What a command reports to `main`: success, or a failure already explained.
pub enum Outcome {
    Success,
    Failure,
}

pub async fn status(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let s = client.state().await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &s)?;
        writeln!(out)?;
    } else {
        out.write_all(render_status(&s, kiln_shared::protocol::now_ms()).as_bytes())?;
    }
    Ok(Outcome::Success)
}

/// `kiln pull` / `kiln push`: one line per name, failure if any failed.
pub async fn transfer(
    client: &Client,
    path: &str,
    req: TransferRequest,
) -> anyhow::Result<Outcome> {
    let resp: TransferResponse = client.post(path, &req).await?;
    let mut outcome = Outcome::Success;
    for r in resp.results {
        if r.ok {
            println!("{}: {}", r.name, r.message);
        } else {
            eprintln!("{}: {}", r.name, r.message);
            outcome = Outcome::Failure;
        }
    }
    Ok(outcome)
}

/// How long `kiln stop` waits for kilnd to exit.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// `kiln stop`: sends kilnd SIGTERM (its pid from its own state, over its socket) and
/// waits until it has exited. No kilnd on the socket: nothing to do.
pub async fn stop(client: &Client) -> anyhow::Result<Outcome> {
    let s = match client.state().await {
        Ok(s) => s,
        Err(e) if e.is_unreachable() => {
            println!(
                "no kilnd answers on {}: nothing to stop",
                client.socket().display()
            );
            return Ok(Outcome::Success);
        }
        Err(e) => return Err(e.into()),
    };
    let pid = nix::unistd::Pid::from_raw(
        i32::try_from(s.pid).context("kilnd reported a pid that is not one")?,
    );
    match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => bail!(
            "cannot signal kilnd (pid {pid}): {e}; it runs as another user? stop it as that user"
        ),
    }
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    while !exited(pid) {
        if tokio::time::Instant::now() > deadline {
            eprintln!(
                "kilnd (pid {pid}) is still running {}s after SIGTERM; see its log, or kill -9 {pid}",
                STOP_WAIT.as_secs()
            );
            return Ok(Outcome::Failure);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("kilnd (pid {pid}) stopped");
    Ok(Outcome::Success)
}

/// Whether process `pid` has exited: it no longer exists (signal 0 probes it), or it is
/// a zombie waiting for its parent. A zombie main thread whose other threads are still
/// tearing down (exit_group in progress) has not exited yet: its parent cannot reap it.
fn exited(pid: nix::unistd::Pid) -> bool {
    if nix::sys::signal::kill(pid, None).is_err() {
        return true;
    }
    // /proc/PID/stat: "pid (comm) state ... num_threads ...", comm may hold spaces and
    // parentheses; after it, state is field 3 and num_threads field 20.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')').map(|(_, rest)| {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.first() == Some(&"Z") && fields.get(17).is_none_or(|n| *n == "1")
            })
        })
        .unwrap_or(false)
}

/// `kiln status` as plain text, as of `now` (Unix ms).
pub fn render_status(s: &Snapshot, now: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let roots: Vec<String> = s.roots.iter().map(|r| r.display().to_string()).collect();
    let _ = writeln!(
        o,
        "kilnd {} (pid {}) watching {}; registry {}",
        s.daemon_version,
        s.pid,
        roots.join(" "),
        if s.registry.is_empty() {
            "-".to_owned()
        } else {
            s.registry.join(" ")
        }
    );
    let width = s.packages.keys().map(String::len).max().unwrap_or(7).max(7);
    // Whole tags: a shortened dirty tag would look like the clean one.
    let tag_width = s
        .packages
        .values()
        .filter_map(|p| p.tag.as_ref().map(|t| t.as_str().len()))
        .max()
        .unwrap_or(1);
    for p in s.packages.values() {
        let tag = p.tag.as_ref().map_or("-", |t| t.as_str());
        let _ = write!(o, "{:<width$}  {tag:<tag_width$}", p.name);
        for (arch, t) in &p.targets {
            let mut cell = format!("{arch}:{}", format!("{:?}", t.status).to_lowercase());
            if let (TargetStatus::Building, Some(pr)) = (t.status, &t.progress) {
                cell.push_str(&format!(" {}/{}", pr.current, pr.total));
            }
            // A duration next to a state is that state's: the build in flight so far,
            // or the build that ended as the status says (not an earlier build's).
            if let Some(at) = s.started_at(t) {
                let so_far = now.saturating_sub(at);
                cell.push_str(&format!(" ({})", fmt::duration_ms(so_far)));
            } else if let Some(l) = t.settled_by() {
                match l.builder {
                    _ if l.pulled_from.is_some() => cell.push_str(&format!(
                        " (pulled from {} in {} ms)",
                        l.pulled_from.as_deref().unwrap_or_default(),
                        l.duration_ms
                    )),
                    Some(b) => cell.push_str(&format!(
                        " ({}, {})",
                        fmt::duration_ms(l.duration_ms),
                        b.as_str()
                    )),
                    None => cell.push_str(&format!(" ({})", fmt::duration_ms(l.duration_ms))),
                }
            } else if t.status == TargetStatus::Ok {
                cell.push_str(" (cached)");
            }
            let _ = write!(o, "  {cell}");
        }
        if let Some(e) = &p.error {
            let _ = write!(o, "  error: {e}");
        }
        let _ = writeln!(o);
    }
    let c = &s.cache;
    let _ = writeln!(
        o,
        "queue {}, building {}; cache {}{}, {} blobs{}, {} refs, hit ratio {}",
        s.queue.len(),
        s.running.len(),
        fmt::bytes(c.bytes_used),
        c.bytes_cap
            .map_or(String::new(), |cap| format!(" / {}", fmt::bytes(cap))),
        c.blobs,
        fmt::on_demand(c).map_or(String::new(), |d| format!(" + {d}")),
        c.references,
        c.hit_ratio()
            .map_or("-".to_owned(), |r| format!("{:.0}%", r * 100.0))
    );
    for u in &s.upstreams {
        let _ = writeln!(
            o,
            "upstream {}{}: {}{}",
            u.name,
            if u.push { " (push)" } else { "" },
            u.state,
            u.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    for p in s.pushes.values().filter(|p| p.error.is_some()) {
        let retry = p.next_try_at_ms.map_or(String::new(), |at| {
            let secs = at
                .saturating_sub(kiln_shared::protocol::now_ms())
                .div_ceil(1000);
            format!("; next try in {secs} s")
        });
        let _ = writeln!(
            o,
            "push of {}:{} to {} failed: {}{retry}",
            p.package,
            p.tag,
            p.upstream,
            p.error.as_deref().unwrap_or_default()
        );
    }
    if let Some(e) = &s.watch_error {
        let _ = writeln!(o, "watch error: {e}");
    }
    o
}

/// Where one requested build stands, for `kiln build`.
struct Tracked {
    package: String,
    arch: String,
    done: Option<BuildSummary>,
}

pub async fn build(client: &Client, req: BuildRequest) -> anyhow::Result<Outcome> {
    // Subscribe before asking, so the build's end cannot slip between the two.
    let mut events = client.events().await?;
    let resp: BuildResponse = client.post("/build", &req).await?;
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    for arch in &resp.up_to_date {
        writeln!(
            out,
            "{} {arch}: up to date (--force rebuilds it)",
            req.package
        )?;
    }
    let mut tracked: BTreeMap<BuildId, Tracked> = resp
        .builds
        .iter()
        .map(|b| {
            (
                b.id.clone(),
                Tracked {
                    package: b.package.clone(),
                    arch: b.arch.clone(),
                    done: None,
                },
            )
        })
        .collect();
    for b in &resp.builds {
        writeln!(out, "{} {}: queued as build {}", b.package, b.arch, b.id)?;
    }
    let mut status_line = false;
    while tracked.values().any(|t| t.done.is_none()) {
        let Some(item) = events.next_item().await? else {
            bail!("kilnd closed the event stream before the build finished");
        };
        let mut lines = Vec::new();
        match item {
            StreamItem::Snapshot { snapshot } => {
                // After a gap: read the outcome from the state.
                for (id, t) in &mut tracked {
                    let target = snapshot
                        .packages
                        .get(&t.package)
                        .and_then(|p| p.targets.get(&t.arch));
                    if let Some(last) = target
                        .and_then(|tg| tg.last.as_ref())
                        .filter(|l| &l.id == id && t.done.is_none())
                    {
                        t.done = Some(last.clone());
                        lines.push(done_line(t, last));
                    }
                }
            }
            StreamItem::Event { event, .. } => match event {
                Event::Started { build } if tracked.contains_key(&build.id) => {
                    lines.push(format!(
                        "{} {}: building with {}",
                        build.package, build.arch, build.builder
                    ));
                }
                Event::Progress { build, progress } => {
                    if let Some(t) = tracked.get(&build) {
                        let text = format!(
                            "{} {}: step {}/{} {}",
                            t.package, t.arch, progress.current, progress.total, progress.step
                        );
                        if tty {
                            write!(out, "\r\x1b[2K{}", fmt::short(&text, 100))?;
                            out.flush()?;
                            status_line = true;
                        } else {
                            lines.push(text);
                        }
                    }
                }
                Event::Finished { summary, .. }
                | Event::Failed { summary, .. }
                | Event::Cancelled { summary, .. } => {
                    if let Some(t) = tracked.get_mut(&summary.id) {
                        lines.push(done_line(t, &summary));
                        t.done = Some(summary);
                    }
                }
                _ => {}
            },
        }
        for l in lines {
            if status_line {
                write!(out, "\r\x1b[2K")?;
                status_line = false;
            }
            writeln!(out, "{l}")?;
        }
    }
    let failed: Vec<&Tracked> = tracked
        .values()
        .filter(|t| {
            t.done
                .as_ref()
                .is_some_and(|d| d.outcome != BuildOutcome::Ok)
        })
        .collect();
    for t in &failed {
        writeln!(
            out,
            "see its log: kiln logs {} --arch {}",
            t.package, t.arch
        )?;
    }
    Ok(if failed.is_empty() {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

fn done_line(t: &Tracked, s: &BuildSummary) -> String {
    let took = fmt::duration_ms(s.duration_ms);
    match s.outcome {
        BuildOutcome::Ok => format!(
            "{} {}: ok in {took}{}, {}/{} steps cached, {}",
            t.package,
            t.arch,
            s.builder
                .map_or(String::new(), |b| format!(" ({} builder)", b.as_str())),
            s.cache_hits,
            s.steps,
            s.digest
                .as_ref()
                .map_or_else(|| "no digest".to_owned(), ToString::to_string)
        ),
        BuildOutcome::Failed => format!(
            "{} {}: failed after {took}: {}",
            t.package,
            t.arch,
            s.error.as_deref().unwrap_or("no reason given")
        ),
        BuildOutcome::Cancelled => format!(
            "{} {}: cancelled after {took}{}",
            t.package,
            t.arch,
            s.error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"))
        ),
    }
}

/// `kiln logs`: prints the log of a target's build in flight, else its last one; fails
/// (exit 1) when that build failed or was cancelled, as the build itself did.
pub async fn logs(
    client: &Client,
    package: &str,
    arch: Option<&str>,
    follow: bool,
) -> anyhow::Result<Outcome> {
    let s = client.state().await?;
    let Some(p) = s.packages.get(package) else {
        let known: Vec<&str> = s.packages.keys().map(String::as_str).collect();
        bail!(
            "no package {package:?} in the workspace; known packages: {}",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    if let Some(e) = &p.error {
        if s.build_of(package, None).is_none() {
            bail!("{package} cannot be built: {e}");
        }
        // Its last log is of files that have changed since.
        eprintln!("kiln: {package} cannot be built now: {e}");
    }
    let arch = match arch {
        Some(a) if p.targets.contains_key(a) => a.to_owned(),
        Some(a) => {
            let archs: Vec<&str> = p.targets.keys().map(String::as_str).collect();
            bail!(
                "{package} does not build for {a}; it lists {}",
                archs.join(", ")
            );
        }
        None => match log_arch(p) {
            Some(a) => a.to_owned(),
            None => bail!("{package} has no architectures to show a log of"),
        },
    };
    let Some(build) = s.build_of(package, Some(&arch)) else {
        bail!(
            "{package} {arch} has no build in this kilnd yet: run `kiln build {package} --arch {arch}`"
        );
    };
    // Following: the build's end comes on the event stream, subscribed to before the
    // log is read so that it cannot slip by.
    let events = match follow {
        true => Some(client.events().await?),
        false => None,
    };
    let mut lines = client
        .log(&build, follow)
        .await
        .with_context(|| format!("reading the log of build {build}"))?;
    // A file or a pipe gets the build's output without its escape codes.
    let raw = kiln_shared::term::colour(std::io::stdout().is_terminal());
    let mut out = std::io::stdout().lock();
    while let Some(batch) = lines.next_batch(1024).await? {
        for l in batch {
            if raw {
                writeln!(out, "{l}")?;
            } else {
                writeln!(out, "{}", kiln_shared::term::plain(&l))?;
            }
        }
        out.flush()?;
    }
    drop(out);
    let outcome = match events {
        Some(events) => Some(build_end(events, package, &arch, &build).await?),
        None => ended(&s, package, &arch, &build),
    };
    Ok(match outcome {
        Some(BuildOutcome::Failed) => {
            eprintln!("kiln: build {build} of {package} {arch} failed");
            Outcome::Failure
        }
        Some(BuildOutcome::Cancelled) => {
            eprintln!("kiln: build {build} of {package} {arch} was cancelled");
            Outcome::Failure
        }
        Some(BuildOutcome::Ok) | None => Outcome::Success,
    })
}

/// How build `id` of (package, arch) ended, if it has.
fn ended(s: &Snapshot, package: &str, arch: &str, id: &BuildId) -> Option<BuildOutcome> {
    let last = s.packages.get(package)?.targets.get(arch)?.last.as_ref()?;
    (&last.id == id).then_some(last.outcome)
}

/// Waits on the event stream for build `id` to end.
async fn build_end(
    mut events: crate::client::Lines,
    package: &str,
    arch: &str,
    id: &BuildId,
) -> anyhow::Result<BuildOutcome> {
    loop {
        match events.next_item().await? {
            None => bail!("kilnd closed the event stream before build {id} ended"),
            Some(StreamItem::Snapshot { snapshot }) => {
                if let Some(o) = ended(&snapshot, package, arch, id) {
                    return Ok(o);
                }
            }
            Some(StreamItem::Event { event, .. }) => match event {
                Event::Finished { summary, .. }
                | Event::Failed { summary, .. }
                | Event::Cancelled { summary, .. }
                    if &summary.id == id =>
                {
                    return Ok(summary.outcome);
                }
                _ => {}
            },
        }
    }
}

/// The arch whose log `kiln logs PKG` shows without `--arch`, the same one every time:
/// the first that failed (or was cancelled), else the host's, else the first listed.
fn log_arch(p: &PackageState) -> Option<&str> {
    let ended_badly =
        |t: &TargetState| matches!(t.status, TargetStatus::Failed | TargetStatus::Cancelled);
    let host = Arch::host().map(Arch::as_str);
    p.targets
        .iter()
        .find(|(_, t)| ended_badly(t))
        .or_else(|| p.targets.iter().find(|(a, _)| Some(a.as_str()) == host))
        .or_else(|| p.targets.iter().next())
        .map(|(a, _)| a.as_str())
}

pub async fn cancel(client: &Client, req: CancelRequest) -> anyhow::Result<Outcome> {
    let r: CancelResponse = client.post("/cancel", &req).await?;
    if r.cancelled.is_empty() {
        println!("nothing to cancel");
    }
    for id in &r.cancelled {
        println!("cancelled build {id}");
    }
    Ok(Outcome::Success)
}

pub async fn gc(client: &Client) -> anyhow::Result<Outcome> {
    let r: GcResponse = client.post("/gc", &serde_json::json!({})).await?;
    println!(
        "removed {} blobs, freed {} in {}",
        r.gc.removed_blobs,
        fmt::bytes(r.gc.freed_bytes),
        fmt::duration_ms(r.gc.duration_ms)
    );
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tag;

    #[test]
    fn logs_show_the_failed_arch_else_the_host_s() {
        let s = crate::testing::snapshot();
        // linuxkit/init: amd64 failed, arm64 served from the cache.
        assert_eq!(log_arch(&s.packages["linuxkit/init"]), Some("amd64"));
        let mut p = s.packages["linuxkit/init"].clone();
        p.targets.get_mut("amd64").unwrap().status = TargetStatus::Ok;
        p.targets.get_mut("arm64").unwrap().status = TargetStatus::Cancelled;
        assert_eq!(log_arch(&p), Some("arm64"));
        // Both fine: the host's, whichever built last.
        let host = Arch::host().unwrap().as_str();
        assert_eq!(log_arch(&s.packages["linuxkit/alpine"]), Some(host));
    }

    #[test]
    fn status_shows_whole_tags_dirty_or_not() {
        let mut s = crate::testing::snapshot();
        let dirty = tag("4f2a9c1be07d33554f2a9c1be07d33554f2a9c1b-dirty-1a2b3c4");
        s.packages.get_mut("linuxkit/hello").unwrap().tag = Some(dirty.clone());
        let text = render_status(&s, crate::testing::T0);
        assert!(text.contains(dirty.as_str()), "{text}");
    }

    #[test]
    fn plain_status() {
        let now = crate::testing::T0 + 4_200;
        insta::assert_snapshot!(render_status(&crate::testing::snapshot(), now));
    }
}
