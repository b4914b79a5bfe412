//! The data plane behind a real firewall: the gateway process in a control-plane network
//! namespace, the agent process and its upstreams in a data-plane namespace whose nftables
//! ruleset drops every inbound connection it did not initiate and lets out only UDP/TCP to the
//! gateway's port. Everything works through it, nothing in it is reachable, and it survives
//! packet loss and a partition. Needs root, `ip` and `nft` (CI runs these as root); without
//! them the tests fail saying what is missing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::config::{ReconnectConfig, ServiceKind};
use tether_api::demo::v1::EchoRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::{CommandState, GetAgentRequest, StreamChunk};
use tether_e2e::netns::{self, Topology};
use tether_e2e::*;
use tokio_stream::StreamExt;
use tonic::Code;

const AGENT: &str = "acme/dp-1";
const T: Duration = Duration::from_secs(60);
/// How long a port scan waits for each answer (an open port on a veth answers in well under
/// a millisecond; the positive control proves this wait finds one).
const SCAN_WAIT: Duration = Duration::from_secs(1);

fn topology() -> Topology {
    Topology::new().unwrap_or_else(|e| panic!("cannot build the test network: {e:#}"))
}

/// Fields drop in order: processes first, then the namespaces they ran in.
struct Scene {
    _agent: AgentProcess,
    gw: GatewayProcess,
    _upstream: DemoUpstream,
    topo: Topology,
    _pki: Pki,
    api: CertFiles,
    state: tempfile::TempDir,
}

/// Gateway in cp, firewall on dp, demo upstream (`default`) and a TCP echo (`tcp-echo`) on
/// dp's loopback, agent in dp; returns once the agent is connected. `loss` is set before the
/// agent dials.
async fn scene(topo: Topology, reconnect: Option<ReconnectConfig>, loss: u8) -> Scene {
    let pki = Pki::new();
    let gw = GatewayProcess::spawn_netns(
        &pki,
        &topo.cp,
        SocketAddr::new(topo.cp_addr.into(), 0),
        topo.api_addr.into(),
    )
    .await;
    topo.firewall(gw.tunnel).expect("firewall");
    topo.set_loss(loss).expect("loss");
    let (grpc, tcp) = topo
        .dp
        .run(|| {
            (
                std::net::TcpListener::bind("127.0.0.1:0"),
                std::net::TcpListener::bind("127.0.0.1:0"),
            )
        })
        .expect("bind in dp");
    let upstream = DemoUpstream::start_on(grpc.expect("bind upstream"));
    let echo = tcp_echo_on(tcp.expect("bind tcp echo"));

    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&pki.agent(AGENT), gw.tunnel);
    cfg.state_dir = Some(state.path().to_owned());
    if let Some(r) = reconnect {
        cfg.reconnect = r;
    }
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    with_service(&mut cfg, "tcp-echo", &echo.to_string(), ServiceKind::Tcp);
    let agent = AgentProcess::spawn_netns(&cfg, &topo.dp);
    let api = pki.client("api");
    let s = Scene {
        _agent: agent,
        gw,
        _upstream: upstream,
        topo,
        _pki: pki,
        api,
        state,
    };
    let mut agents = AgentsClient::new(s.gw.channel(&s.api).await);
    let started = Instant::now();
    wait_sessions(&mut agents, T, |n| n > 0).await;
    eprintln!("agent connected {:?} after start", started.elapsed());
    s
}

/// Polls `Agents/Get` until `ok(session count)`; an agent not yet known counts 0.
async fn wait_sessions(
    agents: &mut AgentsClient<tonic::transport::Channel>,
    timeout: Duration,
    ok: impl Fn(usize) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ids: Vec<String> = match agents
            .get(GetAgentRequest {
                agent: AGENT.into(),
            })
            .await
        {
            Ok(a) => a
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| s.session_id)
                .collect(),
            Err(s) if s.code() == Code::NotFound => Vec::new(),
            Err(s) => panic!("Agents/Get: {s}"),
        };
        if ok(ids.len()) {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "agent sessions {} after {timeout:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// Times each command id appears in the agent's completed record: each line is one execution.
fn executions(state_dir: &Path) -> HashMap<String, u32> {
    let text = std::fs::read_to_string(state_dir.join("commands.jsonl")).unwrap_or_default();
    let mut runs = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("record line");
        *runs
            .entry(v["id"].as_str().expect("id").to_owned())
            .or_insert(0) += 1;
    }
    runs
}

