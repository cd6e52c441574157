//! Whether kiln and kilnd may colour what they write: only on a terminal, and never
//! when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
//! A log file or a pipe gets plain text.

/// True when output that goes to a terminal (`is_terminal`) may carry colour codes.
pub fn colour(is_terminal: bool) -> bool {
    is_terminal && no_color_unset(std::env::var_os("NO_COLOR").as_deref())
}

fn no_color_unset(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_none_or(std::ffi::OsStr::is_empty)
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
}
