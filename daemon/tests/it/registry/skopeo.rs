//! skopeo: `copy` from an OCI layout into the registry and back out, single images and
//! multi-arch indexes (`--all`), and `inspect --raw` returning the stored bytes.

use std::process::Command;

use super::{Image, Server, layout_ref, run, write_layout};

fn skopeo() -> Command {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy");
    c
}

#[test]
fn copy_in_and_out_and_inspect_raw() {
    let s = Server::start();
    let (src, digest, bytes) = write_layout(s.dir.path(), "v1", &[Image::new("amd64", "single")]);
    let dest = s.name("org/single:v1");
    run(skopeo()
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{dest}")));
    assert_eq!(s.cache_ref("org/single:v1"), Some(digest.clone()));

    let raw = run(skopeo()
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{dest}")));
    assert_eq!(
        raw.as_bytes(),
        &bytes[..],
        "inspect --raw gives the pushed bytes"
    );
    let inspect: serde_json::Value = serde_json::from_str(&run(skopeo()
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{dest}"))))
    .unwrap();
    assert_eq!(inspect["Digest"], digest.to_string());
    assert_eq!(inspect["Architecture"], "amd64");

    let out = s.dir.path().join("out");
    run(skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{dest}"))
        .arg(format!("oci:{}:copied", out.display())));
    assert_eq!(
        layout_ref(&out, "copied"),
        digest,
        "the image comes back unchanged"
    );
}

#[test]
fn copy_all_of_a_multi_arch_index() {
    let s = Server::start();
    let images = [Image::new("amd64", "multi"), Image::new("arm64", "multi")];
    let (src, digest, bytes) = write_layout(s.dir.path(), "v2", &images);
    let dest = s.name("org/multi:v2");
    run(skopeo()
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v2", src.display()))
        .arg(format!("docker://{dest}")));
    assert_eq!(s.cache_ref("org/multi:v2"), Some(digest.clone()));
    // The per-arch manifests were pushed by digest: kept under digest names.
    for i in &images {
        assert_eq!(
            s.cache_ref(&format!("org/multi@{}", i.digest())),
            Some(i.digest())
        );
    }
    let raw = run(skopeo()
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{dest}")));
    assert_eq!(raw.as_bytes(), &bytes[..]);
    let arm: serde_json::Value = serde_json::from_str(&run(skopeo()
        .args(["inspect", "--tls-verify=false", "--override-arch", "arm64"])
        .arg(format!("docker://{dest}"))))
    .unwrap();
    assert_eq!(arm["Architecture"], "arm64");
    assert_eq!(arm["Layers"][0], super::sha(&images[1].layer).to_string());

    let out = s.dir.path().join("out");
    run(skopeo()
        .args(["copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{dest}"))
        .arg(format!("oci:{}:back", out.display())));
    assert_eq!(layout_ref(&out, "back"), digest);
    for i in &images {
        assert!(out.join("blobs/sha256").join(i.digest().hex()).exists());
        assert!(
            out.join("blobs/sha256")
                .join(super::sha(&i.layer).hex())
                .exists()
        );
    }
}
