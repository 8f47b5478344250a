//! One HTTP/1 client connection as keygate sees it, below Pingora's parser.
//!
//! Pingora times each read on its own (and, once a connection was reused, not
//! at all), so a client that sends its request head a byte at a time keeps a
//! connection forever. [`GuardedStream`] wraps the client stream and holds two
//! deadlines Pingora does not: the whole request head must arrive within
//! `request_header_timeout` (for a connection's first request counted from the
//! accept, later from the request's first byte), and a keep-alive connection
//! may wait `idle_timeout` for its next request.
//!
//! Pingora also answers a few requests itself before any hook of keygate's runs
//! (a head it cannot parse, `CONNECT`), in plain text. Whatever it writes before
//! keygate has seen the request head is replaced here by the contract's JSON
//! error with a request id, so every error a client can see has one shape.

use std::fmt;
use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use prometheus::IntCounter;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::outcome::{error_json, new_request_id};

/// Where a connection is between requests, shared by the stream (which
/// enforces the deadlines), the service loop and the request hooks.
#[derive(Debug)]
pub struct ConnectionClock {
    /// A phase in the low two bits, a generation above them that changes with
    /// every transition, so the stream notices a phase entered again.
    state: AtomicU32,
}

const BUSY: u32 = 0;
const IDLE: u32 = 1;
const HEAD: u32 = 2;
const PHASE_MASK: u32 = 0b11;

fn phase(state: u32) -> u32 {
    state & PHASE_MASK
}

impl ConnectionClock {
    /// A new connection waits for its first request head.
    pub fn new() -> Self {
        ConnectionClock { state: AtomicU32::new(HEAD) }
    }

    /// The request head was read and accepted: no deadline of ours until the
    /// response is done (Pingora's own read timeout covers the body).
    pub fn head_received(&self) {
        self.enter(BUSY);
    }

    /// A response is complete; the connection waits for the next request.
    pub fn await_request(&self) {
        self.enter(IDLE);
    }

    fn enter(&self, next: u32) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
            Some((state & !PHASE_MASK).wrapping_add(PHASE_MASK + 1) | next)
        });
    }

    /// The first byte of a request arrived while idle.
    fn head_started(&self, idle_state: u32) -> u32 {
        let head = (idle_state & !PHASE_MASK).wrapping_add(PHASE_MASK + 1) | HEAD;
        match self.state.compare_exchange(idle_state, head, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => head,
            Err(current) => current,
        }
    }

    fn load(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }
}

impl Default for ConnectionClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The deadlines a connection meets, read from the config when it is accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub request_header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The client stream with keygate's deadlines and answers; see the module docs.
pub struct GuardedStream {
    inner: Stream,
    clock: Arc<ConnectionClock>,
    limits: ConnectionLimits,
    header_timeouts: IntCounter,
    /// When the connection was accepted: its first request head is due from then.
    accepted: Instant,
    /// The clock state `deadline` was set for.
    armed_for: Option<u32>,
    deadline: Option<Instant>,
    /// Set to `deadline` only when a read has to wait: most reads find their
    /// bytes there, and moving a timer earlier takes the runtime's timer lock.
    timer: Option<Pin<Box<Sleep>>>,
    /// A byte `try_peek` took from the client: the next read returns it first.
    peeked: Option<u8>,
    /// Bytes of the current request head have arrived.
    head_bytes: bool,
    /// After a deadline passed, every read ends the stream.
    expired: bool,
    /// Set once Pingora writes before keygate saw a request: its answer is
    /// swallowed and this one goes out instead.
    replacement: Option<Replacement>,
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream").field("inner", &self.inner).field("clock", &self.clock).finish_non_exhaustive()
    }
}

impl GuardedStream {
    pub fn new(
        inner: Stream,
        clock: Arc<ConnectionClock>,
        limits: ConnectionLimits,
        header_timeouts: IntCounter,
        accepted: Instant,
    ) -> Self {
        GuardedStream {
            inner,
            clock,
            limits,
            header_timeouts,
            accepted,
            armed_for: None,
            deadline: None,
            timer: None,
            peeked: None,
            head_bytes: false,
            expired: false,
            replacement: None,
        }
    }

    pub fn clock(&self) -> &ConnectionClock {
        &self.clock
    }

    /// Sets the deadline for the clock's current state, once per state.
    fn arm(&mut self, state: u32) {
        if self.armed_for == Some(state) {
            return;
        }
        self.armed_for = Some(state);
        self.head_bytes = false;
        let limit = match phase(state) {
            IDLE => self.limits.idle_timeout,
            HEAD => self.limits.request_header_timeout,
            _ => {
                self.deadline = None;
                return;
            }
        };
        // The clock's very first state is the first request's head, due since the accept.
        let from = if state == HEAD { self.accepted } else { Instant::now() };
        // A deadline beyond what `Instant` holds is no deadline at all.
        self.deadline = from.checked_add(limit);
    }

