//! `tether-gateway dev`: a complete local setup on embedded defaults.
//!
//! Creates dev PKI under `./.tether/` (once), starts the gateway on loopback, starts a real
//! `tether-agent` process (agent id `dev/local`) beside it, writes `./.tether/dev.json` for
//! clients, and waits for the agent to connect. With `--check` it then verifies the agent through
//! the northbound API and exits 0; without, it keeps running until Ctrl-C.
//!
//! `--replicas N` (N > 1) runs N gateway replicas in this process instead, sharing a throwaway
//! PostgreSQL started for the run (`tools::local_postgres`: Debian's `postgresql` must be
//! installed; it is removed at exit). The agent dials every replica (one session each), and
//! each replica answers for the whole fleet; `dev.json` points at the first, `dev-<i>.json`
//! at replica i. Each replica gets a peer certificate (`peer-<i>/`) and links to the others,
//! so a call reaching a replica without the agent's session is forwarded. `--check` waits for
//! every peer link and makes a call through each replica.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_api::v1::GetAgentRequest;
use tether_api::v1::agents_client::AgentsClient;
use tether_runtime::CancellationToken;
use tunnel_proto::AgentId;

use crate::config::{
    GatewayConfig, LogConfig, NorthboundConfig, OpsConfig, TlsConfig, TunnelConfig,
};
use crate::identity::pki::{self, Ca};
use crate::server::{self, Sockets};
use crate::tools::ctl::{self, DevJson};
use crate::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};

/// Options of the `dev` command.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State directory (`./.tether`).
    pub dir: PathBuf,
    /// Verify and exit instead of running.
    pub check: bool,
    /// The `tether-agent` binary; default: next to this executable.
    pub agent_bin: Option<PathBuf>,
    /// Bind free ports instead of the defaults (7443, 7444, 9090, 9091; replica i > 1 tries
    /// those plus 10·(i−1)).
    pub any_port: bool,
    /// Gateway replicas: 1 on the embedded store, more on a local PostgreSQL.
    pub replicas: usize,
}

/// The dev trust domain.
pub const TRUST_DOMAIN: &str = "tether.local";
/// The dev agent.
pub const AGENT: &str = "dev/local";

/// Binds `preferred`, or a free port on the same host when it is taken.
fn udp_or_any(preferred: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(preferred).or_else(|_| std::net::UdpSocket::bind((preferred.ip(), 0)))
}

fn tcp_or_any(preferred: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(preferred)
        .or_else(|_| std::net::TcpListener::bind((preferred.ip(), 0)))
}

fn agent_binary(opts: &DevOptions) -> Result<PathBuf, String> {
    if let Some(p) = &opts.agent_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let beside = me.with_file_name("tether-agent");
    if beside.exists() {
        Ok(beside)
    } else {
        Err(format!(
            "tether-agent not found at {} — build both binaries with `cargo build --workspace --bins`",
            beside.display()
        ))
    }
}

