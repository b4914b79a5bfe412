//! Properties of the stream machines, whatever the peer sends and however the reads split it:
//! no panic; exactly one final event once the stream has ended (FIN or reset), none after it,
//! at most one stop; the events do not depend on where the reads split; a command's output is
//! never above the gateway's limit; and what one side's machine sends, the other's receives
//! whole, through any chunking of the link.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tunnel_proto::ErrorCode;
use tunnel_proto::frame::decode_frame;
use tunnel_proto::harness::stream::{Halves, Side, StreamLink};
use tunnel_proto::message::{
    CommandAck, CommandProgress, CommandResult, Message, OpenResult, ResponseHead, StreamHeader,
    StreamKind, Trailers,
};
use tunnel_proto::stream::command::{GatewayCommand, PayloadEvent, ReportEvent};
use tunnel_proto::stream::probe::{GatewayProbe, MAX_ANSWER_FRAME, ProbeEvent};
use tunnel_proto::stream::rpc::{self, RequestEvent, ResponseEvent, ResponseRecv};
use tunnel_proto::stream::tcp::{GatewayTcp, TcpEvent};
use tunnel_proto::stream::{Accepted, Incoming, IncomingEvent, RecvHalf};

// === What a peer may write ===

/// A message either side may send on a stream, well-formed or not for the receiver's state.
fn stream_message() -> impl Strategy<Value = Message> {
    let text = ".{0,24}";
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| Message::Data(b.into())),
        any::<u32>().prop_map(|status| Message::ResponseHead(ResponseHead {
            status,
            metadata: vec![]
        })),
        (0i32..17, text).prop_map(|(c, m)| Message::Trailers(Trailers::status(c, &m))),
        (any::<bool>(), 0i32..17, text)
            .prop_map(|(ok, code, message)| Message::OpenResult(OpenResult { ok, code, message })),
        Just(Message::CommandAck(CommandAck::default())),
        text.prop_map(|message| Message::CommandProgress(CommandProgress { message })),
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            text
        )
            .prop_map(|(succeeded, output, message)| {
                Message::CommandResult(CommandResult {
                    succeeded,
                    output,
                    message,
                })
            }),
        (0i32..6, "[a-z]{0,8}").prop_map(|(kind, service)| Message::StreamHeader(StreamHeader {
            kind,
            service,
            ..Default::default()
        })),
    ]
}

/// A piece of what a peer writes: a whole frame, or bytes that need not be one.
#[derive(Clone, Debug)]
enum Piece {
    Frame(Message),
    Raw(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => stream_message().prop_map(Piece::Frame),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Piece::Raw),
    ]
}

/// How the peer ends its half after writing, if it does.
#[derive(Clone, Copy, Debug)]
enum End {
    Open,
    Fin,
    Reset(u32),
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        Just(End::Open),
        Just(End::Fin),
        (0u32..20).prop_map(End::Reset)
    ]
}

fn wire(pieces: &[Piece]) -> Bytes {
    let mut b = BytesMut::new();
    for p in pieces {
        match p {
            Piece::Frame(m) => m.encode(&mut b),
            Piece::Raw(r) => b.extend_from_slice(r),
        }
    }
    b.freeze()
}

/// `bytes` cut into reads at the offsets `cuts` pick (each taken modulo the length).
fn reads(bytes: &Bytes, cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes.slice(w[0]..w[1])).collect()
}

// === Feeding a receive half ===

