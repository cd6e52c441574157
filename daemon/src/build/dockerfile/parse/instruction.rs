//! One logical line to one [`Instruction`]: its `--flags`, its arguments in shell or
//! JSON exec form, and the checks BuildKit's `frontend/dockerfile/instructions` makes.

use super::super::{
    ArgDecl, CommandLine, CopyArgs, DockerfileError, Healthcheck, Instruction, RunArgs, RunMount,
    Stage,
};
use super::{Ctx, Logical, heredoc_names};

/// Every Dockerfile instruction BuildKit knows.
const INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// What to say of an unknown instruction: the closest known one (a typo), or the list.
fn unknown_instruction(keyword: &str) -> String {
    let upper = keyword.to_ascii_uppercase();
    let closest = INSTRUCTIONS
        .iter()
        .map(|i| (strsim::damerau_levenshtein(&upper, i), *i))
        .min()
        // One edit away, or two in a longer word ("FOO" is not a typo of FROM).
        .filter(|(d, _)| *d <= 1 || (*d == 2 && upper.len() >= 5));
    match closest {
        Some((_, i)) => format!("unknown instruction {upper}: did you mean {i}?"),
        None => format!(
            "unknown instruction {upper}: a Dockerfile line starts with one of {}",
            INSTRUCTIONS.join(", ")
        ),
    }
}

/// Words split on whitespace with quotes and escapes kept in the word (BuildKit's
/// `parseWords`, used by ENV, LABEL and ARG).
fn words_keep_quotes(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut blank_ok = false;
    let mut quote: Option<char> = None;
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
                word.push(c);
                continue;
            }
            if c == escape && q != '\'' {
                word.push(c);
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                continue;
            }
            word.push(c);
            continue;
        }
        if c.is_whitespace() {
            if in_word && (blank_ok || !word.is_empty()) {
                words.push(std::mem::take(&mut word));
            }
            in_word = false;
            blank_ok = false;
            continue;
        }
        in_word = true;
        if c == '\'' || c == '"' {
            quote = Some(c);
            blank_ok = true;
            word.push(c);
            continue;
        }
        if c == escape {
            if chars.peek().is_none() {
                continue;
            }
            word.push(c);
            if let Some(n) = chars.next() {
                word.push(n);
            }
            continue;
        }
        word.push(c);
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Parsed `--flags` of one instruction.
struct Flags {
    values: Vec<(String, Option<String>)>,
}

impl Flags {
    fn parse(
        cx: &Ctx<'_>,
        l: &Logical,
        allowed: &[&str],
        bools: &[&str],
    ) -> Result<Flags, DockerfileError> {
        let mut values: Vec<(String, Option<String>)> = Vec::new();
        for f in &l.flags {
            let body = f.trim_start_matches('-');
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_ascii_lowercase(), Some(v.to_owned())),
                None => (body.to_ascii_lowercase(), None),
            };
            if !allowed.contains(&name.as_str()) {
                return Err(cx.err(
                    l.line,
                    format!(
                        "unknown flag --{name} on {}",
                        l.keyword.to_ascii_uppercase()
                    ),
                ));
            }
            let repeatable = matches!(name.as_str(), "exclude" | "mount");
            if values.iter().any(|(n, _)| *n == name) && !repeatable {
                return Err(cx.err(l.line, format!("duplicate flag specified: --{name}")));
            }
            if value.is_none() && !bools.contains(&name.as_str()) {
                return Err(cx.err(l.line, format!("missing a value on flag --{name}")));
            }
            values.push((name, value));
        }
        Ok(Flags { values })
    }

    fn take(&mut self, name: &str) -> Option<String> {
        let i = self.values.iter().position(|(n, _)| n == name)?;
        self.values.remove(i).1
    }
}

pub(super) fn parse_from(cx: &Ctx<'_>, l: &Logical) -> Result<Stage, DockerfileError> {
    let mut flags = Flags::parse(cx, l, &["platform"], &[])?;
    let words: Vec<&str> = l.rest.split_whitespace().collect();
    let (base, name) = match words.as_slice() {
        [base] => (*base, None),
        [base, as_, name] if as_.eq_ignore_ascii_case("as") => (*base, Some(*name)),
        _ => {
            return Err(cx.err(
                l.line,
                "FROM requires either one or three arguments: FROM <image> [AS <name>]",
            ));
        }
    };
    if let Some(name) = name {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(cx.err(
                l.line,
                format!(
                    "invalid stage name {name:?}: start with a letter, then letters, digits, '_', '.' or '-'"
                ),
            ));
        }
    }
    Ok(Stage {
        line: l.line,
        base: base.to_owned(),
        name: name.map(str::to_ascii_lowercase),
        platform: flags.take("platform"),
        text: l.text.clone(),
        instructions: Vec::new(),
    })
}

