//! Transport layer: what a peer link carries on each stream before the bytes it relays.
//!
//! A stream on a peer link starts with a [`PeerHeader`] from the replica that opened it and a
//! [`PeerAnswer`] from the other; a forwarded stream then carries, both ways, exactly the bytes
//! of the gateway↔agent stream protocol (`tunnel_proto::stream`), spliced end to end:
//!
//! ```text
//! forwarding replica ── PeerHeader{Forward, agent, caller, timeout} · StreamHeader · Data… ──► holder
//!                    ◄─ PeerAnswer{Ok} · ResponseHead · Data… · Trailers ───────────────────── holder
//! ```
//!
//! Both messages are protobuf (fields can be added) in a frame of their own: a 4-byte
//! big-endian length, then the payload, at most [`MAX_FRAME`] bytes, checked before anything
//! is allocated. The answer comes before any byte reaches the agent: a refusal (no session
//! here, no stream free) means nothing was sent on, so the stream may go to another replica.

use bytes::{BufMut, Bytes, BytesMut};
use tether_runtime::stream::StreamError;
use tether_runtime::transport::RecvStream;

/// ALPN of peer links.
pub const ALPN: &[u8] = b"tether-peer/1";
/// The peer protocol's version, in every header.
pub const VERSION: u32 = 1;
/// Largest header or answer payload.
pub const MAX_FRAME: usize = 16 << 10;

/// What a peer stream is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PeerKind {
    /// A stream to one of the agent's sessions on the receiving replica (a relayed call or a
    /// TCP stream, whose protocol bytes follow).
    Forward = 1,
    /// A health probe: answered at once, then finished.
    Ping = 2,
}

impl PeerKind {
    /// The kind a header's number names, if known.
    pub fn from_u32(v: u32) -> Option<PeerKind> {
        match v {
            1 => Some(PeerKind::Forward),
            2 => Some(PeerKind::Ping),
            _ => None,
        }
    }
}

/// The first frame of a peer stream, from the replica that opened it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerHeader {
    /// [`VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// [`PeerKind`].
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    /// The agent (`tenant/agent`), for [`PeerKind::Forward`].
    #[prost(string, tag = "3")]
    pub agent: String,
    /// Who the call acts for, as the forwarding replica authenticated it (for logs only:
    /// authorization happened there).
    #[prost(string, tag = "4")]
    pub caller: String,
    /// Milliseconds left of the call's deadline when it was forwarded; 0 for none.
    #[prost(uint64, tag = "5")]
    pub timeout_ms: u64,
    /// What the stream carries (`grpc`, `tcp`), for logs and metrics.
    #[prost(string, tag = "6")]
    pub stream_kind: String,
}

/// The receiving replica's answer, before anything else it sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerAnswer {
    /// [`AnswerCode`].
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// Why, for a refusal (shown to the caller when no other replica can take the stream).
    #[prost(string, tag = "2")]
    pub message: String,
    /// The answering process's epoch (`gateway_replicas.epoch`); 0 from replicas that predate
    /// it. A dialer learns from its first probe which process it reached: the row it read
    /// may be older than the process that answers at that address.
    #[prost(int64, tag = "3")]
    pub epoch: i64,
}

/// What a [`PeerAnswer`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AnswerCode {
    /// The agent's stream is open (or the ping answered): the protocol bytes follow.
    Ok = 0,
    /// No session of the agent here; nothing reached it. Another replica may have one.
    NotHere = 1,
    /// The agent has `limits.streams_per_agent` streams in flight through this replica.
    TooManyStreams = 2,
    /// The agent's connection gave no stream in time.
    NoFreeStream = 3,
    /// The agent's connection went away while the stream was being opened.
    AgentLost = 4,
    /// The header was malformed or of a version or kind this replica does not know.
    BadRequest = 5,
}

