//! The `docker` builder against the machine's real Docker engine (20.10, BuildKit) and a
//! real registry (Debian's `docker-registry`, distribution 2.8) standing in for kilnd's.
//!
//! Base images cannot come from Docker Hub: [`busybox_layout`] makes a two-platform
//! busybox OCI layout from Debian's busybox-static packages (this is the test's own
//! minimal version of `scripts/base-images`), and skopeo copies it into the registry.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_daemon::build::docker::{
    BuildOutcome, DockerBuild, DockerBuildError, Engine, LinuxkitInfo, LogLine, LogSource,
    build_arch, linuxkit_build_args, linuxkit_labels,
};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

const DOCKER: &str = "/usr/bin/docker";

/// [`build_arch`], then what kilnd's runner does once the image has landed: the tag the
/// build left in the engine is removed.
async fn build_landed(
    engine: &Engine,
    build: &DockerBuild,
    push_to: &str,
    log: &mut (dyn FnMut(LogLine) + Send),
    cancel: CancellationToken,
) -> Result<BuildOutcome, DockerBuildError> {
    let (outcome, tag) = build_arch(engine, build, push_to, log, cancel).await?;
    tag.remove()
        .await
        .expect("the engine removes the build's tag");
    Ok(outcome)
}

/// Runs a command and returns its stdout; panics with its stderr if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> String {
    run(Command::new(DOCKER).args(args))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A unique id for labels and names of this test run.
fn run_id(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A `docker-registry` on a free loopback port, stopped on drop.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed (apt-get install docker-registry)");
        let registry = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(&registry.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") {
                    return registry;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {} within 20s",
                registry.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The manifest `repo:tag` exactly as the registry serves it.
    fn raw_manifest(&self, repo: &str, tag: &str) -> Vec<u8> {
        run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{repo}:{tag}", self.addr),
        ]))
        .into_bytes()
    }

    fn config(&self, repo: &str, tag: &str) -> serde_json::Value {
        let out = run(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{}/{repo}:{tag}", self.addr),
        ]));
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic busybox OCI layout for linux/amd64 and linux/arm64 (reference
/// `latest`), made once per machine under the temp directory.
fn busybox_layout() -> PathBuf {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let root = std::env::temp_dir().join("kiln-it-busybox");
            let layout = root.join("layout-v1");
            if layout.join("index.json").exists() {
                return layout;
            }
            let debs = root.join("debs");
            fs::create_dir_all(&debs).unwrap();
            let work = tempfile::tempdir_in(&root).unwrap();
            let out = work.path().join("layout");
            fs::create_dir_all(out.join("blobs/sha256")).unwrap();
            fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
            let put = |bytes: &[u8]| {
                let hex = sha256_hex(bytes);
                fs::write(out.join("blobs/sha256").join(&hex), bytes).unwrap();
                (format!("sha256:{hex}"), bytes.len())
            };
            let mut manifests = Vec::new();
            for arch in ["amd64", "arm64"] {
                let find = || {
                    fs::read_dir(&debs)
                        .unwrap()
                        .filter_map(Result::ok)
                        .find(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            n.starts_with("busybox-static_") && n.ends_with(&format!("_{arch}.deb"))
                        })
                };
                if find().is_none() {
                    run(Command::new("apt-get")
                        .args(["download", "-q", &format!("busybox-static:{arch}")])
                        .current_dir(&debs));
                }
                let deb = find().expect("apt-get download left no .deb").path();
                let x = work.path().join(arch);
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
                let busybox = fs::read(x.join("bin/busybox")).unwrap();
                let mut tar = tar::Builder::new(Vec::new());
                let header = |ty: tar::EntryType, mode: u32, size: u64| {
                    let mut h = tar::Header::new_ustar();
                    h.set_entry_type(ty);
                    h.set_mode(mode);
                    h.set_size(size);
                    h.set_mtime(0);
                    h.set_uid(0);
                    h.set_gid(0);
                    h
                };
                for (dir, mode) in [("bin/", 0o755), ("etc/", 0o755), ("tmp/", 0o1777)] {
                    tar.append_data(
                        &mut header(tar::EntryType::Directory, mode, 0),
                        dir,
                        &[][..],
                    )
                    .unwrap();
                }
                let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
                tar.append_data(&mut h, "bin/busybox", &busybox[..])
                    .unwrap();
                for applet in [
                    "sh", "cat", "echo", "ls", "sleep", "touch", "uname", "true", "false", "mkdir",
                    "test", "env",
                ] {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
                        .unwrap();
                }
                let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
                let mut h = header(tar::EntryType::Regular, 0o644, passwd.len() as u64);
                tar.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
                let layer = tar.into_inner().unwrap();
                let diff_id = format!("sha256:{}", sha256_hex(&layer));
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                gz.write_all(&layer).unwrap();
                let (layer_digest, layer_size) = put(&gz.finish().unwrap());
                let platform = if arch == "arm64" {
                    serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
                } else {
                    serde_json::json!({"architecture": "amd64", "os": "linux"})
                };
                let mut config = platform.clone();
                config["config"] = serde_json::json!({
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "Cmd": ["sh"]
                });
                config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": [diff_id]});
                let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
                let manifest = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": config_digest, "size": config_size},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": layer_digest, "size": layer_size}]
                });
                let (digest, size) = put(&serde_json::to_vec(&manifest).unwrap());
                manifests.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest, "size": size, "platform": platform
                }));
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests
            });
            let (digest, size) = put(&serde_json::to_vec(&index).unwrap());
            let top = serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                               "digest": digest, "size": size,
                               "annotations": {"org.opencontainers.image.ref.name": "latest"}}]
            });
            fs::write(out.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
            // Another test process may have raced us; either layout is the same.
            let _ = fs::rename(&out, &layout);
            layout
        })
        .clone()
}

