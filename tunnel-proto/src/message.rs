//! The versioned messages of the control stream and the header that opens every other stream.
//!
//! Payloads are protobuf (prost derive, no code generation), so later versions can add fields
//! without breaking older peers; the frame type byte says which message a payload is.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::error::ProtoError;
use crate::frame::HEADER_LEN;

/// First message on the control stream, agent → gateway.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// Protocol versions the agent speaks.
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    /// The agent's software version, for display.
    #[prost(string, tag = "2")]
    pub agent_version: String,
    /// Features the agent offers (`relay`, `tcp`, `commands`, ...).
    #[prost(string, repeated, tag = "3")]
    pub capabilities: Vec<String>,
    /// Free-form labels from the agent's config (cluster, region, ...).
    #[prost(btree_map = "string, string", tag = "4")]
    pub labels: BTreeMap<String, String>,
    /// Identifies one agent process (one replica); several may share an agent id.
    #[prost(string, tag = "5")]
    pub instance_id: String,
    /// Sessions this agent process holds to other gateways (replicas) as it sends this `Hello`.
    /// A gateway turning sessions away to keep the replicas balanced never turns away an agent
    /// that holds none: an unbalanced fleet is better than an unreachable agent.
    #[prost(uint32, tag = "6")]
    pub sessions_held: u32,
    /// The replicas ([`Welcome::replica_id`]) this dial must not land on: those the agent holds
    /// a session to already (and keeps), and one that asked it to move. A gateway that is one
    /// of them turns the session away ([`crate::ErrorCode::BUSY`]) before registering it.
    #[prost(string, repeated, tag = "7")]
    pub avoid_replicas: Vec<String>,
    /// The data plane's owner has paused this agent (its kill switch): relayed calls and
    /// streams are refused and command deliveries held. For display; an older gateway ignores
    /// it. Later changes come in [`Heartbeat::paused`].
    #[prost(bool, tag = "8")]
    pub paused: bool,
    /// Why, as the owner wrote it.
    #[prost(string, tag = "9")]
    pub pause_reason: String,
    /// Whether this connection goes through an HTTP CONNECT proxy ([`Proxy`]), for display.
    /// Unset ([`Proxy::Unknown`]) from an older agent.
    #[prost(enumeration = "Proxy", tag = "10")]
    pub proxy: i32,
    /// The agent's allow-listed services: names and what each speaks, never where they are
    /// or their credentials. For display; later changes (a reload) come in
    /// [`Heartbeat::services`]. Empty from an older agent (or one with no service).
    #[prost(message, repeated, tag = "11")]
    pub services: Vec<ServiceEntry>,
    /// How many sessions this agent process keeps in all: one per gateway address when it has
    /// several, else its `connections` (at most one per live replica behind that address: a
    /// gateway reckons with the smaller of this and its live replicas when
    /// [`Hello::gateway_addresses`] is 1). 0 from an older agent: unknown.
    #[prost(uint32, tag = "12")]
    pub sessions_wanted: u32,
    /// How many gateway addresses the agent dials (0 from an older agent).
    #[prost(uint32, tag = "13")]
    pub gateway_addresses: u32,
}

/// How an agent's connection reaches the gateway ([`Hello::proxy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Proxy {
    /// Not said (an older agent).
    Unknown = 0,
    /// Straight to the gateway (every QUIC connection).
    Direct = 1,
    /// Through an HTTP CONNECT proxy (TCP only).
    Http = 2,
}

/// One allow-listed service of an agent ([`Hello::services`]).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ServiceEntry {
    /// Its name (what callers put in `tether-service`).
    #[prost(string, tag = "1")]
    pub name: String,
    /// `grpc` or `tcp`.
    #[prost(string, tag = "2")]
    pub kind: String,
}

