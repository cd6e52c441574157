//! Builds of real Dockerfiles into temporary caches, checked through the blobs they
//! produce.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;
use crate::oci::{ImageIndex, ImageManifest};

pub(crate) struct Pkg {
    pub dir: tempfile::TempDir,
}

impl Pkg {
    pub fn new(dockerfile: &str) -> Pkg {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("pkg")).unwrap();
        fs::write(dir.path().join("pkg/Dockerfile"), dockerfile).unwrap();
        Pkg { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("pkg")
    }

    pub fn file(&self, rel: &str, body: &str, mode: u32) -> &Self {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn input(&self, image: &str) -> NativeBuild {
        NativeBuild {
            context: self.root(),
            dockerfile: self.root().join("Dockerfile"),
            extra_sources: Vec::new(),
            image: image.parse().unwrap(),
            arches: vec![("amd64".into(), None), ("arm64".into(), None)],
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            source_date_epoch: 0,
            target: None,
            network: false,
            no_cache: false,
            cancel: Default::default(),
        }
    }
}

pub(crate) fn build_in(cache: &Cache, input: &NativeBuild) -> Result<BuildOutput, NativeError> {
    let mut lines = Vec::new();
    build(cache, input, &CacheResolver, &mut |l| lines.push(l))
}

fn new_cache() -> (tempfile::TempDir, Cache) {
    let d = tempfile::tempdir().unwrap();
    let c = Cache::open(&d.path().join("cache")).unwrap();
    (d, c)
}

fn manifest(cache: &Cache, d: &Descriptor) -> ImageManifest {
    serde_json::from_slice(&cache.read_blob(&d.digest, 1 << 20).unwrap()).unwrap()
}

fn config(cache: &Cache, m: &ImageManifest) -> serde_json::Value {
    serde_json::from_slice(&cache.read_blob(&m.config.digest, 1 << 20).unwrap()).unwrap()
}

/// (path, type char, mode, uid, gid, content or link target)
type Entry = (String, char, u32, u64, u64, String);

fn entries(cache: &Cache, layer: &Descriptor) -> Vec<Entry> {
    let f = fs::File::open(cache.blob_path(&layer.digest)).unwrap();
    let mut a = tar::Archive::new(flate2::read::MultiGzDecoder::new(f));
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        assert_eq!(h.mtime().unwrap(), 0);
        let t = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Regular => 'f',
            other => panic!("{other:?}"),
        };
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let body = if t == 'l' {
            e.link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        } else {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            String::from_utf8_lossy(&v).into_owned()
        };
        out.push((
            path,
            t,
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            body,
        ));
    }
    out
}

fn e(path: &str, t: char, mode: u32, uid: u64, body: &str) -> Entry {
    (path.into(), t, mode, uid, uid, body.into())
}

