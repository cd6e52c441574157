use std::path::Path;

use super::*;

fn p(text: &str) -> Dockerfile {
    Dockerfile::parse(Path::new("pkg/Dockerfile"), text).unwrap()
}

fn err(text: &str) -> String {
    Dockerfile::parse(Path::new("pkg/Dockerfile"), text)
        .unwrap_err()
        .to_string()
}

fn ins(df: &Dockerfile, stage: usize) -> Vec<(usize, Instruction)> {
    df.stages[stage]
        .instructions
        .iter()
        .map(|l| (l.line, l.value.clone()))
        .collect()
}

#[test]
fn parses_stages_global_args_and_line_numbers() {
    let df = p("# syntax=docker/dockerfile:1\n\
         ARG BASE=scratch\n\
         FROM ${BASE} AS Build\n\
         COPY a b /out/\n\
         \n\
         FROM --platform=$BUILDPLATFORM build\n\
         COPY --from=build --chown=1:2 --chmod=0755 /out/ /\n");
    assert_eq!(df.syntax.as_ref().unwrap().value, "docker/dockerfile:1");
    assert_eq!(df.global_args[0].line, 2);
    assert_eq!(df.stages.len(), 2);
    assert_eq!(df.stages[0].name.as_deref(), Some("build"));
    assert_eq!(df.stages[0].base, "${BASE}");
    assert_eq!(df.stages[1].platform.as_deref(), Some("$BUILDPLATFORM"));
    assert_eq!(df.stage_index("BUILD", 1), Some(0));
    assert_eq!(df.stage_index("0", 1), Some(0));
    assert_eq!(df.stage_index("build", 0), None);
    let copy = &ins(&df, 1)[0];
    assert_eq!(copy.0, 7);
    let Instruction::Copy(c) = &copy.1 else {
        panic!("{copy:?}")
    };
    assert_eq!(c.from.as_deref(), Some("build"));
    assert_eq!(c.chown.as_deref(), Some("1:2"));
    assert_eq!(c.chmod.as_deref(), Some("0755"));
    assert_eq!(c.sources, ["/out/"]);
    assert_eq!(c.dest, "/");
}

#[test]
fn joins_continuations_skipping_comments_and_blank_lines() {
    let df = p("FROM scratch\n\
         COPY a \\\n\
         # a comment inside\n\
         \n\
            b \\\n\
            /dst/\n\
         ENV A=1\n");
    let i = ins(&df, 0);
    assert_eq!(i[0].0, 2);
    let Instruction::Copy(c) = &i[0].1 else {
        panic!()
    };
    assert_eq!(c.sources, ["a", "b"]);
    assert_eq!(i[1].0, 7);
}

#[test]
fn honours_the_escape_directive() {
    let df = p("# escape=`\nFROM scratch\nCOPY a `\n  C:\\dst\\\n");
    assert_eq!(df.escape, '`');
    let Instruction::Copy(c) = &ins(&df, 0)[0].1 else {
        panic!()
    };
    assert_eq!(c.dest, "C:\\dst\\");
    // A directive after an instruction or blank line is a comment.
    let df = p("\n# escape=`\nFROM scratch\n");
    assert_eq!(df.escape, '\\');
    assert_eq!(
        err("# escape=x\nFROM scratch\n"),
        "pkg/Dockerfile:1:1: invalid escape token 'x': it must be ` or \\"
    );
    assert_eq!(
        err("# syntax=a\n# syntax=b\nFROM scratch\n"),
        "pkg/Dockerfile:2:1: only one syntax parser directive can be used"
    );
}

#[test]
fn tells_exec_form_from_shell_form() {
    let df = p(r#"FROM scratch
CMD ["/bin/app", "--flag"]
ENTRYPOINT exec app "$HOME"
CMD [not json
SHELL ["/bin/bash", "-c"]
HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/
HEALTHCHECK NONE
"#);
    let i = ins(&df, 0);
    assert_eq!(
        i[0].1,
        Instruction::Cmd(CommandLine::Exec(vec!["/bin/app".into(), "--flag".into()]))
    );
    assert_eq!(
        i[1].1,
        Instruction::Entrypoint(CommandLine::Shell("exec app \"$HOME\"".into()))
    );
    assert_eq!(
        i[2].1,
        Instruction::Cmd(CommandLine::Shell("[not json".into()))
    );
    assert_eq!(
        i[3].1,
        Instruction::Shell(vec!["/bin/bash".into(), "-c".into()])
    );
    let Instruction::Healthcheck(Healthcheck::Check {
        test,
        interval,
        retries,
        ..
    }) = &i[4].1
    else {
        panic!()
    };
    assert_eq!(
        *test,
        CommandLine::Shell("curl -f http://localhost/".into())
    );
    assert_eq!(interval.as_deref(), Some("5s"));
    assert_eq!(retries.as_deref(), Some("3"));
    assert_eq!(i[5].1, Instruction::Healthcheck(Healthcheck::None));
}

#[test]
fn parses_env_label_and_arg_forms() {
    let df = p(r#"FROM scratch
ENV A=1 B="two words" C=three\ words
ENV LEGACY value with spaces
LABEL "org.x"="y" z=
ARG ONE TWO=2
"#);
    let i = ins(&df, 0);
    assert_eq!(
        i[0].1,
        Instruction::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"two words\"".into()),
            ("C".into(), "three\\ words".into()),
        ])
    );
    assert_eq!(
        i[1].1,
        Instruction::Env(vec![("LEGACY".into(), "value with spaces".into())])
    );
    assert_eq!(
        i[2].1,
        Instruction::Label(vec![
            ("\"org.x\"".into(), "\"y\"".into()),
            ("z".into(), String::new())
        ])
    );
    assert_eq!(
        i[3].1,
        Instruction::Arg(vec![
            ArgDecl {
                name: "ONE".into(),
                default: None
            },
            ArgDecl {
                name: "TWO".into(),
                default: Some("2".into())
            }
        ])
    );
}

