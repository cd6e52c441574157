//! RUN steps in the native builder (runc on overlay snapshots, arm64 under qemu) against
//! the real Docker engine: images that run and print their arch, per-step caching (a
//! late COPY's file re-runs no RUN), whiteouts the engine honours, the same digest from
//! two fresh caches, a cancelled RUN that leaves nothing, and a set of Dockerfiles
//! (multi-stage, USER, WORKDIR, ENV, SHELL, cache, tmpfs and bind mounts, COPY --from, ARG
//! before FROM)
//! whose native images hold the same files, contents, modes and owners as the engine's.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_daemon::build::native::{BuildOutput, CacheResolver, NativeBuild, NativeError, build};
use kiln_daemon::cache::Cache;

use crate::native::{
    Cleanup, DOCKER, assert_same_trees, docker_build, docker_ready, export, load, run, write,
};

const BUSYBOX: &str = "/var/lib/kiln/base/busybox";

/// A fresh cache holding the busybox base (`kiln/busybox:latest`) that scripts/base-images
/// makes.
fn busybox_cache(dir: &Path) -> Cache {
    assert!(
        Path::new(BUSYBOX).join("index.json").is_file(),
        "these tests need the busybox base layout at {BUSYBOX}: run scripts/setup"
    );
    let cache = Cache::open(dir).unwrap();
    cache
        .import_layout(
            Path::new(BUSYBOX),
            "docker.io/kiln/busybox:latest",
            "docker.io/kiln/busybox:latest",
        )
        .unwrap();
    cache
}

fn native_logged(
    cache: &Cache,
    ctx: &Path,
    image: &str,
    arches: &[&str],
) -> (BuildOutput, Vec<String>) {
    let input = NativeBuild {
        context: ctx.to_owned(),
        dockerfile: ctx.join("Dockerfile"),
        extra_sources: Vec::new(),
        image: image.parse().unwrap(),
        arches: arches.iter().map(|a| (a.to_string(), None)).collect(),
        build_args: BTreeMap::new(),
        labels: BTreeMap::new(),
        source_date_epoch: 0,
        target: None,
        network: false,
        no_cache: false,
        cancel: Default::default(),
    };
    let mut lines = Vec::new();
    let out = build(cache, &input, &CacheResolver, &mut |l| {
        eprintln!("{l}");
        lines.push(l)
    })
    .unwrap();
    (out, lines)
}

#[test]
fn run_steps_run_on_both_arches_and_cache_by_their_inputs() {
    docker_ready();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("pkg");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM kiln/busybox:latest\n\
         RUN uname -m > /arch && rm /bin/ls && mkdir -p /srv && echo made > /srv/file\n\
         COPY late /late\n\
         CMD [\"/bin/cat\", \"/arch\"]\n",
    )
    .unwrap();
    write(&ctx, "late", b"one", 0o644);
    let cache = busybox_cache(&tmp.path().join("cache"));
    let (first, lines) = native_logged(&cache, &ctx, "kiln-test/run:t", &["amd64", "arm64"]);
    assert!(!lines.iter().any(|l| l.contains("CACHED")), "{lines:?}");
    // A save of a file only the late COPY reads re-runs no RUN.
    write(&ctx, "late", b"two", 0o644);
    let (second, lines) = native_logged(&cache, &ctx, "kiln-test/run:t", &["amd64", "arm64"]);
    let cached = lines.iter().filter(|l| l.contains("] CACHED RUN")).count();
    assert_eq!(cached, 2, "{lines:?}");
    assert_ne!(first.index.digest, second.index.digest);

    let mut cleanup = Cleanup {
        images: Vec::new(),
        containers: Vec::new(),
    };
    let pid = std::process::id();
    for (arch, want) in [("amd64", "x86_64"), ("arm64", "aarch64")] {
        let tag = format!("kiln-test/run-{arch}:{pid}");
        load(&cache, "kiln-test/run:t", arch, &tag, &mut cleanup);
        let out = run(Command::new(DOCKER).args([
            "run",
            "--rm",
            "--network",
            "none",
            "--platform",
            &format!("linux/{arch}"),
            &tag,
        ]));
        assert_eq!(String::from_utf8_lossy(&out).trim(), want);
        // The RUN deleted /bin/ls of the base: its whiteout hides it in the engine too.
        let tree = export(&tag, &mut cleanup);
        assert!(!tree.contains_key("bin/ls"), "bin/ls is still there");
        assert!(tree.contains_key("bin/sh"));
        assert!(tree.contains_key("srv/file"));
        assert!(!tree.contains_key("proc/self"));
    }
}

