//! Gateway replicas on PostgreSQL, end to end: three real `tether-gateway` processes sharing
//! one throwaway PostgreSQL server (started by the test; Debian's `postgresql` must be
//! installed), real agents dialing all of them.
//!
//! - every replica lists every agent, each session naming the replica holding it, and forgets
//!   the sessions of a replica killed with SIGKILL once its liveness expires;
//! - an agent revoked at one replica loses its session at another within about a second, and a
//!   third refuses its certificate at the handshake; a caller revoked at one replica is refused
//!   at another;
//! - an enrollment token redeemed at one replica is refused at another, and one redeemed at two
//!   at once is issued once;
//! - PostgreSQL stopped: every replica says not ready with the reason while relaying through the
//!   sessions it holds goes on, and is ready again when PostgreSQL is back;
//! - bad store settings: a malformed DSN, a refused password, an unknown database exit 64
//!   naming `store.dsn`; an unreachable server is retried with a clear log line.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tether_agent::config::ServiceKind;
use tether_agent::enroll::{EnrollClient, EnrollError};
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::callers_client::CallersClient;
use tether_api::v1::enrollment_client::EnrollmentClient;
use tether_api::v1::{
    CreateTokenRequest, GetAgentRequest, ListAgentsRequest, RevokeAgentRequest, RevokeCallerRequest,
};
use tether_e2e::*;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};

const T: Duration = Duration::from_secs(30);

fn postgres() -> LocalPostgres {
    LocalPostgres::start(LocalPostgresOptions::default())
        .unwrap_or_else(|e| panic!("this test needs a local PostgreSQL: {e}"))
}

/// Replicas `r1`, `r2`, `r3`… on `pg`, each with `extra` config.
async fn replicas(pki: &Pki, pg: &LocalPostgres, n: usize, extra: &str) -> Vec<GatewayProcess> {
    let mut out = Vec::new();
    for i in 1..=n {
        let cfg = replica_config(&pg.dsn(), &format!("r{i}")) + extra;
        out.push(GatewayProcess::spawn_configured(pki, &cfg).await);
    }
    out
}

/// An agent config dialing every one of `gws` (one session to each).
fn agent_on(pki: &Pki, id: &str, gws: &[&GatewayProcess]) -> tether_agent::AgentConfig {
    let mut cfg = agent_config(&pki.agent(id), gws[0].tunnel);
    cfg.gateways = gws.iter().map(|g| g.tunnel.to_string()).collect();
    cfg
}

async fn agents_client(gw: &GatewayProcess, pki: &Pki) -> AgentsClient<tonic::transport::Channel> {
    AgentsClient::new(gw.channel(&pki.client("ops")).await)
}

