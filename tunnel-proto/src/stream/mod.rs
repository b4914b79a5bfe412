//! The protocols of gateway-opened streams, sans-IO: one small machine per stream kind and side.
//!
//! Every stream the gateway opens on a session starts with a [`StreamHeader`] saying what it
//! carries; from there each kind has its own short protocol, defined here and nowhere else:
//!
//! | kind | gateway → agent | agent → gateway | module |
//! |---|---|---|---|
//! | relayed gRPC call | `StreamHeader`, `Data`…, FIN (reset: cancelled) | `ResponseHead`, `Data`…, `Trailers`, FIN; or `Trailers`, FIN | [`rpc`] |
//! | TCP stream | `StreamHeader`, then raw bytes, FIN | `OpenResult`, then raw bytes, FIN (a refusal: FIN right after) | [`tcp`] |
//! | command delivery | `StreamHeader`, `Data`… (the payload), FIN | `CommandAck`, `CommandProgress`… and `Data`… (the output), `CommandResult`, FIN | [`command`] |
//! | end-to-end probe | `StreamHeader`, FIN | `OpenResult { ok }`, FIN | [`probe`] |
//! | any other kind | `StreamHeader`, … | `Trailers` (`UNIMPLEMENTED`), FIN | [`Incoming`] |
//!
//! The agent does not know what a stream carries until its header arrives: [`Incoming`] reads
//! the header, answers probes and kinds it does not serve itself, and hands the other kinds out
//! as [`Accepted`] machines that continue where it stopped.
//!
//! # Driving a machine
//!
//! A stream is a pair of byte pipes that each end finishes (FIN) or resets on its own, and whose
//! receiver can ask the sender to stop. Each machine implements the half or halves it drives:
//! [`RecvHalf`] (bytes, FIN and reset come in; events and a stop code go out) and [`SendHalf`]
//! (a stop comes in; bytes to write, FIN and reset go out, through [`Transmit`]). The machines of
//! a stream both ends read and write at once (a relayed call, a raw TCP stream) come as two
//! halves, so two tasks can each own one without a lock; the others are one machine.
//!
//! What a machine checks on what it receives: frames come in the order above, each within the
//! stream's frame limit ([`MAX_STREAM_FRAME`]), and what adds up over several frames (a
//! command's payload or output) within its limit. A frame out of order, malformed or too large
//! ends the receiving half with [`StreamFailure::Protocol`] and a stop carrying the error's code
//! (and, where the machine holds the send half too, a reset); the rest of the session is not
//! touched. A machine never panics on peer input, emits exactly one final event per receiving
//! half, and nothing after it. What a machine sends it builds itself, in the protocol's order,
//! with the protocol's limits applied (`Data` frames of at most [`MAX_DATA_FRAME`], progress lines
//! and messages cut to their caps); a send out of order is refused with a [`SendError`].
//!
//! Time is not a machine's business: the IO owns deadlines (a call's `grpc-timeout`, how long a
//! header may take) and says what happened through `cancel` methods.
//!
//! [`StreamHeader`]: crate::message::StreamHeader
//! [`MAX_STREAM_FRAME`]: crate::frame::MAX_STREAM_FRAME
//! [`MAX_DATA_FRAME`]: crate::frame::MAX_DATA_FRAME

use std::collections::VecDeque;

use bytes::Bytes;

use crate::error::{ErrorCode, ProtoError};
use crate::frame::{FrameDecoder, MAX_DATA_FRAME, data_header};
use crate::message::Message;

pub mod command;
mod incoming;
pub mod probe;
pub mod rpc;
pub mod tcp;

pub use incoming::{Accepted, Incoming, IncomingEvent};

/// gRPC `UNIMPLEMENTED`, in the trailers an agent answers an unknown stream kind with.
const UNIMPLEMENTED: i32 = 12;

// === The halves ===

/// The sending half of a stream machine.
pub trait SendHalf {
    /// The peer asked to stop receiving (QUIC `STOP_SENDING`, or an HTTP/2 reset of the
    /// stream). Nothing more is sent; what was queued and not taken is dropped.
    fn handle_stopped(&mut self, code: ErrorCode);

