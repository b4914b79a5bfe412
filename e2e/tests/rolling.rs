//! Agents behind one address, on replicas that come and go: three real `tether-gateway`
//! processes on one throwaway PostgreSQL, a round-robin UDP load balancer in front of them
//! (`tether_e2e::udp_balancer`: agents know its address only), real agents with real upstreams.
//!
//! - an agent keeps `connections` sessions on distinct replicas behind the one address;
//! - kill -9 of one of three replicas under load: only calls sent to it fail, calls to the
//!   replicas holding the agents' other sessions go on at once, the agents regain their count
//!   on the third replica, and no command is lost;
//! - a rolling restart of the three replicas under steady load (unary calls to every replica
//!   that is up, forwarded over the peer links when it holds no session of the agent; commands;
//!   a long server stream through each replica before it goes): no unary call fails, no command
//!   is lost; long streams cut by a restart are counted;
//! - a replica started after the others (a scale-out) gets its share: the replica above its
//!   share asks agents to move, and they land elsewhere.
//!
//! The callers route like a client behind a load balancer that knows the replicas' readiness:
//! a call goes to a replica that is up; in the kill test only to one that holds a session of
//! the agent (the agent's own status says which: what is measured there is the agents' other
//! sessions taking over, not forwarding), in the rolling restart to every replica that is up.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tether_agent::config::{ServiceKind, TransportMode};
use tether_agent::status::AgentStatus;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::CommandState;
use tether_e2e::udp_balancer::UdpBalancer;
use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(60);
/// Replicas drain for at most this long (`tunnel.drain_timeout`).
const DRAIN: Duration = Duration::from_secs(10);

/// One replica: its name, its fixed tunnel address (a restart takes it again), its process.
struct Slot {
    name: String,
    tunnel: SocketAddr,
    gw: Option<GatewayProcess>,
}

/// Replicas on one PostgreSQL behind a UDP load balancer, and the routes callers use.
struct Fleet {
    pki: Pki,
    pg: LocalPostgres,
    slots: Vec<Slot>,
    lb: UdpBalancer,
    routes: Routes,
    env: Vec<(String, String)>,
}

/// The northbound channel of each replica that is up (index = replica number − 1), with a
/// generation that changes when the replica is started again.
#[derive(Clone, Default)]
struct Routes(Arc<RwLock<Vec<Option<UpReplica>>>>);

/// A replica that is up: a channel to it, and its start count.
type UpReplica = (tonic::transport::Channel, u64);

static GENERATION: AtomicU64 = AtomicU64::new(0);

impl Routes {
    fn set(&self, i: usize, ch: Option<tonic::transport::Channel>) {
        let mut r = self.0.write().unwrap();
        if r.len() <= i {
            r.resize(i + 1, None);
        }
        r[i] = ch.map(|c| (c, GENERATION.fetch_add(1, Ordering::Relaxed)));
    }

    fn get(&self, i: usize) -> Option<tonic::transport::Channel> {
        self.get_gen(i).map(|(c, _)| c)
    }

    fn get_gen(&self, i: usize) -> Option<(tonic::transport::Channel, u64)> {
        self.0.read().unwrap().get(i).cloned().flatten()
    }

    fn up(&self) -> Vec<usize> {
        let r = self.0.read().unwrap();
        (0..r.len()).filter(|i| r[*i].is_some()).collect()
    }
}

