//! Limits against abuse (`[limits]`): each limit refuses with the right gRPC status and a
//! message naming the limit, and its counter moves; a connection or stream that opens and
//! never sends (slowloris) is closed at its timeout on every listener; and 10,000 bogus
//! handshakes from one address leave a real agent served, with the gateway's memory bounded
//! and QUIC Retry answering the flood.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::{CancelCommandRequest, ListAgentsRequest, ListCommandsRequest, StreamChunk};
use tether_e2e::*;
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;
use tonic::Code;
use tunnel_proto::ErrorCode;
use tunnel_proto::message::{Hello, Message};

const T: Duration = Duration::from_secs(20);

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn rejections(limit: &str) -> f64 {
    metric("tether_gateway_limit_rejections_total", &[("limit", limit)])
}

fn idle_timeouts(place: &str) -> f64 {
    metric("tether_gateway_idle_timeouts_total", &[("where", place)])
}

/// A gateway with `edit` applied to the test config, and agent `acme/a` connected with the demo
/// upstream as its default service and a TCP echo as `tcp`.
async fn scene(
    edit: impl FnOnce(&mut tether_gateway::GatewayConfig),
) -> (Pki, TestGateway, TestAgent, DemoUpstream) {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    edit(&mut cfg);
    let gw = TestGateway::start_with(cfg, any()).await;
    let upstream = DemoUpstream::start().await;
    let tcp = tcp_echo_server().await;
    let mut acfg = agent_config(&pki.agent("acme/a"), gw.handle.tunnel_addr);
    with_service(&mut acfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut acfg, "tcp", &tcp.to_string(), ServiceKind::Tcp);
    let agent = TestAgent::start(&acfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/a") == 1).await;
    (pki, gw, agent, upstream)
}

// === Streams per agent ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_tcp_streams_beyond_streams_per_agent_are_resource_exhausted() {
    let (pki, gw, agent, _up) = scene(|c| c.limits.streams_per_agent = 2).await;
    // Below limits.retry_above, an agent's handshake costs no Retry round trip.
    assert_eq!(metric("tether_gateway_quic_retries_total", &[]), 0.0);
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/a"), None)).await;
    // Two bidi calls held open, each proven established by one reply.
    let mut held = Vec::new();
    for i in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = echo
            .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("bidi")
            .into_inner();
        tx.send(echo_req(&format!("held {i}"))).await.unwrap();
        replies.next().await.expect("reply").expect("reply ok");
        held.push((tx, replies));
    }
    let before = rejections("streams_per_agent");
    let err = echo.unary(echo_req("one too many")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("acme/a") && err.message().contains("limits.streams_per_agent"),
        "{}",
        err.message()
    );
    // A TCP stream counts against the same limit.
    let ch = gw.channel(&pki.client("api")).await.unwrap();
    let mut streams = StreamsClient::with_interceptor(ch, Route::new(Some("acme/a"), Some("tcp")));
    let err = streams
        .open(tokio_stream::iter(vec![StreamChunk {
            data: b"x".to_vec().into(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(rejections("streams_per_agent"), before + 2.0);

    // Ending one held call frees its slot.
    let (tx, mut replies) = held.pop().unwrap();
    drop(tx);
    while replies.next().await.is_some() {}
    let deadline = Instant::now() + T;
    loop {
        match echo.unary(echo_req("fits again")).await {
            Ok(r) => {
                assert_eq!(r.into_inner().message, "fits again");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(Instant::now() < deadline, "the slot was never released");
                tokio::task::yield_now().await;
            }
        }
    }
    drop(held);
    agent.stop().await;
    gw.stop().await;
}

// === Pending commands per agent ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_beyond_pending_commands_per_agent_is_resource_exhausted_and_not_stored() {
    let (pki, gw, agent, _up) = scene(|c| c.limits.pending_commands_per_agent = 3).await;
    // Offline, so commands stay queued.
    agent.stop().await;
    wait_until("agent gone", T, || gw.sessions_of("acme/a") == 0).await;
    let mut client = gw.commands(&pki).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = client
            .submit(submit_req("acme/a", "echo", format!("c{i}")))
            .await
            .expect("under the limit")
            .into_inner();
        ids.push(r.id);
    }
    let before = rejections("pending_commands_per_agent");
    let err = client
        .submit(submit_req("acme/a", "echo", "c3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("acme/a")
            && err.message().contains("limits.pending_commands_per_agent"),
        "{}",
        err.message()
    );
    assert_eq!(rejections("pending_commands_per_agent"), before + 1.0);
    let listed = client
        .list(ListCommandsRequest {
            agent: "acme/a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(listed.len(), 3, "the refused command was not stored");
    // A command reaching a final state frees its slot.
    client
        .cancel(CancelCommandRequest { id: ids[0].clone() })
        .await
        .expect("cancel");
    client
        .submit(submit_req("acme/a", "echo", "c4"))
        .await
        .expect("a slot was freed");
    gw.stop().await;
}

// === Message and header sizes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn northbound_messages_and_headers_over_their_limits_are_resource_exhausted() {
    let (pki, gw, agent, _up) = scene(|c| {
        c.limits.max_message_size = 1024;
        c.limits.max_header_list_size = 4096;
    })
    .await;
    let mut agents = gw.client(&pki, "api").await;
    let before = rejections("message_size");
    let err = agents
        .list(ListAgentsRequest {
            tenant: "x".repeat(2000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    assert_eq!(rejections("message_size"), before + 1.0);

    let before = rejections("header_list_size");
    let mut req = tonic::Request::new(ListAgentsRequest::default());
    req.metadata_mut()
        .insert("x-padding", "p".repeat(5000).parse().unwrap());
    let err = agents.list(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.max_header_list_size"),
        "{}",
        err.message()
    );
    assert_eq!(rejections("header_list_size"), before + 1.0);
    // The same header on a relayed call.
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/a"), None)).await;
    let mut req = tonic::Request::new(echo_req("big"));
    req.metadata_mut()
        .insert("x-padding", "p".repeat(5000).parse().unwrap());
    assert_eq!(
        echo.unary(req).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    // Within the limits all is well, on the same connection.
    agents
        .list(ListAgentsRequest::default())
        .await
        .expect("within limits");
    echo.unary(echo_req("small")).await.expect("within limits");
    agent.stop().await;
    gw.stop().await;
}

// === Slowloris ===

const IDLE: Duration = Duration::from_secs(1);
/// Slack for scheduling on a shared 2-core machine (not a performance bound).
const MARGIN: Duration = Duration::from_secs(3);

/// Reads `r` until the peer closes; how long that took from `start`.
async fn closed_after(mut r: impl tokio::io::AsyncRead + Unpin, start: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(IDLE * 10 + MARGIN, read_all)
        .await
        .expect("the gateway closed the connection");
    start.elapsed()
}

fn assert_window(what: &str, took: Duration, timeout: Duration, extra: Duration) {
    assert!(
        took >= timeout && took < timeout + extra + MARGIN,
        "{what}: closed after {took:?}, want [{timeout:?}, {:?})",
        timeout + extra + MARGIN
    );
    eprintln!("{what}: closed after {took:?} (timeout {timeout:?})");
}

async fn slow_gateway() -> (Pki, TestGateway) {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.tunnel.handshake_timeout = IDLE;
    cfg.limits.northbound_handshake_timeout = IDLE;
    cfg.limits.northbound_idle_timeout = IDLE;
    let gw = TestGateway::start_with(cfg, any()).await;
    (pki, gw)
}

fn client_tls(files: &CertFiles, alpn: &[u8], with_cert: bool) -> Arc<rustls::ClientConfig> {
    let roots = tether_runtime::tls::load_roots(&files.ca).unwrap();
    let b = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots);
    let mut tls = if with_cert {
        b.with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).unwrap(),
            tether_runtime::tls::load_key(&files.key).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(tls)
}

/// Connects to `addr`, sends nothing, and checks the gateway closes the connection at `IDLE`
/// and counts it under `idle_timeouts_total{where=place}`.
async fn silent_tcp_is_closed_at_the_timeout(addr: SocketAddr, place: &str, what: &str) {
    let before = idle_timeouts(place);
    // Every clock starts before the connection does: the gateway's starts later, never earlier.
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let took = closed_after(tcp, start).await;
    assert_window(what, took, IDLE, Duration::ZERO);
    wait_until("counted", T, || idle_timeouts(place) == before + 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn northbound_connections_that_never_finish_tls_or_never_call_are_closed_at_their_timeouts() {
    let (pki, gw) = slow_gateway().await;
    let nb = gw.handle.northbound_addr;

    // TCP connected, no ClientHello.
    silent_tcp_is_closed_at_the_timeout(nb, "northbound_tls", "northbound, no TLS").await;

    // TLS done, never an HTTP/2 preface or a request.
    let before = idle_timeouts("northbound_idle");
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(nb).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&pki.client("api"), b"h2", true))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS");
    let took = closed_after(tls, start).await;
    // A connection that never sent its preface cannot finish a GOAWAY: dropped after a 1 s grace.
    assert_window("northbound, no request", took, IDLE, Duration::from_secs(1));
    wait_until("counted", T, || {
        idle_timeouts("northbound_idle") == before + 1.0
    })
    .await;

    // A real client that goes quiet is closed too, and its next call reconnects.
    let mut agents = gw.client(&pki, "api").await;
    agents.list(ListAgentsRequest::default()).await.unwrap();
    wait_until("idle client closed", T, || {
        idle_timeouts("northbound_idle") == before + 2.0
    })
    .await;
    // Closed gracefully (GOAWAY with no call open): the client reconnects for its next call.
    // (A client may see the close race its call once, as UNAVAILABLE, which gRPC retries.)
    if let Err(e) = agents.list(ListAgentsRequest::default()).await {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        agents
            .list(ListAgentsRequest::default())
            .await
            .expect("the client reconnects");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_tcp_and_enrollment_connections_that_stall_are_closed_at_the_handshake_timeout() {
    let (pki, gw) = slow_gateway().await;
    let tunnel = gw.handle.tunnel_addr;

    // The TCP fallback: connected, no ClientHello.
    silent_tcp_is_closed_at_the_timeout(tunnel, "tunnel_tcp", "tunnel TCP, no ClientHello").await;

    // The enrollment side door: a ClientHello for tether-enroll/1, then nothing.
    let before = idle_timeouts("enrollment");
    let mut tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    let mut conn = rustls::ClientConnection::new(
        client_tls(
            &pki.agent("acme/new"),
            tether_gateway::identity::enrollment::ENROLL_ALPN,
            false,
        ),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let start = Instant::now();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &hello)
        .await
        .unwrap();
    let took = closed_after(tcp, start).await;
    assert_window("enrollment, stalled TLS", took, IDLE, Duration::ZERO);
    wait_until("counted", T, || idle_timeouts("enrollment") == before + 1.0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_and_control_streams_that_never_send_are_closed_at_the_handshake_timeout()
{
    let (pki, gw) = slow_gateway().await;
    let raw = RawAgent::new(&pki.agent("acme/slow"), true, tunnel_proto::ALPN);

    // Connected, but the control stream is never opened.
    let before = idle_timeouts("tunnel_quic");
    let start = Instant::now();
    let conn = raw
        .endpoint
        .connect(gw.handle.tunnel_addr, "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let why = tokio::time::timeout(IDLE * 10, conn.closed())
        .await
        .expect("closed");
    assert_window(
        "QUIC, no control stream",
        start.elapsed(),
        IDLE,
        Duration::ZERO,
    );
    assert_eq!(
        app_close_code(&why),
        Some(ErrorCode::HANDSHAKE_TIMEOUT.0.into())
    );
    wait_until("counted", T, || {
        idle_timeouts("tunnel_quic") == before + 1.0
    })
    .await;

    // A control stream whose Hello never completes: one byte of it, then nothing.
    let conn = raw
        .endpoint
        .connect(gw.handle.tunnel_addr, "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello::default()).to_bytes();
    let start = Instant::now();
    send.write_all(&hello[..1]).await.unwrap();
    let why = tokio::time::timeout(IDLE * 10, conn.closed())
        .await
        .expect("closed");
    assert_window("QUIC, stalled Hello", start.elapsed(), IDLE, Duration::ZERO);
    assert_eq!(
        app_close_code(&why),
        Some(ErrorCode::HANDSHAKE_TIMEOUT.0.into())
    );
    gw.stop().await;
}

// === Handshake flood ===

/// A metric of a gateway process (its `/metrics`), summed over series whose labels contain
/// `label` (`k="v"`, or empty for any).
fn process_metric(ops: SocketAddr, name: &str, label: &str) -> f64 {
    let (status, body) =
        tether_runtime::ops::probe(ops, "/metrics", Duration::from_secs(5)).expect("scrape");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split(' ').next().unwrap_or("");
            let n = series.split('{').next().unwrap_or("");
            n == name && series.contains(label)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// QUIC clients on `from` without a client certificate.
fn bogus_endpoints(pki: &Pki, from: &str, n: usize) -> Vec<quinn::Endpoint> {
    let tls = client_tls(&pki.agent("acme/x"), tunnel_proto::ALPN, false);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().unwrap()));
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    (0..n)
        .map(|_| {
            let mut e = quinn::Endpoint::client(format!("{from}:0").parse().unwrap())
                .expect("attacker endpoint (127.0.0.2 is loopback on Linux)");
            e.set_default_client_config(client.clone());
            e
        })
        .collect()
}

/// `n` datagrams shaped like QUIC v1 Initials (long header, random connection ids) whose
/// payload is noise: the gateway must drop them without answering.
async fn garbage_initials(from: &str, to: SocketAddr, n: usize) {
    let sock = tokio::net::UdpSocket::bind(format!("{from}:0"))
        .await
        .unwrap();
    for i in 0..n {
        let mut p = vec![0u8; 1200];
        p[0] = 0xc3;
        p[1..5].copy_from_slice(&1u32.to_be_bytes());
        p[5] = 8;
        p[6..14].copy_from_slice(&rand_bytes(i as u64));
        p[14] = 8;
        p[15..23].copy_from_slice(&rand_bytes(!(i as u64)));
        p[23] = 0; // no token
        p[24] = 0x44; // length 1175 (2-byte varint)
        p[25] = 0x97;
        for (j, b) in p[26..].iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(31) ^ (i as u8);
        }
        let _ = sock.send_to(&p, to).await;
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn rand_bytes(seed: u64) -> [u8; 8] {
    // SplitMix64: distinct ids without a dependency.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_be_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bogus_handshakes_from_one_address_leave_real_agents_served() {
    const BOGUS: usize = 10_000;
    const IN_FLIGHT: usize = 256;
    let pki = Pki::new();
    let gw = GatewayProcess::spawn_configured(&pki, "[limits]\nretry_above = 100\n").await;
    let upstream = DemoUpstream::start().await;
    let mut acfg = agent_config(&pki.agent("acme/a"), gw.tunnel);
    with_service(&mut acfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&acfg);
    let ch = gw.channel(&pki.client("api")).await;
    wait_connected(ch.clone(), "acme/a", T).await;
    let echo = EchoClient::with_interceptor(ch.clone(), Route::new(Some("acme/a"), None));
    for _ in 0..20 {
        echo.clone().unary(echo_req("warm")).await.expect("warm-up");
    }
    let rss_before = rss_kib(gw.pid());
    let retries_before = process_metric(gw.ops, "tether_gateway_quic_retries_total", "");
    let refused_before = process_metric(
        gw.ops,
        "tether_gateway_limit_rejections_total",
        "limit=\"handshake_rate\"",
    );

    // The real caller: one call after another for as long as the flood lasts.
    let stop = tether_runtime::CancellationToken::new();
    let caller = {
        let (stop, mut echo) = (stop.clone(), echo.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.is_cancelled() {
                let t = Instant::now();
                let r = tokio::time::timeout(T, echo.unary(echo_req("during the flood"))).await;
                let r = r.expect("a call during the flood took over 20 s");
                assert_eq!(
                    r.expect("call during the flood").into_inner().message,
                    "during the flood"
                );
                latencies.push(t.elapsed());
            }
            latencies
        })
    };

    // The flood, from 127.0.0.2: real QUIC handshakes without a certificate, and garbage.
    let started = Instant::now();
    let endpoints = bogus_endpoints(&pki, "127.0.0.2", 8);
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let garbage = tokio::spawn(garbage_initials("127.0.0.2", gw.tunnel, BOGUS));
    let mut second_agent = None;
    let mut ended = 0usize;
    for i in 0..BOGUS {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let e = endpoints[i % endpoints.len()].clone();
        let to = gw.tunnel;
        tasks.spawn(async move {
            let _permit = permit;
            let Ok(connecting) = e.connect(to, "localhost") else {
                return false;
            };
            // Refused (rate), or the TLS refusal of a missing certificate: either way it ends.
            match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                Ok(Ok(conn)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                    true
                }
                Ok(Err(_)) => true,
                Err(_) => false,
            }
        });
        while let Some(r) = tasks.try_join_next() {
            ended += usize::from(r.unwrap());
        }
        if i == BOGUS / 2 {
            // A new real agent connects in the middle of the flood (from another address).
            let cfg = agent_config(&pki.agent("acme/b"), gw.tunnel);
            second_agent = Some(TestAgent::start(&cfg));
        }
    }
    while let Some(r) = tasks.join_next().await {
        ended += usize::from(r.unwrap());
    }
    garbage.await.unwrap();
    let flood = started.elapsed();
    wait_connected(ch.clone(), "acme/b", T).await;
    stop.cancel();
    let mut latencies = caller.await.expect("every call during the flood succeeded");
    let rss_after = rss_kib(gw.pid());
    let retries = process_metric(gw.ops, "tether_gateway_quic_retries_total", "") - retries_before;
    let refused = process_metric(
        gw.ops,
        "tether_gateway_limit_rejections_total",
        "limit=\"handshake_rate\"",
    ) - refused_before;

    let calls = latencies.len();
    let (p50, p99) = (
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
    );
    let max = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "flood: {BOGUS} bogus QUIC handshakes + {BOGUS} garbage Initials from 127.0.0.2 in {flood:.2?} \
         ({:.0} handshakes/s; {ended} ended with an answer); Retry sent {retries}, refused by rate {refused}; \
         real agent: {calls} calls, p50 {p50:.2?}, p99 {p99:.2?}, max {max:.2?}; \
         gateway RSS {} MiB -> {} MiB",
        BOGUS as f64 / flood.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(calls > 0, "the real caller made calls during the flood");
    assert!(
        max < Duration::from_secs(5),
        "a call took {max:?} during the flood"
    );
    assert!(retries > 0.0, "the flood was answered with Retry");
    assert!(refused > 0.0, "the flood's address was rate limited");
    assert_eq!(ended, BOGUS, "every bogus handshake got an answer");
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    if let Some(b) = second_agent {
        b.stop().await;
    }
    agent.stop().await;
}