    /// The next thing to do on the send half, in order. Drain after every call that sends.
    fn poll_transmit(&mut self) -> Option<Transmit>;
}

/// The receiving half of a stream machine.
pub trait RecvHalf {
    /// What the machine makes of what it receives.
    type Event;

    /// Bytes read from the stream, split anywhere.
    fn handle_input(&mut self, data: Bytes);

    /// The peer finished its half (FIN): no more bytes come.
    fn handle_fin(&mut self);

    /// The peer reset its half with `code`: no more bytes come, and some sent may be lost.
    fn handle_reset(&mut self, code: ErrorCode);

    /// The next event, if any.
    fn poll_event(&mut self) -> Option<Self::Event>;

    /// A code to stop the receiving half with (ask the peer to stop sending); at most once.
    fn poll_stop(&mut self) -> Option<ErrorCode>;
}

impl<T: SendHalf + ?Sized> SendHalf for &mut T {
    fn handle_stopped(&mut self, code: ErrorCode) {
        (**self).handle_stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        (**self).poll_transmit()
    }
}

impl<T: RecvHalf + ?Sized> RecvHalf for &mut T {
    type Event = T::Event;

    fn handle_input(&mut self, data: Bytes) {
        (**self).handle_input(data);
    }

    fn handle_fin(&mut self) {
        (**self).handle_fin();
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        (**self).handle_reset(code);
    }

    fn poll_event(&mut self) -> Option<T::Event> {
        (**self).poll_event()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        (**self).poll_stop()
    }
}

/// What to do on a stream's send half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Write these bytes after everything before. A `Data` frame comes as two of these, its
    /// 5-byte header and its payload, so the payload is never copied: write consecutive ones as
    /// one gathered write.
    Bytes(Bytes),
    /// Finish the send half (FIN) after everything before.
    Finish,
    /// Reset the send half with this code; whatever was not written yet is dropped.
    Reset(ErrorCode),
}

/// Why a receiving half ended before its protocol's last frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// The peer broke the protocol: a frame malformed, too large or out of order. The half was
    /// stopped with the error's code.
    #[error("protocol error: {0}")]
    Protocol(ProtoError),
    /// The peer reset its half with this code (it cancelled, or gave up).
    #[error("peer reset the stream: {0}")]
    Reset(ErrorCode),
    /// The peer finished its half before sending what the protocol needs next.
    #[error("stream ended before {expected}")]
    Ended {
        /// What was still due.
        expected: &'static str,
    },
}

/// A send the stream's protocol or state does not allow: this side's mistake or a stream that
/// has ended, never something the peer sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The peer stopped the stream; nothing more reaches it.
    #[error("the peer stopped the stream ({0})")]
    Stopped(ErrorCode),
    /// This side already finished or reset the send half.
    #[error("cannot send {what}: the stream was already {how} by this side")]
    Closed {
        /// What was to be sent.
        what: &'static str,
        /// `finished` or `reset`.
        how: &'static str,
    },
    /// The protocol does not allow this frame in the stream's state.
    #[error("cannot send {what} while {state}")]
    OutOfOrder {
        /// What was to be sent.
        what: &'static str,
        /// The state the stream is in.
        state: &'static str,
    },
}

// === Outbox: the common part of every send half ===

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SendState {
    #[default]
    Open,
    Finished,
    Reset,
    Stopped(ErrorCode),
}

/// Frames to write, and how the send half ended.
#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<Transmit>,
    state: SendState,
}

impl Outbox {
    /// `Ok` while frames may still be sent.
    fn check(&self, what: &'static str) -> Result<(), SendError> {
        match self.state {
            SendState::Open => Ok(()),
            SendState::Finished => Err(SendError::Closed {
                what,
                how: "finished",
            }),
            SendState::Reset => Err(SendError::Closed { what, how: "reset" }),
            SendState::Stopped(code) => Err(SendError::Stopped(code)),
        }
    }

