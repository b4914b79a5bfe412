//! Forwarding between gateway replicas, end to end: real `tether-gateway` processes sharing one
//! throwaway PostgreSQL (Debian's `postgresql` must be installed), linked over mutual-TLS QUIC
//! peer links; a real agent in this process connected to some of them, real upstreams behind
//! it, callers at the others.
//!
//! - every call shape, metadata and trailers both ways, an upstream's status, a deadline, a
//!   cancellation, end-to-end flow control and a `Streams/Open` TCP stream work through a
//!   replica without the agent's session exactly as through the replica holding it, both in
//!   the same run; no holder: NOT_FOUND or UNAVAILABLE naming the agent;
//! - a forged peer is refused on the peer port (a valid agent certificate, a valid
//!   control-plane certificate, a gateway certificate of another CA), while a peer certificate
//!   is accepted there and refused on the tunnel and on the northbound API;
//! - a peer link cut by nftables (network namespaces): forwarding uses the agent's other
//!   holder, answers UNAVAILABLE promptly once none is reachable, and the links come back by
//!   themselves;
//! - a replica killed with SIGKILL (no cleanup, its rows left behind) is never routed to once
//!   its liveness expired;
//! - a started replica is ready (`/readyz`) once linked to every live peer, or after its
//!   warm-up when one cannot be reached;
//! - replicas issuing their own peer certificates with `cluster.peer_ca_key` link and forward;
//! - a link dialed to a restarted peer before its new row was read is kept once the row
//!   catches up (the probe names the process that answered).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::{GetAgentRequest, ListAgentsRequest, StreamChunk};
use tether_e2e::*;
use tether_gateway::peer::wire::{self, AnswerCode, PeerAnswer, PeerHeader, PeerKind};
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};
use tokio_stream::StreamExt;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const AGENT: &str = "acme/fwd";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn postgres_on(listen: Ipv4Addr) -> LocalPostgres {
    LocalPostgres::start(LocalPostgresOptions {
        listen,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("this test needs a local PostgreSQL: {e}"))
}

/// Replicas `names` on `pg`, linked, their peer listeners on loopback.
async fn replicas(pki: &Pki, pg: &LocalPostgres, names: &[&str]) -> Vec<GatewayProcess> {
    let mut out = Vec::new();
    for name in names {
        let cfg = peer_replica_config(&pg.dsn(), name, pki, LOOPBACK);
        out.push(GatewayProcess::spawn_configured(pki, &cfg).await);
    }
    out
}

/// Polls `cond` every 50 ms until it holds, or panics after `within` saying `what`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every one of `gws` (named `names`) has its link to every other up.
async fn wait_linked(gws: &[&GatewayProcess], names: &[&str]) {
    for (gw, me) in gws.iter().zip(names) {
        for other in names.iter().filter(|n| *n != me) {
            eventually(&format!("{me}'s peer link to {other} up"), T, || async {
                gw.peer_up(other)
            })
            .await;
        }
    }
}

/// The replicas holding `agent`'s sessions as `gw` answers `Agents/Get`, sorted.
async fn holders(gw: &GatewayProcess, pki: &Pki, agent: &str) -> Vec<String> {
    let Ok(a) = AgentsClient::new(gw.channel(&pki.client("ops")).await)
        .get(GetAgentRequest {
            agent: agent.into(),
        })
        .await
    else {
        return Vec::new();
    };
    let mut r: Vec<String> = a
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.replica)
        .collect();
    r.sort();
    r
}

async fn wait_held(gw: &GatewayProcess, pki: &Pki, agent: &str, want: &[&str]) {
    eventually(&format!("{agent} held by {want:?}"), T, || async {
        holders(gw, pki, agent).await == want
    })
    .await;
}