#[test]
fn copies_from_scratch_with_docker_semantics() {
    let pkg = Pkg::new(
        "FROM scratch\n\
         COPY etc /etc/\n\
         COPY --chmod=0600 --chown=7:8 bin/tool /usr/local/bin/\n\
         COPY bin/tool /renamed\n\
         ENV GREETING=hello\n\
         WORKDIR /srv/app\n\
         COPY ./*.txt ./\n\
         CMD [\"/usr/local/bin/tool\"]\n",
    );
    pkg.file("etc/motd", "hi\n", 0o644)
        .file("etc/conf.d/a.conf", "a=1\n", 0o640)
        .file("bin/tool", "#!/bin/sh\necho tool\n", 0o755)
        .file("one.txt", "1", 0o644)
        .file("two.txt", "2", 0o644)
        .file("skip.md", "no", 0o644);
    std::os::unix::fs::symlink("motd", pkg.root().join("etc/motd.link")).unwrap();
    let (_d, cache) = new_cache();
    let out = build_in(&cache, &pkg.input("kiln/hello:t1")).unwrap();
    assert_eq!(out.per_arch.len(), 2);
    let m = manifest(&cache, &out.per_arch[0].1);
    assert_eq!(m.layers.len(), 5, "four COPYs and the WORKDIR directory");
    assert_eq!(
        entries(&cache, &m.layers[0]),
        vec![
            e("etc/", 'd', 0o755, 0, ""),
            e("etc/conf.d/", 'd', 0o755, 0, ""),
            e("etc/conf.d/a.conf", 'f', 0o640, 0, "a=1\n"),
            e("etc/motd", 'f', 0o644, 0, "hi\n"),
            e("etc/motd.link", 'l', 0o777, 0, "motd"),
        ]
    );
    assert_eq!(
        entries(&cache, &m.layers[1]),
        vec![
            ("usr/".into(), 'd', 0o755, 7, 8, String::new()),
            ("usr/local/".into(), 'd', 0o755, 7, 8, String::new()),
            ("usr/local/bin/".into(), 'd', 0o755, 7, 8, String::new()),
            (
                "usr/local/bin/tool".into(),
                'f',
                0o600,
                7,
                8,
                "#!/bin/sh\necho tool\n".into()
            ),
        ]
    );
    assert_eq!(
        entries(&cache, &m.layers[2]),
        vec![e("renamed", 'f', 0o755, 0, "#!/bin/sh\necho tool\n")]
    );
    assert_eq!(
        entries(&cache, &m.layers[3]),
        vec![
            e("srv/", 'd', 0o755, 0, ""),
            e("srv/app/", 'd', 0o755, 0, "")
        ]
    );
    assert_eq!(
        entries(&cache, &m.layers[4]),
        vec![
            e("srv/", 'd', 0o755, 0, ""),
            e("srv/app/", 'd', 0o755, 0, ""),
            e("srv/app/one.txt", 'f', 0o644, 0, "1"),
            e("srv/app/two.txt", 'f', 0o644, 0, "2"),
        ]
    );
    let c = config(&cache, &m);
    assert_eq!(c["architecture"], "amd64");
    assert_eq!(c["created"], "1970-01-01T00:00:00Z");
    assert_eq!(
        c["config"]["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "GREETING=hello"
        ])
    );
    assert_eq!(c["config"]["WorkingDir"], "/srv/app");
    assert_eq!(
        c["config"]["Cmd"],
        serde_json::json!(["/usr/local/bin/tool"])
    );
    assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 5);
    // The index holds both arches, and the per-arch names exist.
    let idx = cache.index().unwrap();
    assert!(idx.get("docker.io/kiln/hello:t1-amd64").is_some());
    assert!(idx.get("docker.io/kiln/hello:t1-arm64").is_some());
    let index: ImageIndex = serde_json::from_slice(
        &cache
            .read_blob(&idx.get("docker.io/kiln/hello:t1").unwrap().digest, 1 << 20)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(index.manifests.len(), 2);
}

pub(crate) fn err_of(pkg: &Pkg) -> String {
    let (_d, cache) = new_cache();
    build_in(&cache, &pkg.input("kiln/x:t"))
        .unwrap_err()
        .to_string()
}

#[test]
fn same_inputs_give_identical_digests_in_fresh_caches() {
    let pkg = Pkg::new(
        "FROM scratch AS a\nCOPY big /big\nFROM scratch\nCOPY --from=a /big /copied\nCOPY small dir/ /\nLABEL x=y\n",
    );
    // More than one gzip chunk, with some structure so it compresses.
    let big: String = (0..300_000u64)
        .map(|i| format!("{:x}\n", i * 7919))
        .collect();
    assert!(big.len() > 2 * CHUNK);
    pkg.file("big", &big, 0o644)
        .file("small", "s", 0o600)
        .file("dir/x", "x", 0o644);
    let (_d1, c1) = new_cache();
    let (_d2, c2) = new_cache();
    let a = build_in(&c1, &pkg.input("kiln/det:t")).unwrap();
    let b = build_in(&c2, &pkg.input("kiln/det:t")).unwrap();
    assert_eq!(a.index, b.index);
    assert_eq!(a.per_arch, b.per_arch);
    let again = build_in(&c1, &pkg.input("kiln/det:t")).unwrap();
    assert_eq!(a.index, again.index);
    // A different epoch changes the digests.
    let mut later = pkg.input("kiln/det:t");
    later.source_date_epoch = 1_700_000_000;
    let c = build_in(&c2, &later).unwrap();
    assert_ne!(a.index.digest, c.index.digest);
    // The multi-member layer decompresses to what its diff_id says.
    let m = manifest(&c1, &a.per_arch[0].1);
    let conf = config(&c1, &m);
    let f = fs::File::open(c1.blob_path(&m.layers[0].digest)).unwrap();
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(f)
        .read_to_end(&mut tar)
        .unwrap();
    let diff_id =
        kiln_shared::digest::Digest::from_sha256_bytes(&sha2::Sha256::digest(&tar).into());
    assert_eq!(conf["rootfs"]["diff_ids"][0], diff_id.to_string());
    let gunzip = std::process::Command::new("gzip")
        .args(["-t"])
        .arg(c1.blob_path(&m.layers[0].digest))
        .status()
        .unwrap();
    assert!(gunzip.success(), "gzip -t rejects the layer");
}