/// Every `(id, payload)` succeeded with its payload echoed, and ran exactly once on the agent.
/// Returns how many needed more than one delivery.
async fn assert_ran_exactly_once(s: &Scene, ids: &[(String, String)]) -> usize {
    let mut client = commands_client(s.gw.channel(&s.api).await);
    let mut redelivered = 0;
    for (id, payload) in ids {
        let c = wait_final(&mut client, id, T).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
        assert_eq!(c.result.as_ref().unwrap().output, payload.as_bytes());
        redelivered += usize::from(c.attempts > 1);
    }
    let runs = executions(s.state.path());
    for (id, payload) in ids {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "command {id} ({payload}) ran {:?} times",
            runs.get(id)
        );
    }
    assert_eq!(
        runs.len(),
        ids.len(),
        "the agent ran commands never submitted"
    );
    redelivered
}

fn scan_from_cp(topo: &Topology) -> netns::ScanReport {
    let target = IpAddr::V4(topo.dp_addr);
    tokio::task::block_in_place(|| topo.cp.run(|| netns::scan(target, SCAN_WAIT)))
        .expect("enter cp")
        .expect("scan")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_opens_no_port_and_everything_works_through_the_firewall() {
    let topo = topology();

    // Positive control, before the firewall: the same scan finds a TCP listener and a UDP
    // responder on the data plane's address, and sees resets and ICMP port unreachables
    // from the closed ports, so an empty result later means the firewall, not a blind scan.
    let (tcp, udp) = topo
        .dp
        .run(|| {
            (
                std::net::TcpListener::bind((topo.dp_addr, 0)),
                std::net::UdpSocket::bind((topo.dp_addr, 0)),
            )
        })
        .unwrap();
    let (tcp, udp) = (tcp.unwrap(), udp.unwrap());
    let (tcp_port, udp_port) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    udp.set_nonblocking(true).unwrap();
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    let responder = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let control = scan_from_cp(&topo);
    responder.abort();
    drop(tcp);
    eprintln!(
        "control scan (no firewall, listeners tcp/{tcp_port} udp/{udp_port}): {:?}: tcp open {:?} refused {} silent {}; udp replied {:?} unreachable {} silent {}",
        control.elapsed,
        control.tcp_open,
        control.tcp_refused,
        control.tcp_silent,
        control.udp_replied,
        control.udp_unreachable,
        control.udp_silent
    );
    assert!(
        control.errors.is_empty(),
        "{:?}",
        &control.errors[..5.min(control.errors.len())]
    );
    assert_eq!(control.tcp_open, vec![tcp_port]);
    assert_eq!(control.udp_replied, vec![udp_port]);
    assert!(control.tcp_refused > 60_000, "{control:?}");
    assert!(control.udp_unreachable > 0, "no ICMP seen: {control:?}");

    let s = scene(topo, None, 0).await;
    eprintln!("data-plane ruleset:\n{}", s.topo.dp_ruleset().unwrap());

    // All four call shapes through the northbound relay.
    let ch = s.gw.channel(&s.api).await;
    let mut echo = tether_api::demo::v1::echo_client::EchoClient::with_interceptor(
        ch.clone(),
        Route::new(Some(AGENT), None),
    );
    let r = echo.unary(req("through the firewall")).await.unwrap();
    assert_eq!(r.into_inner().message, "through the firewall");
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "s".into(),
            repeat: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.push(m.unwrap().index);
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    let resp = echo
        .client_stream(tokio_stream::iter(["a", "b", "c"].map(req)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.message.as_str(), resp.index), ("abc", 3));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(req(&format!("m{i}"))).await.unwrap();
        let m = tokio::time::timeout(T, replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.message, format!("m{i}"));
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    // A TCP stream to the data plane's loopback echo.
    let mut streams =
        StreamsClient::with_interceptor(ch, Route::new(Some(AGENT), Some("tcp-echo")));
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let chunks = data
        .chunks(16 * 1024)
        .map(|c| StreamChunk { data: c.to_vec() })
        .collect::<Vec<_>>();
    let mut inbound = streams
        .open(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(c) = inbound.message().await.unwrap() {
        back.extend_from_slice(&c.data);
    }
    assert_eq!(back, data, "TCP stream bytes differ");

    // A command.
    let mut commands = commands_client(s.gw.channel(&s.api).await);
    let id = commands
        .submit(submit_req(AGENT, "echo", "command through the firewall"))
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_ran_exactly_once(&s, &[(id, "command through the firewall".into())]).await;

    // Egress goes only to the gateway's port: a TCP listener on the same cp address is
    // refused by the data plane's own firewall.
    let other = s
        .topo
        .cp
        .run(|| std::net::TcpListener::bind((s.topo.cp_addr, 0)))
        .unwrap()
        .unwrap();
    let other_addr = other.local_addr().unwrap();
    let out = s
        .topo
        .dp
        .run(|| std::net::TcpStream::connect_timeout(&other_addr, Duration::from_secs(2)))
        .unwrap();
    assert!(
        out.is_err(),
        "dp reached {other_addr}, not the gateway port"
    );
    eprintln!(
        "dp → {other_addr} (not the gateway port): {}",
        out.unwrap_err()
    );

    // Nothing of the data plane is reachable: every TCP and UDP port of its address, scanned
    // from the control plane while the agent and its upstreams run, answers nothing at all.
    let scan = scan_from_cp(&s.topo);
    eprintln!(
        "firewalled scan of {} (65,535 TCP + 65,535 UDP ports): {:?}: tcp open {:?} refused {} silent {}; udp replied {:?} unreachable {} silent {}",
        s.topo.dp_addr,
        scan.elapsed,
        scan.tcp_open,
        scan.tcp_refused,
        scan.tcp_silent,
        scan.udp_replied,
        scan.udp_unreachable,
        scan.udp_silent
    );
    assert!(
        scan.errors.is_empty(),
        "{:?}",
        &scan.errors[..5.min(scan.errors.len())]
    );
    assert!(
        scan.tcp_open.is_empty(),
        "open TCP ports: {:?}",
        scan.tcp_open
    );
    assert!(
        scan.udp_replied.is_empty(),
        "UDP ports replied: {:?}",
        scan.udp_replied
    );
    assert_eq!(
        (scan.tcp_refused, scan.udp_unreachable),
        (0, 0),
        "the firewall answered"
    );
    assert_eq!((scan.tcp_silent, scan.udp_silent), (65_535, 65_535));

    // And the data plane listens on loopback only (the upstreams, the agent's ops).
    let listening = netns::listeners(&s.topo.dp).unwrap();
    eprintln!("ss -lntu in dp: {listening:?}");
    assert!(
        listening.len() >= 3,
        "expected the two upstreams and the agent's ops: {listening:?}"
    );
    for (netid, local) in &listening {
        assert!(
            netns::is_loopback_listener(local),
            "{netid} listener on {local} in the data plane"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_still_delivers_1000_rpcs_and_200_commands() {
    let s = scene(topology(), None, 5).await;
    let ch = s.gw.channel(&s.api).await;
    let echo = tether_api::demo::v1::echo_client::EchoClient::with_interceptor(
        ch,
        Route::new(Some(AGENT), None),
    );

    // 1,000 unary calls from 16 callers, each with a 30 s deadline: every one must succeed.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut echo, next) = (echo.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 1000 {
                    return lat;
                }
                let mut r = tonic::Request::new(req(&format!("rpc-{i}")));
                r.set_timeout(Duration::from_secs(30));
                let t = Instant::now();
                let resp = echo
                    .unary(r)
                    .await
                    .unwrap_or_else(|e| panic!("rpc {i}: {e}"));
                assert_eq!(resp.into_inner().message, format!("rpc-{i}"));
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rpc_time = started.elapsed();
    assert_eq!(lat.len(), 1000);
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    let max = *lat.iter().max().unwrap();
    let dropped_rpcs = s.topo.loss_dropped().unwrap();

    // 200 commands, submitted at once, each run exactly once and answered.
    let started = Instant::now();
    let mut client = commands_client(s.gw.channel(&s.api).await);
    let mut ids = Vec::new();
    for i in 0..200 {
        let payload = format!("cmd-{i}");
        let id = client
            .submit(submit_req(AGENT, "echo", payload.clone()))
            .await
            .unwrap()
            .into_inner()
            .id;
        ids.push((id, payload));
    }
    let redelivered = assert_ran_exactly_once(&s, &ids).await;
    let cmd_time = started.elapsed();
    let dropped = s.topo.loss_dropped().unwrap();
    eprintln!(
        "5% loss: 1000/1000 unary RPCs in {rpc_time:?} (16 callers; p50 {p50:?}, p99 {p99:?}, max {max:?}); \
         200/200 commands succeeded, each run once, in {cmd_time:?} ({redelivered} redelivered); \
         {dropped} packets dropped by the loss rules ({dropped_rpcs} during the RPCs)"
    );
    assert!(dropped > 0, "the loss rules dropped nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_partition_loses_no_command_and_hangs_no_caller() {
    // The agent's shipped reconnect settings, so the recovery time is the one deployments get.
    let reconnect = ReconnectConfig::default();
    eprintln!(
        "agent reconnect: initial_backoff {:?}, max_backoff {:?}, connect_timeout {:?}; gateway heartbeat 500 ms",
        reconnect.initial_backoff, reconnect.max_backoff, reconnect.connect_timeout
    );
    let s = scene(topology(), Some(reconnect), 0).await;
    let ch = s.gw.channel(&s.api).await;
    let mut agents = AgentsClient::new(ch.clone());
    let echo = tether_api::demo::v1::echo_client::EchoClient::with_interceptor(
        ch.clone(),
        Route::new(Some(AGENT), None),
    );
    let mut client = commands_client(ch);

    let mut ids = Vec::new();
    for i in 0..5 {
        let payload = format!("before-{i}");
        let id = client
            .submit(submit_req(AGENT, "echo", payload.clone()))
            .await
            .unwrap()
            .into_inner()
            .id;
        ids.push((id, payload));
    }
    assert_ran_exactly_once(&s, &ids).await;
    let before = wait_sessions(&mut agents, T, |n| n == 1).await;

    const PARTITION: Duration = Duration::from_secs(20);
    const DEADLINE: Duration = Duration::from_secs(2);
    /// How far past its deadline an answer may come before it counts as hanging.
    const GRACE: Duration = Duration::from_millis(1500);
    s.topo.link_down().unwrap();
    let down = Instant::now();
    let up_at = down + PARTITION;
    let session_gone = {
        let mut agents = agents.clone();
        tokio::spawn(async move {
            wait_sessions(&mut agents, PARTITION, |n| n == 0).await;
            down.elapsed()
        })
    };

    // Callers during the partition: 4 callers on one channel, each making a unary call with a
    // 2 s deadline every 100 ms. Not a hot loop: one caller looping on fast UNAVAILABLEs
    // (~900 calls/s) had its connection closed by the gateway's HTTP/2 server after ~16,600
    // calls, GOAWAY ENHANCE_YOUR_CALM "too_many_internal_resets" (h2 allows 1,024 library
    // resets per connection), which tonic reports as RESOURCE_EXHAUSTED: a gateway issue of
    // its own, not what this test is about.
    let probers: Vec<_> = (0..4)
        .map(|_| {
            let mut echo = echo.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() + DEADLINE < up_at {
                    let mut r = tonic::Request::new(req("during"));
                    r.set_timeout(DEADLINE);
                    let t = Instant::now();
                    let res = tokio::time::timeout(DEADLINE + GRACE, echo.unary(r)).await;
                    let took = t.elapsed();
                    match res {
                        Err(_) => panic!("a unary call hung past {:?}", DEADLINE + GRACE),
                        Ok(Ok(_)) => panic!("a unary call succeeded during the partition"),
                        Ok(Err(e)) => {
                            assert!(
                                matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                                "a call during the partition ended {e:?} after {took:?}"
                            );
                            outcomes.push((e.code(), took))
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                outcomes
            })
        })
        .collect();
    // Commands during the partition: each Submit is accepted (durable) at once.
    let mut submit_max = Duration::ZERO;
    let mut i = 0;
    while Instant::now() + Duration::from_millis(200) < up_at {
        let payload = format!("during-{i}");
        let t = Instant::now();
        let id = tokio::time::timeout(
            DEADLINE,
            client.submit(submit_req(AGENT, "echo", payload.clone())),
        )
        .await
        .expect("Submit hung during the partition")
        .expect("Submit refused during the partition")
        .into_inner()
        .id;
        submit_max = submit_max.max(t.elapsed());
        ids.push((id, payload));
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let session_gone = session_gone.await.unwrap();
    let mut outcomes = Vec::new();
    for p in probers {
        outcomes.extend(p.await.unwrap());
    }
    // The partition itself is the scenario: the link stays down for its full 20 s.
    tokio::time::sleep_until(up_at.into()).await;
    s.topo.link_up().unwrap();
    let up = Instant::now();

    let after = wait_sessions(&mut agents, T, |n| n > 0).await;
    let reconnected = up.elapsed();
    assert_ne!(
        before, after,
        "the agent kept its old session through a 20 s partition"
    );
    let mut e = echo.clone();
    let first_rpc = loop {
        let mut r = tonic::Request::new(req("after"));
        r.set_timeout(DEADLINE);
        if e.unary(r).await.is_ok() {
            break up.elapsed();
        }
        assert!(
            up.elapsed() < T,
            "no RPC succeeded within {T:?} of the link coming back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let redelivered = assert_ran_exactly_once(&s, &ids).await;
    let all_done = up.elapsed();

    let unavailable = outcomes
        .iter()
        .filter(|(c, _)| *c == Code::Unavailable)
        .count();
    let deadline = outcomes
        .iter()
        .filter(|(c, _)| *c == Code::DeadlineExceeded)
        .count();
    let slowest = outcomes.iter().map(|(_, t)| *t).max().unwrap_or_default();
    assert!(!outcomes.is_empty());
    eprintln!(
        "20 s partition: {} calls during it, {unavailable} UNAVAILABLE + {deadline} DEADLINE_EXCEEDED, \
         slowest answer {slowest:?} (deadline {DEADLINE:?}); {} Submits accepted during it (slowest {submit_max:?}); \
         session dropped {session_gone:?} after link down; after link up: agent reconnected in {reconnected:?}, \
         first RPC ok at {first_rpc:?}, all {} commands succeeded at {all_done:?}, each run exactly once \
         ({redelivered} redelivered)",
        outcomes.len(),
        i,
        ids.len()
    );
}
