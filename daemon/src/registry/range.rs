//! Byte ranges: the `Range` of a blob GET (answered like Go's `http.ServeContent`, which
//! registry:2 uses: 206 for one satisfiable range, 416 with `Content-Range: bytes */len`
//! for a malformed or unsatisfiable one, the whole blob for a multi-range request), and
//! the `Content-Range` of an upload chunk (`<first>-<last>`, inclusive, with or without
//! a `bytes ` unit and a `/total`).

/// The answer to a blob GET's `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Serve the whole blob with 200.
    Whole,
    /// Serve `len` bytes from `start` with 206.
    Part { start: u64, len: u64 },
    /// 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value against a blob of `size` bytes.
pub fn blob_range(value: Option<&str>, size: u64) -> RangeAnswer {
    let Some(value) = value else {
        return RangeAnswer::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Unsatisfiable;
    };
    if spec.contains(',') {
        // Several ranges: a server may answer with the whole representation.
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Unsatisfiable;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix: the last N bytes.
        let Some(n) = parse_u64(last) else {
            return RangeAnswer::Unsatisfiable;
        };
        if n == 0 || size == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        let n = n.min(size);
        return RangeAnswer::Part {
            start: size - n,
            len: n,
        };
    }
    let Some(start) = parse_u64(first) else {
        return RangeAnswer::Unsatisfiable;
    };
    let end = if last.is_empty() {
        size.saturating_sub(1)
    } else {
        match parse_u64(last) {
            Some(l) if l >= start => l.min(size.saturating_sub(1)),
            _ => return RangeAnswer::Unsatisfiable,
        }
    };
    if start >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part {
        start,
        len: end - start + 1,
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// An upload chunk's `Content-Range`: the first and last byte offsets, inclusive.
pub fn upload_range(value: &str) -> Option<(u64, u64)> {
    let v = value.trim();
    let v = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("bytes="))
        .unwrap_or(v);
    let v = v.split_once('/').map_or(v, |(r, _total)| r);
    let (a, b) = v.trim().split_once('-')?;
    let (a, b) = (parse_u64(a.trim())?, parse_u64(b.trim())?);
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_ranges() {
        use RangeAnswer::*;
        assert_eq!(blob_range(None, 10), Whole);
        assert_eq!(blob_range(Some("bytes=0-4"), 10), Part { start: 0, len: 5 });
        assert_eq!(blob_range(Some("bytes=5-"), 10), Part { start: 5, len: 5 });
        assert_eq!(
            blob_range(Some("bytes=8-100"), 10),
            Part { start: 8, len: 2 }
        );
        assert_eq!(blob_range(Some("bytes=-3"), 10), Part { start: 7, len: 3 });
        assert_eq!(
            blob_range(Some("bytes=-30"), 10),
            Part { start: 0, len: 10 }
        );
        assert_eq!(blob_range(Some("bytes=9-9"), 10), Part { start: 9, len: 1 });
        assert_eq!(blob_range(Some("bytes=0-1,4-5"), 10), Whole);
        for bad in [
            "bytes=10-",
            "bytes=10-12",
            "bytes=5-2",
            "bytes=-0",
            "bytes=-",
            "bytes=a-b",
            "bytes=1",
            "items=0-1",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(blob_range(Some(bad), 10), Unsatisfiable, "{bad}");
        }
        assert_eq!(blob_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn upload_ranges() {
        assert_eq!(upload_range("0-1023"), Some((0, 1023)));
        assert_eq!(upload_range("bytes 10-19/*"), Some((10, 19)));
        assert_eq!(upload_range("bytes=10-19"), Some((10, 19)));
        for bad in ["", "5", "5-", "-5", "9-3", "a-b", "1-2-3"] {
            assert_eq!(upload_range(bad), None, "{bad}");
        }
    }
}