/// Feeds `chunks` then `end` to `r`, checking after every call that no event follows the
/// final one; returns the events and every stop it asked for.
fn feed<R: RecvHalf>(
    r: &mut R,
    chunks: &[Bytes],
    end: End,
    is_final: impl Fn(&R::Event) -> bool,
) -> Result<(Vec<R::Event>, Vec<ErrorCode>), TestCaseError> {
    let mut events = Vec::new();
    let mut stops = Vec::new();
    let mut collect = |r: &mut R, events: &mut Vec<R::Event>| -> Result<(), TestCaseError> {
        while let Some(e) = r.poll_event() {
            prop_assert!(
                !events.iter().any(&is_final),
                "an event after the final one"
            );
            events.push(e);
        }
        stops.extend(std::iter::from_fn(|| r.poll_stop()));
        Ok(())
    };
    for c in chunks {
        r.handle_input(c.clone());
        collect(r, &mut events)?;
    }
    match end {
        End::Open => {}
        End::Fin => r.handle_fin(),
        End::Reset(c) => r.handle_reset(ErrorCode(c)),
    }
    collect(r, &mut events)?;
    prop_assert!(stops.len() <= 1, "stopped twice: {stops:?}");
    let finals = events.iter().filter(|e| is_final(e)).count();
    prop_assert!(finals <= 1, "{finals} final events");
    if !matches!(end, End::Open) {
        prop_assert_eq!(finals, 1, "the stream ended without a final event");
    }
    Ok((events, stops))
}

/// Consecutive byte events joined, so events can be compared across different splits.
fn joined<E: Clone>(
    events: Vec<E>,
    data: impl Fn(&E) -> Option<&Bytes>,
    mk: impl Fn(Bytes) -> E,
) -> Vec<E> {
    let mut out: Vec<E> = Vec::new();
    let mut pending = BytesMut::new();
    for e in events {
        if let Some(b) = data(&e) {
            pending.extend_from_slice(b);
            continue;
        }
        if !pending.is_empty() {
            out.push(mk(pending.split().freeze()));
        }
        out.push(e);
    }
    if !pending.is_empty() {
        out.push(mk(pending.freeze()));
    }
    out
}

fn response_final(e: &ResponseEvent) -> bool {
    matches!(e, ResponseEvent::Trailers(_) | ResponseEvent::Failed(_))
}

fn response_data(e: &ResponseEvent) -> Option<&Bytes> {
    match e {
        ResponseEvent::Data(b) => Some(b),
        _ => None,
    }
}

fn report_final(e: &ReportEvent) -> bool {
    !matches!(
        e,
        ReportEvent::Acked | ReportEvent::Progress(_) | ReportEvent::OutputStarted
    )
}

fn tcp_final(e: &TcpEvent) -> bool {
    !matches!(e, TcpEvent::Opened | TcpEvent::Data(_))
}

fn tcp_data(e: &TcpEvent) -> Option<&Bytes> {
    match e {
        TcpEvent::Data(b) => Some(b),
        _ => None,
    }
}

fn request_final(e: &RequestEvent) -> bool {
    !matches!(e, RequestEvent::Data(_))
}

fn request_data(e: &RequestEvent) -> Option<&Bytes> {
    match e {
        RequestEvent::Data(b) => Some(b),
        _ => None,
    }
}

