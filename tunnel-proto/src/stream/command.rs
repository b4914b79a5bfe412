//! A command delivery: the command to the agent, its report back.
//!
//! ```text
//! gateway ── StreamHeader{Command, id, service = kind, metadata}, Data… (payload), FIN ──► agent
//! gateway ◄── CommandAck, (CommandProgress | Data)…, CommandResult, FIN ──────────────── agent
//! gateway ◄── Trailers, FIN   (an agent that does not run commands) ──────────────────── agent
//! ```
//!
//! The gateway sends everything at once and then reads; the agent reads the whole payload (up
//! to FIN) and then reports, so each side is one machine: [`GatewayCommand`] and
//! [`AgentCommand`] (from [`Accepted::Command`](super::Accepted::Command)).
//!
//! Limits, applied by whoever receives: the payload (the agent's [`MAX_PAYLOAD`] unless set
//! otherwise), the output (`Data` frames and the result's inline `output` together; the limit
//! the gateway states in the header's [`COMMAND_MAX_OUTPUT_KEY`] entry), progress lines
//! ([`COMMAND_PROGRESS_LINE_MAX`]) and the result's message ([`COMMAND_MESSAGE_MAX`]), cut with
//! a marker. The agent applies the same caps to what it sends, so a well-behaved report is
//! never cut or refused: an output above the gateway's limit is reported as a failure instead.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Inbox, Outbox, RecvHalf, SendError, SendHalf, StreamFailure, Transmit, unexpected};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::{FrameDecoder, MAX_STREAM_FRAME};
use crate::message::{
    COMMAND_APPROVALS_KEY, COMMAND_EXPIRES_KEY, COMMAND_MAX_OUTPUT_KEY, COMMAND_MESSAGE_MAX,
    COMMAND_PROGRESS_LINE_MAX, CommandAck, CommandProgress, CommandResult, Message, MetadataEntry,
    StreamHeader, StreamKind, truncate_text,
};

/// Largest payload an agent takes by default.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// An output up to this size travels inside `CommandResult`; a larger one in `Data` frames
/// before it.
pub const INLINE_OUTPUT: usize = 32 << 10;

// === Gateway ===

