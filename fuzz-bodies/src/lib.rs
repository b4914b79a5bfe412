//! The bodies of Tether's fuzz targets, one function per target, each taking the peer's bytes.
//!
//! Two callers run the same code: the cargo-fuzz targets in `fuzz/fuzz_targets/` (nightly,
//! libFuzzer, coverage-guided; `cargo +nightly fuzz run <target>`) and the stable smoke test in
//! `tests/smoke.rs`, which runs every body over the seed corpus (`fuzz/corpus/<target>/`), every
//! crash or regression input kept in `fuzz/artifacts/<target>/`, and a few thousand
//! deterministic mutations of them. A body panics (an `assert!`, or a bug in the decoder) when
//! something is wrong, and returns when the input was handled, accepted or refused.
//!
//! See docs/FUZZING.md for what each target covers, how to run it, and the figures of the last
//! runs.
//!
//! # Layout
//! - [`TARGETS`]: every target's name and body; [`Outcome`]: what a body made of its input;
//! - framing and the control stream: [`frame_decoder`], [`gateway_session`], [`agent_session`],
//!   [`control_message`];
//! - relay streams: [`stream_header`];
//! - the stream machines (`tunnel_proto::stream`), each fed the peer's bytes: the agent's side
//!   of any gateway-opened stream ([`agent_stream`]), the gateway's side of a relayed call
//!   ([`rpc_response`]), a TCP stream ([`tcp_answer`]), a command delivery ([`command_report`])
//!   and a probe ([`probe_answer`]);
//! - enrollment and renewal: [`csr_check`], [`enroll_request`] (a gateway's enrollment with a
//!   temporary CA and identity store, made once per process);
//! - the relay's metadata, which feeds its metrics labels: [`relay_metadata`];
//! - northbound authentication: [`bearer_token`] (a gateway's authenticator with [`JWKS`]);
//! - the links between gateway replicas: [`peer_frame`].
//!
//! The seeds are written by `examples/gen_corpus.rs`; `fixtures/` holds the JWKS and its private
//! key (a test key, used for nothing else).
#![warn(missing_docs)]

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use rustls_pki_types::pem::PemObject;
use tether_gateway::GatewayConfig;
use tether_gateway::identity::csr::check_csr;
use tether_gateway::identity::db::IdentityDb;
use tether_gateway::identity::enrollment::Enrollment;
use tether_gateway::northbound::auth::{Authenticator, CallerKind, TenantScope};
use tunnel_proto::frame::{FrameDecoder, MAX_DATA_FRAME, decode_frame};
use tunnel_proto::message::{Hello, Message, RenewResponse, StreamKind, Welcome};
use tunnel_proto::session::{
    AgentEvent, AgentSession, AgentSessionConfig, GatewayEvent, GatewaySession,
    GatewaySessionConfig,
};
use tunnel_proto::stream::command::{GatewayCommand, PayloadEvent, ReportEvent};
use tunnel_proto::stream::probe::{GatewayProbe, ProbeEvent};
use tunnel_proto::stream::rpc::{RequestEvent, ResponseEvent, ResponseRecv};
use tunnel_proto::stream::tcp::{GatewayTcp, TcpEvent};
use tunnel_proto::stream::{Accepted, Incoming, IncomingEvent, RecvHalf, SendHalf, Transmit};

/// What a body made of its input, so tests can tell seeds that reach the checks behind the
/// decoders from seeds refused at the door. libFuzzer ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Refused (or incomplete) somewhere, as it should be for most inputs.
    Refused,
    /// Got through: a message decoded, a session established, a CSR accepted, a certificate
    /// issued, a caller authenticated (see each body).
    Accepted,
}

impl From<bool> for Outcome {
    fn from(b: bool) -> Outcome {
        if b {
            Outcome::Accepted
        } else {
            Outcome::Refused
        }
    }
}

/// A target's body.
pub type Body = fn(&[u8]) -> Outcome;

/// Every target: its name (the directory of its corpus and artifacts) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("frame_decoder", frame_decoder),
    ("gateway_session", gateway_session),
    ("agent_session", agent_session),
    ("control_message", control_message),
    ("stream_header", stream_header),
    ("csr_check", csr_check),
    ("enroll_request", enroll_request),
    ("bearer_token", bearer_token),
    ("relay_metadata", relay_metadata),
    ("agent_stream", agent_stream),
    ("rpc_response", rpc_response),
    ("tcp_answer", tcp_answer),
    ("command_report", command_report),
    ("probe_answer", probe_answer),
    ("peer_frame", peer_frame),
];

