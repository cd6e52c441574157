//! The request guard, against web pages. DNS rebinding: a page can make a browser send
//! requests to `http://evil.example:5000/` after pointing that name at 127.0.0.1, but the
//! browser then sends `Host: evil.example`; so the registry answers only requests whose
//! Host names the loopback interface or a name (or address) the user configured.
//! Cross-site requests: a page on any site can make a browser POST to
//! `http://127.0.0.1:5000/` without a CORS preflight (a "simple" request with
//! `Content-Type: text/plain`); the browser then sends that site's `Origin`, so a request
//! whose Origin is not an allowed host is refused too. Clients that are not browsers
//! (docker, skopeo, containerd) send no Origin.

use std::net::IpAddr;

use http::{Request, header};

use super::error::OciError;

/// Decides which Host headers the registry serves.
#[derive(Debug, Clone, Default)]
pub struct HostGuard {
    /// Lowercased configured names and address literals.
    allowed: Vec<String>,
}

impl HostGuard {
    /// `allowed`: extra host names or IP literals (without port) to accept.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(allowed: I) -> Self {
        HostGuard {
            allowed: allowed
                .into_iter()
                .map(|s| {
                    let s = s.as_ref().trim().to_ascii_lowercase();
                    s.trim_start_matches('[').trim_end_matches(']').to_owned()
                })
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// Whether the request may be served: one Host header (RFC 9112 3.2: none, or more
    /// than one, is a bad request), or the authority of an absolute-form target, which
    /// then stands for the Host (RFC 9112 3.2.2), names an allowed host; and an `Origin`,
    /// if any, is a page served from an allowed host.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), OciError> {
        let host = match req.uri().authority() {
            Some(authority) => authority.as_str(),
            None => {
                let mut hosts = req.headers().get_all(header::HOST).iter();
                let (Some(host), None) = (hosts.next(), hosts.next()) else {
                    return Err(OciError::HostInvalid(
                        "a request needs exactly one Host header (RFC 9112 3.2)".into(),
                    ));
                };
                host.to_str()
                    .map_err(|_| OciError::HostInvalid("the Host header is not ASCII".into()))?
            }
        };
        if !self.allows(host) {
            return Err(OciError::Denied(format!(
                "Host {host:?} is not a loopback name or a configured registry host: \
                 add it to the registry's allowed hosts to serve it"
            )));
        }
        let mut origins = req.headers().get_all(header::ORIGIN).iter();
        if let Some(origin) = origins.next() {
            let origin = origin.to_str().unwrap_or("");
            let allowed = origins.next().is_none()
                && origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .is_some_and(|host| !host.contains('/') && self.allows(host));
            if !allowed {
                return Err(OciError::Denied(format!(
                    "Origin {origin:?} is not a page of a loopback or configured registry \
                     host: the registry refuses requests that web pages send"
                )));
            }
        }
        Ok(())
    }

    /// Whether a request with this Host header value (`name`, `name:port`,
    /// `1.2.3.4:port`, `[::1]:port`) may be served.
    pub fn allows(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        if is_loopback_name(name) {
            return true;
        }
        self.allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// The host part of a Host header, without port or IPv6 brackets.
fn host_name(host: &str) -> Option<&str> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        return Some(inner);
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then_some(name)
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

fn is_loopback_name(name: &str) -> bool {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
    }
    // RFC 6761: "localhost" and every name under it resolve to loopback, and browsers
    // never send them elsewhere.
    let lower = name.to_ascii_lowercase();
    lower == "localhost" || lower.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_pass() {
        let g = HostGuard::new(Vec::<String>::new());
        for ok in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:5000",
            "localhost.:5000",
            "kiln.localhost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::1]",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(g.allows(ok), "{ok}");
        }
    }

    #[test]
    fn other_names_fail() {
        let g = HostGuard::new(Vec::<String>::new());
        for bad in [
            "",
            "evil.example",
            "evil.example:5000",
            "localhost.evil.example",
            "127.0.0.1.nip.io:5000",
            "10.0.0.1:5000",
            "[::2]:5000",
            "[::1]x",
            "localhost:abc",
            "localhost:5000:1",
        ] {
            assert!(!g.allows(bad), "{bad}");
        }
    }

    #[test]
    fn configured_names_pass() {
        let g = HostGuard::new(["Build-Box.lan", "[fd00::1]", "10.0.0.1"]);
        assert!(g.allows("build-box.lan:5000"));
        assert!(g.allows("[fd00::1]:5000"));
        assert!(g.allows("10.0.0.1:5000"));
        assert!(!g.allows("other.lan:5000"));
    }
}
