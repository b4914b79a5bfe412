//! Length-delimited framing: `[type: u8][length: u32 big-endian][payload]`.
//!
//! The length is checked against the limit as soon as the five header bytes are in, before any
//! buffer is grown for the payload, so a peer cannot make us allocate more than the limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::message::Message;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 5;

/// Largest `Data` payload a sender puts in one frame, and the limit a stream decoder enforces
/// (with room for trailers and heads, which are smaller).
pub const MAX_DATA_FRAME: usize = 64 * 1024;

/// Largest frame payload accepted on a gateway-opened stream: a full `Data` frame, or a head,
/// trailers or header with room for their metadata.
pub const MAX_STREAM_FRAME: usize = MAX_DATA_FRAME + 64 * 1024;

/// The 5-byte header of a `Data` frame of `len` bytes, so callers can send the payload without
/// copying it (`write_all_chunks([header, payload])`).
pub fn data_header(len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN);
    b.put_u8(0x11);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    b.freeze()
}

/// Hard limits of the protocol; the gateway announces its frame limit in `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted on the control stream.
    pub max_control_frame: usize,
    /// Largest `StreamHeader` accepted at the start of a stream.
    pub max_stream_header: usize,
}

impl Limits {
    /// Default: 64 KiB for both. Control frames are small; headers carry metadata only.
    /// Body bytes travel in `Data` frames of at most [`MAX_DATA_FRAME`].
    pub const DEFAULT: Limits = Limits {
        max_control_frame: 64 * 1024,
        max_stream_header: 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Incremental frame decoder for one stream: push bytes as they arrive, pull whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload: usize,
}

impl FrameDecoder {
    /// A decoder that rejects payloads longer than `max_payload`.
    pub fn new(max_payload: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max_payload,
        }
    }

    /// Buffers bytes read from the stream.
    ///
    /// At most one partial frame is ever buffered, and [`FrameDecoder::next_message`] rejects
    /// an oversized header before the payload arrives, so the caller should pull messages after
    /// every push: the buffer then never exceeds one frame plus one read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtoError> {
        match peek_frame(&self.buf, self.max_payload)? {
            None => {
                if self.buf.len() >= HEADER_LEN {
                    // The header passed the limit check: it is now safe to make room.
                    let need = HEADER_LEN + frame_len(&self.buf);
                    self.buf.reserve(need.saturating_sub(self.buf.len()));
                }
                Ok(None)
            }
            Some((ty, len)) => {
                let mut frame = self.buf.split_to(HEADER_LEN + len);
                let payload = frame.split_off(HEADER_LEN).freeze();
                Message::decode(ty, payload).map(Some)
            }
        }
    }

    /// Takes the bytes buffered past the last whole message (for streams that switch to raw
    /// bytes after their header).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Bytes buffered but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

fn frame_len(buf: &[u8]) -> usize {
    let mut hdr = &buf[1..HEADER_LEN];
    hdr.get_u32() as usize
}

/// If `buf` starts with a whole frame, its type and payload length.
fn peek_frame(buf: &[u8], max_payload: usize) -> Result<Option<(u8, usize)>, ProtoError> {
    // An unknown type is refused from its first byte: garbage gets a clear error rather than
    // being read as a length.
    match buf.first() {
        None => return Ok(None),
        Some(&ty) if !Message::is_known_type(ty) => return Err(ProtoError::UnknownFrameType(ty)),
        Some(_) => {}
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = frame_len(buf);
    if len > max_payload {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: max_payload,
        });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    Ok(Some((buf[0], len)))
}

/// Decodes one frame from the start of `buf`: the message and how many bytes it used, or
/// `Ok(None)` if `buf` holds only part of a frame. For one-shot use and fuzzing.
pub fn decode_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(Message, usize)>, ProtoError> {
    match peek_frame(buf, max_payload)? {
        None => Ok(None),
        Some((ty, len)) => {
            let payload = Bytes::copy_from_slice(&buf[HEADER_LEN..HEADER_LEN + len]);
            let msg = Message::decode(ty, payload)?;
            Ok(Some((msg, HEADER_LEN + len)))
        }
    }
}
