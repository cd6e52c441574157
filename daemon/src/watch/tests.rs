//! The watcher against the real inotify, in temp directories.

use std::fs;
use std::time::Duration;

use super::*;

fn start(root: &Path) -> (Watcher, mpsc::Receiver<WatchEvent>) {
    start_quiet(root, Duration::from_millis(50))
}

fn start_quiet(root: &Path, quiet: Duration) -> (Watcher, mpsc::Receiver<WatchEvent>) {
    Watcher::start(WatchConfig {
        roots: vec![root.to_owned()],
        exclude: vec![root.join("cache")],
        quiet,
        touched: Arc::default(),
        fence_dir: None,
    })
    .unwrap()
}

async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no watch event within 10 s")
        .expect("watcher stopped")
}

fn changed(ev: WatchEvent) -> BTreeSet<PathBuf> {
    match ev {
        WatchEvent::Changed(p) => p,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// A quiet window no test waits out: a change that arrives was reported without it.
const FOREVER: Duration = Duration::from_secs(3600);

/// A watcher with a fence, so that a test can wait until every earlier event is
/// recorded (and queued for the fold).
fn start_fenced(
    root: &Path,
    quiet: Duration,
) -> (Watcher, mpsc::Receiver<WatchEvent>, Arc<Touched>) {
    let ws = root.join("ws");
    fs::create_dir_all(&ws).unwrap();
    let touched = Arc::new(Touched::default());
    let (w, rx) = Watcher::start(WatchConfig {
        roots: vec![ws],
        exclude: Vec::new(),
        quiet,
        touched: Arc::clone(&touched),
        fence_dir: Some(root.join("fence")),
    })
    .unwrap();
    (w, rx, touched)
}

#[tokio::test]
async fn a_burst_of_writes_while_kilnd_is_busy_is_gathered_into_the_next_change() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (_w, mut rx, touched) = start_fenced(&root, FOREVER);
    let ws = root.join("ws");
    fs::write(ws.join("a.txt"), "first").unwrap();
    // The first change waits in the output, unread, as while kilnd plans it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rx.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no change in 10 s");
        tokio::task::yield_now().await;
    }
    for i in 0..20 {
        fs::write(ws.join("a.txt"), format!("{i}")).unwrap();
    }
    fs::write(ws.join("b.txt"), "b").unwrap();
    touched.settle().await;
    assert_eq!(
        changed(next(&mut rx).await),
        [ws.join("a.txt")].into_iter().collect()
    );
    assert_eq!(
        changed(next(&mut rx).await),
        [ws.join("a.txt"), ws.join("b.txt")].into_iter().collect(),
        "the burst is one change"
    );
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn a_file_written_in_place_is_reported_once_closed_without_the_quiet_window() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    fs::write(root.join("a.txt"), "old").unwrap();
    let (_w, mut rx) = start_quiet(&root, FOREVER);
    // Truncated, written in two parts, closed: one writer, one fd.
    let mut f = fs::File::create(root.join("a.txt")).unwrap();
    f.write_all(b"new ").unwrap();
    f.write_all(b"content").unwrap();
    drop(f);
    assert_eq!(
        changed(next(&mut rx).await),
        [root.join("a.txt")].into_iter().collect()
    );
}

#[tokio::test]
async fn a_directory_made_or_a_file_removed_waits_out_the_quiet_window() {
    for made in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let ws = root.join("ws");
        fs::create_dir_all(&ws).unwrap();
        fs::write(ws.join("f"), "f").unwrap();
        let change = |ws: &Path| {
            if made {
                fs::create_dir(ws.join("new")).unwrap();
                ws.join("new")
            } else {
                fs::remove_file(ws.join("f")).unwrap();
                ws.join("f")
            }
        };
        {
            let (_w, mut rx, touched) = start_fenced(&root, FOREVER);
            let path = change(&ws);
            touched.settle().await;
            tokio::task::yield_now().await;
            assert!(
                rx.try_recv().is_err(),
                "{} was reported before the quiet window",
                path.display()
            );
        }
        fs::write(ws.join("f"), "f").unwrap();
        let _ = fs::remove_dir(ws.join("new"));
        let (_w, mut rx) = start_quiet(&ws, Duration::from_millis(50));
        let path = change(&ws);
        assert_eq!(changed(next(&mut rx).await), [path].into_iter().collect());
    }
}

