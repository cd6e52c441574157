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
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            s
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