/// Copies the busybox base into `registry` as `kiln/busybox:latest`; returns the
/// reference to use in `FROM`.
fn push_base(registry: &Registry) -> String {
    let layout = busybox_layout();
    let dest = format!("{}/kiln/busybox:latest", registry.addr);
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{dest}"),
    ]));
    dest
}

fn write(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
}

/// Images in the engine that carry the test's label.
fn labelled_images(id: &str) -> Vec<String> {
    docker(&[
        "images",
        "-a",
        "-q",
        "--filter",
        &format!("label=kiln.test.run={id}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Containers in the engine made from this test's images: from its registry's base, or
/// carrying its label. Other tests share the engine, so all containers would not do.
fn containers_of(registry: &str, id: &str) -> Vec<String> {
    let label = format!("kiln.test.run={id}");
    docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--format",
        "{{.ID}}\t{{.Image}}\t{{.Labels}}",
    ])
    .lines()
    .filter(|l| l.contains(registry) || l.split(['\t', ',']).any(|x| x == label))
    .map(str::to_owned)
    .collect()
}

fn package(
    id: &str,
    tag: &str,
    arch: &str,
    dir: &Path,
    extra: Vec<(PathBuf, String)>,
) -> DockerBuild {
    let info = LinuxkitInfo {
        image: "kiln/hello".into(),
        pkg_hash: tag.into(),
        config_json: Some(r#"{"binds":["/run:/run"]}"#.into()),
        ..Default::default()
    };
    let mut labels = linuxkit_labels(&info);
    labels.insert("kiln.test.run".into(), id.into());
    DockerBuild {
        context_dir: dir.to_owned(),
        dockerfile: "Dockerfile".into(),
        extra_sources: extra,
        image: format!("kiln/hello:{tag}").parse().unwrap(),
        arch: arch.into(),
        build_args: linuxkit_build_args(&info, &BTreeMap::new()),
        labels,
        network: false,
        no_cache: false,
    }
}

async fn engine() -> Engine {
    Engine::connect(None)
        .await
        .expect("the Docker engine must run (dockerd --iptables=false --bridge=none)")
}

type Lines = Arc<Mutex<Vec<LogLine>>>;

fn collector() -> (Lines, impl FnMut(LogLine) + Send) {
    let lines: Lines = Arc::default();
    let sink = Arc::clone(&lines);
    (lines, move |l: LogLine| sink.lock().unwrap().push(l))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_amd64_and_arm64_and_pushes_them() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("both");
    let engine = engine().await;

    let d = tempfile::tempdir().unwrap();
    let pkg = d.path().join("pkg");
    write(
        &pkg,
        "Dockerfile",
        &format!(
            "FROM {base}\nARG PKG_IMAGE\nRUN uname -m > /built-on && echo \"$PKG_IMAGE\" > /pkg-image\nCOPY . /ctx/\n"
        ),
    );
    write(&pkg, ".dockerignore", "secret.txt\ndocs\n!docs/keep.txt\n");
    write(&pkg, "docs/keep.txt", "kept by an exception\n");
    write(&pkg, "docs/drop.txt", "excluded\n");
    write(&pkg, "hello.txt", "hello 1\n");
    write(&pkg, "secret.txt", "do not send\n");
    write(d.path(), "shared/lib.txt", "shared\n");
    let extra = vec![(d.path().join("shared"), "vendor".to_owned())];
    let tag = "t1";

    let amd = package(&id, tag, "amd64", &pkg, extra.clone());
    let arm = package(&id, tag, "arm64", &pkg, extra.clone());
    let (amd_lines, mut amd_log) = collector();
    let (_arm_lines, mut arm_log) = collector();
    let (a, b) = tokio::join!(
        build_landed(
            &engine,
            &amd,
            &registry.addr,
            &mut amd_log,
            CancellationToken::new()
        ),
        build_landed(
            &engine,
            &arm,
            &registry.addr,
            &mut arm_log,
            CancellationToken::new()
        ),
    );
    let a = a.unwrap_or_else(|e| panic!("amd64: {e}"));
    let b = b.unwrap_or_else(|e| panic!("arm64: {e}"));

    for (outcome, arch, uname) in [(&a, "amd64", "x86_64"), (&b, "arm64", "aarch64")] {
        let raw = registry.raw_manifest("kiln/hello", &format!("{tag}-{arch}"));
        assert_eq!(outcome.manifest.digest.hex(), sha256_hex(&raw), "{arch}");
        assert_eq!(outcome.manifest.size, raw.len() as u64);
        assert_eq!(
            outcome.manifest.media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        let config = registry.config("kiln/hello", &format!("{tag}-{arch}"));
        assert_eq!(config["architecture"], arch);
        assert_eq!(
            config["config"]["Labels"]["org.mobyproject.config"],
            r#"{"binds":["/run:/run"]}"#
        );
        let reference = format!("{}/kiln/hello:{tag}-{arch}", registry.addr);
        let out = docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--platform",
            &format!("linux/{arch}"),
            &reference,
            "sh",
            "-c",
            "uname -m; cat /built-on /pkg-image; ls /ctx /ctx/vendor /ctx/docs",
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], uname, "{out}");
        assert_eq!(lines[1], uname, "the RUN step ran on {arch}: {out}");
        assert_eq!(lines[2], "kiln/hello", "PKG_IMAGE build arg: {out}");
        assert!(
            out.contains("hello.txt") && out.contains("lib.txt"),
            "{out}"
        );
        assert!(!out.contains("secret.txt"), ".dockerignore: {out}");
        assert!(
            out.contains("keep.txt") && !out.contains("drop.txt"),
            "{out}"
        );
        docker(&["rmi", &reference]);
    }
    assert!(
        amd_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.source == LogSource::Step && l.text.contains("RUN uname -m")),
        "the log has the RUN step"
    );

    // A changed file: the FROM and RUN steps come from the cache, and the base layer and
    // RUN layer are already in the registry.
    write(&pkg, "hello.txt", "hello 2\n");
    let amd = package(&id, "t2", "amd64", &pkg, extra);
    let (again_lines, mut log) = collector();
    let again = build_landed(
        &engine,
        &amd,
        &registry.addr,
        &mut log,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(again.cache_hits >= 1, "{again:?}");
    assert!(
        again_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.text.starts_with("CACHED") && l.text.contains("RUN uname -m")),
        "the RUN step came from the cache"
    );
    assert_eq!(
        again.push.pushed, 1,
        "only the COPY layer travels: {again:?}"
    );
    assert!(again.push.existing >= 2, "{again:?}");
    assert_ne!(again.manifest.digest, a.manifest.digest);

    assert_eq!(
        labelled_images(&id),
        Vec::<String>::new(),
        "nothing left in the engine"
    );
    assert_eq!(
        containers_of(&registry.addr, &id),
        Vec::<String>::new(),
        "no container left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_names_itself_and_its_output() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("fail");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "Dockerfile",
        &format!("FROM {base}\nRUN echo about-to-fail && echo on-stderr >&2 && exit 3\n"),
    );
    let build = package(&id, "t1", "arm64", d.path(), vec![]);
    let (_l, mut log) = collector();
    let err = build_landed(
        &engine,
        &build,
        &registry.addr,
        &mut log,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    match &err {
        DockerBuildError::StepFailed { step, tail, .. } => {
            assert!(step.contains("RUN echo about-to-fail"), "{msg}");
            assert!(tail.iter().any(|l| l == "about-to-fail"), "{msg}");
            assert!(tail.iter().any(|l| l == "on-stderr"), "{msg}");
        }
        other => panic!("expected StepFailed, got {other:?}"),
    }
    assert!(
        msg.contains("kiln/hello:t1 (arm64)") && msg.contains("exit code: 3"),
        "{msg}"
    );
    assert_eq!(labelled_images(&id), Vec::<String>::new());

    // A Dockerfile error is reported as the engine says it.
    write(d.path(), "Dockerfile", "FROM\n");
    let (_l, mut log) = collector();
    let err = build_landed(
        &engine,
        &build,
        &registry.addr,
        &mut log,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, DockerBuildError::BuildFailed { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("FROM"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_fails_says_where_and_leaves_nothing() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("push");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "Dockerfile", &format!("FROM {base}\nCOPY f /f\n"));
    write(d.path(), "f", &id);
    let build = package(&id, "t1", "amd64", d.path(), vec![]);
    // A loopback port with no registry behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}");
    let (_l, mut log) = collector();
    let err = build_landed(
        &engine,
        &build,
        &nowhere,
        &mut log,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DockerBuildError::Push { .. }), "{err:?}");
    assert!(msg.contains(&nowhere) && msg.contains("refused"), "{msg}");
    assert_eq!(
        labelled_images(&id),
        Vec::<String>::new(),
        "the built image was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_left_by_an_earlier_build_leaves_no_dangling_image() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("stale");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "Dockerfile", &format!("FROM {base}\nCOPY f /f\n"));
    write(d.path(), "f", "left behind\n");
    let build = package(&id, "t1", "amd64", d.path(), vec![]);
    let reference = format!("{}/kiln/hello:t1-amd64", registry.addr);
    // What a build whose engine went away after tagging leaves.
    run(Command::new(DOCKER)
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "-q", "--network", "none", "--label"])
        .arg(format!("kiln.test.run={id}"))
        .args(["-t", &reference])
        .arg(d.path()));
    assert_eq!(labelled_images(&id).len(), 1);
    write(d.path(), "f", "new content\n");
    let (_l, mut log) = collector();
    build_landed(
        &engine,
        &build,
        &registry.addr,
        &mut log,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(labelled_images(&id), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_keeps_the_tag_until_the_image_has_landed() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("landed");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "Dockerfile", &format!("FROM {base}\nCOPY f /f\n"));
    for (i, tag) in ["removed", "dropped"].into_iter().enumerate() {
        write(d.path(), "f", &format!("content {i}\n"));
        let build = package(&id, tag, "amd64", d.path(), vec![]);
        let (_l, mut log) = collector();
        let (outcome, engine_tag) = build_arch(
            &engine,
            &build,
            &registry.addr,
            &mut log,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            engine_tag.reference(),
            format!("{}/kiln/hello:{tag}-amd64", registry.addr)
        );
        // Served already: the registry has the manifest while the engine holds the tag.
        let raw = registry.raw_manifest("kiln/hello", &format!("{tag}-amd64"));
        assert_eq!(outcome.manifest.digest.hex(), sha256_hex(&raw));
        assert_eq!(labelled_images(&id).len(), 1, "{tag}");
        if tag == "removed" {
            engine_tag.remove().await.unwrap();
            assert_eq!(labelled_images(&id), Vec::<String>::new());
        } else {
            // Dropped unremoved (a landing that failed): removed in the background.
            drop(engine_tag);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !labelled_images(&id).is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "the dropped tag stays in the engine"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_is_none_unless_the_package_asks_for_it() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("net");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    // The RUN step fails unless it sees only the loopback interface (network none), or
    // more than it (the host's network), as the build arg asks.
    write(
        d.path(),
        "Dockerfile",
        &format!(
            "FROM {base}\nARG EXPECT\nRUN n=$(/bin/busybox grep -c : /proc/net/dev); echo \"$n interfaces\"; \
             if [ \"$EXPECT\" = none ]; then [ $n -eq 1 ]; else [ $n -gt 1 ]; fi\n"
        ),
    );
    for (network, expect) in [(false, "none"), (true, "host")] {
        let mut build = package(&id, expect, "amd64", d.path(), vec![]);
        build.network = network;
        build.no_cache = true;
        build.build_args.insert("EXPECT".into(), expect.into());
        let (lines, mut log) = collector();
        let r = build_landed(
            &engine,
            &build,
            &registry.addr,
            &mut log,
            CancellationToken::new(),
        )
        .await;
        let seen: Vec<String> = lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.text.clone())
            .collect();
        assert!(r.is_ok(), "network {expect}: {r:?}\n{}", seen.join("\n"));
        assert!(
            seen.iter().any(|l| l.ends_with(" interfaces")),
            "no_cache ran the step: {seen:?}"
        );
    }
    assert_eq!(labelled_images(&id), Vec::<String>::new());
}

/// Waits until no process runs `needle` (the engine stopped the step), with a deadline.
fn wait_no_process(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("pgrep").args(["-f", needle]).output().unwrap();
        if !out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the engine still runs {needle:?} 30s after the build was stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a process runs `needle` (the step really runs in the engine), with a
/// deadline.
async fn wait_process(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("pgrep").args(["-f", needle]).output().unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no process runs {needle:?} 60s after its step started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A log sink that wakes the returned `Notify` when the step prints "started".
fn on_started() -> (Arc<tokio::sync::Notify>, impl FnMut(LogLine) + Send) {
    let started = Arc::new(tokio::sync::Notify::new());
    let notify = Arc::clone(&started);
    (started, move |l: LogLine| {
        if l.text == "started" {
            notify.notify_one();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_engine_build_and_leaves_nothing() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("cancel");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    // A sleep length that identifies this step among the machine's processes.
    let secs = 300 + std::process::id() % 600;
    write(
        d.path(),
        "Dockerfile",
        &format!("FROM {base}\nRUN echo started && sleep {secs}\n"),
    );
    let build = package(&id, "t1", "amd64", d.path(), vec![]);
    let cancel = CancellationToken::new();
    let (started, mut log) = on_started();
    let needle = format!("sleep {secs}");
    let t0 = Instant::now();
    let (result, ()) = tokio::join!(
        build_landed(&engine, &build, &registry.addr, &mut log, cancel.clone()),
        async {
            started.notified().await;
            wait_process(&needle).await;
            cancel.cancel();
        }
    );
    let err = result.unwrap_err();
    assert!(matches!(err, DockerBuildError::Cancelled { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(secs as u64));
    wait_no_process(&needle);
    assert_eq!(labelled_images(&id), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_build_future_stops_the_engine_build() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("drop");
    let engine = engine().await;
    let d = tempfile::tempdir().unwrap();
    let secs = 1500 + std::process::id() % 600;
    write(
        d.path(),
        "Dockerfile",
        &format!("FROM {base}\nRUN echo started && sleep {secs}\n"),
    );
    let build = package(&id, "t1", "arm64", d.path(), vec![]);
    let (started, mut log) = on_started();
    let needle = format!("sleep {secs}");
    tokio::select! {
        r = build_landed(&engine, &build, &registry.addr, &mut log, CancellationToken::new()) => {
            panic!("the build ended on its own: {r:?}")
        }
        () = async {
            started.notified().await;
            wait_process(&needle).await;
        } => {}
    }
    // The build future is gone: its connection closed, and the engine stops the step.
    wait_no_process(&needle);
    assert_eq!(labelled_images(&id), Vec::<String>::new());
}

/// A TCP front for the engine's unix socket that can cut every connection at once: the
/// engine as a build client sees it when the engine dies or restarts.
async fn cuttable_engine_proxy(cut: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = tokio::select! {
                r = listener.accept() => r.unwrap(),
                () = cut.cancelled() => return,
            };
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut engine = tokio::net::UnixStream::connect("/var/run/docker.sock")
                    .await
                    .unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
                    () = cut.cancelled() => {}
                }
            });
        }
    });
    format!("tcp://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_mid_build_is_reported() {
    let registry = Registry::start();
    let base = push_base(&registry);
    let id = run_id("lost");
    let cut = CancellationToken::new();
    let endpoint = cuttable_engine_proxy(cut.clone()).await;
    let engine = Engine::connect(Some(&endpoint)).await.unwrap();
    let d = tempfile::tempdir().unwrap();
    let secs = 900 + std::process::id() % 600;
    write(
        d.path(),
        "Dockerfile",
        &format!("FROM {base}\nRUN echo started && sleep {secs}\n"),
    );
    let build = package(&id, "t1", "amd64", d.path(), vec![]);
    let (started, mut log) = on_started();
    let needle = format!("sleep {secs}");
    let (result, ()) = tokio::join!(
        build_landed(
            &engine,
            &build,
            &registry.addr,
            &mut log,
            CancellationToken::new(),
        ),
        async {
            started.notified().await;
            wait_process(&needle).await;
            cut.cancel();
        }
    );
    let err = result.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DockerBuildError::EngineLost { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains(&endpoint) && msg.contains("kiln builds again"),
        "{msg}"
    );
    // The engine saw its client go and stopped the build.
    wait_no_process(&needle);
    assert_eq!(labelled_images(&id), Vec::<String>::new());
}

#[tokio::test]
async fn an_unreachable_engine_fails_the_build_with_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "Dockerfile", "FROM scratch\n");
    let sock = d.path().join("no-engine.sock");
    let engine = Engine::new(Some(&format!("unix://{}", sock.display())));
    // bollard refuses a socket path that does not exist up front; either way the message
    // names the engine and what to do.
    let msg = match engine {
        Err(e) => e.to_string(),
        Ok(engine) => {
            let build = package("x", "t1", "amd64", d.path(), vec![]);
            let (_l, mut log) = collector();
            build_landed(
                &engine,
                &build,
                "127.0.0.1:1",
                &mut log,
                CancellationToken::new(),
            )
            .await
            .unwrap_err()
            .to_string()
        }
    };
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    assert!(
        msg.contains("start dockerd or set DOCKER_HOST / --engine"),
        "{msg}"
    );
}