/// The gateway's answer to `Hello`: the session is established.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    /// The protocol version chosen for this session.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Session id assigned by the gateway, unique per gateway process.
    #[prost(string, tag = "2")]
    pub session_id: String,
    /// How often the agent must send a heartbeat.
    #[prost(uint64, tag = "3")]
    pub heartbeat_interval_ms: u64,
    /// Largest frame payload either side may send on any stream.
    #[prost(uint32, tag = "4")]
    pub max_frame_size: u32,
    /// How many gateway-opened streams the agent must accept concurrently.
    #[prost(uint32, tag = "5")]
    pub max_concurrent_streams: u32,
    /// Which gateway instance answered, for display.
    #[prost(string, tag = "6")]
    pub gateway_id: String,
    /// How often the gateway probes the session end to end (a `Probe` stream); 0: never. An
    /// agent that sees no probe for much longer replaces the session.
    #[prost(uint64, tag = "7")]
    pub probe_interval_ms: u64,
    /// What the gateway offers on this session beyond the base protocol ([`RENEW`]: it answers
    /// [`RenewRequest`]). An agent sends nothing optional that is not listed: an older gateway
    /// would close the session on a frame type it does not know.
    #[prost(string, repeated, tag = "8")]
    pub capabilities: Vec<String>,
    /// The gateway process that answered, as replicas tell each other apart: with replicas
    /// `<cluster.replica_id>#<epoch>`, else an id of this process. Two sessions naming the same
    /// replica are on the same process; an agent keeping sessions to distinct replicas compares
    /// this. Empty from an older gateway.
    #[prost(string, tag = "9")]
    pub replica_id: String,
    /// Gateway replicas alive and not draining, this one included (1 for a gateway without
    /// replicas): how many distinct replicas an agent can hold sessions to. 0 from an older
    /// gateway (unknown).
    #[prost(uint32, tag = "10")]
    pub live_replicas: u32,
    /// The gateway's wall clock when it sent this, in Unix milliseconds: how far the agent's
    /// clock is off (`tether-agent doctor`). 0 from an older gateway (unknown).
    #[prost(uint64, tag = "11")]
    pub server_time_ms: u64,
}

/// The [`Welcome::capabilities`] entry of a gateway that renews agent certificates.
pub const RENEW: &str = "renew";

/// The capability of leaving a session cleanly, in [`Hello::capabilities`] and
/// [`Welcome::capabilities`]. Both sides listing it agree that:
/// - the agent may send [`GoAway`] on the control stream to say it is leaving the session;
///   from then on it resets every stream it has not accepted yet with
///   [`crate::ErrorCode::REFUSED_STREAM`], nothing of it processed;
/// - the gateway, on that `GoAway`, opens no new stream on the session, and closes it (with
///   [`crate::ErrorCode::REPLACED`]) once the streams it relays on it are done;
/// - so a stream the agent refused, or one opened on a session the gateway closed that way,
///   never reached the upstream, and the gateway sends it again on another session.
pub const LEAVE: &str = "leave";

/// Agent → gateway liveness probe; the gateway answers with [`HeartbeatAck`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    /// Sequence number, echoed in the ack.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The last round-trip time the agent measured, in microseconds (0 = none yet).
    #[prost(uint64, tag = "2")]
    pub last_rtt_us: u64,
    /// The agent is paused by its owner ([`Hello::paused`]); a change is sent at once, in a
    /// heartbeat ahead of its time.
    #[prost(bool, tag = "3")]
    pub paused: bool,
    /// Why.
    #[prost(string, tag = "4")]
    pub pause_reason: String,
    /// The allow-list changed (a reload): [`Heartbeat::services`] is the new list. Sent in
    /// one heartbeat, ahead of its time, after each change; every other heartbeat leaves both
    /// unset, so a heartbeat costs nothing more.
    #[prost(bool, tag = "5")]
    pub services_changed: bool,
    /// The new allow-list when [`Heartbeat::services_changed`] (see [`Hello::services`]).
    #[prost(message, repeated, tag = "6")]
    pub services: Vec<ServiceEntry>,
}

/// Gateway → agent answer to a [`Heartbeat`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatAck {
    /// The sequence number of the heartbeat being answered.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// [`Welcome::live_replicas`] as the gateway knows it now (replicas come and go while a
    /// session lasts); 0: not said.
    #[prost(uint32, tag = "2")]
    pub live_replicas: u32,
}

