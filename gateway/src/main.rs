//! `tether-gateway`: parses flags and config, then runs the gateway library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_gateway::identity::pki::{self, Ca};
use tether_gateway::tools::dev::{self, DevOptions};
use tether_gateway::{GatewayConfig, GatewayError, Sockets};
use tether_runtime::config::EXIT_CONFIG;
use tether_runtime::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "tether-gateway",
    version,
    about = "Tether control-plane gateway: agents dial in, the control plane calls through"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve agents (QUIC) and the control plane (gRPC) until SIGTERM, then drain.
    Serve {
        /// TOML config file; every key can also come from TETHER_* env vars and --set.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key: --set tunnel.listen=0.0.0.0:443 (repeatable; wins over file and env).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Log format (overrides log.format).
        #[arg(long)]
        log_format: Option<LogFormat>,
        /// Validate the config and exit (0 when valid, 64 when not).
        #[arg(long)]
        check_config: bool,
    },
    /// Certificates: a CA, the gateway's certificate, agent and control-plane client certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Run a gateway and a `dev/local` agent locally on embedded defaults (state in ./.tether);
    /// with --replicas N, N gateway replicas on a throwaway local PostgreSQL.
    Dev {
        /// State directory.
        #[arg(long, default_value = ".tether")]
        dir: PathBuf,
        /// Verify that the agent connects and is visible through the northbound API, then exit.
        #[arg(long)]
        check: bool,
        /// The tether-agent binary (default: next to this one).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Bind free ports instead of the defaults (dev.json says which).
        #[arg(long)]
        any_port: bool,
        /// Gateway replicas: 1 runs on the embedded store; more share a local PostgreSQL
        /// started for the run (Debian's `postgresql` package must be installed).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
        replicas: u16,
        /// Log format.
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA and the gateway's server certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain, e.g. tether.example.com.
        #[arg(long)]
        trust_domain: String,
        /// DNS name or IP address the gateway is reached at (repeatable).
        #[arg(long = "gateway-name", required = true)]
        gateway_names: Vec<String>,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent client certificate (spiffe://<td>/tenant/<tenant>/agent/<agent>).
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent: String,
        /// Output directory: agent.pem, agent-key.pem, ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 24h, 30m.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issue a gateway replica's peer certificate (spiffe://<td>/gateway/<replica-id>), for
    /// the links between replicas: set cluster.peer_cert and cluster.peer_key to the files.
    IssueGateway {
        #[arg(long)]
        dir: PathBuf,
        /// The replica's cluster.replica_id.
        #[arg(long)]
        replica_id: String,
        /// Output directory: peer.pem, peer-key.pem, ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 365d (the gateway reads it at start: renew and restart before then).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issue a control-plane client certificate (spiffe://<td>/controlplane/<name>).
    IssueClient {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Output directory: client.pem, client-key.pem, ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 90d.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    tether_runtime::tls::install_crypto_provider();
    match Cli::parse().cmd {
        Cmd::Serve {
            config,
            set,
            log_format,
            check_config,
        } => serve(config, set, log_format, check_config),
        Cmd::Pki(cmd) => match pki_cmd(cmd) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tether-gateway pki: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
        Cmd::Dev {
            dir,
            check,
            agent_bin,
            any_port,
            replicas,
            log_format,
        } => {
            logging::init(log_format, "info");
            runtime().block_on(async {
                let shutdown = tether_runtime::shutdown::on_signals();
                match dev::run(
                    DevOptions {
                        dir,
                        check,
                        agent_bin,
                        any_port,
                        replicas: replicas.into(),
                    },
                    shutdown,
                )
                .await
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("tether-gateway dev: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn serve(
    config: Option<PathBuf>,
    set: Vec<String>,
    log_format: Option<LogFormat>,
    check: bool,
) -> ExitCode {
    let cfg = match GatewayConfig::load(config.as_deref(), &set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-gateway: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // TLS material and the JWKS file are part of the config: load them now so --check-config
    // catches a bad path.
    if let Err(e) = tether_gateway::server::check_config(&cfg) {
        eprintln!("tether-gateway: invalid config: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    if check {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    logging::init(log_format.unwrap_or(cfg.log.format), &cfg.log.level);
    tether_gateway::server::check_open_files_limit(&cfg);
    runtime().block_on(async {
        let shutdown = tether_runtime::shutdown::on_signals();
        let sockets = match Sockets::bind(&cfg) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tether-gateway: {e}");
                return ExitCode::FAILURE;
            }
        };
        match tether_gateway::start(cfg, sockets, shutdown).await {
            Ok(handle) => {
                handle.wait().await;
                ExitCode::SUCCESS
            }
            // Also a DSN, password or database PostgreSQL refused: retrying cannot fix it.
            Err(e) if e.is_config() => {
                eprintln!("tether-gateway: invalid config: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
            Err(e) => {
                eprintln!("tether-gateway: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn pki_cmd(cmd: PkiCmd) -> Result<String, GatewayError> {
    Ok(match cmd {
        PkiCmd::Init {
            dir,
            trust_domain,
            gateway_names,
            force,
        } => {
            pki::init(&dir, &trust_domain, &gateway_names, force)?;
            format!(
                "CA and gateway certificate for {} written to {} (keys mode 0600)",
                gateway_names.join(", "),
                dir.display()
            )
        }
        PkiCmd::IssueAgent {
            dir,
            tenant,
            agent,
            out,
            ttl,
        } => {
            let ca = Ca::load(&dir)?;
            let id = tunnel_proto::AgentId::new(&tenant, &agent).map_err(pki::PkiError::from)?;
            let issued = ca.issue_agent(&id, ttl)?;
            pki::write_issued(&out, "agent", &issued, &ca)?;
            format!(
                "agent certificate for {} ({}) valid for {} written to {}: agent.pem, agent-key.pem and ca.pem (the agent's tls.cert, tls.key and tls.ca)",
                id,
                id.to_uri(&ca.trust_domain),
                tether_runtime::duration::human(ttl),
                out.display()
            )
        }
        PkiCmd::IssueGateway {
            dir,
            replica_id,
            out,
            ttl,
        } => {
            let ca = Ca::load(&dir)?;
            let issued = ca.issue_gateway(&replica_id, ttl)?;
            pki::write_issued(&out, "peer", &issued, &ca)?;
            format!(
                "peer certificate for {} valid for {} written to {}: set cluster.peer_cert = \"{}\" and cluster.peer_key = \"{}\" on replica {replica_id}",
                tunnel_proto::SpiffeId::gateway_uri(&ca.trust_domain, &replica_id),
                tether_runtime::duration::human(ttl),
                out.display(),
                out.join("peer.pem").display(),
                out.join("peer-key.pem").display(),
            )
        }
        PkiCmd::IssueClient {
            dir,
            name,
            out,
            ttl,
        } => {
            let ca = Ca::load(&dir)?;
            let issued = ca.issue_client(&name, ttl)?;
            pki::write_issued(&out, "client", &issued, &ca)?;
            format!(
                "control-plane certificate for {} valid for {} written to {}: client.pem, client-key.pem, and ca.pem (the CA bundle: tetherctl --ca)",
                tunnel_proto::SpiffeId::controlplane_uri(&ca.trust_domain, &name),
                tether_runtime::duration::human(ttl),
                out.display()
            )
        }
    })
}
