//! The gateway's end-to-end probe of a session: a stream that does nothing but come back.
//!
//! ```text
//! gateway ── StreamHeader{Probe}, FIN ──► agent
//! gateway ◄── OpenResult{ok}, FIN ─────── agent
//! ```
//!
//! The connection can look alive (heartbeats on the control stream) while its streams do not
//! work; an answered probe shows they do. The agent's side is in [`Incoming`](super::Incoming),
//! which answers a probe as soon as its header is read.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Inbox, Outbox, RecvHalf, SendHalf, StreamFailure, Transmit, unexpected};
use crate::error::ErrorCode;
use crate::message::{Message, StreamHeader, StreamKind};

/// Largest frame a probe's answer may be: an `OpenResult` is a few bytes.
pub const MAX_ANSWER_FRAME: usize = 1024;

/// What the gateway learns from a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The agent answered: streams work end to end (final).
    Answered,
    /// No proper answer (final). An `OpenResult` that is not `ok` counts as an unexpected
    /// frame.
    Failed(StreamFailure),
}

/// One probe, gateway side: the header and FIN out, the answer in.
#[derive(Debug)]
pub struct GatewayProbe {
    out: Outbox,
    inbox: Inbox,
    events: VecDeque<ProbeEvent>,
}

impl Default for GatewayProbe {
    fn default() -> Self {
        GatewayProbe::new()
    }
}

impl GatewayProbe {
    /// Queues the probe's header and FIN.
    pub fn new() -> GatewayProbe {
        let mut out = Outbox::default();
        out.frame(&Message::StreamHeader(StreamHeader {
            kind: StreamKind::Probe as i32,
            ..Default::default()
        }));
        out.finish();
        GatewayProbe {
            out,
            inbox: Inbox::new(MAX_ANSWER_FRAME),
            events: VecDeque::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(next) = self.inbox.next() {
            match next {
                Ok(Message::OpenResult(r)) if r.ok => {
                    self.inbox.end();
                    self.events.push_back(ProbeEvent::Answered);
                }
                Ok(other) => self.fail(unexpected(&other, "awaiting the probe's answer")),
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&mut self, e: crate::ProtoError) {
        self.inbox.stop(e.code());
        self.events
            .push_back(ProbeEvent::Failed(StreamFailure::Protocol(e)));
    }
}

impl SendHalf for GatewayProbe {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for GatewayProbe {
    type Event = ProbeEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.inbox.push(&data);
        self.drain();
    }

    fn handle_fin(&mut self) {
        if let Some(failure) = self.inbox.fin_failure("an answer") {
            self.events.push_back(ProbeEvent::Failed(failure));
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            self.events.push_back(ProbeEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<ProbeEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}