/// Gateway → agent: this gateway is draining (or has more than its share of sessions); open a
/// new session (make-before-break), on another replica when [`GoAway::avoid_replica`] names
/// this one, and let this one go.
///
/// Agent → gateway, only to a gateway whose `Welcome` lists [`LEAVE`]: this agent is leaving
/// the session (a newer one took over); open no new stream on it (only `reason` is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GoAway {
    /// Why, for logs.
    #[prost(string, tag = "1")]
    pub reason: String,
    /// How long the agent should spread its reconnect over, to avoid a thundering herd.
    #[prost(uint64, tag = "2")]
    pub reconnect_within_ms: u64,
    /// The replica asking ([`Welcome::replica_id`]): the replacement must be on another one; a
    /// replacement that lands on it again is let go and dialed anew. Empty: anywhere.
    #[prost(string, tag = "3")]
    pub avoid_replica: String,
    /// Why, for the agent's metrics and logs ([`GoAwayKind`]).
    #[prost(enumeration = "GoAwayKind", tag = "4")]
    pub kind: i32,
}

impl GoAway {
    /// The kind, or `Unspecified` for a value this build does not know.
    pub fn go_away_kind(&self) -> GoAwayKind {
        GoAwayKind::try_from(self.kind).unwrap_or(GoAwayKind::Unspecified)
    }
}

/// Why a gateway sends [`GoAway`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum GoAwayKind {
    /// Not said (an older gateway).
    Unspecified = 0,
    /// The gateway is shutting down (a rolling upgrade, a scale-in).
    Drain = 1,
    /// The replica holds more than its share of the fleet's sessions (after a scale-out): a
    /// few of its agents are asked to move.
    Rebalance = 2,
}

impl GoAwayKind {
    /// A stable lower-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            GoAwayKind::Unspecified => "unspecified",
            GoAwayKind::Drain => "drain",
            GoAwayKind::Rebalance => "rebalance",
        }
    }
}

/// Either side: the session is ending, with a code and a reason for logs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Close {
    /// An [`crate::ErrorCode`] value.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// Human-readable reason.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// When the gateway refuses a session ([`crate::ErrorCode::BUSY`]): how long the agent
    /// should wait before dialing again, in milliseconds (it adds up to as much again at random,
    /// so a fleet turned away together comes back spread out). 0: not said.
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
}

/// Agent → gateway on the control stream: a certificate signing request (PKCS#10, PEM) for a key
/// the agent has just generated, to renew its certificate before it expires. Only to a gateway
/// whose `Welcome` lists [`RENEW`], and one at a time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewRequest {
    /// Chosen by the agent, echoed in the answer.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The CSR. The gateway signs it only for the identity of the session's certificate.
    #[prost(string, tag = "2")]
    pub csr_pem: String,
}

/// Gateway → agent on the control stream: the answer to the [`RenewRequest`] with the same id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewResponse {
    /// The request's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// A gRPC status code: 0 (OK) when a certificate was issued.
    #[prost(int32, tag = "2")]
    pub code: i32,
    /// Why not, for the agent's log (empty on success).
    #[prost(string, tag = "3")]
    pub message: String,
    /// The new certificate, PEM (empty when refused).
    #[prost(string, tag = "4")]
    pub certificate_pem: String,
    /// The CA bundle of the trust domain (PEM): every CA the gateway trusts for agents, the
    /// new certificate's issuer among them. During a CA rotation it holds the old and the new
    /// CA, and the agent trusts it for the gateway's certificate too.
    #[prost(string, tag = "5")]
    pub ca_pem: String,
}

/// What a gateway-opened stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StreamKind {
    /// Not set: rejected.
    Unspecified = 0,
    /// A relayed gRPC call.
    Rpc = 1,
    /// A raw TCP stream to an allow-listed service.
    Tcp = 2,
    /// A command delivery.
    Command = 3,
    /// An end-to-end liveness probe.
    Probe = 4,
}

