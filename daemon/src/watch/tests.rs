//! The watcher against the real inotify, in temp directories.

use std::fs;
use std::time::Duration;

use super::*;

fn start(root: &Path) -> (Watcher, mpsc::Receiver<WatchEvent>) {
    Watcher::start(WatchConfig {
        roots: vec![root.to_owned()],
        exclude: vec![root.join("cache")],
        quiet: Duration::from_millis(50),
        touched: Arc::default(),
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

#[tokio::test]
async fn a_burst_of_writes_is_one_change() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (_w, mut rx) = start(&root);
    for i in 0..20 {
        fs::write(root.join("a.txt"), format!("{i}")).unwrap();
    }
    fs::write(root.join("b.txt"), "b").unwrap();
    let paths = changed(next(&mut rx).await);
    assert_eq!(
        paths,
        [root.join("a.txt"), root.join("b.txt")]
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn temporaries_git_and_cache_are_ignored() {
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
    fs::write(root.join(".git/index"), "i").unwrap();
    fs::write(root.join("cache/blobs/x"), "b").unwrap();
    // A real change afterwards: the first event must hold it alone.
    fs::write(root.join("main.go"), "package main").unwrap();
    let paths = changed(next(&mut rx).await);
    assert_eq!(paths, [root.join("main.go")].into_iter().collect());
}

#[tokio::test]
async fn directories_created_later_are_watched() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (_w, mut rx) = start(&root);
    fs::create_dir_all(root.join("new/deep")).unwrap();
    let first = changed(next(&mut rx).await);
    assert!(first.contains(&root.join("new")), "{first:?}");
    // inotify watches the new directories once their creation is seen.
    fs::write(root.join("new/deep/f"), "x").unwrap();
    let mut seen = BTreeSet::new();
    while !seen.contains(&root.join("new/deep/f")) {
        seen.extend(changed(next(&mut rx).await));
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
