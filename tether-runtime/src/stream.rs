//! Transport layer: framed reads and writes on one tunnel stream (QUIC or HTTP/2, see
//! [`crate::transport`]).
//!
//! A gateway-opened stream carries a `StreamHeader`, then `Data` frames (raw body bytes, at most
//! [`MAX_DATA_FRAME`] each) and, for RPCs, a `ResponseHead` and `Trailers` from the agent. The
//! transport's per-stream flow control is the end-to-end backpressure: nobody reads faster than
//! its consumer.

use crate::transport::{RecvStream, SendStream};
use bytes::Bytes;
use tunnel_proto::frame::{FrameDecoder, MAX_DATA_FRAME, data_header};
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

/// Writes body bytes as `Data` frames, without copying the payload.
pub async fn send_data(send: &mut SendStream, mut data: Bytes) -> Result<(), StreamError> {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
        let mut parts = [data_header(chunk.len()), chunk];
        // write_all_chunks only fails with the stream's error; it never writes partially and
        // reports success.
        send.write_all_chunks(&mut parts).await?;
    }
    Ok(())
}