/// One metadata entry (gRPC header or trailer) carried in a [`StreamHeader`].
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MetadataEntry {
    /// Lower-case header name.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Raw value bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// First frame of every gateway-opened stream: what the stream is for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamHeader {
    /// What the stream carries.
    #[prost(enumeration = "StreamKind", tag = "1")]
    pub kind: i32,
    /// The agent-side service name (a key of the agent's service map).
    #[prost(string, tag = "2")]
    pub service: String,
    /// The gRPC method path (`/pkg.Service/Method`), or empty for TCP.
    #[prost(string, tag = "3")]
    pub method: String,
    /// Request metadata to forward.
    #[prost(message, repeated, tag = "4")]
    pub metadata: Vec<MetadataEntry>,
    /// Time the caller still allows, in milliseconds (0 = no deadline).
    #[prost(uint64, tag = "5")]
    pub timeout_ms: u64,
    /// W3C trace context (`traceparent`, `tracestate`).
    #[prost(btree_map = "string, string", tag = "6")]
    pub trace_context: BTreeMap<String, String>,
    /// An id for the stream's subject (a command id, for deliveries).
    #[prost(string, tag = "7")]
    pub id: String,
    /// Who the gateway authenticated as the caller of a relayed call or stream
    /// (`mtls:<name>` or `jwt:<subject>`), for the agent's ledger; empty from older gateways
    /// and on command deliveries. The agent records it; it authorizes nothing.
    #[prost(string, tag = "8")]
    pub caller: String,
    /// For a command delivery: which delivery of the command this is (1 for the first);
    /// 0 from older gateways.
    #[prost(uint32, tag = "9")]
    pub attempt: u32,
}

impl StreamHeader {
    /// The stream kind, or `Unspecified` for a value this build does not know.
    pub fn stream_kind(&self) -> StreamKind {
        StreamKind::try_from(self.kind).unwrap_or(StreamKind::Unspecified)
    }
}

/// First frame the agent sends back on a relayed RPC stream: the upstream's response headers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHead {
    /// HTTP status of the upstream response (200 for gRPC).
    #[prost(uint32, tag = "1")]
    pub status: u32,
    /// Response metadata (headers).
    #[prost(message, repeated, tag = "2")]
    pub metadata: Vec<MetadataEntry>,
}

/// Last frame of a relayed RPC stream from the agent: the trailers (`grpc-status`,
/// `grpc-message`, custom ones). Sent alone ("trailers-only") when the call fails before any
/// response, e.g. a service the agent does not allow-list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Trailers {
    /// Trailer entries.
    #[prost(message, repeated, tag = "1")]
    pub metadata: Vec<MetadataEntry>,
}

impl Trailers {
    /// Trailers carrying a gRPC status.
    pub fn status(code: i32, message: &str) -> Trailers {
        let mut metadata = vec![MetadataEntry {
            key: "grpc-status".into(),
            value: code.to_string().into_bytes(),
        }];
        if !message.is_empty() {
            metadata.push(MetadataEntry {
                key: "grpc-message".into(),
                value: percent_encode(message).into_bytes(),
            });
        }
        Trailers { metadata }
    }

    /// The `grpc-status` these trailers carry, if any.
    pub fn grpc_status(&self) -> Option<i32> {
        self.metadata
            .iter()
            .find(|m| m.key == "grpc-status")
            .and_then(|m| std::str::from_utf8(&m.value).ok()?.parse().ok())
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec): everything outside printable
/// ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The agent's answer to a TCP stream header: connected, or why not. Raw bytes follow an `ok`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenResult {
    /// True when the agent connected to the service.
    #[prost(bool, tag = "1")]
    pub ok: bool,
    /// A gRPC status code when not ok.
    #[prost(int32, tag = "2")]
    pub code: i32,
    /// Why not, for the caller.
    #[prost(string, tag = "3")]
    pub message: String,
}

