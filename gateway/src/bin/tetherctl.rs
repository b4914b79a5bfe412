//! `tetherctl`: the command-line client of the northbound API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use tether_api::v1;
use tether_api::v1::agents_client::AgentsClient;
use tether_gateway::ctl::{self, DEV_JSON, DevJson, Target};

#[derive(Parser)]
#[command(
    name = "tetherctl",
    version,
    about = "Talk to a Tether gateway's northbound API"
)]
struct Cli {
    /// Northbound address host:port (default: from ./.tether/dev.json when present).
    #[arg(long, env = "TETHER_NORTHBOUND", global = true)]
    northbound: Option<String>,
    /// CA bundle for the gateway's certificate.
    #[arg(long, env = "TETHER_CA", global = true)]
    ca: Option<PathBuf>,
    /// Control-plane client certificate.
    #[arg(long, env = "TETHER_CLIENT_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "TETHER_CLIENT_KEY", global = true)]
    key: Option<PathBuf>,
    /// TLS name to verify (default: the host of --northbound).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Where `tether-gateway dev` wrote its client details.
    #[arg(long, env = "TETHER_DEV_JSON", global = true, default_value = DEV_JSON)]
    dev_json: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Agents and their sessions.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Listen on a loopback port and carry each connection to an agent's TCP service.
    Forward {
        /// The agent, <tenant>/<agent>.
        agent: String,
        /// The agent's service (kind = "tcp" in its service map).
        service: String,
        /// Local port (0 picks a free one; the chosen port is printed).
        local_port: u16,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// List known agents.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only connected agents.
        #[arg(long)]
        connected: bool,
    },
    /// Show one agent (<tenant>/<agent>).
    Get { agent: String },
    /// Stream connect and disconnect events.
    Watch {
        #[arg(long)]
        tenant: Option<String>,
        /// Only this agent (<tenant>/<agent>).
        #[arg(long)]
        agent: Option<String>,
    },
}

fn target(cli: &Cli) -> Result<Target, String> {
    let dev = if cli.dev_json.exists() {
        Some(DevJson::read(&cli.dev_json)?)
    } else {
        None
    };
    let pick = |flag: &Option<PathBuf>, from_dev: Option<PathBuf>, what: &str| {
        flag.clone().or(from_dev).ok_or_else(|| {
            format!(
                "no {what}: pass --{what} (or run `tether-gateway dev`, which writes {DEV_JSON})"
            )
        })
    };
    Ok(Target {
        addr: cli
            .northbound
            .clone()
            .or(dev.as_ref().map(|d| d.northbound.clone()))
            .ok_or_else(|| format!("no gateway address: pass --northbound host:port (or run `tether-gateway dev`, which writes {DEV_JSON})"))?,
        ca: pick(&cli.ca, dev.as_ref().map(|d| d.ca.clone()), "ca")?,
        cert: pick(&cli.cert, dev.as_ref().map(|d| d.client_cert.clone()), "cert")?,
        key: pick(&cli.key, dev.as_ref().map(|d| d.client_key.clone()), "key")?,
        server_name: cli.server_name.clone(),
    })
}

fn ago(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let Ok(st) = SystemTime::try_from(*t) else {
        return "-".into();
    };
    match SystemTime::now().duration_since(st) {
        Ok(d) => format!(
            "{}",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        Err(_) => "now".into(),
    }
}

fn rtt(s: &v1::Session) -> String {
    s.rtt
        .as_ref()
        .and_then(|d| Duration::try_from(*d).ok())
        .map(|d| format!("{:.1}ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn print_agents(agents: &[v1::Agent]) {
    println!(
        "{:<28} {:<10} {:<8} {:<10} {:<22} {:<8} UP/SEEN",
        "AGENT", "CONNECTED", "SESSIONS", "VERSION", "REMOTE", "RTT"
    );
    for a in agents {
        let s = a.sessions.first();
        println!(
            "{:<28} {:<10} {:<8} {:<10} {:<22} {:<8} {}",
            a.id,
            if a.connected { "yes" } else { "no" },
            a.sessions.len(),
            s.map(|s| s.agent_version.as_str()).unwrap_or("-"),
            s.map(|s| s.remote_addr.as_str()).unwrap_or("-"),
            s.map(rtt).unwrap_or_else(|| "-".into()),
            match s {
                Some(s) => ago(&s.connected_at),
                None => format!("seen {} ago", ago(&a.last_seen)),
            }
        );
    }
}

fn json_agent(a: &v1::Agent) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "connected": a.connected,
        "sessions": a.sessions.iter().map(json_session).collect::<Vec<_>>(),
    })
}