/// The replicas holding `agent`'s sessions, as `gw` answers `Agents/Get` (empty if unknown).
async fn replicas_of(gw: &GatewayProcess, pki: &Pki, agent: &str) -> Vec<String> {
    let Ok(a) = agents_client(gw, pki)
        .await
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

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_lists_every_agent_with_its_replica_and_forgets_a_killed_one() {
    init();
    let pki = Pki::new();
    let pg = postgres();
    let mut gws = replicas(&pki, &pg, 3, "").await;
    let all: Vec<&GatewayProcess> = gws.iter().collect();
    // A watch at r3 sees the sessions registered at every replica.
    let mut watch = agents_client(&gws[2], &pki)
        .await
        .watch(tether_api::v1::WatchAgentsRequest::default())
        .await
        .expect("watch at r3")
        .into_inner();
    let a = TestAgent::start(&agent_on(&pki, "acme/a", &all));
    let b = TestAgent::start(&agent_on(&pki, "globex/b", &all));
    let mut watched = BTreeSet::new();
    while watched.len() < 6 {
        let ev = tokio::time::timeout(T, watch.message())
            .await
            .expect("six connects watched at r3 in time")
            .expect("watch stream")
            .expect("watch open");
        let s = ev.session.expect("a session");
        watched.insert((ev.agent, s.replica));
    }
    let replicas_watched: BTreeSet<&str> = watched.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        replicas_watched,
        BTreeSet::from(["r1", "r2", "r3"]),
        "{watched:?}"
    );
    let three = strings(&["r1", "r2", "r3"]);
    for gw in &gws {
        for agent in ["acme/a", "globex/b"] {
            eventually(
                &format!("{agent} on r1, r2, r3 as {}", gw.northbound),
                T,
                || async { replicas_of(gw, &pki, agent).await == three },
            )
            .await;
        }
    }
    // List through each replica: both agents, each with a session on every replica.
    for gw in &gws {
        let list = agents_client(gw, &pki)
            .await
            .list(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = list.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["acme/a", "globex/b"], "{list:?}");
        for agent in &list.agents {
            assert!(agent.connected);
            let held: BTreeSet<&str> = agent.sessions.iter().map(|s| s.replica.as_str()).collect();
            assert_eq!(held, BTreeSet::from(["r1", "r2", "r3"]), "{agent:?}");
        }
    }
    // A tenant filter through a replica that holds none of it locally is no different.
    let acme = agents_client(&gws[2], &pki)
        .await
        .list(ListAgentsRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.agents.len(), 1);

    // kill -9 r1: no goodbye, its rows stay behind; the others stop counting them once its
    // liveness (1.5 s) has expired.
    let killed = Instant::now();
    gws[0].child.start_kill().unwrap();
    let _ = gws[0].child.wait().await;
    let two = strings(&["r2", "r3"]);
    for gw in &gws[1..] {
        for agent in ["acme/a", "globex/b"] {
            eventually(&format!("{agent} only on r2, r3"), T, || async {
                replicas_of(gw, &pki, agent).await == two
            })
            .await;
        }
    }
    eprintln!(
        "sessions of the killed replica gone from the answers {:?} after the kill",
        killed.elapsed()
    );
    // Its agents still reach the fleet through the others.
    assert!(a.handle.status.connected() && b.handle.status.connected());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_at_one_replica_closes_the_session_at_another_and_a_third_refuses_the_certificate()
 {
    init();
    let pki = Pki::new();
    let pg = postgres();
    let gws = replicas(&pki, &pg, 3, "").await;
    let (r1, r2, r3) = (&gws[0], &gws[1], &gws[2]);
    let mut victim_cfg = agent_on(&pki, "acme/victim", &[r2]);
    victim_cfg.reconnect.max_backoff = Duration::from_secs(2);
    let victim = TestAgent::start(&victim_cfg);
    let bystander = TestAgent::start(&agent_on(&pki, "acme/bystander", &[r2]));
    for agent in ["acme/victim", "acme/bystander"] {
        eventually(&format!("{agent} on r2, seen from r1"), T, || async {
            replicas_of(r1, &pki, agent).await == ["r2"]
        })
        .await;
    }

    let started = Instant::now();
    let r = agents_client(r1, &pki)
        .await
        .revoke(RevokeAgentRequest {
            agent: "acme/victim".into(),
            reason: "key leaked".into(),
        })
        .await
        .expect("revoke at r1, the session being at r2")
        .into_inner();
    assert_eq!(r.agent, "acme/victim");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !victim.disconnected_because("revoked") {
        assert!(
            Instant::now() < deadline,
            "the victim's session at r2 was not closed as revoked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "revoked at r1: session at r2 closed {:?} after the call",
        started.elapsed()
    );
    assert!(bystander.handle.status.connected(), "bystander cut off");
    eventually("the victim gone from r3's answers", T, || async {
        replicas_of(r3, &pki, "acme/victim").await.is_empty()
    })
    .await;

    // The same certificate at r3, which never held the agent: refused at the handshake. (A
    // certificate issued after the revocation would be accepted: `pki::issue_stamp`.)
    let mut same = victim_cfg.clone();
    same.gateways = vec![r3.tunnel.to_string()];
    let again = TestAgent::start(&same);
    eventually("r3 refusing the revoked certificate", T, || async {
        r3.metric(
            "tether_gateway_handshake_failures_total",
            "reason=\"revoked\"",
        ) >= 1.0
    })
    .await;
    assert!(!again.handle.status.connected());
    again.stop().await;

    // A caller revoked at r1 is refused at r2, its open connection there closed.
    let billing = pki.client("billing");
    let mut at_r2 = AgentsClient::new(r2.channel(&billing).await);
    at_r2
        .list(ListAgentsRequest::default())
        .await
        .expect("billing before");
    CallersClient::new(r1.channel(&pki.client("ops")).await)
        .revoke(RevokeCallerRequest {
            name: "billing".into(),
            reason: "left".into(),
            ..Default::default()
        })
        .await
        .expect("revoke caller at r1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match at_r2.list(ListAgentsRequest::default()).await {
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                assert!(s.message().contains("revoked"), "{s:?}");
                break;
            }
            // The closed connection's call fails before a new one is refused.
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("billing still served at r2: {other:?}"),
        }
    }
    victim.stop().await;
    bystander.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_redeemed_at_one_replica_is_refused_at_another_and_a_race_issues_once() {
    init();
    let pki = Pki::new();
    let pg = postgres();
    let enrolling = format!(
        "[enrollment]\nca_key = \"{}\"\n",
        pki.dir.path().join("ca-key.pem").display()
    );
    let gws = replicas(&pki, &pg, 2, &enrolling).await;
    let ops = pki.client("ops");
    async fn create(gw: &GatewayProcess, ops: &CertFiles, agent: &str) -> String {
        EnrollmentClient::new(gw.channel(ops).await)
            .create_token(CreateTokenRequest {
                tenant: "acme".into(),
                agent: agent.into(),
                ttl: None,
            })
            .await
            .expect("create token")
            .into_inner()
            .token
    }
    let state = tempfile::tempdir().unwrap();
    let client_cfg: tether_agent::AgentConfig = toml::from_str(&format!(
        "gateways = [\"{}\"]\nserver_name = \"localhost\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\n",
        gws[0].tunnel,
        state.path().display(),
        pki.dir.path().join("ca.pem").display()
    ))
    .unwrap();
    let client = EnrollClient::new(&client_cfg).unwrap();
    let csr = || {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };

    // Created at r2, redeemed at r1, refused at r2.
    let token = create(&gws[1], &ops, "edge-1").await;
    let issued = client
        .enroll(&gws[0].tunnel.to_string(), &token, &csr())
        .await
        .expect("redeemed at r1");
    assert_eq!(issued.agent, "acme/edge-1");
    match client
        .enroll(&gws[1].tunnel.to_string(), &token, &csr())
        .await
    {
        Err(EnrollError::Refused { message, .. }) => {
            assert!(message.contains("already used"), "{message}")
        }
        other => panic!("a used token was not refused at r2: {other:?}"),
    }

    // One token at both replicas at once: one certificate.
    let token = create(&gws[0], &ops, "edge-2").await;
    let (at1, at2, csr1, csr2) = (
        gws[0].tunnel.to_string(),
        gws[1].tunnel.to_string(),
        csr(),
        csr(),
    );
    let (x, y) = tokio::join!(
        client.enroll(&at1, &token, &csr1),
        client.enroll(&at2, &token, &csr2),
    );
    let ok = [&x, &y].iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{x:?} / {y:?}");
    let refused = if x.is_ok() { y } else { x };
    assert!(
        matches!(&refused, Err(EnrollError::Refused { message, .. }) if message.contains("already used")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_every_replica_is_not_ready_with_the_reason_relays_on_and_recovers() {
    init();
    let pki = Pki::new();
    let mut pg = postgres();
    let gws = replicas(&pki, &pg, 3, "").await;
    let upstream = DemoUpstream::start().await;
    let all: Vec<&GatewayProcess> = gws.iter().collect();
    let mut cfg = agent_on(&pki, "acme/eu-1", &all);
    with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
    let agent = TestAgent::start(&cfg);
    for gw in &gws {
        eventually("the agent on every replica", T, || async {
            replicas_of(gw, &pki, "acme/eu-1").await.len() == 3
        })
        .await;
    }
    let ready = |gw: &GatewayProcess| {
        let (status, body) =
            tether_runtime::ops::probe(gw.ops, "/readyz", Duration::from_secs(5)).expect("readyz");
        (status, body)
    };
    for gw in &gws {
        assert_eq!(ready(gw).0, 200, "{}", ready(gw).1);
    }

    pg.stop(false);
    for gw in &gws {
        eventually("readyz 503 naming PostgreSQL", T, || async {
            let (status, body) = ready(gw);
            status == 503 && body.contains("\"reason\"") && body.contains("PostgreSQL")
        })
        .await;
    }
    // Fenced for good measure (liveness 1.5 s): the reason says so.
    eventually("fenced", T, || async {
        ready(&gws[0]).1.contains("fenced")
    })
    .await;
    let (_, body) = ready(&gws[0]);
    eprintln!("r1 while PostgreSQL is down: {body}");
    // Sync relaying through the sessions each replica holds goes on.
    for gw in &gws {
        let ch = gw.channel(&pki.client("api")).await;
        let mut echo = tether_api::demo::v1::echo_client::EchoClient::with_interceptor(
            ch,
            Route::new(Some("acme/eu-1"), None),
        );
        let r = echo
            .unary(echo_req("while postgres is down"))
            .await
            .expect("relayed while PostgreSQL is down");
        assert_eq!(r.into_inner().message, "while postgres is down");
    }
    // Asking for the fleet cannot be answered, and says why.
    let e = agents_client(&gws[1], &pki)
        .await
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("PostgreSQL"), "{e:?}");

    pg.start_again().expect("PostgreSQL back");
    for gw in &gws {
        eventually("ready again", T, || async { ready(gw).0 == 200 }).await;
        eventually("the agent listed again on every replica", T, || async {
            replicas_of(gw, &pki, "acme/eu-1").await.len() == 3
        })
        .await;
    }
    assert!(agent.handle.status.connected());
    agent.stop().await;
}

/// Runs `tether-gateway serve` with `pki`'s TLS and `extra` config; returns its exit status
/// (None: still running when `until` appeared in its log or `within` passed) and its log.
async fn serve(
    pki: &Pki,
    extra: &str,
    until: Option<&str>,
    within: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = pki.gateway_tls();
    let cfg = format!(
        "trust_domain = \"{}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n[northbound]\nlisten = \"127.0.0.1:0\"\n[ops]\nlisten = \"127.0.0.1:0\"\n{extra}",
        pki.ca.trust_domain,
        dir.path().join("data").display(),
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = tokio::process::Command::new(binary("tether-gateway"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    log.push_str(&l);
                    log.push('\n');
                    if until.is_some_and(|u| l.contains(u)) {
                        break;
                    }
                }
                _ => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let status = match until {
        Some(_) => child.try_wait().unwrap(),
        None => Some(
            tokio::time::timeout(within, child.wait())
                .await
                .expect("exited")
                .unwrap(),
        ),
    };
    let _ = child.kill().await;
    (status, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_settings_exit_64_naming_the_key_and_an_unreachable_server_is_retried() {
    init();
    let pki = Pki::new();
    let pg = postgres();
    let exits_64 = |(status, log): (Option<std::process::ExitStatus>, String), words: &str| {
        assert_eq!(status.and_then(|s| s.code()), Some(64), "{log}");
        assert!(
            log.contains("store.dsn") && log.contains(words),
            "{words:?} not in: {log}"
        );
        assert!(!log.contains(pg.password()), "the password leaked: {log}");
    };
    let t = Duration::from_secs(30);
    exits_64(
        serve(&pki, "[store]\ndsn = \"mysql://x@y/z\"\n", None, t).await,
        "not a PostgreSQL URL",
    );
    let wrong = pg.dsn().replace(pg.password(), "wrong-password");
    exits_64(
        serve(&pki, &format!("[store]\ndsn = \"{wrong}\"\n"), None, t).await,
        "refused user",
    );
    let no_db = pg.dsn().replace("/tether", "/no_such_db");
    exits_64(
        serve(&pki, &format!("[store]\ndsn = \"{no_db}\"\n"), None, t).await,
        "no_such_db",
    );

    // Nothing listens there: the gateway keeps trying (store.connect_timeout), saying so.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let (status, log) = serve(
        &pki,
        &format!("[store]\ndsn = \"postgres://tether:x@127.0.0.1:{port}/tether\"\nconnect_timeout = \"60s\"\n"),
        Some("PostgreSQL not reachable yet"),
        t,
    )
    .await;
    assert!(status.is_none(), "gave up at once: {status:?}\n{log}");
    assert!(
        log.contains("PostgreSQL not reachable yet") && log.contains(&format!("127.0.0.1:{port}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_an_allow_list_the_agents_owner_changes_are_shown_by_every_replica() {
    init();
    let pki = Pki::new();
    let pg = postgres();
    let gws = replicas(&pki, &pg, 2, "").await;
    // One session, at r1: r2 knows of it only through PostgreSQL.
    let mut cfg = agent_on(&pki, "acme/p", &[&gws[0]]);
    let agent = TestAgent::start(&cfg);
    eventually("r2 lists the session at r1", T, || async {
        replicas_of(&gws[1], &pki, "acme/p").await == strings(&["r1"])
    })
    .await;
    let get = |i: usize| {
        let (gw, pki) = (&gws[i], &pki);
        async move {
            agents_client(gw, pki)
                .await
                .get(GetAgentRequest {
                    agent: "acme/p".into(),
                })
                .await
                .expect("get")
                .into_inner()
        }
    };
    let paused_at = |i: usize| {
        let get = &get;
        async move {
            let a = get(i).await;
            let reasons: Vec<String> = a.sessions.iter().map(|s| s.pause_reason.clone()).collect();
            (a.paused, reasons)
        }
    };
    assert_eq!(paused_at(1).await, (false, vec![String::new()]));
    agent
        .handle
        .control
        .pause()
        .set(tether_agent::pause::Source::Ops, Some("incident 9".into()))
        .unwrap();
    for i in 0..2 {
        eventually("the pause is shown", T, || async {
            paused_at(i).await == (true, vec!["incident 9".to_owned()])
        })
        .await;
    }
    agent
        .handle
        .control
        .pause()
        .set(tether_agent::pause::Source::Ops, None)
        .unwrap();
    eventually("the resume is shown at r2", T, || async {
        paused_at(1).await == (false, vec![String::new()])
    })
    .await;
    // A live reload adds a service: r2 lists it too.
    with_service(
        &mut cfg,
        "added",
        "127.0.0.1:9",
        tether_agent::config::ServiceKind::Tcp,
    );
    agent.handle.control.apply(cfg).expect("reload");
    eventually("r2 lists the added service", T, || async {
        get(1).await.sessions.iter().any(|s| {
            s.services
                .iter()
                .any(|v| v.name == "added" && v.kind == "tcp")
        })
    })
    .await;
    agent.stop().await;
}
