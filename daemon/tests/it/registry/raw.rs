//! Requests no well-behaved client sends, written on a bare socket so that nothing
//! (curl's path normalisation, a client library's checks) cleans them up first: path
//! traversal in the request line, foreign Host headers, uploads cut off mid-body.
//! Each gets its status and error code, and nothing is written.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Server, sha};

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?} {:?}", self.head, self.body));
        v["errors"][0]["code"].as_str().unwrap().to_owned()
    }
}

/// Sends `head` (request line and headers, without the blank line) plus `body` and reads
/// the reply until the server closes.
fn send(s: &Server, head: &str, body: &[u8]) -> Reply {
    exchange(s, head, body, false)
}

/// Sends `head` and a `body` shorter than announced, then hangs up.
fn cut_off(s: &Server, head: &str, body: &[u8]) {
    exchange(s, head, body, true);
}

fn exchange(s: &Server, head: &str, body: &[u8], hang_up: bool) -> Reply {
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    sock.write_all(body).unwrap();
    if hang_up {
        sock.shutdown(Shutdown::Both).unwrap();
        return Reply {
            status: 0,
            head: String::new(),
            body: String::new(),
        };
    }
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Every file under `dir` (relative path), except the lock file.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != ".lock" {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Polls `cond` until it holds or 10 s pass.
#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::yield_now();
    }
}

#[test]
fn crafted_request_lines_and_hosts() {
    let s = Server::start();
    // Something outside the cache that a traversal would reach.
    let secret = s.dir.path().join("secret");
    std::fs::write(&secret, "not for clients").unwrap();
    let before = files(s.dir.path());
    let cases = [
        (
            "GET /v2/../secret/manifests/latest HTTP/1.1",
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/../../../../etc/passwd/manifests/x HTTP/1.1",
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/org/img/blobs/sha256:..%2F..%2F..%2Fsecret HTTP/1.1",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET /v2/org/img/blobs/sha256:../../../secret HTTP/1.1",
            404,
            "UNSUPPORTED",
        ),
        (
            "GET /v2/org/img/blobs/uploads/..%2F..%2Fsecret HTTP/1.1",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        (
            "PUT /v2/org/..%2F..%2Fx/manifests/v1 HTTP/1.1",
            400,
            "NAME_INVALID",
        ),
        ("GET /../../secret HTTP/1.1", 404, "UNSUPPORTED"),
        (
            "DELETE /v2/org/img/blobs/sha256:%00 HTTP/1.1",
            400,
            "DIGEST_INVALID",
        ),
    ];
    for (line, status, code) in cases {
        let r = send(
            &s,
            &format!("{line}\r\nHost: localhost:5000\r\nContent-Length: 0"),
            b"",
        );
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{line}: {}",
            r.body
        );
        assert!(!r.body.contains("not for clients"));
    }
    for host in [
        "attacker.example",
        "attacker.example:5000",
        "localhost.attacker.example",
    ] {
        let r = send(
            &s,
            &format!("GET /v2/_catalog HTTP/1.1\r\nHost: {host}"),
            b"",
        );
        assert_eq!((r.status, r.code().as_str()), (403, "DENIED"), "{host}");
    }
    // RFC 9112 3.2: no Host, or two, is a bad request; 3.2.2: an absolute-form target's
    // authority is the host, whatever the Host header says.
    let r = send(&s, "GET /v2/ HTTP/1.0", b"");
    assert_eq!(r.status, 400, "no Host header: {}", r.head);
    let r = send(
        &s,
        "GET /v2/_catalog HTTP/1.1\r\nHost: localhost:5000\r\nHost: attacker.example",
        b"",
    );
    assert_eq!((r.status, r.code().as_str()), (400, "DENIED"), "two Hosts");
    let r = send(
        &s,
        "GET http://attacker.example/v2/_catalog HTTP/1.1\r\nHost: localhost:5000",
        b"",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "DENIED"),
        "absolute form"
    );
    // A web page's cross-site write (no CORS preflight for text/plain).
    let blob = b"from a web page";
    let r = send(
        &s,
        &format!(
            "POST /v2/x/blobs/uploads/?digest={} HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\
             Origin: http://attacker.example\r\nContent-Type: text/plain\r\nContent-Length: {}",
            sha(blob),
            blob.len()
        ),
        blob,
    );
    assert_eq!((r.status, r.code().as_str()), (403, "DENIED"), "Origin");
    assert_eq!(files(s.dir.path()), before);
}

#[test]
fn uploads_cut_off_mid_body_leave_nothing() {
    let s = Server::start();
    let before = files(s.dir.path());
    let blob = vec![7u8; 100_000];
    let d = sha(&blob);
    // Monolithic: 100,000 bytes announced, 10,000 sent, then the client hangs up.
    cut_off(
        &s,
        &format!(
            "POST /v2/org/img/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}",
            blob.len()
        ),
        &blob[..10_000],
    );
    eventually("the cut-off upload's temp file is gone", || {
        files(s.dir.path()) == before
    });
    assert_eq!(s.cache.blob_size(&d).unwrap(), None);

    // A session whose chunk is cut off: the session dies with it.
    let r = send(
        &s,
        "POST /v2/org/img/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0",
        b"",
    );
    assert_eq!(r.status, 202, "{}", r.head);
    let loc = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap()
        .to_owned();
    cut_off(
        &s,
        &format!(
            "PATCH {loc} HTTP/1.1\r\nHost: localhost\r\nContent-Range: 0-99999\r\nContent-Length: 100000"
        ),
        &blob[..5_000],
    );
    eventually("the cut-off session is gone", || {
        send(&s, &format!("GET {loc} HTTP/1.1\r\nHost: localhost"), b"").status == 404
    });
    // The session's writer, and with it its temp file, goes when the request task ends,
    // which may be a moment after the session left the table.
    eventually("the cut-off session's temp file is gone", || {
        files(s.dir.path()) == before
    });
}

#[test]
fn errors_hyper_answers_itself_carry_the_oci_error_json() {
    let s = Server::start();
    let before = files(s.dir.path());
    let r = send(
        &s,
        "POST /v2/org/img/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc",
        b"",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "UNSUPPORTED"),
        "{}",
        r.head
    );
    let huge = "x".repeat(1 << 20);
    let r = send(
        &s,
        &format!("GET /v2/ HTTP/1.1\r\nHost: localhost\r\nX-Big: {huge}"),
        b"",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (431, "SIZE_INVALID"),
        "{}",
        r.head
    );
    assert!(
        r.head
            .contains("docker-distribution-api-version: registry/2.0")
    );
    // An interim 100 Continue is hyper's too, and stays as it is.
    let blob = b"expect continue";
    let r = send(
        &s,
        &format!(
            "POST /v2/org/img/blobs/uploads/?digest={} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: {}",
            sha(blob),
            blob.len()
        ),
        blob,
    );
    assert!(r.head.starts_with("HTTP/1.1 100 Continue"), "{}", r.head);
    assert!(r.body.contains("HTTP/1.1 201 Created"), "{}", r.body);
    let _ = before;
}
