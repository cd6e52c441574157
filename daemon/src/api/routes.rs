//! The API's routes: one function per resource, one mapping of errors to JSON.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use kiln_shared::protocol::{
    API_PREFIX, BuildId, BuildRequest, CancelRequest, ErrorBody, PROTOCOL_HEADER, PROTOCOL_VERSION,
    TransferRequest, VersionInfo,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::body::{ChannelBody, ResponseBody, full};
use crate::bus::{Bus, LogChunk};
use crate::control::{ControlError, ControlRequest, Reply};

/// The largest request body accepted.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Chunks buffered per streaming response.
const STREAM_CHUNKS: usize = 64;
/// Log lines per chunk of a log response.
const LOG_LINES_PER_CHUNK: usize = 256;

#[derive(Clone)]
pub(super) struct State {
    inner: Arc<(Bus, mpsc::Sender<ControlRequest>)>,
    /// The tasks that feed streaming responses (events, followed logs): the server
    /// awaits them when it stops.
    streams: TaskTracker,
}

impl State {
    pub(super) fn new(
        bus: Bus,
        control: mpsc::Sender<ControlRequest>,
        streams: TaskTracker,
    ) -> Self {
        State {
            inner: Arc::new((bus, control)),
            streams,
        }
    }

    fn bus(&self) -> &Bus {
        &self.inner.0
    }

    fn control(&self) -> &mpsc::Sender<ControlRequest> {
        &self.inner.1
    }
}

/// An error response.
struct Failure(StatusCode, String);

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Cache(_)
            | ControlError::Snapshots(_)
            | ControlError::Stopped(_)
            | ControlError::GcStopped(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, kiln_shared::error::chain(&e))
    }
}

type Answer = Result<Response<ResponseBody>, Failure>;

pub(super) async fn handle(req: Request<Incoming>, state: State) -> Response<ResponseBody> {
    let mut response = match route(req, &state).await {
        Ok(r) => r,
        Err(Failure(status, error)) => json(status, &ErrorBody { error }),
    };
    response
        .headers_mut()
        .insert(PROTOCOL_HEADER, header::HeaderValue::from(PROTOCOL_VERSION));
    response
}

async fn route(req: Request<Incoming>, state: &State) -> Answer {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return Err(not_found(&path));
    };
    if rest == "/version" {
        return expect_method(&req, &Method::GET).map(|()| {
            json(
                StatusCode::OK,
                &VersionInfo {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: state.bus().snapshot().daemon_version,
                },
            )
        });
    }
    check_version(&req)?;
    match rest {
        "/state" => {
            expect_method(&req, &Method::GET)?;
            Ok(json(StatusCode::OK, &state.bus().snapshot()))
        }
        "/events" => {
            expect_method(&req, &Method::GET)?;
            Ok(events(state.bus().clone(), &state.streams))
        }
        "/build" => {
            expect_method(&req, &Method::POST)?;
            let req: BuildRequest = read_json(req).await?;
            if req.package.is_empty() {
                return Err(Failure(
                    StatusCode::BAD_REQUEST,
                    "the build request names no package: send {\"package\": \"org/image\"}".into(),
                ));
            }
            control(state, |reply| ControlRequest::Build { req, reply }).await
        }
        "/cancel" => {
            expect_method(&req, &Method::POST)?;
            let req: CancelRequest = read_json(req).await?;
            control(state, |reply| ControlRequest::Cancel { req, reply }).await
        }
        "/gc" => {
            expect_method(&req, &Method::POST)?;
            control(state, |reply| ControlRequest::Gc { reply }).await
        }
        "/pull" | "/push" => {
            expect_method(&req, &Method::POST)?;
            let push = rest == "/push";
            let req: TransferRequest = read_json(req).await?;
            if req.names.is_empty() {
                return Err(Failure(
                    StatusCode::BAD_REQUEST,
                    "the request names nothing: send {\"names\": [\"org/image\"]}".into(),
                ));
            }
            if push {
                control(state, |reply| ControlRequest::Push { req, reply }).await
            } else {
                control(state, |reply| ControlRequest::Pull { req, reply }).await
            }
        }
        _ => {
            // /builds/<id>/log: build ids contain no '/'.
            if let Some(id) = rest
                .strip_prefix("/builds/")
                .and_then(|r| r.strip_suffix("/log"))
                .filter(|id| !id.is_empty() && !id.contains('/'))
            {
                expect_method(&req, &Method::GET)?;
                let follow = query_flag(req.uri().query(), "follow");
                return log(state.bus(), &state.streams, &BuildId(id.to_owned()), follow);
            }
            Err(not_found(&path))
        }
    }
}