#[tokio::test]
async fn a_save_renamed_into_place_is_reported_without_the_quiet_window() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    fs::write(root.join("a.txt"), "old").unwrap();
    let (_w, mut rx) = start_quiet(&root, FOREVER);
    // As JetBrains' safe write (or a revert by rename) does: the temporary is ignored.
    fs::write(root.join("a.txt___jb_tmp___"), "new").unwrap();
    fs::rename(root.join("a.txt___jb_tmp___"), root.join("a.txt")).unwrap();
    assert_eq!(
        changed(next(&mut rx).await),
        [root.join("a.txt")].into_iter().collect()
    );
}

#[tokio::test]
async fn a_file_open_for_writing_holds_the_change_until_it_closes() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let ws = root.join("ws");
    fs::create_dir_all(&ws).unwrap();
    let touched = Arc::new(Touched::default());
    let (_w, mut rx) = Watcher::start(WatchConfig {
        roots: vec![ws.clone()],
        exclude: Vec::new(),
        quiet: Duration::from_secs(2),
        touched: Arc::clone(&touched),
        fence_dir: Some(root.join("fence")),
    })
    .unwrap();
    // Truncated and half written, as an editor writes in place.
    let mut f = fs::File::create(ws.join("half.txt")).unwrap();
    f.write_all(b"first half ").unwrap();
    fs::write(ws.join("other.txt"), "whole").unwrap();
    touched.settle().await;
    // Every event is recorded; the fold, which runs on this thread, gets its turn.
    tokio::task::yield_now().await;
    assert!(
        rx.try_recv().is_err(),
        "a change was reported while half.txt was open"
    );
    f.write_all(b"second half").unwrap();
    drop(f);
    let mut seen = BTreeSet::new();
    while !seen.contains(&ws.join("half.txt")) {
        seen.extend(changed(next(&mut rx).await));
    }
    assert!(seen.contains(&ws.join("other.txt")), "{seen:?}");
}

#[tokio::test]
async fn a_file_left_open_is_taken_as_it_is_after_the_quiet_window() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (_w, mut rx) = start_quiet(&root, Duration::from_millis(50));
    let mut f = fs::File::create(root.join("log.txt")).unwrap();
    f.write_all(b"a line\n").unwrap();
    assert_eq!(
        changed(next(&mut rx).await),
        [root.join("log.txt")].into_iter().collect()
    );
    // A symlink is created whole: reported at once, no close to wait for.
    std::os::unix::fs::symlink("log.txt", root.join("link")).unwrap();
    assert_eq!(
        changed(next(&mut rx).await),
        [root.join("link")].into_iter().collect()
    );
    drop(f);
}

#[tokio::test]
async fn settle_knows_every_write_made_before_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let ws = root.join("ws");
    fs::create_dir_all(ws.join("pkg")).unwrap();
    let touched = Arc::new(Touched::default());
    let (_w, _rx) = Watcher::start(WatchConfig {
        roots: vec![ws.clone()],
        exclude: Vec::new(),
        quiet: FOREVER,
        touched: Arc::clone(&touched),
        fence_dir: Some(root.join("fence")),
    })
    .unwrap();
    let pkg = ws.join("pkg");
    for _ in 0..20 {
        let since = std::time::Instant::now();
        touched.settle().await;
        assert!(!touched.busy(since, &[&pkg]));
        // Open and half written: busy until closed, and changed since `since`.
        let mut f = fs::File::create(pkg.join("f")).unwrap();
        f.write_all(b"half").unwrap();
        touched.settle().await;
        assert!(touched.busy(std::time::Instant::now(), &[&pkg]), "open");
        assert!(touched.busy(since, &[&pkg]));
        drop(f);
        touched.settle().await;
        assert!(
            !touched.busy(std::time::Instant::now(), &[&pkg]),
            "closed and nothing since"
        );
        assert!(touched.busy(since, &[&pkg]), "written since");
        assert!(!touched.busy(since, &[&ws.join("other")]));
    }
}

#[tokio::test]
async fn temporaries_git_internals_and_cache_are_ignored_and_git_state_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    fs::create_dir_all(root.join(".git/objects")).unwrap();
    fs::create_dir_all(root.join("cache/blobs")).unwrap();
    let (_w, mut rx) = start(&root);
    for name in [
        ".main.go.swp",
        "4913",
        "main.go~",
        "#main.go#",
        "x___jb_tmp___",
    ] {
        fs::write(root.join(name), "t").unwrap();
        fs::remove_file(root.join(name)).unwrap();
    }
    fs::write(root.join(".git/objects/ab"), "o").unwrap();
    fs::write(root.join(".git/index.lock"), "i").unwrap();
    fs::write(root.join("cache/blobs/x"), "b").unwrap();
    // A real change afterwards: the first event must hold it alone.
    fs::write(root.join("main.go"), "package main").unwrap();
    let paths = changed(next(&mut rx).await);
    assert_eq!(paths, [root.join("main.go")].into_iter().collect());
    // The index renamed into place (a commit, a checkout) is git state: reported.
    fs::rename(root.join(".git/index.lock"), root.join(".git/index")).unwrap();
    let paths = changed(next(&mut rx).await);
    assert_eq!(paths, [root.join(".git/index")].into_iter().collect());
}

