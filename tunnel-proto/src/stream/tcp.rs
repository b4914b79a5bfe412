//! A raw TCP stream to one of the agent's `tcp` services.
//!
//! ```text
//! gateway ── StreamHeader{Tcp, service}, raw bytes…, FIN ─────────────────────► agent
//! gateway ◄── OpenResult{ok}, raw bytes…, FIN  |  OpenResult{not ok, code, message}, FIN ── agent
//! ```
//!
//! The agent answers once it has connected to the service (or could not); from an `ok` on, the
//! stream carries the service's bytes both ways, unframed, and each FIN is a half-close of the
//! TCP connection. The gateway sends no raw bytes before the answer. Until the answer both
//! sides are one machine ([`GatewayTcp`], [`AgentTcp`]); once open, `into_raw` splits each into
//! a [`RawSend`] and a [`RawRecv`], carrying over whatever bytes were already read.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Inbox, Outbox, RecvHalf, SendError, SendHalf, StreamFailure, Transmit, unexpected};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::MAX_STREAM_FRAME;
use crate::message::{Message, OpenResult, StreamHeader, StreamKind};

/// What either side receives on a TCP stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpEvent {
    /// (Gateway) the agent connected to the service: raw bytes follow both ways.
    Opened,
    /// (Gateway) the agent could not or would not connect (final).
    Refused {
        /// A gRPC status code.
        code: i32,
        /// Why, for the caller.
        message: String,
    },
    /// Bytes of the service's stream.
    Data(Bytes),
    /// The peer half-closed (final).
    Finished,
    /// The stream broke off (final).
    Failed(StreamFailure),
}

// === RawIn: the receiving side once the stream is open ===

/// Raw bytes in; how the receiving half ended.
#[derive(Debug, Default)]
struct RawIn {
    events: VecDeque<TcpEvent>,
    ended: bool,
    stop: Option<ErrorCode>,
}

impl RawIn {
    fn input(&mut self, data: Bytes) {
        if !self.ended && !data.is_empty() {
            self.events.push_back(TcpEvent::Data(data));
        }
    }

    fn fin(&mut self) {
        if !self.ended {
            self.ended = true;
            self.events.push_back(TcpEvent::Finished);
        }
    }

    fn reset(&mut self, code: ErrorCode) {
        if !self.ended {
            self.ended = true;
            self.events
                .push_back(TcpEvent::Failed(StreamFailure::Reset(code)));
        }
    }

    fn stop(&mut self, code: ErrorCode) {
        if !self.ended {
            self.ended = true;
            self.stop = Some(code);
        }
    }
}

// === Gateway ===

/// The gateway's TCP stream until the agent's answer: the header out, `OpenResult` in.
#[derive(Debug)]
pub struct GatewayTcp {
    out: Outbox,
    inbox: Inbox,
    opened: bool,
    raw: RawIn,
}

impl GatewayTcp {
    /// Queues the header of a stream to the agent's service `service` (empty: its default).
    pub fn new(service: String) -> GatewayTcp {
        Self::with_trace_context(service, Default::default())
    }

    /// [`GatewayTcp::new`] carrying a W3C trace context (`traceparent`, `tracestate`).
    pub fn with_trace_context(
        service: String,
        trace_context: std::collections::BTreeMap<String, String>,
    ) -> GatewayTcp {
        Self::with_caller(service, trace_context, String::new())
    }

    /// [`GatewayTcp::with_trace_context`] naming the caller the gateway authenticated
    /// ([`StreamHeader::caller`]).
    pub fn with_caller(
        service: String,
        trace_context: std::collections::BTreeMap<String, String>,
        caller: String,
    ) -> GatewayTcp {
        let mut out = Outbox::default();
        out.frame(&Message::StreamHeader(StreamHeader {
            kind: StreamKind::Tcp as i32,
            service,
            trace_context,
            caller,
            ..Default::default()
        }));
        GatewayTcp {
            out,
            inbox: Inbox::new(MAX_STREAM_FRAME),
            opened: false,
            raw: RawIn::default(),
        }
    }

    /// True once the agent answered `ok`.
    pub fn is_open(&self) -> bool {
        self.opened
    }

    /// The two raw halves, once open (events not yet polled move with them); the machine
    /// before.
    pub fn into_raw(self) -> Result<(RawSend, RawRecv), Box<GatewayTcp>> {
        if !self.opened {
            return Err(Box::new(self));
        }
        Ok((RawSend { out: self.out }, RawRecv { raw: self.raw }))
    }

    fn drain(&mut self) {
        while !self.opened {
            let Some(next) = self.inbox.next() else {
                return;
            };
            match next {
                Ok(Message::OpenResult(r)) if r.ok => {
                    self.opened = true;
                    self.inbox.end();
                    self.raw.events.push_back(TcpEvent::Opened);
                    // Whatever came with the answer is the service's first bytes.
                    let rest = self.inbox.decoder.take_buffered();
                    self.raw.input(rest);
                }
                Ok(Message::OpenResult(r)) => {
                    self.inbox.end();
                    self.raw.ended = true;
                    self.raw.events.push_back(TcpEvent::Refused {
                        code: r.code,
                        message: r.message,
                    });
                }
                Ok(other) => self.fail(unexpected(&other, "awaiting the OpenResult")),
                Err(e) => self.fail(e),
            }
        }
    }

