//! The registry with real clients (the Docker engine, skopeo, the oci-client crate)
//! against a real listening registry over a temp cache. Tools that are missing make the
//! tests fail: scripts/setup installs them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod docker;
mod flood;
mod oci_client;
mod raw;
mod shutdown;
mod skopeo;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_daemon::cache::Cache;
use kiln_daemon::oci::{Descriptor, OCI_MANIFEST, Platform};
use kiln_daemon::registry::{self, Hooks, RegistryConfig};
use kiln_shared::digest::Digest;
use serde_json::json;

/// A registry serving a temp cache on 127.0.0.1:<free port>, stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub cache: Arc<Cache>,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let served = Arc::clone(&cache);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let draining = shutdown.clone();
        // The registry gets its own runtime on its own thread, so async tests can use
        // the server too.
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let reg = registry::bind(RegistryConfig {
                    listen: vec!["127.0.0.1:0".parse().unwrap()],
                    skip_unavailable: false,
                    ..RegistryConfig::default()
                })
                .await
                .unwrap();
                addr_tx.send(reg.local_addrs()[0]).unwrap();
                tokio::select! {
                    () = reg.serve(served, Hooks::default(), draining) => {}
                    _ = rx => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("the registry thread failed to bind");
        Server {
            addr,
            cache,
            dir,
            stop: Some(stop),
            shutdown,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:<port>/<path>`: an image name for docker and skopeo.
    pub fn name(&self, path: &str) -> String {
        format!("{}/{path}", self.addr)
    }

    /// The digest `docker.io/<name>` names in the cache's index.json.
    pub fn cache_ref(&self, name: &str) -> Option<Digest> {
        self.cache
            .index()
            .unwrap()
            .get(&format!("docker.io/{name}"))
            .map(|d| d.digest.clone())
    }
}

impl Server {
    /// Tells the registry to shut down gracefully (it drains what is in flight).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Without waiting for clients that still send: the test is over.
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a command and returns its stdout; fails the test with its output otherwise.
#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (scripts/setup installs the tools the tests use)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn sha(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest::from_sha256_bytes(&sha2::Sha256::digest(bytes).into())
}

/// One small image for one architecture: a gzipped layer holding `/etc/kiln-arch`, a
/// config whose diff_ids match it, an OCI manifest.
pub struct Image {
    pub arch: String,
    pub layer: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(arch: &str, note: &str) -> Image {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, body) in [
            ("etc/kiln-arch", format!("{arch}\n")),
            ("etc/kiln-note", format!("{note}\n")),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, body.as_bytes()).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let layer = gz.finish().unwrap();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(&tar).to_string()]},
        })
        .to_string()
        .into_bytes();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&layer).to_string(), "size": layer.len()}],
        })
        .to_string()
        .into_bytes();
        Image {
            arch: arch.to_owned(),
            layer,
            config,
            manifest,
        }
    }

    pub fn digest(&self) -> Digest {
        sha(&self.manifest)
    }

    fn platform(&self) -> Platform {
        Platform::linux(&self.arch, None)
    }

    /// Lands the image in a cache the way kilnd's builds do: `<image>:<tag>-<arch>` and
    /// the multi-arch index `<image>:<tag>`.
    pub fn merge_into(&self, cache: &Cache, image: &str) {
        for blob in [&self.layer, &self.config, &self.manifest] {
            cache.put_blob(blob).unwrap();
        }
        cache
            .merge_arch(
                &image.parse().unwrap(),
                &self.arch,
                self.platform(),
                Descriptor::new(OCI_MANIFEST, self.digest(), self.manifest.len() as u64),
                None,
            )
            .unwrap();
    }
}

/// An OCI layout directory (as skopeo reads it) holding `images` under `tag`: the
/// manifest itself for one image, an OCI index of all of them otherwise. Returns the
/// layout path and the digest and bytes of what the tag names.
pub fn write_layout(dir: &Path, tag: &str, images: &[Image]) -> (PathBuf, Digest, Vec<u8>) {
    let root = dir.join(format!("layout-{tag}"));
    let blobs = root.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        d
    };
    for i in images {
        put(&i.layer);
        put(&i.config);
        put(&i.manifest);
    }
    let (media_type, top) = if let [one] = images {
        (OCI_MANIFEST, one.manifest.clone())
    } else {
        let entries: Vec<_> = images
            .iter()
            .map(|i| {
                json!({"mediaType": OCI_MANIFEST, "digest": i.digest().to_string(), "size": i.manifest.len(),
                       "platform": {"os": "linux", "architecture": i.arch}})
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": kiln_daemon::oci::OCI_INDEX, "manifests": entries});
        (kiln_daemon::oci::OCI_INDEX, index.to_string().into_bytes())
    };
    let d = put(&top);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": media_type, "digest": d.to_string(), "size": top.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(root.join("index.json"), index.to_string()).unwrap();
    (root, d, top)
}

/// The digest an OCI layout's index.json names under `tag`.
pub fn layout_ref(root: &Path, tag: &str) -> Digest {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"));
    entry["digest"].as_str().unwrap().parse().unwrap()
}
