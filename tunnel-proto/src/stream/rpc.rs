//! A relayed gRPC call: the request from the gateway, the response from the agent.
//!
//! ```text
//! gateway ── StreamHeader{Rpc}, Data…, FIN ───────────────────────────► agent
//! gateway ◄── ResponseHead, Data…, Trailers, FIN  |  Trailers, FIN ──── agent
//! ```
//!
//! Both directions flow at once (every gRPC call shape streams), so each side has two halves:
//! the gateway [`open`]s a call as ([`RequestSend`], [`ResponseRecv`]), the agent gets
//! ([`ResponseSend`], [`RequestRecv`]) in [`Accepted::Rpc`](super::Accepted::Rpc). Trailers
//! alone ("trailers-only") answer a call that fails before any response. Cancellation is a
//! reset of the request (`CANCELLED`) and a stop of the response; the gateway may reset after
//! its FIN, since a call can be cancelled until it ends.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Inbox, Outbox, RecvHalf, SendError, SendHalf, StreamFailure, Transmit, unexpected};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::{FrameDecoder, MAX_STREAM_FRAME};
use crate::message::{Message, ResponseHead, StreamHeader, StreamKind, Trailers};

/// The gateway's two halves of a new call: the header is queued on the request half.
pub fn open(header: StreamHeader) -> (RequestSend, ResponseRecv) {
    (RequestSend::new(header), ResponseRecv::new())
}

// === Gateway: RequestSend ===

/// The gateway's request half: the header, the caller's body as `Data` frames, FIN.
#[derive(Debug)]
pub struct RequestSend {
    out: Outbox,
}

impl RequestSend {
    /// Queues `header` (its kind set to [`StreamKind::Rpc`]).
    pub fn new(mut header: StreamHeader) -> RequestSend {
        header.kind = StreamKind::Rpc as i32;
        let mut out = Outbox::default();
        out.frame(&Message::StreamHeader(header));
        RequestSend { out }
    }

    /// Request body bytes, as `Data` frames.
    pub fn data(&mut self, data: Bytes) -> Result<(), SendError> {
        self.out.check("Data")?;
        self.out.data(data);
        Ok(())
    }

    /// The caller's body ended.
    pub fn finish(&mut self) -> Result<(), SendError> {
        self.out.check("FIN")?;
        self.out.finish();
        Ok(())
    }

    /// The call is cancelled (the caller went away, or its deadline passed): reset with
    /// `CANCELLED`, also after [`RequestSend::finish`]. Nothing once reset or stopped.
    pub fn cancel(&mut self) {
        self.out.reset(ErrorCode::CANCELLED);
    }
}

