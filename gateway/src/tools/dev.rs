//! `tether-gateway dev`: a complete local setup on embedded defaults.
//!
//! Creates dev PKI under `./.tether/` (once), starts the gateway on loopback, starts a real
//! `tether-agent` process (agent id `dev/local`) beside it, writes `./.tether/dev.json` for
//! clients, and waits for the agent to connect. With `--check` it then verifies the agent through
//! the northbound API and exits 0; without, it keeps running until Ctrl-C.

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

/// Options of the `dev` command.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State directory (`./.tether`).
    pub dir: PathBuf,
    /// Verify and exit instead of running.
    pub check: bool,
    /// The `tether-agent` binary; default: next to this executable.
    pub agent_bin: Option<PathBuf>,
    /// Bind free ports instead of the defaults (7443, 7444, 9090, 9091).
    pub any_port: bool,
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

    let lo = |port| SocketAddr::from(([127, 0, 0, 1], if opts.any_port { 0 } else { port }));
    let udp = udp_or_any(lo(7443)).map_err(|e| format!("binding tunnel: {e}"))?;
    // The TCP fallback on the same port when it is free (dev agents use QUIC either way).
    let tunnel_tcp = udp
        .local_addr()
        .ok()
        .and_then(|a| std::net::TcpListener::bind(a).ok());
    let sockets = Sockets {
        tunnel: udp,
        tunnel_tcp,
        northbound: tcp_or_any(lo(7444)).map_err(|e| format!("binding northbound: {e}"))?,
        ops: tcp_or_any(lo(9090)).map_err(|e| format!("binding ops: {e}"))?,
    };
    let tunnel = sockets.tunnel.local_addr().map_err(|e| e.to_string())?;
    let northbound = sockets.northbound.local_addr().map_err(|e| e.to_string())?;
    let ops = sockets.ops.local_addr().map_err(|e| e.to_string())?;
    let agent_ops = tcp_or_any(lo(9091))
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;

    let cfg = GatewayConfig {
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
        northbound: NorthboundConfig { listen: northbound },
        ops: OpsConfig { listen: ops },
        log: LogConfig::default(),
        data_dir: Some(dir.join("data")),
        commands: Default::default(),
        limits: Default::default(),
        enrollment: crate::config::EnrollmentConfig {
            ca_key: Some(pki_dir.join("ca-key.pem")),
            ..Default::default()
        },
        auth: None,
        store: Default::default(),
        cluster: Default::default(),
    };
    write(&dir.join("gateway.toml"), &toml_of(&cfg)?)?;
    // The demo upstream the dev agent allow-lists as `demo`, its default service.
    let demo_listener = tokio::net::TcpListener::bind(lo(50051))
        .await
        .or(tokio::net::TcpListener::bind(lo(0)).await)
        .map_err(|e| format!("binding the demo upstream: {e}"))?;
    let demo_addr = demo_listener.local_addr().map_err(|e| e.to_string())?;
    let demo_stop = CancellationToken::new();
    tokio::spawn(crate::tools::demo::serve(
        demo_listener,
        crate::tools::demo::EchoService::default(),
        demo_stop.clone(),
    ));
    let agent_toml = format!(
        "# Written by `tether-gateway dev`.\ngateways = [\"{tunnel}\"]\nserver_name = \"localhost\"\ninstance_id = \"dev\"\ndefault_service = \"demo\"\nstate_dir = \"agent-state\"\n\n[services.demo]\naddress = \"http://{demo_addr}\"\n\n[labels]\nenv = \"dev\"\n\n[tls]\nca = \"agent/ca.pem\"\ncert = \"agent/agent.pem\"\nkey = \"agent/agent-key.pem\"\n\n[reconnect]\ninitial_backoff = \"200ms\"\nmax_backoff = \"5s\"\n\n[ops]\nlisten = \"{agent_ops}\"\n"
    );
    write(&dir.join("agent.toml"), &agent_toml)?;
    let dev_json = DevJson {
        northbound: northbound.to_string(),
        ops: ops.to_string(),
        ca: pki_dir.join("ca.pem"),
        client_cert: dir.join("client/client.pem"),
        client_key: dir.join("client/client-key.pem"),
        agent: AGENT.into(),
    };
    write(
        &dir.join("dev.json"),
        &serde_json::to_string_pretty(&dev_json).map_err(|e| e.to_string())?,
    )?;

    let gw_stop = CancellationToken::new();
    let gw = server::start(cfg, sockets, gw_stop.clone())
        .await
        .map_err(|e| e.to_string())?;
    let (_, mut feed) = gw.registry.subscribe();

    let bin = agent_binary(&opts)?;
    let mut child = tokio::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;

    // Wait for the agent's session.
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

    // Prove the whole path a real client takes: TLS, client certificate, northbound API.
    let channel = ctl::connect(&(&dev_json).into()).await?;
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
    // And a call relayed through the tunnel to the demo upstream.
    let channel = ctl::connect(&(&dev_json).into()).await?;
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
    let rel = |p: &Path| {
        p.strip_prefix(std::env::current_dir().unwrap_or_default())
            .unwrap_or(p)
            .display()
            .to_string()
    };
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
    println!("AGENT        CONNECTED  SESSIONS  VERSION");
    println!(
        "{:<12} {:<10} {:<9} {}",
        agent.id,
        agent.connected,
        agent.sessions.len(),
        agent
            .sessions
            .first()
            .map(|s| s.agent_version.as_str())
            .unwrap_or("-")
    );
    println!();
    println!(
        "  demo        the agent's default service `demo` ({demo_addr}): Echo, health, reflection"
    );
    println!();
    println!("Try:  ./target/debug/tetherctl agents list");
    println!("      ./target/debug/tetherctl agents watch");
    let c = rel(&dev_json.client_cert);
    let k = rel(&dev_json.client_key);
    let ca = rel(&dev_json.ca);
    println!(
        "      grpcurl -cacert {ca} -cert {c} -key {k} -H 'tether-agent: {AGENT}' {northbound} list"
    );
    println!(
        "      grpcurl -cacert {ca} -cert {c} -key {k} -H 'tether-agent: {AGENT}' -d '{{\"message\":\"hi\"}}' {northbound} tether.demo.v1.Echo/Unary"
    );

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
