//! The control-stream state machines driven through the simulated-clock harness.

use std::time::Duration;

use tunnel_proto::harness::{Pair, To};
use tunnel_proto::message::{
    GoAway, GoAwayKind, Hello, LEAVE, Message, RENEW, RenewRequest, RenewResponse, ServiceEntry,
};
use tunnel_proto::session::{
    AgentEvent, AgentSessionConfig, CloseInfo, GatewayEvent, GatewaySessionConfig,
};
use tunnel_proto::{ErrorCode, Session};

const INTERVAL: Duration = Duration::from_secs(1);
const LATENCY: Duration = Duration::from_millis(20);

fn pair() -> Pair {
    pair_with(Hello {
        agent_version: "test".into(),
        ..Default::default()
    })
}

fn pair_with(hello: Hello) -> Pair {
    let mut gw = GatewaySessionConfig::new("s-1".into());
    gw.heartbeat_interval = INTERVAL;
    Pair::new(AgentSessionConfig::new(hello), gw, LATENCY)
}

fn gateway_closed(p: &Pair) -> Option<(Duration, CloseInfo)> {
    p.gateway_events.iter().find_map(|(t, e)| match e {
        GatewayEvent::Closed(c) => Some((*t, c.clone())),
        _ => None,
    })
}

fn agent_closed(p: &Pair) -> Option<(Duration, CloseInfo)> {
    p.agent_events.iter().find_map(|(t, e)| match e {
        AgentEvent::Closed(c) => Some((*t, c.clone())),
        _ => None,
    })
}

#[test]
fn hello_welcome_establishes_in_one_round_trip() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    let (t, welcome) = p
        .agent_events
        .iter()
        .find_map(|(t, e)| match e {
            AgentEvent::Established(w) => Some((*t, w.clone())),
            _ => None,
        })
        .expect("agent established");
    assert_eq!(t, LATENCY * 2);
    assert_eq!(welcome.version, 1);
    assert_eq!(welcome.session_id, "s-1");
    assert_eq!(welcome.heartbeat_interval_ms, 1000);
    assert!(matches!(
        &p.gateway_events[0].1,
        GatewayEvent::Established { version: 1, hello } if hello.agent_version == "test"
    ));
    assert!(p.agent.is_established());
}