impl AnswerCode {
    /// The code a number names; unknown numbers read as [`AnswerCode::BadRequest`] (a newer
    /// replica's refusal this one cannot name is still a refusal).
    pub fn from_u32(v: u32) -> AnswerCode {
        match v {
            0 => AnswerCode::Ok,
            1 => AnswerCode::NotHere,
            2 => AnswerCode::TooManyStreams,
            3 => AnswerCode::NoFreeStream,
            4 => AnswerCode::AgentLost,
            _ => AnswerCode::BadRequest,
        }
    }
}

impl PeerAnswer {
    /// An answer with `code` and `message`.
    pub fn new(code: AnswerCode, message: impl Into<String>) -> PeerAnswer {
        PeerAnswer {
            code: code as u32,
            message: message.into(),
            epoch: 0,
        }
    }

    /// What it says.
    pub fn code(&self) -> AnswerCode {
        AnswerCode::from_u32(self.code)
    }
}

/// Why a peer frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed under the frame.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The stream ended before a whole frame.
    #[error("stream ended inside a peer frame")]
    Ended,
    /// The length prefix is above [`MAX_FRAME`]; nothing was allocated.
    #[error("peer frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    /// The payload is not the message expected.
    #[error("malformed peer frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// One message as a frame: its length (4 bytes, big-endian), then its protobuf encoding.
pub fn encode<M: prost::Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("BytesMut grows");
    buf.freeze()
}

/// The payload length a frame's 4-byte prefix announces, checked against [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a whole frame (prefix and payload) as `M`: what a fuzz target or a test feeds.
pub fn decode<M: prost::Message + Default>(frame: &[u8]) -> Result<M, WireError> {
    let prefix: [u8; 4] = frame
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .ok_or(WireError::Ended)?;
    let len = frame_len(prefix)?;
    let payload = frame.get(4..4 + len).ok_or(WireError::Ended)?;
    Ok(M::decode(payload)?)
}

/// Reads exactly one frame from `recv` and decodes it as `M`, leaving every byte after it in
/// the stream (the relayed protocol's bytes follow it).
pub async fn read<M: prost::Message + Default>(recv: &mut RecvStream) -> Result<M, WireError> {
    let mut prefix = [0u8; 4];
    read_exact(recv, &mut prefix).await?;
    let mut payload = vec![0u8; frame_len(prefix)?];
    read_exact(recv, &mut payload).await?;
    Ok(M::decode(payload.as_slice())?)
}

/// Fills `buf` from `recv`, never reading past it.
async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), WireError> {
    let mut at = 0;
    while at < buf.len() {
        match recv.read(&mut buf[at..]).await? {
            Some(n) => at += n,
            None => return Err(WireError::Ended),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn headers_and_answers_round_trip(
            kind in 0u32..4, agent in ".{0,80}", caller in ".{0,80}", timeout_ms in any::<u64>(),
            code in 0u32..8, message in ".{0,200}", epoch in any::<i64>(),
        ) {
            let h = PeerHeader {
                version: VERSION, kind, agent, caller, timeout_ms, stream_kind: "grpc".into(),
            };
            prop_assert_eq!(decode::<PeerHeader>(&encode(&h)).unwrap(), h);
            let a = PeerAnswer { code, message, epoch };
            prop_assert_eq!(decode::<PeerAnswer>(&encode(&a)).unwrap(), a);
        }

        /// Whatever bytes a peer sends, decoding returns an error or a message, never panics,
        /// and never trusts a length above the limit.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<PeerHeader>(&bytes);
            let _ = decode::<PeerAnswer>(&bytes);
        }
    }

    #[test]
    fn a_length_above_the_limit_is_refused_before_reading_it() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend([0u8; 8]);
        assert!(matches!(
            decode::<PeerHeader>(&frame),
            Err(WireError::TooLarge(n)) if n == MAX_FRAME + 1
        ));
        assert!(matches!(
            decode::<PeerHeader>(&[0, 0, 0, 9, 1]),
            Err(WireError::Ended)
        ));
        assert_eq!(AnswerCode::from_u32(77), AnswerCode::BadRequest);
    }
}
