//! The agent's side of a stream the gateway opened, until its header says what it carries.

use std::collections::VecDeque;

use bytes::Bytes;

use super::command::{AgentCommand, MAX_PAYLOAD};
use super::rpc::{RequestRecv, ResponseSend};
use super::tcp::AgentTcp;
use super::{
    Inbox, Outbox, RecvHalf, SendHalf, StreamFailure, Transmit, UNIMPLEMENTED, unexpected,
};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::{FrameDecoder, MAX_STREAM_FRAME};
use crate::message::{Message, OpenResult, StreamHeader, StreamKind, Trailers};

/// A stream the agent serves, with the machines that continue it (holding whatever was read
/// past the header).
#[derive(Debug)]
pub enum Accepted {
    /// A relayed gRPC call: answer on `response`, read the request body from `request`.
    Rpc {
        /// The call: service, method, metadata, deadline, trace context.
        header: StreamHeader,
        /// The request body.
        request: RequestRecv,
        /// The response.
        response: ResponseSend,
    },
    /// A TCP stream to a service: answer, then split into raw halves.
    Tcp(AgentTcp),
    /// A command delivery: read the payload, then report.
    Command(AgentCommand),
}

/// What the agent learns from a new stream's first frame.
#[derive(Debug)]
pub enum IncomingEvent {
    /// A stream to serve (final for this machine).
    Accepted(Box<Accepted>),
    /// The gateway's end-to-end probe, answered here: `OpenResult { ok }`, FIN (final).
    Probed,
    /// A kind this agent does not serve, answered here with `UNIMPLEMENTED` trailers and FIN
    /// (final).
    Unsupported(StreamHeader),
    /// The stream did not start with a header (final). The stream was reset, and stopped when
    /// the gateway broke the protocol.
    Failed(StreamFailure),
}

/// A stream the gateway opened, until its `StreamHeader` has arrived.
///
/// A stream that does not start with a header is reset and stopped with the error's code; one
/// the gateway finishes or resets before its header is reset with `CANCELLED`.
#[derive(Debug)]
pub struct Incoming {
    inbox: Inbox,
    out: Outbox,
    events: VecDeque<IncomingEvent>,
    max_command_payload: usize,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming::new()
    }
}

impl Incoming {
    /// A new stream; command payloads up to [`MAX_PAYLOAD`].
    pub fn new() -> Incoming {
        Incoming::with_max_command_payload(MAX_PAYLOAD)
    }

    /// A new stream; command payloads up to `max` bytes.
    pub fn with_max_command_payload(max: usize) -> Incoming {
        Incoming {
            inbox: Inbox::new(MAX_STREAM_FRAME),
            out: Outbox::default(),
            events: VecDeque::new(),
            max_command_payload: max,
        }
    }

    /// True once the final event was emitted (or the stream was cancelled).
    pub fn is_ended(&self) -> bool {
        self.inbox.ended
    }

    /// The header did not come in time: reset with `CANCELLED`. No event follows.
    pub fn cancel(&mut self) {
        if !self.inbox.ended {
            self.inbox.end();
            self.out.reset(ErrorCode::CANCELLED);
        }
    }

    fn drain(&mut self) {
        // One frame only: what follows the header belongs to the kind's machine (and is raw
        // bytes on a TCP stream).
        match self.inbox.next() {
            None => {}
            Some(Ok(Message::StreamHeader(header))) => self.accept(header),
            Some(Ok(other)) => self.fail(unexpected(&other, "awaiting the StreamHeader")),
            Some(Err(e)) => self.fail(e),
        }
    }

    fn accept(&mut self, header: StreamHeader) {
        self.inbox.end();
        let mut decoder = std::mem::replace(&mut self.inbox.decoder, FrameDecoder::new(0));
        // The send half goes with the stream: a stop that came already still counts.
        let out = std::mem::take(&mut self.out);
        let event = match header.stream_kind() {
            StreamKind::Rpc => IncomingEvent::Accepted(Box::new(Accepted::Rpc {
                header,
                request: RequestRecv::continuing(decoder),
                response: ResponseSend::continuing(out),
            })),
            StreamKind::Tcp => IncomingEvent::Accepted(Box::new(Accepted::Tcp(AgentTcp::new(
                header,
                decoder.take_buffered(),
                out,
            )))),
            StreamKind::Command => IncomingEvent::Accepted(Box::new(Accepted::Command(
                AgentCommand::continuing(header, decoder, self.max_command_payload, out),
            ))),
            StreamKind::Probe => {
                self.out = out;
                self.out.frame(&Message::OpenResult(OpenResult {
                    ok: true,
                    ..Default::default()
                }));
                self.out.finish();
                IncomingEvent::Probed
            }
            StreamKind::Unspecified => {
                self.out = out;
                self.out.frame(&Message::Trailers(Trailers::status(
                    UNIMPLEMENTED,
                    "stream kind not supported by this agent",
                )));
                self.out.finish();
                IncomingEvent::Unsupported(header)
            }
        };
        self.events.push_back(event);
    }

    fn fail(&mut self, e: ProtoError) {
        self.inbox.stop(e.code());
        self.out.reset(e.code());
        self.events
            .push_back(IncomingEvent::Failed(StreamFailure::Protocol(e)));
    }
}

impl SendHalf for Incoming {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for Incoming {
    type Event = IncomingEvent;

    /// Bytes read from the stream. Once the header is in, the rest belongs to the accepted
    /// machine: feed nothing more here.
    fn handle_input(&mut self, data: Bytes) {
        self.inbox.push(&data);
        self.drain();
    }

    fn handle_fin(&mut self) {
        if self.inbox.ended {
            return;
        }
        match self.inbox.finish() {
            Err(e) => self.fail(e),
            Ok(()) => {
                self.inbox.end();
                self.out.reset(ErrorCode::CANCELLED);
                self.events
                    .push_back(IncomingEvent::Failed(StreamFailure::Ended {
                        expected: "the StreamHeader",
                    }));
            }
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            self.out.reset(ErrorCode::CANCELLED);
            self.events.push_back(IncomingEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<IncomingEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}
