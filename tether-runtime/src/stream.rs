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

/// Why a stream read failed.
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
    /// The connection under the stream is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer sent something that is not a valid frame.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// Other stream failure (stream already closed locally, ...).
    #[error("stream failed: {0}")]
    Other(String),
}

impl From<quinn::ReadError> for StreamError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => StreamError::Reset(ErrorCode::from(u64::from(code))),
            quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c)) => {
                StreamError::Closed {
                    code: ErrorCode::from(u64::from(c.error_code)),
                    reason: String::from_utf8_lossy(&c.reason).into_owned(),
                }
            }
            quinn::ReadError::ConnectionLost(c) => StreamError::ConnectionLost(c.to_string()),
            other => StreamError::Other(other.to_string()),
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
                return Err(StreamError::Other("the stream has ended".into()));
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
