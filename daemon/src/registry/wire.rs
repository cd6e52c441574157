//! The socket under each registry connection, which gives the error responses that hyper
//! writes itself (a malformed request line or `Content-Length`, headers too large: the
//! request never reaches the service) the OCI error JSON every other error has. hyper
//! has no hook for those responses, so they are recognised on the way out: a response
//! head without the API-version header that [`super::service`] puts on every answer.
//! hyper closes the connection after such a response, so replacing it whole is safe.
//! (No crate does this; it is small and tested in `tests/it/registry/raw.rs`.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The header every response of the service carries.
const OURS: &[u8] = b"docker-distribution-api-version:";

/// A connection's socket; see the module documentation.
#[derive(Debug)]
pub struct Wire<T> {
    inner: T,
    /// A replacement response still to be written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> Wire<T> {
    pub fn new(inner: T) -> Self {
        Wire {
            inner,
            pending: None,
        }
    }
}

/// The OCI error response for a response head hyper wrote itself, or `None` if `bytes`
/// is not one (a response of the service, body bytes, an interim `100 Continue`).
fn replacement(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.starts_with(b"HTTP/1.") {
        return None;
    }
    // hyper's own error response is one write of a head with an empty body, after which
    // it closes; a write of one of the service's responses, or of body bytes that happen
    // to look like a head, differs in one of these.
    let head = bytes.strip_suffix(b"\r\n\r\n")?;
    let lines: Vec<&[u8]> = head
        .split(|&b| b == b'\n')
        .map(|l| l.trim_ascii())
        .collect();
    let has = |name: &[u8]| {
        lines
            .iter()
            .any(|l| l.len() >= name.len() && l[..name.len()].eq_ignore_ascii_case(name))
    };
    if head.windows(4).any(|w| w == b"\r\n\r\n")
        || has(OURS)
        || !lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case(b"content-length: 0"))
    {
        return None;
    }
    let status_line = std::str::from_utf8(lines.first()?).ok()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    if status < 400 {
        // `100 Continue` and the like: hyper's, and no error.
        return None;
    }
    let (code, what) = match status {
        413 | 431 => (
            "SIZE_INVALID",
            "the request's headers or body are larger than the registry reads",
        ),
        414 => (
            "SIZE_INVALID",
            "the request's URI is longer than the registry reads",
        ),
        _ => (
            "UNSUPPORTED",
            "the request is not valid HTTP/1.1 (its request line, a header or the body's \
             framing, such as Content-Length)",
        ),
    };
    let body = serde_json::json!({
        "errors": [{ "code": code, "message": format!("{status_line}: {what}"), "detail": {} }]
    })
    .to_string();
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\ndocker-distribution-api-version: registry/2.0\r\n\
         connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

impl<T: AsyncWrite + Unpin> Wire<T> {
    /// Writes what is left of a replacement; ready once all of it is written.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Wire<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Wire<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(out) = replacement(buf) {
            // What hyper wrote counts as written; the replacement goes out instead.
            self.pending = Some((out, 0));
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        // hyper puts a response head first, whole.
        if let Some(out) = bufs.first().and_then(|b| replacement(b)) {
            self.pending = Some((out, 0));
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_own_responses_are_replaced() {
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ndocker-distribution-api-version: registry/2.0\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(replacement(ours), None);
        assert_eq!(replacement(b"some body bytes"), None);
        assert_eq!(replacement(b"HTTP/1.1 100 Continue\r\n\r\n"), None);
        // Not a whole, empty-bodied head: body bytes, or a head with its body.
        assert_eq!(
            replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"),
            None
        );
        let theirs =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(replacement(theirs).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["code"], "SIZE_INVALID");
    }
}
