//! Transport layer: framed reads and writes on one tunnel stream (QUIC or HTTP/2, see
//! [`crate::transport`]).
//!
//! A gateway-opened stream carries a `StreamHeader`, then `Data` frames (raw body bytes, at most
//! [`MAX_DATA_FRAME`] each) and, for RPCs, a `ResponseHead` and `Trailers` from the agent. The
//! transport's per-stream flow control is the end-to-end backpressure: nobody reads faster than
//! its consumer.

use std::collections::VecDeque;
use std::future::Future;

use crate::transport::{RecvStream, SendStream};
use bytes::{Buf, Bytes};
use tunnel_proto::frame::{FrameDecoder, MAX_DATA_FRAME};
use tunnel_proto::stream::{RecvHalf, SendHalf, Transmit};
use tunnel_proto::{ErrorCode, Message, ProtoError};

/// Why a stream operation failed. [`StreamError::close_code`] and [`StreamError::tls_alert`]
/// give what a caller decides on (how the peer closed, a refused certificate), never the text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer reset the stream (it cancelled).
    #[error("peer reset the stream: {0}")]
    Reset(ErrorCode),
    /// The peer closed the connection under the stream, saying why.
    #[error("closed by the peer: {code} {reason}")]
    Closed {
        /// Its close code.
        code: ErrorCode,
        /// Its reason.
        reason: String,
    },
    /// The connection under the stream is gone (timed out, reset, refused by TLS, or closed on
    /// this side).
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] LinkError),
    /// The peer sent something that is not a valid frame.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// The stream ended with an HTTP/2 error code of HTTP/2's own rather than one of Tether's
    /// (the peer's HTTP/2 stack refused or reset it).
    #[error("stream failed: HTTP/2 stream error: {0}")]
    Http2(#[source] h2::Error),
    /// This side cannot use the stream (`what` says why): it finished, reset or stopped it
    /// already, or asked for something its transport does not do. Never the peer's doing.
    #[error("stream failed: {what}")]
    Unusable {
        /// What the transport refused.
        what: &'static str,
    },
}

impl StreamError {
    /// The application close code the peer closed the connection with, if it did.
    pub fn close_code(&self) -> Option<ErrorCode> {
        match self {
            StreamError::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The TLS alert the peer ended the connection with, if it did (a refused certificate
    /// shows here, at the first stream operation after the handshake).
    pub fn tls_alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            StreamError::ConnectionLost(l) => l.tls_alert(),
            _ => None,
        }
    }
}

/// Why a tunnel connection is gone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// QUIC: timed out, reset, ended by a transport or TLS error, or closed on this side.
    #[error("{0}")]
    Quic(#[source] quinn::ConnectionError),
    /// TCP fallback: the socket, or TLS on it, failed under HTTP/2.
    #[error("TCP: {0}")]
    Tcp(#[source] h2::Error),
    /// TCP fallback: HTTP/2 ended the connection (`GOAWAY`, a protocol error).
    #[error("HTTP/2: {0}")]
    Http2(#[source] h2::Error),
}

impl LinkError {
    /// The TLS alert the peer ended the connection with, if it did: QUIC carries it as a
    /// `CRYPTO_ERROR` code, TLS on TCP as rustls's typed error inside the socket's.
    pub fn tls_alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            LinkError::Quic(e) => crate::tls::quic_alert(e),
            LinkError::Tcp(e) | LinkError::Http2(e) => {
                e.get_io().and_then(crate::tls::received_alert)
            }
        }
    }
}

/// A QUIC connection error as a stream error: the peer's application close keeps its code.
pub(crate) fn quinn_connection_err(e: quinn::ConnectionError) -> StreamError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => StreamError::Closed {
            code: ErrorCode::from(u64::from(c.error_code)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        other => StreamError::ConnectionLost(LinkError::Quic(other)),
    }
}

impl From<quinn::ReadError> for StreamError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => StreamError::Reset(ErrorCode::from(u64::from(code))),
            quinn::ReadError::ConnectionLost(c) => quinn_connection_err(c),
            quinn::ReadError::ClosedStream => StreamError::Unusable {
                what: "closed stream",
            },
            quinn::ReadError::IllegalOrderedRead => StreamError::Unusable {
                what: "ordered read after unordered read",
            },
            quinn::ReadError::ZeroRttRejected => StreamError::Unusable {
                what: "0-RTT rejected",
            },
        }
    }
}