use sha2::Digest as _;

#[test]
fn refuses_archives_it_cannot_read_and_a_base_with_onbuild() {
    let pkg = Pkg::new("FROM scratch\nADD a.tar.xz /\n");
    fs::write(
        pkg.root().join("a.tar.xz"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2],
    )
    .unwrap();
    assert_eq!(
        err_of(&pkg),
        format!(
            "{}:2: ADD a.tar.xz: the file is xz-compressed; the native builder unpacks only plain and gzip-compressed tar archives; the native builder cannot do this, use the docker builder (--builder docker)",
            pkg.root().join("Dockerfile").display()
        )
    );

    let (_d, cache) = new_cache();
    let base = Pkg::new("FROM scratch\nONBUILD COPY . /app\n");
    build_in(&cache, &base.input("kiln/onbuild:t")).unwrap();
    let top = Pkg::new("FROM kiln/onbuild:t\nLABEL a=b\n");
    assert_eq!(
        build_in(&cache, &top.input("kiln/top:t"))
            .unwrap_err()
            .to_string(),
        format!(
            "{}:1: FROM kiln/onbuild:t: the base has ONBUILD triggers, which must run in this build; the native builder cannot do this, use the docker builder (--builder docker)",
            top.root().join("Dockerfile").display()
        )
    );
}

#[test]
fn instruction_errors_name_file_line_and_arch() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            "FROM scratch\nCOPY missing /x\n",
            &[],
            "2: COPY missing: not found in the build context (or excluded by .dockerignore) (amd64)",
        ),
        (
            "FROM scratch\nCOPY --chown=nobody a /x\n",
            &[("a", "a")],
            "2: --chown=nobody: /etc/passwd does not exist in the image, so names cannot be resolved; use numeric ids (amd64)",
        ),
        (
            "FROM scratch\nCOPY etc/passwd /etc/passwd\nCOPY --chown=ghost a /x\n",
            &[("a", "a"), ("etc/passwd", "root:x:0:0::/:/bin/sh\n")],
            "3: --chown=ghost: ghost is not in /etc/passwd (amd64)",
        ),
        (
            "FROM kiln/absent:1.0\n",
            &[],
            "1: kiln/absent:1.0 is not in the cache (looked for docker.io/kiln/absent:1.0, kiln/absent:1.0); build or pull it first (amd64)",
        ),
        (
            "FROM scratch\nCOPY a b /dst\n",
            &[("a", "a"), ("b", "b")],
            "2: when using COPY with more than one source file, the destination must be a directory and end with a / (amd64)",
        ),
        (
            "FROM scratch\nCOPY ${X:?required} /\n",
            &[],
            "2: X: required (amd64)",
        ),
        (
            "FROM scratch\nEXPOSE 80/tcp 99999\n",
            &[],
            "2: invalid port \"99999\" in EXPOSE: use PORT[/PROTO] or START-END[/PROTO] (amd64)",
        ),
        (
            "FROM scratch\nSTOPSIGNAL SIGNOPE\n",
            &[],
            "2: invalid signal: SIGNOPE (amd64)",
        ),
        (
            "FROM scratch\nHEALTHCHECK --interval=10 CMD true\n",
            &[],
            "2: --interval: invalid duration \"10\": use a number with a unit, such as 30s or 1m30s (amd64)",
        ),
    ];
    for (dockerfile, files, want) in cases {
        let pkg = Pkg::new(dockerfile);
        for (f, body) in *files {
            pkg.file(f, body, 0o644);
        }
        let want = format!("{}:{want}", pkg.root().join("Dockerfile").display());
        assert_eq!(err_of(&pkg), want, "{dockerfile}");
    }
}

