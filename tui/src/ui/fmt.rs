//! Short human forms of sizes, durations, times, tags and digests.

use kiln_shared::protocol::{BuildOutcome, BuildSummary, BuiltBy, CacheStats};

/// `1.5 KiB`, `10.0 MiB`; bytes below 1 KiB as `512 B` (the daemon's own form).
pub use kiln_shared::size::format_size as bytes;

/// The blobs the cache reads from an upstream on first use (targets fetched lazily), if
/// any: `6 blobs (1.5 MiB) on demand`.
pub fn on_demand(c: &CacheStats) -> Option<String> {
    (c.on_demand_blobs > 0).then(|| {
        format!(
            "{} blobs ({}) on demand",
            c.on_demand_blobs,
            bytes(c.on_demand_bytes)
        )
    })
}

/// `850ms`, `1.5s`, `2m03s`, `1h02m`.
pub fn duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// A build's end in words: `built by native in 1.5s, 2/4 steps cached`, `pulled from
/// reg.example:5000/team in 120 ms`, `failed after 800ms: why`, `cancelled after 2.0s`.
pub fn last_build(l: &BuildSummary) -> String {
    let took = duration_ms(l.duration_ms);
    match l.outcome {
        BuildOutcome::Ok => match (&l.pulled_from, l.builder) {
            (Some(from), _) => format!("pulled from {from} in {} ms", l.duration_ms),
            (None, Some(BuiltBy::Cache)) => "in the cache already".to_owned(),
            (None, b) => format!(
                "built by {} in {took}, {}/{} steps cached",
                b.map_or("kiln", BuiltBy::as_str),
                l.cache_hits,
                l.steps
            ),
        },
        BuildOutcome::Failed => format!(
            "failed after {took}: {}",
            l.error.as_deref().unwrap_or("no reason given")
        ),
        BuildOutcome::Cancelled => format!(
            "cancelled after {took}{}",
            l.error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"))
        ),
    }
}

/// A tag in `n` characters or a few more: a dirty tag keeps its `-dirty-` part, so an
/// edit shows (`4f2a9c1b-dirty-1a2b3c4`, where the clean tag shows `4f2a9c1be07d`).
/// Characters of a clean tag shown in the packages table.
pub const TAG_WIDTH: usize = 12;

pub fn tag(t: &str, n: usize) -> String {
    match t.split_once("-dirty-") {
        Some((hash, dirt)) => format!("{}-dirty-{dirt}", short(hash, n.saturating_sub(4).max(7))),
        None => short(t, n).to_owned(),
    }
}

/// `HH:MM:SS` (UTC) of a unix time in ms.
pub fn clock(unix_ms: u64) -> String {
    let s = (unix_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

/// The first `n` characters.
pub fn short(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 << 20), "10.0 MiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(1500), "1.5s");
        assert_eq!(duration_ms(123_000), "2m03s");
        assert_eq!(duration_ms(3_720_000), "1h02m");
    }

    #[test]
    fn dirty_tags_stay_dirty_when_short() {
        let clean = "4f2a9c1be07d33554f2a9c1be07d33554f2a9c1b";
        let dirty = format!("{clean}-dirty-1a2b3c4");
        assert_eq!(tag(clean, 12), "4f2a9c1be07d");
        assert_eq!(tag(&dirty, 12), "4f2a9c1b-dirty-1a2b3c4");
        assert_ne!(tag(clean, 12), tag(&dirty, 12));
    }

    #[test]
    fn clocks_and_shorts() {
        assert_eq!(clock(1_700_000_002_000), "22:13:22");
        assert_eq!(short("abcdef", 3), "abc");
        assert_eq!(short("ab", 3), "ab");
        assert_eq!(short("éèà", 2), "éè");
    }
}