pub(super) fn parse_instruction(
    cx: &Ctx<'_>,
    l: &Logical,
    escape: char,
) -> Result<Instruction, DockerfileError> {
    let upper = l.keyword.to_ascii_uppercase();
    let no_flags = |cx: &Ctx<'_>| Flags::parse(cx, l, &[], &[]).map(|_| ());
    let one_string = |cx: &Ctx<'_>| -> Result<String, DockerfileError> {
        no_flags(cx)?;
        if l.rest.is_empty() {
            return Err(cx.err(l.line, format!("{upper} requires exactly one argument")));
        }
        Ok(l.rest.clone())
    };
    Ok(match l.keyword.as_str() {
        "env" | "label" => {
            no_flags(cx)?;
            Instruction::from_pairs(&l.keyword, name_values(cx, l, &upper, escape)?)
        }
        "arg" => {
            no_flags(cx)?;
            let words = words_keep_quotes(&l.rest, escape);
            if words.is_empty() {
                return Err(cx.err(l.line, "ARG requires at least one argument"));
            }
            let mut decls = Vec::new();
            for w in words {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_owned(), Some(d.to_owned())),
                    None => (w, None),
                };
                if name.is_empty() {
                    return Err(cx.err(l.line, "ARG names cannot be empty"));
                }
                decls.push(ArgDecl { name, default });
            }
            Instruction::Arg(decls)
        }
        "copy" | "add" => {
            let is_add = l.keyword == "add";
            let allowed: &[&str] = if is_add {
                &[
                    "chown",
                    "chmod",
                    "link",
                    "checksum",
                    "keep-git-dir",
                    "exclude",
                    "unpack",
                ]
            } else {
                &["from", "chown", "chmod", "link", "parents", "exclude"]
            };
            let mut flags = Flags::parse(
                cx,
                l,
                allowed,
                &["link", "parents", "keep-git-dir", "unpack"],
            )?;
            let mut words = json_or_words(&l.rest);
            if words.len() < 2 {
                let heredoc = words.first().is_some_and(|w| w.starts_with("<<"));
                if !heredoc {
                    return Err(cx.err(
                        l.line,
                        format!(
                            "{upper} requires at least two arguments, but only {} provided: the destination could not be determined",
                            if words.is_empty() { "none was".to_owned() } else { "one was".to_owned() }
                        ),
                    ));
                }
            }
            let dest = if words.len() >= 2 {
                words.pop().unwrap_or_default()
            } else {
                String::new()
            };
            let heredoc = words.iter().any(|w| {
                w.trim_start_matches(|c: char| c.is_ascii_digit())
                    .starts_with("<<")
            });
            let args = CopyArgs {
                sources: words,
                dest,
                from: flags.take("from"),
                chown: flags.take("chown"),
                chmod: flags.take("chmod"),
                other_flags: std::mem::take(&mut flags.values),
                heredoc,
            };
            if is_add {
                Instruction::Add(args)
            } else {
                Instruction::Copy(args)
            }
        }
        "workdir" => Instruction::Workdir(one_string(cx)?),
        "user" => Instruction::User(one_string(cx)?),
        "stopsignal" => Instruction::StopSignal(one_string(cx)?),
        "maintainer" => Instruction::Maintainer(one_string(cx)?),
        "expose" => {
            no_flags(cx)?;
            let ports: Vec<String> = l.rest.split_whitespace().map(str::to_owned).collect();
            if ports.is_empty() {
                return Err(cx.err(l.line, "EXPOSE requires at least one argument"));
            }
            Instruction::Expose(ports)
        }
        "volume" => {
            no_flags(cx)?;
            let v = json_or_words(&l.rest);
            if v.is_empty() || v.iter().any(|p| p.trim().is_empty()) {
                return Err(cx.err(l.line, "VOLUME specified can not be an empty string"));
            }
            Instruction::Volume(v)
        }
        "entrypoint" | "cmd" => {
            no_flags(cx)?;
            let c = command_line(&l.rest);
            if l.keyword == "cmd" {
                Instruction::Cmd(c)
            } else {
                Instruction::Entrypoint(c)
            }
        }
        "shell" => {
            no_flags(cx)?;
            match json_array(&l.rest) {
                Some(v) if !v.is_empty() => Instruction::Shell(v),
                _ => {
                    return Err(cx.err(
                        l.line,
                        "SHELL requires the arguments to be in JSON form, such as [\"/bin/sh\", \"-c\"]",
                    ));
                }
            }
        }
        "healthcheck" => {
            let mut flags = Flags::parse(
                cx,
                l,
                &[
                    "interval",
                    "timeout",
                    "start-period",
                    "start-interval",
                    "retries",
                ],
                &[],
            )?;
            let (kind, rest) = match l.rest.find(char::is_whitespace) {
                Some(p) => (&l.rest[..p], l.rest[p..].trim_start()),
                None => (l.rest.as_str(), ""),
            };
            match kind.to_ascii_uppercase().as_str() {
                "NONE" => {
                    if !rest.is_empty() || !flags.values.is_empty() {
                        return Err(
                            cx.err(l.line, "HEALTHCHECK NONE takes no arguments and no flags")
                        );
                    }
                    Instruction::Healthcheck(Healthcheck::None)
                }
                "CMD" => {
                    if rest.is_empty() {
                        return Err(cx.err(l.line, "HEALTHCHECK CMD requires a command"));
                    }
                    Instruction::Healthcheck(Healthcheck::Check {
                        test: command_line(rest),
                        interval: flags.take("interval"),
                        timeout: flags.take("timeout"),
                        start_period: flags.take("start-period"),
                        start_interval: flags.take("start-interval"),
                        retries: flags.take("retries"),
                    })
                }
                _ => {
                    return Err(cx.err(
                        l.line,
                        format!("HEALTHCHECK expects CMD or NONE, not {kind:?}"),
                    ));
                }
            }
        }
        "onbuild" => {
            no_flags(cx)?;
            let sub = l
                .rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            match sub.as_str() {
                "" => return Err(cx.err(l.line, "ONBUILD requires an instruction")),
                "ONBUILD" => {
                    return Err(cx.err(
                        l.line,
                        "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ));
                }
                "FROM" | "MAINTAINER" => {
                    return Err(
                        cx.err(l.line, format!("{sub} isn't allowed as an ONBUILD trigger"))
                    );
                }
                _ => Instruction::OnBuild(l.rest.clone()),
            }
        }
        "run" => {
            let mut flags = Flags::parse(cx, l, &["mount", "network", "security"], &[])?;
            let mut mounts = Vec::new();
            while let Some(m) = flags.take("mount") {
                if !m.contains('$') {
                    RunMount::parse(&m).map_err(|e| cx.err(l.line, format!("--mount={m}: {e}")))?;
                }
                mounts.push(m);
            }
            let network = flags.take("network");
            if let Some(n) = &network
                && !matches!(n.as_str(), "default" | "none" | "host")
            {
                return Err(cx.err(
                    l.line,
                    format!("--network={n}: expected default, none or host"),
                ));
            }
            let security = flags.take("security");
            if let Some(s) = &security
                && !matches!(s.as_str(), "sandbox" | "insecure")
            {
                return Err(cx.err(
                    l.line,
                    format!("--security={s}: expected sandbox or insecure"),
                ));
            }
            if l.rest.is_empty() {
                return Err(cx.err(l.line, "RUN requires a command"));
            }
            Instruction::Run(RunArgs {
                command: command_line(&l.rest),
                mounts,
                network,
                security,
                heredoc: !heredoc_names(&l.rest).is_empty(),
            })
        }
        _ => {
            return Err(cx.err(l.line, unknown_instruction(&l.keyword)));
        }
    })
}