/// The identity the CSR targets check requests against (and enrollment tokens are for).
pub const IDENTITY: &str = "spiffe://fuzz.test/tenant/acme/agent/a";

/// A token the `enroll_request` body replaces with the current pending token, so the fuzzer can
/// reach the CSR checks behind the token check.
pub const TOKEN_PLACEHOLDER: &str = "tet1_FUZZ";

/// Issuer, audience and tenant claim of the `bearer_token` gateway.
pub const JWT_ISSUER: &str = "https://idp.fuzz.test/";
/// See [`JWT_ISSUER`].
pub const JWT_AUDIENCE: &str = "tether";

/// The JWKS of the `bearer_token` gateway (one ES256 key, kid `fuzz-1`).
pub const JWKS: &str = include_str!("../fixtures/jwks.json");

// === Framing and the control stream ===

/// Any bytes, split anywhere, through the frame decoder: no panic, no unbounded buffering, and
/// whatever decodes re-encodes to the same message.
pub fn frame_decoder(data: &[u8]) -> Outcome {
    let max = 4096;
    let _ = decode_frame(data, max);
    let mut decoded = false;
    // The first byte picks a split size, so partial frames are exercised too.
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s).max(1), r),
        None => return Outcome::Refused,
    };
    let mut dec = FrameDecoder::new(max);
    for chunk in rest.chunks(split) {
        dec.push(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => {
                    let again = decode_frame(&msg.to_bytes(), usize::MAX)
                        .expect("a re-encoded message decodes")
                        .expect("a re-encoded message is a whole frame")
                        .0;
                    assert_eq!(again, msg);
                    decoded = true;
                }
                Ok(None) => break,
                Err(_) => return decoded.into(),
            }
        }
        assert!(
            dec.buffered() <= max + 5 + split,
            "buffered beyond one frame plus one read"
        );
    }
    decoded.into()
}

/// Any bytes from an agent into the gateway's session state machine, 7 bytes at a time with
/// 300 ms between reads, on a gateway that renews certificates (each renewal it lets through is
/// answered, as the tunnel does): no panic, at most one renewal handed out per
/// `renew_min_interval`, and the session always ends.
pub fn gateway_session(data: &[u8]) -> Outcome {
    let start = Instant::now();
    let mut cfg = GatewaySessionConfig::new("fuzz".into());
    cfg.capabilities = vec![tunnel_proto::message::RENEW.into()];
    let min_interval = cfg.renew_min_interval;
    let mut s = GatewaySession::new(cfg, start);
    let mut established = false;
    let mut last_renewal: Option<Instant> = None;
    for (i, chunk) in data.chunks(7).enumerate() {
        let now = start + Duration::from_millis(i as u64 * 300);
        s.handle_input(chunk, now);
        s.handle_timeout(now);
        while s.poll_transmit().is_some() {}
        while let Some(e) = s.poll_event() {
            match e {
                GatewayEvent::Established { .. } => established = true,
                GatewayEvent::RenewRequested(req) => {
                    assert!(
                        last_renewal.is_none_or(|t| now >= t + min_interval),
                        "two renewals handed out within renew_min_interval"
                    );
                    last_renewal = Some(now);
                    s.renew_response(RenewResponse {
                        id: req.id,
                        code: 7,
                        message: "fuzz".into(),
                        ..Default::default()
                    });
                }
                _ => {}
            }
        }
    }
    s.handle_eof(start + Duration::from_secs(3600));
    while s.poll_event().is_some() {}
    assert!(s.is_closed());
    established.into()
}

fn agent(start: Instant) -> AgentSession {
    let hello = Hello {
        versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
        agent_version: "fuzz".into(),
        ..Default::default()
    };
    AgentSession::new(AgentSessionConfig::new(hello), start)
}

/// Any bytes from a gateway into the agent's session state machine (Welcome, heartbeat acks,
/// GoAway, Close, garbage), with time passing: no panic, and the session always ends.
pub fn agent_session(data: &[u8]) -> Outcome {
    let start = Instant::now();
    let mut s = agent(start);
    let mut established = false;
    // A renewal is asked for whenever the session allows one (a gateway that offers `renew`),
    // so the fuzzer reaches the answers' handling: only the pending id is ever answered.
    let mut renewing: Option<u64> = None;
    while s.poll_transmit().is_some() {}
    for (i, chunk) in data.chunks(7).enumerate() {
        let now = start + Duration::from_millis(i as u64 * 300);
        if s.can_renew() {
            renewing = s.renew("-----BEGIN CERTIFICATE REQUEST-----\n".into());
            assert!(renewing.is_some(), "can_renew, yet renew sent nothing");
        }
        s.handle_input(chunk, now);
        s.handle_timeout(now);
        while s.poll_transmit().is_some() {}
        while let Some(e) = s.poll_event() {
            match e {
                AgentEvent::Established(_) => established = true,
                AgentEvent::Renewed(r) => {
                    assert_eq!(
                        Some(r.id),
                        renewing.take(),
                        "an answer to no pending renewal"
                    );
                }
                _ => {}
            }
        }
    }
    s.handle_eof(start + Duration::from_secs(3600));
    while s.poll_event().is_some() {}
    assert!(s.is_closed());
    established.into()
}

