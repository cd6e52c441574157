//! `.dockerignore`: which package files stay out of the build context.
//!
//! The semantics are Docker's (moby `patternmatcher` and its `ignorefile` reader), not
//! gitignore's: patterns are cleaned like Go's `filepath.Clean`, anchored at the context
//! root, `*` and `?` never cross a `/`, `**` matches any number of directories (zero
//! included), `[...]` is a character class, `\` escapes, and a later `!pattern` re-includes
//! what an earlier one excluded. A path is excluded when it or one of its parent
//! directories matches (the last matching pattern wins).

use std::fmt;

/// A `.dockerignore` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: {message}")]
pub struct IgnoreError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`: any run of characters other than `/`.
    Star,
    /// `?`: one character other than `/`.
    One,
    /// `[...]`: one character (never `/` unless listed) in or out of the set.
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
    /// `**` followed by more pattern: any number of whole directories, zero included.
    AnyDirs,
    /// `**` at the end: anything at all.
    AnyRest,
}

/// One pattern of a `.dockerignore`.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    exclusion: bool,
    tokens: Vec<Token>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exclusion {
            write!(f, "!{}", self.text)
        } else {
            f.write_str(&self.text)
        }
    }
}

/// The parsed patterns of a `.dockerignore`, in order.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    has_exclusions: bool,
}

impl DockerIgnore {
    /// Parses a `.dockerignore` file's contents as Docker's reader does: a UTF-8 BOM is
    /// dropped, lines starting with `#` are comments, lines are trimmed, empty lines are
    /// skipped, a leading `/` is dropped and each pattern is cleaned.
    pub fn parse(text: &str) -> Result<DockerIgnore, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut ignore = DockerIgnore::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exclusion = pattern.starts_with('!');
            if exclusion {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(IgnoreError {
                        line,
                        message: "illegal exclusion pattern: \"!\"".into(),
                    });
                }
            }
            let mut cleaned = go_clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let tokens = compile(&cleaned).map_err(|message| IgnoreError {
                line,
                message: format!("pattern {raw:?}: {message}"),
            })?;
            ignore.has_exclusions |= exclusion;
            ignore.patterns.push(Pattern {
                text: cleaned,
                exclusion,
                tokens,
            });
        }
        Ok(ignore)
    }

    /// Whether there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether some pattern re-includes (`!`), so that an excluded directory must still be
    /// walked for exceptions inside it.
    pub fn has_exclusions(&self) -> bool {
        self.has_exclusions
    }

    /// Whether `path` (relative to the context root, `/`-separated, no leading `/`) is
    /// left out of the context: it or one of its parents matches, and the last pattern
    /// that matches is not an exception.
    pub fn excludes(&self, path: &str) -> bool {
        let path = go_clean(path);
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception can only change an exclusion and vice versa.
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = glob(&pattern.tokens, &path.chars().collect::<Vec<_>>());
            if !hit {
                for i in 0..parents.len() {
                    let parent = parents[..=i].join("/");
                    if glob(&pattern.tokens, &parent.chars().collect::<Vec<_>>()) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }
}

/// Go's `path.Clean`: collapses `//`, removes `.` elements and resolves `..` lexically.
pub(crate) fn go_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|p| *p != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            p => out.push(p),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

fn compile(pattern: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    tokens.push(Token::AnyRest);
                } else {
                    tokens.push(Token::AnyDirs);
                }
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::One),
            '\\' => match chars.get(i) {
                Some(&next) => {
                    tokens.push(Token::Char(next));
                    i += 1;
                }
                None => tokens.push(Token::Char('\\')),
            },
            '[' => {
                let mut negated = false;
                // Only '^' negates, as in filepath.Match and the regexp Docker compiles
                // the pattern to ('!' is an ordinary member).
                if chars.get(i) == Some(&'^') {
                    negated = true;
                    i += 1;
                }
                let mut items = Vec::new();
                let mut closed = false;
                let mut first = true;
                while i < chars.len() {
                    let mut lo = chars[i];
                    i += 1;
                    if lo == ']' && !first {
                        closed = true;
                        break;
                    }
                    first = false;
                    if lo == '\\' {
                        lo = *chars.get(i).ok_or("unterminated character class")?;
                        i += 1;
                    }
                    let mut hi = lo;
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
                        hi = chars[i + 1];
                        i += 2;
                        if hi == '\\' {
                            hi = *chars.get(i).ok_or("unterminated character class")?;
                            i += 1;
                        }
                        if hi < lo {
                            return Err(format!("bad range {lo}-{hi} in character class"));
                        }
                    }
                    items.push((lo, hi));
                }
                if !closed {
                    return Err("unterminated character class '['".into());
                }
                tokens.push(Token::Class { negated, items });
            }
            c => tokens.push(Token::Char(c)),
        }
    }
    Ok(tokens)
}

