//! BuildKit's progress, as the engine reports it during `POST /build?version=2`: JSON
//! lines whose `aux` (with `"id":"moby.buildkit.trace"`) is a base64 protobuf
//! `moby.buildkit.v1.StatusResponse` (vertexes = build steps with cached/started/completed
//! /error, and their log output). This module decodes those messages (`base64`, and
//! `prost` with the fields kiln uses declared in [`wire`]) and folds them into steps and
//! log lines.

use std::collections::HashMap;

use base64::Engine;

/// One build step (a BuildKit vertex), as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vertex {
    pub digest: String,
    pub name: String,
    pub cached: bool,
    pub started: bool,
    pub completed: bool,
    pub error: Option<String>,
}

/// Output of a step (`stream` 1 = stdout, 2 = stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VertexLog {
    pub vertex: String,
    pub stream: i64,
    pub msg: Vec<u8>,
}

/// The fields of a `StatusResponse` kiln uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub vertexes: Vec<Vertex>,
    pub logs: Vec<VertexLog>,
}

/// A malformed trace message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed BuildKit progress message: not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("malformed BuildKit progress message: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// BuildKit's messages (`api/services/control/control.proto`, `moby.buildkit.v1`), with
/// the fields kiln reads; prost skips the others (statuses, warnings, inputs, progress
/// groups). Strings that BuildKit does not promise to be UTF-8 (step names and errors
/// echo the Dockerfile and the program's output) are read as bytes and decoded lossily,
/// so one odd byte does not lose the whole message.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, repeated, tag = "1")]
        pub vertexes: Vec<Vertex>,
        #[prost(message, repeated, tag = "3")]
        pub logs: Vec<VertexLog>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Vertex {
        #[prost(bytes = "vec", tag = "1")]
        pub digest: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub name: Vec<u8>,
        #[prost(bool, tag = "4")]
        pub cached: bool,
        #[prost(message, optional, tag = "5")]
        pub started: Option<Timestamp>,
        #[prost(message, optional, tag = "6")]
        pub completed: Option<Timestamp>,
        #[prost(bytes = "vec", tag = "7")]
        pub error: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VertexLog {
        #[prost(bytes = "vec", tag = "1")]
        pub vertex: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub stream: i64,
        #[prost(bytes = "vec", tag = "4")]
        pub msg: Vec<u8>,
    }

    /// `google.protobuf.Timestamp`: only its presence matters to kiln.
    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// Base64 as Go's `encoding/json` writes `[]byte` (standard alphabet, padded); padding
/// is not required.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decodes a trace message: the base64 text of a protobuf `StatusResponse`.
pub fn decode_trace(b64: &str) -> Result<Status, DecodeError> {
    decode_status(&BASE64.decode(b64)?)
}

/// Decodes a protobuf `StatusResponse`.
pub fn decode_status(buf: &[u8]) -> Result<Status, DecodeError> {
    let msg = <wire::StatusResponse as prost::Message>::decode(buf)?;
    Ok(Status {
        vertexes: msg
            .vertexes
            .into_iter()
            .map(|v| Vertex {
                digest: string(&v.digest),
                name: string(&v.name),
                cached: v.cached,
                started: v.started.is_some(),
                completed: v.completed.is_some(),
                error: (!v.error.is_empty()).then(|| string(&v.error)),
            })
            .collect(),
        logs: msg
            .logs
            .into_iter()
            .map(|l| VertexLog {
                vertex: string(&l.vertex),
                stream: l.stream,
                msg: l.msg,
            })
            .collect(),
    })
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// A step started, finished, was cached or failed (a line kiln writes).
    Step,
    /// A step's standard output.
    Stdout,
    /// A step's standard error.
    Stderr,
    /// kiln's own messages (context upload, push, clean-up).
    Kiln,
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Milliseconds since the build started.
    pub at_ms: u64,
    pub source: LogSource,
    /// The step's name (`[2/3] RUN make`), when the line belongs to one.
    pub step: Option<String>,
    pub text: String,
}

/// The state of one build's steps, folded from the trace messages.
#[derive(Debug, Default)]
pub struct Steps {
    by_digest: HashMap<String, Vertex>,
    order: Vec<String>,
    /// Partial output lines per (vertex, stream), until their newline arrives.
    partial: HashMap<(String, i64), Vec<u8>>,
    /// The last lines of output per vertex (for error messages).
    tails: HashMap<String, Vec<String>>,
}

/// How many output lines per step are kept for an error message.
const TAIL_LINES: usize = 20;

impl Steps {
    /// Applies one status message; returns the log lines it produced (without `at_ms`,
    /// which the caller fills in).
    pub fn apply(&mut self, status: Status) -> Vec<(LogSource, Option<String>, String)> {
        // Order within one message: steps that start, then output, then steps that end.
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for v in status.vertexes {
            let old = self.by_digest.get(&v.digest).cloned();
            if old.is_none() {
                self.order.push(v.digest.clone());
            }
            let old = old.unwrap_or_default();
            let name = Some(v.name.clone());
            if v.cached && !old.cached {
                out.push((LogSource::Step, name.clone(), format!("CACHED {}", v.name)));
            } else if v.started && !old.started && !v.completed {
                out.push((LogSource::Step, name.clone(), v.name.clone()));
            }
            if let Some(e) = &v.error {
                if old.error.as_ref() != Some(e) {
                    ends.push((
                        LogSource::Step,
                        name.clone(),
                        format!("ERROR {}: {e}", v.name),
                    ));
                }
            } else if v.completed && !old.completed && !v.cached {
                ends.push((LogSource::Step, name.clone(), format!("DONE {}", v.name)));
            }
            let merged = Vertex {
                cached: v.cached || old.cached,
                started: v.started || old.started,
                completed: v.completed || old.completed,
                error: v.error.or(old.error),
                ..v
            };
            self.by_digest.insert(merged.digest.clone(), merged);
        }
        for log in status.logs {
            let step = self.by_digest.get(&log.vertex).map(|v| v.name.clone());
            let source = if log.stream == 2 {
                LogSource::Stderr
            } else {
                LogSource::Stdout
            };
            let key = (log.vertex.clone(), log.stream);
            let buf = self.partial.entry(key).or_default();
            buf.extend_from_slice(&log.msg);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1])
                    .trim_end_matches('\r')
                    .to_owned();
                let tail = self.tails.entry(log.vertex.clone()).or_default();
                tail.push(text.clone());
                if tail.len() > TAIL_LINES {
                    tail.remove(0);
                }
                out.push((source, step.clone(), text));
            }
        }
        out.extend(ends);
        out
    }

    /// Steps in the order they first appeared.
    pub fn vertexes(&self) -> impl Iterator<Item = &Vertex> {
        self.order.iter().filter_map(|d| self.by_digest.get(d))
    }

    /// How many steps were answered from BuildKit's cache.
    pub fn cache_hits(&self) -> usize {
        self.vertexes().filter(|v| v.cached).count()
    }

    /// How many steps ran (completed without being cached).
    pub fn executed(&self) -> usize {
        self.vertexes().filter(|v| v.completed && !v.cached).count()
    }

    /// The first step that failed, with its last output lines (partial line included).
    pub fn failed_step(&self) -> Option<(String, String, Vec<String>)> {
        let v = self.vertexes().find(|v| v.error.is_some())?;
        let mut tail = self.tails.get(&v.digest).cloned().unwrap_or_default();
        for stream in [1, 2] {
            if let Some(p) = self.partial.get(&(v.digest.clone(), stream)) {
                if !p.is_empty() {
                    tail.push(String::from_utf8_lossy(p).into_owned());
                }
            }
        }
        Some((v.name.clone(), v.error.clone().unwrap_or_default(), tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace message captured from Docker 20.10 (`COPY a.txt /a.txt`, completed).
    const CAPTURED: &str = "CrABCkdzaGEyNTY6MDY5YzlhYTE1NWE1YjJmNTdkOGMxNTM5MzdjNDhjZjExODQ2ZTA5ZjQ3YTk5NmZlYjU4OTk5ZDFlNmY3MGM2ZBJHc2hhMjU2Ojk2ZjA1OGJmNzFmOTk1MThiODY3OWE4NDgzNDJlMzhiMzUxZmM4NzJjYzg2Mzc1MzU4MTk3MTRlYmYzNDIyOWUaD2NvcHkgL2NvbnRleHQgLyoLCJf/itgGEPGzhVk=";

    fn enc_varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn field_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        enc_varint(field << 3 | 2, out);
        enc_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        enc_varint(field << 3, out);
        enc_varint(v, out);
    }

    #[test]
    fn base64_is_standard_with_or_without_padding() {
        assert_eq!(BASE64.decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(BASE64.decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(BASE64.decode("").unwrap(), b"");
        assert_eq!(BASE64.decode("/+8=").unwrap(), [0xff, 0xef]);
        assert!(matches!(decode_trace("a$b"), Err(DecodeError::Base64(_))));
    }

    #[test]
    fn decodes_a_captured_engine_message() {
        let status = decode_trace(CAPTURED).unwrap();
        assert_eq!(status.vertexes.len(), 1);
        let v = &status.vertexes[0];
        assert_eq!(v.name, "copy /context /");
        assert!(v.digest.starts_with("sha256:069c9aa1"));
        assert!(v.started && !v.completed && !v.cached && v.error.is_none());
    }

    #[test]
    fn folds_steps_logs_cache_hits_and_errors() {
        let mut steps = Steps::default();
        let vertex =
            |digest: &str, name: &str, cached: bool, started: bool, done: bool, err: &str| {
                let mut v = Vec::new();
                field_bytes(1, digest.as_bytes(), &mut v);
                field_bytes(3, name.as_bytes(), &mut v);
                if cached {
                    field_varint(4, 1, &mut v);
                }
                if started {
                    field_bytes(5, &[8, 1], &mut v);
                }
                if done {
                    field_bytes(6, &[8, 2], &mut v);
                }
                if !err.is_empty() {
                    field_bytes(7, err.as_bytes(), &mut v);
                }
                v
            };
        let log = |digest: &str, stream: u64, msg: &str| {
            let mut l = Vec::new();
            field_bytes(1, digest.as_bytes(), &mut l);
            field_varint(3, stream, &mut l);
            field_bytes(4, msg.as_bytes(), &mut l);
            l
        };
        let mut msg = Vec::new();
        field_bytes(
            1,
            &vertex("a", "[1/2] FROM base", true, true, true, ""),
            &mut msg,
        );
        field_bytes(
            1,
            &vertex("b", "[2/2] RUN make", false, true, false, ""),
            &mut msg,
        );
        field_bytes(3, &log("b", 1, "line one\nline t"), &mut msg);
        // An unknown field (statuses = 2) is skipped.
        field_bytes(2, b"\x0a\x01x", &mut msg);
        let lines = steps.apply(decode_status(&msg).unwrap());
        let texts: Vec<_> = lines.iter().map(|l| l.2.as_str()).collect();
        assert_eq!(
            texts,
            ["CACHED [1/2] FROM base", "[2/2] RUN make", "line one"]
        );
        assert_eq!(lines[2].1.as_deref(), Some("[2/2] RUN make"));

        let mut msg = Vec::new();
        field_bytes(3, &log("b", 2, "wo\n"), &mut msg);
        field_bytes(
            1,
            &vertex("b", "[2/2] RUN make", false, true, true, "exit code: 2"),
            &mut msg,
        );
        let lines = steps.apply(decode_status(&msg).unwrap());
        assert_eq!(
            lines[0],
            (
                LogSource::Stderr,
                Some("[2/2] RUN make".into()),
                "wo".into()
            )
        );
        assert_eq!(lines[1].2, "ERROR [2/2] RUN make: exit code: 2");
        assert_eq!(steps.cache_hits(), 1);
        let (name, err, tail) = steps.failed_step().unwrap();
        assert_eq!(name, "[2/2] RUN make");
        assert_eq!(err, "exit code: 2");
        assert_eq!(tail, ["line one", "wo", "line t"]);
    }

    #[test]
    fn truncated_messages_are_errors() {
        let mut msg = Vec::new();
        field_bytes(1, b"abcdef", &mut msg);
        msg.truncate(msg.len() - 2);
        assert!(decode_status(&msg).is_err());
    }
}