/// One message payload of the frame type the first byte names (any type, known or not, so the
/// fuzzer works on the protobuf fields rather than on the framing): it decodes or is refused; what decodes
/// round-trips; a decoded `Hello` goes to a fresh gateway session and a decoded `Welcome`,
/// `HeartbeatAck`, `GoAway` or `Close` to an agent session (after a valid `Welcome` for the
/// last three), which must either accept it or close.
pub fn control_message(data: &[u8]) -> Outcome {
    let Some((&sel, payload)) = data.split_first() else {
        return Outcome::Refused;
    };
    let ty = sel;
    let Ok(msg) = Message::decode(ty, Bytes::copy_from_slice(payload)) else {
        return Outcome::Refused;
    };
    assert_eq!(msg.frame_type(), ty);
    let frame = msg.to_bytes();
    let (again, used) = decode_frame(&frame, usize::MAX)
        .expect("a re-encoded message decodes")
        .expect("a re-encoded message is a whole frame");
    assert_eq!((used, &again), (frame.len(), &msg));

    let now = Instant::now();
    match &msg {
        Message::Hello(hello) => {
            let mut s = GatewaySession::new(GatewaySessionConfig::new("fuzz".into()), now);
            s.handle_input(&frame, now);
            while s.poll_transmit().is_some() {}
            match s.poll_event() {
                Some(GatewayEvent::Established { version, .. }) => {
                    assert!(hello.versions.contains(&version));
                    assert!(tunnel_proto::SUPPORTED_VERSIONS.contains(&version));
                }
                _ => assert!(s.is_closed(), "a Hello neither accepted nor refused"),
            }
        }
        Message::Welcome(w) => {
            let mut s = agent(now);
            while s.poll_transmit().is_some() {}
            s.handle_input(&frame, now);
            s.handle_timeout(now);
            while s.poll_transmit().is_some() {}
            match s.poll_event() {
                Some(AgentEvent::Established(got)) => {
                    assert_eq!(&got, w);
                    assert!(tunnel_proto::SUPPORTED_VERSIONS.contains(&w.version));
                }
                _ => assert!(s.is_closed(), "a Welcome neither accepted nor refused"),
            }
        }
        Message::HeartbeatAck(_) | Message::GoAway(_) | Message::Close(_) => {
            let mut s = agent(now);
            while s.poll_transmit().is_some() {}
            let welcome = Message::Welcome(Welcome {
                version: tunnel_proto::SUPPORTED_VERSIONS[0],
                session_id: "s".into(),
                heartbeat_interval_ms: 1000,
                max_frame_size: 4096,
                max_concurrent_streams: 8,
                gateway_id: "g".into(),
                ..Default::default()
            });
            s.handle_input(&welcome.to_bytes(), now);
            assert!(s.is_established());
            s.handle_input(&frame, now);
            s.handle_timeout(now);
            while s.poll_transmit().is_some() {}
            while s.poll_event().is_some() {}
            if let Message::Close(_) = msg {
                assert!(
                    s.is_closed(),
                    "a Close from the gateway must end the session"
                );
            }
        }
        _ => {}
    }
    Outcome::Accepted
}

// === Relay streams ===

/// The bytes of a gateway-opened stream as the agent reads them (a `StreamHeader` first, then
/// `Data` frames; the relay's frame limit), split where the first byte says, and what the agent
/// and the gateway make of the messages: the header's kind, method path, metadata and trace
/// context turned into HTTP headers, the deadline into `grpc-timeout`; response heads' metadata
/// and trailers' `grpc-status` (agent → gateway). No panic, no unbounded buffering.
pub fn stream_header(data: &[u8]) -> Outcome {
    let max = MAX_DATA_FRAME + 64 * 1024;
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s).max(1) * 16, r),
        None => return Outcome::Refused,
    };
    let mut dec = FrameDecoder::new(max);
    let mut first = true;
    for chunk in rest.chunks(split) {
        dec.push(chunk);
        loop {
            let msg = match dec.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => return (!first).into(),
            };
            if first && !matches!(msg, Message::StreamHeader(_)) {
                // The agent resets a stream that does not start with a header.
                return Outcome::Refused;
            }
            first = false;
            on_stream_message(&msg);
        }
        assert!(dec.buffered() <= max + 5 + split);
    }
    let _ = dec.finish();
    (!first).into()
}