/// Matches the whole of `s` against `tokens` (backtracking; patterns are short).
fn glob(tokens: &[Token], s: &[char]) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match first {
        Token::Char(c) => s.first() == Some(c) && glob(rest, &s[1..]),
        Token::One => s.first().is_some_and(|&c| c != '/') && glob(rest, &s[1..]),
        Token::Class { negated, items } => {
            s.first().is_some_and(|&c| {
                // As in the regexp Docker compiles the pattern to, a negated class matches
                // any other character, '/' included.
                items.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }) && glob(rest, &s[1..])
        }
        Token::Star => {
            let mut i = 0;
            loop {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i >= s.len() || s[i] == '/' {
                    return false;
                }
                i += 1;
            }
        }
        Token::AnyRest => true,
        Token::AnyDirs => {
            // `(.*/)?`: nothing, or anything up to and including some '/'.
            if glob(rest, s) {
                return true;
            }
            (0..s.len()).any(|i| s[i] == '/' && glob(rest, &s[i + 1..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn clean_matches_go() {
        for (input, want) in [
            ("", "."),
            ("a//b", "a/b"),
            ("./a/./b/", "a/b"),
            ("a/../b", "b"),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("/", "/"),
            ("a/b/../..", "."),
        ] {
            assert_eq!(go_clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn plain_names_match_at_the_root_and_their_children() {
        let i = ig("node_modules\n");
        assert!(i.excludes("node_modules"));
        assert!(i.excludes("node_modules/x/y.js"));
        assert!(
            !i.excludes("src/node_modules"),
            "anchored at the root, unlike gitignore"
        );
        assert!(!i.excludes("node_modules2"));
    }

    #[test]
    fn star_and_question_do_not_cross_slashes() {
        let i = ig("*.o\n*/temp?\n");
        assert!(i.excludes("a.o"));
        assert!(
            !i.excludes("dir/a.o"),
            "*.o is anchored: no match in a subdirectory"
        );
        assert!(i.excludes("x/temp1"));
        assert!(
            i.excludes("x/temp1/inner"),
            "a matching parent excludes its children"
        );
        assert!(!i.excludes("x/y/temp1"));
        assert!(!i.excludes("x/temp12"));
    }

    #[test]
    fn double_star_matches_any_depth() {
        let i = ig("**/*.go\n");
        assert!(i.excludes("a.go"), "** matches zero directories");
        assert!(i.excludes("a/b/c.go"));
        assert!(!i.excludes("a/b/c.gox"));
        let i = ig("a/**/z\n");
        assert!(i.excludes("a/z"));
        assert!(i.excludes("a/b/c/z"));
        assert!(!i.excludes("b/z"));
        let i = ig("build/**\n");
        assert!(i.excludes("build/x"));
        assert!(i.excludes("build/x/y"));
        let i = ig("**\n!keep\n");
        assert!(i.excludes("anything/at/all"));
        assert!(!i.excludes("keep"));
    }

    #[test]
    fn exceptions_are_applied_in_order() {
        let i = ig("*.md\n!README.md\n");
        assert!(i.excludes("CHANGES.md"));
        assert!(!i.excludes("README.md"));
        // The last matching line wins.
        let i = ig("!README.md\n*.md\n");
        assert!(i.excludes("README.md"));
        // Docker's documented example: exclude all markdown but README*.md except
        // README-secret.md.
        let i = ig("*.md\n!README*.md\nREADME-secret.md\n");
        assert!(i.excludes("a.md"));
        assert!(!i.excludes("README-x.md"));
        assert!(i.excludes("README-secret.md"));
        // Re-including a file inside an excluded directory.
        let i = ig("docs\n!docs/keep.txt\n");
        assert!(i.excludes("docs/other.txt"));
        assert!(!i.excludes("docs/keep.txt"));
        assert!(i.has_exclusions());
    }

    #[test]
    fn comments_blank_lines_leading_slash_and_cleaning() {
        let i = ig("\u{feff}# comment\n\n   /secret/../secret/key  \n ./tmp/ \n #notacomment\n");
        assert!(i.excludes("secret/key"));
        assert!(i.excludes("tmp/x"));
        assert!(
            i.excludes("#notacomment"),
            "only a '#' in column 0 starts a comment"
        );
        assert_eq!(i.patterns.len(), 3);
    }

    #[test]
    fn classes_and_escapes() {
        let i = ig("file[0-9].txt\nx[^a]y\nz[!q]\nlit\\*eral\n");
        assert!(i.excludes("file7.txt"));
        assert!(!i.excludes("filea.txt"));
        assert!(i.excludes("xby"));
        assert!(!i.excludes("xay"));
        assert!(
            i.excludes("z!") && i.excludes("zq"),
            "'!' is a member, not a negation"
        );
        assert!(!i.excludes("zb"));
        assert!(i.excludes("lit*eral"));
        assert!(!i.excludes("litXeral"));
    }

    #[test]
    fn bad_patterns_are_errors_with_their_line() {
        let e = DockerIgnore::parse("ok\n[abc\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("unterminated"), "{e}");
        let e = DockerIgnore::parse("!\n").unwrap_err();
        assert!(e.to_string().contains("illegal exclusion"), "{e}");
    }
}