/// Agent → gateway on a `Command` stream: the command arrived and its handler is starting.
///
/// With `awaiting_approval` it arrived but does not run yet: its kind needs the data plane
/// owner's approval (`approvals.kinds` in the agent's config). A plain `CommandAck` follows once
/// it is approved (then progress and the result) or rejected (then a failed result). Sent only
/// to a gateway whose delivery header carries [`COMMAND_APPROVALS_KEY`]; an agent holds the
/// delivery unacknowledged instead with an older gateway.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandAck {
    /// The command waits for the owner's approval in the agent's cluster.
    #[prost(bool, tag = "1")]
    pub awaiting_approval: bool,
}

/// Agent → gateway on a `Command` stream: a progress line the handler reported.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandProgress {
    /// Free text for display, at most [`COMMAND_PROGRESS_LINE_MAX`] bytes.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// Largest progress line, in bytes. A progress line is for a person to read; the gateway keeps
/// the last ones of every command in memory, in every `Watch` event and in its store, so a line
/// is bounded whoever sent it: the agent cuts longer lines before sending them and the gateway
/// cuts again whatever arrives (with [`truncate_text`]).
pub const COMMAND_PROGRESS_LINE_MAX: usize = 1024;

/// Largest `CommandResult.message`, in bytes (cut like progress lines, by both sides).
pub const COMMAND_MESSAGE_MAX: usize = 4096;

/// Metadata key of a `Command` stream's header: the largest output, in bytes (decimal), the
/// gateway keeps. An agent reports a larger output as a failure instead of sending it; a gateway
/// that does not say refuses what is above its own limit anyway.
pub const COMMAND_MAX_OUTPUT_KEY: &str = "tether-max-output";

/// Metadata key of a `Command` stream's header: when the command expires (its TTL), in Unix
/// milliseconds (decimal); absent for a command without a TTL. An agent holding the command for
/// approval forgets it then.
pub const COMMAND_EXPIRES_KEY: &str = "tether-expires-at";

/// Metadata key of a `Command` stream's header, value `1`: the gateway understands a
/// [`CommandAck`] with `awaiting_approval` (the `AWAITING_APPROVAL` state).
pub const COMMAND_APPROVALS_KEY: &str = "tether-approvals";

/// Cuts `text` to at most `max` bytes: its head up to a character boundary, then a marker
/// saying how many bytes were cut (`… [+1234 bytes]`), so a reader sees that the end is missing
/// and where. Text within `max` is left as is. With `max` below the marker's size the head alone
/// is kept.
pub fn truncate_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let marker = |cut: usize| format!(" \u{2026} [+{cut} bytes]");
    // The marker names the bytes cut, which depends on where the cut falls: room is made for
    // the largest possible count (the whole text), which is never shorter than the real one.
    let reserve = marker(text.len()).len();
    let with_marker = max >= reserve;
    let mut end = if with_marker { max - reserve } else { max };
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    if with_marker {
        text.push_str(&marker(cut));
    }
}

/// Agent → gateway on a `Command` stream, last frame: how the command ended. Output larger than
/// one frame travels in `Data` frames before it; the gateway appends `output` to them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandResult {
    /// True when the handler succeeded.
    #[prost(bool, tag = "1")]
    pub succeeded: bool,
    /// The handler's output (or its tail, after `Data` frames).
    #[prost(bytes = "vec", tag = "2")]
    pub output: Vec<u8>,
    /// A message for people: the error when it failed; at most [`COMMAND_MESSAGE_MAX`] bytes.
    #[prost(string, tag = "3")]
    pub message: String,
}

/// Any frame the protocol knows, tagged by its frame type.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`HeartbeatAck`].
    HeartbeatAck(HeartbeatAck),
    /// See [`GoAway`].
    GoAway(GoAway),
    /// See [`Close`].
    Close(Close),
    /// See [`RenewRequest`].
    RenewRequest(RenewRequest),
    /// See [`RenewResponse`].
    RenewResponse(RenewResponse),
    /// See [`StreamHeader`].
    StreamHeader(StreamHeader),
    /// A chunk of body bytes on a relayed stream; the payload is raw, not protobuf.
    Data(Bytes),
    /// See [`ResponseHead`].
    ResponseHead(ResponseHead),
    /// See [`Trailers`].
    Trailers(Trailers),
    /// See [`OpenResult`].
    OpenResult(OpenResult),
    /// See [`CommandAck`].
    CommandAck(CommandAck),
    /// See [`CommandProgress`].
    CommandProgress(CommandProgress),
    /// See [`CommandResult`].
    CommandResult(CommandResult),
}

