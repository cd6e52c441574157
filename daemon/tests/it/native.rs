//! The native builder against the real Docker engine: the same COPY-only Dockerfiles
//! built natively and by `docker build` (BuildKit) give the same file trees and config
//! fields, and the native image runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kiln_daemon::build::native::{BuildOutput, CacheResolver, NativeBuild, build};
use kiln_daemon::cache::Cache;
use sha2::{Digest as _, Sha256};

pub(crate) const DOCKER: &str = "/usr/bin/docker";

pub(crate) fn docker_ready() {
    let ok = Command::new(DOCKER)
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests need the Docker engine: start dockerd (scripts/setup) so that `docker info` works"
    );
}

pub(crate) fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Docker images and containers made by a test, removed when it ends.
pub(crate) struct Cleanup {
    pub(crate) images: Vec<String>,
    pub(crate) containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new(DOCKER).args(["rm", "-f", c]).output();
        }
        for i in &self.images {
            let _ = Command::new(DOCKER).args(["rmi", "-f", i]).output();
        }
    }
}

pub(crate) fn write(root: &Path, rel: &str, body: &[u8], mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn native(cache: &Cache, ctx: &Path, image: &str, args: &[(&str, &str)]) -> BuildOutput {
    let input = NativeBuild {
        context: ctx.to_owned(),
        dockerfile: ctx.join("Dockerfile"),
        extra_sources: Vec::new(),
        image: image.parse().unwrap(),
        arches: vec![("amd64".into(), None), ("arm64".into(), None)],
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        labels: BTreeMap::new(),
        source_date_epoch: 0,
        target: None,
        network: false,
        no_cache: false,
        cancel: Default::default(),
    };
    build(cache, &input, &CacheResolver, &mut |l| eprintln!("{l}")).unwrap()
}

/// Loads `image-<arch>` from the cache into the engine as `tag`.
pub(crate) fn load(cache: &Cache, image: &str, arch: &str, tag: &str, cleanup: &mut Cleanup) {
    // skopeo reads the layout's index.json, which a fold brings up to date (kilnd folds
    // a second after its last landing).
    cache.fold_refs().unwrap();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}:docker.io/{image}-{arch}", cache.root().display()),
        &format!("docker-daemon:{tag}"),
    ]));
    cleanup.images.push(tag.to_owned());
}

pub(crate) fn docker_build(
    ctx: &Path,
    platform: &str,
    tag: &str,
    args: &[(&str, &str)],
    cleanup: &mut Cleanup,
) {
    let mut cmd = Command::new(DOCKER);
    cmd.env("DOCKER_BUILDKIT", "1").args([
        "build",
        "--quiet",
        "--no-cache",
        "--network",
        "none",
        "--platform",
        platform,
        "-t",
        tag,
    ]);
    for (k, v) in args {
        cmd.args(["--build-arg", &format!("{k}={v}")]);
    }
    cmd.arg(ctx);
    run(&mut cmd);
    cleanup.images.push(tag.to_owned());
}

/// path -> (type, mode, uid, gid, sha256 of content or link target)
pub(crate) type Tree = BTreeMap<String, (char, u32, u64, u64, String)>;

pub(crate) fn export(tag: &str, cleanup: &mut Cleanup) -> Tree {
    let id = String::from_utf8(run(Command::new(DOCKER).args(["create", tag])))
        .unwrap()
        .trim()
        .to_owned();
    cleanup.containers.push(id.clone());
    let tar = run(Command::new(DOCKER).args(["export", &id]));
    let mut out = Tree::new();
    let mut a = tar::Archive::new(&tar[..]);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        let t = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Link => 'h',
            other => panic!("{path}: {other:?}"),
        };
        let body = if t == 'l' || t == 'h' {
            e.link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        } else {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            hex(&Sha256::digest(&v))
        };
        out.insert(
            path,
            (
                t,
                h.mode().unwrap() & 0o7777,
                h.uid().unwrap(),
                h.gid().unwrap(),
                body,
            ),
        );
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn inspect(tag: &str) -> serde_json::Value {
    let out = run(Command::new(DOCKER).args(["image", "inspect", tag]));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v[0].clone()
}

pub(crate) fn assert_same_trees(native: &Tree, docker: &Tree) {
    let keys: BTreeSet<&String> = native.keys().chain(docker.keys()).collect();
    let mut diffs = Vec::new();
    for k in keys {
        let (a, b) = (native.get(k), docker.get(k));
        if a != b {
            diffs.push(format!("{k}:\n  native {a:?}\n  docker {b:?}"));
        }
    }
    assert!(diffs.is_empty(), "file trees differ:\n{}", diffs.join("\n"));
}

const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Entrypoint",
    "Cmd",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
];

