//! The stream machines (relayed calls, TCP streams, command deliveries, probes) driven through
//! the simulated stream: every exchange with reads split at random, peers that reset or stop at
//! any point, and peers that send frames malformed, too large or out of order.

use bytes::{Bytes, BytesMut};
use tunnel_proto::ErrorCode;
use tunnel_proto::ProtoError;
use tunnel_proto::frame::{HEADER_LEN, MAX_DATA_FRAME, MAX_STREAM_FRAME, data_header};
use tunnel_proto::harness::stream::{Halves, PeerEvent, RawPeer, Side, StreamLink};
use tunnel_proto::message::{
    COMMAND_MAX_OUTPUT_KEY, COMMAND_MESSAGE_MAX, COMMAND_PROGRESS_LINE_MAX, CommandAck,
    CommandProgress, CommandResult, Message, MetadataEntry, OpenResult, ResponseHead, StreamHeader,
    StreamKind, Trailers,
};
use tunnel_proto::stream::command::{
    GatewayCommand, INLINE_OUTPUT, OutputSent, PayloadEvent, ReportEvent,
};
use tunnel_proto::stream::probe::{GatewayProbe, ProbeEvent};
use tunnel_proto::stream::rpc::{self, RequestEvent, ResponseEvent, ResponseRecv, ResponseSend};
use tunnel_proto::stream::tcp::{GatewayTcp, TcpEvent};
use tunnel_proto::stream::{
    Accepted, Incoming, IncomingEvent, RecvHalf, SendError, SendHalf, StreamFailure, Transmit,
};

// === Helpers ===

fn events<R: RecvHalf + ?Sized>(r: &mut R) -> Vec<R::Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

fn transmits<S: SendHalf + ?Sized>(s: &mut S) -> Vec<Transmit> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

/// What a send half writes, joined; and how it ended.
fn written(t: &[Transmit]) -> (Vec<u8>, Option<&Transmit>) {
    let mut bytes = Vec::new();
    let mut end = None;
    for x in t {
        match x {
            Transmit::Bytes(b) => bytes.extend_from_slice(b),
            other => end = Some(other),
        }
    }
    (bytes, end)
}

fn frames(msgs: &[Message]) -> Bytes {
    let mut b = BytesMut::new();
    for m in msgs {
        m.encode(&mut b);
    }
    b.freeze()
}

fn pattern(n: usize, salt: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect::<Vec<u8>>()
        .into()
}

fn rpc_header() -> StreamHeader {
    StreamHeader {
        kind: StreamKind::Rpc as i32,
        service: "greeter".into(),
        method: "/helloworld.Greeter/SayHello".into(),
        metadata: vec![MetadataEntry {
            key: "x-request-id".into(),
            value: b"abc".to_vec(),
        }],
        timeout_ms: 1500,
        ..Default::default()
    }
}

/// Seeds of the reads' sizes; `None`: every read takes all there is.
fn seeds() -> impl Iterator<Item = Option<u64>> {
    std::iter::once(None).chain((1..=24).map(Some))
}

fn link(seed: Option<u64>) -> StreamLink {
    match seed {
        None => StreamLink::new(),
        Some(s) => StreamLink::new().with_chunking(s),
    }
}

/// Steps until the agent's header arrives; the event it made of it.
fn accept<G>(link: &mut StreamLink, gateway: &mut G, incoming: &mut Incoming) -> IncomingEvent
where
    G: SendHalf + RecvHalf,
{
    loop {
        let moved = link.step(gateway, incoming);
        if let Some(e) = incoming.poll_event() {
            assert!(incoming.poll_event().is_none(), "one event per header");
            return e;
        }
        assert!(moved, "the header never arrived");
    }
}

fn accepted(e: IncomingEvent) -> Accepted {
    match e {
        IncomingEvent::Accepted(a) => *a,
        other => panic!("expected a stream to serve, got {other:?}"),
    }
}

fn is_final_response(e: &ResponseEvent) -> bool {
    matches!(e, ResponseEvent::Trailers(_) | ResponseEvent::Failed(_))
}

// === Relayed calls ===

/// One whole call: what the gateway sees, what the agent's request half saw.
fn call(
    seed: Option<u64>,
    request: &[Bytes],
    response: &[Bytes],
) -> (Vec<ResponseEvent>, Vec<RequestEvent>, StreamHeader) {
    let mut link = link(seed);
    let (send, recv) = rpc::open(rpc_header());
    let mut gw = Halves { send, recv };
    for chunk in request {
        gw.send.data(chunk.clone()).unwrap();
    }
    gw.send.finish().unwrap();
    let mut incoming = Incoming::new();
    let Accepted::Rpc {
        header,
        request: req,
        response: resp,
    } = accepted(accept(&mut link, &mut gw, &mut incoming))
    else {
        panic!("not an RPC");
    };
    let mut agent = Halves {
        send: resp,
        recv: req,
    };
    link.run(&mut gw, &mut agent);
    let request_events = events(&mut agent.recv);
    agent
        .send
        .head(ResponseHead {
            status: 200,
            metadata: vec![],
        })
        .unwrap();
    for chunk in response {
        agent.send.data(chunk.clone()).unwrap();
    }
    agent.send.trailers(Trailers::status(0, "")).unwrap();
    link.run(&mut gw, &mut agent);
    assert!(link.is_closed(Side::Gateway) && link.is_closed(Side::Agent));
    (events(&mut gw.recv), request_events, header)
}

