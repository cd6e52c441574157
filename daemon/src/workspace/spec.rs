//! Reads a `build.yml` into a [`BuildSpec`], strictly: an unknown key, a wrong type, a
//! missing `image` or a bad value is an error naming the file, line and column.

use std::path::{Path, PathBuf};

use kiln_shared::reference::RepoName;
use kiln_shared::spec::BuildSpec;

/// A `build.yml` that kiln cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based; 0 when the YAML reader gave no position.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses the text of `file` (used for messages only).
pub fn parse_build_yml(file: &Path, text: &str) -> Result<BuildSpec, SpecError> {
    if text.trim().is_empty() {
        return Err(SpecError {
            file: file.to_owned(),
            line: 1,
            column: 1,
            message: "the file is empty: expected a mapping with at least `image: NAME`".into(),
        });
    }
    serde_norway::from_str::<BuildSpec>(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // serde_norway appends " at line L column C"; the prefix already says where.
        if let Some(i) = message.rfind(" at line ") {
            if message[i..].contains(" column ") {
                message.truncate(i);
            }
        }
        if message == "missing field `image`" {
            message.push_str(": every build.yml names its image, e.g. `image: my-tool`");
        }
        SpecError {
            file: file.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// The `org/image` a build.yml names, read leniently from a file that does not parse as
/// a whole (an unknown arch, an unknown key): so that a broken package keeps its name.
/// None when the file is not YAML or names no valid image.
pub fn loose_repo_name(file: &Path) -> Option<RepoName> {
    let text = std::fs::read_to_string(file).ok()?;
    let value: serde_norway::Value = serde_norway::from_str(&text).ok()?;
    let image = value.get("image")?.as_str()?;
    let org = match value.get("org") {
        None => kiln_shared::spec::DEFAULT_ORG,
        Some(o) => o.as_str()?,
    };
    format!("{org}/{image}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_shared::spec::{Arch, DEFAULT_DOCKERFILE};

    fn parse(text: &str) -> Result<BuildSpec, SpecError> {
        parse_build_yml(Path::new("p/build.yml"), text)
    }

    #[test]
    fn defaults() {
        let s = parse("image: alpine\n").unwrap();
        assert_eq!(s.image.as_str(), "alpine");
        assert_eq!(s.org.as_str(), "linuxkit");
        assert_eq!(s.tag.source(), "{{.Hash}}");
        assert_eq!(s.tag.render("abc"), "abc");
        assert_eq!(s.dockerfile.as_str(), DEFAULT_DOCKERFILE);
        assert_eq!(s.arches, vec![Arch::Amd64, Arch::Arm64, Arch::Riscv64]);
        assert!(s.extra_sources.is_empty());
        assert_eq!(s.gitrepo, None);
        assert!(!s.network);
        assert!(!s.disable_cache);
        assert_eq!(s.config, None);
        assert!(s.build_args.is_empty());
        assert!(s.depends.docker_images.list.is_empty());
        assert_eq!(s.repo_name().unwrap().as_str(), "linuxkit/alpine");
    }

    #[test]
    fn every_field() {
        let digest = "a".repeat(64);
        let text = format!(
            r#"image: my-image
org: example.com/team
tag: "v2-{{{{.Hash}}}}"
dockerfile: docker/Dockerfile.build
arches:
  - arm64
  - s390x
extra-sources:
  - ../../lib:/go/src/lib
  - /abs/tools:tools/
gitrepo: https://example.com/repo
network: true
disable-cache: true
config:
  binds:
    - /dev:/dev
  capabilities: [all]
  net: host
  readonly: true
buildArgs:
  - GOVERSION=1.22
  - BASE=@lkt:pkg:../base
depends:
  docker-images:
    target-dir: images
    list:
      - docker.io/library/alpine:3.19@sha256:{digest}
"#
        );
        let s = parse(&text).unwrap();
        assert_eq!(s.image.as_str(), "my-image");
        assert_eq!(s.repo_name().unwrap().as_str(), "example.com/team/my-image");
        assert_eq!(s.tag.render("h"), "v2-h");
        assert_eq!(s.dockerfile.as_str(), "docker/Dockerfile.build");
        assert_eq!(s.arches, vec![Arch::Arm64, Arch::S390x]);
        let xs: Vec<(&str, &str)> = s
            .extra_sources
            .iter()
            .map(|e| (e.src.as_str(), e.dst.as_str()))
            .collect();
        assert_eq!(
            xs,
            vec![("../../lib", "/go/src/lib"), ("/abs/tools", "tools")]
        );
        assert_eq!(s.gitrepo.as_deref(), Some("https://example.com/repo"));
        assert!(s.network);
        assert!(s.disable_cache);
        let cfg = serde_json::to_value(s.config.as_ref().unwrap()).unwrap();
        assert_eq!(
            cfg,
            serde_json::json!({"binds": ["/dev:/dev"], "capabilities": ["all"], "net": "host", "readonly": true})
        );
        let args: Vec<String> = s.build_args.iter().map(|a| a.to_string()).collect();
        assert_eq!(args, vec!["GOVERSION=1.22", "BASE=@lkt:pkg:../base"]);
        assert_eq!(s.build_args[1].lkt_pkg(), Some("../base"));
        let d = &s.depends.docker_images;
        assert_eq!(d.target_dir.as_ref().unwrap().as_str(), "images");
        assert_eq!(d.target, None);
        assert_eq!(d.from_file, None);
        assert_eq!(
            d.list[0].as_str(),
            format!("docker.io/library/alpine:3.19@sha256:{digest}")
        );
        let s = parse("image: a\ndepends:\n  docker-images:\n    target: out.tar\n    from-file: images.lst\n").unwrap();
        assert_eq!(s.depends.docker_images.target.unwrap().as_str(), "out.tar");
        assert_eq!(
            s.depends.docker_images.from_file.unwrap().as_str(),
            "images.lst"
        );
    }

    /// `arches:` with no value is LinuxKit's default arches (linuxkit's pkg/bpftrace has
    /// it), as is `arches: ~`; an empty list stays an error.
    #[test]
    fn arches_without_a_value_are_the_default() {
        let default = parse("image: a\n").unwrap().arches;
        assert_eq!(parse("image: a\narches:\n").unwrap().arches, default);
        assert_eq!(parse("arches:\nimage: a\n").unwrap().arches, default);
        assert_eq!(parse("image: a\narches: ~\n").unwrap().arches, default);
        assert_eq!(
            parse("image: a\narches:\n  - arm64\n").unwrap().arches,
            vec![Arch::Arm64]
        );
    }

    /// Each bad input, the line and column reported, and a piece of the message.
    #[test]
    fn errors_name_line_column_and_expectation() {
        let cases: &[(&str, usize, usize, &str)] = &[
            ("", 1, 1, "file is empty"),
            ("- a\n", 1, 1, "expected struct BuildSpec"),
            ("org: x\n", 1, 1, "missing field `image`"),
            (
                "image: a\nfoo: 1\n",
                2,
                1,
                "unknown field `foo`, expected one of",
            ),
            ("image: a\nimage: b\n", 1, 1, "duplicate field `image`"),
            (
                "image: [a]\n",
                1,
                8,
                "image: invalid type: sequence, expected a lowercase image name",
            ),
            ("image: ''\n", 1, 8, "the name is empty"),
            (
                "image: Alpine\n",
                1,
                8,
                "repository name \"Alpine\" is invalid",
            ),
            ("image: a\norg: 'My Org'\n", 2, 6, "org: repository name"),
            (
                "image: a\ntag: '{{.X}}'\n",
                2,
                6,
                "only {{.Hash}} is defined",
            ),
            ("image: a\ntag: 'a b'\n", 2, 6, "not a valid tag"),
            ("image: a\ntag: '{{.Hash'\n", 2, 6, "unclosed"),
            (
                "image: a\ndockerfile: ../Dockerfile\n",
                2,
                13,
                "leaves the package directory",
            ),
            ("image: a\ndockerfile: /Dockerfile\n", 2, 13, "is absolute"),
            (
                "image: a\ndockerfile: .\n",
                2,
                13,
                "is the package directory itself",
            ),
            (
                "image: a\narches: amd64\n",
                2,
                9,
                "expected a list of arches",
            ),
            (
                "image: a\narches: [amd64, x86]\n",
                2,
                17,
                "arches[1]: unknown arch \"x86\"",
            ),
            ("image: a\narches: []\n", 2, 9, "arches is empty"),
            (
                "image: a\narches: [arm64, arm64]\n",
                2,
                9,
                "arch arm64 is listed twice",
            ),
            (
                "image: a\nextra-sources: [a]\n",
                2,
                17,
                "is not \"src:dst\"",
            ),
            (
                "image: a\nextra-sources: ['a:b:c']\n",
                2,
                17,
                "exactly one ':'",
            ),
            (
                "image: a\nextra-sources: ['a:../x']\n",
                2,
                17,
                "leaves the build context",
            ),
            (
                "image: a\nextra-sources: a:b\n",
                2,
                16,
                "expected a sequence",
            ),
            (
                "image: a\ngitrepo: [x]\n",
                2,
                10,
                "gitrepo: invalid type: sequence, expected a string",
            ),
            (
                "image: a\nnetwork: yes\n",
                2,
                10,
                "network: invalid type: string \"yes\", expected a boolean",
            ),
            ("image: a\ndisable-cache: 1\n", 2, 16, "expected a boolean"),
            (
                "image: a\nconfig: 3\n",
                2,
                9,
                "config: invalid type: integer `3`, expected a mapping",
            ),
            ("image: a\nconfig: [a]\n", 2, 9, "expected a mapping"),
            (
                "image: a\nbuildArgs: [NOVALUE]\n",
                2,
                13,
                "is not KEY=VALUE",
            ),
            ("image: a\nbuildArgs: ['=v']\n", 2, 13, "empty key"),
            (
                "image: a\nbuildArgs: ['A=@lkt:foo']\n",
                2,
                13,
                "unknown linuxkit value",
            ),
            (
                "image: a\nbuildArgs: ['A=@lkt:pkgs:../*']\n",
                2,
                13,
                "must contain '%'",
            ),
            ("image: a\nbuildArgs: A=b\n", 2, 12, "expected a sequence"),
            ("image: a\ndepends: [x]\n", 2, 10, "expected struct Depends"),
            (
                "image: a\ndepends:\n  images: {}\n",
                3,
                3,
                "unknown field `images`, expected `docker-images`",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    lst: []\n",
                4,
                5,
                "unknown field `lst`",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    target: a\n    target-dir: b\n",
                3,
                3,
                "target and target-dir are mutually exclusive",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    from-file: f\n    list: [x]\n",
                5,
                12,
                "lacks a digest",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    from-file: f\n    list: ['a@sha256:0000000000000000000000000000000000000000000000000000000000000000']\n",
                3,
                3,
                "list and from-file are mutually exclusive",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    target: ../out.tar\n",
                4,
                13,
                "leaves the package directory",
            ),
            (
                "image: a\ndepends:\n  docker-images:\n    list: ['a@sha256:12']\n",
                4,
                12,
                "not name@sha256",
            ),
            ("image: a\n- b\n", 2, 1, "did not find expected key"),
            ("image: 'a\n", 2, 1, "found unexpected end of stream"),
        ];
        let mut wrong = Vec::new();
        for (text, line, column, msg) in cases {
            let e = parse(text).expect_err(text);
            if (e.line, e.column) != (*line, *column) || !e.message.contains(msg) {
                wrong.push(format!("{text:?}: want {line}:{column} {msg:?}, got {e}"));
                continue;
            }
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("p/build.yml:{line}:{column}: ")),
                "{shown}"
            );
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