#[test]
fn a_symlink_source_leaving_the_context_is_an_error() {
    let pkg = Pkg::new("FROM scratch\nCOPY out /x\n");
    std::os::unix::fs::symlink("../../etc/passwd", pkg.root().join("out")).unwrap();
    assert_eq!(
        err_of(&pkg),
        format!(
            "{}:2: COPY source out: symlink /out points to ../../etc/passwd, outside the build context; copy what it points to into the package instead (amd64)",
            pkg.root().join("Dockerfile").display()
        )
    );
    // Inside a copied directory, such a link is kept as a link (never followed).
    let pkg = Pkg::new("FROM scratch\nCOPY d /d\n");
    fs::create_dir_all(pkg.root().join("d")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", pkg.root().join("d/l")).unwrap();
    let (_d, cache) = new_cache();
    let out = build_in(&cache, &pkg.input("kiln/l:t")).unwrap();
    let m = manifest(&cache, &out.per_arch[0].1);
    assert_eq!(
        entries(&cache, &m.layers[0]),
        vec![
            e("d/", 'd', 0o755, 0, ""),
            e("d/l", 'l', 0o777, 0, "/etc/passwd")
        ]
    );
}

#[test]
fn add_unpacks_local_tar_archives_and_copies_other_files() {
    let pkg = Pkg::new("FROM scratch\nADD a.tar.gz /opt/\nADD plain.tar /p\nADD notatar.gz /n/\n");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o640);
    h.set_uid(42);
    h.set_gid(43);
    b.append_data(&mut h, "pkg/file", &b"hello"[..]).unwrap();
    let tar_bytes = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    fs::write(pkg.root().join("a.tar.gz"), gz.finish().unwrap()).unwrap();
    fs::write(pkg.root().join("plain.tar"), &tar_bytes).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"just text").unwrap();
    fs::write(pkg.root().join("notatar.gz"), gz.finish().unwrap()).unwrap();
    fs::set_permissions(
        pkg.root().join("notatar.gz"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (_d, cache) = new_cache();
    let out = build_in(&cache, &pkg.input("kiln/add:t")).unwrap();
    let m = manifest(&cache, &out.per_arch[0].1);
    let l0 = entries(&cache, &m.layers[0]);
    assert_eq!(
        l0,
        vec![
            e("opt/", 'd', 0o755, 0, ""),
            e("opt/pkg/", 'd', 0o755, 0, ""),
            ("opt/pkg/file".into(), 'f', 0o640, 42, 43, "hello".into()),
        ]
    );
    let l1 = entries(&cache, &m.layers[1]);
    assert_eq!(l1[0], e("p/", 'd', 0o755, 0, ""));
    assert_eq!(
        l1[2],
        ("p/pkg/file".into(), 'f', 0o640, 42, 43, "hello".into())
    );
    let l2 = entries(&cache, &m.layers[2]);
    assert_eq!(l2[0], e("n/", 'd', 0o755, 0, ""));
    assert_eq!(l2[1].0, "n/notatar.gz");
    assert_eq!(l2[1].2, 0o644);
}

#[test]
fn arg_scoping_build_args_and_platform_args() {
    let pkg = Pkg::new(
        "ARG V=global\nARG ONLY_GLOBAL=g\nFROM scratch\nARG V\nARG TARGETARCH\nARG TARGETPLATFORM\nARG LOCAL=${V}-local\n\
         LABEL v=$V only=[${ONLY_GLOBAL}] local=$LOCAL arch=$TARGETARCH plat=$TARGETPLATFORM unset=${NOPE:-dflt}\n\
         ENV LOCAL=env\nLABEL after=$LOCAL\n",
    );
    let (_d, cache) = new_cache();
    let mut input = pkg.input("kiln/args:t");
    input.build_args.insert("V".into(), "cli".into());
    input
        .labels
        .insert("org.opencontainers.image.source".into(), "kiln".into());
    let out = build_in(&cache, &input).unwrap();
    let m = manifest(&cache, &out.per_arch[1].1);
    let c = config(&cache, &m);
    let labels = &c["config"]["Labels"];
    assert_eq!(labels["v"], "cli");
    assert_eq!(
        labels["only"], "[]",
        "a global ARG must be redeclared in the stage"
    );
    assert_eq!(labels["local"], "cli-local");
    assert_eq!(labels["arch"], "arm64");
    assert_eq!(labels["plat"], "linux/arm64");
    assert_eq!(labels["unset"], "dflt");
    assert_eq!(labels["after"], "env", "ENV wins over ARG");
    assert_eq!(labels["org.opencontainers.image.source"], "kiln");
    assert_eq!(c["architecture"], "arm64");
    assert!(m.layers.is_empty());
}

#[test]
fn copy_from_a_stage_keeps_owners_and_from_an_image_in_the_cache() {
    let (_d, cache) = new_cache();
    let base = Pkg::new("FROM scratch\nCOPY --chown=5:6 f /data/f\nCMD [\"base\"]\n");
    base.file("f", "base", 0o600);
    build_in(&cache, &base.input("kiln/base:1")).unwrap();
    let pkg = Pkg::new(
        "FROM kiln/base:1 AS b\nCOPY g /data/g\nFROM scratch\nCOPY --from=b /data /d\nCOPY --from=kiln/base:1 /data/f /img-f\nCMD [\"x\"]\nENTRYPOINT [\"/e\"]\n",
    );
    pkg.file("g", "g", 0o644);
    let out = build_in(&cache, &pkg.input("kiln/from:t")).unwrap();
    let m = manifest(&cache, &out.per_arch[0].1);
    assert_eq!(
        m.layers.len(),
        2,
        "layers of the stage b are not in the target"
    );
    assert_eq!(
        entries(&cache, &m.layers[0]),
        // The destination directory is made as BuildKit makes it (0755, root without
        // --chown); what is copied into it keeps its owners.
        vec![
            ("d/".into(), 'd', 0o755, 0, 0, String::new()),
            ("d/f".into(), 'f', 0o600, 5, 6, "base".into()),
            e("d/g", 'f', 0o644, 0, "g"),
        ]
    );
    assert_eq!(
        entries(&cache, &m.layers[1]),
        vec![("img-f".into(), 'f', 0o600, 5, 6, "base".into())]
    );
    let c = config(&cache, &m);
    assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["/e"]));
    assert_eq!(
        c["config"]["Cmd"],
        serde_json::json!(["x"]),
        "CMD of the same stage stays"
    );
    let child = Pkg::new("FROM kiln/base:1\nENTRYPOINT [\"/e\"]\n");
    let out = build_in(&cache, &child.input("kiln/child:t")).unwrap();
    let m = manifest(&cache, &out.per_arch[0].1);
    assert_eq!(m.layers.len(), 1, "the base's layer");
    let c = config(&cache, &m);
    assert!(
        c["config"].get("Cmd").is_none(),
        "ENTRYPOINT resets an inherited CMD"
    );
}

