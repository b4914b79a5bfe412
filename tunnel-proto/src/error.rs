//! Protocol errors and the close codes carried by connection and stream closes.

use std::fmt;

/// An error found while decoding or stepping the protocol. Every variant is the peer's fault
/// (or a peer bug) unless its doc says otherwise; none of them panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame header announced a payload larger than the negotiated limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Length the peer announced.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A frame's payload did not decode as the message its type announced.
    #[error("malformed {kind} frame: {detail}")]
    Malformed {
        /// Which message was being decoded.
        kind: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// A well-formed message arrived in a state where it is not allowed.
    #[error("unexpected {got} frame while {state}")]
    Unexpected {
        /// The frame that arrived.
        got: &'static str,
        /// The state the session was in.
        state: &'static str,
    },
    /// The two sides share no protocol version.
    #[error("no common protocol version: peer speaks {peer:?}, we speak {ours:?}")]
    NoCommonVersion {
        /// Versions the peer offered.
        peer: Vec<u32>,
        /// Versions this side speaks.
        ours: Vec<u32>,
    },
    /// What a stream carries in several frames (a command's payload or output) adds up to more
    /// than the receiver takes; nothing beyond the limit was buffered.
    #[error("{what} of at least {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What grew too large.
        what: &'static str,
        /// Bytes it would have had with the frame that crossed the limit.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes that were buffered when the stream ended.
        buffered: usize,
    },
}

impl ProtoError {
    /// The close code to send when this error ends a stream or a connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::FrameTooLarge { .. } | ProtoError::TooLarge { .. } => {
                ErrorCode::FRAME_TOO_LARGE
            }
            ProtoError::NoCommonVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            _ => ErrorCode::PROTOCOL_ERROR,
        }
    }
}

/// A close code, carried as the QUIC application error code (or HTTP/2 error code on the TCP
/// fallback). Open-ended like h2's `Reason`: a code this build does not know still round-trips.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Orderly close, nothing wrong.
    pub const NO_ERROR: ErrorCode = ErrorCode(0);
    /// The peer violated the protocol (garbage, unexpected or malformed frame).
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(1);
    /// The peer sent a frame larger than the limit.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(2);
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(3);
    /// The peer stopped answering heartbeats.
    pub const HEARTBEAT_TIMEOUT: ErrorCode = ErrorCode(4);
    /// `Hello` / `Welcome` did not complete in time.
    pub const HANDSHAKE_TIMEOUT: ErrorCode = ErrorCode(5);
    /// The process on the other side is shutting down.
    pub const SHUTDOWN: ErrorCode = ErrorCode(6);
    /// The session was superseded by a newer one (make-before-break reconnect).
    pub const REPLACED: ErrorCode = ErrorCode(7);
    /// The agent's identity was revoked.
    pub const REVOKED: ErrorCode = ErrorCode(8);
    /// An internal error on the closing side; retrying may help.
    pub const INTERNAL: ErrorCode = ErrorCode(9);
    /// A stream was cancelled by the side that opened it.
    pub const CANCELLED: ErrorCode = ErrorCode(10);
    /// The peer's identity is not acceptable here.
    pub const UNAUTHENTICATED: ErrorCode = ErrorCode(11);
    /// The end-to-end probe failed: the connection looks alive but streams do not work.
    pub const UNRESPONSIVE: ErrorCode = ErrorCode(12);
    /// The agent already holds as many sessions as the gateway allows one agent; retrying helps
    /// once one of them ends.
    pub const TOO_MANY_SESSIONS: ErrorCode = ErrorCode(13);
    /// A stream reset by the agent without processing any of it, because it arrived on a
    /// session the agent is leaving (`leave`, see [`crate::message::LEAVE`]): open it again on
    /// another session. Like HTTP/2's `REFUSED_STREAM`.
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(14);
    /// The gateway turned the session away before it started: it is draining, holds more than
    /// its share of the fleet's sessions, or admits no more new sessions this second. The
    /// `Close` frame's `retry_after_ms` says when to dial again; another replica may take it
    /// at once.
    pub const BUSY: ErrorCode = ErrorCode(15);
    /// A session the agent was leaving was still carrying streams when the longest drain
    /// ran out: those streams were cut.
    pub const DRAIN_TIMEOUT: ErrorCode = ErrorCode(16);
    /// The gateway refused the session before it started: the agent's version (in `Hello`) is
    /// older than the gateway's `agents.min_version`. The `Close` frame's reason names both
    /// versions; dialing again helps only once the agent is upgraded (or the minimum lowered).
    pub const UPGRADE_REQUIRED: ErrorCode = ErrorCode(17);
    /// On a `Command` stream, from the gateway while the agent holds the command for its
    /// owner's approval: the command was cancelled or expired, it will not be delivered again,
    /// and the agent forgets its wait.
    pub const WITHDRAWN: ErrorCode = ErrorCode(18);
    /// Peer links between gateway replicas (numbered from 0x100, apart from the tunnel's): the
    /// replica asked to carry a stream holds no session of its agent, and nothing reached the
    /// agent, so the stream may be sent to another replica.
    pub const NOT_HERE: ErrorCode = ErrorCode(0x100);
    /// Peer links: the connection on the far side of a replica in the middle (its agent's
    /// session, or the peer link) was lost under a stream it was carrying.
    pub const LINK_LOST: ErrorCode = ErrorCode(0x101);

    /// A stable lower-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "no_error",
            1 => "protocol_error",
            2 => "frame_too_large",
            3 => "unsupported_version",
            4 => "heartbeat_timeout",
            5 => "handshake_timeout",
            6 => "shutdown",
            7 => "replaced",
            8 => "revoked",
            9 => "internal",
            10 => "cancelled",
            11 => "unauthenticated",
            12 => "unresponsive",
            13 => "too_many_sessions",
            14 => "refused_stream",
            15 => "busy",
            16 => "drain_timeout",
            17 => "upgrade_required",
            18 => "withdrawn",
            0x100 => "not_here",
            0x101 => "link_lost",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<u64> for ErrorCode {
    fn from(v: u64) -> Self {
        ErrorCode(u32::try_from(v).unwrap_or(u32::MAX))
    }
}