#[test]
fn skips_heredoc_bodies_and_marks_them() {
    let df =
        p("FROM scratch\nRUN <<EOF\nFROM nothing\nEOF\nCOPY <<-END /x\n\tbody\n\tEND\nUSER 1\n");
    let i = ins(&df, 0);
    let Instruction::Run(r) = &i[0].1 else {
        panic!()
    };
    assert!(r.heredoc);
    assert_eq!(i[0].0, 2);
    let Instruction::Copy(c) = &i[1].1 else {
        panic!()
    };
    assert!(c.heredoc);
    assert_eq!(i[2], (8, Instruction::User("1".into())));
    assert_eq!(
        err("FROM scratch\nRUN <<EOF\nnever ends\n"),
        "pkg/Dockerfile:2:1: unterminated heredoc: no line \"EOF\" ends it"
    );
}

#[test]
fn malformed_dockerfiles_get_line_numbers() {
    let cases = [
        (
            "FROM scratch\nFOO bar\n",
            "pkg/Dockerfile:2:1: unknown instruction FOO: a Dockerfile line starts with one of ADD, ARG, CMD, COPY, ENTRYPOINT, ENV, EXPOSE, FROM, HEALTHCHECK, LABEL, MAINTAINER, ONBUILD, RUN, SHELL, STOPSIGNAL, USER, VOLUME, WORKDIR",
        ),
        (
            "FROM scratch\n  COPYY shared/ /x\n",
            "pkg/Dockerfile:2:3: unknown instruction COPYY: did you mean COPY?",
        ),
        (
            "ENV A=1\nFROM scratch\n",
            "pkg/Dockerfile:1:1: ENV comes before the first FROM: only ARG may precede FROM",
        ),
        (
            "# just a comment\n",
            "pkg/Dockerfile:2:1: the Dockerfile has no FROM instruction: a build needs at least one stage",
        ),
        (
            "FROM a b\n",
            "pkg/Dockerfile:1:1: FROM requires either one or three arguments: FROM <image> [AS <name>]",
        ),
        (
            "FROM a AS 1x\n",
            "pkg/Dockerfile:1:1: invalid stage name \"1x\": start with a letter, then letters, digits, '_', '.' or '-'",
        ),
        (
            "FROM scratch\n\nCOPY only\n",
            "pkg/Dockerfile:3:1: COPY requires at least two arguments, but only one was provided: the destination could not be determined",
        ),
        (
            "FROM scratch\nCOPY --mode=1 a b\n",
            "pkg/Dockerfile:2:1: unknown flag --mode on COPY",
        ),
        (
            "FROM scratch\nCOPY --from a b\n",
            "pkg/Dockerfile:2:1: missing a value on flag --from",
        ),
        (
            "FROM scratch\nCOPY --chown=1 --chown=2 a b\n",
            "pkg/Dockerfile:2:1: duplicate flag specified: --chown",
        ),
        (
            "FROM scratch\nENV A=1 B\n",
            "pkg/Dockerfile:2:1: syntax error - can't find = in \"B\": it must be of the form name=value",
        ),
        (
            "FROM scratch\nENV A\n",
            "pkg/Dockerfile:2:1: ENV must have two arguments",
        ),
        (
            "FROM scratch\nWORKDIR\n",
            "pkg/Dockerfile:2:1: WORKDIR requires exactly one argument",
        ),
        (
            "FROM scratch\nSHELL /bin/sh -c\n",
            "pkg/Dockerfile:2:1: SHELL requires the arguments to be in JSON form, such as [\"/bin/sh\", \"-c\"]",
        ),
        (
            "FROM scratch\nHEALTHCHECK PING x\n",
            "pkg/Dockerfile:2:1: HEALTHCHECK expects CMD or NONE, not \"PING\"",
        ),
        (
            "FROM scratch\nONBUILD ONBUILD COPY a b\n",
            "pkg/Dockerfile:2:1: chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        ),
        (
            "FROM scratch\nEXPOSE\n",
            "pkg/Dockerfile:2:1: EXPOSE requires at least one argument",
        ),
        (
            "FROM scratch\nVOLUME [\"\"]\n",
            "pkg/Dockerfile:2:1: VOLUME specified can not be an empty string",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(text), want, "{text}");
    }
}

#[test]
fn copy_takes_the_json_form() {
    let df = p("FROM scratch\nCOPY [\"a b\", \"c\", \"/d e/\"]\n");
    let Instruction::Copy(c) = &ins(&df, 0)[0].1 else {
        panic!()
    };
    assert_eq!(c.sources, ["a b", "c"]);
    assert_eq!(c.dest, "/d e/");
}
