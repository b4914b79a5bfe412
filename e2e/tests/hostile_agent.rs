//! A hostile agent: one valid agent certificate used to hold as much of the gateway as it can
//! (issue 15, finding 1). Its sessions beyond `limits.sessions_per_agent` are refused with
//! `TOO_MANY_SESSIONS` and a reason naming the limit, it cannot open a stream the gateway does
//! not read, and the gateway's memory stays bounded while another tenant's agent stays served.
//! A real agent refused over that limit says so in its log, over QUIC and over TCP; a real
//! agent's make-before-break stays within the default.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tether_agent::config::{ServiceKind, TransportMode};
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::GetAgentRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_e2e::*;
use tether_runtime::CancellationToken;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tunnel_proto::ErrorCode;
use tunnel_proto::message::Hello;
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};

const T: Duration = Duration::from_secs(30);

/// `limits.sessions_per_agent` when the config does not set it.
const DEFAULT_SESSIONS_PER_AGENT: usize = 8;

/// How one hostile session went.
#[derive(Debug)]
enum Hostile {
    /// Established; `granted` extra streams opened and each stuffed with [`STUFFING`] bytes.
    Established { granted: usize },
    /// The gateway closed the connection with this application code and reason.
    Refused { code: Option<u64>, reason: String },
}

/// Extra streams each hostile session tries to open beside its control stream.
const EXTRA_STREAMS: usize = 3;
/// Bytes written into each extra stream: quinn's default per-stream window, all of which a
/// gateway that never reads the stream would buffer.
const STUFFING: usize = 1_250_000;

/// The QUIC client of the attacker: a valid agent certificate of `files`.
fn attacker(files: &CertFiles) -> quinn::Endpoint {
    RawAgent::new(files, true, tunnel_proto::ALPN).endpoint
}

fn refusal(e: &quinn::ConnectionError) -> Hostile {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Hostile::Refused {
            code: Some(c.error_code.into()),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        other => Hostile::Refused {
            code: None,
            reason: other.to_string(),
        },
    }
}

/// One hostile session: a real `Hello` and heartbeats on the control stream (so the session
/// looks alive), then as many extra streams as the gateway grants, each stuffed and never
/// closed. Reports how it went, then holds everything until `hold` is cancelled.
async fn hostile_session(
    endpoint: quinn::Endpoint,
    gateway: SocketAddr,
    n: usize,
    report: mpsc::UnboundedSender<Hostile>,
    hold: CancellationToken,
) {
    let conn = match endpoint.connect(gateway, "localhost").unwrap().await {
        Ok(c) => c,
        Err(e) => {
            let _ = report.send(refusal(&e));
            return;
        }
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            let _ = report.send(refusal(&e));
            return;
        }
    };
    // Probes answered, so the gateway has no reason of its own to end the session.
    tokio::spawn(answer_probes(conn.clone()));
    let hello = Hello {
        agent_version: "hostile".into(),
        instance_id: format!("hostile-{n}"),
        ..Default::default()
    };
    let mut session = AgentSession::new(AgentSessionConfig::new(hello), Instant::now());
    let mut buf = vec![0u8; 16 * 1024];
    let mut extra = Vec::new();
    let mut reported = false;
    loop {
        while let Some(bytes) = session.poll_transmit() {
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
        while let Some(ev) = session.poll_event() {
            if let AgentEvent::Established(_) = ev {
                // Every extra stream the gateway's transport parameters allow now, without
                // waiting: the gateway either grants them at once or never (its only
                // agent-opened stream, the control stream, stays open).
                for _ in 0..EXTRA_STREAMS {
                    let Some(Ok((mut s, r))) = conn.open_bi().now_or_never() else {
                        break;
                    };
                    s.write_all(&vec![0x5a; STUFFING]).await.expect("stuffing");
                    extra.push((s, r));
                }
                let _ = report.send(Hostile::Established {
                    granted: extra.len(),
                });
                reported = true;
            }
        }
        let wake = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            _ = hold.cancelled() => return,
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(_) => {
                    if !reported {
                        let why = conn.closed().await;
                        let _ = report.send(refusal(&why));
                    }
                    hold.cancelled().await;
                    return;
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => session.handle_timeout(Instant::now()),
        }
    }
}

