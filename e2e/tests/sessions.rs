//! Agents connect, show up in the northbound API, go away when killed, come back after a
//! gateway restart, and move sessions on GoAway without ever dropping out of the registry.

use std::time::{Duration, Instant};

use tether_api::v1::{GetAgentRequest, ListAgentsRequest, WatchAgentsRequest, agent_event::Kind};
use tether_e2e::*;
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_appears_in_list_get_and_watch() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut api = gw.client(&pki, "api").await;
    let mut watch = api
        .watch(WatchAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let files = pki.agent("acme/eu-1");
    let agent = TestAgent::start(&agent_config(&files, gw.handle.tunnel_addr));
    let ev = tokio::time::timeout(T, watch.next())
        .await
        .expect("watch event")
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, Kind::Connected as i32);
    assert_eq!(ev.agent, "acme/eu-1");
    assert!(!ev.initial);
    let s = ev.session.unwrap();
    assert_eq!(s.transport, "quic");
    assert_eq!(s.labels.get("suite").map(String::as_str), Some("e2e"));
    assert_eq!(s.agent_version, tether_agent::VERSION);
    // The expiry of the certificate the session authenticated with.
    let cert = tether_runtime::tls::load_certs("certificate", &files.cert).unwrap();
    let (_, not_after) = tether_runtime::tls::validity(&cert[0]).unwrap();
    assert_eq!(
        s.certificate_expires.map(std::time::SystemTime::try_from),
        Some(Ok(not_after))
    );

    let list = api
        .list(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.agents.len(), 1);
    assert_eq!(list.agents[0].id, "acme/eu-1");
    assert!(list.agents[0].connected);
    let other_tenant = api
        .list(ListAgentsRequest {
            tenant: "other".into(),
            connected_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other_tenant.agents.is_empty());

    let got = api
        .get(GetAgentRequest {
            agent: "acme/eu-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.connected);
    assert_eq!(got.sessions.len(), 1);

    // RTT arrives with the second heartbeat (the agent reports the previous round trip).
    wait_until("RTT reported", T, || {
        gw.handle
            .registry
            .sessions()
            .iter()
            .any(|s| s.rtt().is_some())
    })
    .await;

    // A second watch starts with a snapshot of what is already connected.
    let mut late = api
        .watch(WatchAgentsRequest {
            tenant: "acme".into(),
            agent: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(T, late.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(snap.initial);
    assert_eq!(snap.agent, "acme/eu-1");

    agent.stop().await;
    let ev = tokio::time::timeout(T, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, Kind::Disconnected as i32);
    assert!(ev.reason.contains("shutdown"), "{}", ev.reason);
    let got = api
        .get(GetAgentRequest {
            agent: "acme/eu-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.connected, "known but offline after a clean stop");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_unknown_agent_is_not_found_and_bad_id_is_invalid_argument() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut api = gw.client(&pki, "api").await;
    let e = api
        .get(GetAgentRequest {
            agent: "nobody/here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = api
        .get(GetAgentRequest {
            agent: "no-slash".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_disappears_within_three_heartbeat_intervals() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    let interval = Duration::from_secs(1);
    cfg.tunnel.heartbeat_interval = interval;
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let mut api = gw.client(&pki, "api").await;
    let mut watch = api
        .watch(WatchAgentsRequest {
            tenant: String::new(),
            agent: "acme/killed".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let proc = AgentProcess::spawn(&agent_config(
        &pki.agent("acme/killed"),
        gw.handle.tunnel_addr,
    ));
    let ev = tokio::time::timeout(T, watch.next())
        .await
        .expect("connect event")
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, Kind::Connected as i32);

    let killed = Instant::now();
    proc.signal(nix::sys::signal::Signal::SIGKILL);
    let ev = tokio::time::timeout(T, watch.next())
        .await
        .expect("disconnect event")
        .unwrap()
        .unwrap();
    let took = killed.elapsed();
    assert_eq!(ev.kind, Kind::Disconnected as i32);
    assert!(ev.reason.contains("heartbeat"), "reason: {}", ev.reason);
    // The session is closed at most 3 intervals after the last heartbeat, which came before the
    // kill; 300 ms covers event delivery on a loaded machine.
    assert!(
        took <= interval * 3 + Duration::from_millis(300),
        "took {took:?}"
    );
    assert_eq!(gw.sessions_of("acme/killed"), 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_on_the_same_port_agents_come_back_with_jittered_backoff() {
    let pki = Pki::new();
    // Below the ephemeral range: while the gateway is down, the agents' TCP dials of the
    // closed port cannot connect to themselves and hold it.
    let addr = restartable_port([127, 0, 0, 1].into());
    let gw = TestGateway::start_with(TestGateway::config(&pki), addr).await;
    let agents: Vec<_> = (0..6)
        .map(|i| TestAgent::start(&agent_config(&pki.agent(&format!("fleet/a{i}")), addr)))
        .collect();
    wait_until("6 agents connected", T, || {
        gw.handle.registry.session_count() == 6
    })
    .await;
    gw.stop().await;
    wait_until("agents notice", T, || {
        agents.iter().all(|a| !a.handle.status.connected())
    })
    .await;

    let gw = TestGateway::start_with(TestGateway::config(&pki), addr).await;
    wait_until("6 agents back", Duration::from_secs(30), || {
        gw.handle.registry.session_count() == 6
    })
    .await;

    // Each agent waited a full-jitter delay in [0, 200ms · 2ⁿ) before each attempt; the first
    // delays of six agents are all different and within the first window.
    let firsts: Vec<Duration> = agents
        .iter()
        .map(|a| a.handle.status.reconnect_delays()[0])
        .collect();
    assert!(
        firsts.iter().all(|d| *d < Duration::from_millis(200)),
        "{firsts:?}"
    );
    let mut uniq = firsts.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), firsts.len(), "delays are jittered: {firsts:?}");
    for a in agents {
        a.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_moves_the_agent_to_a_new_session_make_before_break() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut api = gw.client(&pki, "api").await;
    let agent = TestAgent::start(&agent_config(
        &pki.agent("acme/mover"),
        gw.handle.tunnel_addr,
    ));
    wait_until("connected", T, || gw.sessions_of("acme/mover") == 1).await;
    let old = gw.session_ids("acme/mover")[0].clone();
    let mut watch = api
        .watch(WatchAgentsRequest {
            tenant: String::new(),
            agent: "acme/mover".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = watch.next().await.unwrap().unwrap();
    assert!(snap.initial);

    gw.handle
        .registry
        .go_away_all("test drain", Duration::from_millis(400));

    let first = tokio::time::timeout(T, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(T, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Make-before-break: the new session registers before the old one leaves, so the agent is
    // never absent from the registry.
    assert_eq!(first.kind, Kind::Connected as i32);
    assert_ne!(first.session.unwrap().session_id, old);
    assert_eq!(second.kind, Kind::Disconnected as i32);
    assert_eq!(second.session.unwrap().session_id, old);
    assert!(second.reason.contains("replaced"), "{}", second.reason);
    assert_eq!(gw.sessions_of("acme/mover"), 1);
    assert!(agent.handle.status.connected());
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sessions_per_agent_id_are_kept() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let files = pki.agent("acme/replicated");
    let mut c1 = agent_config(&files, gw.handle.tunnel_addr);
    c1.instance_id = Some("replica-1".into());
    let mut c2 = c1.clone();
    c2.instance_id = Some("replica-2".into());
    let a1 = TestAgent::start(&c1);
    let a2 = TestAgent::start(&c2);
    wait_until("two sessions", T, || gw.sessions_of("acme/replicated") == 2).await;
    let mut instances: Vec<String> = gw
        .handle
        .registry
        .sessions()
        .iter()
        .map(|s| s.hello.instance_id.clone())
        .collect();
    instances.sort();
    assert_eq!(instances, ["replica-1", "replica-2"]);
    a1.stop().await;
    wait_until("one left", T, || gw.sessions_of("acme/replicated") == 1).await;
    a2.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_drain_sends_go_away_then_closes_with_shutdown() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.tunnel.drain_timeout = Duration::from_millis(500);
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = TestAgent::start(&agent_config(
        &pki.agent("acme/drained"),
        gw.handle.tunnel_addr,
    ));
    wait_until("connected", T, || agent.handle.status.connected()).await;
    let started = Instant::now();
    gw.stop().await;
    // The draining gateway refuses the replacement, so the old session lasts until the drain
    // timeout and then closes with SHUTDOWN.
    assert!(started.elapsed() >= Duration::from_millis(500));
    wait_until("agent saw the gateway's SHUTDOWN", T, || {
        agent.disconnected_because("shutdown gateway shutting down")
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_readyz_follows_the_session_and_healthz_does_not() {
    let pki = Pki::new();
    // Point the agent at a gateway address where nothing answers yet: below the ephemeral
    // range, so that neither another socket nor the agent's own TCP dial (a dial of a closed
    // port in the ephemeral range can connect to itself) holds it when the gateway starts.
    let addr = restartable_port([127, 0, 0, 1].into());
    let agent = TestAgent::start_with_ops(&agent_config(&pki.agent("acme/ready"), addr));
    let ops = agent.handle.ops_addr.unwrap();
    let get = move |path: &'static str| {
        tether_runtime::ops::probe(ops, path, Duration::from_secs(2)).unwrap()
    };
    let (status, body) = tokio::task::spawn_blocking(move || get("/readyz"))
        .await
        .unwrap();
    assert_eq!(status, 503, "not ready without a session: {body}");
    // Liveness must not fail merely because the gateway is unreachable.
    assert_eq!(
        tokio::task::spawn_blocking(move || get("/healthz"))
            .await
            .unwrap()
            .0,
        200
    );

    let gw = TestGateway::start_with(TestGateway::config(&pki), addr).await;
    // After a gateway restart an agent may land on the TCP fallback first (its QUIC attempt
    // lost the race with the restart) and moves to QUIC within seconds.
    wait_until("agent connected over QUIC", T, || {
        agent
            .handle
            .status
            .sessions()
            .iter()
            .any(|s| s.transport == "quic")
    })
    .await;
    let (status, body) = tokio::task::spawn_blocking(move || get("/readyz"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"transport\":\"quic\""), "{body}");
    let (status, metrics) = tokio::task::spawn_blocking(move || get("/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tether_agent_sessions_active"),
        "{metrics}"
    );
    // Once the gateway is gone the body says why the session ended, however many redials
    // have failed since.
    gw.stop().await;
    // (The agent may have held a TCP fallback session beside the QUIC one: either may end last.)
    wait_until("agent saw the gateway's SHUTDOWN", T, || {
        agent.disconnected_because("shutdown gateway shutting down")
    })
    .await;
    let (status, body) = tokio::task::spawn_blocking(move || get("/readyz"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    let detail: serde_json::Value = serde_json::from_str(&body).expect("/readyz body is JSON");
    let end = detail["last_session_end"].as_str().unwrap_or_default();
    assert!(end.contains("shutdown gateway shutting down"), "{body}");
    agent.stop().await;
}