/// What the gateway receives on a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportEvent {
    /// The command arrived whole and its handler is starting.
    Acked,
    /// The command arrived whole and waits for the data plane owner's approval; `Acked`
    /// follows when it is approved, `Acked` and a failed `Finished` when it is rejected.
    AwaitingApproval,
    /// A progress line (cut to [`COMMAND_PROGRESS_LINE_MAX`]).
    Progress(String),
    /// The first bytes of a streamed output arrived (the machine keeps them, and the rest):
    /// the gateway may wait for room to buffer an output before reading on.
    OutputStarted,
    /// How the command ended (final).
    Finished {
        /// True when the handler succeeded.
        succeeded: bool,
        /// The whole output: the `Data` frames, then the result's own bytes.
        output: Vec<u8>,
        /// For people (cut to [`COMMAND_MESSAGE_MAX`]).
        message: String,
    },
    /// The agent sent more output than the gateway's limit (final). When it came in `Data`
    /// frames the stream was stopped (`FRAME_TOO_LARGE`); nothing of the output is kept.
    OutputTooLarge {
        /// The limit.
        max: u64,
    },
    /// The agent answered with trailers: it does not run commands (final).
    Unsupported,
    /// The report broke off before the result (final): the delivery failed.
    Failed(StreamFailure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReportState {
    AwaitingAck,
    Running,
}

/// The gateway's delivery of one command: sends it whole, then reads the agent's report.
#[derive(Debug)]
pub struct GatewayCommand {
    out: Outbox,
    inbox: Inbox,
    state: ReportState,
    output: Vec<u8>,
    max_output: u64,
    events: VecDeque<ReportEvent>,
}

impl GatewayCommand {
    /// Queues the delivery of command `id` of `kind` with its `payload` (`content_type` for
    /// its handler), then FIN. `max_output`: the largest output this gateway keeps, told to
    /// the agent in the header.
    pub fn new(
        id: String,
        kind: String,
        content_type: String,
        payload: Bytes,
        max_output: u64,
    ) -> GatewayCommand {
        GatewayCommand::delivery(
            id,
            kind,
            content_type,
            payload,
            max_output,
            0,
            &Default::default(),
            None,
        )
    }

    /// [`GatewayCommand::new`] saying which delivery of the command this is
    /// ([`StreamHeader::attempt`], 1 for the first), with the Submit call's trace context
    /// (`traceparent`, `tracestate`) in the header's metadata, for the agent's span to link to,
    /// and its expiry (`expires_unix_ms`, [`COMMAND_EXPIRES_KEY`]) when it has a TTL. The
    /// header also says this gateway understands an approval wait ([`COMMAND_APPROVALS_KEY`]).
    #[allow(clippy::too_many_arguments)]
    pub fn delivery(
        id: String,
        kind: String,
        content_type: String,
        payload: Bytes,
        max_output: u64,
        attempt: u32,
        trace_context: &std::collections::BTreeMap<String, String>,
        expires_unix_ms: Option<u64>,
    ) -> GatewayCommand {
        let mut header = StreamHeader {
            attempt,
            kind: StreamKind::Command as i32,
            service: kind,
            id,
            metadata: vec![
                MetadataEntry {
                    key: "content-type".into(),
                    value: content_type.into_bytes(),
                },
                MetadataEntry {
                    key: COMMAND_MAX_OUTPUT_KEY.into(),
                    value: max_output.to_string().into_bytes(),
                },
                MetadataEntry {
                    key: COMMAND_APPROVALS_KEY.into(),
                    value: b"1".to_vec(),
                },
            ],
            ..Default::default()
        };
        if let Some(ms) = expires_unix_ms {
            header.metadata.push(MetadataEntry {
                key: COMMAND_EXPIRES_KEY.into(),
                value: ms.to_string().into_bytes(),
            });
        }
        header.metadata.extend(
            trace_context
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), "traceparent" | "tracestate"))
                .map(|(k, v)| MetadataEntry {
                    key: k.clone(),
                    value: v.clone().into_bytes(),
                }),
        );
        let mut out = Outbox::default();
        out.frame(&Message::StreamHeader(header));
        out.data(payload);
        out.finish();
        GatewayCommand {
            out,
            inbox: Inbox::new(MAX_STREAM_FRAME),
            state: ReportState::AwaitingAck,
            output: Vec::new(),
            max_output,
            events: VecDeque::new(),
        }
    }

    /// True once the final event was emitted.
    pub fn is_ended(&self) -> bool {
        self.inbox.ended
    }

    fn drain(&mut self) {
        while let Some(next) = self.inbox.next() {
            if let Err(e) = next.and_then(|m| self.on_message(m)) {
                self.inbox.stop(e.code());
                self.events
                    .push_back(ReportEvent::Failed(StreamFailure::Protocol(e)));
            }
        }
    }

    fn above_limit(&self, more: usize) -> bool {
        (self.output.len() + more) as u64 > self.max_output
    }

    fn on_message(&mut self, msg: Message) -> Result<(), ProtoError> {
        match (self.state, msg) {
            (ReportState::AwaitingAck, Message::CommandAck(a)) if a.awaiting_approval => {
                self.events.push_back(ReportEvent::AwaitingApproval);
            }
            (ReportState::AwaitingAck, Message::CommandAck(_)) => {
                self.state = ReportState::Running;
                self.events.push_back(ReportEvent::Acked);
            }
            (ReportState::AwaitingAck, Message::Trailers(_)) => {
                self.inbox.end();
                self.events.push_back(ReportEvent::Unsupported);
            }
            (ReportState::Running, Message::CommandProgress(p)) => {
                let mut line = p.message;
                truncate_text(&mut line, COMMAND_PROGRESS_LINE_MAX);
                self.events.push_back(ReportEvent::Progress(line));
            }
            (ReportState::Running, Message::Data(b)) => {
                if self.above_limit(b.len()) {
                    // More would come: tell the agent to stop sending it.
                    self.output = Vec::new();
                    self.inbox.stop(ErrorCode::FRAME_TOO_LARGE);
                    self.events.push_back(ReportEvent::OutputTooLarge {
                        max: self.max_output,
                    });
                    return Ok(());
                }
                if self.output.is_empty() && !b.is_empty() {
                    self.events.push_back(ReportEvent::OutputStarted);
                }
                self.output.extend_from_slice(&b);
            }
            (ReportState::Running, Message::CommandResult(r)) => {
                self.inbox.end();
                if self.above_limit(r.output.len()) {
                    self.output = Vec::new();
                    self.events.push_back(ReportEvent::OutputTooLarge {
                        max: self.max_output,
                    });
                    return Ok(());
                }
                let mut output = std::mem::take(&mut self.output);
                output.extend_from_slice(&r.output);
                let mut message = r.message;
                truncate_text(&mut message, COMMAND_MESSAGE_MAX);
                self.events.push_back(ReportEvent::Finished {
                    succeeded: r.succeeded,
                    output,
                    message,
                });
            }
            (state, other) => {
                return Err(unexpected(
                    &other,
                    match state {
                        ReportState::AwaitingAck => "awaiting the CommandAck",
                        ReportState::Running => "awaiting the CommandResult",
                    },
                ));
            }
        }
        Ok(())
    }
}