#[test]
fn heartbeats_measure_rtt_and_keep_the_session_alive() {
    let mut p = pair().with_chunking(7);
    p.run_for(Duration::from_secs(60));
    let rtts: Vec<_> = p
        .agent_events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::Rtt(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert!(
        rtts.len() >= 58,
        "one RTT per heartbeat, got {}",
        rtts.len()
    );
    assert!(rtts.iter().all(|r| *r == LATENCY * 2));
    // The agent reports its RTT to the gateway in the next heartbeat.
    assert!(p.gateway_events.iter().any(|(_, e)| *e
        == GatewayEvent::Heartbeat {
            rtt: Some(LATENCY * 2),
            pause: None,
            services: None,
        }));
    assert!(gateway_closed(&p).is_none() && agent_closed(&p).is_none());
}

#[test]
fn gateway_closes_a_silent_agent_within_three_intervals() {
    let mut p = pair();
    p.run_for(Duration::from_millis(2500));
    let killed_at = p.elapsed();
    p.silence_agent();
    p.run_for(Duration::from_secs(10));
    let (t, info) = gateway_closed(&p).expect("gateway closed the session");
    assert_eq!(info.code, ErrorCode::HEARTBEAT_TIMEOUT);
    assert!(!info.by_peer);
    assert!(
        t - killed_at <= INTERVAL * 3,
        "closed {:?} after the kill",
        t - killed_at
    );
}

#[test]
fn partition_longer_than_the_dead_interval_closes_both_sides() {
    let mut p = pair();
    p.run_for(Duration::from_secs(2));
    p.partition(true);
    p.run_for(Duration::from_secs(5));
    assert_eq!(
        gateway_closed(&p).unwrap().1.code,
        ErrorCode::HEARTBEAT_TIMEOUT
    );
    assert_eq!(
        agent_closed(&p).unwrap().1.code,
        ErrorCode::HEARTBEAT_TIMEOUT
    );
}

#[test]
fn short_partition_is_survived() {
    let mut p = pair();
    p.run_for(Duration::from_secs(2));
    p.partition(true);
    p.run_for(Duration::from_millis(1500));
    p.partition(false);
    p.run_for(Duration::from_secs(10));
    assert!(gateway_closed(&p).is_none() && agent_closed(&p).is_none());
}

#[test]
fn no_common_version_closes_with_unsupported_version() {
    let mut p = pair_with(Hello {
        versions: vec![7, 8],
        ..Default::default()
    });
    p.run_for(Duration::from_secs(1));
    let (_, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(info.reason.contains("[7, 8]"), "{}", info.reason);
    let (_, info) = agent_closed(&p).unwrap();
    assert!(info.by_peer);
    assert_eq!(info.code, ErrorCode::UNSUPPORTED_VERSION);
}

#[test]
fn garbage_on_the_control_stream_is_a_protocol_error() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    p.inject(To::Gateway, &[0x7f, 0, 0, 0, 1, 0]);
    p.run_for(Duration::from_millis(100));
    let (_, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::PROTOCOL_ERROR);
    assert!(
        info.reason.contains("unknown frame type"),
        "{}",
        info.reason
    );
}

#[test]
fn oversized_frame_is_rejected_from_its_header() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    // Only the header: the limit is enforced before the payload arrives.
    p.inject(To::Gateway, &[0x03, 0x7f, 0xff, 0xff, 0xff]);
    p.run_for(Duration::from_millis(100));
    let (_, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::FRAME_TOO_LARGE);
}

#[test]
fn hello_must_come_first() {
    let mut gw = GatewaySessionConfig::new("s".into());
    gw.heartbeat_interval = INTERVAL;
    let mut p = Pair::new(AgentSessionConfig::new(Hello::default()), gw, LATENCY);
    // A heartbeat before Hello, injected ahead of the agent's own Hello.
    p.inject(
        To::Gateway,
        &Message::Heartbeat(Default::default()).to_bytes(),
    );
    p.run_for(Duration::from_millis(100));
    let (_, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::PROTOCOL_ERROR);
    assert!(info.reason.contains("awaiting Hello"), "{}", info.reason);
}

#[test]
fn missing_hello_times_out() {
    let mut gw = GatewaySessionConfig::new("s".into());
    gw.handshake_timeout = Duration::from_secs(3);
    let mut p = Pair::new(AgentSessionConfig::new(Hello::default()), gw, LATENCY);
    p.partition(true);
    p.run_for(Duration::from_secs(4));
    let (t, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::HANDSHAKE_TIMEOUT);
    assert_eq!(t, Duration::from_secs(3));
}

#[test]
fn go_away_reaches_the_agent_and_the_session_stays_up() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    p.gateway.go_away("draining", Duration::from_secs(5));
    p.run_for(Duration::from_secs(3));
    let g = p
        .agent_events
        .iter()
        .find_map(|(_, e)| match e {
            AgentEvent::GoAway(g) => Some(g.clone()),
            _ => None,
        })
        .expect("GoAway delivered");
    assert_eq!(g.reason, "draining");
    assert_eq!(g.reconnect_within_ms, 5000);
    assert!(agent_closed(&p).is_none());
    p.agent.close(ErrorCode::REPLACED, "new session up");
    p.run_for(Duration::from_millis(100));
    let (_, info) = gateway_closed(&p).unwrap();
    assert_eq!(info.code, ErrorCode::REPLACED);
    assert!(info.by_peer);
}

