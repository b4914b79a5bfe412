//! Tether's data-plane agent.
//!
//! The agent dials **out** to one or more gateways over mutual-TLS QUIC and keeps sessions up
//! (`connections` on distinct replicas behind a single address, else one to each), so the
//! gateway can reach the private network without any inbound port. It listens on nothing but
//! its loopback ops endpoint.
//!
//! # Layout
//! Layers only look down: transport → session → feature → backend; no circle of imports runs
//! through the modules (the leaves [`config`], [`policy`] and [`certs`] import no feature, and
//! [`error`] wraps the errors of the modules below it, which never import it back).
//! - [`dialer`] (transport): QUIC + TLS client, one connected UDP socket per session;
//! - [`proxy`] (transport): HTTP CONNECT through a proxy, for the TCP fallback;
//! - [`identity`]: the agent's certificate and key, from files or a Secrets Manager secret
//!   ([`Identity::load`], the wiring that chooses, is here in `lib.rs`);
//! - [`certs`]: checks on PEM certificates and keys (a leaf);
//! - [`state`] (backend): the `state_dir` file layout and its atomic writes;
//! - [`enroll`] (transport + wiring): enrolling with a bootstrap token for a key made here;
//! - [`renew`] (wiring + session): renewing the certificate over the tunnel at two thirds of
//!   its lifetime, kept in `state_dir`;
//! - [`supervisor`] (session): one per gateway address: backoff, make-before-break on `GoAway`;
//!   each session runs on `tether_runtime::driver`, and how it ended is a [`supervisor::Ended`];
//! - [`placement`] (session): which replicas a supervisor's sessions should be on, as pure
//!   decisions;
//! - [`relay`] (feature): serves gateway-opened streams to the allow-listed upstreams, from a
//!   live allow-list;
//! - [`pause`] (feature): the kill switch (config, control file, `tether-agent pause`);
//! - [`ledger`] (feature + backend): the hash-chained record of every call, stream and
//!   command in `state_dir/ledger`, written off the call's path, and its verification;
//! - [`reload`] (wiring): live reload on SIGHUP and on changes of the config or control file;
//! - [`commands`] (feature): runs delivered commands (handler registry, completed-id record);
//! - [`info`] (feature): the built-in `tether.agent.v1.AgentInfo` service;
//! - [`secrets`] (backend): AWS Secrets Manager reads;
//! - [`policy`]: what the operator lets commands reach (secrets `secret.sync` may read,
//!   environments' egress), a leaf imported by [`config`] and the executors;
//! - [`ecr`] (backend): AWS ECR container repositories;
//! - [`aws`] (backend): what the AWS clients share (configuration, retries, errors);
//! - [`status`]: what `/readyz` and metrics report;
//! - [`config`], [`run`]/[`start`] (wiring).
#![warn(missing_docs)]

pub mod approvals;
pub mod aws;
pub mod certs;
pub mod commands;
pub mod config;
pub mod dialer;
pub mod doctor;
pub mod ecr;
pub mod enroll;
pub mod error;
pub mod executors;
pub mod identity;
pub mod info;
pub mod ledger;
pub mod pause;
pub mod placement;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod renew;
pub mod secrets;
pub mod state;
pub mod status;
pub mod supervisor;

use std::sync::Arc;

use tether_runtime::CancellationToken;
use tokio::task::JoinHandle;
use tunnel_proto::message::Hello;

pub use config::AgentConfig;
pub use error::AgentError;
pub use identity::{Identity, IdentityError};
pub use status::AgentStatus;

/// The agent's software version, sent in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// Live status.
    pub status: Arc<AgentStatus>,
    /// Where the ops endpoint listens, if one was given.
    pub ops_addr: Option<std::net::SocketAddr>,
    /// What can change while it runs: the allow-list, the kill switch, the log level.
    pub control: Arc<reload::Control>,
    task: JoinHandle<()>,
}

impl AgentHandle {
    /// Waits until every supervisor and the renewer have stopped (after shutdown was
    /// cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The sessions an agent process keeps in all, as its `Hello` says: one per gateway address
/// when it has several, else `connections` (the gateway caps that by its live replicas, as
/// `placement::target` does).
fn sessions_wanted(addresses: usize, connections: u32) -> u32 {
    if addresses > 1 {
        addresses as u32
    } else {
        connections.max(1)
    }
}

fn instance_id(cfg: &AgentConfig) -> String {
    cfg.instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| format!("agent-{:08x}", rand::random::<u32>()))
}