    fn frame(&mut self, msg: &Message) {
        if self.state == SendState::Open {
            self.queue.push_back(Transmit::Bytes(msg.to_bytes()));
        }
    }

    /// `data` as `Data` frames of at most [`MAX_DATA_FRAME`], header and payload apart.
    fn data(&mut self, mut data: Bytes) {
        if self.state != SendState::Open {
            return;
        }
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
            self.queue
                .push_back(Transmit::Bytes(data_header(chunk.len())));
            self.queue.push_back(Transmit::Bytes(chunk));
        }
    }

    fn raw(&mut self, data: Bytes) {
        if self.state == SendState::Open && !data.is_empty() {
            self.queue.push_back(Transmit::Bytes(data));
        }
    }

    fn finish(&mut self) {
        if self.state == SendState::Open {
            self.queue.push_back(Transmit::Finish);
            self.state = SendState::Finished;
        }
    }

    /// Resets the half, also after a FIN (QUIC allows it until the peer has read everything):
    /// a cancellation must reach the peer whenever it comes.
    fn reset(&mut self, code: ErrorCode) {
        if matches!(self.state, SendState::Open | SendState::Finished) {
            self.queue.clear();
            self.queue.push_back(Transmit::Reset(code));
            self.state = SendState::Reset;
        }
    }

    fn stopped(&mut self, code: ErrorCode) {
        if self.state != SendState::Reset {
            self.queue.clear();
            self.state = SendState::Stopped(code);
        }
    }

    fn poll(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }
}

// === Inbox: the common part of every receive half ===

/// The frame decoder of a receive half, and whether the half has ended.
#[derive(Debug)]
struct Inbox {
    decoder: FrameDecoder,
    /// The final event was emitted: nothing more is decoded.
    ended: bool,
    stop: Option<ErrorCode>,
    stop_sent: bool,
}

impl Inbox {
    fn new(max_frame: usize) -> Inbox {
        Inbox::from_decoder(FrameDecoder::new(max_frame))
    }

    fn from_decoder(decoder: FrameDecoder) -> Inbox {
        Inbox {
            decoder,
            ended: false,
            stop: None,
            stop_sent: false,
        }
    }

    /// Buffers `data` unless the half has ended.
    fn push(&mut self, data: &[u8]) {
        if !self.ended {
            self.decoder.push(data);
        }
    }

    /// The next whole frame; `None` when more bytes are needed or the half has ended.
    fn next(&mut self) -> Option<Result<Message, ProtoError>> {
        if self.ended {
            return None;
        }
        self.decoder.next_message().transpose()
    }

    /// The half ended normally or by the peer: no stop to send.
    fn end(&mut self) {
        self.ended = true;
    }

    /// The half ends here, and the peer is asked to stop sending with `code`.
    fn stop(&mut self, code: ErrorCode) {
        if !self.stop_sent && self.stop.is_none() {
            self.stop = Some(code);
        }
        self.ended = true;
    }

    /// On FIN: an error if it fell inside a frame.
    fn finish(&self) -> Result<(), ProtoError> {
        self.decoder.finish()
    }

    /// On FIN before the half's last frame: the failure to report (a frame cut short, or the
    /// stream ended while `expected` was still to come), once; `None` when it had ended.
    fn fin_failure(&mut self, expected: &'static str) -> Option<StreamFailure> {
        if self.ended {
            return None;
        }
        self.end();
        Some(match self.finish() {
            Err(e) => StreamFailure::Protocol(e),
            Ok(()) => StreamFailure::Ended { expected },
        })
    }

    /// On the peer's reset: the failure to report, once; `None` when the half had ended.
    fn reset_failure(&mut self, code: ErrorCode) -> Option<StreamFailure> {
        if self.ended {
            return None;
        }
        self.end();
        Some(StreamFailure::Reset(code))
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        let code = self.stop.take()?;
        self.stop_sent = true;
        Some(code)
    }
}

/// The name of a message for [`ProtoError::Unexpected`].
fn unexpected(msg: &Message, state: &'static str) -> ProtoError {
    ProtoError::Unexpected {
        got: msg.name(),
        state,
    }
}
