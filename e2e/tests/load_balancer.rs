//! Gateway replicas behind a real load balancer (`tether_e2e::netns::LoadBalancer`: nftables
//! DNAT in a network namespace, a flow hash over the backends, conntrack keeping each flow on
//! its backend), as behind a cloud NLB. Three real `tether-gateway` processes on one throwaway
//! PostgreSQL, each in a namespace of its own; real agents, QUIC and TCP, that know only the
//! balancer's address.
//!
//! - the agents' sessions land on more than one replica, over UDP and over TCP alike;
//! - a backend removed from the set gets no new flow while the sessions it holds stay up;
//! - when that replica then dies (kill -9), its agents come back through the balancer, on the
//!   replicas still in the set;
//! - the balancer itself, with plain UDP and TCP servers behind it: new flows spread (by flow
//!   hash and at random), every datagram of a flow reaches the same backend, a backend out of
//!   the set keeps its flows and gets no new one, and with no backend new flows are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_agent::config::TransportMode;
use tether_api::v1::ListAgentsRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_e2e::netns::{LoadBalancer, Spread};
use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};

const T: Duration = Duration::from_secs(30);
/// The balanced port, in namespaces of this test's own (nothing else listens there).
const PORT: u16 = 7443;

/// Every agent's sessions, by replica, as `gw` lists them: agent → replicas (sorted).
async fn sessions(gw: &GatewayProcess, pki: &Pki) -> BTreeMap<String, Vec<String>> {
    let Ok(list) = AgentsClient::new(gw.channel(&pki.client("ops")).await)
        .list(ListAgentsRequest {
            connected_only: true,
            ..Default::default()
        })
        .await
    else {
        return BTreeMap::new();
    };
    list.into_inner()
        .agents
        .into_iter()
        .map(|a| {
            let mut r: Vec<String> = a.sessions.into_iter().map(|s| s.replica).collect();
            r.sort();
            (a.id, r)
        })
        .collect()
}