fn on_stream_message(msg: &Message) {
    let mut headers = HeaderMap::new();
    match msg {
        Message::StreamHeader(h) => {
            if h.stream_kind() == StreamKind::Rpc {
                let _ = h.method.parse::<http::Uri>();
            }
            tether_runtime::grpc::metadata_to_headers(&h.metadata, &mut headers);
            for (k, v) in &h.trace_context {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    headers.insert(k, v);
                }
            }
            if h.timeout_ms > 0 {
                let deadline = Instant::now() + Duration::from_millis(h.timeout_ms);
                let v = tether_runtime::grpc::encode_grpc_timeout(
                    deadline.saturating_duration_since(Instant::now()),
                );
                let back = tether_runtime::grpc::parse_grpc_timeout(&v).expect("ours parses");
                assert!(back <= Duration::from_millis(h.timeout_ms.max(1)));
            }
        }
        Message::ResponseHead(r) => {
            tether_runtime::grpc::metadata_to_headers(&r.metadata, &mut headers);
        }
        Message::Trailers(t) => {
            let _ = t.grpc_status();
            tether_runtime::grpc::metadata_to_headers(&t.metadata, &mut headers);
        }
        _ => {}
    }
    // What the relay forwards on, read back as the next hop reads it.
    let _ = tether_runtime::grpc::headers_to_metadata(&headers);
    for v in headers.values() {
        let _ = tether_runtime::grpc::parse_grpc_timeout(v);
    }
}

// === The stream machines ===

/// The first byte of a stream-machine input: how the reads split the rest (`1 + (b & 0x3f)`
/// bytes each, times 64 when bit 6 is set) and how the peer ends its half (bit 7: a reset,
/// otherwise FIN).
struct Schedule {
    split: usize,
    reset: bool,
}

fn schedule(data: &[u8]) -> Option<(Schedule, &[u8])> {
    let (&b, rest) = data.split_first()?;
    let mut split = 1 + usize::from(b & 0x3f);
    if b & 0x40 != 0 {
        split *= 64;
    }
    Some((
        Schedule {
            split,
            reset: b & 0x80 != 0,
        },
        rest,
    ))
}

/// Feeds `chunks`, then the end `s` says, to `r`: no event after the final one, exactly one
/// final event by the end, at most one stop. The events, in order.
fn drive<R: RecvHalf>(
    r: &mut R,
    chunks: &mut dyn Iterator<Item = Bytes>,
    s: &Schedule,
    is_final: fn(&R::Event) -> bool,
) -> Vec<R::Event> {
    let mut events: Vec<R::Event> = Vec::new();
    let mut stops = 0;
    let mut collect = |r: &mut R, events: &mut Vec<R::Event>| {
        while let Some(e) = r.poll_event() {
            assert!(!events.iter().any(is_final), "an event after the final one");
            events.push(e);
        }
        stops += std::iter::from_fn(|| r.poll_stop()).count();
    };
    for c in chunks {
        r.handle_input(c);
        collect(r, &mut events);
    }
    if s.reset {
        r.handle_reset(tunnel_proto::ErrorCode::CANCELLED);
    } else {
        r.handle_fin();
    }
    collect(r, &mut events);
    assert!(stops <= 1, "stopped {stops} times");
    assert_eq!(
        events.iter().filter(|e| is_final(e)).count(),
        1,
        "not exactly one final event once the stream ended"
    );
    events
}

/// Everything a send half has queued; none of it after its FIN or reset.
fn drain_transmits(s: &mut dyn SendHalf) {
    let mut closed = false;
    while let Some(t) = s.poll_transmit() {
        assert!(!closed, "a transmit after FIN or reset: {t:?}");
        closed = !matches!(t, Transmit::Bytes(_));
    }
}

fn chunks<'a>(data: &'a [u8], s: &Schedule) -> impl Iterator<Item = Bytes> + 'a {
    data.chunks(s.split).map(Bytes::copy_from_slice)
}