#[tokio::test]
async fn directories_created_later_are_watched() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (_w, mut rx) = start(&root);
    fs::create_dir_all(root.join("new/deep")).unwrap();
    let first = changed(next(&mut rx).await);
    assert!(first.contains(&root.join("new")), "{first:?}");
    // inotify watches the new directories once notify has seen their creation, which
    // may be after the change is reported: write until a write is seen, within 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = BTreeSet::new();
    while !seen.contains(&root.join("new/deep/f")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new/deep/f never seen"
        );
        fs::write(root.join("new/deep/f"), "x").unwrap();
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            seen.extend(changed(ev));
        }
    }
}

#[test]
fn touched_tells_what_changed_since_a_moment() {
    let t = Touched::default();
    let start = std::time::Instant::now();
    let pkg = Path::new("/ws/pkg");
    let other = Path::new("/ws/other");
    t.record(start, &pkg.join("old.txt"));
    let planned = start + Duration::from_millis(10);
    assert!(
        !t.since(planned, &[pkg]),
        "a change before the tag was computed"
    );
    t.record(planned + Duration::from_millis(1), &other.join("f"));
    assert!(!t.since(planned, &[pkg]), "another package's change");
    assert!(t.since(planned, &[pkg, other]), "an extra source's change");
    t.record(planned + Duration::from_millis(2), &pkg.join("src/new.txt"));
    assert!(t.since(planned, &[pkg]));
    // Forgotten changes count as changes to everything, from their time on.
    let t = Touched::default();
    for i in 0..=Touched::KEEP {
        t.record(
            planned + Duration::from_micros(i as u64),
            Path::new("/ws/busy/f"),
        );
    }
    assert!(t.since(planned, &[pkg]), "the oldest change was dropped");
    assert!(!t.since(planned + Duration::from_secs(1), &[pkg]));
    let t = Touched::default();
    t.record_unknown(planned);
    assert!(t.since(planned, &[pkg]), "lost events");
}

/// While the watch of a big tree is being set up, another process changes it (as
/// `git gc --auto`, started in the background by a commit, packs and deletes thousands of
/// loose objects; here: chmods, the cheapest event): more events than the queue holds. They are drained while the watch is
/// set up, so starting returns (it used to wait for ever once the queue was full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_a_tree_that_changes_meanwhile_starts() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    for i in 0..8000 {
        std::fs::create_dir_all(ws.join(format!("p{i}/src"))).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (ws, stop) = (ws.clone(), Arc::clone(&stop));
        use std::os::unix::fs::PermissionsExt;
        let files = [ws.join("f0"), ws.join("f1")];
        for f in &files {
            fs::write(f, b"x").unwrap();
        }
        std::thread::spawn(move || {
            let mut n = 0u64;
            // A burst, as a real one ends (an endless one would keep notify's thread
            // reading events, never getting to the next `watch` call).
            while n < 100_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Two files in turn: the kernel merges an event equal to the one before.
                let mode = 0o600 | (((n as u32 / 2) % 2) * 0o40);
                let _ =
                    fs::set_permissions(&files[n as usize % 2], fs::Permissions::from_mode(mode));
                n += 1;
            }
            n
        })
    };
    // The fence is watched after the tree: notify's thread then reads what queued up
    // while it walked the tree, before it can answer.
    let fence = dir.path().join("fence");
    // On a thread of its own, so that a start that never returns fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _runtime = runtime.enter();
        let started = Watcher::start(WatchConfig {
            roots: vec![ws],
            exclude: Vec::new(),
            quiet: Duration::from_millis(50),
            touched: Arc::default(),
            fence_dir: Some(fence),
        });
        let _ = tx.send(started.map(|_| ()));
    });
    let started = rx.recv_timeout(Duration::from_secs(60));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = churn.join().unwrap();
    started
        .expect("the watcher started within a minute")
        .unwrap();
    assert!(
        writes > 20_000,
        "{writes} changes: too few to fill the queue"
    );
}
