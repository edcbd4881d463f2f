//! The upstream leg for requests whose body is in hand (none, or buffered): a small
//! HTTP/1.1 client that writes the request with one `write` and reads the answer on the
//! request's own task, from a connection kept in this worker thread's pool.
//!
//! Why not hyper's client here: hyper drives each upstream connection in a task of its own
//! and hands it every request and answer over channels; on the proxy's hot path those
//! hand-offs, a second HTTP state machine and a second header map cost more user time than
//! relaying the bytes. Streamed request bodies still go through hyper (`worker::send`).
//!
//! What it reads (RFC 9112 §6.3): interim 1xx answers skipped; no body for `HEAD`, 204
//! and 304; `Transfer-Encoding: chunked` decoded (trailers are dropped); `Content-Length`;
//! otherwise the body runs to the connection's end. A connection goes back to the pool
//! only after an answer read to its end, on HTTP/1.1 without `Connection: close`.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::io::{self, Write as _};
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted in a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// A TCP connection to `authority` (`host:port`, or a host for port 80), without Nagle's
/// delay: requests and answers go out whole, in one write each.
pub(crate) async fn tcp_connect(authority: &str) -> io::Result<TcpStream> {
    let stream = if authority.contains(':') && !authority.ends_with(']') {
        TcpStream::connect(authority).await?
    } else {
        TcpStream::connect((authority.trim_matches(|c| c == '[' || c == ']'), 80)).await?
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A keep-alive connection to one instance with what was read past the last answer.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    /// Connects to `authority` (`host:port`, or a host for port 80).
    pub(crate) async fn connect(authority: &str) -> io::Result<RawConn> {
        Ok(RawConn {
            stream: tcp_connect(authority).await?,
            buf: BytesMut::new(),
        })
    }

    /// Whether nothing was read past the last answer (an instance that sent more than it
    /// announced is not trusted with another request).
    pub(crate) fn is_clean(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether an idle connection can still be used: open, and nothing unasked-for waiting.
    pub(crate) fn idle_ok(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Writing the request failed: the instance cannot have acted on it.
    #[error("request not sent: {0}")]
    NotSent(String),
    /// The connection ended before the first byte of an answer: the instance may or may
    /// not have seen the request.
    #[error("no answer: {0}")]
    NoAnswer(String),
    /// The answer was malformed or broke off.
    #[error("{0}")]
    Protocol(String),
}

/// The request line and headers, then the body, in one buffer. `target` is the origin
/// form (`/path?query`); `headers` are sent as they are, `Content-Length` set from `body`.
pub(crate) fn encode_request(
    method: &Method,
    target: &str,
    host: &str,
    headers: &HeaderMap,
    body: Option<&Bytes>,
) -> Result<Vec<u8>, Error> {
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(Error::Protocol(format!("not a request target: {target:?}")));
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Protocol(format!("not an authority: {host:?}")));
    }
    let mut size = method.as_str().len() + target.len() + host.len() + 64;
    for (k, v) in headers {
        size += k.as_str().len() + v.len() + 4;
    }
    let len = body.map_or(0, Bytes::len);
    let mut out = Vec::with_capacity(size + len);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in headers {
        if *k == http::header::HOST
            || *k == http::header::CONTENT_LENGTH
            || *k == http::header::EXPECT
        {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let length = match body {
        Some(_) => Some(len),
        // An empty body is said as such where the method usually has one (and where the
        // client said so), so that the instance does not wait for one.
        None if headers.contains_key(http::header::CONTENT_LENGTH)
            || !matches!(
                *method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
            ) =>
        {
            Some(0)
        }
        None => None,
    };
    if let Some(n) = length {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request after this answer.
    pub(crate) keep_alive: bool,
}

/// Parses a complete head out of `buf` (consuming it), `Ok(None)` when more bytes are
/// needed. Interim (1xx) answers are consumed and skipped.
pub(crate) fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Error> {
    loop {
        let len = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(Error::Protocol("response head too large".into()));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(Error::Protocol(format!("malformed response head: {e}"))),
            }
        };
        // Parsed again from the frozen bytes so that header values share them (no copy).
        let head = buf.split_to(len).freeze();
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        resp.parse(&head)
            .map_err(|e| Error::Protocol(format!("malformed response head: {e}")))?;
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| Error::Protocol(format!("bad status code {code}")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Protocol("upgrades are not proxied".into()));
            }
            continue;
        }
        let mut headers = HeaderMap::with_capacity(resp.headers.len());
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer = false;
        // HTTP/1.0 answers close unless told otherwise; keep-alive there is not worth it.
        let mut close = resp.version != Some(1);
        for h in resp.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Error::Protocol(format!("bad header name {:?}", h.name)))?;
            let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
                .map_err(|_| Error::Protocol(format!("bad value of header {}", h.name)))?;
            if name == http::header::CONTENT_LENGTH {
                let n = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| Error::Protocol("bad content-length".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Protocol("conflicting content-length".into()));
                }
                length = Some(n);
            } else if name == http::header::TRANSFER_ENCODING {
                transfer = true;
                chunked = value
                    .as_bytes()
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == http::header::CONNECTION {
                let v = value.as_bytes();
                if v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    close = true;
                }
            }
            headers.append(name, value);
        }
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else if transfer {
            // A length next to a transfer coding is ignored (and must not be relayed).
            headers.remove(http::header::CONTENT_LENGTH);
            if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        let keep_alive = !close && framing != Framing::Close;
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunks {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, expecting its CRLF.
    DataEnd,
    /// After the last (0) chunk: trailer lines until an empty one.
    Trailers,
    /// The body has ended.
    Done,
}

/// One step of decoding a chunked body from `buf`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Body bytes.
    Data(Bytes),
    /// `buf` holds too little to go on.
    More,
    /// The body has ended (the terminating chunk and trailers consumed).
    Done,
}

fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Error> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(Error::Protocol("chunk line too long".into())),
        None => Ok(None),
    }
}

impl Chunks {
    /// Decodes as much as `buf` allows: the next piece of data, `More`, or `Done`.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match *self {
                Chunks::Done => return Ok(Step::Done),
                Chunks::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    let digits = line[..].split(|b| *b == b';').next().unwrap_or_default();
                    let digits = digits.trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err(Error::Protocol("bad chunk size".into()));
                    }
                    let mut n: u64 = 0;
                    for d in digits {
                        let v = (*d as char)
                            .to_digit(16)
                            .ok_or_else(|| Error::Protocol("bad chunk size".into()))?;
                        n = n * 16 + u64::from(v);
                    }
                    *self = if n == 0 {
                        Chunks::Trailers
                    } else {
                        Chunks::Data(n)
                    };
                }
                Chunks::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    *self = if n == left {
                        Chunks::DataEnd
                    } else {
                        Chunks::Data(left - n)
                    };
                    return Ok(Step::Data(data));
                }
                Chunks::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if !line.is_empty() {
                        return Err(Error::Protocol("chunk not followed by CRLF".into()));
                    }
                    *self = Chunks::Size;
                }
                Chunks::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if line.is_empty() {
                        *self = Chunks::Done;
                    }
                }
            }
        }
    }
}

/// A body being read off a connection.
pub(crate) struct Reader {
    framing: Framing,
    chunks: Chunks,
    /// Bytes left of a `Length` body.
    left: u64,
    done: bool,
}

impl Reader {
    pub(crate) fn new(framing: Framing) -> Reader {
        Reader {
            framing,
            chunks: Chunks::Size,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            done: framing == Framing::Empty,
        }
    }

    /// Whether the body has been read to its end.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The exact length still to come, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.framing {
            Framing::Empty => Some(0),
            Framing::Length(_) => Some(self.left),
            _ => None,
        }
    }

    /// The next data from what is buffered: `Some(data)`, or `None` when the buffer holds
    /// nothing usable (then `is_done` tells whether the body has ended).
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::Empty => Ok(None),
            Framing::Length(_) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (buf.len() as u64).min(self.left);
                self.left -= n;
                self.done = self.left == 0;
                Ok(Some(buf.split_to(n as usize).freeze()))
            }
            Framing::Close => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Framing::Chunked => match self.chunks.step(buf)? {
                Step::Data(d) => Ok(Some(d)),
                Step::More => Ok(None),
                Step::Done => {
                    self.done = true;
                    Ok(None)
                }
            },
        }
    }

    /// The connection's end came: fine only for a body delimited by it.
    fn eof(&mut self) -> Result<(), Error> {
        if self.framing == Framing::Close {
            self.done = true;
            Ok(())
        } else {
            Err(Error::Protocol("the upstream closed mid-body".into()))
        }
    }

    /// The next piece of the body from `conn`, waiting for the socket as needed; `None` at
    /// the end.
    pub(crate) fn poll_next(
        &mut self,
        conn: &mut RawConn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            if let Some(d) = self.decode(&mut conn.buf)? {
                return Poll::Ready(Ok(Some(d)));
            }
            if self.done {
                return Poll::Ready(Ok(None));
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => self.eof()?,
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Error::Protocol(e.to_string()))),
            }
        }
    }

    /// [`Reader::poll_next`] as a future.
    pub(crate) async fn next(&mut self, conn: &mut RawConn) -> Result<Option<Bytes>, Error> {
        std::future::poll_fn(|cx| self.poll_next(conn, cx)).await
    }
}