/// Runs `dev`; returns when done (check mode) or on `shutdown`.
pub async fn run(opts: DevOptions, shutdown: CancellationToken) -> Result<(), String> {
    let dir = std::path::absolute(&opts.dir).map_err(|e| format!("{}: {e}", opts.dir.display()))?;
    let pki_dir = dir.join("pki");
    if !pki_dir.join("ca-key.pem").exists() {
        pki::init(
            &pki_dir,
            TRUST_DOMAIN,
            &["localhost".into(), "127.0.0.1".into()],
            false,
        )
        .map_err(|e| format!("creating dev PKI: {e}"))?;
        println!("created dev PKI in {}", pki_dir.display());
    }
    let ca = Ca::load(&pki_dir).map_err(|e| format!("loading dev PKI: {e}"))?;
    let agent_id: AgentId = AGENT.parse().expect("static agent id is valid");
    let issue = |stem: &str, issued: pki::Issued| {
        pki::write_issued(&dir.join(stem), stem, &issued, &ca).map_err(|e| e.to_string())
    };
    issue(
        "client",
        ca.issue_client("dev", pki::CLIENT_TTL)
            .map_err(|e| e.to_string())?,
    )?;
    issue(
        "agent",
        ca.issue_agent(&agent_id, pki::AGENT_TTL)
            .map_err(|e| e.to_string())?,
    )?;

    if opts.replicas > 1 {
        return run_replicas(&opts, &dir, &ca, shutdown).await;
    }
    let lo = |port| SocketAddr::from(([127, 0, 0, 1], if opts.any_port { 0 } else { port }));
    let (sockets, [tunnel, northbound, ops]) = bind(lo(7443), lo(7444), lo(9090))?;
    let agent_ops = tcp_or_any(lo(9091))
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let cfg = gateway_config(&dir, tunnel, northbound, ops, dir.join("data"));
    write(&dir.join("gateway.toml"), &toml_of(&cfg)?)?;
    let (demo_addr, demo_stop) = start_demo(lo(50051)).await?;
    write(
        &dir.join("agent.toml"),
        &agent_toml(&[tunnel], demo_addr, agent_ops),
    )?;
    let dev_json = dev_json(&dir, northbound, ops);
    write(
        &dir.join("dev.json"),
        &serde_json::to_string_pretty(&dev_json).map_err(|e| e.to_string())?,
    )?;

    let gw_stop = CancellationToken::new();
    let gw = server::start(cfg, sockets, gw_stop.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut child = start_agent(&opts, &dir)?;
    wait_for_session(&gw, &mut child, &shutdown).await?;
    let agent = check_through(&dev_json).await?;
    let rel = rel_path;
    println!();
    println!(
        "tether dev is up: agent {AGENT} is connected ({} session); a call relayed to it answered.",
        agent.sessions.len()
    );
    println!("  tunnel      {tunnel}/udp (QUIC, mutual TLS)");
    println!(
        "  northbound  {northbound} (gRPC over TLS, client cert {})",
        rel(&dev_json.client_cert)
    );
    println!(
        "  ops         http://{ops}/metrics  /healthz  /readyz   (agent: http://{agent_ops}/readyz)"
    );
    println!("  client info {}", rel(&dir.join("dev.json")));
    println!();
    print_agent(&agent);
    println!();
    println!(
        "  demo        the agent's default service `demo` ({demo_addr}): Echo, health, reflection"
    );
    println!();
    println!("Try:  ./target/debug/tetherctl agents list");
    println!("      ./target/debug/tetherctl agents watch");
    print_grpcurl(&dev_json, northbound);
    print_console_link(&dev_json, northbound).await;

    if !opts.check {
        println!("\nPress Ctrl-C to stop.");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            status = child.wait() => println!("the dev agent exited: {status:?}"),
        }
    }
    stop_child(&mut child).await;
    demo_stop.cancel();
    gw_stop.cancel();
    gw.wait().await;
    if opts.check {
        println!("dev check passed");
    }
    Ok(())
}