fn leaving_pair(gateway_offers: bool) -> Pair {
    let mut gw = GatewaySessionConfig::new("s-1".into());
    gw.heartbeat_interval = INTERVAL;
    gw.replica_id = "r1#3".into();
    gw.live_replicas = 3;
    if gateway_offers {
        gw.capabilities.push(LEAVE.into());
    }
    let hello = Hello {
        capabilities: vec![LEAVE.into()],
        ..Default::default()
    };
    Pair::new(AgentSessionConfig::new(hello), gw, LATENCY)
}

#[test]
fn welcome_names_the_replica_and_the_live_replicas_and_acks_carry_changes() {
    let mut p = leaving_pair(true);
    p.run_for(Duration::from_millis(100));
    let welcome = p
        .agent_events
        .iter()
        .find_map(|(_, e)| match e {
            AgentEvent::Established(w) => Some(w.clone()),
            _ => None,
        })
        .expect("established");
    assert_eq!(welcome.replica_id, "r1#3");
    assert_eq!(welcome.live_replicas, 3);
    assert_eq!(p.agent.live_replicas(), 3);
    // The same count in acks says nothing new; a new one is reported once.
    p.run_for(INTERVAL * 2);
    assert!(
        !p.agent_events
            .iter()
            .any(|(_, e)| matches!(e, AgentEvent::LiveReplicas(_)))
    );
    p.gateway.set_live_replicas(2);
    p.run_for(INTERVAL * 3);
    let changes: Vec<u32> = p
        .agent_events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::LiveReplicas(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(changes, [2]);
    assert_eq!(p.agent.live_replicas(), 2);
}

#[test]
fn a_leaving_agent_is_reported_once_and_the_session_stays_up() {
    let mut p = leaving_pair(true);
    p.run_for(Duration::from_millis(100));
    assert!(p.agent.can_leave());
    assert!(p.agent.leave("a newer session took over"));
    assert!(!p.agent.can_leave() && !p.agent.leave("again"), "once");
    p.run_for(INTERVAL * 4);
    let left: Vec<&GatewayEvent> = p
        .gateway_events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| matches!(e, GatewayEvent::Left { .. }))
        .collect();
    assert_eq!(
        left,
        [&GatewayEvent::Left {
            reason: "a newer session took over".into()
        }]
    );
    assert!(p.gateway.has_left() && p.agent.has_left());
    // Heartbeats go on: the gateway closes the session when its streams are done.
    assert!(gateway_closed(&p).is_none() && agent_closed(&p).is_none());
    p.gateway
        .close(ErrorCode::REPLACED, "the agent left this session");
    p.run_for(Duration::from_millis(100));
    let (_, info) = agent_closed(&p).expect("closed");
    assert_eq!(info.code, ErrorCode::REPLACED);
    assert!(info.by_peer);
}

#[test]
fn an_agent_never_leaves_a_gateway_that_does_not_offer_it_and_such_a_gateway_refuses_a_leave() {
    let mut p = leaving_pair(false);
    p.run_for(Duration::from_millis(100));
    assert!(!p.agent.can_leave());
    assert!(!p.agent.leave("a newer session took over"));
    p.run_for(INTERVAL);
    assert!(gateway_closed(&p).is_none());
    // An agent that sends one anyway breaks the protocol of such a gateway, as it always did.
    p.inject(
        To::Gateway,
        &Message::GoAway(GoAway {
            reason: "leaving".into(),
            ..Default::default()
        })
        .to_bytes(),
    );
    p.run_for(Duration::from_millis(100));
    assert_eq!(
        gateway_closed(&p).unwrap().1.code,
        ErrorCode::PROTOCOL_ERROR
    );
}