/// Frame type bytes. Stable on the wire: never renumber.
pub(crate) mod frame_type {
    pub(crate) const HELLO: u8 = 0x01;
    pub(crate) const WELCOME: u8 = 0x02;
    pub(crate) const HEARTBEAT: u8 = 0x03;
    pub(crate) const HEARTBEAT_ACK: u8 = 0x04;
    pub(crate) const GO_AWAY: u8 = 0x05;
    pub(crate) const CLOSE: u8 = 0x06;
    pub(crate) const RENEW_REQUEST: u8 = 0x07;
    pub(crate) const RENEW_RESPONSE: u8 = 0x08;
    pub(crate) const STREAM_HEADER: u8 = 0x10;
    pub(crate) const DATA: u8 = 0x11;
    pub(crate) const RESPONSE_HEAD: u8 = 0x12;
    pub(crate) const TRAILERS: u8 = 0x13;
    pub(crate) const OPEN_RESULT: u8 = 0x14;
    pub(crate) const COMMAND_ACK: u8 = 0x15;
    pub(crate) const COMMAND_PROGRESS: u8 = 0x16;
    pub(crate) const COMMAND_RESULT: u8 = 0x17;
}

impl Message {
    /// The frame type byte this message is sent with.
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Message::Hello(_) => HELLO,
            Message::Welcome(_) => WELCOME,
            Message::Heartbeat(_) => HEARTBEAT,
            Message::HeartbeatAck(_) => HEARTBEAT_ACK,
            Message::GoAway(_) => GO_AWAY,
            Message::Close(_) => CLOSE,
            Message::RenewRequest(_) => RENEW_REQUEST,
            Message::RenewResponse(_) => RENEW_RESPONSE,
            Message::StreamHeader(_) => STREAM_HEADER,
            Message::Data(_) => DATA,
            Message::ResponseHead(_) => RESPONSE_HEAD,
            Message::Trailers(_) => TRAILERS,
            Message::OpenResult(_) => OPEN_RESULT,
            Message::CommandAck(_) => COMMAND_ACK,
            Message::CommandProgress(_) => COMMAND_PROGRESS,
            Message::CommandResult(_) => COMMAND_RESULT,
        }
    }

    /// True for the frame types this version knows.
    pub fn is_known_type(ty: u8) -> bool {
        use frame_type::*;
        matches!(
            ty,
            HELLO
                | WELCOME
                | HEARTBEAT
                | HEARTBEAT_ACK
                | GO_AWAY
                | CLOSE
                | RENEW_REQUEST
                | RENEW_RESPONSE
                | STREAM_HEADER
                | DATA
                | RESPONSE_HEAD
                | TRAILERS
                | OPEN_RESULT
                | COMMAND_ACK
                | COMMAND_PROGRESS
                | COMMAND_RESULT
        )
    }

    /// A short name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Heartbeat(_) => "Heartbeat",
            Message::HeartbeatAck(_) => "HeartbeatAck",
            Message::GoAway(_) => "GoAway",
            Message::Close(_) => "Close",
            Message::RenewRequest(_) => "RenewRequest",
            Message::RenewResponse(_) => "RenewResponse",
            Message::StreamHeader(_) => "StreamHeader",
            Message::Data(_) => "Data",
            Message::ResponseHead(_) => "ResponseHead",
            Message::Trailers(_) => "Trailers",
            Message::OpenResult(_) => "OpenResult",
            Message::CommandAck(_) => "CommandAck",
            Message::CommandProgress(_) => "CommandProgress",
            Message::CommandResult(_) => "CommandResult",
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Message::Hello(m) => m.encoded_len(),
            Message::Welcome(m) => m.encoded_len(),
            Message::Heartbeat(m) => m.encoded_len(),
            Message::HeartbeatAck(m) => m.encoded_len(),
            Message::GoAway(m) => m.encoded_len(),
            Message::Close(m) => m.encoded_len(),
            Message::RenewRequest(m) => m.encoded_len(),
            Message::RenewResponse(m) => m.encoded_len(),
            Message::StreamHeader(m) => m.encoded_len(),
            Message::Data(b) => b.len(),
            Message::ResponseHead(m) => m.encoded_len(),
            Message::Trailers(m) => m.encoded_len(),
            Message::OpenResult(m) => m.encoded_len(),
            Message::CommandAck(m) => m.encoded_len(),
            Message::CommandProgress(m) => m.encoded_len(),
            Message::CommandResult(m) => m.encoded_len(),
        }
    }

    /// Length of the whole frame (header and payload).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Appends this message as one frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let len = self.payload_len();
        dst.reserve(HEADER_LEN + len);
        dst.put_u8(self.frame_type());
        // Payloads are far below 4 GiB: every sender enforces `Limits` before it gets here.
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        // Encoding into a BytesMut cannot fail: it grows as needed.
        let res = match self {
            Message::Hello(m) => m.encode(dst),
            Message::Welcome(m) => m.encode(dst),
            Message::Heartbeat(m) => m.encode(dst),
            Message::HeartbeatAck(m) => m.encode(dst),
            Message::GoAway(m) => m.encode(dst),
            Message::Close(m) => m.encode(dst),
            Message::RenewRequest(m) => m.encode(dst),
            Message::RenewResponse(m) => m.encode(dst),
            Message::StreamHeader(m) => m.encode(dst),
            Message::Data(b) => {
                dst.extend_from_slice(b);
                Ok(())
            }
            Message::ResponseHead(m) => m.encode(dst),
            Message::Trailers(m) => m.encode(dst),
            Message::OpenResult(m) => m.encode(dst),
            Message::CommandAck(m) => m.encode(dst),
            Message::CommandProgress(m) => m.encode(dst),
            Message::CommandResult(m) => m.encode(dst),
        };
        debug_assert!(res.is_ok());
    }

    /// Encodes this message as one frame into a fresh buffer.
    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }

    /// Decodes a payload of the given frame type. `Data` keeps the payload without copying.
    pub fn decode(ty: u8, payload: Bytes) -> Result<Message, ProtoError> {
        use frame_type::*;
        fn de<M: prost::Message + Default>(kind: &'static str, p: &[u8]) -> Result<M, ProtoError> {
            M::decode(p).map_err(|e| ProtoError::Malformed {
                kind,
                detail: e.to_string(),
            })
        }
        let p = &payload[..];
        Ok(match ty {
            HELLO => Message::Hello(de("Hello", p)?),
            WELCOME => Message::Welcome(de("Welcome", p)?),
            HEARTBEAT => Message::Heartbeat(de("Heartbeat", p)?),
            HEARTBEAT_ACK => Message::HeartbeatAck(de("HeartbeatAck", p)?),
            GO_AWAY => Message::GoAway(de("GoAway", p)?),
            CLOSE => Message::Close(de("Close", p)?),
            RENEW_REQUEST => Message::RenewRequest(de("RenewRequest", p)?),
            RENEW_RESPONSE => Message::RenewResponse(de("RenewResponse", p)?),
            STREAM_HEADER => Message::StreamHeader(de("StreamHeader", p)?),
            DATA => Message::Data(payload),
            RESPONSE_HEAD => Message::ResponseHead(de("ResponseHead", p)?),
            TRAILERS => Message::Trailers(de("Trailers", p)?),
            OPEN_RESULT => Message::OpenResult(de("OpenResult", p)?),
            COMMAND_ACK => Message::CommandAck(de("CommandAck", p)?),
            COMMAND_PROGRESS => Message::CommandProgress(de("CommandProgress", p)?),
            COMMAND_RESULT => Message::CommandResult(de("CommandResult", p)?),
            other => return Err(ProtoError::UnknownFrameType(other)),
        })
    }
}
