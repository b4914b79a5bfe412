//! Transport layer: framed reads and writes on one tunnel stream (QUIC or HTTP/2, see
//! [`crate::transport`]).
//!
//! A gateway-opened stream carries a `StreamHeader`, then `Data` frames (raw body bytes, at most
//! [`MAX_DATA_FRAME`] each) and, for RPCs, a `ResponseHead` and `Trailers` from the agent. The
//! transport's per-stream flow control is the end-to-end backpressure: nobody reads faster than
//! its consumer.

use crate::transport::{RecvStream, SendStream};
use bytes::Bytes;
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
