//! The Docker engine: `docker push` into the registry, `docker pull` out of it, and a
//! multi-arch index pulled per platform, both as kilnd's builds land it in the cache
//! (`merge_arch`) and as skopeo pushes it.

use std::process::Command;

use super::{Image, Server, run, write_layout};

/// The Debian client, which matches the Debian engine.
fn docker() -> Command {
    Command::new("/usr/bin/docker")
}

fn engine_running() {
    let out = docker()
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .expect("docker is missing: scripts/setup installs docker.io");
    assert!(
        out.status.success(),
        "the Docker engine is not running: start it with `dockerd --iptables=false --bridge=none` \
         (scripts/setup does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the named images from the engine when the test ends, passed or not.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = docker().args(["rmi", "--force", name]).output();
        }
    }
}

fn inspect(name: &str, format: &str) -> String {
    run(docker().args(["image", "inspect", "--format", format, name]))
        .trim()
        .to_owned()
}

#[test]
fn push_then_pull() {
    engine_running();
    let s = Server::start();
    let name = s.name("org/pushed:v1");
    let _cleanup = Cleanup(vec![name.clone()]);
    // An image made locally: a rootfs tarball imported into the engine.
    let rootfs = s.dir.path().join("rootfs.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&rootfs).unwrap());
    let body = b"pushed by docker\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "etc/kiln-note", &body[..]).unwrap();
    tar.finish().unwrap();
    run(docker().arg("import").arg(&rootfs).arg(&name));
    let id = inspect(&name, "{{.Id}}");

    run(docker().args(["push", &name]));
    let pushed = s
        .cache_ref("org/pushed:v1")
        .expect("the tag is in the cache");
    let digests = inspect(&name, "{{json .RepoDigests}}");
    assert!(
        digests.contains(&pushed.to_string()),
        "{digests} / {pushed}"
    );

    run(docker().args(["rmi", &name]));
    run(docker().args(["pull", &name]));
    assert_eq!(inspect(&name, "{{.Id}}"), id, "the same image comes back");
}

fn pull_platforms(s: &Server, name: &str, images: &[Image]) {
    let _cleanup = Cleanup(vec![name.to_owned()]);
    for i in images {
        run(docker().args(["pull", "--platform", &format!("linux/{}", i.arch), name]));
        assert_eq!(inspect(name, "{{.Architecture}}"), i.arch);
        let digests = inspect(name, "{{json .RepoDigests}}");
        assert!(digests.contains(&s.addr.to_string()), "{digests}");
        run(docker().args(["rmi", name]));
    }
}

#[test]
fn pulls_each_platform_of_a_kiln_built_index() {
    engine_running();
    let s = Server::start();
    let images = [Image::new("amd64", "kiln"), Image::new("arm64", "kiln")];
    for i in &images {
        i.merge_into(&s.cache, "org/pkg:abc123");
    }
    pull_platforms(&s, &s.name("org/pkg:abc123"), &images);
    // Each architecture's own tag too.
    let arm = s.name("org/pkg:abc123-arm64");
    let _cleanup = Cleanup(vec![arm.clone()]);
    run(docker().args(["pull", "--platform", "linux/arm64", &arm]));
    assert_eq!(inspect(&arm, "{{.Architecture}}"), "arm64");
}

#[test]
fn pulls_each_platform_of_a_pushed_index() {
    engine_running();
    let s = Server::start();
    let images = [Image::new("amd64", "skopeo"), Image::new("arm64", "skopeo")];
    let (src, _, _) = write_layout(s.dir.path(), "v1", &images);
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{}", s.name("org/multi:v1"))));
    pull_platforms(&s, &s.name("org/multi:v1"), &images);
}
