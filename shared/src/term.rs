//! Whether kiln and kilnd may colour what they write: only on a terminal, and never
//! when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
//! A log file or a pipe gets plain text, and so does a build's own output shown where
//! escape codes would do harm ([`plain`]).

use std::borrow::Cow;

/// True when output that goes to a terminal (`is_terminal`) may carry colour codes.
pub fn colour(is_terminal: bool) -> bool {
    is_terminal && no_color_unset(std::env::var_os("NO_COLOR").as_deref())
}

fn no_color_unset(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_none_or(std::ffi::OsStr::is_empty)
}

/// A line of a program's output as a terminal would leave it, without its escape
/// codes: only what follows the last carriage return (a progress bar's final state),
/// with CSI (colours, cursor moves) and OSC (titles, links) sequences and other control
/// characters but tabs removed. Written here rather than taken from a crate: the one
/// rule both the dashboard and `kiln logs` need is a dozen lines.
pub fn plain(line: &str) -> Cow<'_, str> {
    let line = line
        .rsplit('\r')
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte @ to ~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(no_color_unset(None));
        assert!(no_color_unset(Some(OsStr::new(""))));
        assert!(!no_color_unset(Some(OsStr::new("1"))));
        assert!(!colour(false));
    }

    #[test]
    fn plain_drops_escape_codes_and_overwritten_text() {
        assert!(matches!(plain("#5 COPY . /"), Cow::Borrowed("#5 COPY . /")));
        assert_eq!(
            plain("\u{1b}[1;31merror:\u{1b}[0m it broke"),
            "error: it broke"
        );
        assert_eq!(plain(" 10%\r 50%\r100% done"), "100% done");
        assert_eq!(plain("done 100%\r"), "done 100%");
        assert_eq!(
            plain("\u{1b}]0;title\u{7}text\u{1b}]8;;http://x\u{1b}\\link"),
            "textlink"
        );
        assert_eq!(plain("a\tb\u{8}c"), "a\tbc");
    }
}
