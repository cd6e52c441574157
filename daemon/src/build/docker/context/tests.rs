use super::*;
use std::os::unix::fs::symlink;

fn write(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
}

fn tar_names(ctx: &BuildContext) -> Vec<(String, tar::EntryType, Vec<u8>)> {
    let mut buf = Vec::new();
    ctx.write_tar(&mut buf).unwrap();
    let mut a = tar::Archive::new(&buf[..]);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let ty = e.header().entry_type();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            (name, ty, body)
        })
        .collect()
}

#[test]
fn dockerignore_filters_but_dockerfile_and_ignore_file_are_always_sent() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    write(r, "Dockerfile", "FROM scratch\n");
    write(
        r,
        ".dockerignore",
        "Dockerfile\n.dockerignore\n*.log\nsecret\n!secret/public\n",
    );
    write(r, "a.txt", "a");
    write(r, "x.log", "log");
    write(r, "secret/key", "k");
    write(r, "secret/public", "p");
    write(r, "sub/b.log", "kept: *.log is anchored");
    let ctx = BuildContext::scan(r, Path::new("Dockerfile"), &[]).unwrap();
    let names: Vec<_> = ctx.names().collect();
    assert_eq!(
        names,
        [
            ".dockerignore",
            "Dockerfile",
            "a.txt",
            "secret/public",
            "sub",
            "sub/b.log"
        ]
    );
    assert_eq!(ctx.dockerfile_name(), "Dockerfile");
}

#[test]
fn tar_is_deterministic_and_owned_by_root() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    write(r, "Dockerfile", "FROM scratch\n");
    write(r, "z/y/x", "deep");
    write(r, "b", "b");
    let long = "l".repeat(150);
    write(r, &format!("{long}/f"), "long name");
    let ctx = BuildContext::scan(r, Path::new("Dockerfile"), &[]).unwrap();
    let mut one = Vec::new();
    ctx.write_tar(&mut one).unwrap();
    let mut two = Vec::new();
    BuildContext::scan(r, Path::new("Dockerfile"), &[])
        .unwrap()
        .write_tar(&mut two)
        .unwrap();
    assert_eq!(one, two);
    let mut a = tar::Archive::new(&one[..]);
    let mut names = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().uid().unwrap(), 0);
        assert_eq!(e.header().gid().unwrap(), 0);
        names.push(e.path().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(
        names,
        [
            "Dockerfile",
            "b",
            &format!("{long}/"),
            &format!("{long}/f"),
            "z/",
            "z/y/",
            "z/y/x"
        ]
    );
}

#[test]
fn extra_sources_land_at_their_destination() {
    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    let shared = d.path().join("shared");
    write(&pkg, "Dockerfile", "FROM scratch\n");
    write(&pkg, ".dockerignore", "vendor/lib/ignored\n");
    write(&shared, "lib/one.c", "one");
    write(&shared, "lib/ignored", "no");
    write(d.path(), "single.txt", "single");
    let ctx = BuildContext::scan(
        &pkg,
        Path::new("Dockerfile"),
        &[
            (shared.clone(), "vendor".into()),
            (d.path().join("single.txt"), "etc/conf.txt".into()),
            // The README's `../shared:/shared`: absolute means the context's root.
            (shared.clone(), "/abs/shared".into()),
        ],
    )
    .unwrap();
    let entries = tar_names(&ctx);
    let files: Vec<_> = entries
        .iter()
        .filter(|e| e.1 == tar::EntryType::Regular)
        .map(|e| (e.0.as_str(), String::from_utf8_lossy(&e.2).into_owned()))
        .collect();
    assert_eq!(
        files,
        [
            (".dockerignore", "vendor/lib/ignored\n".to_owned()),
            ("Dockerfile", "FROM scratch\n".to_owned()),
            ("abs/shared/lib/ignored", "no".to_owned()),
            ("abs/shared/lib/one.c", "one".to_owned()),
            ("etc/conf.txt", "single".to_owned()),
            ("vendor/lib/one.c", "one".to_owned()),
        ]
    );
    assert!(
        entries
            .iter()
            .any(|e| e.0 == "etc/" && e.1 == tar::EntryType::Directory)
    );

    let err =
        BuildContext::scan(&pkg, Path::new("Dockerfile"), &[(shared, "../x".into())]).unwrap_err();
    assert!(matches!(err, ContextError::BadDestination { .. }), "{err}");
}

