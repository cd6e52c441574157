//! The local base images that `scripts/setup` makes (no image can come from Docker Hub):
//! where their OCI layout is, which references it holds, and copying them into a registry
//! (kilnd's or a [`crate::registry::Registry`]) so that a `FROM` can pull them.

use std::fs;
use std::path::PathBuf;

use serde::Deserialize;

use crate::cmd::skopeo;

/// The multi-arch (linux/amd64, linux/arm64) busybox, as a reference in the layout and,
/// without `docker.io/`, in a registry: `ADDR/kiln/busybox:latest`.
pub const BUSYBOX: &str = "docker.io/kiln/busybox:latest";

/// The repository path of the busybox image inside a registry.
pub const BUSYBOX_REPO: &str = "kiln/busybox";

/// Where `scripts/setup` keeps the base images: `$KILN_BASE_DIR`, else `/var/lib/kiln/base`.
pub fn base_dir() -> PathBuf {
    std::env::var_os("KILN_BASE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln/base"))
}

/// The busybox OCI layout; panics with what to do if setup has not made it.
pub fn busybox_layout() -> PathBuf {
    let layout = base_dir().join("busybox");
    if !layout.join("index.json").is_file() {
        panic!(
            "no base image layout at {} (index.json missing); run scripts/setup as root",
            layout.display()
        );
    }
    layout
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<LayoutEntry>,
}

#[derive(Deserialize)]
struct LayoutEntry {
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// The full reference names (`docker.io/kiln/busybox:TAG`) in the busybox layout.
pub fn busybox_refs() -> Vec<String> {
    let path = busybox_layout().join("index.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let index: LayoutIndex =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    index
        .manifests
        .into_iter()
        .filter_map(|m| {
            m.annotations
                .get("org.opencontainers.image.ref.name")
                .cloned()
        })
        .collect()
}

/// Copies every base image reference (all platforms) into the registry at `registry_addr`
/// (`127.0.0.1:PORT`, plain HTTP) with skopeo; returns the references pushed, like
/// `127.0.0.1:PORT/kiln/busybox:latest`.
pub fn seed_base_images(registry_addr: &str) -> Vec<String> {
    let layout = busybox_layout();
    let mut pushed = Vec::new();
    for full in busybox_refs() {
        let in_registry = full.strip_prefix("docker.io/").unwrap_or(&full);
        let dest = format!("{registry_addr}/{in_registry}");
        skopeo()
            .args(["copy", "--all", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{full}", layout.display()))
            .arg(format!("docker://{dest}"))
            .run();
        pushed.push(dest);
    }
    pushed
}