#[test]
fn shell_forms_use_the_shell_and_config_fields_are_set() {
    let pkg = Pkg::new(
        "FROM scratch\nSHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nENTRYPOINT exec app\nCMD run --now\nUSER 10:20\nEXPOSE 80 1000-1001/udp\nVOLUME /a /b\nSTOPSIGNAL 9\nHEALTHCHECK --interval=1m30s --retries=3 CMD check\nMAINTAINER me\n",
    );
    let (_d, cache) = new_cache();
    let out = build_in(&cache, &pkg.input("kiln/cfg:t")).unwrap();
    let c = config(&cache, &manifest(&cache, &out.per_arch[0].1));
    let cc = &c["config"];
    assert_eq!(
        cc["Entrypoint"],
        serde_json::json!(["/bin/bash", "-eu", "-c", "exec app"])
    );
    assert_eq!(
        cc["Cmd"],
        serde_json::json!(["/bin/bash", "-eu", "-c", "run --now"])
    );
    assert_eq!(cc["User"], "10:20");
    assert_eq!(
        cc["ExposedPorts"],
        serde_json::json!({"1000/udp": {}, "1001/udp": {}, "80/tcp": {}})
    );
    assert_eq!(cc["Volumes"], serde_json::json!({"/a": {}, "/b": {}}));
    assert_eq!(cc["StopSignal"], "9");
    assert_eq!(
        cc["Healthcheck"],
        serde_json::json!({"Test": ["CMD-SHELL", "check"], "Interval": 90_000_000_000i64, "Retries": 3})
    );
    assert_eq!(c["author"], "me");
    assert_eq!(c["history"].as_array().unwrap().len(), 9);
}

