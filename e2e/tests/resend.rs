//! The re-send guarantee, end to end: a call the agent refused (`REFUSED_STREAM`, nothing of it
//! read: it arrived on a session the agent is leaving) is sent again by the gateway on another
//! session of the agent, whatever its shape, request bodies included; and a session the agent
//! left takes no new call and is closed by the gateway once the calls on it are done.
//!
//! The refusing side is a bare QUIC client holding a real session (the sans-IO `AgentSession`
//! with `leave`) that resets every stream it is given with `REFUSED_STREAM`, exactly as the
//! agent does once it leaves a session; the other session is a real agent's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tether_agent::config::{ServiceKind, TransportMode};
use tether_api::v1::StreamChunk;
use tether_api::v1::streams_client::StreamsClient;
use tether_e2e::*;
use tunnel_proto::ErrorCode;
use tunnel_proto::message::{Hello, LEAVE};
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};

const T: Duration = Duration::from_secs(30);

/// A session that refuses every stream (`REFUSED_STREAM`); it leaves the session when
/// `leave` is notified. Counts the streams it refused; ends with how the gateway closed it.
struct Refuser {
    refused: Arc<AtomicUsize>,
    leave: Arc<tokio::sync::Notify>,
    closed: tokio::task::JoinHandle<Option<u64>>,
}

async fn refuser(files: &CertFiles, gw: &TestGateway) -> Refuser {
    let raw = RawAgent::new(files, true, tunnel_proto::ALPN);
    let conn = raw
        .endpoint
        .connect(gw.handle.tunnel_addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let hello = Hello {
        agent_version: "refuser".into(),
        capabilities: vec!["relay".into(), "tcp".into(), LEAVE.into()],
        instance_id: "refuser".into(),
        ..Default::default()
    };
    let mut session = AgentSession::new(AgentSessionConfig::new(hello), Instant::now());
    let refused = Arc::new(AtomicUsize::new(0));
    let leave = Arc::new(tokio::sync::Notify::new());
    let (count, leave_now) = (refused.clone(), leave.clone());
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let closed = tokio::spawn(async move {
        let _endpoint = raw.endpoint;
        let mut up = Some(up_tx);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            while let Some(b) = session.poll_transmit() {
                if send.write_all(&b).await.is_err() {
                    break;
                }
            }
            while let Some(e) = session.poll_event() {
                match e {
                    AgentEvent::Established(_) => {
                        if let Some(tx) = up.take() {
                            let _ = tx.send(());
                        }
                    }
                    AgentEvent::Closed(c) => return Some(u64::from(c.code.0)),
                    _ => {}
                }
            }
            let at = session
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                    Ok(None) => session.handle_eof(Instant::now()),
                    Err(_) => return app_close_code(&conn.closed().await),
                },
                _ = tokio::time::sleep_until(at.into()) => session.handle_timeout(Instant::now()),
                () = leave_now.notified() => {
                    assert!(session.leave("test: leaving"), "the gateway offers leave");
                }
                s = conn.accept_bi() => match s {
                    Ok((mut tx, mut rx)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let code = quinn::VarInt::from_u32(ErrorCode::REFUSED_STREAM.0);
                        let _ = tx.reset(code);
                        let _ = rx.stop(code);
                    }
                    Err(e) => return app_close_code(&e),
                },
            }
        }
    });
    tokio::time::timeout(T, up_rx)
        .await
        .expect("refusing session established in time")
        .expect("refusing session established");
    Refuser {
        refused,
        leave,
        closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_by_a_leaving_session_are_sent_again_on_another_and_never_fail() {
    init();
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let upstream = DemoUpstream::start().await;
    let tcp = tcp_echo_server().await;
    let files = pki.agent("acme/a");
    let mut cfg = agent_config(&files, gw.handle.tunnel_addr);
    cfg.transport.mode = TransportMode::Quic;
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "raw", &tcp.to_string(), ServiceKind::Tcp);
    let agent = TestAgent::start(&cfg);
    wait_until("the agent's session", T, || gw.sessions_of("acme/a") == 1).await;
    let refuser = refuser(&files, &gw).await;
    wait_until("both sessions", T, || gw.sessions_of("acme/a") == 2).await;

    // Every call shape, many times over: the gateway spreads calls over both sessions, so
    // about half go to the refusing one first, and are sent again on the agent's.
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/a"), None)).await;
    for _ in 0..20 {
        call_every_shape(&mut echo).await;
    }
    // A client stream's whole body is replayed on the second session.
    for i in 0..20 {
        let parts: Vec<String> = (0..5).map(|k| format!("{i}.{k};")).collect();
        let resp = echo
            .client_stream(tokio_stream::iter(
                parts.iter().map(|p| echo_req(p)).collect::<Vec<_>>(),
            ))
            .await
            .expect("client stream sent again whole")
            .into_inner();
        assert_eq!(resp.message, parts.concat());
    }
    // TCP streams too.
    let ch = gw.channel(&pki.client("api")).await.unwrap();
    for i in 0..20 {
        let mut streams =
            StreamsClient::with_interceptor(ch.clone(), Route::new(Some("acme/a"), Some("raw")));
        let msg = format!("tcp {i}");
        let chunk = StreamChunk {
            data: msg.clone().into_bytes().into(),
        };
        let mut back = streams
            .open(tokio_stream::iter(vec![chunk]))
            .await
            .expect("TCP stream opened")
            .into_inner();
        let mut got = Vec::new();
        while let Some(c) = tokio_stream::StreamExt::next(&mut back).await {
            got.extend_from_slice(&c.expect("TCP chunk").data);
        }
        assert_eq!(got, msg.as_bytes());
    }
    let refused = refuser.refused.load(Ordering::SeqCst);
    let resent = metric("tether_gateway_relay_resends_total", &[]);
    eprintln!("{refused} streams refused, {resent} calls sent again, none failed");
    assert!(
        refused >= 10,
        "the refusing session got its share: {refused}"
    );
    assert!(
        resent >= refused as f64,
        "{resent} re-sends for {refused} refusals"
    );

    // Leaving: no new call goes there, and the gateway closes it (REPLACED) at once, since no
    // relayed call is open on it.
    let count = refuser.refused.clone();
    refuser.leave.notify_one();
    let code = tokio::time::timeout(T, refuser.closed)
        .await
        .expect("the gateway closes the left session")
        .unwrap();
    assert_eq!(code, Some(u64::from(ErrorCode::REPLACED.0)));
    wait_until("one session left", T, || gw.sessions_of("acme/a") == 1).await;
    let after = count.load(Ordering::SeqCst);
    for _ in 0..10 {
        echo.unary(echo_req("after")).await.expect("unary");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        after,
        "nothing went to the left session"
    );
    agent.stop().await;
    gw.stop().await;
}