impl From<quinn::WriteError> for StreamError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => {
                StreamError::Reset(ErrorCode::from(code.into_inner()))
            }
            quinn::WriteError::ConnectionLost(c) => quinn_connection_err(c),
            quinn::WriteError::ClosedStream => StreamError::Unusable {
                what: "closed stream",
            },
            quinn::WriteError::ZeroRttRejected => StreamError::Unusable {
                what: "0-RTT rejected",
            },
        }
    }
}

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FramedRecv {
    recv: RecvStream,
    dec: FrameDecoder,
}

impl FramedRecv {
    /// Frames of at most `max_frame` payload bytes are accepted.
    pub fn new(recv: RecvStream, max_frame: usize) -> Self {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(max_frame),
        }
    }

    /// A reader for relay streams: data frames plus room for heads and trailers.
    pub fn relay(recv: RecvStream) -> Self {
        Self::new(recv, MAX_DATA_FRAME + 64 * 1024)
    }

    /// The next message; `None` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, StreamError> {
        loop {
            if let Some(m) = self.dec.next_message()? {
                return Ok(Some(m));
            }
            match self.recv.read_chunk(MAX_DATA_FRAME).await? {
                Some(chunk) => self.dec.push(&chunk),
                None => {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Tells the peer to stop sending (we are not going to read any more).
    pub fn stop(&mut self, code: ErrorCode) {
        self.recv.stop(code);
    }

    /// The raw stream and any bytes already buffered past the last frame, for streams that
    /// switch to raw bytes after their header (TCP).
    pub fn into_parts(self) -> (RecvStream, Bytes) {
        let mut dec = self.dec;
        let left = dec.take_buffered();
        (self.recv, left)
    }
}

/// Writes one message as a frame.
pub async fn send_msg(send: &mut SendStream, msg: &Message) -> Result<(), StreamError> {
    send.write_all(&msg.to_bytes()).await
}

// === Driving the stream machines (`tunnel_proto::stream`) ===

/// Writes everything a machine's send half has queued, in order: consecutive bytes in one
/// gathered write, then its FIN or reset. `Err` when the stream could not take the bytes (the
/// peer stopped it, the connection is gone).
pub async fn flush<S: SendHalf + ?Sized>(
    send: &mut SendStream,
    half: &mut S,
) -> Result<(), StreamError> {
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(t) = half.poll_transmit() {
        match t {
            Transmit::Bytes(b) => batch.push(b),
            Transmit::Finish => {
                write_batch(send, &mut batch).await?;
                send.finish()?;
            }
            Transmit::Reset(code) => {
                batch.clear();
                send.reset(code);
            }
        }
    }
    write_batch(send, &mut batch).await
}

async fn write_batch(send: &mut SendStream, batch: &mut Vec<Bytes>) -> Result<(), StreamError> {
    if batch.is_empty() {
        return Ok(());
    }
    let r = send.write_all_chunks(batch).await;
    batch.clear();
    r
}

/// A stream's receiving half read through a machine: what comes in goes to the machine, its
/// events come out, and a stop it asks for goes to the peer.
#[derive(Debug)]
pub struct Reader<R> {
    recv: RecvStream,
    half: R,
    /// The transport reported FIN or a reset: nothing more is read.
    ended: bool,
}

impl<R: RecvHalf> Reader<R> {
    /// Reads `recv` into `half`.
    pub fn new(recv: RecvStream, half: R) -> Self {
        Reader {
            recv,
            half,
            ended: false,
        }
    }

    /// The machine's next event, reading as much as it needs. `Err` when the transport failed
    /// otherwise than by a reset (which the machine reports), or when called again after the
    /// stream ended without an event. Cancel-safe: bytes read are handed to the machine before
    /// anything else can happen.
    pub async fn next(&mut self) -> Result<R::Event, StreamError> {
        loop {
            let event = self.half.poll_event();
            self.apply_stop();
            if let Some(e) = event {
                return Ok(e);
            }
            if self.ended {
                return Err(StreamError::Unusable {
                    what: "read after the stream ended",
                });
            }
            match self.recv.read_chunk(MAX_DATA_FRAME).await {
                Ok(Some(chunk)) => self.half.handle_input(chunk),
                Ok(None) => {
                    self.ended = true;
                    self.half.handle_fin();
                }
                Err(StreamError::Reset(code)) => {
                    self.ended = true;
                    self.half.handle_reset(code);
                }
                Err(e) => {
                    self.ended = true;
                    return Err(e);
                }
            }
        }
    }

    /// The machine's next event if it is ready without waiting: what the transport already
    /// holds (QUIC hands bytes over a packet at a time), so a caller can gather it into one
    /// write. `None` when the next event needs more bytes than have arrived.
    pub fn try_next(&mut self) -> Option<Result<R::Event, StreamError>> {
        // `next` is cancel-safe, so a poll that finds nothing leaves nothing behind; the no-op
        // waker it registers is replaced by the caller's next `next().await`.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(self.next()).poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }

    /// The machine, to cancel or query it; call [`Reader::apply_stop`] after a cancel.
    pub fn half_mut(&mut self) -> &mut R {
        &mut self.half
    }

    /// Sends the stop the machine asks for, if any.
    pub fn apply_stop(&mut self) {
        while let Some(code) = self.half.poll_stop() {
            self.recv.stop(code);
        }
    }

    /// The stream and the machine, to continue with another machine (a TCP stream once open).
    pub fn into_parts(self) -> (RecvStream, R) {
        (self.recv, self.half)
    }
}

// === Gathered writes ===

/// Byte chunks queued for one gathered write (`write_all_buf` on a socket that does vectored
/// writes): bytes that arrived a packet at a time leave in one system call, and on a
/// `TCP_NODELAY` socket in as few segments as fit, instead of one per chunk.
#[derive(Debug, Default)]
pub struct Gathered {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Gathered {
    /// Most chunks handed to one vectored write (tokio passes at most 64).
    const MAX_SLICES: usize = 64;

    /// Queues `chunk` after the others.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// True when another chunk may be gathered before writing: fewer than `max` bytes and
    /// fewer chunks than one vectored write takes.
    pub fn has_room(&self, max: usize) -> bool {
        self.len < max && self.chunks.len() < Self::MAX_SLICES
    }
}

impl Buf for Gathered {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, c) in dst.iter_mut().zip(&self.chunks) {
            *slot = std::io::IoSlice::new(c);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt <= self.len,
            "advance past the end of the gathered chunks"
        );
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_chunks_advance_across_chunk_boundaries() {
        let mut g = Gathered::default();
        g.push(Bytes::from_static(b"abc"));
        g.push(Bytes::new());
        g.push(Bytes::from_static(b"defg"));
        assert_eq!(g.remaining(), 7);
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        assert_eq!(g.chunks_vectored(&mut slices), 2);
        g.advance(4);
        assert_eq!(g.chunk(), b"efg");
        assert_eq!(g.remaining(), 3);
        g.advance(3);
        assert_eq!(g.remaining(), 0);
        assert_eq!(g.chunk(), b"");
        assert!(g.has_room(1));
    }

    #[tokio::test]
    async fn a_gathered_write_delivers_every_byte_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut g = Gathered::default();
        let mut want = Vec::new();
        for i in 0..100u8 {
            let chunk = vec![i; usize::from(i % 13) + 1];
            want.extend_from_slice(&chunk);
            g.push(Bytes::from(chunk));
        }
        let writer = tokio::spawn(async move {
            a.write_all_buf(&mut g).await.unwrap();
            assert_eq!(g.remaining(), 0);
        });
        let mut got = Vec::new();
        while got.len() < want.len() {
            let mut buf = [0u8; 5];
            let n = b.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, want);
    }
}
