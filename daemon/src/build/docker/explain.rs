//! Engine errors in Dockerfile terms. BuildKit reports a failed step by its vertex name
//! (`[2/2] RUN make`, `[internal] load metadata for docker.io/x/y:1`) and raw text (a DNS
//! error for registry-1.docker.io, `executor failed running [...]: exit code: 3`). This
//! maps the common ones to the line of the package's Dockerfile (file:line:column) and
//! says what to do: an image that is neither a workspace package nor in kilnd's cache, a
//! step that exited with code N (with its last output lines), a step that needed the
//! network that the build does not have.

use std::path::Path;

use super::{DockerBuildError, tail_text};
use crate::build::dockerfile::Dockerfile;

/// Output that says a step found no network.
const NO_NETWORK: [&str; 9] = [
    "bad address",
    "network is unreachable",
    "could not resolve",
    "temporary failure in name resolution",
    "no such host",
    "name or service not known",
    "name resolution",
    "unable to resolve host",
    "could not connect to",
];

/// The error `err` of a build of the package whose Dockerfile is `dockerfile` (as
/// written, not the copy with pinned bases), in Dockerfile terms; None when it is not a
/// step or base image failure kiln can place (then its own text says it).
/// `network` is build.yml's `network: true`.
pub fn explain(err: &DockerBuildError, dockerfile: &Path, network: bool) -> Option<String> {
    let df = Dockerfile::read(dockerfile).ok()?;
    match err {
        DockerBuildError::StepFailed {
            image,
            arch,
            step,
            error,
            tail,
        } => {
            let said = match step.strip_prefix("[internal] load metadata for ") {
                Some(name) => base_image(&df, name, error)?,
                None => failed_step(&df, step, error, tail, network)?,
            };
            Some(format!("{image} ({arch}): {said}"))
        }
        DockerBuildError::BuildFailed {
            image,
            arch,
            message,
            ..
        } => {
            // A frontend error names the image it could not resolve, without a step.
            let name = df
                .stages
                .iter()
                .map(|s| s.base.as_str())
                .find(|b| *b != "scratch" && message.contains(short_name(b)))?;
            Some(format!(
                "{image} ({arch}): {}",
                base_image(&df, name, message)?
            ))
        }
        _ => None,
    }
}

/// `path:line:column` of the instruction at `line`: the column where its text starts.
fn at(df: &Dockerfile, line: usize) -> String {
    let column = std::fs::read_to_string(&df.path)
        .ok()
        .and_then(|t| {
            t.lines()
                .nth(line.saturating_sub(1))
                .map(|l| l.chars().take_while(|c| c.is_whitespace()).count() + 1)
        })
        .unwrap_or(1);
    format!("{}:{line}:{column}", df.path.display())
}

/// An image name as written, without the default registry and namespace.
fn short_name(name: &str) -> &str {
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    name.strip_prefix("library/").unwrap_or(name)
}

/// The `FROM` of `name` (as BuildKit names it: `docker.io/org/image:tag`) that the engine
/// could not get.
fn base_image(df: &Dockerfile, name: &str, error: &str) -> Option<String> {
    let wanted = short_name(name);
    let stage = df.stages.iter().find(|s| {
        let base = short_name(&s.base);
        base == wanted || format!("{base}:latest") == wanted
    })?;
    let why = if error.contains("no such host")
        || error.contains("dial tcp")
        || error.contains("i/o timeout")
        || error.contains("connection refused")
    {
        let host = error
            .split("lookup ")
            .nth(1)
            .and_then(|r| r.split([' ', ':']).next())
            .unwrap_or("its registry");
        format!("{host} cannot be reached")
    } else if error.contains("not found")
        || error.contains("manifest unknown")
        || error.contains("pull access denied")
    {
        "its registry has no such image".to_owned()
    } else {
        error.to_owned()
    };
    Some(format!(
        "{}: FROM {}: the image is neither a workspace package nor in kilnd's cache, and the \
         engine cannot fetch it ({why}): add its package to the workspace, `kiln pull {}` \
         it from an upstream, or import it in kiln.toml ([[import]])",
        at(df, stage.line),
        stage.base,
        stage.base
    ))
}

