//! `tether-agent`: parses flags and config, then runs the agent library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_agent::AgentConfig;
use tether_runtime::config::EXIT_CONFIG;
use tether_runtime::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "Tether data-plane agent: dials out to the gateway, opens no inbound port"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to the gateway(s) and keep the sessions up until SIGTERM.
    Run {
        /// TOML config file; every key can also come from TETHER_* env vars and --set.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key: --set gateways='["gw:443"]' (repeatable; wins over file and env).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Log format (overrides log.format).
        #[arg(long)]
        log_format: Option<LogFormat>,
        /// Validate the config and exit (0 when valid, 64 when not).
        #[arg(long)]
        check_config: bool,
    },
    /// Ask a running agent's loopback ops endpoint whether it is alive (default) or ready; exits
    /// 0 or 1. For Kubernetes exec probes: no shell or curl needed in the image.
    Probe {
        /// The agent's config, to find `ops.listen` (default 127.0.0.1:9091).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Check /readyz (at least one session up) instead of /healthz (process alive).
        #[arg(long)]
        ready: bool,
    },
    /// Network preflight: checks, in order, the agent's certificate, state_dir, and for each
    /// gateway DNS, UDP and QUIC, TCP (or the proxy) and TLS, a session, and the clock; prints
    /// what a network team can act on. Exits 0 only when the agent can connect.
    Doctor {
        /// The agent's config (as for `run`).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

fn main() -> ExitCode {
    let (config, set, log_format, check_config) = match Cli::parse().cmd {
        Cmd::Run {
            config,
            set,
            log_format,
            check_config,
        } => (config, set, log_format, check_config),
        Cmd::Probe { config, set, ready } => return probe(config, set, ready),
        Cmd::Doctor { config, set } => return doctor(config, set),
    };
    let cfg = match AgentConfig::load(config.as_deref(), &set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-agent: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if check_config {
        return match tether_agent::check_config(&cfg) {
            Ok(checked) => {
                println!("config ok; {checked}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tether-agent: invalid config: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        };
    }
    logging::init(log_format.unwrap_or(cfg.log.format), &cfg.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let shutdown = tether_runtime::shutdown::on_signals();
        match tether_agent::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(
                e @ (tether_agent::AgentError::Config(_)
                | tether_agent::AgentError::TlsMaterial(_)
                | tether_agent::AgentError::Dialer(_)
                | tether_agent::AgentError::Upstream { .. }
                | tether_agent::AgentError::Identity(_)
                | tether_agent::AgentError::Enrollment(_)),
            ) => {
                tracing::error!("{e}");
                eprintln!("tether-agent: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
            Err(e) => {
                eprintln!("tether-agent: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn probe(config: Option<PathBuf>, set: Vec<String>, ready: bool) -> ExitCode {
    let addr = match config {
        Some(path) => match AgentConfig::load(Some(&path), &set) {
            Ok(c) => c.ops.listen,
            Err(e) => {
                eprintln!("tether-agent probe: invalid config: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        },
        None => tether_agent::config::OpsConfig::default().listen,
    };
    let path = if ready { "/readyz" } else { "/healthz" };
    match tether_runtime::ops::probe(addr, path, std::time::Duration::from_secs(2)) {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!(
                "tether-agent probe: {path} answered {status}: {}",
                body.trim()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tether-agent probe: {addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(config: Option<PathBuf>, set: Vec<String>) -> ExitCode {
    let cfg = match AgentConfig::load(config.as_deref(), &set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-agent doctor: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(tether_agent::doctor::run(&cfg));
    print!("{}", report.render());
    if report.can_connect() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