/// The agent's side of a gateway-opened stream: `Incoming` until its header, then the
/// accepted machine, each read going to whichever machine is current (as the agent's IO does).
/// Returns a description of every event, in order.
fn agent_side(chunks: &[Bytes], end: End) -> Result<Vec<String>, TestCaseError> {
    let mut incoming = Incoming::with_max_command_payload(4096);
    let mut log = Vec::new();
    let mut rest = chunks;
    let mut accepted = None;
    while let Some((c, tail)) = rest.split_first() {
        rest = tail;
        incoming.handle_input(c.clone());
        if let Some(e) = incoming.poll_event() {
            prop_assert!(incoming.poll_event().is_none(), "two events from Incoming");
            match e {
                IncomingEvent::Accepted(a) => accepted = Some(*a),
                other => log.push(format!("{other:?}")),
            }
            break;
        }
    }
    let Some(accepted) = accepted else {
        if log.is_empty() {
            // Still waiting for the header: the end decides.
            let (events, _) = feed(&mut incoming, &[], end, |_| true)?;
            log.extend(events.iter().map(|e| format!("{e:?}")));
        } else {
            // Answered or refused already: nothing more comes of what follows.
            for c in rest {
                incoming.handle_input(c.clone());
            }
            match end {
                End::Open => {}
                End::Fin => incoming.handle_fin(),
                End::Reset(c) => incoming.handle_reset(ErrorCode(c)),
            }
            prop_assert!(
                incoming.poll_event().is_none(),
                "an event after the final one"
            );
        }
        return Ok(log);
    };
    match accepted {
        Accepted::Rpc { mut request, .. } => {
            let (events, _) = feed(&mut request, rest, end, request_final)?;
            let events = joined(events, request_data, RequestEvent::Data);
            log.push("rpc".into());
            log.extend(events.iter().map(|e| format!("{e:?}")));
        }
        Accepted::Command(mut c) => {
            let (events, _) = feed(&mut c, rest, end, |_| true)?;
            if let Some(PayloadEvent::Payload(p)) = events.first() {
                prop_assert!(p.len() <= 4096, "a payload above the agent's limit");
            }
            log.push("command".into());
            log.extend(events.iter().map(|e| format!("{e:?}")));
        }
        Accepted::Tcp(mut t) => {
            let (events, _) = feed(&mut t, rest, end, tcp_final)?;
            let events = joined(events, tcp_data, TcpEvent::Data);
            log.push("tcp".into());
            log.extend(events.iter().map(|e| format!("{e:?}")));
        }
    }
    Ok(log)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The gateway's response half: the invariants, and the same events whatever the reads.
    #[test]
    fn a_response_half_ends_once_whatever_the_agent_sends(
        pieces in proptest::collection::vec(piece(), 0..8),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..12),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..12),
        end in end(),
    ) {
        let bytes = wire(&pieces);
        let (a, _) = feed(&mut ResponseRecv::new(), &reads(&bytes, &cuts_a), end, response_final)?;
        let (b, _) = feed(&mut ResponseRecv::new(), &reads(&bytes, &cuts_b), end, response_final)?;
        prop_assert_eq!(
            joined(a, response_data, ResponseEvent::Data),
            joined(b, response_data, ResponseEvent::Data)
        );
    }

    /// The gateway's delivery: the invariants, the same events whatever the reads, and never
    /// an output above the limit.
    #[test]
    fn a_delivery_reports_once_and_never_beyond_the_output_limit(
        pieces in proptest::collection::vec(piece(), 0..8),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..12),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..12),
        end in end(),
        max_output in 0u64..600,
    ) {
        let bytes = wire(&pieces);
        let new = || GatewayCommand::new("c".into(), "k".into(), String::new(), Bytes::new(), max_output);
        let (a, _) = feed(&mut new(), &reads(&bytes, &cuts_a), end, report_final)?;
        let (b, _) = feed(&mut new(), &reads(&bytes, &cuts_b), end, report_final)?;
        for e in &a {
            if let ReportEvent::Finished { output, .. } = e {
                prop_assert!(output.len() as u64 <= max_output);
            }
        }
        prop_assert_eq!(a, b);
    }

    /// The gateway's TCP stream: the invariants, and the same events (bytes joined) whatever
    /// the reads, also across the switch from frames to raw bytes.
    #[test]
    fn a_tcp_stream_opens_or_fails_once_whatever_the_agent_sends(
        pieces in proptest::collection::vec(piece(), 0..8),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..12),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..12),
        end in end(),
    ) {
        let bytes = wire(&pieces);
        let (a, _) = feed(&mut GatewayTcp::new("db".into()), &reads(&bytes, &cuts_a), end, tcp_final)?;
        let (b, _) = feed(&mut GatewayTcp::new("db".into()), &reads(&bytes, &cuts_b), end, tcp_final)?;
        prop_assert!(a.iter().filter(|e| matches!(e, TcpEvent::Opened)).count() <= 1);
        prop_assert_eq!(joined(a, tcp_data, TcpEvent::Data), joined(b, tcp_data, TcpEvent::Data));
    }

    /// The gateway's probe: at most one answer, and only `Answered` for an `ok` first frame.
    #[test]
    fn a_probe_is_answered_only_by_an_ok_open_result(
        pieces in proptest::collection::vec(piece(), 0..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        end in end(),
    ) {
        let bytes = wire(&pieces);
        let (events, _) = feed(&mut GatewayProbe::new(), &reads(&bytes, &cuts), end, |_| true)?;
        if events.first() == Some(&ProbeEvent::Answered) {
            let first = decode_frame(&bytes, MAX_ANSWER_FRAME);
            prop_assert!(
                matches!(&first, Ok(Some((Message::OpenResult(r), _))) if r.ok),
                "answered by {:?}", first
            );
        }
    }

    /// The agent's side of a gateway-opened stream: the invariants in `Incoming` and in the
    /// machine it hands over to, and the same events whatever the reads.
    #[test]
    fn the_agent_reads_a_stream_the_same_whatever_the_reads(
        header in stream_message(),
        pieces in proptest::collection::vec(piece(), 0..8),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..12),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..12),
        end in end(),
    ) {
        let mut all = vec![Piece::Frame(header)];
        all.extend(pieces);
        let bytes = wire(&all);
        let a = agent_side(&reads(&bytes, &cuts_a), end)?;
        let b = agent_side(&reads(&bytes, &cuts_b), end)?;
        prop_assert_eq!(a, b);
    }

    /// What the gateway's request half sends, the agent's request half receives whole, and
    /// what the agent's response half sends, the gateway's response half: through any
    /// chunking of the link.
    #[test]
    fn a_call_carries_any_bodies_through_any_chunking(
        request in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 0..4),
        response in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 0..4),
        seed in 1u64..u64::MAX,
    ) {
        let mut link = StreamLink::new().with_chunking(seed);
        let (send, recv) = rpc::open(StreamHeader { kind: StreamKind::Rpc as i32, ..Default::default() });
        let mut gw = Halves { send, recv };
        for b in &request {
            gw.send.data(Bytes::from(b.clone())).unwrap();
        }
        gw.send.finish().unwrap();
        let mut incoming = Incoming::new();
        let accepted = loop {
            let moved = link.step(&mut gw, &mut incoming);
            if let Some(e) = incoming.poll_event() {
                break e;
            }
            prop_assert!(moved, "the header never arrived");
        };
        let IncomingEvent::Accepted(a) = accepted else {
            return Err(TestCaseError::fail(format!("not accepted: {accepted:?}")));
        };
        let Accepted::Rpc { request: req, response: resp, .. } = *a else {
            return Err(TestCaseError::fail("not an RPC"));
        };
        let mut agent = Halves { send: resp, recv: req };
        agent.send.head(ResponseHead { status: 200, metadata: vec![] }).unwrap();
        for b in &response {
            agent.send.data(Bytes::from(b.clone())).unwrap();
        }
        agent.send.trailers(Trailers::status(0, "")).unwrap();
        link.run(&mut gw, &mut agent);
        prop_assert!(link.is_closed(Side::Gateway) && link.is_closed(Side::Agent));

        let got: Vec<RequestEvent> = std::iter::from_fn(|| agent.recv.poll_event()).collect();
        let want: Vec<u8> = request.concat();
        let mut body = Vec::new();
        for e in &got[..got.len() - 1] {
            let RequestEvent::Data(b) = e else {
                return Err(TestCaseError::fail(format!("{e:?} before the end")));
            };
            body.extend_from_slice(b);
        }
        prop_assert_eq!(got.last(), Some(&RequestEvent::Finished));
        prop_assert_eq!(body, want);

        let got: Vec<ResponseEvent> = std::iter::from_fn(|| gw.recv.poll_event()).collect();
        let want = Bytes::from(response.concat());
        let mut expect = vec![ResponseEvent::Head(ResponseHead { status: 200, metadata: vec![] })];
        if !want.is_empty() {
            expect.push(ResponseEvent::Data(want));
        }
        expect.push(ResponseEvent::Trailers(Trailers::status(0, "")));
        prop_assert_eq!(joined(got, response_data, ResponseEvent::Data), expect);
    }
}