impl SendHalf for GatewayCommand {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for GatewayCommand {
    type Event = ReportEvent;

    fn handle_input(&mut self, data: Bytes) {
        self.inbox.push(&data);
        self.drain();
    }

    fn handle_fin(&mut self) {
        if let Some(failure) = self.inbox.fin_failure("the CommandResult") {
            self.events.push_back(ReportEvent::Failed(failure));
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            self.events.push_back(ReportEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<ReportEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}

// === Agent ===

/// What the agent receives on a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadEvent {
    /// The whole payload (final): acknowledge it with [`AgentCommand::ack`] and run it.
    Payload(Bytes),
    /// The delivery broke off before FIN (final); the stream was reset. The gateway
    /// redelivers.
    Failed(StreamFailure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentState {
    Receiving,
    Received,
    Acked,
}

/// How [`AgentCommand::result`] sent the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSent {
    /// Inside the `CommandResult` (at most [`INLINE_OUTPUT`] bytes).
    Inline,
    /// In `Data` frames before the `CommandResult`.
    Streamed,
    /// Not at all: it is above the gateway's limit, and the result says so as a failure.
    AboveLimit {
        /// The output's size.
        len: usize,
        /// The gateway's limit.
        max: usize,
    },
}

/// The agent's side of a delivery: the payload in, then `CommandAck`, progress and the result
/// out.
#[derive(Debug)]
pub struct AgentCommand {
    header: StreamHeader,
    max_output: Option<usize>,
    max_payload: usize,
    inbox: Inbox,
    payload: Vec<u8>,
    state: AgentState,
    out: Outbox,
    events: VecDeque<PayloadEvent>,
}

impl AgentCommand {
    /// Continues from the header's decoder, which may already hold payload frames.
    pub(super) fn continuing(
        header: StreamHeader,
        decoder: FrameDecoder,
        max_payload: usize,
        out: Outbox,
    ) -> AgentCommand {
        // A gateway that does not say has its own limit, and refuses what is above it.
        let max_output = header
            .metadata
            .iter()
            .find(|m| m.key == COMMAND_MAX_OUTPUT_KEY)
            .and_then(|m| std::str::from_utf8(&m.value).ok()?.parse::<usize>().ok());
        let mut c = AgentCommand {
            header,
            max_output,
            max_payload,
            inbox: Inbox::from_decoder(decoder),
            payload: Vec::new(),
            state: AgentState::Receiving,
            out,
            events: VecDeque::new(),
        };
        c.drain();
        c
    }

    /// The command's id.
    pub fn id(&self) -> &str {
        &self.header.id
    }

    /// The trace context the command was submitted under (`traceparent`, `tracestate` from
    /// the header's metadata; empty from a gateway that sent none).
    pub fn trace_context(&self) -> std::collections::BTreeMap<String, String> {
        self.header
            .metadata
            .iter()
            .filter(|m| matches!(m.key.as_str(), "traceparent" | "tracestate"))
            .filter_map(|m| Some((m.key.clone(), String::from_utf8(m.value.clone()).ok()?)))
            .collect()
    }

    /// The command's kind (which handler runs it).
    pub fn kind(&self) -> &str {
        &self.header.service
    }

    /// The delivery's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The largest output the gateway keeps, when it said.
    pub fn max_output(&self) -> Option<usize> {
        self.max_output
    }

    fn metadata(&self, key: &str) -> Option<&[u8]> {
        self.header
            .metadata
            .iter()
            .find(|m| m.key == key)
            .map(|m| m.value.as_slice())
    }

    /// When the command expires (Unix milliseconds), when the gateway said.
    pub fn expires_unix_ms(&self) -> Option<u64> {
        std::str::from_utf8(self.metadata(COMMAND_EXPIRES_KEY)?)
            .ok()?
            .parse()
            .ok()
    }

    /// True when the gateway understands [`AgentCommand::awaiting_approval`].
    pub fn gateway_takes_approvals(&self) -> bool {
        self.metadata(COMMAND_APPROVALS_KEY) == Some(b"1")
    }

    fn drain(&mut self) {
        while let Some(next) = self.inbox.next() {
            match next {
                Ok(Message::Data(b)) => {
                    let len = self.payload.len() + b.len();
                    if len > self.max_payload {
                        self.fail(ProtoError::TooLarge {
                            what: "command payload",
                            len,
                            max: self.max_payload,
                        });
                    } else {
                        self.payload.extend_from_slice(&b);
                    }
                }
                Ok(other) => self.fail(unexpected(&other, "receiving the command payload")),
                Err(e) => self.fail(e),
            }
        }
    }

    /// Nothing more is read or written.
    fn fail(&mut self, e: ProtoError) {
        self.inbox.stop(e.code());
        self.out.reset(e.code());
        self.payload = Vec::new();
        self.events
            .push_back(PayloadEvent::Failed(StreamFailure::Protocol(e)));
    }

    fn expect(&self, what: &'static str, state: AgentState) -> Result<(), SendError> {
        self.out.check(what)?;
        if self.state == state {
            return Ok(());
        }
        Err(SendError::OutOfOrder {
            what,
            state: match self.state {
                AgentState::Receiving => "the payload is still arriving",
                AgentState::Received => "the command is not acknowledged",
                AgentState::Acked => "the command was already acknowledged",
            },
        })
    }

    /// The handler is starting: `CommandAck`. Once, after the payload.
    pub fn ack(&mut self) -> Result<(), SendError> {
        self.expect("CommandAck", AgentState::Received)?;
        self.state = AgentState::Acked;
        self.out.frame(&Message::CommandAck(CommandAck::default()));
        Ok(())
    }

    /// The command waits for the owner's approval: `CommandAck` with `awaiting_approval`,
    /// after the payload and before [`AgentCommand::ack`] (again on a redelivery).
    pub fn awaiting_approval(&mut self) -> Result<(), SendError> {
        self.expect("CommandAck", AgentState::Received)?;
        self.out.frame(&Message::CommandAck(CommandAck {
            awaiting_approval: true,
        }));
        Ok(())
    }

    /// A progress line, cut to [`COMMAND_PROGRESS_LINE_MAX`]; after the ack.
    pub fn progress(&mut self, mut line: String) -> Result<(), SendError> {
        self.expect("CommandProgress", AgentState::Acked)?;
        truncate_text(&mut line, COMMAND_PROGRESS_LINE_MAX);
        self.out
            .frame(&Message::CommandProgress(CommandProgress { message: line }));
        Ok(())
    }

    /// How the command ended: the output (inline, streamed in `Data` frames, or, above the
    /// gateway's limit, not at all and the command reported failed), the `CommandResult` with
    /// `message` cut to [`COMMAND_MESSAGE_MAX`], and FIN. After the ack.
    pub fn result(
        &mut self,
        succeeded: bool,
        output: Bytes,
        mut message: String,
    ) -> Result<OutputSent, SendError> {
        self.expect("CommandResult", AgentState::Acked)?;
        truncate_text(&mut message, COMMAND_MESSAGE_MAX);
        let mut result = CommandResult {
            succeeded,
            output: Vec::new(),
            message,
        };
        let sent = match self.max_output {
            Some(max) if output.len() > max => {
                result.succeeded = false;
                result.message = format!(
                    "the handler's output is {} bytes, above the gateway's limit of {max} bytes (commands.max_output)",
                    output.len()
                );
                OutputSent::AboveLimit {
                    len: output.len(),
                    max,
                }
            }
            _ if output.len() <= INLINE_OUTPUT => {
                result.output = output.to_vec();
                OutputSent::Inline
            }
            _ => {
                self.out.data(output);
                OutputSent::Streamed
            }
        };
        self.out.frame(&Message::CommandResult(result));
        self.out.finish();
        Ok(sent)
    }
}

impl SendHalf for AgentCommand {
    fn handle_stopped(&mut self, code: ErrorCode) {
        self.out.stopped(code);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll()
    }
}

impl RecvHalf for AgentCommand {
    type Event = PayloadEvent;

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
            Ok(()) => {
                self.state = AgentState::Received;
                let payload = Bytes::from(std::mem::take(&mut self.payload));
                self.events.push_back(PayloadEvent::Payload(payload));
            }
            Err(e) => {
                self.out.reset(e.code());
                self.payload = Vec::new();
                self.events
                    .push_back(PayloadEvent::Failed(StreamFailure::Protocol(e)));
            }
        }
    }

    fn handle_reset(&mut self, code: ErrorCode) {
        if let Some(failure) = self.inbox.reset_failure(code) {
            // The gateway gave up on this delivery: so does the agent.
            self.out.reset(ErrorCode::CANCELLED);
            self.payload = Vec::new();
            self.events.push_back(PayloadEvent::Failed(failure));
        }
    }

    fn poll_event(&mut self) -> Option<PayloadEvent> {
        self.events.pop_front()
    }

    fn poll_stop(&mut self) -> Option<ErrorCode> {
        self.inbox.poll_stop()
    }
}