#[test]
fn a_go_away_carries_the_replica_to_avoid_and_its_kind() {
    let mut p = leaving_pair(true);
    p.run_for(Duration::from_millis(100));
    p.gateway.send_go_away(GoAway {
        reason: "rebalancing".into(),
        reconnect_within_ms: 2000,
        avoid_replica: "r1#3".into(),
        kind: GoAwayKind::Rebalance as i32,
    });
    p.run_for(Duration::from_millis(100));
    let g = p
        .agent_events
        .iter()
        .find_map(|(_, e)| match e {
            AgentEvent::GoAway(g) => Some(g.clone()),
            _ => None,
        })
        .expect("GoAway delivered");
    assert_eq!(g.avoid_replica, "r1#3");
    assert_eq!(g.go_away_kind(), GoAwayKind::Rebalance);
}

#[test]
fn a_held_hello_is_welcomed_or_refused_with_a_retry_after() {
    for welcome in [true, false] {
        let mut gw = GatewaySessionConfig::new("s-1".into());
        gw.heartbeat_interval = INTERVAL;
        gw.hold_hello = true;
        let hello = Hello {
            sessions_held: 1,
            ..Default::default()
        };
        let mut p = Pair::new(AgentSessionConfig::new(hello), gw, LATENCY);
        p.run_for(Duration::from_millis(100));
        assert!(matches!(
            &p.gateway_events[..],
            [(_, GatewayEvent::Hello { hello, version: 1 })] if hello.sessions_held == 1
        ));
        // Nothing answered while the gateway decides.
        assert!(p.agent_events.is_empty());
        if welcome {
            p.gateway.welcome();
            p.run_for(Duration::from_millis(100));
            assert!(
                p.agent_events
                    .iter()
                    .any(|(_, e)| matches!(e, AgentEvent::Established(_)))
            );
            assert!(
                p.gateway_events
                    .iter()
                    .any(|(_, e)| matches!(e, GatewayEvent::Established { .. }))
            );
        } else {
            p.gateway.refuse(
                ErrorCode::BUSY,
                "over its share",
                Duration::from_millis(1500),
            );
            p.run_for(Duration::from_millis(100));
            let (_, info) = agent_closed(&p).expect("refused");
            assert_eq!(info.code, ErrorCode::BUSY);
            assert!(info.by_peer);
            assert_eq!(info.retry_after, Some(Duration::from_millis(1500)));
            assert!(
                !p.agent_events
                    .iter()
                    .any(|(_, e)| matches!(e, AgentEvent::Established(_)))
            );
        }
    }
}

#[test]
fn a_hello_held_without_a_decision_times_out() {
    let mut gw = GatewaySessionConfig::new("s-1".into());
    gw.hold_hello = true;
    gw.handshake_timeout = Duration::from_secs(2);
    let mut p = Pair::new(AgentSessionConfig::new(Hello::default()), gw, LATENCY);
    p.run_for(Duration::from_secs(3));
    let (t, info) = gateway_closed(&p).expect("closed");
    assert_eq!(info.code, ErrorCode::HANDSHAKE_TIMEOUT);
    assert_eq!(t, Duration::from_secs(2));
}

#[test]
fn stream_ending_mid_frame_is_truncation() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    p.inject(To::Gateway, &[0x03, 0, 0]);
    p.run_for(Duration::from_millis(100));
    p.gateway.handle_eof(p.now);
    p.run_for(Duration::from_millis(1));
    assert_eq!(
        gateway_closed(&p).unwrap().1.code,
        ErrorCode::PROTOCOL_ERROR
    );
}

// === Renewal ===

fn renewing_pair() -> Pair {
    let mut gw = GatewaySessionConfig::new("s-1".into());
    gw.heartbeat_interval = INTERVAL;
    gw.capabilities = vec![RENEW.into()];
    Pair::new(AgentSessionConfig::new(Hello::default()), gw, LATENCY)
}