    /// Nothing more is read or written: the stream is useless both ways.
    fn fail(&mut self, e: ProtoError) {
        self.inbox.stop(e.code());
        self.out.reset(e.code());
        self.raw.ended = true;
        self.raw
            .events
            .push_back(TcpEvent::Failed(StreamFailure::Protocol(e)));
    }
}

impl SendHalf for GatewayTcp {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for GatewayTcp {
    type Event = TcpEvent;

    fn handle_input(&mut self, data: Bytes) {
        if self.opened {
            self.raw.input(data);
        } else {
            self.inbox.push(&data);
            self.drain();
        }
    }

    fn handle_fin(&mut self) {
        if self.opened {
            return self.raw.fin();
        }
        let Some(failure) = self.inbox.fin_failure("the OpenResult") else {
            return;
        };
        // An agent that ends the stream without answering has broken it.
        self.out.reset(ErrorCode::PROTOCOL_ERROR);
        self.raw.ended = true;
        self.raw.events.push_back(TcpEvent::Failed(failure));
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if !self.opened {
            self.inbox.end();
        }
        self.raw.reset(code);
    }

    fn poll_event(&mut self) -> Option<TcpEvent> {
        self.raw.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop().or_else(|| self.raw.stop.take())
    }
}

// === Agent ===

/// The agent's TCP stream until it answered: the header read, `OpenResult` out. Bytes that
/// arrive before the answer (the IO reads none, but a peer may send them) are the service's.
#[derive(Debug)]
pub struct AgentTcp {
    header: StreamHeader,
    out: Outbox,
    answered: Option<bool>,
    raw: RawIn,
}

impl AgentTcp {
    /// `leftover`: bytes read past the header; `out`: the stream's send half.
    pub(super) fn new(header: StreamHeader, leftover: Bytes, out: Outbox) -> AgentTcp {
        let mut raw = RawIn::default();
        raw.input(leftover);
        AgentTcp {
            header,
            out,
            answered: None,
            raw,
        }
    }

    /// The stream's header (`service`: the agent-side service name; empty for its default).
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    fn answer(&mut self, result: OpenResult) -> Result<(), SendError> {
        self.out.check("OpenResult")?;
        if self.answered.is_some() {
            return Err(SendError::OutOfOrder {
                what: "OpenResult",
                state: "already answered",
            });
        }
        self.answered = Some(result.ok);
        let ok = result.ok;
        self.out.frame(&Message::OpenResult(result));
        if !ok {
            self.out.finish();
        }
        Ok(())
    }

    /// Connected to the service: `OpenResult { ok }`; raw bytes follow.
    pub fn accept(&mut self) -> Result<(), SendError> {
        self.answer(OpenResult {
            ok: true,
            code: 0,
            message: String::new(),
        })
    }

    /// Not connected: `OpenResult` with a gRPC status `code` (not 0) and why, then FIN.
    pub fn refuse(&mut self, code: i32, message: String) -> Result<(), SendError> {
        self.answer(OpenResult {
            ok: false,
            code,
            message,
        })
    }

    /// The two raw halves, once accepted (events not yet polled move with them); `Err(self)`
    /// before.
    pub fn into_raw(self) -> Result<(RawSend, RawRecv), Box<AgentTcp>> {
        if self.answered != Some(true) {
            return Err(Box::new(self));
        }
        Ok((RawSend { out: self.out }, RawRecv { raw: self.raw }))
    }
}

impl SendHalf for AgentTcp {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for AgentTcp {
    type Event = TcpEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.raw.input(data);
    }

    fn handle_fin(&mut self) {
        self.raw.fin();
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        self.raw.reset(code);
    }

    fn poll_event(&mut self) -> Option<TcpEvent> {
        self.raw.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.raw.stop.take()
    }
}

// === Raw halves ===

/// The sending half of an open TCP stream: raw bytes, then FIN (a half-close) or a reset.
#[derive(Debug)]
pub struct RawSend {
    out: Outbox,
}

impl RawSend {
    /// Bytes of the service's stream, as they are.
    pub fn write(&mut self, data: Bytes) -> Result<(), SendError> {
        self.out.check("bytes")?;
        self.out.raw(data);
        Ok(())
    }

    /// The writer half-closed.
    pub fn finish(&mut self) -> Result<(), SendError> {
        self.out.check("FIN")?;
        self.out.finish();
        Ok(())
    }

    /// The writer failed: reset with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        self.out.reset(code);
    }
}

impl SendHalf for RawSend {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

/// The receiving half of an open TCP stream: raw bytes up to FIN.
#[derive(Debug)]
pub struct RawRecv {
    raw: RawIn,
}

impl RawRecv {
    /// Nothing more will be read (the reader went away): stop with `code`. No event follows.
    pub fn stop(&mut self, code: ErrorCode) {
        self.raw.stop(code);
    }

    /// True once the final event was emitted (or the half was stopped).
    pub fn is_ended(&self) -> bool {
        self.raw.ended
    }
}

impl RecvHalf for RawRecv {
    type Event = TcpEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.raw.input(data);
    }

    fn handle_fin(&mut self) {
        self.raw.fin();
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        self.raw.reset(code);
    }

    fn poll_event(&mut self) -> Option<TcpEvent> {
        self.raw.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.raw.stop.take()
    }
}
