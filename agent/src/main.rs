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
    /// Pause the running agent (the kill switch): every relayed call and TCP stream is refused
    /// with FAILED_PRECONDITION and commands stay queued at the gateway, until `resume`. Kept
    /// in state_dir across restarts. Through the loopback ops endpoint: run it in the pod.
    Pause {
        /// The agent's config, to find `ops.listen` (and `state_dir`).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Why, shown to the vendor in every refusal, AgentInfo and /readyz.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Turn off the pause `pause` made. A pause in the config (`paused`) or the control file
    /// stays: exits 1 naming it.
    Resume {
        /// The agent's config, to find `ops.listen` (and `state_dir`).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List the commands waiting for approval (`approvals.kinds`) in the running agent: id,
    /// kind, payload SHA-256, how long it waits, when its TTL ends.
    Approvals {
        /// The agent's config, to find `ops.listen`.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a command waiting in the running agent: it runs at once (or at its next
    /// delivery). Recorded in the ledger with who approved it.
    Approve {
        /// The command id (`tether-agent approvals` lists them).
        id: String,
        /// The agent's config, to find `ops.listen`.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Who approves (default: $USER), for the ledger.
        #[arg(long, default_value = "")]
        by: String,
    },
    /// Reject a command waiting in the running agent: it ends FAILED with "rejected by the
    /// data plane's owner: <reason>" and never runs. Recorded in the ledger.
    Reject {
        /// The command id (`tether-agent approvals` lists them).
        id: String,
        /// Why, for the vendor (required).
        #[arg(long)]
        reason: String,
        /// The agent's config, to find `ops.listen`.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Who rejects (default: $USER), for the ledger.
        #[arg(long, default_value = "")]
        by: String,
    },
    /// Read the ledger in state_dir: `tail` prints the last records, `verify` checks the
    /// hash chain and the signed checkpoints and says where it is broken (exit 1).
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCmd,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Print the last records, oldest first, as stored (JSON lines).
    Tail {
        /// The agent's config, to find `state_dir`.
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// Set a config key (as for `run`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// Check every record's hash, the chain across records and files, and every checkpoint's
    /// signature; print each break with its file and record number. Exit 0 when intact, 1 when
    /// not.
    Verify {
        /// The agent's config, to find `state_dir` (and the agent's key to compare with).
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
        Cmd::Pause {
            config,
            set,
            reason,
        } => return act(config, set, "pause", &reason),
        Cmd::Resume { config, set } => return act(config, set, "resume", ""),
        Cmd::Approvals { config, set, json } => return approvals(config, set, json),
        Cmd::Approve {
            id,
            config,
            set,
            by,
        } => return decide(config, set, "approve", id, by, String::new()),
        Cmd::Reject {
            id,
            reason,
            config,
            set,
            by,
        } => return decide(config, set, "reject", id, by, reason),
        Cmd::Ledger {
            cmd: LedgerCmd::Tail { config, set, lines },
        } => return ledger_tail(config, set, lines),
        Cmd::Ledger {
            cmd: LedgerCmd::Verify { config, set },
        } => return ledger_verify(config, set),
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
    let source = config.map(|file| tether_agent::reload::ConfigSource { file, sets: set });
    rt.block_on(async {
        let shutdown = tether_runtime::shutdown::on_signals();
        match tether_agent::run_from(cfg, source, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(
                e @ (tether_agent::AgentError::Config(_)
                | tether_agent::AgentError::TlsMaterial(_)
                | tether_agent::AgentError::Dialer(_)
                | tether_agent::AgentError::Upstream { .. }
                | tether_agent::AgentError::Identity(_)
                | tether_agent::AgentError::Ledger(_)
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

fn load(config: Option<PathBuf>, set: &[String], what: &str) -> Result<AgentConfig, ExitCode> {
    AgentConfig::load(config.as_deref(), set).map_err(|e| {
        eprintln!("tether-agent {what}: invalid config: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

/// `POST /pause` or `/resume` on the running agent's ops endpoint.
fn act(config: Option<PathBuf>, set: Vec<String>, what: &str, body: &str) -> ExitCode {
    match post(config, set, what, body) {
        Ok(answer) => {
            println!("{}", answer.trim());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `POST /approve` or `/reject` with a decision.
fn decide(
    config: Option<PathBuf>,
    set: Vec<String>,
    what: &str,
    id: String,
    by: String,
    reason: String,
) -> ExitCode {
    let by = if by.is_empty() {
        std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_default()
    } else {
        by
    };
    let body = serde_json::to_string(&tether_agent::ApprovalDecision { id, by, reason })
        .expect("a decision serializes");
    act(config, set, what, &body)
}

/// `POST /approvals`: the commands waiting, as a table or JSON.
fn approvals(config: Option<PathBuf>, set: Vec<String>, json: bool) -> ExitCode {
    let answer = match post(config, set, "approvals", "") {
        Ok(a) => a,
        Err(code) => return code,
    };
    if json {
        println!("{}", answer.trim());
        return ExitCode::SUCCESS;
    }
    let list: Vec<tether_agent::approvals::Request> = match serde_json::from_str(&answer) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tether-agent approvals: the agent's answer is not a list of waits: {e}");
            return ExitCode::FAILURE;
        }
    };
    if list.is_empty() {
        println!("no command is waiting for approval");
        return ExitCode::SUCCESS;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let ago = |ms: u64| humantime::format_duration(std::time::Duration::from_secs(ms / 1000));
    println!(
        "{:<28} {:<22} {:<10} {:<12} {:<12} PAYLOAD SHA-256",
        "ID", "KIND", "DECISION", "WAITING", "TTL LEFT"
    );
    for r in list {
        use tether_agent::approvals::Decision as D;
        let decision = match &r.decision {
            D::Pending => "pending".to_owned(),
            D::Approved { .. } => "approved".to_owned(),
            D::Rejected { .. } => "rejected".to_owned(),
        };
        let ttl = r
            .expires_ms
            .map_or("-".to_owned(), |e| ago(e.saturating_sub(now)).to_string());
        println!(
            "{:<28} {:<22} {:<10} {:<12} {:<12} {}",
            r.id,
            r.kind,
            decision,
            ago(now.saturating_sub(r.received_ms)).to_string(),
            ttl,
            r.payload_sha256
        );
    }
    ExitCode::SUCCESS
}

/// `POST /<what>` on the running agent's ops endpoint: its answer when 200, else the exit code
/// after saying why.
fn post(
    config: Option<PathBuf>,
    set: Vec<String>,
    what: &str,
    body: &str,
) -> Result<String, ExitCode> {
    let addr = match &config {
        None => tether_agent::config::OpsConfig::default().listen,
        Some(_) => ops_addr(&load(config, &set, what)?),
    };
    let path = format!("/{what}");
    match tether_runtime::ops::request(addr, "POST", &path, body, std::time::Duration::from_secs(5))
    {
        Ok((200, answer)) => Ok(answer),
        Ok((status, answer)) => {
            eprintln!(
                "tether-agent {what}: the agent answered {status}: {}",
                answer.trim()
            );
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!(
                "tether-agent {what}: cannot reach the agent's ops endpoint {addr}: {e} (run this in the agent's pod, with the agent's --config)"
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// `ops.listen`, or where an agent bound to port 0 says it listens (`state_dir/ops.addr`).
fn ops_addr(cfg: &AgentConfig) -> std::net::SocketAddr {
    if cfg.ops.listen.port() == 0
        && let Some(dir) = &cfg.state_dir
        && let Ok(text) = std::fs::read_to_string(dir.join(tether_agent::OPS_ADDR_FILE))
        && let Ok(addr) = text.trim().parse()
    {
        return addr;
    }
    cfg.ops.listen
}

fn ledger_dir(cfg: &AgentConfig, what: &str) -> Result<PathBuf, ExitCode> {
    match &cfg.state_dir {
        Some(d) => Ok(d.join(tether_agent::ledger::DIR)),
        None => {
            eprintln!(
                "tether-agent ledger {what}: invalid config: state_dir: not set, and the ledger lives in state_dir/ledger: set state_dir (the agent keeps no ledger file without it)"
            );
            Err(ExitCode::from(EXIT_CONFIG as u8))
        }
    }
}

fn ledger_tail(config: Option<PathBuf>, set: Vec<String>, n: usize) -> ExitCode {
    let dir = match load(config, &set, "ledger tail").and_then(|c| ledger_dir(&c, "tail")) {
        Ok(d) => d,
        Err(code) => return code,
    };
    match tether_agent::ledger::tail_lines(&dir, n) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-agent ledger tail: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ledger_verify(config: Option<PathBuf>, set: Vec<String>) -> ExitCode {
    let cfg = match load(config, &set, "ledger verify") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = match ledger_dir(&cfg, "verify") {
        Ok(d) => d,
        Err(code) => return code,
    };
    // The agent and key the checkpoints should be of: the configured identity's when it can
    // be read here, else the agent the ledger's first `open` record names.
    let identity = tether_agent::Identity::from_files(&cfg).ok();
    let agent = identity
        .as_ref()
        .map(|i| i.agent.clone())
        .or_else(|| tether_agent::ledger::agent_of(&dir));
    let key = identity
        .as_ref()
        .and_then(|i| tether_agent::ledger::Signer::new(&i.key).ok())
        .map(|s| s.fingerprint());
    let started = std::time::Instant::now();
    let report = match tether_agent::ledger::verify(&dir, agent.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-agent ledger verify: {e}");
            return ExitCode::FAILURE;
        }
    };
    let took = started.elapsed();
    for note in &report.notes {
        println!("note: {note}");
    }
    if let Some(key) = &key
        && !report.keys.is_empty()
        && !report.keys.contains(key)
    {
        println!(
            "note: no checkpoint is signed with the agent's current key {key} (a renewed certificate with a new key signs from its start on)"
        );
    }
    let summary = format!(
        "{} records in {} files (seq {}..{}), {} signed checkpoints (keys: {}), {} records after the last checkpoint; read in {:.3} s ({:.0} records/s)",
        report.records,
        report.files,
        report.first_seq.map_or("-".into(), |s| s.to_string()),
        report.last_seq.map_or("-".into(), |s| s.to_string()),
        report.checkpoints,
        if report.keys.is_empty() {
            "none".to_owned()
        } else {
            report.keys.iter().cloned().collect::<Vec<_>>().join(", ")
        },
        report.unsigned_tail,
        took.as_secs_f64(),
        report.records as f64 / took.as_secs_f64().max(1e-9),
    );
    if report.records == 0 {
        eprintln!(
            "tether-agent ledger verify: no ledger records in {}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    if report.faults.is_empty() {
        println!("ledger intact: {summary}");
        ExitCode::SUCCESS
    } else {
        for f in &report.faults {
            println!("BROKEN: {f}");
        }
        eprintln!(
            "tether-agent ledger verify: the ledger was tampered with or damaged at {} place(s); first: {}",
            report.faults.len(),
            report.faults[0]
        );
        println!("{summary}");
        ExitCode::FAILURE
    }
}