fn not_found(path: &str) -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        format!("no such API endpoint: {path} (this kilnd serves {API_PREFIX}/...)"),
    )
}

fn expect_method(req: &Request<Incoming>, method: &Method) -> Result<(), Failure> {
    if req.method() == method {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {} is not supported: use {method}",
                req.method(),
                req.uri().path()
            ),
        ))
    }
}

fn check_version(req: &Request<Incoming>) -> Result<(), Failure> {
    let Some(value) = req.headers().get(PROTOCOL_HEADER) else {
        // Plain HTTP clients (curl) may omit it; kiln always sends it.
        return Ok(());
    };
    let theirs = value.to_str().unwrap_or("?");
    if theirs.trim() == PROTOCOL_VERSION.to_string() {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::BAD_REQUEST,
            format!(
                "kiln protocol mismatch: the client speaks version {theirs}, this kilnd speaks version {PROTOCOL_VERSION}: use kiln and kilnd from the same release"
            ),
        ))
    }
}

pub(super) fn query_flag(query: Option<&str>, name: &str) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "1"));
            (k == name).then_some(v)
        })
        .any(|v| matches!(v, "1" | "true" | "yes" | ""))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(b) => (status, b),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"cannot encode the response: {e}\"}}").into_bytes(),
        ),
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Failure> {
    let bytes = Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            Failure(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body (at most {MAX_REQUEST_BYTES} bytes): {e}"),
            )
        })?
        .to_bytes();
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid: {e}"),
        )
    })
}

async fn control<T: Serialize>(
    state: &State,
    make: impl FnOnce(Reply<T>) -> ControlRequest,
) -> Answer {
    let (tx, rx) = oneshot::channel();
    state.control().send(make(tx)).await.map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "kilnd is shutting down and takes no more requests".into(),
        )
    })?;
    let answer = rx.await.map_err(|_| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "kilnd dropped the request without answering it: see kilnd's log".into(),
        )
    })??;
    Ok(json(StatusCode::OK, &answer))
}

fn ndjson_line<T: Serialize>(value: &T) -> Option<Bytes> {
    match serde_json::to_vec(value) {
        Ok(mut v) => {
            v.push(b'\n');
            Some(Bytes::from(v))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an event");
            None
        }
    }
}

fn events(bus: Bus, streams: &TaskTracker) -> Response<ResponseBody> {
    let (tx, body) = ChannelBody::channel(STREAM_CHUNKS);
    streams.spawn(async move {
        let mut sub = bus.subscribe();
        loop {
            let item = tokio::select! {
                () = tx.closed() => break,
                item = sub.next() => item,
            };
            let Some(item) = item else { break };
            let Some(line) = ndjson_line(&item) else {
                continue;
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn dropped_line(n: u64) -> String {
    format!("kiln: {n} earlier lines dropped (kilnd keeps the newest 1 MiB of a build's log)\n")
}

fn log(bus: &Bus, streams: &TaskTracker, id: &BuildId, follow: bool) -> Answer {
    let Some(mut reader) = bus.logs().reader(id) else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!(
                "no log for build {id}: kilnd keeps the logs of its most recent builds only; see `kiln status` for current builds"
            ),
        ));
    };
    let text = |chunk: LogChunk| {
        let mut s = String::new();
        if chunk.dropped > 0 {
            s.push_str(&dropped_line(chunk.dropped));
        }
        for l in chunk.lines {
            s.push_str(&l);
            s.push('\n');
        }
        Bytes::from(s)
    };
    let body = if follow {
        let (tx, body) = ChannelBody::channel(STREAM_CHUNKS);
        streams.spawn(async move {
            loop {
                let chunk = tokio::select! {
                    () = tx.closed() => break,
                    chunk = reader.next_chunk(LOG_LINES_PER_CHUNK) => chunk,
                };
                let Some(chunk) = chunk else { break };
                if tx.send(text(chunk)).await.is_err() {
                    break;
                }
            }
        });
        body
    } else {
        let (chunk, _) = reader.read_available(usize::MAX);
        full(text(chunk))
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(r)
}