fn assert_same_config(native: &serde_json::Value, docker: &serde_json::Value) {
    let norm = |v: &serde_json::Value| match v {
        serde_json::Value::Null => serde_json::Value::Null,
        serde_json::Value::String(s) if s.is_empty() => serde_json::Value::Null,
        serde_json::Value::Object(m) if m.is_empty() => serde_json::Value::Null,
        serde_json::Value::Array(a) if a.is_empty() => serde_json::Value::Null,
        v => v.clone(),
    };
    assert_eq!(
        native["RootFS"]["Layers"].as_array().map(Vec::len),
        docker["RootFS"]["Layers"].as_array().map(Vec::len),
        "number of layers"
    );
    for f in CONFIG_FIELDS {
        assert_eq!(
            norm(&native["Config"][f]),
            norm(&docker["Config"][f]),
            "config field {f}"
        );
    }
    assert_eq!(native["Architecture"], docker["Architecture"]);
    assert_eq!(native["Os"], docker["Os"]);
}

fn comparison_package(root: &Path) {
    fs::create_dir_all(root).unwrap();
    fs::write(
        root.join("Dockerfile"),
        r#"ARG GREETING=hello
FROM scratch AS files
ARG TARGETARCH
COPY rootfs-${TARGETARCH}/ /
COPY bin/qemu /bin/qemu

FROM scratch
ARG GREETING
ARG TARGETARCH
ENV GREETING="${GREETING} world" \
    ARCH=$TARGETARCH
LABEL org.example.title="cmp test" org.example.arch=${TARGETARCH}
COPY --from=files / /
COPY --chown=1000:1000 data /srv/data
COPY *.txt /srv/
COPY single.txt /srv/renamed.txt
COPY dir /opt/dir
COPY dir/ /opt/contents/
COPY ["link-to-file", "/srv/linked"]
COPY --chmod=0600 conf/ /etc/app/
ADD bundle.tar.gz /opt/bundle/
ADD plain.tar /opt/plain
ADD notes.txt.gz /opt/
WORKDIR /srv/work
COPY rel.txt .
USER 1000:1000
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --retries=2 CMD ["/bin/qemu", "--version"]
ENTRYPOINT ["/bin/qemu"]
CMD ["--version"]
"#,
    )
    .unwrap();
    fs::write(root.join(".dockerignore"), "*.md\ndir/ignored\n").unwrap();
    write(root, "rootfs-amd64/etc/arch", b"amd64\n", 0o644);
    write(root, "rootfs-arm64/etc/arch", b"arm64\n", 0o644);
    write(root, "rootfs-amd64/usr/share/x/y", b"y\n", 0o600);
    write(root, "data/a", b"a", 0o644);
    write(root, "data/sub/b", b"b", 0o755);
    write(root, "one.txt", b"1", 0o644);
    write(root, "two.txt", b"2", 0o664);
    write(root, "single.txt", b"single", 0o644);
    write(root, "rel.txt", b"rel", 0o644);
    write(root, "README.md", b"ignored", 0o644);
    write(root, "dir/f", b"f", 0o640);
    write(root, "dir/sub/g", b"g", 0o644);
    write(root, "dir/ignored", b"x", 0o644);
    write(root, "conf/app.conf", b"k=v\n", 0o644);
    fs::create_dir_all(root.join("dir/empty")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, uid, body) in [
        ("bin/", 0o750, 42, &b""[..]),
        ("bin/tool", 0o755, 42, b"#!/bin/sh\n"),
        ("share/doc", 0o444, 0, b"doc"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(1_600_000_000);
        h.set_size(body.len() as u64);
        h.set_entry_type(if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        b.append_data(&mut h, path, body).unwrap();
    }
    let tar_bytes = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    fs::write(root.join("bundle.tar.gz"), gz.finish().unwrap()).unwrap();
    fs::write(root.join("plain.tar"), &tar_bytes).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"not a tar").unwrap();
    fs::write(root.join("notes.txt.gz"), gz.finish().unwrap()).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("sub/g", root.join("dir/link")).unwrap();
    std::os::unix::fs::symlink("single.txt", root.join("link-to-file")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/usr/bin/qemu-x86_64-static", root.join("bin/qemu")).unwrap();
}

#[test]
fn native_images_match_docker_build_and_run() {
    docker_ready();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("cmp");
    comparison_package(&ctx);
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let args = [("GREETING", "hi")];
    native(&cache, &ctx, "kiln/cmp:t", &args);

    let mut cleanup = Cleanup {
        images: Vec::new(),
        containers: Vec::new(),
    };
    let pid = std::process::id();
    for arch in ["amd64", "arm64"] {
        let n = format!("kiln-test/cmp-native:{arch}-{pid}");
        let d = format!("kiln-test/cmp-docker:{arch}-{pid}");
        load(&cache, "kiln/cmp:t", arch, &n, &mut cleanup);
        docker_build(&ctx, &format!("linux/{arch}"), &d, &args, &mut cleanup);
        assert_same_config(&inspect(&n), &inspect(&d));
        let tree = export(&n, &mut cleanup);
        assert_same_trees(&tree, &export(&d, &mut cleanup));
        // What both must hold, so that the comparison is not between two empty trees.
        let arch_sum = hex(&Sha256::digest(format!("{arch}\n")));
        assert_eq!(tree["etc/arch"], ('f', 0o644, 0, 0, arch_sum));
        assert_eq!(tree["srv/data/sub/b"].1, 0o755);
        assert_eq!(tree["srv/data/sub/b"].2, 1000);
        assert_eq!(tree["etc/app/app.conf"].1, 0o600);
        assert_eq!(tree["opt/dir/sub"].1, 0o750);
        assert_eq!(
            tree["opt/contents/link"],
            ('l', 0o777, 0, 0, "sub/g".into())
        );
        assert_eq!(tree["srv/linked"].0, 'f');
        assert_eq!(tree["srv/work/rel.txt"].0, 'f');
        assert!(tree.contains_key("opt/dir/empty"));
        assert!(!tree.contains_key("opt/dir/ignored"));
        assert!(!tree.contains_key("srv/README.md"));
        assert_eq!(
            tree["opt/bundle/bin/tool"].2, 42,
            "ADD keeps the archive's owners"
        );
        assert_eq!(tree["opt/plain/share/doc"].1, 0o444);
        assert_eq!(
            tree["opt/notes.txt.gz"].0, 'f',
            "a gzip that is not a tar is copied"
        );
        let config = inspect(&n);
        assert_eq!(config["Config"]["Env"][1], "GREETING=hi world");
        assert_eq!(config["Config"]["Labels"]["org.example.arch"], arch);
    }

    // The native image runs: its entrypoint and default command print qemu's version.
    let out = run(Command::new(DOCKER).args([
        "run",
        "--rm",
        "--network",
        "none",
        &format!("kiln-test/cmp-native:amd64-{pid}"),
    ]));
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("qemu-x86_64 version"), "{out}");
}

#[test]
fn a_package_on_top_of_a_native_base_matches_docker_build() {
    docker_ready();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    fs::create_dir_all(&base).unwrap();
    fs::write(
        base.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV BASE=1\nWORKDIR /home/app\nCMD [\"/bin/none\"]\n",
    )
    .unwrap();
    write(
        &base,
        "rootfs/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n",
        0o644,
    );
    write(
        &base,
        "rootfs/etc/group",
        b"root:x:0:\napp:x:2345:\nstaff:x:50:\n",
        0o644,
    );
    write(&base, "rootfs/tmp/.keep", b"", 0o644);
    fs::set_permissions(base.join("rootfs/tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink("usr/lib", base.join("rootfs/lib")).unwrap();
    write(&base, "rootfs/usr/lib/libx.so", b"lib", 0o755);

    let top = tmp.path().join("top");
    fs::create_dir_all(&top).unwrap();
    fs::write(
        top.join("Dockerfile"),
        "FROM kiln-test/base:t\n\
         COPY --chown=app f /tmp/\n\
         COPY --chown=app:staff f /home/app/g\n\
         COPY f /lib/\n\
         COPY f /etc\n\
         USER app\n\
         WORKDIR /var/app\n\
         WORKDIR /tmp\n\
         COPY --chown=1:1 nothing* /tmp/\n\
         COPY . /ctx\n\
         COPY . /tmp/ctx2/\n\
         ENTRYPOINT [\"/bin/x\"]\n",
    )
    .unwrap();
    write(&top, "f", b"file", 0o644);
    fs::set_permissions(&top, fs::Permissions::from_mode(0o700)).unwrap();

    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    native(&cache, &base, "kiln-test/base:t", &[]);
    native(&cache, &top, "kiln-test/top:t", &[]);

    let mut cleanup = Cleanup {
        images: Vec::new(),
        containers: Vec::new(),
    };
    let pid = std::process::id();
    // The engine builds FROM the natively built base, loaded under the name the
    // Dockerfile uses.
    load(
        &cache,
        "kiln-test/base:t",
        "amd64",
        "kiln-test/base:t",
        &mut cleanup,
    );
    let n = format!("kiln-test/top-native:{pid}");
    let d = format!("kiln-test/top-docker:{pid}");
    load(&cache, "kiln-test/top:t", "amd64", &n, &mut cleanup);
    docker_build(&top, "linux/amd64", &d, &[], &mut cleanup);
    assert_same_config(&inspect(&n), &inspect(&d));
    let tree = export(&n, &mut cleanup);
    assert_same_trees(&tree, &export(&d, &mut cleanup));
    assert_eq!(
        tree["tmp"].1, 0o1777,
        "a parent from the base keeps its mode"
    );
    assert_eq!((tree["tmp/f"].2, tree["tmp/f"].3), (1234, 2345));
    assert_eq!((tree["home/app/g"].2, tree["home/app/g"].3), (1234, 50));
    assert_eq!(
        tree["lib"].0, 'l',
        "the base's symlink is followed, not replaced"
    );
    assert!(tree.contains_key("usr/lib/f"));
    assert!(
        tree.contains_key("etc/f"),
        "COPY to an existing directory lands inside it"
    );
    assert_eq!(
        (tree["var/app"].2, tree["var/app"].3),
        (1234, 2345),
        "WORKDIR made as USER"
    );
}