/// A failed `[stage N/M] INSTRUCTION ...` step: its line, its exit code, its last output
/// lines, and the missing network when that is what the output says.
fn failed_step(
    df: &Dockerfile,
    step: &str,
    error: &str,
    tail: &[String],
    network: bool,
) -> Option<String> {
    let text = step
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .map_or(step, |(_, t)| t)
        .trim();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let instruction = df
        .stages
        .iter()
        .flat_map(|s| s.instructions.iter())
        .find(|i| i.text == text || squash(&i.text) == squash(text))?;
    let what = match error.rsplit_once("exit code: ") {
        Some((_, code)) => format!("the command exited with code {}", code.trim()),
        None => error.to_owned(),
    };
    let mut out = format!("{}: {text}: {what}", at(df, instruction.line));
    let output = tail.join("\n").to_lowercase();
    if !network && NO_NETWORK.iter().any(|m| output.contains(m)) {
        out.push_str(
            "; the build has no network (build.yml has no `network: true`): add \
             `network: true` if this step needs it",
        );
    }
    if !tail.is_empty() {
        out.push_str("; its last output lines:");
        out.push_str(&tail_text(tail));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("Dockerfile");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn step(step: &str, error: &str, tail: &[&str]) -> DockerBuildError {
        DockerBuildError::StepFailed {
            image: "kiln/x:t".into(),
            arch: "amd64".into(),
            step: step.into(),
            error: error.into(),
            tail: tail.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// What Docker 20.10's BuildKit reported for these Dockerfiles (see the e2e test).
    #[test]
    fn a_missing_base_image_is_its_from_line_with_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let df = write(d.path(), "# a base\nFROM kiln/nosuchimage:1.0\nRUN true\n");
        let e = step(
            "[internal] load metadata for docker.io/kiln/nosuchimage:1.0",
            "failed to do request: Head \"https://registry-1.docker.io/v2/kiln/nosuchimage/manifests/1.0\": dial tcp: lookup registry-1.docker.io on 10.255.255.53:53: no such host",
            &[],
        );
        let said = explain(&e, &df, false).unwrap();
        assert!(
            said.starts_with(&format!(
                "kiln/x:t (amd64): {}:2:1: FROM kiln/nosuchimage:1.0:",
                df.display()
            )),
            "{said}"
        );
        assert!(
            said.contains("registry-1.docker.io cannot be reached"),
            "{said}"
        );
        assert!(
            said.contains("neither a workspace package nor in kilnd's cache"),
            "{said}"
        );
        assert!(said.contains("kiln pull kiln/nosuchimage:1.0"), "{said}");
        assert_eq!(said.matches("no such host").count(), 0, "{said}");

        let frontend = DockerBuildError::BuildFailed {
            image: "kiln/x:t".into(),
            arch: "amd64".into(),
            endpoint: "unix:///var/run/docker.sock".into(),
            message: "failed to solve with frontend dockerfile.v0: failed to create LLB definition: pull access denied, repository does not exist: docker.io/kiln/nosuchimage:1.0".into(),
        };
        let said = explain(&frontend, &df, false).unwrap();
        assert!(said.contains(":2:1: FROM kiln/nosuchimage:1.0:"), "{said}");
        assert!(said.contains("its registry has no such image"), "{said}");
    }

    #[test]
    fn a_failed_step_is_its_line_its_exit_code_and_its_last_output() {
        let d = tempfile::tempdir().unwrap();
        let df = write(
            d.path(),
            "FROM kiln/busybox:latest\n  RUN echo one && \\\n  exit 3\n",
        );
        let e = step(
            "[2/2] RUN echo one &&   exit 3",
            "executor failed running [/bin/sh -c echo one &&   exit 3]: exit code: 3",
            &["one"],
        );
        let said = explain(&e, &df, false).unwrap();
        assert_eq!(
            said,
            format!(
                "kiln/x:t (amd64): {}:2:3: RUN echo one &&   exit 3: the command exited with code 3; its last output lines:\n  | one",
                df.display()
            )
        );
    }

    #[test]
    fn a_step_without_network_says_build_yml_has_no_network_true() {
        let d = tempfile::tempdir().unwrap();
        let df = write(
            d.path(),
            "FROM kiln/busybox:latest\nRUN wget -q -O- http://example.com/\n",
        );
        let e = step(
            "[2/2] RUN wget -q -O- http://example.com/",
            "executor failed running [/bin/sh -c wget -q -O- http://example.com/]: exit code: 1",
            &["wget: bad address 'example.com'"],
        );
        let said = explain(&e, &df, false).unwrap();
        assert!(said.contains(":2:1: RUN wget"), "{said}");
        assert!(said.contains("exited with code 1"), "{said}");
        assert!(said.contains("build.yml has no `network: true`"), "{said}");
        // With the network, the hint would mislead.
        let said = explain(&e, &df, true).unwrap();
        assert!(!said.contains("network: true"), "{said}");
        // A step kiln cannot place keeps the engine's own words.
        let other = step("[2/2] RUN something else", "boom", &[]);
        assert_eq!(explain(&other, &df, false), None);
    }
}