async fn echo_at(gw: &GatewayProcess, pki: &Pki, agent: &str) -> EchoClient<Routed> {
    let ch = gw.channel(&pki.client("api")).await;
    EchoClient::with_interceptor(ch, Route::new(Some(agent), None))
        .max_decoding_message_size(16 << 20)
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// An agent dialing `gws` (one session each) with the demo upstream as `default` and a TCP
/// echo as `echo`.
fn agent_on(
    pki: &Pki,
    gws: &[&GatewayProcess],
    upstream: &DemoUpstream,
    echo: SocketAddr,
) -> TestAgent {
    let mut cfg = agent_config(&pki.agent(AGENT), gws[0].tunnel);
    cfg.gateways = gws.iter().map(|g| g.tunnel.to_string()).collect();
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "echo", &echo.to_string(), ServiceKind::Tcp);
    TestAgent::start(&cfg)
}

/// Everything a caller does through `gw`, checked: the same assertions whether `gw` holds the
/// agent's session or forwards to the replica that does.
async fn every_relay_behaviour_through(gw: &GatewayProcess, pki: &Pki, upstream: &DemoUpstream) {
    let mut echo = echo_at(gw, pki, AGENT).await;

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

    // The upstream's status, message and custom trailers, also mid-stream.
    let e = echo
        .unary(EchoRequest {
            message: "nope: ünïcode".into(),
            fail_with_code: Code::AlreadyExists as u32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::AlreadyExists, "nope: ünïcode")
    );
    assert_eq!(
        e.metadata().get("x-echo-trailer").unwrap(),
        "failed-on-purpose"
    );
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

    // A deadline: DEADLINE_EXCEEDED from the gateway (a bare HTTP/2 caller with no timer of
    // its own), and the upstream call cancelled.
    let cancelled = upstream.observed.cancelled.load(Ordering::SeqCst);
    let message = prost::Message::encode_to_vec(&EchoRequest {
        message: "slow".into(),
        delay_ms: 5_000,
        ..Default::default()
    });
    let started = Instant::now();
    let reply = raw_grpc_call(
        gw.northbound,
        &pki.client("api"),
        "/tether.demo.v1.Echo/Unary",
        &[("tether-agent", AGENT), ("grpc-timeout", "300m")],
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
        "{:?}",
        started.elapsed()
    );
    wait_until("the upstream call past its deadline cancelled", T, || {
        upstream.observed.cancelled.load(Ordering::SeqCst) > cancelled
    })
    .await;

    // A caller that goes away: the upstream sees it promptly.
    let cancelled = upstream.observed.cancelled.load(Ordering::SeqCst);
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
    let dropped = Instant::now();
    drop(stream);
    wait_until("the upstream saw the caller leave", T, || {
        upstream.observed.cancelled.load(Ordering::SeqCst) > cancelled
    })
    .await;
    eprintln!(
        "{}: caller gone → upstream cancelled in {:?}",
        gw.northbound,
        dropped.elapsed()
    );
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "{:?}",
        dropped.elapsed()
    );

    // Flow control end to end: a paused caller stops the upstream within bounded windows.
    const MSG: u32 = 64 * 1024;
    const COUNT: u32 = 512;
    let sent_before = upstream.observed.sent.load(Ordering::SeqCst);
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "p".into(),
            repeat: COUNT,
            size: MSG,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    let watch_until = Instant::now() + Duration::from_secs(2);
    let mut ahead = 0;
    while Instant::now() < watch_until {
        let sent = upstream.observed.sent.load(Ordering::SeqCst) - sent_before;
        ahead = ahead.max(sent.saturating_sub(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{}: upstream {ahead} messages ({} KiB) ahead of a paused caller",
        gw.northbound,
        ahead * u64::from(MSG) / 1024
    );
    assert!(
        ahead < 256,
        "upstream ran {ahead} messages ahead of a paused caller"
    );
    let rest = stream.collect::<Vec<_>>().await;
    assert_eq!(rest.len() as u32, COUNT - 10);

    // A raw TCP stream, bytes intact both ways, half-close ending it.
    let ch = gw.channel(&pki.client("api")).await;
    let mut streams = StreamsClient::with_interceptor(ch, Route::new(Some(AGENT), Some("echo")));
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 7 % 251) as u8).collect();
    let chunks: Vec<StreamChunk> = data
        .chunks(100_000)
        .map(|c| StreamChunk {
            data: c.to_vec().into(),
        })
        .collect();
    let mut inbound = tokio::time::timeout(T, streams.open(tokio_stream::iter(chunks)))
        .await
        .expect("Streams/Open answered")
        .expect("Streams/Open")
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = tokio::time::timeout(T, inbound.message())
        .await
        .expect("TCP echo in time")
        .expect("TCP echo")
    {
        got.extend_from_slice(&c.data);
    }
    assert!(
        got == data,
        "TCP echo differs: {} of {} bytes",
        got.len(),
        data.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_shape_and_a_tcp_stream_work_through_a_replica_without_the_session() {
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    let gws = replicas(&pki, &pg, &["r1", "r2"]).await;
    let (r1, r2) = (&gws[0], &gws[1]);
    wait_linked(&[r1, r2], &["r1", "r2"]).await;
    let upstream = DemoUpstream::start().await;
    let echo = tcp_echo_server().await;
    let agent = agent_on(&pki, &[r1], &upstream, echo);
    wait_held(r2, &pki, AGENT, &["r1"]).await;

    // Forwarded: r2 holds no session of the agent.
    every_relay_behaviour_through(r2, &pki, &upstream).await;
    let out = r2.forwarded("r1", "out");
    let carried = r1.forwarded("r2", "in");
    eprintln!("r2 forwarded {out} streams to r1; r1 carried {carried}");
    assert!(
        out >= 10.0 && carried >= 10.0,
        "out {out}, carried {carried}"
    );
    // Local: r1 holds it, and forwards nothing.
    every_relay_behaviour_through(r1, &pki, &upstream).await;
    assert_eq!(r1.forwarded("r2", "out"), 0.0);
    assert_eq!(r2.forwarded("r1", "out"), out, "r1's calls went through r2");
    assert_eq!(
        r2.metric_with("tether_gateway_peer_failures_total", &["peer=\"r1\""]),
        0.0,
        "{}",
        r2.logs()
    );

    // No holder: an agent nobody has seen is NOT_FOUND, a known one gone is UNAVAILABLE, each
    // naming the agent.
    let mut stranger = echo_at(r2, &pki, "acme/nobody").await;
    let e = stranger.unary(req("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("acme/nobody"), "{e:?}");
    agent.stop().await;
    wait_held(r2, &pki, AGENT, &[]).await;
    let mut gone = echo_at(r2, &pki, AGENT).await;
    let e = gone.unary(req("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(AGENT), "{e:?}");
}

// === A forged peer ===

/// Accepts any server certificate: these tests are about what the peer listener accepts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Dials the peer listener at `addr` presenting `files` and sends a probe: `Ok` when it was
/// answered, else how it failed (over QUIC a refused client certificate shows at the first
/// stream, not at connect).
async fn probe_as(addr: SocketAddr, files: &CertFiles) -> Result<(), String> {
    let provider = Arc::new(tether_runtime::tls::crypto_provider());
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).unwrap(),
            tether_runtime::tls::load_key(&files.key).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let work = async {
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr,
                "tether-peer",
            )
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        let header = PeerHeader {
            version: wire::VERSION,
            kind: PeerKind::Ping as u32,
            ..Default::default()
        };
        send.write_all(&wire::encode(&header))
            .await
            .map_err(|e| format!("write: {e}"))?;
        let _ = send.finish();
        let answer = recv
            .read_to_end(4096)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let answer: PeerAnswer = wire::decode(&answer).map_err(|e| e.to_string())?;
        match answer.code() {
            AnswerCode::Ok => Ok(()),
            other => Err(format!("answered {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "no answer within 10s".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_peer_is_refused_and_a_peer_certificate_is_refused_elsewhere() {
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    let gws = replicas(&pki, &pg, &["r1"]).await;
    let r1 = &gws[0];
    let addr = r1.peer_addr().expect("r1 logs its peer listener");

    // A peer certificate of this CA is answered: the check below can fail.
    probe_as(addr, &pki.peer("r9"))
        .await
        .expect("a replica's peer certificate is accepted");
    // Valid certificates of this very CA, but not gateways.
    for (what, files) in [
        ("agent", pki.agent("acme/forger")),
        ("control-plane caller", pki.client("forger")),
    ] {
        let e = probe_as(addr, &files)
            .await
            .expect_err(&format!("a valid {what} certificate was let in as a peer"));
        eprintln!("{what} certificate on the peer port: {e}");
    }
    // A gateway identity from another CA.
    let impostor = Pki::impostor(&pki);
    let e = probe_as(addr, &impostor.peer("r1"))
        .await
        .expect_err("an impostor CA's gateway certificate was let in");
    eprintln!("impostor gateway certificate on the peer port: {e}");
    let refused = |reason: &str| {
        r1.metric(
            "tether_gateway_peer_handshake_failures_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert!(refused("not_a_gateway") >= 2.0, "{}", r1.logs());
    assert!(refused("certificate") >= 1.0, "{}", r1.logs());

    // A peer certificate is no agent on the tunnel, and no caller on the northbound API.
    let peer = pki.peer("r1");
    let _ = RawAgent::new(&peer, true, tunnel_proto::ALPN)
        .send_and_wait_close(r1.tunnel, b"\x01")
        .await;
    eventually("the tunnel refusing a peer certificate", T, || async {
        r1.metric(
            "tether_gateway_handshake_failures_total",
            "reason=\"not_an_agent\"",
        ) >= 1.0
    })
    .await;
    let e = AgentsClient::new(r1.channel(&peer).await)
        .list(ListAgentsRequest::default())
        .await
        .expect_err("a peer certificate called the northbound API");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

// === Faults ===

/// Calls `echo` once with a 10 s deadline.
async fn call(echo: &mut EchoClient<Routed>, n: usize) -> Result<(), tonic::Status> {
    let mut r = tonic::Request::new(req(&format!("c{n}")));
    r.set_timeout(Duration::from_secs(10));
    echo.unary(r).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_peer_link_fails_over_to_the_other_holder_answers_unavailable_promptly_and_heals() {
    let topo = netns::Topology::new().unwrap_or_else(|e| panic!("{e:#}"));
    let pg = postgres_on(topo.host_addr);
    let pki = Pki::new();
    // r0 in the control-plane namespace, where the firewall goes; r1 and r2 here, their peer
    // listeners on this side of the veth so r0 reaches them through it.
    let api: IpAddr = topo.api_addr.into();
    let host: IpAddr = topo.host_addr.into();
    let r0 = GatewayProcess::spawn_netns_configured(
        &pki,
        &topo.cp,
        SocketAddr::new(api, 0),
        api,
        &peer_replica_config(&pg.dsn(), "r0", &pki, api),
    )
    .await;
    let r1 =
        GatewayProcess::spawn_configured(&pki, &peer_replica_config(&pg.dsn(), "r1", &pki, host))
            .await;
    let r2 =
        GatewayProcess::spawn_configured(&pki, &peer_replica_config(&pg.dsn(), "r2", &pki, host))
            .await;
    wait_linked(&[&r0, &r1, &r2], &["r0", "r1", "r2"]).await;
    let upstream = DemoUpstream::start().await;
    let echo_addr = tcp_echo_server().await;
    let _agent = agent_on(&pki, &[&r1, &r2], &upstream, echo_addr);
    wait_held(&r0, &pki, AGENT, &["r1", "r2"]).await;
    let mut echo = echo_at(&r0, &pki, AGENT).await;
    for n in 0..20 {
        call(&mut echo, n).await.expect("forwarded from r0");
    }

    // Cut r0–r1: every packet between r0 and r1's peer port dropped, both ways.
    let cut = |name: &str, peer: SocketAddr| {
        format!(
            "table inet {name} {{\n chain out {{ type filter hook output priority 0; ip daddr {} udp dport {} drop; }}\n chain in {{ type filter hook input priority 0; ip saddr {} udp sport {} drop; }}\n}}\n",
            peer.ip(),
            peer.port(),
            peer.ip(),
            peer.port()
        )
    };
    let p1 = r1.peer_addr().expect("r1's peer address");
    let p2 = r2.peer_addr().expect("r2's peer address");
    topo.cp.nft(&cut("cut_r1", p1)).expect("nft");
    let cut_at = Instant::now();
    // Every call still succeeds, through r2 (a call sent to r1 at the cut waits for its
    // answer at most answer_timeout, 1 s here, then goes to r2).
    let to_r2 = r0.forwarded("r2", "out");
    let mut slowest = Duration::ZERO;
    for n in 0..40 {
        let started = Instant::now();
        call(&mut echo, n)
            .await
            .unwrap_or_else(|e| panic!("call {n} after the r0–r1 cut failed: {e:?}"));
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("r0–r1 cut: 40 calls succeeded through r2, the slowest in {slowest:?}");
    assert!(r0.forwarded("r2", "out") >= to_r2 + 40.0);
    eventually("r0 seeing its link to r1 down", T, || async {
        !r0.peer_up("r1")
    })
    .await;
    eprintln!("r0's link to r1 down {:?} after the cut", cut_at.elapsed());

    // Cut r0–r2 too: nobody reachable holds the agent; UNAVAILABLE naming it, promptly.
    topo.cp.nft(&cut("cut_r2", p2)).expect("nft");
    let mut answered_in = Vec::new();
    for n in 0..3 {
        let started = Instant::now();
        let e = call(&mut echo, n)
            .await
            .expect_err("no holder is reachable");
        answered_in.push(started.elapsed());
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains(AGENT), "{e:?}");
    }
    eprintln!("both links cut: UNAVAILABLE in {answered_in:?}");
    assert!(
        answered_in.iter().all(|d| *d < Duration::from_secs(5)),
        "{answered_in:?}"
    );

    // Lift both cuts: the links come back by themselves, and calls are forwarded again.
    topo.cp
        .nft("delete table inet cut_r1\ndelete table inet cut_r2\n")
        .expect("nft");
    let lifted = Instant::now();
    eventually("r0's links to r1 and r2 back", T, || async {
        r0.peer_up("r1") && r0.peer_up("r2")
    })
    .await;
    eprintln!("links back {:?} after the cut was lifted", lifted.elapsed());
    let before = r0.forwarded("r1", "out") + r0.forwarded("r2", "out");
    for n in 0..20 {
        call(&mut echo, n)
            .await
            .expect("forwarded again after the cut");
    }
    assert!(r0.forwarded("r1", "out") + r0.forwarded("r2", "out") >= before + 20.0);
}

/// When a call started, and how it ended.
type CallResult = (Instant, Result<(), Code>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_without_cleanup_is_never_routed_to_once_its_liveness_expired() {
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    let mut gws = replicas(&pki, &pg, &["r1", "r2", "r3"]).await;
    wait_linked(&[&gws[0], &gws[1], &gws[2]], &["r1", "r2", "r3"]).await;
    let upstream = DemoUpstream::start().await;
    let echo_addr = tcp_echo_server().await;
    let _agent = agent_on(&pki, &[&gws[0], &gws[1]], &upstream, echo_addr);
    wait_held(&gws[2], &pki, AGENT, &["r1", "r2"]).await;

    // Callers at r3, the replica without a session, all along (each result kept with the time
    // its call started).
    let stop = tether_runtime::CancellationToken::new();
    let results: Arc<std::sync::Mutex<Vec<CallResult>>> = Arc::default();
    let mut callers = Vec::new();
    for c in 0..4 {
        let mut echo = echo_at(&gws[2], &pki, AGENT).await;
        let (stop, results) = (stop.clone(), results.clone());
        callers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let started = Instant::now();
                let r = call(&mut echo, c * 1_000_000 + n)
                    .await
                    .map_err(|e| e.code());
                results.lock().unwrap().push((started, r));
                n += 1;
            }
        }));
    }
    eventually("calls forwarded to both holders", T, || async {
        gws[2].forwarded("r1", "out") > 0.0 && gws[2].forwarded("r2", "out") > 0.0
    })
    .await;

    // kill -9 r1: no goodbye, its rows stay behind.
    let killed = Instant::now();
    gws[0].child.start_kill().unwrap();
    let _ = gws[0].child.wait().await;
    // r1 leaves Agents/Get once its liveness expired by PostgreSQL's clock (1.5 s at most
    // after its last renewal): from then on r3 must never route to it.
    wait_held(&gws[2], &pki, AGENT, &["r2"]).await;
    let expired = Instant::now();
    let attempts = gws[2].forwarded("r1", "out");
    eprintln!(
        "r1 killed; its liveness seen expired {:?} later; r3 had tried r1 {attempts} times",
        expired - killed
    );
    // Watch three more seconds of traffic.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(
        gws[2].forwarded("r1", "out"),
        attempts,
        "r3 routed to r1 after its liveness expired"
    );
    let results = results.lock().unwrap();
    let after: Vec<&Result<(), Code>> = results
        .iter()
        .filter(|(t, _)| *t > expired)
        .map(|(_, r)| r)
        .collect();
    let failed_after = after.iter().filter(|r| r.is_err()).count();
    let during: Vec<Code> = results
        .iter()
        .filter(|(t, r)| *t > killed && *t <= expired && r.is_err())
        .filter_map(|(_, r)| r.err())
        .collect();
    eprintln!(
        "calls started after expiry: {} ({failed_after} failed); failed of those started between the kill and expiry: {during:?}",
        after.len()
    );
    assert!(after.len() >= 10, "too few calls to tell: {}", after.len());
    assert_eq!(failed_after, 0, "calls failed once r1 was known dead");
}

/// `/readyz` of `gw`: status and body.
fn readyz(gw: &GatewayProcess) -> (u16, String) {
    tether_runtime::ops::probe(gw.ops, "/readyz", Duration::from_secs(5)).expect("/readyz answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_replica_is_ready_once_linked_to_every_live_peer_or_after_the_warm_up() {
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    let gws = replicas(&pki, &pg, &["r1", "r2"]).await;
    // Ready means linked: a call landing on either can be forwarded to the other.
    eventually("r1 and r2 ready", T, || async {
        readyz(&gws[0]).0 == 200 && readyz(&gws[1]).0 == 200
    })
    .await;
    assert!(gws[0].peer_up("r2") && gws[1].peer_up("r1"));

    // A replica row that is live in PostgreSQL but that nobody answers for: r3 cannot link to
    // it, and says so until its warm-up is over.
    pg.sql(
        "INSERT INTO gateway_replicas (replica_id, epoch, advertise, version, expires_at) \
         VALUES ('ghost', 1, '127.0.0.1:9', 'test', now() + interval '1 hour')",
    )
    .expect("insert the ghost replica's row");
    let cfg = peer_replica_config(&pg.dsn(), "r3", &pki, LOOPBACK);
    let r3 = GatewayProcess::spawn_configured(&pki, &cfg).await;
    eventually(
        "r3 not ready, naming the peer it has no link to",
        T,
        || async {
            let (code, body) = readyz(&r3);
            code == 503 && body.contains("no peer link yet to ghost")
        },
    )
    .await;
    // Its links to the live replicas come up meanwhile.
    eventually("r3 linked to r1 and r2", T, || async {
        r3.peer_up("r1") && r3.peer_up("r2")
    })
    .await;
    // After the warm-up it is ready anyway, with a warning naming the peer, and stays ready:
    // from then on links are informational.
    eventually("r3 ready after the warm-up", T, || async {
        readyz(&r3).0 == 200
    })
    .await;
    // (The warning is written as /readyz answers; the test reads the log a moment later.)
    eventually("r3's warning naming the ghost", T, || async {
        let logs = r3.logs();
        logs.contains("ready without peer links to every replica") && logs.contains("ghost")
    })
    .await;
    assert_eq!(readyz(&r3).0, 200);
    assert_eq!(
        readyz(&gws[0]).0,
        200,
        "an already ready replica stays ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_issuing_their_own_peer_certificates_with_a_ca_key_link_and_forward() {
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    // No peer certificate on disk: each replica issues its own with the CA's key at start
    // (what the Helm chart configures), identity spiffe://<td>/gateway/<replica_id>.
    let mut gws = Vec::new();
    for name in ["r1", "r2"] {
        let cfg = format!(
            "[store]\ndsn = \"{}\"\nconnect_timeout = \"20s\"\n[cluster]\nreplica_id = \"{name}\"\npeer_listen = \"127.0.0.1:0\"\npeer_ca_key = \"{}\"\nheartbeat_interval = \"200ms\"\nliveness_timeout = \"1500ms\"\n",
            pg.dsn(),
            pki.dir.path().join("ca-key.pem").display()
        );
        gws.push(GatewayProcess::spawn_configured(&pki, &cfg).await);
    }
    wait_linked(&[&gws[0], &gws[1]], &["r1", "r2"]).await;
    let upstream = DemoUpstream::start().await;
    let echo_addr = tcp_echo_server().await;
    let _agent = agent_on(&pki, &[&gws[0]], &upstream, echo_addr);
    wait_held(&gws[1], &pki, AGENT, &["r1"]).await;
    // A call at r2, which holds no session of the agent, is forwarded to r1.
    let mut echo = echo_at(&gws[1], &pki, AGENT).await;
    call(&mut echo, 1)
        .await
        .expect("a call forwarded through r2");
    assert!(gws[1].forwarded("r1", "out") >= 1.0);
    eventually("r1's log naming its self-issued certificate", T, || async {
        gws[0]
            .logs()
            .contains("peer certificate issued by cluster.peer_ca_key")
    })
    .await;
}

/// Lines of `gw`'s log with `message` about `peer`.
fn peer_log_lines(gw: &GatewayProcess, message: &str, peer: &str) -> usize {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message && v["peer"] == peer)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_dialed_to_a_restarted_peer_before_its_new_row_was_read_stays_up() {
    // r0 dials r1 (its id sorts first). Rows live 10 s here, so r0 keeps dialing r1 by the
    // row it read before the kill, and its dial, pending while nothing listens, completes
    // with the new process once that listens on the same port: the link must then be known
    // as the new process's, and not closed as the old one's when the new row is read.
    let pki = Pki::new();
    let pg = postgres_on(Ipv4Addr::LOCALHOST);
    let long_rows = |cfg: String| {
        cfg.replace(
            "liveness_timeout = \"1500ms\"",
            "liveness_timeout = \"10s\"",
        )
    };
    let r0 = GatewayProcess::spawn_configured(
        &pki,
        &long_rows(peer_replica_config(&pg.dsn(), "r0", &pki, LOOPBACK)),
    )
    .await;
    let r1_cfg = long_rows(peer_replica_config(&pg.dsn(), "r1", &pki, LOOPBACK));
    let mut r1 = GatewayProcess::spawn_configured(&pki, &r1_cfg).await;
    wait_linked(&[&r0, &r1], &["r0", "r1"]).await;
    let port = r1.peer_addr().expect("r1's peer address");

    r1.child.start_kill().unwrap();
    let _ = r1.child.wait().await;
    eventually("r0 seeing its link to r1 down", T, || async {
        !r0.peer_up("r1")
    })
    .await;
    let ups_before = peer_log_lines(&r0, "peer link up", "r1");
    let downs_before = peer_log_lines(&r0, "peer link down", "r1");

    // The same replica again, on the same peer port: a new epoch.
    let again = r1_cfg.replace(
        &format!("peer_listen = \"{}\"", SocketAddr::new(LOOPBACK, 0)),
        &format!("peer_listen = \"{port}\""),
    );
    assert_ne!(
        again, r1_cfg,
        "the peer port is set in the restarted replica's config"
    );
    let r1 = GatewayProcess::spawn_configured(&pki, &again).await;
    assert_eq!(r1.peer_addr(), Some(port));
    wait_linked(&[&r0, &r1], &["r0", "r1"]).await;
    // r0 reads the rows every 200 ms: watch 2 s of them.
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            r0.peer_up("r1"),
            "r0 lost its link to the restarted r1: {}",
            r0.logs()
        );
    }
    assert_eq!(
        peer_log_lines(&r0, "peer link up", "r1") - ups_before,
        1,
        "r0 linked to the restarted r1 more than once (the first link was closed): {}",
        r0.logs()
    );
    assert_eq!(
        peer_log_lines(&r0, "peer link down", "r1"),
        downs_before,
        "r0's link to the restarted r1 went down: {}",
        r0.logs()
    );
}
