//! What a Dockerfile refers to outside itself: the images in `FROM` and `COPY --from`
//! that are neither `scratch` nor a stage, after expanding global `ARG`s and BuildKit's
//! automatic platform args. The scheduler uses this to build workspace dependencies
//! first; the docker builder to pin them.

use std::collections::BTreeMap;

use super::lex::expand;
use super::{Dockerfile, DockerfileError, Instruction, Located};
use crate::oci::Platform;

/// BuildKit's automatic platform args for a target platform, built on this host.
pub fn platform_args(target: &Platform) -> Vec<(String, String)> {
    let host = host_platform();
    let s = |p: &Platform| match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    };
    vec![
        ("TARGETPLATFORM".into(), s(target)),
        ("TARGETOS".into(), target.os.clone()),
        ("TARGETARCH".into(), target.architecture.clone()),
        (
            "TARGETVARIANT".into(),
            target.variant.clone().unwrap_or_default(),
        ),
        ("BUILDPLATFORM".into(), s(&host)),
        ("BUILDOS".into(), host.os.clone()),
        ("BUILDARCH".into(), host.architecture.clone()),
        (
            "BUILDVARIANT".into(),
            host.variant.clone().unwrap_or_default(),
        ),
    ]
}

/// The platform this process runs on, with Go's architecture names (`BUILDPLATFORM`).
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform::linux(arch, None)
}

impl Dockerfile {
    /// The values of the global `ARG`s (those before the first `FROM`) plus the automatic
    /// platform args, for `build_args` and `target`; an ARG without a value is left out.
    pub fn global_arg_values(
        &self,
        build_args: &BTreeMap<String, String>,
        target: &Platform,
    ) -> Result<Vec<(String, String)>, DockerfileError> {
        let mut vars = platform_args(target);
        for decl in &self.global_args {
            for a in &decl.value {
                let value = match (build_args.get(&a.name), &a.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => {
                        Some(expand(d, self.escape, &vars).map_err(|e| DockerfileError {
                            path: self.path.clone(),
                            line: decl.line,
                            column: 0,
                            message: e.to_string(),
                        })?)
                    }
                    (None, None) => None,
                };
                if let Some(v) = value {
                    vars.push((a.name.clone(), v));
                }
            }
        }
        Ok(vars)
    }

    /// Images named by `FROM` and `COPY --from` that are not stages or `scratch`, in
    /// order of appearance, with their lines.
    pub fn image_references(
        &self,
        build_args: &BTreeMap<String, String>,
        target: &Platform,
    ) -> Result<Vec<Located<String>>, DockerfileError> {
        let vars = self.global_arg_values(build_args, target)?;
        let x = |word: &str, line: usize| {
            expand(word, self.escape, &vars).map_err(|e| DockerfileError {
                path: self.path.clone(),
                line,
                column: 0,
                message: e.to_string(),
            })
        };
        let mut out = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let base = x(&stage.base, stage.line)?;
            let is_stage = self
                .stage_index(&base, i)
                .is_some_and(|j| self.stages[j].name.is_some());
            if !base.eq_ignore_ascii_case("scratch") && !is_stage {
                out.push(Located {
                    line: stage.line,
                    text: stage.text.clone(),
                    value: base,
                });
            }
            for ins in &stage.instructions {
                if let Instruction::Copy(c) = &ins.value
                    && let Some(from) = &c.from
                {
                    let from = x(from, ins.line)?;
                    if self.stage_index(&from, i).is_none() && !from.eq_ignore_ascii_case("scratch")
                    {
                        out.push(Located {
                            line: ins.line,
                            text: ins.text.clone(),
                            value: from,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn lists_external_images_with_global_args_expanded() {
        let df = Dockerfile::parse(
            Path::new("D"),
            "ARG BASE=kiln/base:1\nARG TOOLS\nFROM ${BASE} AS b\nFROM scratch AS s\nCOPY --from=b /x /x\nCOPY --from=kiln/tools:${TARGETARCH} /t /t\nFROM b\nCOPY --from=0 / /\nCOPY --from=$TOOLS / /\n",
        )
        .unwrap();
        let mut args = BTreeMap::new();
        args.insert("TOOLS".to_owned(), "kiln/other:2".to_owned());
        let refs = df
            .image_references(&args, &Platform::linux("arm64", None))
            .unwrap();
        let got: Vec<(usize, &str)> = refs.iter().map(|r| (r.line, r.value.as_str())).collect();
        assert_eq!(
            got,
            [
                (3, "kiln/base:1"),
                (6, "kiln/tools:arm64"),
                (9, "kiln/other:2")
            ]
        );
    }
}