/// `r2#5` → 1.
fn replica_index(replica: &str) -> Option<usize> {
    let name = replica.split('#').next()?;
    name.strip_prefix('r')?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// The replicas holding `status`'s sessions (indexes), in order.
fn held(status: &AgentStatus) -> Vec<usize> {
    let mut v: Vec<usize> = status
        .sessions()
        .iter()
        .filter_map(|s| replica_index(&s.replica))
        .collect();
    v.sort();
    v
}

fn distinct(v: &[usize]) -> bool {
    v.iter().collect::<BTreeSet<_>>().len() == v.len()
}

impl Fleet {
    /// `n` replicas, of which the first `start` are started, with `env` on each.
    async fn start(n: usize, start: usize, env: &[(&str, &str)]) -> Fleet {
        let pg = LocalPostgres::start(LocalPostgresOptions::default())
            .unwrap_or_else(|e| panic!("this test needs a local PostgreSQL: {e}"));
        let pki = Pki::new();
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("TETHER_TUNNEL_TCP_FALLBACK".into(), "false".into()));
        let mut slots = Vec::new();
        for i in 0..n {
            // A free port, kept across restarts.
            let port = restartable_port(std::net::Ipv4Addr::LOCALHOST.into());
            slots.push(Slot {
                name: format!("r{}", i + 1),
                tunnel: port,
                gw: None,
            });
        }
        let lb = UdpBalancer::start(&[]).await;
        let mut fleet = Fleet {
            pki,
            pg,
            slots,
            lb,
            routes: Routes::default(),
            env,
        };
        for i in 0..start {
            fleet.up(i).await;
        }
        fleet
    }

    /// Starts replica `i` (again) on its tunnel address, and puts it behind the balancer and
    /// in the callers' routes.
    async fn up(&mut self, i: usize) {
        let slot = &self.slots[i];
        let extra = peer_replica_config(
            &self.pg.dsn(),
            &slot.name,
            &self.pki,
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let gw = GatewayProcess::spawn_env_at(&self.pki, slot.tunnel, &extra, &env).await;
        let ch = gw.channel(&self.pki.client("api")).await;
        self.slots[i].gw = Some(gw);
        // Linked to every other replica running, both ways, before it takes calls.
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|j| self.slots[*j].gw.is_some())
            .collect();
        for &a in &running {
            for &b in &running {
                if a == b {
                    continue;
                }
                let (gw, peer) = (self.gw(a), self.slots[b].name.clone());
                wait_until(
                    &format!("{}'s peer link to {peer}", self.slots[a].name),
                    T,
                    || gw.peer_up(&peer),
                )
                .await;
            }
        }
        self.lb.set_up(self.slots[i].tunnel, true);
        self.routes.set(i, Some(ch));
    }

    /// Takes replica `i` out of the balancer and the routes, as a load balancer does with a
    /// replica that stopped being ready.
    fn out(&self, i: usize) {
        self.lb.set_up(self.slots[i].tunnel, false);
        self.routes.set(i, None);
    }

    fn gw(&self, i: usize) -> &GatewayProcess {
        self.slots[i].gw.as_ref().expect("replica running")
    }

    /// An agent `id` dialing the balancer only, with `connections` and the demo upstream.
    fn agent(&self, id: &str, connections: u32, upstream: &DemoUpstream) -> TestAgent {
        let mut cfg = agent_config(&self.pki.agent(id), self.lb.addr);
        cfg.transport.mode = TransportMode::Quic;
        cfg.connections = connections;
        with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
        TestAgent::start_with_handlers(&cfg, test_handlers())
    }
}

/// Waits until every agent holds `want` sessions on distinct replicas that are up; returns
/// how long that took.
async fn settled(fleet: &Fleet, agents: &[&TestAgent], want: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let up = fleet.routes.up();
        let ok = agents.iter().all(|a| {
            let h = held(&a.handle.status);
            h.len() == want && distinct(&h) && h.iter().all(|i| up.contains(i))
        });
        if ok {
            return started.elapsed();
        }
        let now: Vec<Vec<usize>> = agents.iter().map(|a| held(&a.handle.status)).collect();
        assert!(
            started.elapsed() < within,
            "agents did not settle on {want} distinct replicas that are up ({up:?}) within \
             {within:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Calls that failed, with why (and the replica they were sent to).
    failed: Mutex<Vec<(usize, String)>>,
    /// Moments no replica that is up held a session of the agent.
    unroutable: AtomicU64,
}

/// Which replicas a call may go to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// One that is up and holds a session of the agent it calls.
    Holders,
    /// Any that is up (forwarded when it holds no session of the agent).
    Every,
}

/// Unary calls in `loops` loops, each to a replica that is up (and, with `Routing::Holders`,
/// holds a session of the agent it calls), until `stop`.
fn unary_load(
    routes: &Routes,
    agents: &[(&str, Arc<AgentStatus>)],
    (loops, routing): (usize, Routing),
    stop: &Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for l in 0..loops {
        let (routes, tally, stop) = (routes.clone(), tally.clone(), stop.clone());
        let (id, status) = agents[l % agents.len()].clone();
        let id = id.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            let mut clients: HashMap<(usize, u64), EchoClient<Routed>> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let up = routes.up();
                let targets: Vec<usize> = match routing {
                    Routing::Holders => held(&status)
                        .into_iter()
                        .filter(|i| up.contains(i))
                        .collect(),
                    Routing::Every => up,
                };
                let Some(&i) = targets.get(n % targets.len().max(1)) else {
                    tally.unroutable.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let Some((ch, generation)) = routes.get_gen(i) else {
                    continue;
                };
                let client = clients.entry((i, generation)).or_insert_with(|| {
                    EchoClient::with_interceptor(ch, Route::new(Some(&id), None))
                });
                let mut req = tonic::Request::new(echo_req(&format!("{l}-{n}")));
                req.set_timeout(Duration::from_secs(10));
                match client.unary(req).await {
                    Ok(r) if r.get_ref().message == format!("{l}-{n}") => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => tally
                        .failed
                        .lock()
                        .unwrap()
                        .push((i, format!("wrong answer {:?}", r.get_ref().message))),
                    Err(s) => tally.failed.lock().unwrap().push((i, format!("{s:?}"))),
                }
            }
        }));
    }
    (tally, tasks)
}