/// The input of a native build of `ctx` for `arches`.
fn input(ctx: &Path, image: &str, arches: &[&str], args: &[(&str, &str)]) -> NativeBuild {
    NativeBuild {
        context: ctx.to_owned(),
        dockerfile: ctx.join("Dockerfile"),
        extra_sources: Vec::new(),
        image: image.parse().unwrap(),
        arches: arches.iter().map(|a| (a.to_string(), None)).collect(),
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
    }
}

#[test]
fn a_deterministic_run_gives_the_same_digest_in_two_fresh_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("pkg");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM kiln/busybox:latest\n\
         RUN mkdir -p /srv/a && echo same > /srv/a/f && chmod 640 /srv/a/f && chown 12:34 /srv/a/f \
             && rm /bin/ls && ln -s /srv/a/f /srv/link\n",
    )
    .unwrap();
    let mut digests = Vec::new();
    for n in 0..2 {
        let cache = busybox_cache(&tmp.path().join(format!("cache{n}")));
        let out = build(
            &cache,
            &input(&ctx, "kiln-test/det:t", &["amd64", "arm64"], &[]),
            &CacheResolver,
            &mut |l| eprintln!("{l}"),
        )
        .unwrap();
        digests.push(out.index.digest);
    }
    assert_eq!(digests[0], digests[1]);
}

/// Mount points, directories and containers a RUN step leaves under `cache`.
fn leftovers(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let root = cache.canonicalize().unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    out.extend(
        mountinfo
            .lines()
            .filter(|l| l.contains(&*root.to_string_lossy()))
            .map(|l| format!("mount: {l}")),
    );
    let run_dir = root.join(".kiln/run");
    for e in fs::read_dir(&run_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("kiln-") {
            out.push(format!("directory: {name}"));
        }
    }
    let list = Command::new("runc")
        .arg("--root")
        .arg(run_dir.join(".runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    out.extend(
        String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(|l| format!("container: {l}")),
    );
    out
}

#[test]
fn cancelling_mid_run_leaves_no_mount_container_or_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("pkg");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM kiln/busybox:latest\nRUN echo started && sleep 600\n",
    )
    .unwrap();
    let cache_dir = tmp.path().join("cache");
    let cache = busybox_cache(&cache_dir);
    let input = input(&ctx, "kiln-test/cancel:t", &["amd64"], &[]);
    let cancel = input.cancel.clone();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let builder = std::thread::spawn(move || {
        build(&cache, &input, &CacheResolver, &mut |l| {
            let _ = tx.send(l);
        })
    });
    // The step's own output says the container runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the RUN never started");
        if line.ends_with("] started") {
            break;
        }
    }
    assert!(!leftovers(&cache_dir).is_empty());
    cancel.cancel();
    let result = builder.join().unwrap();
    assert!(
        matches!(result, Err(NativeError::Cancelled)),
        "{:?}",
        result.map(|o| o.index)
    );
    assert_eq!(leftovers(&cache_dir), Vec::<String>::new());
}

/// Loads the busybox base's `arch` image into the engine as `tag`.
fn load_busybox(tag: &str, arch: &str, cleanup: &mut Cleanup) {
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--override-arch",
        arch,
        &format!("oci:{BUSYBOX}:docker.io/kiln/busybox:latest"),
        &format!("docker-daemon:{tag}"),
    ]));
    cleanup.images.push(tag.to_owned());
}