    /// Whether the deadline has passed while a read waits; sets the timer to wake this task at it.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline else { return false };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline.into() {
                    timer.as_mut().reset(deadline.into());
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(deadline.into()))),
        };
        timer.as_mut().poll(cx).is_ready()
    }

    /// The deadline of `state` has passed: an idle connection just ends; a
    /// request head cut short gets `408` (if any of it arrived) and is counted.
    fn expire(&mut self, state: u32) -> Poll<io::Result<()>> {
        self.expired = true;
        if phase(state) != HEAD {
            return Poll::Ready(Ok(()));
        }
        self.header_timeouts.inc();
        if !self.head_bytes {
            return Poll::Ready(Ok(()));
        }
        self.replacement = Some(Replacement::answer(408));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time")))
    }

    /// Writes out a pending replacement answer, if any.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(replacement) = &mut self.replacement else {
            return Poll::Ready(Ok(()));
        };
        let answer = replacement.answer.get_or_insert_with(|| answer_bytes(status_of(&replacement.seen)));
        while replacement.written < answer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[replacement.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            replacement.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl GuardedStream {
    /// A read from the client under the connection's deadlines.
    fn poll_guarded_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.expired {
            return Poll::Ready(Ok(()));
        }
        let state = self.clock.load();
        if phase(state) == BUSY {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        self.arm(state);
        if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return self.expire(state);
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if phase(state) == IDLE {
                        let head = self.clock.head_started(state);
                        self.arm(head);
                    }
                    self.head_bytes = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.deadline_passed(cx) => self.expire(state),
            other => other,
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(byte) = this.peeked.take() else {
            return this.poll_guarded_read(cx, buf);
        };
        // The peeked byte and whatever else has arrived, in one read: Pingora then
        // parses a request head that came in one piece once, not twice.
        buf.put_slice(&[byte]);
        if buf.remaining() > 0 {
            // Nothing more yet is no reason to wait, and an error comes again on the next read.
            let _ = this.poll_guarded_read(cx, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none() && phase(this.clock.load()) == BUSY {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let replacement = this.replacement.get_or_insert_with(Replacement::default);
        let wanted = STATUS_LINE_PREFIX.saturating_sub(replacement.seen.len()).min(buf.len());
        replacement.seen.extend_from_slice(&buf[..wanted]);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `HTTP/1.1 400`: enough of Pingora's answer to know its status.
const STATUS_LINE_PREFIX: usize = 12;

#[derive(Default)]
struct Replacement {
    seen: Vec<u8>,
    answer: Option<Vec<u8>>,
    written: usize,
}

impl Replacement {
    fn answer(status: u16) -> Self {
        Replacement { seen: Vec::new(), answer: Some(answer_bytes(status)), written: 0 }
    }
}

/// The status of an HTTP/1 status line; 400 when it cannot be read.
fn status_of(status_line: &[u8]) -> u16 {
    status_line
        .get(9..12)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse().ok())
        .filter(|status| (400..600).contains(status))
        .unwrap_or(400)
}

/// A complete JSON error response that closes the connection.
fn answer_bytes(status: u16) -> Vec<u8> {
    let (status, reason, code, message) = match status {
        405 => (405, "Method Not Allowed", "method_not_allowed", "this method is not accepted"),
        408 => (408, "Request Timeout", "request_timeout", "the request head did not arrive in time"),
        _ => (400, "Bad Request", "bad_request", "the request is malformed"),
    };
    let request_id = new_request_id();
    let body = error_json(code, message, request_id.to_str().unwrap_or(""));
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Request-Id: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        request_id.to_str().unwrap_or(""),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        if poll_fn(|cx| self.poll_replacement(cx)).await.is_ok() {
            let _ = poll_fn(|cx| Pin::new(&mut self.inner).poll_flush(cx)).await;
        }
        self.inner.shutdown().await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

/// Waits, under the connection's deadlines, for the client's next byte; the next
/// read returns it. A closed connection or a passed deadline is an error.
#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let Some((first, rest)) = buf.split_first_mut() else { return Ok(true) };
        let byte = match self.peeked {
            Some(byte) => byte,
            None => {
                let mut byte = [0u8; 1];
                let read = poll_fn(|cx| {
                    let mut read = ReadBuf::new(&mut byte);
                    ready!(self.poll_guarded_read(cx, &mut read))?;
                    Poll::Ready(Ok::<_, io::Error>(read.filled().len()))
                })
                .await?;
                if read == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.peeked = Some(byte[0]);
                byte[0]
            }
        };
        *first = byte;
        // The bytes after the peeked one are still the client stream's.
        if rest.is_empty() {
            Ok(true)
        } else {
            self.inner.try_peek(rest).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_statuses_are_read_and_anything_else_is_a_bad_request() {
        assert_eq!(status_of(b"HTTP/1.1 405 Method Not Allowed\r\n"), 405);
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request"), 400);
        assert_eq!(status_of(b"HTTP/1.1 200 OK"), 400);
        assert_eq!(status_of(b"HTTP/1.1"), 400);
        assert_eq!(status_of(b"\xff\xfe garbage here"), 400);
    }

    #[test]
    fn replacement_answers_are_the_contract_json() {
        for (status, code) in [(400, "bad_request"), (405, "method_not_allowed"), (408, "request_timeout")] {
            let answer = answer_bytes(status);
            let text = String::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(head.contains("\r\nContent-Type: application/json\r\n"));
            assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
            assert!(head.contains("\r\nConnection: close"));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["request_id"].as_str().map(str::len), Some(32));
        }
    }

    #[test]
    fn every_transition_is_a_new_state_even_into_the_same_phase() {
        let clock = ConnectionClock::new();
        let first = clock.load();
        assert_eq!(phase(first), HEAD);
        clock.head_received();
        assert_eq!(phase(clock.load()), BUSY);
        clock.await_request();
        let idle = clock.load();
        assert_eq!(phase(idle), IDLE);
        let head = clock.head_started(idle);
        assert_eq!(phase(head), HEAD);
        assert_ne!(head, first);
        // A stale idle state does not move the clock.
        assert_eq!(clock.head_started(idle), head);
    }

    /// A guarded stream over a real TCP connection, and the client's end of it.
    async fn connected(header_deadline: Duration) -> (GuardedStream, tokio::net::TcpStream, IntCounter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let address = listener.local_addr().expect("a bound address");
        let client = tokio::net::TcpStream::connect(address).await.expect("connects");
        let (server, _) = listener.accept().await.expect("accepts");
        let inner: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let limits = ConnectionLimits { request_header_timeout: header_deadline, idle_timeout: header_deadline };
        let timeouts = IntCounter::new("header_timeouts", "header timeouts").expect("a valid counter");
        let clock = Arc::new(ConnectionClock::new());
        (GuardedStream::new(inner, clock, limits, timeouts.clone(), Instant::now()), client, timeouts)
    }

    const REQUEST_HEAD: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";

    /// A guarded stream whose client sent `REQUEST_HEAD`, its first byte peeked.
    async fn peeked_head() -> (GuardedStream, tokio::net::TcpStream) {
        use tokio::io::AsyncWriteExt;
        let (mut guarded, mut client, _) = connected(Duration::from_secs(10)).await;
        client.write_all(REQUEST_HEAD).await.expect("writes");
        let mut first = [0u8; 1];
        assert!(guarded.try_peek(&mut first).await.expect("a byte"));
        assert_eq!(&first, b"G");
        (guarded, client)
    }

    #[tokio::test]
    async fn a_peeked_byte_is_read_first_together_with_what_followed_it() {
        use tokio::io::AsyncReadExt;
        let (mut guarded, _client) = peeked_head().await;
        // Peeking again, and further, reads nothing away.
        let mut more = [0u8; 4];
        assert!(guarded.try_peek(&mut more).await.expect("four bytes"));
        assert_eq!(&more, b"GET ");
        let mut read = Vec::new();
        let mut buf = [0u8; 64];
        while read.len() < REQUEST_HEAD.len() {
            let n = guarded.read(&mut buf).await.expect("reads");
            assert!(n > 0, "ended after {read:?}");
            read.extend_from_slice(&buf[..n]);
        }
        assert_eq!(read, REQUEST_HEAD);
    }

    #[tokio::test]
    async fn one_read_after_a_peek_returns_the_whole_head_that_has_arrived() {
        use tokio::io::AsyncReadExt;
        let (mut guarded, _client) = peeked_head().await;
        let mut buf = [0u8; 64];
        let n = guarded.read(&mut buf).await.expect("reads");
        assert_eq!(&buf[..n], REQUEST_HEAD);
    }

    #[tokio::test]
    async fn a_peek_ends_at_the_header_deadline_and_counts_it() {
        let (mut guarded, _client, timeouts) = connected(Duration::from_millis(50)).await;
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(Duration::from_secs(10), guarded.try_peek(&mut first)).await;
        assert!(matches!(peeked, Ok(Err(_))), "{peeked:?}");
        assert_eq!(timeouts.get(), 1);
    }

    #[tokio::test]
    async fn a_peek_on_a_closed_connection_fails() {
        let (mut guarded, client, timeouts) = connected(Duration::from_secs(10)).await;
        drop(client);
        let mut first = [0u8; 1];
        assert!(guarded.try_peek(&mut first).await.is_err());
        assert_eq!(timeouts.get(), 0);
    }
}