/// Commands submitted to a replica that is up, one every `every`, until `stop`; returns the
/// ids.
fn command_load(
    routes: &Routes,
    agent: &str,
    every: Duration,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (routes, stop, agent) = (routes.clone(), stop.clone(), agent.to_owned());
    tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let up = routes.up();
            let Some(ch) = up.get(n % up.len().max(1)).and_then(|i| routes.get(*i)) else {
                tokio::time::sleep(every).await;
                continue;
            };
            let mut req = submit_req(&agent, "echo", format!("c{n}"));
            req.idempotency_key = format!("k{n}");
            // A Submit that failed (its replica went away mid-call) is submitted again with the
            // same key on the next replica, as a caller would: the key makes it one command.
            let mut ch = ch;
            for attempt in 1..=20 {
                match commands_client(ch.clone()).submit(req.clone()).await {
                    Ok(c) => {
                        ids.push(c.into_inner().id);
                        break;
                    }
                    Err(e) => {
                        assert!(attempt < 20, "submit kept failing: {e:?}");
                        tokio::time::sleep(every).await;
                        let up = routes.up();
                        if let Some(c) = up
                            .get(attempt % up.len().max(1))
                            .and_then(|i| routes.get(*i))
                        {
                            ch = c;
                        }
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
        ids
    })
}

/// Every command in `ids` ends SUCCEEDED (asked at a replica that is up).
async fn all_succeeded(fleet: &Fleet, ids: &[String]) {
    let i = fleet.routes.up()[0];
    let mut client = commands_client(fleet.routes.get(i).expect("a replica up"));
    let mut states: HashMap<String, usize> = HashMap::new();
    for id in ids {
        let c = wait_final(&mut client, id, T).await;
        *states.entry(format!("{:?}", c.state())).or_default() += 1;
        assert_eq!(
            c.state(),
            CommandState::Succeeded,
            "command {id} lost or failed: {c:?}"
        );
    }
    eprintln!(
        "commands: {} submitted, by final state {states:?}",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_gets_connections_sessions_on_distinct_replicas() {
    init();
    let fleet = Fleet::start(3, 3, &[]).await;
    let upstream = DemoUpstream::start().await;
    let two = fleet.agent("acme/two", 2, &upstream);
    let three = fleet.agent("acme/three", 3, &upstream);
    let one = fleet.agent("acme/one", 1, &upstream);
    settled(&fleet, &[&two], 2, T).await;
    settled(&fleet, &[&three], 3, T).await;
    settled(&fleet, &[&one], 1, T).await;
    // The fleet sees the same (once each replica's presence write has reached PostgreSQL):
    // each session named by its replica, none twice.
    let mut agents = tether_api::v1::agents_client::AgentsClient::new(fleet.routes.get(0).unwrap());
    let want = BTreeSet::from(["r1".to_owned(), "r2".to_owned(), "r3".to_owned()]);
    let deadline = std::time::Instant::now() + T;
    loop {
        let a = agents
            .get(tether_api::v1::GetAgentRequest {
                agent: "acme/three".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let replicas: Vec<String> = a.sessions.iter().map(|s| s.replica.clone()).collect();
        if replicas.iter().cloned().collect::<BTreeSet<_>>() == want && replicas.len() == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Agents/Get never showed acme/three on r1, r2 and r3 once each: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each replica holding a session relays to the agent.
    for i in held(&two.handle.status) {
        let mut echo = EchoClient::with_interceptor(
            fleet.routes.get(i).unwrap(),
            Route::new(Some("acme/two"), None),
        );
        call_every_shape(&mut echo).await;
    }
    // It stays so: no session churn once settled (each dial named the replicas held).
    let before: Vec<String> = two
        .handle
        .status
        .sessions()
        .iter()
        .map(|s| s.session_id.clone())
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<String> = two
        .handle
        .status
        .sessions()
        .iter()
        .map(|s| s.session_id.clone())
        .collect();
    assert_eq!(before, after);
    for a in [two, three, one] {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_fails_only_what_was_sent_to_it_and_agents_regain_their_count()
{
    init();
    let mut fleet = Fleet::start(3, 3, &[]).await;
    let upstream = DemoUpstream::start().await;
    let a1 = fleet.agent("acme/a1", 2, &upstream);
    let a2 = fleet.agent("acme/a2", 2, &upstream);
    settled(&fleet, &[&a1, &a2], 2, T).await;
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = [
        ("acme/a1", a1.handle.status.clone()),
        ("acme/a2", a2.handle.status.clone()),
    ];
    let (tally, loops) = unary_load(&fleet.routes, &statuses, (6, Routing::Holders), &stop);
    let commands = command_load(&fleet.routes, "acme/a1", Duration::from_millis(50), &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // kill -9 a replica holding a1's session; the balancer's health check takes it out.
    let victim = held(&a1.handle.status)[0];
    let before_kill = tally.ok.load(Ordering::Relaxed);
    let killed = Instant::now();
    fleet.out(victim);
    let mut gw = fleet.slots[victim].gw.take().unwrap();
    gw.child.start_kill().unwrap();
    let _ = gw.child.wait().await;
    // Calls to the replicas holding the agents' other sessions go on at once.
    wait_until("calls succeed after the kill", T, || {
        tally.ok.load(Ordering::Relaxed) > before_kill + 20
    })
    .await;
    let first_ok = killed.elapsed();
    settled(&fleet, &[&a1, &a2], 2, T).await;
    eprintln!(
        "kill -9 of {}: 20 calls succeeded within {first_ok:?}; agents back to two sessions on \
         distinct live replicas {:?} after the kill (heartbeat interval 500 ms: a dead session \
         is seen within 3 intervals, 1.5 s)",
        fleet.slots[victim].name,
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let ids = commands.await.unwrap();
    let failed = tally.failed.lock().unwrap().clone();
    eprintln!(
        "unary calls: {} ok, {} failed ({} to the killed replica), {} unroutable moments",
        tally.ok.load(Ordering::Relaxed),
        failed.len(),
        failed.iter().filter(|(i, _)| *i == victim).count(),
        tally.unroutable.load(Ordering::Relaxed)
    );
    // Only calls in flight on the killed replica failed.
    let elsewhere: Vec<_> = failed.iter().filter(|(i, _)| *i != victim).collect();
    assert!(
        elsewhere.is_empty(),
        "calls to live replicas failed: {elsewhere:?}"
    );
    assert_eq!(tally.unroutable.load(Ordering::Relaxed), 0);
    all_succeeded(&fleet, &ids).await;
    fleet.up(victim).await;
    a1.stop().await;
    a2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_steady_load_fails_no_unary_call_and_loses_no_command() {
    init();
    let drain = format!("{}s", DRAIN.as_secs());
    let mut fleet = Fleet::start(3, 3, &[("TETHER_TUNNEL_DRAIN_TIMEOUT", &drain)]).await;
    let upstream = DemoUpstream::start().await;
    let a1 = fleet.agent("acme/a1", 2, &upstream);
    let a2 = fleet.agent("globex/a2", 2, &upstream);
    settled(&fleet, &[&a1, &a2], 2, T).await;
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = [
        ("acme/a1", a1.handle.status.clone()),
        ("globex/a2", a2.handle.status.clone()),
    ];
    let (tally, loops) = unary_load(&fleet.routes, &statuses, (6, Routing::Every), &stop);
    let commands = command_load(&fleet.routes, "acme/a1", Duration::from_millis(50), &stop);
    let cut = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Why sessions ended, from the logs of the replicas as they stop: what a failed call's
    // message is read against.
    let mut session_ends = Vec::new();

    for i in 0..fleet.slots.len() {
        let name = fleet.slots[i].name.clone();
        // A long server stream through the replica about to go, when it holds a1's session:
        // counted when the restart cuts it.
        if held(&a1.handle.status).contains(&i) {
            let mut echo = EchoClient::with_interceptor(
                fleet.routes.get(i).unwrap(),
                Route::new(Some("acme/a1"), None),
            );
            let mut s = echo
                .server_stream(tether_api::demo::v1::EchoRequest {
                    message: "long".into(),
                    repeat: 100_000,
                    delay_ms: 10,
                    ..Default::default()
                })
                .await
                .expect("long stream opens")
                .into_inner();
            let cut = cut.clone();
            streams.push(tokio::spawn(async move {
                while let Some(m) = s.next().await {
                    if m.is_err() {
                        cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }));
        }
        let moved_before = held(&a1.handle.status).contains(&i) as usize
            + held(&a2.handle.status).contains(&i) as usize;
        // Not ready from here: the balancer and the callers stop choosing it.
        fleet.out(i);
        let started = Instant::now();
        let mut gw = fleet.slots[i].gw.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(gw.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = tokio::time::timeout(DRAIN + Duration::from_secs(10), gw.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within drain_timeout"))
            .unwrap();
        assert!(status.success(), "{name} exited with {status}");
        // Its last lines reach the pipe before it exits; the reader may lag a moment.
        wait_until("the leases released before exit, in its log", T, || {
            gw.logs().contains("released this replica's command leases")
        })
        .await;
        let exited = started.elapsed();
        session_ends.extend(ends_of_sessions(&name, &gw.logs()));
        fleet.up(i).await;
        let back = settled(&fleet, &[&a1, &a2], 2, T).await;
        eprintln!(
            "{name}: drained and exited in {exited:?} ({moved_before} agent sessions moved), \
             back and settled {back:?} later"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let ids = commands.await.unwrap();
    for s in streams {
        s.abort();
    }
    let failed = tally.failed.lock().unwrap().clone();
    // Since their last start: the replicas restarted last forwarded least.
    let forwarded: f64 = (0..fleet.slots.len())
        .map(|i| {
            fleet.gw(i).metric(
                "tether_gateway_peer_forwarded_streams_total",
                "direction=\"out\"",
            )
        })
        .sum();
    eprintln!(
        "rolling restart: {} unary calls ok (to every replica up; {forwarded} streams forwarded \
         since the last restarts), {} failed, {} unroutable moments; {} commands; {} long \
         streams cut",
        tally.ok.load(Ordering::Relaxed),
        failed.len(),
        tally.unroutable.load(Ordering::Relaxed),
        ids.len(),
        cut.load(Ordering::Relaxed)
    );
    if !failed.is_empty() {
        for i in 0..fleet.slots.len() {
            session_ends.extend(ends_of_sessions(&fleet.slots[i].name, &fleet.gw(i).logs()));
        }
        panic!(
            "unary calls failed: {failed:?}\nsessions ended, by replica:\n{}",
            session_ends.join("\n")
        );
    }
    assert_eq!(tally.unroutable.load(Ordering::Relaxed), 0);
    assert!(tally.ok.load(Ordering::Relaxed) > 100);
    all_succeeded(&fleet, &ids).await;
    a1.stop().await;
    a2.stop().await;
}

/// The lines of a replica's log that say why a session or a relayed call ended abnormally:
/// disconnects, failed probes, a drain that ran out of time, the replica losing its liveness,
/// peer links coming and going.
fn ends_of_sessions(replica: &str, logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| {
            [
                "agent disconnected",
                "probe failed",
                "drain timeout",
                "fenced",
                "liveness",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .map(|l| format!("{replica}: {l}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_after_the_others_gets_its_share() {
    init();
    let env = [
        ("TETHER_TUNNEL_REBALANCE_INTERVAL", "1s"),
        ("TETHER_TUNNEL_FAIR_SHARE_MARGIN", "0"),
    ];
    let mut fleet = Fleet::start(2, 1, &env).await;
    let upstream = DemoUpstream::start().await;
    let agents: Vec<TestAgent> = (0..8)
        .map(|n| fleet.agent(&format!("acme/s{n}"), 1, &upstream))
        .collect();
    let refs: Vec<&TestAgent> = agents.iter().collect();
    settled(&fleet, &refs, 1, T).await;
    fleet.up(1).await;
    // With 8 sessions on two replicas the share is 4 (+ 2 of slack): r1 asks agents to move
    // until it holds 6 at most, and they land on r2 (r1 is the replica to avoid).
    let started = Instant::now();
    loop {
        let on_r1 = refs
            .iter()
            .filter(|a| held(&a.handle.status) == [0])
            .count();
        let on_r2 = refs
            .iter()
            .filter(|a| held(&a.handle.status) == [1])
            .count();
        if on_r1 <= 6 && on_r1 + on_r2 == 8 {
            eprintln!(
                "rebalanced after {:?}: {on_r1} on r1, {on_r2} on r2",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < T,
            "not rebalanced: {on_r1} on r1, {on_r2} on r2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fleet
            .gw(0)
            .metric("tether_gateway_go_aways_total", "rebalance")
            >= 2.0
    );
    for a in agents {
        a.stop().await;
    }
}