fn renew_requests(p: &Pair) -> Vec<RenewRequest> {
    p.gateway_events
        .iter()
        .filter_map(|(_, e)| match e {
            GatewayEvent::RenewRequested(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn renewed(p: &Pair) -> Vec<RenewResponse> {
    p.agent_events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::Renewed(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_renewal_round_trips_on_the_control_stream_one_at_a_time() {
    let mut p = renewing_pair();
    assert!(!p.agent.can_renew(), "not before Welcome");
    assert_eq!(p.agent.renew("early".into()), None);
    p.run_for(Duration::from_millis(100));
    assert!(p.agent.can_renew());
    let id = p.agent.renew("csr-1".into()).expect("sent");
    assert!(!p.agent.can_renew(), "one renewal at a time");
    assert_eq!(p.agent.renew("csr-2".into()), None);
    p.run_for(Duration::from_millis(100));
    let reqs = renew_requests(&p);
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].id, reqs[0].csr_pem.as_str()), (id, "csr-1"));
    // An answer to something else is dropped; the right one reaches the agent.
    p.gateway.renew_response(RenewResponse {
        id: id + 7,
        ..Default::default()
    });
    p.gateway.renew_response(RenewResponse {
        id,
        certificate_pem: "cert".into(),
        ca_pem: "bundle".into(),
        ..Default::default()
    });
    p.run_for(Duration::from_millis(100));
    let got = renewed(&p);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].id, got[0].code), (id, 0));
    assert_eq!(got[0].certificate_pem, "cert");
    assert!(p.agent.can_renew());
    // Heartbeats went on around it.
    p.run_for(Duration::from_secs(5));
    assert!(agent_closed(&p).is_none() && gateway_closed(&p).is_none());
}

#[test]
fn renewal_requests_faster_than_the_minimum_interval_are_refused_by_the_session() {
    let mut p = renewing_pair();
    p.run_for(Duration::from_millis(100));
    for round in 0..2 {
        let id = p.agent.renew(format!("csr-{round}")).expect("sent");
        p.run_for(Duration::from_millis(100));
        p.gateway.renew_response(RenewResponse {
            id,
            ..Default::default()
        });
        p.run_for(Duration::from_millis(100));
    }
    // The second came 200 ms after the first: answered by the session, never handed out.
    assert_eq!(renew_requests(&p).len(), 1);
    let got = renewed(&p);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].code, 8, "RESOURCE_EXHAUSTED");
    assert!(got[1].message.contains("too often"), "{}", got[1].message);
    // A second later it is handed out again.
    p.run_for(Duration::from_secs(1));
    p.agent.renew("csr-late".into()).expect("sent");
    p.run_for(Duration::from_millis(100));
    assert_eq!(renew_requests(&p).len(), 2);
    assert!(gateway_closed(&p).is_none());
}

#[test]
fn an_agent_does_not_ask_a_gateway_that_does_not_renew() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    assert!(p.agent.is_established());
    assert!(!p.agent.can_renew());
    assert_eq!(p.agent.renew("csr".into()), None);
}

#[test]
fn a_gateway_that_does_not_renew_refuses_a_request_and_keeps_the_session() {
    use tunnel_proto::frame::decode_frame;
    use tunnel_proto::session::GatewaySession;
    let now = std::time::Instant::now();
    let mut gw = GatewaySession::new(GatewaySessionConfig::new("s-1".into()), now);
    let hello = Hello {
        versions: vec![1],
        ..Default::default()
    };
    let mut wire = Message::Hello(hello).to_bytes().to_vec();
    wire.extend_from_slice(
        &Message::RenewRequest(RenewRequest {
            id: 9,
            csr_pem: "csr".into(),
        })
        .to_bytes(),
    );
    gw.handle_input(&wire, now);
    let mut out = Vec::new();
    while let Some(b) = gw.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let mut sent = Vec::new();
    let mut rest = &out[..];
    while let Some((m, used)) = decode_frame(rest, usize::MAX).unwrap() {
        sent.push(m);
        rest = &rest[used..];
    }
    match &sent[..] {
        [Message::Welcome(w), Message::RenewResponse(r)] => {
            assert!(w.capabilities.is_empty());
            assert_eq!((r.id, r.code), (9, 12), "UNIMPLEMENTED");
            assert!(r.certificate_pem.is_empty());
        }
        other => panic!("unexpected frames {other:?}"),
    }
    let mut events = Vec::new();
    while let Some(e) = gw.poll_event() {
        events.push(e);
    }
    assert!(
        events
            .iter()
            .all(|e| matches!(e, GatewayEvent::Established { .. })),
        "{events:?}"
    );
    assert!(!gw.is_closed());
}