/// Polls `gw`'s list until every one of `agents` has a session, or panics after `within`.
async fn all_listed(
    gw: &GatewayProcess,
    pki: &Pki,
    agents: &[String],
    within: Duration,
    what: &str,
) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        let s = sessions(gw, pki).await;
        if agents
            .iter()
            .all(|a| s.get(a).is_some_and(|r| !r.is_empty()))
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not every agent listed with a session after {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_agents(
    pki: &Pki,
    lb: &LoadBalancer,
    prefix: &str,
    n: usize,
    mode: TransportMode,
) -> Vec<(String, TestAgent)> {
    (0..n)
        .map(|i| {
            let id = format!("acme/{prefix}-{i}");
            let mut cfg = agent_config(&pki.agent(&id), lb.addr());
            cfg.transport.mode = mode;
            (id, TestAgent::start(&cfg))
        })
        .collect()
}

/// The replicas `agents` have sessions on, per `listed`.
fn replicas_of(
    listed: &BTreeMap<String, Vec<String>>,
    agents: &[(String, TestAgent)],
) -> BTreeSet<String> {
    agents
        .iter()
        .flat_map(|(id, _)| listed.get(id).cloned().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_behind_a_load_balancer_spread_over_replicas_and_a_removed_backend_gets_no_new_flows()
 {
    init();
    let lb = LoadBalancer::new(3, PORT).expect("load balancer");
    let pki = Pki::new();
    let pg = LocalPostgres::start(LocalPostgresOptions {
        listen: lb.host_addr,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("this test needs a local PostgreSQL: {e}"));
    let mut gws = Vec::new();
    for k in 0..3 {
        let cfg = lb.replica_config(k, &pg.dsn(), &format!("r{}", k + 1));
        gws.push(lb.spawn_gateway(k, &pki, &cfg).await);
    }

    // 12 agents over QUIC and 12 over TCP, each given only the balancer's address. Each lands
    // where the hash of its flow sends it: all 24 on one replica would take a 3^-11 chance per
    // protocol.
    let quic = start_agents(&pki, &lb, "quic", 12, TransportMode::Quic);
    let tcp = start_agents(&pki, &lb, "tcp", 12, TransportMode::Tcp);
    let ids: Vec<String> = quic.iter().chain(&tcp).map(|(id, _)| id.clone()).collect();
    let listed = all_listed(&gws[0], &pki, &ids, T, "first agents").await;
    let (on_quic, on_tcp) = (replicas_of(&listed, &quic), replicas_of(&listed, &tcp));
    eprintln!("QUIC sessions on {on_quic:?}, TCP sessions on {on_tcp:?}");
    assert!(
        on_quic.len() >= 2,
        "QUIC agents all on {on_quic:?}: {listed:?}"
    );
    assert!(
        on_tcp.len() >= 2,
        "TCP agents all on {on_tcp:?}: {listed:?}"
    );
    let flows = lb.new_flows().unwrap();
    eprintln!("new flows per backend: {flows:?}");
    assert!(
        flows.iter().filter(|f| **f > 0).count() >= 2,
        "the balancer sent every flow to one backend: {flows:?}"
    );
    assert!(flows.iter().sum::<u64>() >= 24, "{flows:?}");

    // Remove r2 (backend 1) from the set: its sessions stay, it gets no new flow.
    let held_by_r2: Vec<String> = listed
        .iter()
        .filter(|(_, r)| r.iter().any(|r| r == "r2"))
        .map(|(a, _)| a.clone())
        .collect();
    lb.set_backends(&[0, 2]).unwrap();
    let before = lb.new_flows().unwrap();
    let more_quic = start_agents(&pki, &lb, "late-quic", 8, TransportMode::Quic);
    let more_tcp = start_agents(&pki, &lb, "late-tcp", 8, TransportMode::Tcp);
    let late: Vec<String> = more_quic
        .iter()
        .chain(&more_tcp)
        .map(|(id, _)| id.clone())
        .collect();
    let listed = all_listed(&gws[0], &pki, &late, T, "agents after the removal").await;
    let after = lb.new_flows().unwrap();
    eprintln!("new flows per backend after r2 left the set: {before:?} → {after:?}");
    assert_eq!(after[1], before[1], "r2 got new flows out of the set");
    assert!(
        after[0] + after[2] >= before[0] + before[2] + 16,
        "{before:?} → {after:?}"
    );
    let late_on: BTreeSet<String> = replicas_of(&listed, &more_quic)
        .union(&replicas_of(&listed, &more_tcp))
        .cloned()
        .collect();
    assert!(!late_on.contains("r2"), "new sessions on r2: {listed:?}");
    for a in &held_by_r2 {
        assert!(
            listed.get(a).is_some_and(|r| r.iter().any(|r| r == "r2")),
            "{a} lost its session on r2 when r2 left the set: {listed:?}"
        );
    }

    // r2 dies: its agents redial the balancer (a new flow each) and land on r1 or r3.
    gws[1].child.start_kill().unwrap();
    let _ = gws[1].child.wait().await;
    let deadline = Instant::now() + T;
    loop {
        let s = sessions(&gws[0], &pki).await;
        let everyone = ids.iter().chain(&late);
        let placed = everyone.clone().all(|a| {
            s.get(a)
                .is_some_and(|r| !r.is_empty() && r.iter().all(|r| r != "r2"))
        });
        if placed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents of the killed r2 not back on r1/r3 within {T:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lb.new_flows().unwrap()[1], before[1]);
    for (_, a) in quic.into_iter().chain(tcp).chain(more_quic).chain(more_tcp) {
        a.stop().await;
    }
}

/// A backend's UDP and TCP servers, answering every datagram and connection with its index.
fn serve_index(lb: &LoadBalancer, k: usize, stop: &Arc<AtomicBool>) {
    let addr = lb.backend_addr(k);
    let (udp, tcp) = lb.backends[k]
        .ns
        .run(|| {
            (
                std::net::UdpSocket::bind(addr).expect("bind UDP in the backend"),
                std::net::TcpListener::bind(addr).expect("bind TCP in the backend"),
            )
        })
        .expect("enter the backend's namespace");
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let (s1, s2) = (stop.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !s1.load(Ordering::Relaxed) {
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&[k as u8], from);
            }
        }
    });
    std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            match tcp.accept() {
                Ok((mut c, _)) => {
                    let _ = std::io::Write::write_all(&mut c, &[k as u8]);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// A UDP flow to the balancer: one socket, so one 5-tuple.
struct Flow(std::net::UdpSocket);

impl Flow {
    fn open(lb: &LoadBalancer) -> Flow {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect(lb.addr()).unwrap();
        Flow(s)
    }

    /// The backend that answers a datagram of this flow.
    fn ask(&self) -> usize {
        self.0.send(b"?").unwrap();
        let mut b = [0u8; 8];
        let n = self.0.recv(&mut b).expect("an answer through the balancer");
        assert_eq!(n, 1);
        b[0] as usize
    }
}

fn tcp_ask(lb: &LoadBalancer) -> usize {
    let mut c = std::net::TcpStream::connect_timeout(&lb.addr(), Duration::from_secs(5))
        .expect("a TCP connection through the balancer");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut c, &mut b).expect("the backend's answer");
    b[0] as usize
}

#[test]
fn the_balancer_spreads_new_flows_keeps_each_on_its_backend_and_drains_a_removed_one() {
    for spread in [Spread::FlowHash, Spread::Random] {
        let lb = LoadBalancer::with_spread(3, PORT, spread).expect("load balancer");
        let stop = Arc::new(AtomicBool::new(false));
        for k in 0..3 {
            serve_index(&lb, k, &stop);
        }
        // 40 UDP flows and 40 TCP connections: each lands on one backend, and all of a flow's
        // datagrams on the same one.
        let flows: Vec<(Flow, usize)> = (0..40)
            .map(|_| {
                let f = Flow::open(&lb);
                let k = f.ask();
                (f, k)
            })
            .collect();
        for (f, k) in &flows {
            for _ in 0..3 {
                assert_eq!(f.ask(), *k, "{spread:?}: a flow moved between backends");
            }
        }
        let mut udp = [0usize; 3];
        for (_, k) in &flows {
            udp[*k] += 1;
        }
        let mut tcp = [0usize; 3];
        for _ in 0..40 {
            tcp[tcp_ask(&lb)] += 1;
        }
        eprintln!("{spread:?}: UDP flows per backend {udp:?}, TCP {tcp:?}");
        assert!(
            udp.iter().filter(|n| **n > 0).count() >= 2,
            "{spread:?} UDP {udp:?}"
        );
        assert!(
            tcp.iter().filter(|n| **n > 0).count() >= 2,
            "{spread:?} TCP {tcp:?}"
        );
        let counted = lb.new_flows().unwrap();
        assert_eq!(counted.iter().sum::<u64>(), 80, "{spread:?}: {counted:?}");
        for k in 0..3 {
            assert_eq!(
                counted[k] as usize,
                udp[k] + tcp[k],
                "{spread:?}: {counted:?}"
            );
        }

        // Backend 1 leaves the set: new flows avoid it, its established flows stay on it.
        lb.set_backends(&[0, 2]).unwrap();
        assert_eq!(lb.active(), [0, 2]);
        for _ in 0..30 {
            assert_ne!(
                Flow::open(&lb).ask(),
                1,
                "{spread:?}: a new UDP flow went to the removed backend"
            );
            assert_ne!(
                tcp_ask(&lb),
                1,
                "{spread:?}: a new TCP connection went to the removed backend"
            );
        }
        for (f, k) in &flows {
            assert_eq!(
                f.ask(),
                *k,
                "{spread:?}: an established flow moved when its backend left the set"
            );
        }
        assert_eq!(lb.new_flows().unwrap()[1], counted[1]);

        // No backend at all: new flows are dropped (and counted), none answered.
        lb.set_backends(&[]).unwrap();
        let f = Flow::open(&lb);
        f.0.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        f.0.send(b"?").unwrap();
        assert!(
            f.0.recv(&mut [0u8; 8]).is_err(),
            "{spread:?}: answered with no backend"
        );
        assert!(lb.refused_flows().unwrap() >= 1);
        assert!(
            lb.set_backends(&[3]).is_err(),
            "a backend that does not exist"
        );
        stop.store(true, Ordering::Relaxed);
    }
}