/// The bytes of a gateway-opened stream (see [`schedule`] for the first byte) into the agent's
/// machines: [`Incoming`] until the header, then the machine it hands the stream to (a relayed
/// call's request half, a TCP stream, a command delivery with a 4 KiB payload limit), each read
/// going to whichever is current, as the agent's IO does. Exactly one final event from each,
/// no payload above its limit, no panic. Accepted: a stream to serve (or a probe) whose machine
/// ended without a failure.
pub fn agent_stream(data: &[u8]) -> Outcome {
    let Some((s, rest)) = schedule(data) else {
        return Outcome::Refused;
    };
    let mut reads = chunks(rest, &s);
    let mut incoming = Incoming::with_max_command_payload(4096);
    let mut first = None;
    for c in reads.by_ref() {
        incoming.handle_input(c);
        drain_transmits(&mut incoming);
        if let Some(e) = incoming.poll_event() {
            assert!(incoming.poll_event().is_none(), "two events from Incoming");
            first = Some(e);
            break;
        }
    }
    let Some(first) = first else {
        drive(&mut incoming, &mut reads, &s, |_| true);
        drain_transmits(&mut incoming);
        return Outcome::Refused;
    };
    let accepted = match first {
        IncomingEvent::Accepted(a) => *a,
        IncomingEvent::Probed => return Outcome::Accepted,
        IncomingEvent::Unsupported(_) | IncomingEvent::Failed(_) => return Outcome::Refused,
    };
    match accepted {
        Accepted::Rpc {
            mut request,
            mut response,
            ..
        } => {
            let events = drive(&mut request, &mut reads, &s, |e| {
                !matches!(e, RequestEvent::Data(_))
            });
            let _ = response.trailers(tunnel_proto::message::Trailers::status(0, ""));
            drain_transmits(&mut response);
            matches!(events.last(), Some(RequestEvent::Finished)).into()
        }
        Accepted::Command(mut c) => {
            let events = drive(&mut c, &mut reads, &s, |_| true);
            let ok = match events.last() {
                Some(PayloadEvent::Payload(p)) => {
                    assert!(p.len() <= 4096, "a payload above the agent's limit");
                    c.ack().expect("ack after the payload");
                    c.progress("fuzz".into()).expect("progress after the ack");
                    c.result(true, Bytes::from_static(b"out"), String::new())
                        .expect("result after the ack");
                    true
                }
                _ => {
                    assert!(c.ack().is_err(), "ack of a delivery that failed");
                    false
                }
            };
            drain_transmits(&mut c);
            ok.into()
        }
        Accepted::Tcp(mut t) => {
            t.accept().expect("the first answer");
            assert!(t.accept().is_err(), "a second answer");
            let Ok((mut send, mut recv)) = t.into_raw() else {
                panic!("accepted, yet not open");
            };
            let events = drive(&mut recv, &mut reads, &s, |e| {
                !matches!(e, TcpEvent::Data(_))
            });
            let _ = send.finish();
            drain_transmits(&mut send);
            matches!(events.last(), Some(TcpEvent::Finished)).into()
        }
    }
}

/// The agent's answer to a relayed call (see [`schedule`] for the first byte) into the
/// gateway's response half: one final event, a head at most once and before any body, no
/// panic. Accepted: the call ended with trailers.
pub fn rpc_response(data: &[u8]) -> Outcome {
    let Some((s, rest)) = schedule(data) else {
        return Outcome::Refused;
    };
    let mut r = ResponseRecv::new();
    let events = drive(&mut r, &mut chunks(rest, &s), &s, |e| {
        matches!(e, ResponseEvent::Trailers(_) | ResponseEvent::Failed(_))
    });
    let heads: Vec<usize> = (0..events.len())
        .filter(|&i| matches!(events[i], ResponseEvent::Head(_)))
        .collect();
    assert!(heads.len() <= 1, "two heads");
    if let Some(d) = events
        .iter()
        .position(|e| matches!(e, ResponseEvent::Data(_)))
    {
        assert!(
            heads.first().is_some_and(|&h| h < d),
            "body before the head"
        );
    }
    matches!(events.last(), Some(ResponseEvent::Trailers(_))).into()
}