#[test]
fn the_examples_build_natively_and_reproducibly() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let input = |pkg: &str, tag: &str| NativeBuild {
        context: examples.join(pkg),
        dockerfile: examples.join(pkg).join("Dockerfile"),
        extra_sources: Vec::new(),
        image: format!("kiln/{pkg}:{tag}").parse().unwrap(),
        arches: vec![("amd64".into(), None), ("arm64".into(), None)],
        build_args: BTreeMap::new(),
        labels: BTreeMap::new(),
        source_date_epoch: 0,
        target: None,
        network: false,
        no_cache: false,
        cancel: Default::default(),
    };
    let mut resolver = WorkspaceResolver::default();
    resolver
        .packages
        .insert("kiln/hello".into(), "kiln/hello:dev".parse().unwrap());
    // `FROM busybox:1.35.0`: the busybox scripts/setup makes stands in for Docker Hub's,
    // as the examples' kiln.toml says.
    let busybox = std::env::var_os("KILN_BASE_DIR")
        .map_or_else(|| "/var/lib/kiln/base".into(), std::path::PathBuf::from)
        .join("busybox");
    let mut digests = Vec::new();
    for _ in 0..2 {
        let (_d, cache) = new_cache();
        cache
            .import_layout(
                &busybox,
                "docker.io/kiln/busybox:latest",
                "docker.io/library/busybox:1.35.0",
            )
            .unwrap_or_else(|e| panic!("{e}: make the base images with scripts/setup"));
        let mut log = |_: String| {};
        let hello = build(&cache, &input("hello", "dev"), &resolver, &mut log).unwrap();
        let site = build(&cache, &input("hello-site", "dev"), &resolver, &mut log).unwrap();
        let m = manifest(&cache, &site.per_arch[1].1);
        assert_eq!(
            m.layers.len(),
            5,
            "busybox's layer, hello's 2, the COPY, and WORKDIR's (empty, as BuildKit's)"
        );
        assert!(entries(&cache, &m.layers[4]).is_empty());
        let motd = entries(&cache, &m.layers[2]);
        assert_eq!(motd[1].5, "Welcome to hello on arm64, built by kiln.\n");
        let c = config(&cache, &m);
        assert_eq!(
            c["rootfs"]["diff_ids"][4],
            "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
            "the well-known empty tar"
        );
        assert_eq!(c["config"]["Env"][1], "HELLO_CONF=/etc/hello/hello.conf");
        assert_eq!(c["config"]["WorkingDir"], "/srv/www");
        digests.push((hello.index.digest, site.index.digest));
    }
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        repository_of("docker.io/kiln/hello:1@sha256:00"),
        "kiln/hello"
    );
    assert_eq!(
        repository_of("localhost:5000/kiln/hello"),
        "localhost:5000/kiln/hello"
    );
}

#[test]
fn long_names_and_link_targets_survive() {
    let long_dir = "d".repeat(60);
    let long_file = format!("{long_dir}/{}", "f".repeat(90));
    let target = format!("../{}", "t".repeat(120));
    let pkg = Pkg::new("FROM scratch\nCOPY tree /tree/\n");
    pkg.file(&format!("tree/{long_file}"), "long", 0o644);
    std::os::unix::fs::symlink(&target, pkg.root().join("tree/link")).unwrap();
    let (_d, cache) = new_cache();
    let out = build_in(&cache, &pkg.input("kiln/long:t")).unwrap();
    let m = manifest(&cache, &out.per_arch[0].1);
    let got = entries(&cache, &m.layers[0]);
    assert_eq!(
        got,
        vec![
            e("tree/", 'd', 0o755, 0, ""),
            e(&format!("tree/{long_dir}/"), 'd', 0o755, 0, ""),
            e(&format!("tree/{long_file}"), 'f', 0o644, 0, "long"),
            e("tree/link", 'l', 0o777, 0, &target),
        ]
    );
}