#[test]
fn symlinks_inside_are_kept_and_escaping_ones_refused() {
    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    write(&pkg, "Dockerfile", "FROM scratch\n");
    write(&pkg, "real/file", "r");
    write(d.path(), "outside", "secret");
    symlink("../real/file", pkg.join("real/../link-in")).unwrap();
    fs::create_dir_all(pkg.join("sub")).unwrap();
    symlink("../real/file", pkg.join("sub/link")).unwrap();
    let ctx = BuildContext::scan(&pkg, Path::new("Dockerfile"), &[]).unwrap_err();
    // "../real/file" from the package root leaves it.
    assert!(matches!(ctx, ContextError::SymlinkEscapes { .. }), "{ctx}");
    fs::remove_file(pkg.join("link-in")).unwrap();
    let ctx = BuildContext::scan(&pkg, Path::new("Dockerfile"), &[]).unwrap();
    let entries = tar_names(&ctx);
    let link = entries.iter().find(|e| e.0 == "sub/link").unwrap();
    assert_eq!(link.1, tar::EntryType::Symlink, "kept as a symlink");

    symlink("../../outside", pkg.join("sub/escape")).unwrap();
    let err = BuildContext::scan(&pkg, Path::new("Dockerfile"), &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sub/escape") && msg.contains("leaves"),
        "{msg}"
    );
    fs::remove_file(pkg.join("sub/escape")).unwrap();

    symlink("/etc/passwd", pkg.join("abs")).unwrap();
    let err = BuildContext::scan(&pkg, Path::new("Dockerfile"), &[]).unwrap_err();
    assert!(err.to_string().contains("abs"), "{err}");
    // Ignored links are never looked at.
    write(&pkg, ".dockerignore", "abs\n");
    BuildContext::scan(&pkg, Path::new("Dockerfile"), &[]).unwrap();
}

#[test]
fn dockerfile_override_inside_and_outside_the_package() {
    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    write(&pkg, "build/Dockerfile.alt", "FROM scratch\n");
    write(d.path(), "Dockerfile.out", "FROM scratch\nCOPY x /\n");
    let ctx = BuildContext::scan(&pkg, Path::new("build/Dockerfile.alt"), &[]).unwrap();
    assert_eq!(ctx.dockerfile_name(), "build/Dockerfile.alt");
    // Sent even when .dockerignore excludes its directory.
    write(&pkg, "build/other", "x");
    write(&pkg, ".dockerignore", "build\n");
    let ctx = BuildContext::scan(&pkg, Path::new("build/Dockerfile.alt"), &[]).unwrap();
    let names: Vec<_> = ctx.names().collect();
    assert_eq!(names, [".dockerignore", "build/Dockerfile.alt"]);
    let ctx = BuildContext::scan(&pkg, &d.path().join("Dockerfile.out"), &[]).unwrap();
    assert_eq!(ctx.dockerfile_name(), OUTSIDE_DOCKERFILE_NAME);
    let entries = tar_names(&ctx);
    let df = entries
        .iter()
        .find(|e| e.0 == OUTSIDE_DOCKERFILE_NAME)
        .unwrap();
    assert_eq!(df.2, b"FROM scratch\nCOPY x /\n");
    let err = BuildContext::scan(&pkg, Path::new("missing"), &[]).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn stream_yields_the_same_bytes() {
    use futures_util::StreamExt;
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    write(r, "Dockerfile", "FROM scratch\n");
    write(r, "big", &"x".repeat(3 * CHUNK + 17));
    let ctx = BuildContext::scan(r, Path::new("Dockerfile"), &[]).unwrap();
    let mut want = Vec::new();
    ctx.write_tar(&mut want).unwrap();
    let mut got = Vec::new();
    let mut s = std::pin::pin!(ctx.into_stream());
    while let Some(chunk) = s.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, want);
}
