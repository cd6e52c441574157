//! Pulling and running images with the real Docker engine the way a user does, from a
//! registry on loopback (the engine takes 127.0.0.0/8 registries as plain HTTP), and
//! leaving no image behind when the test ends.

use crate::cmd::docker;

/// An image pulled for one platform; `docker rmi`'d when dropped.
#[derive(Debug)]
pub struct PulledImage {
    reference: String,
    platform: String,
}

impl PulledImage {
    /// `docker pull --platform PLATFORM REFERENCE` (e.g. `linux/arm64`,
    /// `127.0.0.1:PORT/kiln/busybox:latest`).
    pub fn pull(reference: &str, platform: &str) -> PulledImage {
        docker()
            .args(["pull", "--quiet", "--platform", platform, reference])
            .run();
        PulledImage {
            reference: reference.to_owned(),
            platform: platform.to_owned(),
        }
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// `docker run --rm --network none` of this image and platform (never pulling again);
    /// returns the trimmed stdout, panics with the whole story unless it exits 0.
    pub fn run(&self, args: &[&str]) -> String {
        docker()
            .args(["run", "--rm", "--pull", "never", "--network", "none"])
            .args(["--platform", &self.platform, &self.reference])
            .args(args)
            .stdout()
    }

    /// A field of `docker image inspect` (a Go template such as `{{.Architecture}}`).
    pub fn inspect(&self, template: &str) -> String {
        docker()
            .args(["image", "inspect", "--format", template, &self.reference])
            .stdout()
    }

    /// The image's digest as the registry served it (`sha256:...` of the index or manifest).
    pub fn repo_digest(&self) -> String {
        let digests = self.inspect("{{range .RepoDigests}}{{println .}}{{end}}");
        let repo = repository(&self.reference);
        digests
            .lines()
            .find_map(|l| l.strip_prefix(repo)?.strip_prefix('@').map(str::to_owned))
            .unwrap_or_else(|| panic!("no repo digest for {repo} in {digests:?}"))
    }
}

/// The repository of a reference: without `@digest` and without `:tag` (a `:` before the
/// last `/` is a registry's port).
fn repository(reference: &str) -> &str {
    let name = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    name.rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map_or(name, |(repo, _)| repo)
}

impl Drop for PulledImage {
    fn drop(&mut self) {
        // Best effort: a failed test must still report its own failure, not this one.
        let _ = docker().args(["rmi", "--force", &self.reference]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::repository;

    #[test]
    fn repository_drops_tag_and_digest_but_not_the_port() {
        for (reference, repo) in [
            (
                "127.0.0.1:5000/kiln/busybox:latest",
                "127.0.0.1:5000/kiln/busybox",
            ),
            ("127.0.0.1:5000/kiln/busybox", "127.0.0.1:5000/kiln/busybox"),
            ("localhost:5000/a/b@sha256:0123", "localhost:5000/a/b"),
            ("localhost:5000/a/b:t@sha256:0123", "localhost:5000/a/b"),
            ("busybox:1.36", "busybox"),
        ] {
            assert_eq!(repository(reference), repo, "{reference}");
        }
    }
}
