//! The API in-process over a real unix socket, with a test double answering the control
//! requests in place of the daemon core.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_shared::protocol::*;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::bus::Bus;
use crate::control::{ControlError, ControlRequest};

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    bus: Bus,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ApiError>>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/kiln/kilnd.sock");
        let bus = Bus::new(Snapshot::new("0.1.0-test", 7, vec!["/ws".into()], vec![]));
        let (control, requests) = mpsc::channel(8);
        tokio::spawn(fake_core(requests));
        let api = Api::bind(&socket).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api.serve(bus.clone(), control, async {
            let _ = stopped.await;
        }));
        Server {
            _dir: dir,
            socket,
            bus,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
        assert!(!self.socket.exists(), "the socket is removed on shutdown");
    }
}

/// Answers control requests the way the daemon core is specified to.
async fn fake_core(mut requests: mpsc::Receiver<ControlRequest>) {
    while let Some(r) = requests.recv().await {
        match r {
            ControlRequest::Build { req, reply } => {
                let answer = if req.package == "linuxkit/hello" {
                    Ok(BuildResponse {
                        builds: vec![QueuedBuild {
                            id: "b1".into(),
                            package: req.package,
                            arch: req.arch.unwrap_or_else(|| "amd64".into()),
                            tag: "abc".parse().unwrap(),
                            reason: if req.force { "forced" } else { "requested" }.into(),
                        }],
                        up_to_date: vec![],
                    })
                } else {
                    Err(ControlError::NotFound(format!(
                        "no package {:?} in the workspace",
                        req.package
                    )))
                };
                let _ = reply.send(answer);
            }
            ControlRequest::Cancel { req, reply } => {
                if req.package.as_deref() == Some("drop/me") {
                    drop(reply);
                    continue;
                }
                let _ = reply.send(Ok(CancelResponse {
                    cancelled: req.build.into_iter().collect(),
                }));
            }
            ControlRequest::Gc { reply } => {
                let _ = reply.send(Err(ControlError::Conflict("a GC is running".into())));
            }
            ControlRequest::Pull { req, reply } | ControlRequest::Push { req, reply } => {
                let results = req
                    .names
                    .into_iter()
                    .map(|name| kiln_shared::protocol::TransferResult {
                        name,
                        ok: true,
                        message: "done".into(),
                    })
                    .collect();
                let _ = reply.send(Ok(kiln_shared::protocol::TransferResponse { results }));
            }
        }
    }
}

async fn connect(socket: &Path) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: &str,
    version: Option<&str>,
) -> hyper::Response<Incoming> {
    let mut sender = connect(socket).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kilnd");
    if let Some(v) = version {
        req = req.header(PROTOCOL_HEADER, v);
    }
    sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap()
}