fn body_of_requests(events: &[RequestEvent]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match e {
            RequestEvent::Data(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn body_of_responses(events: &[ResponseEvent]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::Data(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_relayed_call_carries_head_body_and_trailers_whatever_the_reads() {
    let request = [
        pattern(10, 1),
        pattern(MAX_DATA_FRAME * 2 + 3, 2),
        Bytes::new(),
    ];
    let response = [pattern(70_000, 3), pattern(1, 4)];
    for seed in seeds() {
        let (gw, agent, header) = call(seed, &request, &response);
        assert_eq!(header, rpc_header(), "seed {seed:?}");
        let want: Vec<u8> = request.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(body_of_requests(&agent), want, "seed {seed:?}");
        assert_eq!(agent.last(), Some(&RequestEvent::Finished), "seed {seed:?}");
        assert!(matches!(gw.first(), Some(ResponseEvent::Head(h)) if h.status == 200));
        let want: Vec<u8> = response.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(body_of_responses(&gw), want, "seed {seed:?}");
        assert_eq!(
            gw.last(),
            Some(&ResponseEvent::Trailers(Trailers::status(0, "")))
        );
        assert_eq!(gw.iter().filter(|e| is_final_response(e)).count(), 1);
    }
}

#[test]
fn a_trailers_only_answer_ends_the_call_without_a_head() {
    for seed in seeds() {
        let mut link = link(seed);
        let (send, recv) = rpc::open(rpc_header());
        let mut gw = Halves { send, recv };
        gw.send.finish().unwrap();
        let mut incoming = Incoming::new();
        let Accepted::Rpc { response, .. } = accepted(accept(&mut link, &mut gw, &mut incoming))
        else {
            panic!("not an RPC");
        };
        let mut agent = Halves {
            send: response,
            recv: RawPeer::new(),
        };
        let denied = Trailers::status(7, "service \"x\" is not allow-listed");
        agent.send.trailers(denied.clone()).unwrap();
        link.run(&mut gw, &mut agent);
        assert_eq!(events(&mut gw.recv), vec![ResponseEvent::Trailers(denied)]);
        assert!(!gw.recv.has_head());
        assert_eq!(
            agent.send.data(Bytes::from_static(b"late")),
            Err(SendError::Closed {
                what: "Data",
                how: "finished"
            })
        );
    }
}

#[test]
fn body_frames_read_together_with_the_header_reach_the_request_half() {
    // One read holds the header, every body frame and the FIN.
    let mut link = StreamLink::new();
    let (send, recv) = rpc::open(rpc_header());
    let mut gw = Halves { send, recv };
    gw.send.data(Bytes::from_static(b"one")).unwrap();
    gw.send.data(Bytes::from_static(b"two")).unwrap();
    gw.send.finish().unwrap();
    let mut incoming = Incoming::new();
    let Accepted::Rpc { mut request, .. } = accepted(accept(&mut link, &mut gw, &mut incoming))
    else {
        panic!("not an RPC");
    };
    assert_eq!(link.reads, 1);
    // The FIN is a separate event of the stream: deliver it.
    link.run(
        &mut gw,
        &mut Halves {
            send: RawPeer::new(),
            recv: &mut request,
        },
    );
    assert_eq!(
        events(&mut request),
        vec![
            RequestEvent::Data(Bytes::from_static(b"one")),
            RequestEvent::Data(Bytes::from_static(b"two")),
            RequestEvent::Finished
        ]
    );
}

#[test]
fn the_agents_response_is_refused_out_of_order() {
    let mut r = ResponseSend::default();
    assert_eq!(
        r.data(Bytes::from_static(b"x")),
        Err(SendError::OutOfOrder {
            what: "Data",
            state: "no head was sent"
        })
    );
    r.head(ResponseHead::default()).unwrap();
    assert!(matches!(
        r.head(ResponseHead::default()),
        Err(SendError::OutOfOrder { .. })
    ));
    r.data(Bytes::from_static(b"x")).unwrap();
    r.handle_stopped(ErrorCode::CANCELLED);
    assert_eq!(
        r.trailers(Trailers::status(0, "")),
        Err(SendError::Stopped(ErrorCode::CANCELLED))
    );
    // What was queued before the stop never reaches the wire.
    assert_eq!(transmits(&mut r), vec![]);
}

#[test]
fn a_cancelled_call_resets_the_request_at_any_point_and_stops_the_response() {
    // Cancel after every possible number of steps; the agent ends its request half exactly once,
    // and its response half learns of the stop.
    for seed in [None, Some(3), Some(11)] {
        for cancel_at in 0..40 {
            let mut link = link(seed);
            let (send, recv) = rpc::open(rpc_header());
            let mut gw = Halves { send, recv };
            gw.send.data(pattern(100_000, 9)).unwrap();
            let mut incoming = Incoming::new();
            let mut agent: Option<Halves<ResponseSend, rpc::RequestRecv>> = None;
            let mut agent_events = Vec::new();
            let mut incoming_events = Vec::new();
            for step in 0.. {
                if step == cancel_at {
                    gw.send.cancel();
                    gw.recv.cancel();
                }
                let moved = match agent.as_mut() {
                    Some(a) => {
                        let m = link.step(&mut gw, a);
                        agent_events.extend(events(&mut a.recv));
                        m
                    }
                    None => {
                        let m = link.step(&mut gw, &mut incoming);
                        if let Some(e) = incoming.poll_event() {
                            match e {
                                IncomingEvent::Accepted(a) => match *a {
                                    Accepted::Rpc {
                                        request, response, ..
                                    } => {
                                        agent = Some(Halves {
                                            send: response,
                                            recv: request,
                                        })
                                    }
                                    _ => panic!("not an RPC"),
                                },
                                other => incoming_events.push(other),
                            }
                        }
                        m
                    }
                };
                if !moved && step > cancel_at {
                    break;
                }
            }
            assert!(
                events(&mut gw.recv).is_empty(),
                "a cancelled call reports nothing"
            );
            match agent {
                None => {
                    // Cancelled before the header arrived: the agent saw the reset instead.
                    assert!(
                        matches!(
                            incoming_events.as_slice(),
                            [IncomingEvent::Failed(StreamFailure::Reset(
                                ErrorCode::CANCELLED
                            ))]
                        ) || (cancel_at == 0 && incoming_events.is_empty()),
                        "seed {seed:?} cancel at {cancel_at}: {incoming_events:?}"
                    );
                }
                Some(mut a) => {
                    let finals: Vec<_> = agent_events
                        .iter()
                        .filter(|e| !matches!(e, RequestEvent::Data(_)))
                        .collect();
                    assert_eq!(
                        finals,
                        vec![&RequestEvent::Failed(StreamFailure::Reset(
                            ErrorCode::CANCELLED
                        ))],
                        "seed {seed:?} cancel at {cancel_at}"
                    );
                    assert_eq!(
                        a.send.head(ResponseHead::default()),
                        Err(SendError::Stopped(ErrorCode::CANCELLED))
                    );
                }
            }
        }
    }
}

/// A hand-written agent's bytes on a call's response; what the gateway made of them, and the
/// stop the peer received.
fn response_from(bytes: Bytes, fin: bool) -> (Vec<ResponseEvent>, Option<ErrorCode>) {
    let mut link = StreamLink::new().with_chunking(5);
    let (send, recv) = rpc::open(rpc_header());
    let mut gw = Halves { send, recv };
    let mut peer = RawPeer::new();
    peer.write(bytes);
    if fin {
        peer.finish();
    }
    link.run(&mut gw, &mut peer);
    (events(&mut gw.recv), peer.stopped)
}

#[test]
fn a_response_out_of_order_or_malformed_stops_the_stream_with_its_code() {
    let head = Message::ResponseHead(ResponseHead::default());
    let data = Message::Data(Bytes::from_static(b"d"));
    let cases: Vec<(Bytes, &str, ErrorCode)> = vec![
        (
            frames(std::slice::from_ref(&data)),
            "Data",
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            frames(&[head.clone(), head.clone()]),
            "ResponseHead",
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            frames(&[Message::OpenResult(OpenResult::default())]),
            "OpenResult",
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            frames(&[head.clone(), Message::CommandAck(CommandAck::default())]),
            "CommandAck",
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            frames(&[Message::StreamHeader(rpc_header())]),
            "StreamHeader",
            ErrorCode::PROTOCOL_ERROR,
        ),
    ];
    for (bytes, got, code) in cases {
        let (ev, stopped) = response_from(bytes, true);
        let last = ev.last().expect("a final event");
        assert!(
            matches!(last, ResponseEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected { got: g, .. })) if *g == got),
            "{got}: {ev:?}"
        );
        assert_eq!(stopped, Some(code), "{got}");
        assert_eq!(ev.iter().filter(|e| is_final_response(e)).count(), 1);
    }
    // Garbage, a frame above the stream limit (refused from its header, before its payload),
    // a payload that is not the message its type says.
    let mut huge = BytesMut::new();
    huge.extend_from_slice(&[0x12]);
    huge.extend_from_slice(&((MAX_STREAM_FRAME + 1) as u32).to_be_bytes());
    let malformed = Bytes::from_static(&[0x12, 0, 0, 0, 2, 0xff, 0xff]);
    for (bytes, code) in [
        (
            Bytes::from_static(b"\xee garbage"),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (huge.freeze(), ErrorCode::FRAME_TOO_LARGE),
        (malformed, ErrorCode::PROTOCOL_ERROR),
    ] {
        let (ev, stopped) = response_from(bytes.clone(), false);
        assert!(
            matches!(
                ev.as_slice(),
                [ResponseEvent::Failed(StreamFailure::Protocol(e))] if e.code() == code
            ),
            "{bytes:?}: {ev:?}"
        );
        assert_eq!(stopped, Some(code));
    }
}

#[test]
fn a_response_that_ends_early_says_what_was_missing() {
    let head = Message::ResponseHead(ResponseHead::default());
    let (ev, stopped) = response_from(Bytes::new(), true);
    assert_eq!(
        ev,
        vec![ResponseEvent::Failed(StreamFailure::Ended {
            expected: "the response head"
        })]
    );
    assert_eq!(stopped, None, "nothing to stop once the agent finished");
    let (ev, _) = response_from(frames(std::slice::from_ref(&head)), true);
    assert_eq!(
        ev.last(),
        Some(&ResponseEvent::Failed(StreamFailure::Ended {
            expected: "the trailers"
        }))
    );
    // A FIN inside a frame.
    let cut = frames(&[head, Message::Data(pattern(100, 0))]);
    let (ev, _) = response_from(cut.slice(..cut.len() - 1), true);
    assert!(matches!(
        ev.last(),
        Some(ResponseEvent::Failed(StreamFailure::Protocol(
            ProtoError::Truncated { .. }
        )))
    ));
}

#[test]
fn a_request_with_anything_but_data_is_stopped() {
    let mut link = StreamLink::new().with_chunking(2);
    let mut gw = RawPeer::new();
    gw.write(frames(&[
        Message::StreamHeader(rpc_header()),
        Message::Data(Bytes::from_static(b"ok")),
        Message::Trailers(Trailers::default()),
    ]));
    let mut incoming = Incoming::new();
    let Accepted::Rpc {
        request, response, ..
    } = accepted(accept(&mut link, &mut gw, &mut incoming))
    else {
        panic!("not an RPC");
    };
    let mut agent = Halves {
        send: response,
        recv: request,
    };
    link.run(&mut gw, &mut agent);
    let ev = events(&mut agent.recv);
    assert_eq!(ev[0], RequestEvent::Data(Bytes::from_static(b"ok")));
    assert!(matches!(
        &ev[1..],
        [RequestEvent::Failed(StreamFailure::Protocol(
            ProtoError::Unexpected {
                got: "Trailers",
                ..
            }
        ))]
    ));
    assert_eq!(gw.stopped, Some(ErrorCode::PROTOCOL_ERROR));
}

// === TCP streams ===

#[test]
fn a_tcp_stream_opens_then_carries_raw_bytes_both_ways_and_half_closes() {
    for seed in seeds() {
        let mut link = link(seed);
        let mut gw = GatewayTcp::new("db".into());
        let mut incoming = Incoming::new();
        let Accepted::Tcp(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
            panic!("not TCP");
        };
        assert_eq!(agent.header().service, "db");
        agent.accept().unwrap();
        // Raw bytes right behind the answer: with one read they arrive together.
        let up = pattern(150_000, 7);
        let (mut a_send, mut a_recv) = agent.into_raw().expect("accepted");
        a_send.write(up.clone()).unwrap();
        let mut gw_events = Vec::new();
        loop {
            let moved = link.step(
                &mut gw,
                &mut Halves {
                    send: &mut a_send,
                    recv: &mut a_recv,
                },
            );
            gw_events.extend(events(&mut gw));
            if gw.is_open() || !moved {
                break;
            }
        }
        assert_eq!(gw_events.first(), Some(&TcpEvent::Opened), "seed {seed:?}");
        let (mut g_send, g_recv) = gw.into_raw().expect("open");
        let down = pattern(70_001, 8);
        g_send.write(down.clone()).unwrap();
        g_send.finish().unwrap();
        a_send.finish().unwrap();
        let mut g = Halves {
            send: g_send,
            recv: g_recv,
        };
        let mut a = Halves {
            send: a_send,
            recv: a_recv,
        };
        link.run(&mut g, &mut a);
        gw_events.extend(events(&mut g.recv));
        let a_events = events(&mut a.recv);
        let raw = |ev: &[TcpEvent]| -> Vec<u8> {
            ev.iter()
                .filter_map(|e| match e {
                    TcpEvent::Data(b) => Some(b.to_vec()),
                    _ => None,
                })
                .flatten()
                .collect()
        };
        assert_eq!(raw(&gw_events), up.to_vec(), "seed {seed:?}");
        assert_eq!(raw(&a_events), down.to_vec(), "seed {seed:?}");
        assert_eq!(gw_events.last(), Some(&TcpEvent::Finished));
        assert_eq!(a_events.last(), Some(&TcpEvent::Finished));
        assert!(g.recv.is_ended());
    }
}

#[test]
fn a_refused_tcp_stream_reports_the_code_and_ends() {
    let mut link = StreamLink::new().with_chunking(9);
    let mut gw = GatewayTcp::new("nope".into());
    let mut incoming = Incoming::new();
    let Accepted::Tcp(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not TCP");
    };
    agent.refuse(7, "not allow-listed".into()).unwrap();
    assert!(agent.accept().is_err(), "one answer");
    let mut agent = *agent.into_raw().expect_err("refused streams do not open");
    link.run(&mut gw, &mut agent);
    assert_eq!(
        events(&mut gw),
        vec![TcpEvent::Refused {
            code: 7,
            message: "not allow-listed".into()
        }]
    );
    assert!(gw.into_raw().is_err());
}

#[test]
fn a_tcp_answer_that_is_not_an_open_result_resets_and_stops_the_stream() {
    for (bytes, fin, code) in [
        (
            frames(&[Message::Trailers(Trailers::default())]),
            false,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (Bytes::new(), true, ErrorCode::PROTOCOL_ERROR),
    ] {
        let mut link = StreamLink::new();
        let mut gw = GatewayTcp::new("db".into());
        let mut peer = RawPeer::new();
        peer.write(bytes);
        if fin {
            peer.finish();
        }
        link.run(&mut gw, &mut peer);
        let ev = events(&mut gw);
        assert!(matches!(ev.as_slice(), [TcpEvent::Failed(_)]), "{ev:?}");
        assert_eq!(peer.ended, Some(PeerEvent::Reset(code)));
        if !fin {
            assert_eq!(peer.stopped, Some(code));
        }
    }
}

// === Command deliveries ===

fn delivery(payload: Bytes, max_output: u64) -> GatewayCommand {
    GatewayCommand::new(
        "cmd-1".into(),
        "deploy".into(),
        "application/json".into(),
        payload,
        max_output,
    )
}

/// A delivery with `payload`; the agent acks, sends `lines`, and ends with `output`.
fn command(
    seed: Option<u64>,
    payload: Bytes,
    max_output: u64,
    lines: &[String],
    output: Bytes,
) -> (Vec<ReportEvent>, Bytes, OutputSent) {
    let mut link = link(seed);
    let mut gw = delivery(payload, max_output);
    let mut incoming = Incoming::new();
    let Accepted::Command(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not a command");
    };
    assert_eq!((agent.id(), agent.kind()), ("cmd-1", "deploy"));
    assert_eq!(agent.max_output(), Some(max_output as usize));
    link.run(&mut gw, &mut agent);
    let got = match events(&mut agent).as_slice() {
        [PayloadEvent::Payload(p)] => p.clone(),
        other => panic!("seed {seed:?}: {other:?}"),
    };
    agent.ack().unwrap();
    for l in lines {
        agent.progress(l.clone()).unwrap();
    }
    let sent = agent.result(true, output, "done".into()).unwrap();
    link.run(&mut gw, &mut agent);
    assert!(link.is_closed(Side::Agent));
    (events(&mut gw), got, sent)
}

#[test]
fn a_delivery_acks_reports_progress_and_a_streamed_output_in_order() {
    let payload = pattern(3 * MAX_DATA_FRAME + 17, 5);
    let output = pattern(INLINE_OUTPUT * 5, 6);
    let long = "é".repeat(COMMAND_PROGRESS_LINE_MAX);
    let lines = vec!["one".to_owned(), long, "three".to_owned()];
    for seed in seeds() {
        let (ev, got, sent) = command(seed, payload.clone(), 1 << 20, &lines, output.clone());
        assert_eq!(got, payload, "seed {seed:?}");
        assert_eq!(sent, OutputSent::Streamed);
        assert_eq!(ev[0], ReportEvent::Acked);
        assert_eq!(ev[1], ReportEvent::Progress("one".into()));
        let ReportEvent::Progress(cut) = &ev[2] else {
            panic!("{:?}", ev[2]);
        };
        assert!(cut.len() <= COMMAND_PROGRESS_LINE_MAX && cut.ends_with(" bytes]"));
        assert_eq!(ev[3], ReportEvent::Progress("three".into()));
        assert_eq!(ev[4], ReportEvent::OutputStarted);
        assert_eq!(
            ev[5..],
            [ReportEvent::Finished {
                succeeded: true,
                output: output.to_vec(),
                message: "done".into()
            }]
        );
    }
}

#[test]
fn a_small_output_travels_inside_the_result() {
    let out = pattern(INLINE_OUTPUT, 1);
    let (ev, got, sent) = command(Some(4), Bytes::new(), 1 << 20, &[], out.clone());
    assert!(got.is_empty());
    assert_eq!(sent, OutputSent::Inline);
    assert_eq!(
        ev,
        vec![
            ReportEvent::Acked,
            ReportEvent::Finished {
                succeeded: true,
                output: out.to_vec(),
                message: "done".into()
            }
        ]
    );
}

#[test]
fn an_output_above_the_gateways_limit_is_reported_as_a_failure_by_the_agent() {
    let (ev, _, sent) = command(Some(8), Bytes::new(), 100, &[], pattern(101, 1));
    assert_eq!(sent, OutputSent::AboveLimit { len: 101, max: 100 });
    match ev.as_slice() {
        [
            ReportEvent::Acked,
            ReportEvent::Finished {
                succeeded: false,
                output,
                message,
            },
        ] => {
            assert!(output.is_empty());
            assert!(message.contains("above the gateway's limit of 100 bytes"));
        }
        other => panic!("{other:?}"),
    }
}

/// A hand-written agent's report; the gateway's events and the stop the agent received.
fn report_from(bytes: Bytes, fin: bool, max_output: u64) -> (Vec<ReportEvent>, Option<ErrorCode>) {
    let mut link = StreamLink::new().with_chunking(13);
    let mut gw = delivery(Bytes::from_static(b"{}"), max_output);
    let mut peer = RawPeer::new();
    peer.write(bytes);
    if fin {
        peer.finish();
    }
    link.run(&mut gw, &mut peer);
    assert_eq!(
        peer.ended,
        Some(PeerEvent::Fin),
        "the delivery is sent whole"
    );
    (events(&mut gw), peer.stopped)
}

#[test]
fn a_command_awaiting_approval_says_so_then_acks_and_runs_once_approved() {
    for seed in seeds() {
        let mut link = link(seed);
        let mut gw = GatewayCommand::delivery(
            "cmd-1".into(),
            "deploy".into(),
            String::new(),
            Bytes::from_static(b"p"),
            1 << 20,
            1,
            &Default::default(),
            Some(1_700_000_000_123),
        );
        let mut incoming = Incoming::new();
        let Accepted::Command(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming))
        else {
            panic!("not a command");
        };
        assert!(agent.gateway_takes_approvals());
        assert_eq!(agent.expires_unix_ms(), Some(1_700_000_000_123));
        link.run(&mut gw, &mut agent);
        assert!(matches!(
            events(&mut agent).as_slice(),
            [PayloadEvent::Payload(_)]
        ));
        // Said twice (a redelivery says it again): one event each, no state change.
        agent.awaiting_approval().unwrap();
        agent.awaiting_approval().unwrap();
        link.run(&mut gw, &mut agent);
        assert_eq!(
            events(&mut gw),
            vec![ReportEvent::AwaitingApproval, ReportEvent::AwaitingApproval],
            "seed {seed:?}"
        );
        agent.ack().unwrap();
        assert!(agent.awaiting_approval().is_err(), "not after the ack");
        agent
            .result(false, Bytes::new(), "rejected".into())
            .unwrap();
        link.run(&mut gw, &mut agent);
        let ev = events(&mut gw);
        assert_eq!(ev[0], ReportEvent::Acked, "seed {seed:?}");
        assert!(
            matches!(&ev[1], ReportEvent::Finished { succeeded: false, message, .. } if message == "rejected"),
            "{ev:?}"
        );
    }
    // Without a TTL the header names no expiry.
    let mut link = link(None);
    let mut gw = delivery(Bytes::new(), 10);
    let mut incoming = Incoming::new();
    let Accepted::Command(agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not a command");
    };
    assert_eq!(agent.expires_unix_ms(), None);
}

#[test]
fn a_hostile_agents_output_above_the_limit_is_refused_and_its_stream_stopped() {
    let ack = Message::CommandAck(CommandAck::default());
    let data = |n| Message::Data(pattern(n, 0));
    // In Data frames: stopped at the frame that crosses the limit.
    let (ev, stopped) = report_from(frames(&[ack.clone(), data(60), data(60)]), false, 100);
    assert_eq!(
        ev,
        vec![
            ReportEvent::Acked,
            ReportEvent::OutputStarted,
            ReportEvent::OutputTooLarge { max: 100 }
        ]
    );
    assert_eq!(stopped, Some(ErrorCode::FRAME_TOO_LARGE));
    // Inside the result: refused, nothing left to stop.
    let result = Message::CommandResult(CommandResult {
        succeeded: true,
        output: vec![1; 50],
        message: String::new(),
    });
    let (ev, stopped) = report_from(frames(&[ack, data(60), result]), true, 100);
    assert_eq!(ev.last(), Some(&ReportEvent::OutputTooLarge { max: 100 }));
    assert_eq!(stopped, None);
}

#[test]
fn a_result_message_is_cut_and_progress_lines_too() {
    let ack = Message::CommandAck(CommandAck::default());
    let line = Message::CommandProgress(CommandProgress {
        message: "p".repeat(120 << 10),
    });
    let result = Message::CommandResult(CommandResult {
        succeeded: false,
        output: vec![],
        message: "m".repeat(120 << 10),
    });
    let (ev, _) = report_from(frames(&[ack, line, result]), true, 100);
    let ReportEvent::Progress(p) = &ev[1] else {
        panic!("{ev:?}")
    };
    assert!(p.len() <= COMMAND_PROGRESS_LINE_MAX);
    let ReportEvent::Finished { message, .. } = &ev[2] else {
        panic!("{ev:?}")
    };
    assert!(message.len() <= COMMAND_MESSAGE_MAX && message.starts_with("mmm"));
}

#[test]
fn a_report_out_of_order_fails_the_delivery() {
    let ack = Message::CommandAck(CommandAck::default());
    let progress = Message::CommandProgress(CommandProgress {
        message: "x".into(),
    });
    let result = Message::CommandResult(CommandResult::default());
    for (msgs, got) in [
        (vec![progress.clone()], "CommandProgress"),
        (vec![Message::Data(Bytes::from_static(b"o"))], "Data"),
        (vec![result.clone()], "CommandResult"),
        (vec![ack.clone(), ack.clone()], "CommandAck"),
        (
            vec![ack.clone(), Message::Trailers(Trailers::default())],
            "Trailers",
        ),
        (
            vec![ack.clone(), Message::ResponseHead(ResponseHead::default())],
            "ResponseHead",
        ),
    ] {
        let (ev, stopped) = report_from(frames(&msgs), false, 100);
        assert!(
            matches!(
                ev.last(),
                Some(ReportEvent::Failed(StreamFailure::Protocol(ProtoError::Unexpected { got: g, .. }))) if *g == got
            ),
            "{got}: {ev:?}"
        );
        assert_eq!(stopped, Some(ErrorCode::PROTOCOL_ERROR));
    }
    // Trailers first: an agent that does not run commands.
    let (ev, _) = report_from(
        frames(&[Message::Trailers(Trailers::status(12, "no"))]),
        true,
        100,
    );
    assert_eq!(ev, vec![ReportEvent::Unsupported]);
    // Ended without a result.
    let (ev, _) = report_from(frames(&[ack, progress]), true, 100);
    assert_eq!(
        ev.last(),
        Some(&ReportEvent::Failed(StreamFailure::Ended {
            expected: "the CommandResult"
        }))
    );
}

#[test]
fn a_payload_above_the_agents_limit_stops_and_resets_the_delivery() {
    for seed in seeds() {
        let mut link = link(seed);
        let mut gw = delivery(pattern(1000, 3), 100);
        let mut incoming = Incoming::with_max_command_payload(999);
        let event = accept(&mut link, &mut gw, &mut incoming);
        let Accepted::Command(mut agent) = accepted(event) else {
            panic!("not a command");
        };
        link.run(&mut gw, &mut agent);
        assert!(
            matches!(
                events(&mut agent).as_slice(),
                [PayloadEvent::Failed(StreamFailure::Protocol(
                    ProtoError::TooLarge { max: 999, .. }
                ))]
            ),
            "seed {seed:?}"
        );
        assert!(matches!(
            events(&mut gw).as_slice(),
            [ReportEvent::Failed(StreamFailure::Reset(
                ErrorCode::FRAME_TOO_LARGE
            ))]
        ));
        assert_eq!(
            agent.ack(),
            Err(SendError::Closed {
                what: "CommandAck",
                how: "reset"
            })
        );
    }
}

#[test]
fn the_agent_reports_only_in_the_protocols_order() {
    let mut link = StreamLink::new();
    let mut gw = delivery(Bytes::from_static(b"p"), 100);
    let mut incoming = Incoming::new();
    let Accepted::Command(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not a command");
    };
    // The payload's FIN has not been read yet.
    assert!(matches!(agent.ack(), Err(SendError::OutOfOrder { .. })));
    link.run(&mut gw, &mut agent);
    assert!(matches!(
        agent.progress("early".into()),
        Err(SendError::OutOfOrder { .. })
    ));
    assert!(matches!(
        agent.result(true, Bytes::new(), String::new()),
        Err(SendError::OutOfOrder { .. })
    ));
    agent.ack().unwrap();
    assert!(matches!(agent.ack(), Err(SendError::OutOfOrder { .. })));
    agent.result(true, Bytes::new(), String::new()).unwrap();
    assert!(matches!(
        agent.progress("late".into()),
        Err(SendError::Closed { .. })
    ));
}

#[test]
fn a_delivery_the_gateway_resets_is_reset_back_cancelled() {
    let mut link = StreamLink::new().with_chunking(21);
    let mut gw = RawPeer::new();
    let header = StreamHeader {
        kind: StreamKind::Command as i32,
        id: "c".into(),
        ..Default::default()
    };
    gw.write(frames(&[
        Message::StreamHeader(header),
        Message::Data(Bytes::from_static(b"half")),
    ]));
    let mut incoming = Incoming::new();
    let Accepted::Command(mut agent) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not a command");
    };
    assert_eq!(agent.max_output(), None, "this gateway did not say");
    link.run(&mut gw, &mut agent);
    link.reset(Side::Gateway, ErrorCode::CANCELLED);
    link.run(&mut gw, &mut agent);
    assert_eq!(
        events(&mut agent),
        vec![PayloadEvent::Failed(StreamFailure::Reset(
            ErrorCode::CANCELLED
        ))]
    );
    assert_eq!(gw.ended, Some(PeerEvent::Reset(ErrorCode::CANCELLED)));
}

// === Probes and the header ===

#[test]
fn a_probe_is_answered_by_the_agents_machine() {
    for seed in seeds() {
        let mut link = link(seed);
        let mut gw = GatewayProbe::new();
        let mut incoming = Incoming::new();
        assert!(matches!(
            accept(&mut link, &mut gw, &mut incoming),
            IncomingEvent::Probed
        ));
        link.run(&mut gw, &mut incoming);
        assert_eq!(events(&mut gw), vec![ProbeEvent::Answered]);
        assert!(link.is_closed(Side::Agent) && link.is_closed(Side::Gateway));
    }
}

#[test]
fn a_probe_without_a_proper_answer_fails() {
    for (bytes, fin) in [
        (
            frames(&[Message::OpenResult(OpenResult {
                ok: false,
                code: 14,
                message: "no".into(),
            })]),
            false,
        ),
        (frames(&[Message::Trailers(Trailers::default())]), false),
        (Bytes::new(), true),
        (Bytes::from(vec![0x14, 0, 0, 4, 1]), false),
    ] {
        let mut link = StreamLink::new();
        let mut gw = GatewayProbe::new();
        let mut peer = RawPeer::new();
        peer.write(bytes.clone());
        if fin {
            peer.finish();
        }
        link.run(&mut gw, &mut peer);
        assert!(
            matches!(events(&mut gw).as_slice(), [ProbeEvent::Failed(_)]),
            "{bytes:?}"
        );
    }
}

/// What the agent does with a stream whose first bytes are `bytes`.
fn incoming_from(bytes: Bytes, fin: bool) -> (Vec<IncomingEvent>, RawPeer) {
    let mut link = StreamLink::new().with_chunking(17);
    let mut gw = RawPeer::new();
    gw.write(bytes);
    if fin {
        gw.finish();
    }
    let mut incoming = Incoming::new();
    link.run(&mut gw, &mut incoming);
    (events(&mut incoming), gw)
}

#[test]
fn a_stream_that_does_not_start_with_a_header_is_reset_and_stopped() {
    let mut huge = BytesMut::from(&[0x10u8][..]);
    huge.extend_from_slice(&((MAX_STREAM_FRAME + 1) as u32).to_be_bytes());
    for (bytes, code) in [
        (
            frames(&[Message::Data(Bytes::from_static(b"x"))]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            Bytes::from_static(b"GET / HTTP/1.1\r\n"),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (huge.freeze(), ErrorCode::FRAME_TOO_LARGE),
    ] {
        let (ev, gw) = incoming_from(bytes.clone(), false);
        assert!(
            matches!(ev.as_slice(), [IncomingEvent::Failed(StreamFailure::Protocol(e))] if e.code() == code),
            "{bytes:?}: {ev:?}"
        );
        assert_eq!(gw.stopped, Some(code));
        assert_eq!(gw.ended, Some(PeerEvent::Reset(code)));
    }
}

#[test]
fn a_stream_that_ends_before_its_header_is_reset_cancelled() {
    let (ev, gw) = incoming_from(Bytes::new(), true);
    assert!(matches!(
        ev.as_slice(),
        [IncomingEvent::Failed(StreamFailure::Ended { .. })]
    ));
    assert_eq!(
        (gw.ended, gw.stopped),
        (Some(PeerEvent::Reset(ErrorCode::CANCELLED)), None)
    );
    // Inside the header: the gateway broke the protocol.
    let header = frames(&[Message::StreamHeader(rpc_header())]);
    let (ev, gw) = incoming_from(header.slice(..header.len() - 2), true);
    assert!(matches!(
        ev.as_slice(),
        [IncomingEvent::Failed(StreamFailure::Protocol(
            ProtoError::Truncated { .. }
        ))]
    ));
    assert_eq!(gw.ended, Some(PeerEvent::Reset(ErrorCode::PROTOCOL_ERROR)));
    // A reset, and a header that never comes in time.
    let mut link = StreamLink::new();
    let mut gw = RawPeer::new();
    gw.reset(ErrorCode::CANCELLED);
    let mut incoming = Incoming::new();
    link.run(&mut gw, &mut incoming);
    assert!(matches!(
        events(&mut incoming).as_slice(),
        [IncomingEvent::Failed(StreamFailure::Reset(
            ErrorCode::CANCELLED
        ))]
    ));
    let mut slow = Incoming::new();
    slow.cancel();
    assert_eq!(
        transmits(&mut slow),
        vec![Transmit::Reset(ErrorCode::CANCELLED)]
    );
    assert!(slow.poll_event().is_none());
}

#[test]
fn an_unknown_stream_kind_is_answered_unimplemented() {
    let header = StreamHeader {
        kind: 99,
        ..Default::default()
    };
    let (ev, gw) = incoming_from(frames(&[Message::StreamHeader(header.clone())]), false);
    assert!(matches!(ev.as_slice(), [IncomingEvent::Unsupported(h)] if *h == header));
    let mut resp = ResponseRecv::new();
    resp.handle_input(gw.received.freeze());
    resp.handle_fin();
    let ev = events(&mut resp);
    assert!(
        matches!(ev.as_slice(), [ResponseEvent::Trailers(t)] if t.grpc_status() == Some(12)),
        "{ev:?}"
    );
    assert_eq!(gw.ended, Some(PeerEvent::Fin));
}

// === The wire stays what it was ===

/// The bytes each machine writes are those the hand-written protocol wrote (`send_msg`: one
/// frame; `send_data`: a 5-byte header and the payload per `Data` frame), so older agents and
/// gateways interoperate.
#[test]
fn every_machine_writes_the_bytes_the_hand_written_protocol_wrote() {
    fn data_frames(mut data: Bytes) -> Vec<u8> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
            out.extend_from_slice(&data_header(chunk.len()));
            out.extend_from_slice(&chunk);
        }
        out
    }
    // Gateway, relayed call.
    let body = pattern(MAX_DATA_FRAME + 10, 1);
    let (mut req, _) = rpc::open(rpc_header());
    req.data(body.clone()).unwrap();
    req.finish().unwrap();
    req.cancel();
    let t = transmits(&mut req);
    let mut want = Message::StreamHeader(rpc_header()).to_bytes().to_vec();
    want.extend(data_frames(body.clone()));
    // A cancel after the FIN resets (and what was not written is dropped).
    assert_eq!(t, vec![Transmit::Reset(ErrorCode::CANCELLED)]);
    let (mut req, _) = rpc::open(rpc_header());
    req.data(body.clone()).unwrap();
    req.finish().unwrap();
    let t = transmits(&mut req);
    assert_eq!(written(&t), (want, Some(&Transmit::Finish)));
    let chunks: Vec<usize> = t
        .iter()
        .filter_map(|x| match x {
            Transmit::Bytes(b) => Some(b.len()),
            _ => None,
        })
        .collect();
    assert_eq!(
        &chunks[1..],
        [HEADER_LEN, MAX_DATA_FRAME, HEADER_LEN, 10],
        "payloads are not copied into their frames"
    );

    // Gateway, command delivery.
    let header = StreamHeader {
        kind: StreamKind::Command as i32,
        service: "deploy".into(),
        id: "cmd-1".into(),
        metadata: vec![
            MetadataEntry {
                key: "content-type".into(),
                value: b"application/json".to_vec(),
            },
            MetadataEntry {
                key: COMMAND_MAX_OUTPUT_KEY.into(),
                value: b"1048576".to_vec(),
            },
            // New: this gateway understands an approval wait (older agents ignore it).
            MetadataEntry {
                key: "tether-approvals".into(),
                value: b"1".to_vec(),
            },
        ],
        ..Default::default()
    };
    let mut want = Message::StreamHeader(header).to_bytes().to_vec();
    want.extend(data_frames(body.clone()));
    let mut d = delivery(body.clone(), 1 << 20);
    assert_eq!(written(&transmits(&mut d)), (want, Some(&Transmit::Finish)));

    // Gateway, TCP and probe.
    let tcp = StreamHeader {
        kind: StreamKind::Tcp as i32,
        service: "db".into(),
        ..Default::default()
    };
    let mut g = GatewayTcp::new("db".into());
    assert_eq!(
        written(&transmits(&mut g)),
        (Message::StreamHeader(tcp).to_bytes().to_vec(), None)
    );
    let probe = StreamHeader {
        kind: StreamKind::Probe as i32,
        ..Default::default()
    };
    let mut p = GatewayProbe::new();
    assert_eq!(
        written(&transmits(&mut p)),
        (
            Message::StreamHeader(probe.clone()).to_bytes().to_vec(),
            Some(&Transmit::Finish)
        )
    );

    // Agent: the probe's answer, an unknown kind, a TCP refusal, a command's report.
    let (_, gw) = incoming_from(frames(&[Message::StreamHeader(probe)]), false);
    assert_eq!(
        gw.received.to_vec(),
        Message::OpenResult(OpenResult {
            ok: true,
            ..Default::default()
        })
        .to_bytes()
        .to_vec()
    );
    let (_, gw) = incoming_from(
        frames(&[Message::StreamHeader(StreamHeader::default())]),
        false,
    );
    assert_eq!(
        gw.received.to_vec(),
        Message::Trailers(Trailers::status(
            12,
            "stream kind not supported by this agent"
        ))
        .to_bytes()
        .to_vec()
    );
    let mut link = StreamLink::new();
    let mut g = GatewayTcp::new("db".into());
    let mut incoming = Incoming::new();
    let Accepted::Tcp(mut a) = accepted(accept(&mut link, &mut g, &mut incoming)) else {
        panic!("not TCP");
    };
    a.refuse(7, "no".into()).unwrap();
    let refusal = Message::OpenResult(OpenResult {
        ok: false,
        code: 7,
        message: "no".into(),
    });
    assert_eq!(
        written(&transmits(&mut a)),
        (refusal.to_bytes().to_vec(), Some(&Transmit::Finish))
    );

    let mut link = StreamLink::new();
    let mut gw = delivery(Bytes::new(), 1 << 20);
    let mut incoming = Incoming::new();
    let Accepted::Command(mut a) = accepted(accept(&mut link, &mut gw, &mut incoming)) else {
        panic!("not a command");
    };
    link.run(&mut gw, &mut a);
    assert!(matches!(events(&mut a).as_slice(), [PayloadEvent::Payload(p)] if p.is_empty()));
    a.ack().unwrap();
    a.progress("half".into()).unwrap();
    let big = pattern(INLINE_OUTPUT + 1, 2);
    a.result(true, big.clone(), "ok".into()).unwrap();
    let mut want = frames(&[
        Message::CommandAck(CommandAck::default()),
        Message::CommandProgress(CommandProgress {
            message: "half".into(),
        }),
    ])
    .to_vec();
    want.extend(data_frames(big));
    want.extend_from_slice(
        &Message::CommandResult(CommandResult {
            succeeded: true,
            output: vec![],
            message: "ok".into(),
        })
        .to_bytes(),
    );
    assert_eq!(written(&transmits(&mut a)), (want, Some(&Transmit::Finish)));
}