fn json_session(s: &v1::Session) -> serde_json::Value {
    serde_json::json!({
        "session_id": s.session_id,
        "agent": s.agent,
        "remote_addr": s.remote_addr,
        "transport": s.transport,
        "agent_version": s.agent_version,
        "instance_id": s.instance_id,
        "labels": s.labels,
        "rtt": rtt(s),
    })
}

async fn run(cli: Cli) -> Result<(), String> {
    let channel = ctl::connect(&target(&cli)?).await?;
    if let Cmd::Forward { agent, service, local_port, bind } = &cli.cmd {
        return forward(channel, agent, service, std::net::SocketAddr::new(*bind, *local_port)).await;
    }
    let mut client = AgentsClient::new(channel);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match cli.cmd {
        Cmd::Agents(AgentsCmd::List { tenant, connected }) => {
            let r = client
                .list(v1::ListAgentsRequest {
                    tenant: tenant.unwrap_or_default(),
                    connected_only: connected,
                })
                .await
                .map_err(status)?
                .into_inner();
            match cli.output {
                Output::Table => print_agents(&r.agents),
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(r.agents.iter().map(json_agent).collect())
                ),
            }
        }
        Cmd::Agents(AgentsCmd::Get { agent }) => {
            let a = client
                .get(v1::GetAgentRequest { agent })
                .await
                .map_err(status)?
                .into_inner();
            match cli.output {
                Output::Table => print_agents(std::slice::from_ref(&a)),
                Output::Json => println!("{}", json_agent(&a)),
            }
        }
        Cmd::Forward { .. } => unreachable!("handled above"),
        Cmd::Agents(AgentsCmd::Watch { tenant, agent }) => {
            let mut stream = client
                .watch(v1::WatchAgentsRequest {
                    tenant: tenant.unwrap_or_default(),
                    agent: agent.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(status)? {
                let kind = match v1::agent_event::Kind::try_from(ev.kind) {
                    Ok(v1::agent_event::Kind::Connected) => "CONNECTED",
                    Ok(v1::agent_event::Kind::Disconnected) => "DISCONNECTED",
                    _ => "UNKNOWN",
                };
                let session = ev.session.as_ref();
                match cli.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({
                            "kind": kind, "agent": ev.agent, "initial": ev.initial, "reason": ev.reason,
                            "session": session.map(json_session),
                        })
                    ),
                    Output::Table => println!(
                        "{:<12} {:<28} session={} remote={}{}{}",
                        kind,
                        ev.agent,
                        session.map(|s| s.session_id.as_str()).unwrap_or("-"),
                        session.map(|s| s.remote_addr.as_str()).unwrap_or("-"),
                        if ev.initial {
                            " (already connected)"
                        } else {
                            ""
                        },
                        if ev.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" reason={}", ev.reason)
                        },
                    ),
                }
            }
        }
    }
    Ok(())
}

async fn forward(channel: tonic::transport::Channel, agent: &str, service: &str, listen: std::net::SocketAddr) -> Result<(), String> {
    agent.parse::<tunnel_proto::AgentId>().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("forwarding {local} -> {agent} service {service}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    loop {
        let (tcp, peer) = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
        let (channel, agent, service) = (channel.clone(), agent.to_owned(), service.to_owned());
        tokio::spawn(async move {
            if let Err(e) = carry(channel, &agent, &service, tcp).await {
                eprintln!("tetherctl forward: connection from {peer}: {e}");
            }
        });
    }
}

/// One local connection as one `Streams/Open` call; half-close travels both ways.
async fn carry(channel: tonic::transport::Channel, agent: &str, service: &str, tcp: tokio::net::TcpStream) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::StreamChunk>(4);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping tx ends the request stream: half-close
                Ok(n) => {
                    if tx.send(v1::StreamChunk { data: buf[..n].to_vec() }).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert("tether-agent", agent.parse().map_err(|_| "agent id is not ASCII")?);
    req.metadata_mut().insert("tether-service", service.parse().map_err(|_| "service is not ASCII")?);
    let mut client = tether_api::v1::streams_client::StreamsClient::new(channel);
    let mut inbound = client
        .open(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(chunk) = inbound.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
        wr.write_all(&chunk.data).await.map_err(|e| e.to_string())?;
    }
    wr.shutdown().await.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tether_runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherctl: {e}");
            ExitCode::FAILURE
        }
    }
}