/// The agent's answer on a TCP stream (see [`schedule`] for the first byte) into the
/// gateway's machine: one final event, `Opened` at most once and before any bytes, which are
/// exactly what followed the answer. Accepted: opened.
pub fn tcp_answer(data: &[u8]) -> Outcome {
    let Some((s, rest)) = schedule(data) else {
        return Outcome::Refused;
    };
    let mut t = GatewayTcp::new("db".into());
    drain_transmits(&mut t);
    let events = drive(&mut t, &mut chunks(rest, &s), &s, |e| {
        !matches!(e, TcpEvent::Opened | TcpEvent::Data(_))
    });
    let opened = events.iter().position(|e| *e == TcpEvent::Opened);
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            TcpEvent::Data(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    match opened {
        Some(0) => {
            // The answer was one whole frame at the start; the rest is the service's.
            let (_, used) = decode_frame(rest, tunnel_proto::frame::MAX_STREAM_FRAME)
                .expect("the answer decoded")
                .expect("the answer was whole");
            assert_eq!(bytes, &rest[used..], "raw bytes lost or changed");
        }
        Some(i) => panic!("Opened as event {i}"),
        None => assert!(bytes.is_empty(), "bytes before the answer"),
    }
    drain_transmits(&mut t);
    opened.is_some().into()
}

/// The agent's report of a command (see [`schedule`] for the first byte; the limit on its
/// output is the second byte times 16) into the gateway's delivery: one final event, never an
/// output above the limit. Accepted: a result.
pub fn command_report(data: &[u8]) -> Outcome {
    let Some((s, rest)) = schedule(data) else {
        return Outcome::Refused;
    };
    let Some((&limit, rest)) = rest.split_first() else {
        return Outcome::Refused;
    };
    let max_output = u64::from(limit) * 16;
    let mut c = GatewayCommand::new(
        "c-1".into(),
        "fuzz".into(),
        String::new(),
        Bytes::from_static(b"payload"),
        max_output,
    );
    drain_transmits(&mut c);
    let events = drive(&mut c, &mut chunks(rest, &s), &s, |e| {
        !matches!(
            e,
            ReportEvent::Acked
                | ReportEvent::AwaitingApproval
                | ReportEvent::Progress(_)
                | ReportEvent::OutputStarted
        )
    });
    let mut finished = false;
    for e in &events {
        match e {
            ReportEvent::Finished {
                output, message, ..
            } => {
                assert!(output.len() as u64 <= max_output, "output above the limit");
                assert!(message.len() <= tunnel_proto::message::COMMAND_MESSAGE_MAX);
                finished = true;
            }
            ReportEvent::Progress(line) => {
                assert!(line.len() <= tunnel_proto::message::COMMAND_PROGRESS_LINE_MAX);
            }
            _ => {}
        }
    }
    finished.into()
}

/// The agent's answer to a probe (see [`schedule`] for the first byte) into the gateway's
/// probe: one final event; answered only by an `ok` `OpenResult` first. Accepted: answered.
pub fn probe_answer(data: &[u8]) -> Outcome {
    let Some((s, rest)) = schedule(data) else {
        return Outcome::Refused;
    };
    let mut p = GatewayProbe::new();
    drain_transmits(&mut p);
    let events = drive(&mut p, &mut chunks(rest, &s), &s, |_| true);
    let answered = events.first() == Some(&ProbeEvent::Answered);
    if answered {
        let first = decode_frame(rest, tunnel_proto::stream::probe::MAX_ANSWER_FRAME);
        assert!(
            matches!(&first, Ok(Some((Message::OpenResult(r), _))) if r.ok),
            "answered by {first:?}"
        );
    }
    answered.into()
}

// === Peer links ===

/// A frame on a peer link between gateway replicas (`gateway/src/peer/wire.rs`): the first byte
/// says whether it is read as a `PeerHeader` (even: what the holder reads before it opens an
/// agent stream) or a `PeerAnswer` (odd: what the forwarding replica reads). A length above the
/// limit is refused before anything is read; a message decoded re-encodes to a frame that
/// decodes to the same message; an agent field the holder would use parses as an agent id or
/// is refused.
pub fn peer_frame(data: &[u8]) -> Outcome {
    use tether_gateway::peer::wire::{self, MAX_FRAME, PeerAnswer, PeerHeader, WireError};
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Refused;
    };
    if let Some(prefix) = rest.get(..4) {
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            let r = if mode & 1 == 0 {
                wire::decode::<PeerHeader>(rest).map(|_| ())
            } else {
                wire::decode::<PeerAnswer>(rest).map(|_| ())
            };
            assert!(
                matches!(r, Err(WireError::TooLarge(n)) if n == len),
                "{r:?}"
            );
            return Outcome::Refused;
        }
    }
    if mode & 1 == 0 {
        let Ok(h) = wire::decode::<PeerHeader>(rest) else {
            return Outcome::Refused;
        };
        assert_eq!(
            wire::decode::<PeerHeader>(&wire::encode(&h)).ok(),
            Some(h.clone())
        );
        let _ = tether_gateway::peer::wire::PeerKind::from_u32(h.kind);
        if let Ok(id) = h.agent.parse::<tunnel_proto::AgentId>() {
            assert_eq!(id.to_string(), h.agent);
        }
        Outcome::Accepted
    } else {
        let Ok(a) = wire::decode::<PeerAnswer>(rest) else {
            return Outcome::Refused;
        };
        assert_eq!(
            wire::decode::<PeerAnswer>(&wire::encode(&a)).ok(),
            Some(a.clone())
        );
        let _ = a.code();
        Outcome::Accepted
    }
}