impl Instruction {
    fn from_pairs(keyword: &str, pairs: Vec<(String, String)>) -> Instruction {
        if keyword == "env" {
            Instruction::Env(pairs)
        } else {
            Instruction::Label(pairs)
        }
    }
}

/// `KEY name=value ...` or the legacy `KEY name value`.
fn name_values(
    cx: &Ctx<'_>,
    l: &Logical,
    upper: &str,
    escape: char,
) -> Result<Vec<(String, String)>, DockerfileError> {
    let words = words_keep_quotes(&l.rest, escape);
    let Some(first) = words.first() else {
        return Err(cx.err(l.line, format!("{upper} requires at least one argument")));
    };
    if !first.contains('=') {
        let mut parts = l.rest.splitn(2, char::is_whitespace);
        let name = parts.next().unwrap_or_default();
        let value = parts.next().map(str::trim_start).unwrap_or_default();
        if value.is_empty() {
            return Err(cx.err(l.line, format!("{upper} must have two arguments")));
        }
        return Ok(vec![(name.to_owned(), value.to_owned())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(cx.err(
                l.line,
                format!("syntax error - can't find = in {w:?}: it must be of the form name=value"),
            )),
        })
        .collect()
}

fn json_array(rest: &str) -> Option<Vec<String>> {
    if !rest.trim_start().starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(rest.trim()).ok()
}

fn json_or_words(rest: &str) -> Vec<String> {
    json_array(rest).unwrap_or_else(|| rest.split_whitespace().map(str::to_owned).collect())
}

fn command_line(rest: &str) -> CommandLine {
    match json_array(rest) {
        Some(v) => CommandLine::Exec(v),
        None => CommandLine::Shell(rest.to_owned()),
    }
}
