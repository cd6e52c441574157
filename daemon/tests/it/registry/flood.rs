//! Idle clients cannot lock up the registry: the real kilnd under a low descriptor limit
//! (`ulimit -n 64` in the child, which sets it with setrlimit before it execs kilnd) gets far more upload sessions than
//! it keeps, and more connections than it has descriptors. Past the bound uploads get
//! 429 with Retry-After (never a 5xx), a session holds no descriptor, accept errors make
//! it back off and log once, and once the flood is gone a push goes through.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sha;

/// Descriptors kilnd may hold: enough to start (runtime, watcher, listeners, control
/// socket, cache lock) and little more.
const NOFILE: u64 = 64;

struct Daemon {
    child: Child,
    addr: String,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "kilnd stderr:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
    }
}

fn start(max_uploads: usize) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(
        ws.join("kiln.toml"),
        format!("[registry]\nmax-uploads = {max_uploads}\n"),
    )
    .unwrap();
    let ready = dir.path().join("ready.json");
    let stderr = dir.path().join("stderr");
    // The shell sets the limit in the child (setrlimit), then becomes kilnd.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_kilnd"))
        .arg(&ws)
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .arg("--socket")
        .arg(dir.path().join("kilnd.sock"))
        .arg("--ready-file")
        .arg(&ready)
        .args(["--listen", "127.0.0.1:0", "--builder", "native"])
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let child = cmd.spawn().unwrap();
    let mut d = Daemon {
        child,
        addr: String::new(),
        stderr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            break t;
        }
        assert!(d.child.try_wait().unwrap().is_none(), "kilnd exited");
        assert!(Instant::now() < deadline, "kilnd not ready in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    d.addr = v["registry"][0].as_str().unwrap().to_owned();
    d
}

/// One request on an open keep-alive connection: status and whole reply head.
fn request(
    conn: &mut TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String) {
    try_request(conn, addr, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`request`], or the I/O error that cut it (a connection the kernel queued while
/// kilnd had no descriptor to accept it with is reset).
fn try_request(
    conn: &mut TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Ok((status, format!("{head}{}", String::from_utf8_lossy(&body))))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")).map_or(0, |d| d.count())
}

#[test]
fn an_upload_and_connection_flood_under_a_low_descriptor_limit() {
    let max = 40;
    let d = start(max);
    let addr = d.addr.clone();
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Far more sessions than descriptors, each with a first chunk, then left idle.
    let mut sessions = Vec::new();
    let mut refused = 0;
    for i in 0..(3 * NOFILE as usize) {
        let (status, reply) = request(
            &mut conn,
            &addr,
            "POST",
            "/v2/flood/img/blobs/uploads/",
            format!("chunk {i}").as_bytes(),
        );
        match status {
            202 => sessions.push(
                reply
                    .lines()
                    .find_map(|l| l.strip_prefix("location: "))
                    .unwrap()
                    .to_owned(),
            ),
            429 => {
                assert!(
                    reply.contains("TOOMANYREQUESTS")
                        && reply.to_ascii_lowercase().contains("retry-after: "),
                    "{reply}"
                );
                refused += 1;
            }
            _ => panic!("upload {i}: {reply}"),
        }
    }
    assert_eq!(sessions.len(), max);
    assert_eq!(refused, 3 * NOFILE as usize - max);
    assert!(
        open_fds(d.child.id()) < NOFILE as usize,
        "idle sessions hold descriptors"
    );
    // More connections than descriptors: accept fails for a while; kilnd waits.
    let flood: Vec<TcpStream> = (0..2 * NOFILE)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(!flood.is_empty());
    // kilnd runs out of descriptors and its accept fails: it says so, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&d.stderr)
        .unwrap()
        .contains("cannot accept")
    {
        assert!(
            Instant::now() < deadline,
            "kilnd never ran out of descriptors ({} open)",
            open_fds(d.child.id())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(flood);
    // It answers again, on a new connection, once they are gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = TcpStream::connect(&addr) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if try_request(&mut c, &addr, "GET", "/v2/", b"").is_ok_and(|(s, _)| s == 200) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the registry stopped answering after the flood"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle uploads given up: a push goes through.
    let mut conn = TcpStream::connect(&addr).unwrap();
    for loc in &sessions {
        assert_eq!(request(&mut conn, &addr, "DELETE", loc, b"").0, 204);
    }
    let blob = b"after the flood";
    let (status, reply) = request(
        &mut conn,
        &addr,
        "POST",
        &format!("/v2/flood/img/blobs/uploads/?digest={}", sha(blob)),
        blob,
    );
    assert_eq!(status, 201, "{reply}");
    let log = std::fs::read_to_string(&d.stderr).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    let warnings = log.matches("cannot accept").count();
    assert!(
        warnings == 1,
        "accept errors are logged once a minute, not {warnings} times in this test"
    );
}
