//! Query strings: `?digest=sha256%3A…&mount=…&from=…&n=…&last=…&artifactType=…`,
//! decoded as `application/x-www-form-urlencoded` (clients encode the `:` of digests).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// What stays unescaped in a query value kiln writes (`Link` headers).
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The decoded value of the first `key` parameter, if present. An invalid escape stays
/// as it is, and invalid UTF-8 becomes U+FFFD: the value then fails its own validation
/// (a digest, a number), with the error that names it.
pub fn param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Percent-encodes a query value, so `Link` headers are right for any `last`.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let q = Some("mount=sha256%3Aab&from=a%2Fb&n=3&flag&n=4&sp=a+b");
        assert_eq!(param(q, "mount").as_deref(), Some("sha256:ab"));
        assert_eq!(param(q, "from").as_deref(), Some("a/b"));
        assert_eq!(param(q, "n").as_deref(), Some("3"));
        assert_eq!(param(q, "flag").as_deref(), Some(""));
        assert_eq!(param(q, "sp").as_deref(), Some("a b"));
        assert_eq!(param(q, "last"), None);
        assert_eq!(param(None, "n"), None);
        // Left for the value's own validation to refuse.
        assert_eq!(param(Some("x=%zz"), "x").as_deref(), Some("%zz"));
        assert_eq!(param(Some("x=%e2%82"), "x").as_deref(), Some("\u{fffd}"));
        assert_eq!(encode("a b:c/d"), "a%20b%3Ac/d");
    }
}
