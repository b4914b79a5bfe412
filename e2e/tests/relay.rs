//! Transparent gRPC relay: real tonic upstream behind a real agent, callers through the real
//! gateway over real QUIC. All four call shapes, metadata and trailers both ways, deadlines,
//! cancellation, every error status, and 1,000 concurrent streams through one agent.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::agent::v1::GetAgentInfoRequest;
use tether_api::agent::v1::agent_info_client::AgentInfoClient;
use tether_api::demo::v1::EchoRequest;
use tether_e2e::*;
use tokio_stream::StreamExt;
use tonic::Code;

const T: Duration = Duration::from_secs(20);

struct Scene {
    pki: Pki,
    gw: TestGateway,
    upstream: DemoUpstream,
    agent: TestAgent,
}

async fn scene() -> Scene {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/eu-1"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "echo", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/eu-1") == 1).await;
    Scene {
        pki,
        gw,
        upstream,
        agent,
    }
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_shapes_relay_with_metadata_both_ways() {
    let s = scene().await;
    let mut echo = echo_via(&s.gw, &s.pki, Route::new(Some("acme/eu-1"), None)).await;

    // Unary, with request metadata seen upstream and response metadata seen here.
    let mut r = tonic::Request::new(req("hello"));
    r.metadata_mut()
        .insert("x-request-id", "r-1".parse().unwrap());
    let resp = echo.unary(r).await.expect("unary");
    assert_eq!(resp.metadata().get("x-echo-initial").unwrap(), "yes");
    let body = resp.into_inner();
    assert_eq!(body.message, "hello");
    assert_eq!(body.seen_metadata, vec!["x-request-id=r-1".to_string()]);

    // Server streaming, client streaming, bidi (replies while the request stream is open).
    call_every_shape(&mut echo).await;

    // Counted at tenant level, with the final status; bytes both ways.
    let ok = metric(
        "tether_gateway_relay_calls_total",
        &[("kind", "grpc"), ("tenant", "acme"), ("code", "Ok")],
    );
    assert!(ok >= 4.0, "relay calls counted: {ok}");
    assert!(
        metric(
            "tether_gateway_relay_bytes_total",
            &[("direction", "to_agent")]
        ) > 0.0
    );
    assert!(
        metric(
            "tether_gateway_relay_bytes_total",
            &[("direction", "from_agent")]
        ) > 0.0
    );
    assert!(
        metric(
            "tether_gateway_relay_first_byte_seconds_count",
            &[("kind", "grpc")]
        ) >= 4.0
    );
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_message_and_custom_trailers_reach_the_caller() {
    let s = scene().await;
    let mut echo = echo_via(&s.gw, &s.pki, Route::new(Some("acme/eu-1"), Some("echo"))).await;
    let e = echo
        .unary(EchoRequest {
            message: "nope: ünïcode".into(),
            fail_with_code: Code::AlreadyExists as u32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(e.message(), "nope: ünïcode");
    assert_eq!(
        e.metadata().get("x-echo-trailer").unwrap(),
        "failed-on-purpose"
    );
    // Also mid-stream: a bidi call that fails after a reply.
    let reqs = tokio_stream::iter(vec![
        req("ok"),
        EchoRequest {
            message: "late".into(),
            fail_with_code: Code::Aborted as u32,
            ..Default::default()
        },
    ]);
    let mut replies = echo.bidi_stream(reqs).await.unwrap().into_inner();
    assert_eq!(replies.next().await.unwrap().unwrap().message, "ok");
    let e = replies.next().await.unwrap().unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Aborted, "late"));
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_errors_have_the_documented_status_codes() {
    let s = scene().await;
    let call = |route: Route| {
        let (gw, pki) = (&s.gw, &s.pki);
        async move {
            echo_via(gw, pki, route)
                .await
                .unary(req("x"))
                .await
                .unwrap_err()
        }
    };
    let e = call(Route::new(Some("acme/nobody"), None)).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = call(Route::new(None, None)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("tether-agent"), "{}", e.message());
    let e = call(Route::new(Some("not-an-id"), None)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Decided by the agent, before it dials anything.
    let calls_before = s.upstream.observed.calls.load(Ordering::SeqCst);
    let e = call(Route::new(Some("acme/eu-1"), Some("billing"))).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("not allow-listed on agent acme/eu-1"),
        "{}",
        e.message()
    );
    assert_eq!(
        s.upstream.observed.calls.load(Ordering::SeqCst),
        calls_before
    );

    // Known agent, not connected.
    s.agent.stop().await;
    wait_until("agent gone", T, || s.gw.sessions_of("acme/eu-1") == 0).await;
    let e = call(Route::new(Some("acme/eu-1"), None)).await;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("not connected"), "{}", e.message());
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_unavailable_naming_the_service() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = agent_config(&pki.agent("acme/eu-1"), gw.handle.tunnel_addr);
    with_service(
        &mut cfg,
        "billing",
        &format!("http://{dead_addr}"),
        ServiceKind::Grpc,
    );
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/eu-1") == 1).await;
    let e = echo_via(&gw, &pki, Route::new(Some("acme/eu-1"), Some("billing")))
        .await
        .unary(req("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("\"billing\"") && e.message().contains(&dead_addr.to_string()),
        "{}",
        e.message()
    );
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_reaches_the_caller_and_cancels_the_upstream_call() {
    let s = scene().await;
    // A bare HTTP/2 client with no timer of its own, so the status is the one the gateway and
    // agent produced (tonic and grpcio clients also run their own timer on grpc-timeout).
    let message = prost::Message::encode_to_vec(&EchoRequest {
        message: "slow".into(),
        delay_ms: 5_000,
        ..Default::default()
    });
    let started = Instant::now();
    let reply = raw_grpc_call(
        s.gw.handle.northbound_addr,
        &s.pki.client("api"),
        "/tether.demo.v1.Echo/Unary",
        &[("tether-agent", "acme/eu-1"), ("grpc-timeout", "300m")],
        &message,
    )
    .await;
    assert_eq!(
        reply.grpc_status(),
        Some(Code::DeadlineExceeded as i32),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "caller waited {:?}",
        started.elapsed()
    );
    wait_until("upstream call cancelled", T, || {
        s.upstream.observed.cancelled.load(Ordering::SeqCst) >= 1
    })
    .await;

    // With a tonic caller, its own timer fires at the same deadline: it never hangs either.
    let mut echo = echo_via(&s.gw, &s.pki, Route::new(Some("acme/eu-1"), None)).await;
    let mut r = tonic::Request::new(EchoRequest {
        message: "slow".into(),
        delay_ms: 5_000,
        ..Default::default()
    });
    r.set_timeout(Duration::from_millis(300));
    let e = tokio::time::timeout(Duration::from_secs(3), echo.unary(r))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    wait_until("second upstream call cancelled", T, || {
        s.upstream.observed.cancelled.load(Ordering::SeqCst) >= 2
    })
    .await;
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_cancellation_reaches_the_upstream_promptly() {
    let s = scene().await;
    let mut echo = echo_via(&s.gw, &s.pki, Route::new(Some("acme/eu-1"), None)).await;
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "tick".into(),
            repeat: 100_000,
            delay_ms: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(s.upstream.observed.cancelled.load(Ordering::SeqCst), 0);
    let dropped = Instant::now();
    drop(stream);
    wait_until("upstream saw the cancel", T, || {
        s.upstream.observed.cancelled.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "took {:?}",
        dropped.elapsed()
    );
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dying_mid_stream_gives_unavailable_within_the_heartbeat_timeout() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await; // heartbeat 500 ms: dead after 1.5 s
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/doomed"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let proc = AgentProcess::spawn(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/doomed") == 1).await;
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/doomed"), None)).await;
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "t".into(),
            repeat: 100_000,
            delay_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let killed = Instant::now();
    proc.signal(nix::sys::signal::Signal::SIGKILL);
    let e = loop {
        match tokio::time::timeout(T, stream.next())
            .await
            .expect("no hang")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("stream ended without an error"),
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        killed.elapsed() <= Duration::from_millis(1500 + 500),
        "took {:?}",
        killed.elapsed()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_agent_info_is_reachable_through_the_relay() {
    let s = scene().await;
    let ch = s.gw.channel(&s.pki.client("api")).await.unwrap();
    let mut info =
        AgentInfoClient::with_interceptor(ch, Route::new(Some("acme/eu-1"), Some("agent")));
    let r = info.get(GetAgentInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(r.agent, "acme/eu-1");
    assert_eq!(r.version, tether_agent::VERSION);
    assert_eq!(r.services, vec!["default".to_string(), "echo".to_string()]);
    assert_eq!(r.gateways.len(), 1);
    assert_eq!(r.gateways[0].transport, "quic");
    assert!(r.capabilities.contains(&"relay".to_string()));
    assert_eq!(r.labels.get("suite").map(String::as_str), Some("e2e"));
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_through_one_agent_succeed() {
    let s = scene().await;
    let echo = echo_via(&s.gw, &s.pki, Route::new(Some("acme/eu-1"), None)).await;
    let calls = (0..1000).map(|i| {
        let mut echo = echo.clone();
        async move {
            // Each call stays open ~200 ms upstream, so they overlap.
            let r = EchoRequest {
                message: format!("c{i}"),
                delay_ms: 200,
                ..Default::default()
            };
            echo.unary(r).await.map(|r| r.into_inner().message)
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let errors: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .take(3)
        .collect();
    assert_eq!(ok, 1000, "first errors: {errors:?}");
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), format!("c{i}"));
    }
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_across_an_agents_sessions() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut cfg = agent_config(&pki.agent("acme/ha"), gw.handle.tunnel_addr);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    cfg.instance_id = Some("r1".into());
    let a1 = TestAgent::start(&cfg);
    cfg.instance_id = Some("r2".into());
    let a2 = TestAgent::start(&cfg);
    wait_until("two sessions", T, || gw.sessions_of("acme/ha") == 2).await;
    let ch = gw.channel(&pki.client("api")).await.unwrap();
    let mut info =
        AgentInfoClient::with_interceptor(ch, Route::new(Some("acme/ha"), Some("agent")));
    let mut instances = std::collections::BTreeSet::new();
    for _ in 0..6 {
        instances.insert(
            info.get(GetAgentInfoRequest {})
                .await
                .unwrap()
                .into_inner()
                .instance_id,
        );
    }
    assert_eq!(
        instances.into_iter().collect::<Vec<_>>(),
        vec!["r1".to_string(), "r2".to_string()]
    );
    a1.stop().await;
    a2.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_retrying_an_unknown_agent_keeps_its_connection() {
    init();
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    // One channel, one HTTP/2 connection. Each request's body comes a moment after its headers,
    // so the gateway refuses the call while the request is still open: that must not count
    // towards the HTTP/2 server's limit of 1,024 locally reset streams per connection.
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/nobody"), None)).await;
    for i in 0..1100 {
        let late = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            EchoRequest {
                message: "x".into(),
                ..Default::default()
            }
        });
        let e = echo.client_stream(late).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "call {i}: {e:?}");
    }
    gw.stop().await;
}