/// Writes `request` and reads the answer's head.
pub(crate) async fn exchange(
    conn: &mut RawConn,
    request: &[u8],
    method: &Method,
) -> Result<Head, Error> {
    conn.stream
        .write_all(request)
        .await
        .map_err(|e| Error::NotSent(e.to_string()))?;
    let mut got_any = !conn.buf.is_empty();
    loop {
        if got_any && let Some(head) = parse_head(&mut conn.buf, method)? {
            return Ok(head);
        }
        match conn.fill().await {
            Ok(0) if !got_any => return Err(Error::NoAnswer("connection closed".into())),
            Ok(0) => return Err(Error::Protocol("the upstream closed mid-head".into())),
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Error::NoAnswer(e.to_string())),
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, method: &Method) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(raw), method)
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let get = Method::GET;
        let cases: [(&str, &Method, Framing, bool); 9] = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &get,
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                &get,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &Method::HEAD,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                &get,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                &get,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
                &get,
                Framing::Chunked,
                true,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", &get, Framing::Close, false),
            (
                "HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 1\r\n\r\n",
                &get,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                &get,
                Framing::Length(1),
                false,
            ),
        ];
        for (raw, method, framing, keep_alive) in cases {
            let h = head(raw, method)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("{raw}"));
            assert_eq!((h.framing, h.keep_alive), (framing, keep_alive), "{raw}");
        }
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            &get,
        )
        .ok()
        .flatten();
        assert!(h.is_some_and(|h| !h.headers.contains_key(http::header::CONTENT_LENGTH)));
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait_for_more() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        );
        let h = parse_head(&mut buf, &Method::POST).ok().flatten();
        assert_eq!(h.map(|h| h.status), Some(StatusCode::CREATED));
        assert_eq!(&buf[..], b"ok");
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\ncontent-le", &Method::GET),
            Ok(None)
        ));
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 999999 OK\r\n\r\n",
        ] {
            assert!(
                matches!(head(raw, &Method::GET), Err(Error::Protocol(_))),
                "{raw}"
            );
        }
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD + 1));
        assert!(matches!(head(&huge, &Method::GET), Err(Error::Protocol(_))));
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
        for split in 0..wire.len() {
            let mut c = Chunks::Size;
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            let mut fed_rest = false;
            loop {
                match c.step(&mut buf) {
                    Ok(Step::Data(d)) => out.extend_from_slice(&d),
                    Ok(Step::More) if !fed_rest => {
                        buf.extend_from_slice(&wire[split..]);
                        fed_rest = true;
                    }
                    Ok(Step::Done) => break,
                    other => panic!("split {split}: {other:?}"),
                }
            }
            assert_eq!(out, b"hello world", "split {split}");
        }
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        for wire in [
            "zz\r\n",
            "5\r\nhelloXX\r\n",
            "\r\n",
            "1234567890abcdef0\r\n",
        ] {
            let mut c = Chunks::Size;
            let mut buf = BytesMut::from(wire);
            let mut r = c.step(&mut buf);
            while let Ok(Step::Data(_)) = r {
                r = c.step(&mut buf);
            }
            assert!(matches!(r, Err(Error::Protocol(_))), "{wire:?}");
        }
        let mut buf = BytesMut::from(vec![b'1'; MAX_LINE + 1].as_slice());
        assert!(matches!(
            Chunks::Size.step(&mut buf),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn requests_are_written_in_one_buffer_with_the_length_of_their_body() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        h.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_static("999"),
        );
        h.insert(
            http::header::EXPECT,
            HeaderValue::from_static("100-continue"),
        );
        let body = Bytes::from_static(b"{}");
        let out = encode_request(&Method::POST, "/a?b=1", "10.0.0.1:80", &h, Some(&body));
        assert_eq!(
            out.ok().as_deref(),
            Some(&b"POST /a?b=1 HTTP/1.1\r\nhost: 10.0.0.1:80\r\nx-request-id: r1\r\ncontent-length: 2\r\n\r\n{}"[..])
        );
        let out = encode_request(&Method::GET, "/", "h", &HeaderMap::new(), None);
        assert_eq!(
            out.ok().as_deref(),
            Some(&b"GET / HTTP/1.1\r\nhost: h\r\n\r\n"[..])
        );
        let out = encode_request(&Method::POST, "/", "h", &HeaderMap::new(), None);
        assert_eq!(
            out.ok().as_deref(),
            Some(&b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"[..])
        );
        for bad in ["", "/a b", "/a\r\nx: y", "/a#frag"] {
            assert!(
                encode_request(&Method::GET, bad, "h", &HeaderMap::new(), None).is_err(),
                "{bad:?}"
            );
        }
        for bad in ["", "h\r\nx: y", "h h"] {
            assert!(
                encode_request(&Method::GET, "/", bad, &HeaderMap::new(), None).is_err(),
                "{bad:?}"
            );
        }
    }
}