/// What this agent offers, announced in `Hello`.
pub const CAPABILITIES: &[&str] = &["relay", "tcp", "commands", tunnel_proto::message::LEAVE];

/// The command kinds an agent runs: the built-ins (`echo`, `sleep`) and the data-plane
/// executors ([`executors::KINDS`]) on the `[kubernetes]`, `[aws]`, `[secrets]`,
/// `[environments]` and `[registry]` config.
pub fn default_handlers(cfg: &AgentConfig) -> Arc<commands::Handlers> {
    let handlers = commands::Handlers::with_builtins();
    executors::register(
        &handlers,
        Arc::new(
            executors::Backends::new(cfg.kubernetes.clone(), cfg.aws.clone())
                .allow_secrets(cfg.secrets.clone())
                .environments(cfg.environments.clone())
                .with_registry(cfg.registry.clone()),
        ),
    );
    Arc::new(handlers)
}

/// Starts the agent: one supervisor per gateway, plus the ops endpoint on `ops` if given.
pub fn start(
    cfg: &AgentConfig,
    ops: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<AgentHandle, AgentError> {
    start_with_handlers(cfg, ops, shutdown, default_handlers(cfg))
}

/// [`start`] with a given command handler registry (embedders add their own kinds to it).
///
/// Reads the identity from files: with `identity.source = "aws-secretsmanager:…"` use [`run`],
/// or [`Identity::load`] then [`start_with_identity`].
pub fn start_with_handlers(
    cfg: &AgentConfig,
    ops: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
    handlers: Arc<commands::Handlers>,
) -> Result<AgentHandle, AgentError> {
    if cfg.identity.source != config::IdentitySource::Files {
        return Err(IdentityError::Source {
            identity_source: cfg.identity.source.to_string(),
            reason: "is fetched asynchronously: start the agent with run(), or with \
                     Identity::load then start_with_identity"
                .into(),
        }
        .into());
    }
    start_with_identity(cfg, Identity::from_files(cfg)?, ops, shutdown, handlers)
}

/// [`start_with_handlers`] with an identity already loaded (from anywhere).
pub fn start_with_identity(
    cfg: &AgentConfig,
    identity: Identity,
    ops: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
    handlers: Arc<commands::Handlers>,
) -> Result<AgentHandle, AgentError> {
    // Install the metrics recorder before anything can record: metrics recorded earlier are lost.
    tether_runtime::ops::metrics_handle();
    let status = Arc::new(AgentStatus::default());
    let agent = identity.agent.clone();
    let (ledger, ledger_writer) = if cfg.ledger.enabled {
        let signer = ledger::Signer::new(&identity.key)?;
        ledger::start(
            &cfg.ledger,
            cfg.state_dir.as_ref().map(|d| d.join(ledger::DIR)),
            signer,
            agent.clone(),
        )?
    } else {
        (ledger::Ledger::disabled(), ledger::Writer::none())
    };
    let pause = Arc::new(pause::PauseSwitch::new(
        cfg.state_dir.as_deref(),
        ledger.clone(),
    ));
    let credentials = Arc::new(renew::Credentials::new(cfg, identity)?);
    let instance_id = instance_id(cfg);
    let capabilities: Vec<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    let info = Arc::new(info::Info {
        agent: agent.clone(),
        version: VERSION.to_owned(),
        capabilities: capabilities.clone(),
        labels: cfg.labels.clone(),
        catalog: Default::default(),
        pause: pause.clone(),
        instance_id: instance_id.clone(),
        started: std::time::Instant::now(),
        status: status.clone(),
    });
    let approvals = Arc::new(approvals::Approvals::new(
        &cfg.approvals.kinds,
        cfg.state_dir.as_deref(),
        ledger.clone(),
    )?);
    let executor = Arc::new(
        commands::Executor::new(handlers, cfg.state_dir.as_deref())?
            .with_control(pause.clone(), ledger.clone())
            .with_approvals(approvals.clone()),
    );
    let telemetry =
        tether_runtime::telemetry::Telemetry::new(&cfg.telemetry, "tether-agent", &instance_id)
            .map_err(|e| {
                AgentError::Config(tether_runtime::config::ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    e.to_string(),
                ))
            })?;
    let services = Arc::new(
        relay::Services::new(cfg, agent, info::service(info.clone()), executor)?
            .with_telemetry(telemetry)
            .with_control(pause.clone(), ledger.clone()),
    );
    *info.catalog.lock().unwrap_or_else(|e| e.into_inner()) = services.catalog();
    let control = Arc::new(reload::Control::new(
        cfg,
        services.clone(),
        pause.clone(),
        approvals.clone(),
        info,
        ledger.clone(),
    ));
    control.apply_pause(cfg);
    control.poll_control_file()?;
    drop(ledger);
    let shared = Arc::new(supervisor::Shared {
        credentials: credentials.clone(),
        services,
        hello: Hello {
            versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
            agent_version: VERSION.to_owned(),
            capabilities,
            labels: cfg.labels.clone(),
            instance_id,
            // Set per dial by the supervisor.
            sessions_held: 0,
            avoid_replicas: Vec::new(),
            // Set per dial by the supervisor, from `pause`.
            paused: false,
            pause_reason: String::new(),
            // Set per dial: what the connection goes through, the allow-list now.
            proxy: 0,
            services: Vec::new(),
            sessions_wanted: sessions_wanted(cfg.gateways.len(), cfg.connections),
            gateway_addresses: cfg.gateways.len() as u32,
        },
        status: status.clone(),
        initial_backoff: cfg.reconnect.initial_backoff,
        max_backoff: cfg.reconnect.max_backoff,
        connect_timeout: cfg.reconnect.connect_timeout,
        mode: cfg.transport.mode,
        quic_retry: cfg.transport.quic_retry,
        connections: cfg.connections as usize,
        pause: pause.subscribe(),
    });
    let mut ops_addr = None;
    if let Some(l) = ops {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| AgentError::Io { what, source }
        };
        ops_addr = Some(l.local_addr().map_err(io("ops socket"))?);
        l.set_nonblocking(true).map_err(io("ops socket"))?;
        let l = tokio::net::TcpListener::from_std(l).map_err(io("ops socket"))?;
        let st = status.clone();
        let p = pause.clone();
        let a = approvals.clone();
        tokio::spawn(tether_runtime::ops::serve_with_actions(
            l,
            Arc::new(move || {
                let mut r = st.readiness();
                if let serde_json::Value::Object(d) = &mut r.detail {
                    let reason = p.reason();
                    d.insert("paused".into(), reason.is_some().into());
                    if let Some(reason) = reason {
                        d.insert("pause_reason".into(), reason.to_string().into());
                        let switches: serde_json::Map<_, _> = p
                            .switches()
                            .into_iter()
                            .map(|(s, r)| (s.as_str().to_owned(), r.into()))
                            .collect();
                        d.insert("pause_switches".into(), switches.into());
                    }
                    let waiting = a.pending();
                    if waiting > 0 {
                        d.insert("awaiting_approval".into(), waiting.into());
                    }
                }
                r
            }),
            Some(ops_actions(pause.clone(), approvals.clone())),
            shutdown.clone(),
        ));
        if let (Some(dir), Some(addr)) = (cfg.state_dir.as_deref(), ops_addr) {
            // Where `tether-agent pause|resume --config` finds an ops endpoint bound to port 0.
            let _ = std::fs::write(dir.join(OPS_ADDR_FILE), addr.to_string());
        }
    }
    let renewer = tokio::spawn(renew::run(credentials, cfg.clone(), shutdown.clone()));
    tokio::spawn(doctor::at_start(
        cfg.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    let sups: Vec<_> = cfg
        .gateways
        .iter()
        .map(|g| {
            tokio::spawn(supervisor::supervise(
                g.clone(),
                cfg.gateways.len() == 1,
                shared.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    drop(shared);
    drop(pause);
    drop(approvals);
    let task = tokio::spawn(async move {
        for s in sups {
            let _ = s.await;
        }
        // A renewal under way finishes (or fails, its session gone) before the agent is done.
        let _ = renewer.await;
        // The ledger's last checkpoint, once every handle is gone (bounded: a handle still
        // held elsewhere must not hold the agent up).
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::task::spawn_blocking(move || ledger_writer.join()),
        )
        .await;
        tracing::info!("agent stopped");
    });
    Ok(AgentHandle {
        status,
        ops_addr,
        control,
        task,
    })
}

/// The file in `state_dir` naming the address the ops endpoint is bound to.
pub const OPS_ADDR_FILE: &str = "ops.addr";

/// What `tether-agent approve|reject` posts to `/approve` and `/reject`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ApprovalDecision {
    /// The command id.
    pub id: String,
    /// Who decides.
    #[serde(default)]
    pub by: String,
    /// A rejection's reason.
    #[serde(default)]
    pub reason: String,
}

/// `POST /approvals` (the waits, as JSON), `/approve` and `/reject` (an [`ApprovalDecision`]).
fn approval_action(
    approvals: &approvals::Approvals,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    if path == "/approvals" {
        let list = approvals.list();
        return Some((
            200,
            serde_json::to_string(&list).unwrap_or_else(|_| "[]".into()),
        ));
    }
    let reject = match path {
        "/approve" => false,
        "/reject" => true,
        _ => return None,
    };
    let d: ApprovalDecision = match serde_json::from_str(body) {
        Ok(d) => d,
        Err(e) => {
            return Some((
                400,
                format!("not a decision ({{\"id\", \"by\", \"reason\"}}): {e}\n"),
            ));
        }
    };
    let reason = reject.then_some(d.reason.as_str());
    Some(match approvals.decide(&d.id, &d.by, reason) {
        Ok(r) if reject => (
            200,
            format!(
                "rejected {} ({}): it ends FAILED with \"{}\" and does not run\n",
                r.id,
                r.kind,
                approvals::rejection(d.reason.trim())
            ),
        ),
        Ok(r) => (
            200,
            format!(
                "approved {} ({}, payload sha256 {}): it runs at its delivery\n",
                r.id, r.kind, r.payload_sha256
            ),
        ),
        Err(e @ approvals::DecideError::NotFound(_)) => (404, format!("{e}\n")),
        Err(e @ approvals::DecideError::Decided { .. }) => (409, format!("{e}\n")),
        Err(e @ approvals::DecideError::NoReason) => (400, format!("{e}\n")),
        Err(e) => (500, format!("{e}\n")),
    })
}

/// `POST /pause` (the body is the reason) and `POST /resume` on the ops endpoint: the
/// `tether-agent pause|resume` switch; and the approvals' actions ([`approval_action`]).
fn ops_actions(
    pause: Arc<pause::PauseSwitch>,
    approvals: Arc<approvals::Approvals>,
) -> tether_runtime::ops::ActionFn {
    Arc::new(move |path, body| match path {
        "/pause" => {
            let reason = body.trim().to_owned();
            Some(match pause.set(pause::Source::Ops, Some(reason)) {
                Ok(_) => (
                    200,
                    format!(
                        "paused: every relayed call and stream is refused (\"{}\"), commands are held at the gateway\n",
                        pause::refusal(&pause.reason().unwrap_or_default())
                    ),
                ),
                Err(e) => (
                    500,
                    format!("not paused: the pause could not be written to state_dir: {e}\n"),
                ),
            })
        }
        "/resume" => Some(match pause.set(pause::Source::Ops, None) {
            Ok(left) if left.is_empty() => (200, "resumed\n".to_owned()),
            Ok(left) => {
                let why: Vec<String> = left
                    .iter()
                    .map(|(s, r)| {
                        format!(
                            "{} (\"{r}\"): turn it off with {}",
                            s.as_str(),
                            s.how_to_resume()
                        )
                    })
                    .collect();
                (409, format!("still paused by: {}\n", why.join("; ")))
            }
            Err(e) => (
                500,
                format!("still paused: the pause could not be removed from state_dir: {e}\n"),
            ),
        }),
        _ => approval_action(&approvals, path, body),
    })
}

/// Runs the agent until `shutdown`: loads its identity from where `identity.source` points
/// (once: a rotated secret is picked up at the next restart), binds the ops listener from
/// config and starts.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_from(cfg, None, shutdown).await
}

/// [`run`], reloading the config from `source` on SIGHUP and when its file changes
/// ([`reload`]).
pub async fn run_from(
    cfg: AgentConfig,
    source: Option<reload::ConfigSource>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // Loading may enroll first, retrying an unreachable gateway: a signal stops that too.
    let identity = tokio::select! {
        i = Identity::load(&cfg) => i?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let ops = std::net::TcpListener::bind(cfg.ops.listen).map_err(|source| AgentError::Io {
        what: format!("binding ops listener tcp/{} (ops.listen)", cfg.ops.listen),
        source,
    })?;
    let handle = start_with_identity(
        &cfg,
        identity,
        Some(ops),
        shutdown.clone(),
        default_handlers(&cfg),
    )?;
    tracing::info!(gateways = ?cfg.gateways, ops = ?handle.ops_addr, "agent started");
    if let Some(source) = source {
        tokio::spawn(reload::watch(handle.control.clone(), source, shutdown));
    }
    handle.wait().await;
    Ok(())
}

/// What `tether-agent --check-config` checks beyond the config's own validation, without
/// touching the network: the identity files `run` would read at start (CA bundle, certificate,
/// key, the agent id in the certificate) and the TLS client built from them. Returns what was
/// checked, in words; an error is what `run` would exit 64 with.
pub fn check_config(cfg: &AgentConfig) -> Result<String, AgentError> {
    match &cfg.identity.source {
        config::IdentitySource::Files => {
            if cfg.enrolled_identity() && !state::identity_files(cfg).0.exists() {
                tether_runtime::tls::load_roots(&cfg.tls.ca)
                    .map_err(|e| AgentError::TlsMaterial(e.for_key("tls.ca", "")))?;
                return Ok(
                    "no enrolled certificate yet: the agent enrolls with `enrollment.token` at start"
                        .into(),
                );
            }
            let identity = Identity::from_files(cfg)?;
            dialer::Dialer::new(cfg, &identity)?;
            let (cert, _) = state::identity_files(cfg);
            Ok(format!(
                "identity {} from {}",
                identity.agent,
                cert.display()
            ))
        }
        other => Ok(format!(
            "identity from {other} (fetched at start; not checked here)"
        )),
    }
}

// === Loading the identity (wiring) ===

impl Identity {
    /// Loads the identity from where `identity.source` points: files (enrolling first when the
    /// identity is an enrolled one and needs it, see [`enroll`]) or a Secrets Manager secret,
    /// whose client is built from `[aws]` (standard credential chain) only when needed.
    pub async fn load(cfg: &AgentConfig) -> Result<Identity, AgentError> {
        match &cfg.identity.source {
            config::IdentitySource::Files => {
                if cfg.enrolled_identity() {
                    // A renewal interrupted by a restart is finished first: it is the newer
                    // identity.
                    if let Some(state) = state::StateDir::of(cfg) {
                        state.recover_renewal().map_err(IdentityError::from)?;
                    }
                    enroll::ensure(cfg).await?;
                }
                Ok(Identity::from_files(cfg)?)
            }
            config::IdentitySource::AwsSecretsManager(_) => {
                Identity::load_with(cfg, &secrets::SecretsManager::new(&cfg.aws).await).await
            }
        }
    }

    /// [`load`](Self::load) with a given Secrets Manager client.
    pub async fn load_with(
        cfg: &AgentConfig,
        secrets: &secrets::SecretsManager,
    ) -> Result<Identity, AgentError> {
        match &cfg.identity.source {
            config::IdentitySource::Files => Ok(Identity::from_files(cfg)?),
            config::IdentitySource::AwsSecretsManager(secret_id) => {
                let value =
                    secrets
                        .get(secret_id)
                        .await
                        .map_err(|error| AgentError::IdentityFetch {
                            identity_source: cfg.identity.source.to_string(),
                            error,
                        })?;
                if let Some(state) = state::StateDir::of(cfg) {
                    state.recover_renewal().map_err(IdentityError::from)?;
                }
                let identity = identity::with_stored(cfg, Identity::from_secret(cfg, &value)?);
                tracing::info!(
                    identity_source = %cfg.identity.source,
                    version_id = %value.version_id,
                    agent = %identity.agent,
                    "agent identity loaded from AWS Secrets Manager"
                );
                Ok(identity)
            }
        }
    }
}