/// Dockerfiles built natively and by the engine, FROM `$BASE` (the busybox base under a
/// name of this test), each exercising what the native RUN step must do as BuildKit does.
fn comparison_set(id: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "multi-stage",
            format!(
                "ARG BASE\n\
                 FROM ${{BASE}} AS build\n\
                 ENV GREETING=hi\n\
                 WORKDIR /work\n\
                 RUN echo \"$GREETING $(uname -m)\" > out.txt && mkdir -p sub && chmod 700 sub && touch sub/x\n\
                 SHELL [\"/bin/sh\", \"-ec\"]\n\
                 RUN echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group \
                     && mkdir -p /home/app && chown app:app /home/app\n\
                 USER app\n\
                 RUN echo mine > /home/app/mine && id -u > /home/app/uid && umask 077 && echo private > /home/app/p\n\
                 USER root\n\
                 RUN --mount=type=cache,id={id},target=/cache echo cached >> /cache/log && cp /cache/log /work/cachelog\n\
                 FROM ${{BASE}}\n\
                 COPY --from=build /work /work\n\
                 COPY --from=build /home/app /home/app\n\
                 RUN cat /work/out.txt > /final && rm /bin/ls && ln -s /bin/sh /bin/ls2 && chmod 4755 /final\n\
                 RUN --mount=type=bind,from=build,source=/home/app,target=/mnt cat /mnt/uid /mnt/mine > /from-mount\n"
            ),
        ),
        (
            "dirs",
            "ARG BASE\n\
             FROM ${BASE}\n\
             ARG VERSION=1.2\n\
             ENV PATH=/opt/bin:$PATH\n\
             WORKDIR /opt\n\
             RUN [\"/bin/sh\", \"-c\", \"mkdir -p bin keep/old && echo $VERSION > version && printf '#!/bin/sh\\\\necho tool\\\\n' > bin/tool && chmod 755 bin/tool && echo x > keep/old/f\"]\n\
             RUN tool > /opt/tool.out && rm -rf /opt/keep && mkdir -p /opt/keep/new && echo y > /opt/keep/new/g\n\
             RUN --mount=type=tmpfs,target=/scratch echo tmp > /scratch/t && cat /scratch/t > /opt/from-tmpfs\n\
             RUN rm -rf /root && mkdir -m 700 /root && echo fresh > /root/only\n"
                .to_owned(),
        ),
    ]
}

#[test]
fn native_run_images_hold_what_the_engine_builds() {
    docker_ready();
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let mut cleanup = Cleanup {
        images: Vec::new(),
        containers: Vec::new(),
    };
    let base = format!("kiln-test/busybox:{pid}");
    load_busybox(&base, "amd64", &mut cleanup);
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    cache
        .import_layout(
            Path::new(BUSYBOX),
            "docker.io/kiln/busybox:latest",
            &format!("docker.io/{base}"),
        )
        .unwrap();
    for (name, dockerfile) in comparison_set(&format!("kiln-test-{pid}")) {
        let ctx = tmp.path().join(name);
        fs::create_dir_all(&ctx).unwrap();
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        let args = [("BASE", base.as_str())];
        let image = format!("kiln-test/{name}:t");
        build(
            &cache,
            &input(&ctx, &image, &["amd64"], &args),
            &CacheResolver,
            &mut |l| eprintln!("{l}"),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let n = format!("kiln-test/{name}-native:{pid}");
        let d = format!("kiln-test/{name}-docker:{pid}");
        load(&cache, &image, "amd64", &n, &mut cleanup);
        docker_build(&ctx, "linux/amd64", &d, &args, &mut cleanup);
        let (native, docker) = (export(&n, &mut cleanup), export(&d, &mut cleanup));
        assert!(native.len() > 10, "{name}: {native:?}");
        assert_same_trees(&native, &docker);
    }
}