#[test]
fn an_unsolicited_renew_response_is_a_protocol_error() {
    let mut p = pair();
    p.run_for(Duration::from_millis(100));
    p.inject(
        To::Agent,
        &Message::RenewResponse(RenewResponse {
            id: 3,
            certificate_pem: "not asked for".into(),
            ..Default::default()
        })
        .to_bytes(),
    );
    p.run_for(Duration::from_millis(100));
    assert_eq!(agent_closed(&p).unwrap().1.code, ErrorCode::PROTOCOL_ERROR);
}

/// What a driver that knows only the `Session` face sees: `close_info` agrees with the
/// `Closed` event on both sides, and a closed machine asks for no more wake-ups.
#[test]
fn the_session_face_tells_a_driver_how_each_side_ended() {
    fn closed<S: Session>(s: &S) -> Option<CloseInfo> {
        s.close_info().cloned()
    }
    let mut p = pair();
    p.run_for(Duration::from_secs(3));
    assert_eq!(closed(&p.agent), None);
    assert_eq!(closed(&p.gateway), None);
    Session::close(&mut p.gateway, ErrorCode::SHUTDOWN, "gateway shutting down");
    p.run_for(Duration::from_secs(1));
    let gateway = closed(&p.gateway).expect("gateway closed");
    let agent = closed(&p.agent).expect("agent closed");
    assert_eq!(Some(&gateway), gateway_closed(&p).map(|(_, c)| c).as_ref());
    assert_eq!(Some(&agent), agent_closed(&p).map(|(_, c)| c).as_ref());
    assert!(!gateway.by_peer && agent.by_peer);
    assert_eq!(agent.code, ErrorCode::SHUTDOWN);
    assert_eq!(agent.reason, "gateway shutting down");
    assert_eq!(Session::poll_timeout(&p.agent), None);
    assert_eq!(Session::poll_timeout(&p.gateway), None);
}

fn services_heard(p: &Pair) -> Vec<(Duration, Vec<ServiceEntry>)> {
    p.gateway_events
        .iter()
        .filter_map(|(t, e)| match e {
            GatewayEvent::Heartbeat {
                services: Some(s), ..
            } => Some((*t, s.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_changed_allow_list_reaches_the_gateway_in_one_early_heartbeat_and_only_then() {
    let entry = |name: &str, kind: &str| ServiceEntry {
        name: name.into(),
        kind: kind.into(),
    };
    let mut p = pair_with(Hello {
        agent_version: "test".into(),
        services: vec![entry("api", "grpc")],
        ..Default::default()
    });
    p.run_for(Duration::from_millis(100));
    assert!(matches!(
        &p.gateway_events[0].1,
        GatewayEvent::Established { hello, .. } if hello.services == vec![entry("api", "grpc")]
    ));
    // The same list again (a reload that changed something else) sends nothing.
    let now = p.now;
    p.agent.set_services(vec![entry("api", "grpc")], now);
    p.run_for(Duration::from_secs(5));
    assert!(services_heard(&p).is_empty());
    // A new list goes at once, not at the next heartbeat's time, and once.
    let changed_at = p.elapsed();
    let now = p.now;
    p.agent
        .set_services(vec![entry("api", "grpc"), entry("db", "tcp")], now);
    p.run_for(Duration::from_secs(5));
    let heard = services_heard(&p);
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].0, changed_at + LATENCY);
    assert_eq!(heard[0].1, vec![entry("api", "grpc"), entry("db", "tcp")]);
}