// === Enrollment ===

/// A PKCS#10 request through the enrollment CSR check (also the renewal check) for
/// [`IDENTITY`]: the first byte says whether the rest is the PEM text (odd) or the DER the body
/// wraps in PEM (even: the fuzzer then works on the DER). A request the check accepts must ask
/// for nothing beyond the identity: read independently by rcgen, its SANs are at most that URI,
/// it is not a CA and asks for no certificate or CRL signing, and its key is P-256 or Ed25519.
pub fn csr_check(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Refused;
    };
    let pem = if mode & 1 == 1 {
        match std::str::from_utf8(rest) {
            Ok(s) => s.to_owned(),
            Err(_) => return Outcome::Refused,
        }
    } else {
        pem_of(rest)
    };
    let Ok(key) = check_csr(&pem, IDENTITY) else {
        return Outcome::Refused;
    };
    let alg = rcgen::PublicKeyData::algorithm(&key);
    assert!(alg == &rcgen::PKCS_ECDSA_P256_SHA256 || alg == &rcgen::PKCS_ED25519);
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("an accepted CSR is PEM");
    let params = rcgen::CertificateSigningRequestParams::from_der(&der)
        .expect("an accepted CSR parses")
        .params;
    for san in &params.subject_alt_names {
        assert!(
            matches!(san, rcgen::SanType::URI(u) if u.as_str() == IDENTITY),
            "accepted a CSR asking for {san:?}"
        );
    }
    assert!(params.subject_alt_names.len() <= 1);
    assert!(
        !matches!(params.is_ca, rcgen::IsCa::Ca(_)),
        "accepted a CA request"
    );
    assert!(
        !params.key_usages.iter().any(|u| matches!(
            u,
            rcgen::KeyUsagePurpose::KeyCertSign | rcgen::KeyUsagePurpose::CrlSign
        )),
        "accepted a request for certificate signing"
    );
    Outcome::Accepted
}

/// `der` as a PEM certificate request.
pub fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

struct EnrollFixture {
    rt: tokio::runtime::Runtime,
    enrollment: std::sync::Arc<Enrollment>,
    /// The pending token the placeholder stands for; replaced when it is redeemed.
    token: Mutex<String>,
    _dir: tempfile::TempDir,
}

fn enroll_fixture() -> &'static EnrollFixture {
    static F: OnceLock<EnrollFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        tether_gateway::identity::pki::init(&pki, "fuzz.test", &["localhost".into()], false)
            .expect("pki init");
        let cfg: GatewayConfig = toml::from_str(&format!(
            "trust_domain = \"fuzz.test\"\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [enrollment]\nca_key = {ca_key:?}\n\
             [limits]\ntoken_creations_per_minute = 4000000000\n",
            ca = pki.join("ca.pem"),
            cert = pki.join("gateway.pem"),
            key = pki.join("gateway-key.pem"),
            ca_key = pki.join("ca-key.pem"),
        ))
        .expect("fuzz gateway config");
        let db = std::sync::Arc::new(IdentityDb::open(&dir.path().join("data")).expect("db"));
        let bundle = std::fs::read_to_string(&cfg.tls.ca).expect("CA bundle");
        let enrollment =
            std::sync::Arc::new(Enrollment::new(&cfg, &bundle, db).expect("enrollment"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let token = new_token(&rt, &enrollment);
        EnrollFixture {
            rt,
            enrollment,
            token: Mutex::new(token),
            _dir: dir,
        }
    })
}

fn new_token(rt: &tokio::runtime::Runtime, e: &std::sync::Arc<Enrollment>) -> String {
    rt.block_on(e.create_token("fuzz", "mtls:fuzz", "acme", "a", None))
        .expect("create token")
        .token
}

