//! Shutdown drains: a push in flight when the registry is told to stop finishes (201,
//! the blob stored), and then nothing more is accepted; an upload session a client left
//! idle does not keep the registry listening.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Server, sha};

#[test]
fn a_shutdown_during_a_push_lets_the_push_finish() {
    let s = Server::start();
    let blob = vec![3u8; 200_000];
    let d = sha(&blob);
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "POST /v2/org/img/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    )
    .unwrap();
    sock.write_all(&blob[..100_000]).unwrap();
    // The upload has begun once its temp file exists.
    let tmp = s.cache.tmp_dir().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&tmp).unwrap().count() == 0 {
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.shutdown();
    // No new connections once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(s.addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the registry still accepts after shutdown"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The push in flight goes on to the end.
    sock.write_all(&blob[100_000..]).unwrap();
    let mut reply = Vec::new();
    let _ = sock.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert_eq!(s.cache.blob_size(&d).unwrap(), Some(blob.len() as u64));
}

#[test]
fn an_upload_left_idle_does_not_hold_the_shutdown() {
    let s = Server::start();
    // A session a client began and then left (a push interrupted by the user).
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "POST /v2/org/img/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let _ = sock.read_to_end(&mut reply);
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    s.shutdown();
    // The registry listens a moment for the push's next request, then closes, though
    // the session is still open (it would expire in minutes).
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(s.addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "an idle upload session keeps the registry listening after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
