//! `.dockerignore`: which package files stay out of the build context.
//!
//! The semantics are Docker's (moby `patternmatcher` and its `ignorefile` reader), not
//! gitignore's: patterns are cleaned like Go's `filepath.Clean`, anchored at the context
//! root, `*` and `?` never cross a `/`, `**` matches any number of directories (zero
//! included), `[...]` is a character class, `\` escapes, and a later `!pattern` re-includes
//! what an earlier one excluded. A path is excluded when it or one of its parent
//! directories matches (the last matching pattern wins).
//!
//! moby matches by compiling each pattern to a regular expression; so does this module,
//! with the `regex` crate and moby's translation (`*` is `[^/]*`, `?` is `[^/]`, `**/` is
//! `(.*/)?`, a final `**` is `.*`, a class is the regex class it spells, so `[^a]` negates
//! and matches `/`, while `[!a]` holds `!`). `globset` cannot express these: its `**`
//! exists only as a whole path component (moby's `a**/b` is `a(.*/)?b`) and `[!a]`
//! negates there. Where moby passes a pattern to the regexp compiler unchecked, this
//! module reads it as `filepath.Match` does: an escaped character and every character of
//! a class are literal, and a trailing `\` is an error.

use std::fmt;

use regex::Regex;

/// A `.dockerignore` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: {message}")]
pub struct IgnoreError {
    pub line: usize,
    pub message: String,
}

/// One pattern of a `.dockerignore`.
#[derive(Clone)]
pub struct Pattern {
    text: String,
    exclusion: bool,
    regex: Regex,
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
            let regex = compile(&cleaned).map_err(|message| IgnoreError {
                line,
                message: format!("pattern {raw:?}: {message}"),
            })?;
            ignore.has_exclusions |= exclusion;
            ignore.patterns.push(Pattern {
                text: cleaned,
                exclusion,
                regex,
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
    /// that matches is not an exception (moby's `MatchesOrParentMatches`).
    pub fn excludes(&self, path: &str) -> bool {
        let path = go_clean(path);
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception can only change an exclusion and vice versa.
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.regex.is_match(&path) || parents.iter().any(|p| pattern.regex.is_match(p)) {
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

/// Where the compiler is inside a `[...]`.
#[derive(Clone, Copy)]
struct Class {
    /// Whether a member has been read (a `]` before one is an error, as in Go).
    members: bool,
    /// Whether the last member may start a range (`a` in `a-z`, not `z`).
    may_range: bool,
}

/// A cleaned pattern as the anchored regular expression moby compiles it to, checked as
/// Go's `filepath.Match` checks it (moby rejects what that rejects).
fn compile(pattern: &str) -> Result<Regex, String> {
    let literal = |c: char| regex::escape(c.encode_utf8(&mut [0; 4]));
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    let mut class: Option<Class> = None;
    while let Some(c) = chars.next() {
        let escaped = if c == '\\' {
            Some(chars.next().ok_or("a '\\' at the end escapes nothing")?)
        } else {
            None
        };
        if let Some(mut cl) = class {
            match (c, escaped) {
                (']', None) if cl.members => {
                    re.push(']');
                    class = None;
                    continue;
                }
                (']', None) => {
                    return Err("an empty character class; write a ']' member as '\\]'".into());
                }
                ('^', None) if !cl.members && re.ends_with('[') => re.push('^'),
                ('-', None) if cl.may_range && chars.peek().is_some_and(|&n| n != ']') => {
                    re.push('-');
                    cl.may_range = false;
                    // The range's end: a member that starts no range.
                    let end = match chars.next() {
                        Some('\\') => chars.next().ok_or("a '\\' at the end escapes nothing")?,
                        Some('-') => return Err("a range cannot end with '-'; escape it".into()),
                        Some(e) => e,
                        None => return Err("unterminated character class '['".into()),
                    };
                    re.push_str(&literal(end));
                }
                ('-', None) => {
                    return Err(
                        "a '-' in a character class makes a range between two members; \
                         escape a '-' member as '\\-'"
                            .into(),
                    );
                }
                (c, None) | (_, Some(c)) => {
                    re.push_str(&literal(c));
                    cl.members = true;
                    cl.may_range = true;
                }
            }
            class = Some(cl);
            continue;
        }
        match (c, escaped) {
            ('*', None) if chars.peek() == Some(&'*') => {
                chars.next();
                chars.next_if_eq(&'/');
                re.push_str(if chars.peek().is_none() {
                    ".*"
                } else {
                    "(.*/)?"
                });
            }
            ('*', None) => re.push_str("[^/]*"),
            ('?', None) => re.push_str("[^/]"),
            ('[', None) => {
                re.push('[');
                class = Some(Class {
                    members: false,
                    may_range: false,
                });
            }
            (c, None) | (_, Some(c)) => re.push_str(&literal(c)),
        }
    }
    if class.is_some() {
        return Err("unterminated character class '['".into());
    }
    re.push('$');
    Regex::new(&re).map_err(|e| format!("not a valid pattern: {e}"))
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

    /// moby/patternmatcher's `TestMatches` table (patternmatcher_test.go), as
    /// `MatchesOrParentMatches` reads it: the cases it marks `exact` or `inexact` are
    /// excluded, `fail` ones are not.
    #[test]
    fn moby_patternmatcher_matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "file/", true),
            ("**/", "file", true),
            ("**/", "file/", true),
            ("**", "/", true),
            ("**/", "/", true),
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**", "dir/file/", true),
            ("**/", "dir/file/", true),
            ("**/**", "dir/file", true),
            ("**/**", "dir/file/", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/file/", true),
            ("dir/**", "dir/dir2/file", true),
            ("dir/**", "dir/dir2/file/", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/*", "dir/dir2/file/", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file/", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**/file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            ("a\\\\", "a\\", true),
            ("a\\*b", "a*b", true),
        ];
        for &(pattern, path, want) in cases {
            assert_eq!(ig(pattern).excludes(path), want, "{pattern:?} {path:?}");
        }
        for (patterns, path, want) in [
            ("**\n!util/docker/web", "util/docker/web/foo", false),
            (
                "**\n!util/docker/web\nutil/docker/web/foo",
                "util/docker/web/foo",
                true,
            ),
            (
                "**\n!dist/*.whl",
                "dist/proxy.py-2.4.0rc3-py3-none-any.whl",
                false,
            ),
        ] {
            assert_eq!(ig(patterns).excludes(path), want, "{patterns:?} {path:?}");
        }
    }

    /// Go's `filepath.Match` cases that moby's `TestMatch` runs through its matcher
    /// (patternmatcher_test.go `matchTests`): matches, and the patterns it rejects.
    #[test]
    fn moby_filepath_match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", true),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a\u{263a}b", true),
            ("a[^a]b", "a\u{263a}b", true),
            ("a???b", "a\u{263a}b", false),
            ("a[^a][^a][^a]b", "a\u{263a}b", false),
            ("[a-\u{3b6}]*", "\u{3b1}", true),
            ("*[a-\u{3b6}]", "A", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "x", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("[\\-x]", "-", true),
            ("[\\-x]", "a", false),
            ("*x", "xxx", true),
        ];
        for &(pattern, path, want) in cases {
            assert_eq!(ig(pattern).excludes(path), want, "{pattern:?} {path:?}");
        }
        for bad in [
            "[]a]", "[-]", "[x-]", "[-x]", "\\", "[a-b-c]", "[", "[^", "[^bc", "a[",
        ] {
            assert!(DockerIgnore::parse(bad).is_err(), "{bad:?} is accepted");
        }
    }
}
