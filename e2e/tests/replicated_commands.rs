//! Commands across gateway replicas on one real PostgreSQL (Debian's server, started by the
//! test as an unprivileged user): real `tether-gateway` processes with `store.dsn`, a real agent
//! over real QUIC. Submits on any replica, one delivery per command by the agent's lease holder,
//! `kill -9` of the holder with 1,000 commands in flight, Cancel racing delivery across
//! replicas, idempotency keys submitted on every replica at once, and PostgreSQL restarting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_api::v1::{CancelCommandRequest, CommandState};
use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};
use tonic::Code;

const T: Duration = Duration::from_secs(60);
const AGENT: &str = "acme/eu-1";

/// Replicas sharing one PostgreSQL.
struct Fleet {
    pki: Pki,
    pg: LocalPostgres,
    gws: Vec<GatewayProcess>,
}

impl Fleet {
    async fn start(n: usize) -> Fleet {
        let pg =
            LocalPostgres::start(LocalPostgresOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let pki = Pki::new();
        let mut gws = Vec::new();
        for i in 0..n {
            gws.push(GatewayProcess::spawn_configured(&pki, &replica_config(&pg, i)).await);
        }
        Fleet { pki, pg, gws }
    }

    async fn client(&self, i: usize) -> CommandsClient {
        commands_client(self.gws[i].channel(&self.pki.client("api")).await)
    }

    /// The replica holding `AGENT`'s command lease, by its `tether_gateway_command_leases`.
    async fn holder(&self) -> usize {
        let deadline = Instant::now() + T;
        loop {
            let held: Vec<usize> = (0..self.gws.len())
                .filter(|&i| self.gws[i].metric("tether_gateway_command_leases", "") >= 1.0)
                .collect();
            if let [one] = held[..] {
                return one;
            }
            assert!(
                Instant::now() < deadline,
                "no single lease holder: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn replica_config(pg: &LocalPostgres, i: usize) -> String {
    replica_config_dsn(&pg.dsn(), i)
}

fn replica_config_dsn(dsn: &str, i: usize) -> String {
    format!(
        "[store]\ndsn = \"{dsn}\"\nconnect_timeout = \"30s\"\n[cluster]\nreplica_id = \"gw-{i}\"\nheartbeat_interval = \"200ms\"\nliveness_timeout = \"1s\"\n"
    )
}

/// An agent with sessions to `gateways`, whose `count` handler counts runs per payload.
fn counting_agent(
    fleet: &Fleet,
    gateways: &[usize],
    state: &std::path::Path,
) -> (TestAgent, Arc<Mutex<HashMap<String, u32>>>) {
    let (agent, runs, _) = ordered_agent(fleet, gateways, state);
    (agent, runs)
}

/// Runs per payload.
type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// `count` (5 ms) and `slow` (30 ms; four lanes run ~130 a second: a kill lands mid-way),
/// each counting its runs per payload and noting the order of first runs.
fn counting_handlers(runs: &Runs, order: &Arc<Mutex<Vec<String>>>) -> Arc<Handlers> {
    let handlers = test_handlers();
    for (kind, ms) in [("count", 5), ("slow", 30)] {
        let (r, o) = (runs.clone(), order.clone());
        handlers.register(kind, move |payload: bytes::Bytes, _p: ProgressSink| {
            let (r, o) = (r.clone(), o.clone());
            async move {
                {
                    let p = String::from_utf8_lossy(&payload).into_owned();
                    let mut runs = r.lock().unwrap();
                    let n = runs.entry(p.clone()).or_default();
                    *n += 1;
                    if *n == 1 {
                        o.lock().unwrap().push(p);
                    }
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(payload)
            }
        });
    }
    handlers
}

/// [`counting_agent`], also giving the order in which commands first ran.
fn ordered_agent(
    fleet: &Fleet,
    gateways: &[usize],
    state: &std::path::Path,
) -> (TestAgent, Runs, Arc<Mutex<Vec<String>>>) {
    let runs: Runs = Default::default();
    let order: Arc<Mutex<Vec<String>>> = Default::default();
    let handlers = counting_handlers(&runs, &order);
    let mut cfg = agent_config(&fleet.pki.agent(AGENT), fleet.gws[gateways[0]].tunnel);
    cfg.gateways = gateways
        .iter()
        .map(|&i| fleet.gws[i].tunnel.to_string())
        .collect();
    cfg.state_dir = Some(state.to_owned());
    (TestAgent::start_with_handlers(&cfg, handlers), runs, order)
}

/// Submits as a careful client does: with an idempotency key, again on `UNAVAILABLE` (a replica
/// that could not reach PostgreSQL in time on a loaded machine says so, and retrying is safe).
async fn submit_keyed(
    c: &mut CommandsClient,
    mut req: tether_api::v1::SubmitCommandRequest,
) -> tether_api::v1::SubmitCommandResponse {
    if req.idempotency_key.is_empty() {
        req.idempotency_key = format!("{}-{}", req.kind, String::from_utf8_lossy(&req.payload));
    }
    let deadline = Instant::now() + T;
    loop {
        match c.submit(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                eprintln!("submit unavailable, retrying: {}", e.message());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("submit: {e:?}"),
        }
    }
}

async fn wait_connected_everywhere(fleet: &Fleet, on: &[usize]) {
    for &i in on {
        wait_connected(
            fleet.gws[i].channel(&fleet.pki.client("api")).await,
            AGENT,
            T,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_submitted_on_every_replica_run_once_each_and_every_replica_reads_them() {
    let fleet = Fleet::start(3).await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, runs) = counting_agent(&fleet, &[0, 1, 2], state.path());
    wait_connected_everywhere(&fleet, &[0, 1, 2]).await;

    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(fleet.client(i).await);
    }
    let mut ids = Vec::new();
    for n in 0..60 {
        let c = &mut clients[n % 3];
        let mut req = submit_req(AGENT, "count", n.to_string());
        req.ordering_key = format!("k{}", n % 4);
        ids.push((submit_keyed(c, req).await.id, n));
    }
    fleet.holder().await;
    for (id, n) in &ids {
        // Read back on a replica other than the one that took the Submit.
        let c = wait_final(&mut clients[(n + 1) % 3], id, T).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
        assert_eq!(c.result.unwrap().output, n.to_string().as_bytes());
        assert!(
            c.version > 1,
            "a finished command has moved past version 1: {}",
            c.version
        );
    }
    {
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 60);
        assert!(
            runs.values().all(|n| *n == 1),
            "some command ran twice: {runs:?}"
        );
    }
    // Lists agree on every replica.
    for c in &mut clients {
        let page = c
            .list(tether_api::v1::ListCommandsRequest {
                agent: AGENT.into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(page.commands.len(), 60);
        assert!(
            page.commands
                .iter()
                .all(|c| c.state() == CommandState::Succeeded)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lease_holder_with_1000_commands_in_flight_loses_none_and_runs_each_at_most_once()
 {
    let mut fleet = Fleet::start(3).await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, runs, order) = ordered_agent(&fleet, &[0, 1, 2], state.path());
    wait_connected_everywhere(&fleet, &[0, 1, 2]).await;
    // When each Submit was sent and acknowledged, per payload.
    let timing: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Default::default();

    // 1,000 commands from 30 tasks over 16 ordering keys, spread over the three replicas.
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Default::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..30 {
        let mut c = fleet.client(t % 3).await;
        let (accepted, next, timing) = (accepted.clone(), next.clone(), timing.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 1000 {
                    return;
                }
                let mut r = submit_req(AGENT, "slow", i.to_string());
                r.ordering_key = format!("k{}", i % 4);
                let sent = Instant::now();
                let id = submit_keyed(&mut c, r).await.id;
                timing
                    .lock()
                    .unwrap()
                    .insert(i.to_string(), (sent, Instant::now()));
                accepted.lock().unwrap().push((id, i.to_string()));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let holder = fleet.holder().await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    wait_until("some commands ran", T, || runs.lock().unwrap().len() >= 50).await;
    let killed_at = Instant::now();
    fleet.gws[holder].child.start_kill().unwrap(); // SIGKILL
    fleet.gws[holder].child.wait().await.unwrap();
    let ran_at_kill = runs.lock().unwrap().len();
    assert!(
        ran_at_kill < 950,
        "killed too late: {ran_at_kill} of 1000 already ran"
    );
    // Submits on the survivors go on during the hand-over, every one accepted.
    let mut late = fleet.client(survivors[0]).await;
    for i in 1000..1100 {
        let mut r = submit_req(AGENT, "slow", i.to_string());
        r.ordering_key = format!("k{}", i % 4);
        let id = submit_keyed(&mut late, r).await.id;
        accepted.lock().unwrap().push((id, i.to_string()));
    }
    wait_until("another replica delivers", T, || {
        runs.lock().unwrap().len() > ran_at_kill + 1
    })
    .await;
    let handover = killed_at.elapsed();

    let accepted = accepted.lock().unwrap().clone();
    let mut client = fleet.client(survivors[1]).await;
    for (id, payload) in &accepted {
        let c = wait_final(&mut client, id, Duration::from_secs(120)).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
        assert_eq!(c.result.unwrap().output, payload.as_bytes());
    }
    // Order per ordering key: a Submit acknowledged before another of its key was sent ran first.
    let order = order.lock().unwrap();
    let first_run: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(n, p)| (p.as_str(), n))
        .collect();
    let timing = timing.lock().unwrap();
    for (x, (_, x_acked)) in timing.iter() {
        for (y, (y_sent, _)) in timing.iter() {
            let key = |p: &str| p.parse::<usize>().unwrap() % 4;
            if key(x) == key(y) && x_acked < y_sent {
                assert!(
                    first_run[x.as_str()] < first_run[y.as_str()],
                    "{x} was acknowledged before {y} was sent (key k{}) but ran after it",
                    key(x)
                );
            }
        }
    }
    let runs = runs.lock().unwrap();
    for (_, payload) in &accepted {
        assert_eq!(
            runs.get(payload),
            Some(&1),
            "payload {payload} ran {:?} times",
            runs.get(payload)
        );
    }
    eprintln!(
        "hand-over after kill -9 of the lease holder: first delivery by another replica after {handover:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_one_replica_and_delivery_by_another_never_both_win() {
    let fleet = Fleet::start(2).await;
    let state = tempfile::tempdir().unwrap();
    // The agent is connected to replica 0 only: replica 1 takes the Cancels.
    let (_agent, runs) = counting_agent(&fleet, &[0], state.path());
    wait_connected_everywhere(&fleet, &[0]).await;
    let mut on0 = fleet.client(0).await;
    let mut on1 = fleet.client(1).await;
    let mut outcomes = Vec::new();
    for n in 0..150 {
        let mut req = submit_req(AGENT, "count", n.to_string());
        // Each its own lane: delivery starts at once, racing the Cancel.
        req.ordering_key = format!("k{n}");
        let id = submit_keyed(&mut on0, req).await.id;
        let cancel = on1.cancel(CancelCommandRequest { id: id.clone() }).await;
        outcomes.push((id, n, cancel));
    }
    let (mut cancelled, mut ran) = (0, 0);
    for (id, n, cancel) in outcomes {
        let c = wait_final(&mut on1, &id, T).await;
        match cancel {
            Ok(_) => {
                cancelled += 1;
                assert_eq!(c.state(), CommandState::Cancelled, "{c:?}");
            }
            Err(e) => {
                ran += 1;
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
            }
        }
        let ran_n = runs.lock().unwrap().get(&n.to_string()).copied();
        if c.state() == CommandState::Cancelled {
            assert_eq!(ran_n, None, "cancelled command {id} ran on the agent");
        } else {
            assert_eq!(ran_n, Some(1), "command {id} ran {ran_n:?} times");
        }
    }
    eprintln!("{cancelled} cancelled before delivery, {ran} delivered first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_submitted_on_three_replicas_at_once_makes_one_command() {
    let fleet = Fleet::start(3).await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, runs) = counting_agent(&fleet, &[0, 1, 2], state.path());
    wait_connected_everywhere(&fleet, &[0, 1, 2]).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(fleet.client(i).await);
    }
    for key in 0..40 {
        let calls = clients.iter().map(|c| {
            let mut c = c.clone();
            let mut req = submit_req(AGENT, "count", format!("key{key}"));
            req.idempotency_key = format!("key{key}");
            async move { submit_keyed(&mut c, req).await }
        });
        let answers = futures::future::join_all(calls).await;
        let ids: std::collections::HashSet<&str> = answers.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids.len(), 1, "one command per key: {answers:?}");
        assert_eq!(
            answers.iter().filter(|a| a.created).count(),
            1,
            "{answers:?}"
        );
        let c = wait_final(&mut clients[key % 3], &answers[0].id, T).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 40);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarting_fails_submits_with_unavailable_and_loses_no_accepted_command() {
    let mut fleet = Fleet::start(2).await;
    let state = tempfile::tempdir().unwrap();
    let (_agent, runs) = counting_agent(&fleet, &[0, 1], state.path());
    wait_connected_everywhere(&fleet, &[0, 1]).await;
    let mut c = fleet.client(1).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            submit_keyed(&mut c, submit_req(AGENT, "count", n.to_string()))
                .await
                .id,
        );
    }
    fleet.pg.stop(true);
    let e = c
        .submit(submit_req(AGENT, "count", "refused"))
        .await
        .expect_err("a Submit with PostgreSQL down is refused");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    fleet.pg.start_again().expect("PostgreSQL starts again");
    // Accepted again once the replicas renewed their liveness.
    let deadline = Instant::now() + T;
    loop {
        match c.submit(submit_req(AGENT, "count", "after")).await {
            Ok(r) => {
                ids.push(r.into_inner().id);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(Instant::now() < deadline, "Submits still refused: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    for id in &ids {
        let c = wait_final(&mut c, id, T).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
    }
    let runs = runs.lock().unwrap();
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    assert!(!runs.contains_key("refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_lease_holder_is_taken_over_and_its_late_writes_change_nothing() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let fleet = Fleet::start(2).await;
    let state = tempfile::tempdir().unwrap();
    // `held` runs its first 20 payloads at once and holds the others until the test opens the
    // gate after the take-over: work is left for the other replica to take, however fast the
    // first 20 ran or however late the pause lands on a loaded machine.
    let runs: Runs = Default::default();
    let handlers = counting_handlers(&runs, &Default::default());
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let r = runs.clone();
    handlers.register("held", move |payload: bytes::Bytes, _p: ProgressSink| {
        let (r, mut open) = (r.clone(), gate_rx.clone());
        async move {
            let p = String::from_utf8_lossy(&payload).into_owned();
            *r.lock().unwrap().entry(p.clone()).or_default() += 1;
            if p.parse::<u32>().is_ok_and(|n| n >= 20) {
                let _ = open.wait_for(|o| *o).await;
            }
            Ok(payload)
        }
    });
    let mut cfg = agent_config(&fleet.pki.agent(AGENT), fleet.gws[0].tunnel);
    cfg.gateways = vec![
        fleet.gws[0].tunnel.to_string(),
        fleet.gws[1].tunnel.to_string(),
    ];
    cfg.state_dir = Some(state.path().to_owned());
    let _agent = TestAgent::start_with_handlers(&cfg, handlers);
    wait_connected_everywhere(&fleet, &[0, 1]).await;
    let mut ids = Vec::new();
    let mut c0 = fleet.client(0).await;
    for n in 0..300 {
        let mut req = submit_req(AGENT, "held", n.to_string());
        req.ordering_key = format!("k{}", n % 8);
        ids.push((submit_keyed(&mut c0, req).await.id, n));
    }
    let holder = fleet.holder().await;
    let other = 1 - holder;
    wait_until("some commands ran", T, || runs.lock().unwrap().len() >= 20).await;
    // Paused well past its liveness (1 s): it cannot tell, and wakes up believing it holds the
    // lease, with deliveries and writes in flight.
    let pid = Pid::from_raw(fleet.gws[holder].pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + T;
    while fleet.gws[other].metric("tether_gateway_command_leases", "") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no take-over while the holder was paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(pid, Signal::SIGCONT).unwrap();
    gate.send_replace(true);
    let mut c = fleet.client(other).await;
    for (id, n) in &ids {
        let got = wait_final(&mut c, id, Duration::from_secs(120)).await;
        assert_eq!(got.state(), CommandState::Succeeded, "{got:?}");
        assert_eq!(got.result.unwrap().output, n.to_string().as_bytes());
    }
    let deadline = Instant::now() + T;
    while fleet.gws[holder].metric("tether_gateway_command_leases", "") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the paused replica still believes it holds the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 300);
    assert!(
        runs.values().all(|n| *n == 1),
        "some command ran twice: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_postgresql_by_a_firewall_fences_itself_and_another_takes_its_agents()
 {
    let topo = netns::Topology::new().unwrap_or_else(|e| panic!("{e:#}"));
    let pg = LocalPostgres::start(LocalPostgresOptions {
        listen: topo.host_addr,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let pki = Pki::new();
    // Replica 0 in the control-plane namespace (where the firewall goes), replica 1 here.
    let gw0 = GatewayProcess::spawn_netns_configured(
        &pki,
        &topo.cp,
        SocketAddr::new(topo.api_addr.into(), 0),
        topo.api_addr.into(),
        &replica_config_dsn(&pg.dsn(), 0),
    )
    .await;
    // Replica 1 starts later on an address the agent already dials: until then the agent's
    // only session is with replica 0, which therefore takes the agent's lease.
    let gw1_addr = restartable_port(std::net::Ipv4Addr::LOCALHOST.into());
    let state = tempfile::tempdir().unwrap();
    let mut fleet = Fleet {
        pki,
        pg,
        gws: vec![gw0],
    };
    let (runs, order): (Runs, _) = Default::default();
    let mut cfg = agent_config(&fleet.pki.agent(AGENT), fleet.gws[0].tunnel);
    cfg.gateways = vec![fleet.gws[0].tunnel.to_string(), gw1_addr.to_string()];
    cfg.state_dir = Some(state.path().to_owned());
    // `gated` counts a run, then waits until the test opens the gate: nothing finishes before
    // the cut, however slow the machine.
    let handlers = counting_handlers(&runs, &order);
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let r = runs.clone();
    handlers.register("gated", move |payload: bytes::Bytes, _p: ProgressSink| {
        let (r, mut open) = (r.clone(), gate_rx.clone());
        async move {
            *r.lock()
                .unwrap()
                .entry(String::from_utf8_lossy(&payload).into_owned())
                .or_default() += 1;
            let _ = open.wait_for(|o| *o).await;
            Ok(payload)
        }
    });
    let _agent = TestAgent::start_with_handlers(&cfg, handlers);
    wait_connected_everywhere(&fleet, &[0]).await;
    let mut c0 = fleet.client(0).await;
    let mut ids = Vec::new();
    for n in 0..200 {
        let mut req = submit_req(AGENT, "gated", n.to_string());
        req.ordering_key = format!("k{}", n % 4);
        ids.push((submit_keyed(&mut c0, req).await.id, n));
    }
    assert_eq!(fleet.holder().await, 0);
    let extra = replica_config_dsn(&fleet.pg.dsn(), 1);
    fleet
        .gws
        .push(GatewayProcess::spawn_configured_at(&fleet.pki, gw1_addr, &extra).await);
    wait_connected_everywhere(&fleet, &[1]).await;

    // Cut replica 0 off from PostgreSQL: every packet to the server's port dropped.
    let port = fleet.pg.port();
    topo.cp
        .nft(&format!(
            "table inet pg_cut {{\n chain out {{\n type filter hook output priority 0;\n tcp dport {port} drop\n }}\n}}\n"
        ))
        .expect("nft");
    // It fences itself: not ready, with the reason; Submits refused at once.
    let deadline = Instant::now() + T;
    loop {
        let (status, body) =
            tether_runtime::ops::probe(fleet.gws[0].ops, "/readyz", Duration::from_secs(5))
                .expect("readyz");
        if status != 200 {
            assert!(
                body.contains("PostgreSQL") || body.contains("liveness"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "replica 0 still ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        c0.submit(submit_req(AGENT, "count", "refused")),
    )
    .await
    .expect("a fenced replica answers a Submit at once")
    .expect_err("a fenced replica refuses Submits");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Replica 1 takes the lease and delivers the rest, in order, each once.
    let deadline = Instant::now() + T;
    while fleet.gws[1].metric("tether_gateway_command_leases", "") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "replica 1 never took the agent's lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.send_replace(true);
    let mut c1 = fleet.client(1).await;
    for (id, n) in &ids {
        let got = wait_final(&mut c1, id, Duration::from_secs(120)).await;
        assert_eq!(got.state(), CommandState::Succeeded, "{got:?}");
        assert_eq!(got.result.unwrap().output, n.to_string().as_bytes());
    }
    {
        let runs = runs.lock().unwrap();
        assert!(
            runs.values().all(|n| *n == 1),
            "some command ran twice: {runs:?}"
        );
        assert!(!runs.contains_key("refused"));
    }
    // The firewall lifted, replica 0 is ready again by itself.
    topo.cp.nft("delete table inet pg_cut").expect("nft");
    let deadline = Instant::now() + T;
    loop {
        let (status, body) =
            tether_runtime::ops::probe(fleet.gws[0].ops, "/readyz", Duration::from_secs(5))
                .expect("readyz");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 0 not ready again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_awaiting_approval_is_seen_by_every_replica_survives_the_lease_holders_death_and_expires_by_its_ttl()
 {
    let mut fleet = Fleet::start(2).await;
    let state = tempfile::tempdir().unwrap();
    let runs: Runs = Default::default();
    let handlers = counting_handlers(&runs, &Default::default());
    let mut cfg = agent_config(&fleet.pki.agent(AGENT), fleet.gws[0].tunnel);
    cfg.gateways = fleet.gws.iter().map(|g| g.tunnel.to_string()).collect();
    cfg.state_dir = Some(state.path().to_owned());
    cfg.approvals.kinds = vec!["count".into()];
    let agent = TestAgent::start_with_handlers(&cfg, handlers);
    wait_connected_everywhere(&fleet, &[0, 1]).await;

    let mut req = submit_req(AGENT, "count", "needs a yes");
    req.ordering_key = "a".into();
    let id = submit_keyed(&mut fleet.client(1).await, req).await.id;
    let mut req = submit_req(AGENT, "count", "nobody answers");
    req.ordering_key = "b".into();
    req.ttl = Some(Duration::from_secs(6).try_into().unwrap());
    let lapses = submit_keyed(&mut fleet.client(0).await, req).await.id;
    // Both replicas read the state from PostgreSQL.
    for i in 0..2 {
        let mut c = fleet.client(i).await;
        for id in [&id, &lapses] {
            wait_until_state(&mut c, id, CommandState::AwaitingApproval).await;
        }
    }
    // The lease holder dies; the other takes the agent's commands over and delivers again:
    // the wait goes on (a redelivery does not count against max_attempts), nothing ran.
    let holder = fleet.holder().await;
    let other = 1 - holder;
    fleet.gws[holder].child.start_kill().unwrap();
    fleet.gws[holder].child.wait().await.unwrap();
    let mut c = fleet.client(other).await;
    let deadline = Instant::now() + T;
    loop {
        let got = get(&mut c, &id).await;
        assert_eq!(got.state(), CommandState::AwaitingApproval, "{got:?}");
        if got.attempts >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never redelivered: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(runs.lock().unwrap().is_empty());
    // Not answered in time: EXPIRED, written by the new holder.
    let expired = wait_until_state(&mut c, &lapses, CommandState::Expired).await;
    assert!(
        expired.result.as_ref().is_some_and(|r| r
            .message
            .contains("not approved in the data plane before its TTL")),
        "{expired:?}"
    );
    // Cancelled at a replica: CANCELLED, and the agent forgets the wait.
    let mut req = submit_req(AGENT, "count", "withdrawn");
    req.ordering_key = "c".into();
    let withdrawn = submit_keyed(&mut c, req).await.id;
    wait_until_state(&mut c, &withdrawn, CommandState::AwaitingApproval).await;
    let cancelled = c
        .cancel(CancelCommandRequest {
            id: withdrawn.clone(),
        })
        .await
        .expect("cancel a command awaiting approval")
        .into_inner();
    assert_eq!(cancelled.state(), CommandState::Cancelled);
    let approvals = agent.handle.control.approvals().clone();
    wait_until("the agent forgets the cancelled wait", T, || {
        !approvals.list().iter().any(|r| r.id == withdrawn)
    })
    .await;
    // Approved in the agent's cluster: it runs, once.
    agent
        .handle
        .control
        .approvals()
        .decide(&id, "test", None)
        .expect("approve");
    let done = wait_until_state(&mut c, &id, CommandState::Succeeded).await;
    assert_eq!(done.result.unwrap().output, b"needs a yes");
    assert_eq!(runs.lock().unwrap().get("needs a yes"), Some(&1));
    assert_eq!(runs.lock().unwrap().get("nobody answers"), None);
    agent.stop().await;
}

async fn get(c: &mut CommandsClient, id: &str) -> tether_api::v1::Command {
    c.get(tether_api::v1::GetCommandRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn wait_until_state(
    c: &mut CommandsClient,
    id: &str,
    state: CommandState,
) -> tether_api::v1::Command {
    wait_command_state(c, id, state, T).await
}
