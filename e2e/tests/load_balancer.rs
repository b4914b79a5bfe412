//! Gateway replicas behind a real load balancer (`tether_e2e::netns::LoadBalancer`: nftables
//! DNAT in a network namespace, a flow hash over the backends, conntrack keeping each flow on
//! its backend), as behind a cloud NLB. Three real `tether-gateway` processes on one throwaway
//! PostgreSQL, each in a namespace of its own; real agents, QUIC and TCP, that know only the
//! balancer's address.
//!
//! - the agents' sessions land on more than one replica, over UDP and over TCP alike;
//! - a backend removed from the set gets no new flow while the sessions it holds stay up;
//! - when that replica then dies (kill -9), its agents come back through the balancer, on the
//!   replicas still in the set.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tether_agent::config::TransportMode;
use tether_api::v1::ListAgentsRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_e2e::netns::LoadBalancer;
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