/// An `Enroll` request as the agent-facing service receives it (a protobuf
/// `tether.v1.EnrollRequest`, the gRPC message body) through the gateway's whole enrollment
/// path: token check, redemption in the identity store, CSR check, issuance. [`TOKEN_PLACEHOLDER`]
/// stands for a pending token of `acme/a`. A certificate issued must be for that identity alone.
pub fn enroll_request(data: &[u8]) -> Outcome {
    use prost::Message as _;
    let Ok(mut req) = tether_api::v1::EnrollRequest::decode(data) else {
        return Outcome::Refused;
    };
    let f = enroll_fixture();
    let mut pending = f.token.lock().unwrap_or_else(|e| e.into_inner());
    let substituted = req.token == TOKEN_PLACEHOLDER;
    if substituted {
        req.token = pending.clone();
    }
    let Ok(resp) =
        f.rt.block_on(f.enrollment.enroll(&req.token, &req.csr_pem, None))
    else {
        return Outcome::Refused;
    };
    assert!(substituted, "a certificate for a token nobody created");
    assert_eq!(resp.agent, "acme/a");
    let der = x509_parser::pem::Pem::iter_from_buffer(resp.certificate_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .contents;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).expect("an issued certificate parses");
    assert!(!cert.is_ca());
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(sans, vec![IDENTITY.to_owned()]);
    // The token is used now: the next request gets a fresh one.
    *pending = new_token(&f.rt, &f.enrollment);
    Outcome::Accepted
}

// === Northbound bearer tokens ===

struct AuthFixture {
    rt: tokio::runtime::Runtime,
    auth: std::sync::Arc<Authenticator>,
    _dir: tempfile::TempDir,
}

fn auth_fixture() -> &'static AuthFixture {
    static F: OnceLock<AuthFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, JWKS).expect("jwks file");
        let cfg: GatewayConfig = toml::from_str(&format!(
            "trust_domain = \"fuzz.test\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [auth]\njwks_file = {jwks:?}\nissuer = {JWT_ISSUER:?}\naudience = {JWT_AUDIENCE:?}\n\
             [[auth.callers]]\nname = \"ops\"\nkind = \"jwt\"\ntenants = [\"acme\"]\n",
        ))
        .expect("fuzz gateway config");
        let auth = Authenticator::new(&cfg).expect("authenticator");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        AuthFixture {
            rt,
            auth,
            _dir: dir,
        }
    })
}

/// An `authorization` header from a northbound caller (the whole value, `Bearer <JWT>`) through
/// the gateway's authentication entry point, with a fixed JWKS ([`JWKS`]) and no client
/// certificate. A caller it accepts came with a token (there is no other credential here) and
/// acts for at least one tenant, and for `acme` at most when its `sub` is `ops`.
pub fn bearer_token(data: &[u8]) -> Outcome {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return Outcome::Refused;
    };
    let f = auth_fixture();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    let Ok(caller) =
        f.rt.block_on(f.auth.authenticate(None, &headers, "tether.v1.Agents/List"))
    else {
        return Outcome::Refused;
    };
    assert_eq!(caller.kind, CallerKind::Jwt);
    assert!(!caller.name.is_empty());
    match &caller.tenants {
        TenantScope::All => panic!("a token granted every tenant"),
        TenantScope::Set(s) => {
            assert!(!s.is_empty());
            if caller.name == "ops" {
                assert!(
                    s.iter().all(|t| t == "acme"),
                    "scope beyond auth.callers: {s:?}"
                );
            }
        }
    }
    Outcome::Accepted
}

/// The relay's `tether-agent` metadata (the input's bytes as the header value), as parsed
/// before a call is routed: an accepted id names a valid tenant (a name of at most 63 bytes),
/// and the label of a call that reached no agent is the fixed [`tether_gateway::relay::grpc::UNROUTED`],
/// so no input becomes a metrics series of its own.
pub fn relay_metadata(data: &[u8]) -> Outcome {
    use tether_gateway::relay::agent_of_metadata;
    use tether_gateway::relay::grpc::{UNROUTED, tenant_label};
    assert_eq!(tenant_label(None), UNROUTED);
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return Outcome::Refused;
    };
    let mut headers = HeaderMap::new();
    headers.insert(tether_runtime::grpc::TETHER_AGENT, value);
    match agent_of_metadata(&headers) {
        Ok(id) => {
            let tenant = id.tenant();
            assert!(tenant.len() <= 63, "tenant of {} bytes", tenant.len());
            assert!(tunnel_proto::identity::check_name("tenant", tenant).is_ok());
            assert_eq!(tenant_label(Some(tenant)), tenant);
            assert_ne!(tenant, UNROUTED);
            Outcome::Accepted
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            // INVALID_ARGUMENT, whatever the input.
            assert_eq!(status.code() as i32, 3, "{status:?}");
            Outcome::Refused
        }
    }
}