impl SendHalf for RequestSend {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

// === Gateway: ResponseRecv ===

/// What the gateway receives on a call.
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseEvent {
    /// The upstream's response headers; body and trailers follow.
    Head(ResponseHead),
    /// Response body bytes.
    Data(Bytes),
    /// The call's end, with its status: after a head, or alone (trailers-only). Final.
    Trailers(Trailers),
    /// The response broke off (final); see [`StreamFailure`].
    Failed(StreamFailure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseState {
    AwaitingHead,
    Body,
}

impl ResponseState {
    fn name(self) -> &'static str {
        match self {
            ResponseState::AwaitingHead => "awaiting the response head",
            ResponseState::Body => "receiving the response body",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            ResponseState::AwaitingHead => "the response head",
            ResponseState::Body => "the trailers",
        }
    }
}

/// The gateway's response half: `ResponseHead`, `Data`…, `Trailers`; or `Trailers` alone.
#[derive(Debug)]
pub struct ResponseRecv {
    inbox: Inbox,
    state: ResponseState,
    events: VecDeque<ResponseEvent>,
}

impl Default for ResponseRecv {
    fn default() -> Self {
        ResponseRecv::new()
    }
}

impl ResponseRecv {
    /// Awaits the response head (or trailers-only).
    pub fn new() -> ResponseRecv {
        ResponseRecv {
            inbox: Inbox::new(MAX_STREAM_FRAME),
            state: ResponseState::AwaitingHead,
            events: VecDeque::new(),
        }
    }

    /// True once a head arrived.
    pub fn has_head(&self) -> bool {
        self.state == ResponseState::Body
    }

    /// True once the final event was emitted (or the half was cancelled).
    pub fn is_ended(&self) -> bool {
        self.inbox.ended
    }

    /// The caller went away or the deadline passed: stop the response with `CANCELLED`. No
    /// event follows; nothing once the response has ended.
    pub fn cancel(&mut self) {
        if !self.inbox.ended {
            self.inbox.stop(ErrorCode::CANCELLED);
        }
    }

    fn drain(&mut self) {
        while let Some(next) = self.inbox.next() {
            if let Err(e) = next.and_then(|m| self.on_message(m)) {
                self.inbox.stop(e.code());
                self.events
                    .push_back(ResponseEvent::Failed(StreamFailure::Protocol(e)));
            }
        }
    }

    fn on_message(&mut self, msg: Message) -> Result<(), ProtoError> {
        match (self.state, msg) {
            (ResponseState::AwaitingHead, Message::ResponseHead(head)) => {
                self.state = ResponseState::Body;
                self.events.push_back(ResponseEvent::Head(head));
            }
            (ResponseState::Body, Message::Data(b)) => {
                self.events.push_back(ResponseEvent::Data(b));
            }
            (_, Message::Trailers(t)) => {
                self.inbox.end();
                self.events.push_back(ResponseEvent::Trailers(t));
            }
            (state, other) => return Err(unexpected(&other, state.name())),
        }
        Ok(())
    }
}

impl RecvHalf for ResponseRecv {
    type Event = ResponseEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.inbox.push(&data);
        self.drain();
    }

    fn handle_fin(&mut self) {
        if let Some(failure) = self.inbox.fin_failure(self.state.expected()) {
            self.events.push_back(ResponseEvent::Failed(failure));
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            self.events.push_back(ResponseEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<ResponseEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}

// === Agent: RequestRecv ===

/// What the agent receives on a call after its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestEvent {
    /// Request body bytes.
    Data(Bytes),
    /// The request body is complete (final).
    Finished,
    /// The request broke off (final): a reset is the gateway cancelling the call.
    Failed(StreamFailure),
}

/// The agent's request half: `Data`… up to FIN.
#[derive(Debug)]
pub struct RequestRecv {
    inbox: Inbox,
    events: VecDeque<RequestEvent>,
}

impl RequestRecv {
    /// Continues from the header's decoder, which may already hold body frames.
    pub(super) fn continuing(decoder: FrameDecoder) -> RequestRecv {
        let mut r = RequestRecv {
            inbox: Inbox::from_decoder(decoder),
            events: VecDeque::new(),
        };
        r.drain();
        r
    }

    /// True once the final event was emitted.
    pub fn is_ended(&self) -> bool {
        self.inbox.ended
    }

    fn drain(&mut self) {
        while let Some(next) = self.inbox.next() {
            match next {
                Ok(Message::Data(b)) => self.events.push_back(RequestEvent::Data(b)),
                Ok(other) => self.fail(unexpected(&other, "receiving the request body")),
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&mut self, e: ProtoError) {
        self.inbox.stop(e.code());
        self.events
            .push_back(RequestEvent::Failed(StreamFailure::Protocol(e)));
    }
}

impl RecvHalf for RequestRecv {
    type Event = RequestEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.inbox.push(&data);
        self.drain();
    }

    fn handle_fin(&mut self) {
        if self.inbox.ended {
            return;
        }
        self.inbox.end();
        match self.inbox.finish() {
            Ok(()) => self.events.push_back(RequestEvent::Finished),
            Err(e) => self
                .events
                .push_back(RequestEvent::Failed(StreamFailure::Protocol(e))),
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            self.events.push_back(RequestEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<RequestEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}

// === Agent: ResponseSend ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseSendState {
    Ready,
    Streaming,
    Done,
}

/// The agent's response half: `ResponseHead`, `Data`…, `Trailers`, FIN; or `Trailers`, FIN.
#[derive(Debug, Default)]
pub struct ResponseSend {
    out: Outbox,
    headed: bool,
}

impl ResponseSend {
    /// Continues on the stream's send half as the header left it.
    pub(super) fn continuing(out: Outbox) -> ResponseSend {
        ResponseSend { out, headed: false }
    }

    fn state(&self) -> ResponseSendState {
        match (self.out.state, self.headed) {
            (super::SendState::Open, false) => ResponseSendState::Ready,
            (super::SendState::Open, true) => ResponseSendState::Streaming,
            _ => ResponseSendState::Done,
        }
    }

    /// The upstream's response headers; once, before any body.
    pub fn head(&mut self, head: ResponseHead) -> Result<(), SendError> {
        self.out.check("ResponseHead")?;
        if self.state() != ResponseSendState::Ready {
            return Err(SendError::OutOfOrder {
                what: "ResponseHead",
                state: "the head was already sent",
            });
        }
        self.headed = true;
        self.out.frame(&Message::ResponseHead(head));
        Ok(())
    }

    /// Response body bytes, as `Data` frames; only after the head.
    pub fn data(&mut self, data: Bytes) -> Result<(), SendError> {
        self.out.check("Data")?;
        if self.state() != ResponseSendState::Streaming {
            return Err(SendError::OutOfOrder {
                what: "Data",
                state: "no head was sent",
            });
        }
        self.out.data(data);
        Ok(())
    }

    /// The call's end: `Trailers` (after a head, or alone) and FIN.
    pub fn trailers(&mut self, trailers: Trailers) -> Result<(), SendError> {
        self.out.check("Trailers")?;
        self.out.frame(&Message::Trailers(trailers));
        self.out.finish();
        Ok(())
    }

    /// True once the head went out.
    pub fn has_head(&self) -> bool {
        self.headed
    }
}

impl SendHalf for ResponseSend {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}