/// `dev --replicas N`: a local PostgreSQL, N replicas on it, the agent dialing all of them.
async fn run_replicas(
    opts: &DevOptions,
    dir: &Path,
    ca: &Ca,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let n = opts.replicas;
    println!("starting a local PostgreSQL for {n} replicas...");
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(LocalPostgresOptions::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("dev --replicas {n} needs a local PostgreSQL: {e}"))?;
    let lo = |port: u16, i: usize| {
        let port = if opts.any_port {
            0
        } else {
            port + 10 * (i as u16)
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    let mut replicas: Vec<Replica> = Vec::new();
    for i in 0..n {
        let (mut sockets, [tunnel, northbound, ops]) = bind(lo(7443, i), lo(7444, i), lo(9090, i))?;
        let replica = format!("dev-{}", i + 1);
        let peer_socket = udp_or_any(lo(7445, i)).map_err(|e| format!("binding peer: {e}"))?;
        let peer_listen = peer_socket.local_addr().map_err(|e| e.to_string())?;
        sockets.peer = Some(peer_socket);
        let peer_dir = dir.join(format!("peer-{}", i + 1));
        let issued = ca
            .issue_gateway(&replica, pki::PEER_TTL)
            .map_err(|e| e.to_string())?;
        pki::write_issued(&peer_dir, "peer", &issued, ca).map_err(|e| e.to_string())?;
        let mut cfg = gateway_config(
            dir,
            tunnel,
            northbound,
            ops,
            dir.join(format!("data-{}", i + 1)),
        );
        cfg.store.dsn = Some(pg.dsn());
        cfg.cluster.replica_id = Some(replica.clone());
        // Peers dial it at the bound address (cluster.advertise unset).
        cfg.cluster.peer_listen = peer_listen;
        cfg.cluster.peer_cert = Some(peer_dir.join("peer.pem"));
        cfg.cluster.peer_key = Some(peer_dir.join("peer-key.pem"));
        let mut shown = cfg.clone();
        shown.store.dsn = Some(pg.dsn_without_password());
        write(
            &dir.join(format!("gateway-{}.toml", i + 1)),
            &toml_of(&shown)?,
        )?;
        let stop = CancellationToken::new();
        let gw = server::start(cfg, sockets, stop.clone())
            .await
            .map_err(|e| format!("replica {replica}: {e}"))?;
        let json = dev_json(dir, northbound, ops);
        let name = if i == 0 {
            "dev.json".to_owned()
        } else {
            format!("dev-{}.json", i + 1)
        };
        write(
            &dir.join(&name),
            &serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
        )?;
        replicas.push((gw, stop, json, name, [tunnel, northbound, ops]));
    }
    let agent_ops = tcp_or_any(lo(9091, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let (demo_addr, demo_stop) = start_demo(lo(50051, 0)).await?;
    let tunnels: Vec<SocketAddr> = replicas.iter().map(|r| r.4[0]).collect();
    write(
        &dir.join("agent.toml"),
        &agent_toml(&tunnels, demo_addr, agent_ops),
    )?;
    let mut child = start_agent(opts, dir)?;
    let up = check_replicas(&replicas, &mut child, &shutdown).await;
    let agent = match up {
        Ok(a) => a,
        Err(e) => {
            // Stopped before the server they use goes.
            stop_child(&mut child).await;
            for (gw, stop, ..) in replicas {
                stop.cancel();
                gw.wait().await;
            }
            return Err(e);
        }
    };
    println!();
    println!(
        "tether dev is up: {n} gateway replicas on PostgreSQL {}, linked to each other; agent {AGENT} holds a session on each, and a call relayed through each answered.",
        pg.dsn_without_password()
    );
    for (i, (_, _, _, name, [tunnel, northbound, ops])) in replicas.iter().enumerate() {
        println!(
            "  replica dev-{}  tunnel {tunnel}/udp  northbound {northbound}  ops http://{ops}/readyz  client info {}",
            i + 1,
            rel_path(&dir.join(name))
        );
    }
    println!();
    print_agent(&agent);
    println!();
    println!(
        "Try:  ./target/debug/tetherctl agents get {AGENT}          # every session says its replica"
    );
    println!(
        "      ./target/debug/tetherctl --dev-json {} agents watch   # at replica dev-2, while the agent moves",
        rel_path(&dir.join("dev-2.json"))
    );
    println!(
        "      ./target/debug/tetherctl --dev-json {} commands watch --agent {AGENT}   # at replica dev-2",
        rel_path(&dir.join("dev-2.json"))
    );
    println!(
        "      ./target/debug/tetherctl commands submit {AGENT} sleep 2000 --watch   # at replica dev-1; one replica delivers it"
    );
    println!(
        "      curl -s http://{}/readyz                  # replica dev-1: live, PostgreSQL reachable",
        replicas[0].4[2]
    );
    print_grpcurl(&replicas[0].2, replicas[0].4[1]);
    print_console_link(&replicas[0].2, replicas[0].4[1]).await;

    if !opts.check {
        println!("\nPress Ctrl-C to stop.");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            status = child.wait() => println!("the dev agent exited: {status:?}"),
        }
    }
    stop_child(&mut child).await;
    demo_stop.cancel();
    for (gw, stop, ..) in replicas {
        stop.cancel();
        gw.wait().await;
    }
    drop(pg);
    if opts.check {
        println!("dev check passed");
    }
    Ok(())
}

/// What `run_replicas` runs: a gateway replica, its stop, its client info (and file name), and
/// its tunnel, northbound and ops addresses.
type Replica = (
    server::GatewayHandle,
    CancellationToken,
    DevJson,
    String,
    [SocketAddr; 3],
);

/// Waits for the agent's session on every replica, then proves every replica answers for the
/// whole fleet (the agent's sessions on all of them, through `Agents/Get`) and relays a call.
async fn check_replicas(
    replicas: &[Replica],
    child: &mut tokio::process::Child,
    shutdown: &CancellationToken,
) -> Result<tether_api::v1::Agent, String> {
    let n = replicas.len();
    for (gw, ..) in replicas {
        wait_for_session(gw, child, shutdown).await?;
    }
    for (gw, _, _, name, _) in replicas {
        wait_for_peer_links(gw, n - 1, name).await?;
    }
    let mut agent = None;
    for (_, _, json, name, _) in replicas {
        // Presence is written in batches, a moment after the session registered.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = match check_through(json).await {
                Ok(a) if a.sessions.len() >= n => {
                    agent = Some(a);
                    break;
                }
                Ok(a) => format!(
                    "Agents/Get shows {} sessions of {AGENT}, not {n}",
                    a.sessions.len()
                ),
                Err(e) => e,
            };
            if tokio::time::Instant::now() > deadline {
                return Err(format!("through {name}, after 30s: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    agent.ok_or_else(|| "no replica answered".to_owned())
}

/// Waits until `gw` has a link up to each of its `want` peers.
async fn wait_for_peer_links(
    gw: &server::GatewayHandle,
    want: usize,
    name: &str,
) -> Result<(), String> {
    let Some(peers) = &gw.peers else {
        return Err(format!("{name}: the peer links did not start"));
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = peers.status().iter().filter(|p| p.up).count();
        if up >= want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{name}: {up} of {want} peer links up after 30s: {:?}",
                peers.status()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Binds the gateway's sockets at the preferred addresses, or free ports on loopback.
fn bind(
    tunnel: SocketAddr,
    northbound: SocketAddr,
    ops: SocketAddr,
) -> Result<(Sockets, [SocketAddr; 3]), String> {
    let udp = udp_or_any(tunnel).map_err(|e| format!("binding tunnel: {e}"))?;
    // The TCP fallback on the same port when it is free (dev agents use QUIC either way).
    let tunnel_tcp = udp
        .local_addr()
        .ok()
        .and_then(|a| std::net::TcpListener::bind(a).ok());
    let sockets = Sockets {
        tunnel: udp,
        tunnel_tcp,
        northbound: tcp_or_any(northbound).map_err(|e| format!("binding northbound: {e}"))?,
        ops: tcp_or_any(ops).map_err(|e| format!("binding ops: {e}"))?,
        peer: None,
    };
    let addrs = [
        sockets.tunnel.local_addr().map_err(|e| e.to_string())?,
        sockets.northbound.local_addr().map_err(|e| e.to_string())?,
        sockets.ops.local_addr().map_err(|e| e.to_string())?,
    ];
    Ok((sockets, addrs))
}

fn gateway_config(
    dir: &Path,
    tunnel: SocketAddr,
    northbound: SocketAddr,
    ops: SocketAddr,
    data_dir: PathBuf,
) -> GatewayConfig {
    let pki_dir = dir.join("pki");
    GatewayConfig {
        trust_domain: TRUST_DOMAIN.into(),
        tls: TlsConfig {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join("gateway.pem"),
            key: pki_dir.join("gateway-key.pem"),
        },
        tunnel: TunnelConfig {
            listen: tunnel,
            heartbeat_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        northbound: NorthboundConfig {
            listen: northbound,
            ..NorthboundConfig::default()
        },
        ops: OpsConfig { listen: ops },
        log: LogConfig::default(),
        data_dir: Some(data_dir),
        commands: Default::default(),
        limits: Default::default(),
        enrollment: crate::config::EnrollmentConfig {
            ca_key: Some(pki_dir.join("ca-key.pem")),
            ..Default::default()
        },
        auth: None,
        store: Default::default(),
        cluster: Default::default(),
        agents: Default::default(),
        telemetry: Default::default(),
    }
}

/// The demo upstream the dev agent allow-lists as `demo`, its default service.
async fn start_demo(preferred: SocketAddr) -> Result<(SocketAddr, CancellationToken), String> {
    let demo_listener = tokio::net::TcpListener::bind(preferred)
        .await
        .or(tokio::net::TcpListener::bind((preferred.ip(), 0)).await)
        .map_err(|e| format!("binding the demo upstream: {e}"))?;
    let demo_addr = demo_listener.local_addr().map_err(|e| e.to_string())?;
    let demo_stop = CancellationToken::new();
    tokio::spawn(crate::tools::demo::serve(
        demo_listener,
        crate::tools::demo::EchoService::default(),
        demo_stop.clone(),
    ));
    Ok((demo_addr, demo_stop))
}

/// The dev agent's config: one session to each of `gateways`.
fn agent_toml(gateways: &[SocketAddr], demo_addr: SocketAddr, agent_ops: SocketAddr) -> String {
    let gateways = gateways
        .iter()
        .map(|g| format!("\"{g}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Written by `tether-gateway dev`.\ngateways = [{gateways}]\nserver_name = \"localhost\"\ninstance_id = \"dev\"\ndefault_service = \"demo\"\nstate_dir = \"agent-state\"\n\n[services.demo]\naddress = \"http://{demo_addr}\"\n\n[labels]\nenv = \"dev\"\n\n[tls]\nca = \"agent/ca.pem\"\ncert = \"agent/agent.pem\"\nkey = \"agent/agent-key.pem\"\n\n[reconnect]\ninitial_backoff = \"200ms\"\nmax_backoff = \"5s\"\n\n[ops]\nlisten = \"{agent_ops}\"\n"
    )
}

fn dev_json(dir: &Path, northbound: SocketAddr, ops: SocketAddr) -> DevJson {
    DevJson {
        northbound: northbound.to_string(),
        ops: ops.to_string(),
        ca: dir.join("pki/ca.pem"),
        client_cert: dir.join("client/client.pem"),
        client_key: dir.join("client/client-key.pem"),
        agent: AGENT.into(),
    }
}

fn start_agent(opts: &DevOptions, dir: &Path) -> Result<tokio::process::Child, String> {
    let bin = agent_binary(opts)?;
    tokio::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))
}

/// Waits for the agent's session on `gw`.
async fn wait_for_session(
    gw: &server::GatewayHandle,
    child: &mut tokio::process::Child,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let agent_id: AgentId = AGENT.parse().expect("static agent id is valid");
    let (_, mut feed) = gw.registry.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gw
        .registry
        .get(&agent_id)
        .is_none_or(|a| a.sessions.is_empty())
    {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err("the dev agent did not connect within 30s; see its log above".into());
            }
            status = child.wait() => {
                return Err(format!("the dev agent exited before connecting: {}", status.map_err(|e| e.to_string())?));
            }
            _ = feed.recv() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    Ok(())
}

/// Proves the whole path a real client takes through the gateway `dev_json` names: TLS, a
/// client certificate, `Agents/Get`, and a call relayed through the tunnel to the demo
/// upstream. Returns the agent as the gateway sees it.
async fn check_through(dev_json: &DevJson) -> Result<tether_api::v1::Agent, String> {
    let channel = ctl::connect(&dev_json.into()).await?;
    let agent = AgentsClient::new(channel)
        .get(GetAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .map_err(|s| format!("Agents/Get {AGENT}: {}", s.message()))?
        .into_inner();
    if !agent.connected {
        return Err(format!("Agents/Get says {AGENT} is not connected"));
    }
    let channel = ctl::connect(&dev_json.into()).await?;
    let mut echo = tether_api::demo::v1::echo_client::EchoClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(
                "tether-agent",
                tonic::metadata::MetadataValue::from_static(AGENT),
            );
            Ok(req)
        },
    );
    let reply = echo
        .unary(tether_api::demo::v1::EchoRequest {
            message: "hello through the tunnel".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| {
            format!(
                "relayed Echo/Unary to {AGENT}: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    if reply.message != "hello through the tunnel" {
        return Err(format!("relayed Echo/Unary answered {:?}", reply.message));
    }
    Ok(agent)
}

fn rel_path(p: &Path) -> String {
    p.strip_prefix(std::env::current_dir().unwrap_or_default())
        .unwrap_or(p)
        .display()
        .to_string()
}

fn print_agent(agent: &tether_api::v1::Agent) {
    println!("AGENT        CONNECTED  SESSIONS  VERSION  REPLICAS");
    let mut replicas: Vec<&str> = agent.sessions.iter().map(|s| s.replica.as_str()).collect();
    replicas.retain(|r| !r.is_empty());
    println!(
        "{:<12} {:<10} {:<9} {:<8} {}",
        agent.id,
        agent.connected,
        agent.sessions.len(),
        agent
            .sessions
            .first()
            .map(|s| s.agent_version.as_str())
            .unwrap_or("-"),
        if replicas.is_empty() {
            "-".to_owned()
        } else {
            replicas.join(",")
        }
    );
}

/// A console login link for the dev caller (`tetherctl console` prints a new one).
async fn print_console_link(dev_json: &DevJson, northbound: SocketAddr) {
    let link = async {
        let channel = ctl::connect(&dev_json.into()).await?;
        tether_api::v1::console_client::ConsoleClient::new(channel)
            .create_login_link(tether_api::v1::CreateLoginLinkRequest {})
            .await
            .map_err(|s| s.message().to_owned())
    };
    println!();
    match link.await {
        Ok(l) => {
            println!("Console: https://{northbound}{}", l.into_inner().path);
            println!(
                "      (single use, valid 60 s; the dev CA signs the gateway's certificate: accept it in the browser, or import {}; a new link: ./target/debug/tetherctl console)",
                rel_path(&dev_json.ca)
            );
        }
        Err(e) => println!("Console: no login link ({e}); try ./target/debug/tetherctl console"),
    }
}

fn print_grpcurl(dev_json: &DevJson, northbound: SocketAddr) {
    let c = rel_path(&dev_json.client_cert);
    let k = rel_path(&dev_json.client_key);
    let ca = rel_path(&dev_json.ca);
    println!(
        "      ./target/debug/tetherctl call {AGENT} tether.demo.v1.Echo/Unary --data '{{\"message\":\"hi\"}}'"
    );
    println!(
        "      grpcurl -cacert {ca} -cert {c} -key {k} -H 'tether-agent: {AGENT}' {northbound} list"
    );
    println!(
        "      grpcurl -cacert {ca} -cert {c} -key {k} -H 'tether-agent: {AGENT}' -d '{{\"message\":\"hi\"}}' {northbound} tether.demo.v1.Echo/Unary"
    );
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn toml_of(cfg: &GatewayConfig) -> Result<String, String> {
    toml::to_string(cfg)
        .map(|s| format!("# Written by `tether-gateway dev`, for reference: dev configures the gateway in code.\n{s}"))
        .map_err(|e| format!("serializing gateway config: {e}"))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    pki::write_file(path, text, false).map_err(|e| e.to_string())
}
