//! Small workspaces for end-to-end tests: packages written into a [`Dir`], the busybox
//! base imported by `kiln.toml`, a copy of `examples/`, and what kilnd's registry serves
//! for a reference (its manifest and digest, read with skopeo).

use std::path::{Path, PathBuf};

use crate::base::{BUSYBOX, busybox_layout};
use crate::cmd::{cmd, skopeo};
use crate::dir::Dir;

/// A `kiln.toml` that imports the busybox base image (`FROM kiln/busybox:latest`).
pub fn busybox_kiln_toml() -> String {
    format!(
        "[[import]]\nlayout = \"{}\"\nref = \"{BUSYBOX}\"\n",
        busybox_layout().display()
    )
}

/// Writes package `rel` (org `kiln`, image = the last path component) with a build.yml
/// for `arches` and `dockerfile`; returns its image name `kiln/<image>`.
pub fn write_package(ws: &Dir, rel: &str, arches: &[&str], dockerfile: &str) -> String {
    let image = Path::new(rel)
        .file_name()
        .unwrap_or_else(|| panic!("no package name in {rel:?}"))
        .to_string_lossy()
        .into_owned();
    let mut yml = format!("image: {image}\norg: kiln\narches:\n");
    for a in arches {
        yml.push_str(&format!("  - {a}\n"));
    }
    ws.write(format!("{rel}/build.yml"), yml);
    ws.write(format!("{rel}/Dockerfile"), dockerfile);
    format!("kiln/{image}")
}

/// Copies the repository's `examples/` workspace into `into/<name>`.
pub fn copy_examples(into: &Dir, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let dest = into.join(name);
    cmd("cp").arg("-a").arg(&src).arg(&dest).run();
    dest
}

/// The raw manifest (or index) the registry at `addr` serves for `reference`
/// (`org/image:tag`), as skopeo reads it.
pub fn registry_manifest(addr: &str, reference: &str) -> String {
    skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{addr}/{reference}"))
        .stdout()
}

/// Whether the registry at `addr` serves `reference` (skopeo reads its manifest).
pub fn registry_has(addr: &str, reference: &str) -> bool {
    skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{addr}/{reference}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The digest of what the registry serves for `reference`: sha256 of the raw bytes.
pub fn registry_digest(addr: &str, reference: &str) -> String {
    let raw = skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{addr}/{reference}"))
        .run()
        .stdout;
    let sum = cmd("sha256sum").stdin(raw).stdout();
    format!(
        "sha256:{}",
        sum.split_whitespace().next().unwrap_or_default()
    )
}

/// `(os/architecture)` of each manifest of an image index, sorted.
pub fn index_platforms(index_json: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(index_json).unwrap_or_else(|e| panic!("not JSON: {e}: {index_json}"));
    let mut p: Vec<String> = v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not an index: {index_json}"))
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    p.sort();
    p
}
