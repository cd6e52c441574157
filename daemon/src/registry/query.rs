//! Query strings: `?digest=sha256%3A…&mount=…&from=…&n=…&last=…&artifactType=…`, with
//! percent-decoding (clients encode the `:` of digests).

/// The decoded value of the first `key` parameter, if present.
pub fn param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == key).then(|| decode(v)).flatten()
    })
}

/// Percent-decodes (and turns `+` into a space); `None` for invalid escapes or UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex_val(*b.get(i + 1)?)?;
                let lo = hex_val(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes a query value (tags and names are safe except for nothing; this
/// keeps `Link` headers correct for any `last`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let q = Some("mount=sha256%3Aab&from=a%2Fb&n=3&flag&n=4");
        assert_eq!(param(q, "mount").as_deref(), Some("sha256:ab"));
        assert_eq!(param(q, "from").as_deref(), Some("a/b"));
        assert_eq!(param(q, "n").as_deref(), Some("3"));
        assert_eq!(param(q, "flag").as_deref(), Some(""));
        assert_eq!(param(q, "last"), None);
        assert_eq!(param(None, "n"), None);
        assert_eq!(param(Some("x=%zz"), "x"), None);
        assert_eq!(param(Some("x=%e2%82"), "x"), None);
        assert_eq!(encode("a b:c/d"), "a%20b%3Ac/d");
    }
}
