//! The TCP transport (TLS + HTTP/2, the agent as HTTP/2 server) on loopback, and end-to-end
//! probes that replace a session whose connection looks alive but whose streams do not work.
//! Fallback under a real firewall (UDP blocked) and through a proxy: `firewall.rs`.

use std::time::{Duration, Instant};

use tether_agent::config::{ServiceKind, TransportMode};
use tether_api::demo::v1::EchoRequest;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::{GetAgentRequest, ProxyUse, StreamChunk};
use tether_e2e::{
    DemoUpstream, Pki, Route, TestAgent, TestGateway, agent_config, call_every_shape, echo_via,
    metric, submit_req, tcp_echo_server, wait_final, wait_until, with_service,
};
use tunnel_proto::ErrorCode;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_every_call_shape_a_stream_and_a_command_work_and_it_shows() {
    tether_e2e::init();
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let echo_tcp = tcp_echo_server().await;
    let mut cfg = agent_config(&pki.agent("acme/tcp"), gw.handle.tunnel_addr);
    cfg.transport.mode = TransportMode::Tcp;
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "echo", &echo_tcp.to_string(), ServiceKind::Tcp);
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected over TCP", T, || {
        gw.sessions_of("acme/tcp") == 1
    })
    .await;

    // Agents/Get and the agent's own status say tcp.
    let mut agents = gw.client(&pki, "api").await;
    let a = agents
        .get(GetAgentRequest {
            agent: "acme/tcp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.sessions[0].transport, "tcp");
    assert_eq!(agent.handle.status.sessions()[0].transport, "tcp");
    // No proxy configured: direct; the allow-list as names and kinds; one session wanted.
    assert_eq!(a.sessions[0].proxy, ProxyUse::ProxyDirect as i32);
    let mut services: Vec<(String, String)> = a.sessions[0]
        .services
        .iter()
        .map(|s| (s.name.clone(), s.kind.clone()))
        .collect();
    services.sort();
    assert_eq!(
        services,
        [
            ("default".to_owned(), "grpc".to_owned()),
            ("echo".to_owned(), "tcp".to_owned())
        ]
    );
    assert_eq!(a.sessions[0].sessions_wanted, 1);
    assert_eq!(a.relayed_calls, 0);

    // Four call shapes.
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/tcp"), None)).await;
    call_every_shape(&mut echo).await;
    // A large body, to exercise HTTP/2 flow control both ways.
    let big = vec![7u8; 3 << 20];
    let r = echo
        .unary(EchoRequest {
            payload: big.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.payload.len(), big.len());

    // A TCP stream.
    let ch = gw.channel(&pki.client("api")).await.unwrap();
    let mut streams =
        StreamsClient::with_interceptor(ch, Route::new(Some("acme/tcp"), Some("echo")));
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    let chunks: Vec<StreamChunk> = data
        .chunks(64 << 10)
        .map(|c| StreamChunk {
            data: c.to_vec().into(),
        })
        .collect();
    let mut inbound = streams
        .open(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = inbound.message().await.unwrap() {
        got.extend_from_slice(&c.data);
    }
    assert_eq!(got, data);
    // The TCP stream's bytes (and the calls' before it) are counted on the agent, each way.
    let a = agents
        .get(GetAgentRequest {
            agent: "acme/tcp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        a.relayed_bytes_to_agent > (3 << 20) + data.len() as u64
            && a.relayed_bytes_from_agent > (3 << 20) + data.len() as u64,
        "{} to, {} from",
        a.relayed_bytes_to_agent,
        a.relayed_bytes_from_agent
    );
    assert!(a.relayed_calls >= 6, "{} calls", a.relayed_calls);

    // A command.
    let mut commands = gw.commands(&pki).await;
    let id = commands
        .submit(submit_req("acme/tcp", "echo", "over tcp"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let c = wait_final(&mut commands, &id, T).await;
    assert_eq!(c.result.unwrap().output, b"over tcp");
    assert!(metric("tether_gateway_sessions_total", &[("transport", "tcp")]) >= 1.0);
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_agent_sees_the_gateways_close_reason() {
    tether_e2e::init();
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut cfg = agent_config(&pki.agent("acme/tcp"), gw.handle.tunnel_addr);
    cfg.transport.mode = TransportMode::Tcp;
    let agent = TestAgent::start(&cfg);
    wait_until("agent connected", T, || gw.sessions_of("acme/tcp") == 1).await;
    gw.stop().await;
    wait_until("agent saw the gateway's SHUTDOWN", T, || {
        agent.disconnected_because("closed by gateway: shutdown")
    })
    .await;
    agent.stop().await;
}

/// A raw agent that completes the handshake and heartbeats but never serves a stream: the
/// gateway's probe finds it wedged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_closes_a_session_whose_streams_do_not_work() {
    tether_e2e::init();
    let pki = Pki::new();
    let mut gcfg = TestGateway::config(&pki);
    gcfg.tunnel.heartbeat_interval = Duration::from_secs(10);
    gcfg.tunnel.probe_interval = Duration::from_millis(200);
    gcfg.tunnel.probe_timeout = Duration::from_millis(200);
    let gw = TestGateway::start_with(gcfg, "127.0.0.1:0".parse().unwrap()).await;
    let raw = tether_e2e::RawAgent::new(&pki.agent("acme/wedged"), true, tunnel_proto::ALPN);
    let hello = tunnel_proto::Message::Hello(tunnel_proto::message::Hello {
        versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
        agent_version: "raw".into(),
        instance_id: "raw".into(),
        ..Default::default()
    });
    let started = Instant::now();
    // Hello, then read (the Welcome) until the gateway closes; no stream is ever served.
    let closed = raw
        .send_and_wait_close(gw.handle.tunnel_addr, &hello.to_bytes())
        .await
        .expect("the gateway closed the connection");
    assert_eq!(
        tether_e2e::app_close_code(&closed),
        Some(u64::from(ErrorCode::UNRESPONSIVE.0)),
        "{closed:?}"
    );
    // Two probe periods at most, far below the 30 s heartbeat timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        metric(
            "tether_gateway_probe_failures_total",
            &[("transport", "quic")]
        ) >= 1.0
    );
    gw.stop().await;
}

/// A gateway that announces probes but never sends one: the agent replaces the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_replaces_a_session_the_gateway_stopped_probing() {
    tether_e2e::init();
    let pki = Pki::new();
    let silent = tether_e2e::SilentGateway::start(&pki, Duration::from_millis(200)).await;
    let cfg = agent_config(&pki.agent("acme/edge"), silent.addr);
    let agent = TestAgent::start(&cfg);
    wait_until(
        "the agent connected, then replaced its unprobed session",
        T,
        || silent.sessions() >= 2,
    )
    .await;
    assert!(metric("tether_agent_wedged_sessions_total", &[]) >= 1.0);
    agent.stop().await;
}

/// The tunnel negotiates TLS 1.3's AES-128-GCM suite even with an agent that prefers
/// AES-256-GCM (rustls's stock order): the gateway's order decides (`tls::crypto_provider`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_picks_aes_128_gcm_whatever_the_agent_prefers() {
    tether_e2e::init();
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let files = pki.agent("acme/suites");
    let stock = rustls::crypto::aws_lc_rs::default_provider();
    assert_eq!(
        stock.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "this test needs a client that prefers AES-256-GCM"
    );
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(stock))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(tether_runtime::tls::load_roots(&files.ca).expect("roots"))
        .with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).expect("cert"),
            tether_runtime::tls::load_key(&files.key).expect("key"),
        )
        .expect("client auth");
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.handle.tunnel_addr)
        .await
        .expect("connect to the tunnel's TCP port");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the tunnel");
    let (_, conn) = stream.get_ref();
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    drop(stream);
    gw.stop().await;
}
