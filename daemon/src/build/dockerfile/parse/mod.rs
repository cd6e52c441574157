//! From text to [`Dockerfile`]: parser directives, then logical lines (continuations,
//! comments, heredoc bodies skipped), then stages; each instruction is parsed in
//! `instruction.rs`. Follows BuildKit's `frontend/dockerfile/parser`.

mod instruction;

use std::path::Path;

use super::{Dockerfile, DockerfileError, Instruction, Located};
use instruction::{parse_from, parse_instruction};

pub(super) struct Ctx<'a> {
    path: &'a Path,
    lines: &'a [&'a str],
}

impl Ctx<'_> {
    /// An error at `line` (1-based), at the column where its text starts.
    pub(super) fn err(&self, line: usize, message: impl Into<String>) -> DockerfileError {
        let column = self.lines.get(line.wrapping_sub(1)).map_or(1, |l| {
            l.chars().take_while(|c| c.is_whitespace()).count() + 1
        });
        DockerfileError {
            path: self.path.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// One logical line: the instruction keyword (lowercase), flags, the rest, and where it is.
pub(super) struct Logical {
    pub(super) line: usize,
    pub(super) text: String,
    pub(super) keyword: String,
    pub(super) flags: Vec<String>,
    pub(super) rest: String,
}

pub(super) fn parse(path: &Path, text: &str) -> Result<Dockerfile, DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let cx = Ctx {
        path,
        lines: &lines,
    };

    // Parser directives: only at the very top; the first line that is not one ends them.
    let mut escape = '\\';
    let mut syntax = None;
    let mut seen: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        let line = i + 1;
        if matches!(key.as_str(), "escape" | "syntax" | "check") {
            if seen.contains(&key) {
                return Err(cx.err(line, format!("only one {key} parser directive can be used")));
            }
            seen.push(key.clone());
        }
        match key.as_str() {
            "escape" => {
                escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(cx.err(
                            line,
                            format!("invalid escape token '{value}': it must be ` or \\"),
                        ));
                    }
                }
            }
            "syntax" => {
                syntax = Some(Located {
                    line,
                    text: lines[i].to_owned(),
                    value,
                })
            }
            // `check` configures linting, which does not change the build; unknown
            // directives are comments.
            _ => {}
        }
        i += 1;
    }

    let mut logical = Vec::new();
    while i < lines.len() {
        let raw = lines[i];
        i += 1;
        let start = i;
        let stripped = raw.trim_start();
        if stripped.starts_with('#') || stripped.trim().is_empty() {
            continue;
        }
        let (mut joined, mut cont) = trim_continuation(stripped, escape);
        while cont && i < lines.len() {
            let l = lines[i];
            i += 1;
            if l.trim_start().starts_with('#') || l.trim().is_empty() {
                continue;
            }
            let (part, c) = trim_continuation(l, escape);
            joined.push_str(&part);
            cont = c;
        }
        if joined.trim().is_empty() {
            continue;
        }
        let trimmed = joined.trim();
        let (keyword, rest) = match trimmed.find(char::is_whitespace) {
            Some(p) => (&trimmed[..p], trimmed[p..].trim_start()),
            None => (trimmed, ""),
        };
        let (rest, flags) = extract_flags(rest);
        let l = Logical {
            line: start,
            text: trimmed.to_owned(),
            keyword: keyword.to_ascii_lowercase(),
            flags,
            rest: rest.trim_end().to_owned(),
        };
        // Heredoc bodies follow the line that opens them; skip them so the rest of the
        // file parses, and let the builder refuse the instruction by its line.
        if matches!(l.keyword.as_str(), "run" | "copy" | "add") {
            for (name, strip_tabs) in heredoc_names(&l.rest) {
                loop {
                    let Some(body) = lines.get(i) else {
                        return Err(cx.err(
                            l.line,
                            format!("unterminated heredoc: no line \"{name}\" ends it"),
                        ));
                    };
                    i += 1;
                    let body = if strip_tabs {
                        body.trim_start_matches('\t')
                    } else {
                        body
                    };
                    if body == name {
                        break;
                    }
                }
            }
        }
        logical.push(l);
    }

    let mut df = Dockerfile {
        path: path.to_owned(),
        escape,
        syntax,
        global_args: Vec::new(),
        stages: Vec::new(),
    };
    for l in logical {
        if l.keyword == "from" {
            df.stages.push(parse_from(&cx, &l)?);
            continue;
        }
        let ins = parse_instruction(&cx, &l, escape)?;
        match df.stages.last_mut() {
            Some(stage) => stage.instructions.push(Located {
                line: l.line,
                text: l.text,
                value: ins,
            }),
            None => match ins {
                Instruction::Arg(args) => df.global_args.push(Located {
                    line: l.line,
                    text: l.text,
                    value: args,
                }),
                other => {
                    return Err(cx.err(
                        l.line,
                        format!(
                            "{} comes before the first FROM: only ARG may precede FROM",
                            other.keyword()
                        ),
                    ));
                }
            },
        }
    }
    if df.stages.is_empty() {
        return Err(cx.err(
            lines.len().max(1),
            "the Dockerfile has no FROM instruction: a build needs at least one stage",
        ));
    }
    Ok(df)
}

/// `# key=value` at the top of the file.
fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let key_len = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(rest.len(), |(i, _)| i);
    if key_len == 0 {
        return None;
    }
    let (key, after) = rest.split_at(key_len);
    let value = after.trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.to_owned()))
}

fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    match t.strip_suffix(escape) {
        Some(s) => (s.to_owned(), true),
        None => (line.to_owned(), false),
    }
}

/// Leading `--flag[=value]` words (quotes removed), and the rest of the line.
fn extract_flags(rest: &str) -> (String, Vec<String>) {
    let mut flags = Vec::new();
    let mut s = rest;
    loop {
        let t = s.trim_start();
        if !t.starts_with("--") {
            return (t.to_owned(), flags);
        }
        let mut word = String::new();
        let mut quote = None;
        let mut end = t.len();
        let mut chars = t.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) if c == '\\' => {
                    if let Some((_, n)) = chars.next() {
                        word.push(n);
                    }
                }
                Some(_) => word.push(c),
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None if c == '\'' || c == '"' => quote = Some(c),
                None if c == '\\' => {
                    if let Some((_, n)) = chars.next() {
                        word.push(n);
                    }
                }
                None => word.push(c),
            }
        }
        s = &t[end..];
        if word == "--" {
            return (s.trim_start().to_owned(), flags);
        }
        flags.push(word);
    }
}

pub(super) fn heredoc_names(rest: &str) -> Vec<(String, bool)> {
    rest.split_whitespace()
        .filter_map(|w| {
            let w = w.trim_start_matches(|c: char| c.is_ascii_digit());
            let w = w.strip_prefix("<<")?;
            let (w, strip) = match w.strip_prefix('-') {
                Some(w) => (w, true),
                None => (w, false),
            };
            let name: String = w
                .trim_matches(|c| c == '"' || c == '\'')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some((name, strip))
        })
        .collect()
}
