//! The response body of every registry answer: nothing, a buffer shared with the
//! in-memory manifest view (a reference count, never a copy), or a blob streamed from
//! its file in large chunks by a reader thread that stays a few chunks ahead of the
//! socket, so a 256 MiB blob costs a few MiB of memory however slow the client is.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// How much of a blob one read takes.
const CHUNK: usize = 1 << 20;
/// How many chunks the reader may have ready ahead of the socket.
const AHEAD: usize = 2;

/// A registry response body.
#[derive(Debug)]
pub struct RegBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    File {
        rx: mpsc::Receiver<io::Result<Bytes>>,
        remaining: u64,
    },
}

impl RegBody {
    pub fn empty() -> Self {
        RegBody {
            kind: Kind::Full(None),
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        RegBody {
            kind: Kind::Full(if bytes.is_empty() { None } else { Some(bytes) }),
        }
    }

    /// Streams `len` bytes of `file` from `offset`. The file is already open, so a
    /// rename or removal after this call does not change what the client gets.
    pub fn file(file: File, offset: u64, len: u64) -> Self {
        let (tx, rx) = mpsc::channel(AHEAD);
        if len > 0 {
            tokio::task::spawn_blocking(move || read_chunks(&file, offset, len, &tx));
        }
        RegBody {
            kind: Kind::File { rx, remaining: len },
        }
    }
}

fn read_chunks(file: &File, mut offset: u64, len: u64, tx: &mpsc::Sender<io::Result<Bytes>>) {
    let end = offset + len;
    while offset < end {
        // `end - offset` fits in usize whenever it is below CHUNK.
        let n = usize::try_from(end - offset).map_or(CHUNK, |left| left.min(CHUNK));
        let mut buf = BytesMut::zeroed(n);
        let mut filled = 0;
        while filled < n {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than its recorded size: run `kiln cache fsck`",
                    )));
                    return;
                }
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        offset += n as u64;
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            // The client went away.
            return;
        }
    }
}

impl Body for RegBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::File { rx, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(b))) => {
                        *remaining = remaining.saturating_sub(b.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob reader stopped early",
                    )))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    #[tokio::test]
    async fn streams_a_file_range() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let body = RegBody::file(f.try_clone().unwrap(), 5, (2 * CHUNK + 3) as u64);
        assert_eq!(body.size_hint().exact(), Some((2 * CHUNK + 3) as u64));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &data[5..5 + 2 * CHUNK + 3]);
    }

    #[tokio::test]
    async fn short_file_is_an_error_not_a_truncated_success() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abc").unwrap();
        let body = RegBody::file(f, 0, 10);
        assert!(body.collect().await.is_err());
    }
}
