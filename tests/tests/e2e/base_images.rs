//! The environment the other end-to-end tests stand on: the local multi-arch busybox base
//! image that `scripts/setup` makes from Debian packages is a valid OCI layout that skopeo
//! reads, a registry serves and the Docker engine runs for both platforms (arm64 under
//! qemu). If these fail, look at the environment before looking at kiln.

use std::path::Path;

use kiln_tests::{
    BUSYBOX, BUSYBOX_REPO, Dir, PulledImage, Registry, busybox_layout, busybox_refs, cmd,
    seed_base_images, skopeo,
};
use serde_json::Value;

/// `(architecture, variant)` of each manifest in an image index.
fn platforms(index: &Value) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests in {index}"))
        .iter()
        .map(|m| {
            let platform = &m["platform"];
            assert_eq!(platform["os"], "linux", "{m}");
            (
                platform["architecture"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                platform["variant"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    p.sort();
    p
}

#[test]
fn busybox_layout_holds_both_platforms_with_matching_configs() {
    let layout = busybox_layout();
    let refs = busybox_refs();
    assert!(refs.iter().any(|r| r == BUSYBOX), "{refs:?}");
    assert_eq!(refs.len(), 2, "latest and the Debian version: {refs:?}");

    let src = format!("oci:{}:{BUSYBOX}", layout.display());
    let raw = skopeo().args(["inspect", "--raw", &src]).stdout();
    let index: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(
        platforms(&index),
        [
            ("amd64".into(), String::new()),
            ("arm64".into(), "v8".into())
        ]
    );

    for (arch, uname) in [("amd64", "x86_64"), ("arm64", "aarch64")] {
        // The config skopeo picks for the platform names it, and its one layer.
        let config = skopeo()
            .args([
                "inspect",
                "--config",
                "--override-os",
                "linux",
                "--override-arch",
                arch,
                &src,
            ])
            .stdout();
        let config: Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["architecture"], arch);
        assert_eq!(config["os"], "linux");
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(diff_ids.len(), 1, "{config}");

        // The layer's uncompressed digest is the config's diff_id, and it holds busybox
        // and its applets as symlinks.
        let dir = Dir::new("busybox-layer");
        skopeo()
            .args([
                "copy",
                "--quiet",
                "--override-os",
                "linux",
                "--override-arch",
                arch,
                &src,
            ])
            .arg(format!("dir:{}", dir.join("img").display()))
            .run();
        let manifest: Value = serde_json::from_str(&dir.read("img/manifest.json")).unwrap();
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        let blob = dir.join(format!("img/{}", layer.trim_start_matches("sha256:")));
        let diff_id = cmd("sh")
            .arg("-c")
            .arg(format!(
                "gzip -dc '{}' | sha256sum | cut -d' ' -f1",
                blob.display()
            ))
            .stdout();
        assert_eq!(diff_ids[0], format!("sha256:{diff_id}"), "{arch}");
        let listing = cmd("tar").args(["-tvzf"]).arg(&blob).stdout();
        for entry in [
            "bin/busybox",
            "bin/sh -> busybox",
            "bin/uname -> busybox",
            "bin/cat -> busybox",
        ] {
            assert!(listing.contains(entry), "{arch}: no {entry} in\n{listing}");
        }
        for dir in ["etc/", "tmp/", "root/"] {
            assert!(
                listing.lines().any(|l| l.ends_with(dir)),
                "{arch}: no {dir} in\n{listing}"
            );
        }
        assert!(
            listing.contains("drwxrwxrwt 0/0"),
            "{arch}: /tmp is not 1777:\n{listing}"
        );

        // And the binary is of that architecture (arm64 runs here under qemu).
        tar_extract(&blob, dir.path(), "bin/busybox");
        let got = cmd(dir.join("bin/busybox")).args(["uname", "-m"]).stdout();
        assert_eq!(got, uname);
    }
}

fn tar_extract(blob: &Path, into: &Path, member: &str) {
    cmd("tar")
        .arg("-xzf")
        .arg(blob)
        .arg("-C")
        .arg(into)
        .arg(member)
        .run();
}

#[test]
fn busybox_runs_for_both_platforms_from_a_registry() {
    let registry = Registry::start();
    let pushed = seed_base_images(registry.addr());
    let image = format!("{}/{BUSYBOX_REPO}:latest", registry.addr());
    assert!(pushed.contains(&image), "{pushed:?}");

    let layout = busybox_layout();
    let index_digest = skopeo()
        .args(["inspect", "--format", "{{.Digest}}"])
        .arg(format!("oci:{}:{BUSYBOX}", layout.display()))
        .stdout();

    for (platform, arch, uname) in [
        ("linux/amd64", "amd64", "x86_64"),
        ("linux/arm64", "arm64", "aarch64"),
    ] {
        let pulled = PulledImage::pull(&image, platform);
        // The engine got the very index of the layout, byte for byte.
        assert_eq!(pulled.repo_digest(), index_digest, "{platform}");
        assert_eq!(
            pulled.inspect("{{.Os}}/{{.Architecture}}"),
            format!("linux/{arch}")
        );
        assert_eq!(pulled.run(&["uname", "-m"]), uname, "{platform}");
        // /bin/sh and the applet symlinks work, as root.
        assert_eq!(
            pulled.run(&[
                "sh",
                "-c",
                "echo \"$(uname -m) $(id -u) $(cat /etc/passwd | head -n1)\""
            ]),
            format!("{uname} 0 root:x:0:0:root:/root:/bin/sh"),
            "{platform}"
        );
    }
}

#[test]
fn busybox_layout_is_reproducible() {
    // Made again from the same .deb files, the layout is byte for byte the same.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/base-images");
    let dir = Dir::new("base-again");
    let out = dir.join("busybox");
    cmd(&script).arg("--out").arg(&out).run();
    cmd("diff").arg("-r").arg(busybox_layout()).arg(&out).run();
}
