//! Errors as people read them: an error and the sources it keeps, joined by ": " (what
//! anyhow's `{:#}` prints), for the places where a typed error becomes text at the edge
//! (a build's failure in the protocol, a reply of the control API, the dashboard).

use std::error::Error;
use std::fmt;

/// Shows an error followed by its sources, `outer: inner: root`. A source whose text the
/// message already holds (a `"{path}: {source}"` message) is not repeated.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        let mut cur = self.0.source();
        while let Some(inner) = cur {
            let text = inner.to_string();
            if !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            cur = inner.source();
        }
        f.write_str(&shown)
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `Chain(e).to_string()`.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("disk full")]
        Full,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("writing /x")]
        Write(#[source] Inner),
        #[error("writing /y: {0}")]
        Said(#[source] Inner),
    }

    #[test]
    fn joins_sources_once() {
        assert_eq!(chain(&Outer::Write(Inner::Full)), "writing /x: disk full");
        assert_eq!(chain(&Outer::Said(Inner::Full)), "writing /y: disk full");
        assert_eq!(chain(&Inner::Full), "disk full");
    }
}