/// Answers every stream the gateway opens with `OpenResult { ok }`, as an agent answers a probe.
async fn answer_probes(conn: quinn::Connection) {
    use tether_runtime::transport::{RecvStream, SendStream};
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let mut send = SendStream::Quic(send);
            let mut framed = tether_runtime::stream::FramedRecv::new(RecvStream::Quic(recv), 1024);
            if let Ok(Some(_header)) = framed.next().await {
                let ok = tunnel_proto::Message::OpenResult(tunnel_proto::message::OpenResult {
                    ok: true,
                    ..Default::default()
                });
                if tether_runtime::stream::send_msg(&mut send, &ok)
                    .await
                    .is_ok()
                {
                    let _ = send.finish();
                }
            }
        });
    }
}

/// RSS of `pid` once it stops moving (three readings 250 ms apart within 512 KiB), or after
/// 10 s: the figure to report after an attack, whatever the kernel still had to deliver.
async fn settled_rss_kib(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rss_kib(pid);
    let mut steady = 0;
    while steady < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        steady = if now.abs_diff(last) < 512 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    last
}

async fn sessions_of(channel: tonic::transport::Channel, agent: &str) -> Vec<String> {
    AgentsClient::new(channel)
        .get(GetAgentRequest {
            agent: agent.into(),
        })
        .await
        .map(|a| {
            a.into_inner()
                .sessions
                .into_iter()
                .map(|s| s.instance_id)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_certificate_cannot_exhaust_the_gateways_memory() {
    const HOSTILE: usize = 40;
    let pki = Pki::new();
    // Default limits: the attack must fail against what operators run.
    let gw = GatewayProcess::spawn(&pki).await;
    let upstream = DemoUpstream::start().await;
    let mut acfg = agent_config(&pki.agent("acme/a"), gw.tunnel);
    with_service(&mut acfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&acfg);
    let ch = gw.channel(&pki.client("api")).await;
    wait_connected(ch.clone(), "acme/a", T).await;
    let mut echo = EchoClient::with_interceptor(ch.clone(), Route::new(Some("acme/a"), None))
        .max_decoding_message_size(16 << 20);
    for _ in 0..20 {
        echo.unary(echo_req("warm")).await.expect("warm-up");
    }
    let rss_before = settled_rss_kib(gw.pid()).await;
    let refused_before = gw.metric(
        "tether_gateway_limit_rejections_total",
        "limit=\"sessions_per_agent\"",
    );

    // The attack: another tenant's certificate, 40 sessions at once, each stuffing every
    // extra stream it is granted, none ever closed.
    let endpoint = attacker(&pki.agent("evil/x"));
    let hold = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for n in 0..HOSTILE {
        tokio::spawn(hostile_session(
            endpoint.clone(),
            gw.tunnel,
            n,
            tx.clone(),
            hold.clone(),
        ));
    }
    drop(tx);
    let mut outcomes = Vec::new();
    let deadline = tokio::time::Instant::now() + T * 2;
    while outcomes.len() < HOSTILE {
        let o = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("every hostile session established or was refused in time")
            .expect("a report per session");
        outcomes.push(o);
    }
    let rss_after = settled_rss_kib(gw.pid()).await;

    // The other tenant's agent is served while the attacker holds everything it got.
    let reply = echo.unary(echo_req("during the attack")).await;
    let mut bulk = echo
        .server_stream(EchoRequest {
            message: "bulk".into(),
            repeat: 16,
            payload: vec![1u8; 256 << 10],
            ..Default::default()
        })
        .await
        .expect("server stream during the attack")
        .into_inner();
    let mut bulk_bytes = 0;
    while let Some(m) = bulk.next().await {
        bulk_bytes += m.expect("bulk reply").payload.len();
    }

    let established: Vec<usize> = outcomes
        .iter()
        .filter_map(|o| match o {
            Hostile::Established { granted } => Some(*granted),
            Hostile::Refused { .. } => None,
        })
        .collect();
    let refused: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Hostile::Refused {
                code: Some(c),
                reason,
            } if *c == u64::from(ErrorCode::TOO_MANY_SESSIONS.0) => Some(reason),
            _ => None,
        })
        .collect();
    let granted: usize = established.iter().sum();
    let refusals = gw.metric(
        "tether_gateway_limit_rejections_total",
        "limit=\"sessions_per_agent\"",
    ) - refused_before;
    let held = sessions_of(ch.clone(), "evil/x").await.len();
    eprintln!(
        "hostile agent: {HOSTILE} sessions tried, {} established ({held} registered), {} refused \
         with TOO_MANY_SESSIONS (counted {refusals}); {granted} extra streams granted \
         ({} MB stuffed); gateway RSS {} KiB -> {} KiB (+{} MiB)",
        established.len(),
        refused.len(),
        granted * STUFFING / 1_000_000,
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before) / 1024,
    );
    let other: Vec<&Hostile> = outcomes
        .iter()
        .filter(|o| matches!(o, Hostile::Refused { code, .. } if *code != Some(u64::from(ErrorCode::TOO_MANY_SESSIONS.0))))
        .collect();
    assert!(other.is_empty(), "refused for another reason: {other:?}");
    assert_eq!(
        established.len(),
        DEFAULT_SESSIONS_PER_AGENT,
        "sessions beyond limits.sessions_per_agent were accepted"
    );
    assert_eq!(held, DEFAULT_SESSIONS_PER_AGENT);
    assert_eq!(refused.len(), HOSTILE - DEFAULT_SESSIONS_PER_AGENT);
    assert!(
        refused
            .iter()
            .all(|r| r.contains("evil/x") && r.contains("limits.sessions_per_agent")),
        "the refusal names the agent and the limit: {:?}",
        refused.first()
    );
    assert_eq!(refusals, (HOSTILE - DEFAULT_SESSIONS_PER_AGENT) as f64);
    assert_eq!(granted, 0, "the gateway granted streams it never reads");
    assert!(
        rss_after.saturating_sub(rss_before) < 32 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(
        reply.expect("call during the attack").into_inner().message,
        "during the attack"
    );
    assert_eq!(bulk_bytes, 16 * (256 << 10));

    hold.cancel();
    agent.stop().await;
}

/// A real agent process with `files` (instance `instance`) over `mode`, logging warnings.
fn agent_process(
    files: &CertFiles,
    gateway: SocketAddr,
    instance: &str,
    mode: TransportMode,
) -> AgentProcess {
    let mut cfg = agent_config(files, gateway);
    cfg.instance_id = Some(instance.into());
    cfg.transport.mode = mode;
    AgentProcess::spawn(&cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_beyond_sessions_per_agent_is_refused_and_its_log_says_why_and_what_to_do() {
    let pki = Pki::new();
    let gw = GatewayProcess::spawn_configured(&pki, "[limits]\nsessions_per_agent = 1\n").await;
    let files = pki.agent("acme/a");
    let ch = gw.channel(&pki.client("api")).await;
    let first = agent_process(&files, gw.tunnel, "first", TransportMode::Quic);
    wait_connected(ch.clone(), "acme/a", T).await;

    for (instance, mode) in [("quic", TransportMode::Quic), ("tcp", TransportMode::Tcp)] {
        let extra = agent_process(&files, gw.tunnel, instance, mode);
        let logged = |p: &AgentProcess| {
            p.logs().lines().any(|l| {
                l.contains("ERROR")
                    && l.contains("limits.sessions_per_agent")
                    && l.contains("revoke")
                    && l.contains("raise")
            })
        };
        let deadline = Instant::now() + T;
        while !logged(&extra) {
            assert!(
                Instant::now() < deadline,
                "{instance}: no refusal in the agent's log:\n{}",
                extra.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{instance}: {}",
            extra
                .logs()
                .lines()
                .find(|l| l.contains("limits.sessions_per_agent"))
                .unwrap_or_default()
        );
        // The first instance keeps its session; the refused one holds none.
        assert_eq!(sessions_of(ch.clone(), "acme/a").await, vec!["first"]);
        drop(extra);
    }
    assert!(
        gw.metric(
            "tether_gateway_limit_rejections_total",
            "limit=\"sessions_per_agent\""
        ) >= 2.0
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_before_break_is_never_refused_at_the_default_sessions_per_agent() {
    // Two instances of one agent, each with two addresses of the same gateway, one of them on
    // the TCP fallback: four sessions, and eight while every one of them is replaced.
    let pki = Pki::new();
    let cfg = TestGateway::config(&pki);
    let gw = TestGateway::start_with(cfg, "0.0.0.0:0".parse().unwrap()).await;
    let port = gw.handle.tunnel_addr.port();
    let upstream = DemoUpstream::start().await;
    let files = pki.agent("acme/a");
    let mut agents = Vec::new();
    for (instance, mode) in [("i1", TransportMode::Quic), ("i2", TransportMode::Tcp)] {
        let mut c = agent_config(&files, gw.handle.tunnel_addr);
        c.gateways = vec![format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")];
        c.instance_id = Some(instance.into());
        c.transport.mode = mode;
        with_service(&mut c, "default", &upstream.url(), ServiceKind::Grpc);
        agents.push(TestAgent::start(&c));
    }
    wait_until("four sessions", T, || gw.sessions_of("acme/a") == 4).await;
    let mut echo = echo_via(&gw, &pki, Route::new(Some("acme/a"), None)).await;
    let refused = || {
        metric(
            "tether_gateway_limit_rejections_total",
            &[("limit", "sessions_per_agent")],
        )
    };
    let before = refused();
    let mut calls = 0;
    // The most sessions registered at once, from the registry's own feed: a replaced session
    // leaves as soon as the calls on it are done, so sampling between calls can miss the
    // overlap.
    let (live, mut feed) = gw.handle.registry.subscribe();
    let peak_seen = Arc::new(std::sync::atomic::AtomicUsize::new(live.len()));
    let watcher = {
        let peak_seen = peak_seen.clone();
        let mut now = live.len();
        tokio::spawn(async move {
            use tether_gateway::tunnel::registry::RegistryEvent;
            while let Ok(ev) = feed.recv().await {
                match ev {
                    RegistryEvent::Connected(_) => now += 1,
                    RegistryEvent::Disconnected { .. } => now = now.saturating_sub(1),
                }
                peak_seen.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    for round in 0..3 {
        let old = gw.session_ids("acme/a");
        gw.handle
            .registry
            .go_away_all("test: move", Duration::from_secs(2));
        // Calls keep succeeding while every session is replaced.
        let deadline = Instant::now() + T;
        loop {
            echo.unary(echo_req("moving"))
                .await
                .expect("call while moving");
            calls += 1;
            let now = gw.session_ids("acme/a");
            if now.len() == 4 && now.iter().all(|s| !old.contains(s)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: sessions not all replaced: {old:?} -> {now:?}"
            );
        }
        assert_eq!(
            refused(),
            before,
            "round {round}: a replacement was refused"
        );
    }
    watcher.abort();
    let peak = peak_seen.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "3 rounds of make-before-break of 4 sessions: at most {peak} at once, {calls} calls, \
         none refused"
    );
    assert!(
        peak > 4,
        "the replacements overlapped the sessions they replaced"
    );
    for a in agents {
        a.stop().await;
    }
    gw.stop().await;
}