async fn text(r: hyper::Response<Incoming>) -> String {
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn call(socket: &Path, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let r = send(socket, method, path, body, Some("1")).await;
    assert_eq!(
        r.headers()[PROTOCOL_HEADER],
        "1",
        "every response carries the version"
    );
    let status = r.status();
    (status, text(r).await)
}

#[tokio::test]
async fn socket_is_private_and_stale_sockets_are_replaced() {
    let s = Server::start().await;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(s.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    // A second kilnd on the same socket is refused while the first answers.
    let err = Api::bind(&s.socket).await.unwrap_err();
    assert!(matches!(err, ApiError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("already answers"));
    let socket = s.socket.clone();
    let dir = tempfile::tempdir().unwrap();
    // A socket nobody listens on is stale: bind replaces it.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    drop(Api::bind(&stale).await.unwrap());
    // A regular file is never removed.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "data").unwrap();
    assert!(matches!(
        Api::bind(&file).await.unwrap_err(),
        ApiError::NotASocket { .. }
    ));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    s.stop().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn state_version_and_errors() {
    let s = Server::start().await;
    let (status, body) = call(&s.socket, Method::GET, "/api/v1/state", "").await;
    assert_eq!(status, StatusCode::OK);
    let snap: Snapshot = serde_json::from_str(&body).unwrap();
    assert_eq!(snap.roots, vec![PathBuf::from("/ws")]);
    assert_eq!(snap.daemon_version, "0.1.0-test");

    let (status, body) = call(&s.socket, Method::GET, "/api/v1/version", "").await;
    assert_eq!(status, StatusCode::OK);
    let v: VersionInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(v.protocol, PROTOCOL_VERSION);

    // A client of another protocol version is told which versions differ.
    let r = send(&s.socket, Method::GET, "/api/v1/state", "", Some("99")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ErrorBody = serde_json::from_str(&text(r).await).unwrap();
    assert!(
        e.error.contains("version 99") && e.error.contains("version 1"),
        "{}",
        e.error
    );
    // curl without the header is served.
    let r = send(&s.socket, Method::GET, "/api/v1/state", "", None).await;
    assert_eq!(r.status(), StatusCode::OK);

    let (status, body) = call(&s.socket, Method::GET, "/api/v1/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such API endpoint"), "{body}");
    let (status, _) = call(&s.socket, Method::POST, "/api/v1/state", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, body) = call(&s.socket, Method::POST, "/api/v1/build", "{\"pkg\":1}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("missing field `package`"), "{body}");
    let (status, _) = call(&s.socket, Method::GET, "/api/v1/builds/nope/log", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn control_requests_reach_the_core_and_map_its_errors() {
    let s = Server::start().await;
    let (status, body) = call(
        &s.socket,
        Method::POST,
        "/api/v1/build",
        r#"{"package":"linuxkit/hello","arch":"arm64","force":true}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r: BuildResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(r.builds[0].arch, "arm64");
    assert_eq!(r.builds[0].reason, "forced");

    let (status, body) = call(
        &s.socket,
        Method::POST,
        "/api/v1/build",
        r#"{"package":"x/y"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let e: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(e.error, "no package \"x/y\" in the workspace");

    let (status, body) = call(
        &s.socket,
        Method::POST,
        "/api/v1/cancel",
        r#"{"build":"b1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<CancelResponse>(&body)
            .unwrap()
            .cancelled,
        vec![BuildId::from("b1")]
    );
    // An empty body is an empty request: cancel everything.
    let (status, _) = call(&s.socket, Method::POST, "/api/v1/cancel", "").await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = call(
        &s.socket,
        Method::POST,
        "/api/v1/cancel",
        r#"{"package":"drop/me"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("without answering"), "{body}");

    let (status, body) = call(&s.socket, Method::POST, "/api/v1/gc", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("a GC is running"));
    s.stop().await;
}

async fn next_line(body: &mut Incoming, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return String::from_utf8(line).unwrap();
        }
        let frame = body.frame().await.expect("stream ended").unwrap();
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

#[tokio::test]
async fn events_stream_a_snapshot_then_events() {
    let s = Server::start().await;
    s.bus.publish(Event::WatchError { error: "x".into() });
    let r = send(&s.socket, Method::GET, "/api/v1/events", "", Some("1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let mut body = r.into_body();
    let mut buf = Vec::new();
    let first: StreamItem = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
    let StreamItem::Snapshot { snapshot } = first else {
        panic!("the stream starts with a snapshot");
    };
    assert_eq!(snapshot.seq, 1);
    assert_eq!(snapshot.watch_error.as_deref(), Some("x"));
    s.bus.publish(Event::WatchRecovered);
    let second: StreamItem = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
    assert_eq!(
        second,
        StreamItem::Event {
            seq: 2,
            event: Event::WatchRecovered
        }
    );
    drop(body);
    s.stop().await;
}

#[tokio::test]
async fn logs_are_read_whole_or_followed_to_the_end() {
    let s = Server::start().await;
    let id = BuildId::from("b7");
    s.bus.logs().open(&id);
    s.bus.log_line(&id, "step 1/2");
    let (status, body) = call(&s.socket, Method::GET, "/api/v1/builds/b7/log", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "step 1/2\n");

    let r = send(
        &s.socket,
        Method::GET,
        "/api/v1/builds/b7/log?follow=1",
        "",
        Some("1"),
    )
    .await;
    let mut body = r.into_body();
    let mut buf = Vec::new();
    assert_eq!(next_line(&mut body, &mut buf).await, "step 1/2\n");
    s.bus.log_line(&id, "step 2/2");
    assert_eq!(next_line(&mut body, &mut buf).await, "step 2/2\n");
    s.bus.logs().close(&id);
    // The follow ends with the build.
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(buf.is_empty() && rest.is_empty());
    s.stop().await;
}

#[test]
fn query_flags() {
    assert!(routes_query_flag(Some("follow=1"), "follow"));
    assert!(routes_query_flag(Some("a=2&follow=true"), "follow"));
    assert!(routes_query_flag(Some("follow"), "follow"));
    assert!(!routes_query_flag(Some("follow=0"), "follow"));
    assert!(!routes_query_flag(None, "follow"));
}

fn routes_query_flag(q: Option<&str>, name: &str) -> bool {
    super::routes::query_flag(q, name)
}
