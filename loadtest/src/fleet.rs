//! Fleet simulator: many agents in one process, each with its own identity and its own QUIC
//! connection to the gateway, ramped up at a set rate.
//!
//! Two kinds of agent:
//! - **lean** (the default): the agent's own feature code on a lighter session driver. Each agent
//!   has its own certificate, `rustls` config and QUIC connection; the control stream runs
//!   `tunnel_proto::AgentSession` (the agent's state machine: `Hello`, heartbeats at the interval
//!   the gateway announces, RTT, close codes); gateway-opened streams are served by
//!   `tether_agent::relay::serve` with the agent's own service map and command executor
//!   (`tether_agent::commands`, the built-in `echo` and `sleep` kinds). What it leaves out of the
//!   real supervisor: the TCP fallback and its re-probing, and make-before-break on `GoAway`:
//!   a lean agent asked to go leaves the session at once when another of its sessions is up
//!   (its `GoAway`, new streams refused with `REFUSED_STREAM`, which the gateway sends again
//!   elsewhere; the gateway closes the session once its streams are done), then dials another
//!   replica for it; with no other session up it stays until the gateway closes it. A lean
//!   agent can be switched off and on again ([`Fleet::stop_agent`], [`Fleet::start_agent`]):
//!   it closes its sessions as a stopping agent does, then dials at once when switched on.
//!   Reconnects use the same full-jitter [`Backoff`] with the agent's defaults. Each agent keeps `connections`
//!   sessions on distinct replicas, as a real agent behind one load-balanced address does:
//!   agent `i`'s `k`-th session first dials replica `(i + k) mod N`, and after it ends or a
//!   dial fails it dials the next replica none of the agent's other sessions is on, as an agent
//!   behind a load balancer lands elsewhere when it redials. Agents share a few UDP sockets
//!   (`--sockets`) instead of one connected socket each. The relay's upstream is an in-process
//!   echo service (`tether.demo.v1.Echo`), the agent's default service.
//! - **full**: `tether_agent::start_with_identity`, a complete agent per identity (supervisor,
//!   one UDP socket and QUIC endpoint per session, the 100 ms tick), with a real TCP echo
//!   upstream on loopback. Heavier: for checking that the lean fleet behaves like real agents.
//!   With several replicas, agent `i` is configured with replicas `i mod N`, `i + 1 mod N`, …
//!   (`connections` of them) and keeps one session to each.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use tether_agent::commands::{Executor, Handlers};
use tether_agent::relay::{BoxError, GrpcService, LinkStats, Services};
use tether_runtime::CancellationToken;
use tether_runtime::transport::Link;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tunnel_proto::message::Hello;
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};
use tunnel_proto::{Backoff, ErrorCode};

use crate::LoadError;
use crate::identities::AgentIdentity;

/// Which agent implementation the fleet runs; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetMode {
    /// The agent's session state machine, relay and command executor on a light driver.
    Lean,
    /// Complete `tether_agent` instances.
    Full,
}

/// How the fleet dials and behaves.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    /// The gateway replicas' QUIC addresses (one for a lone gateway).
    pub gateways: Vec<SocketAddr>,
    /// TLS name the gateway's certificate must carry.
    pub server_name: String,
    /// Lean or full agents.
    pub mode: FleetMode,
    /// Agents started per second during the ramp.
    pub ramp_rate: f64,
    /// UDP sockets the lean agents share.
    pub sockets: usize,
    /// Most handshakes in flight at once across the fleet (0: no limit, as with real agents).
    pub max_handshakes: usize,
    /// Reconnect backoff ceiling of the first attempt (full jitter).
    pub initial_backoff: Duration,
    /// Reconnect backoff cap.
    pub max_backoff: Duration,
    /// Time allowed for one dial (handshake and `Welcome`).
    pub connect_timeout: Duration,
    /// Sessions each agent keeps, on distinct replicas (1 to the number of replicas).
    pub connections: usize,
}

/// Failed dials whose reason is kept.
pub const FAILURES_KEPT: usize = 1000;

/// What happened in the fleet, with times, for the storm's figures.
#[derive(Debug, Default)]
pub struct EventLog {
    /// Sessions established.
    pub ups: Vec<Instant>,
    /// Sessions that ended.
    pub downs: Vec<Instant>,
    /// A session slot back up after it went down: when it went down, and how long it took.
    pub gaps: Vec<(Instant, Duration)>,
    /// Reconnect delays chosen (when chosen, how long).
    pub delays: Vec<(Instant, Duration)>,
    /// Dials that failed (when, why); the last [`FAILURES_KEPT`].
    pub failures: std::collections::VecDeque<(Instant, String)>,
}

/// Where one of an agent's sessions is: the replica it holds it on (or dials next) and whether
/// it is up. Agent `i`'s sessions are places `i * connections ..` of [`Shared::places`].
#[derive(Debug, Default)]
struct Place {
    replica: AtomicUsize,
    up: std::sync::atomic::AtomicBool,
    /// When its last session ended (the agent noticed), until the next one is up.
    down_at: Mutex<Option<Instant>>,
    /// When its last session was established (the agent read the `Welcome`).
    up_at: Mutex<Option<Instant>>,
}

struct Shared {
    settings: FleetSettings,
    places: Vec<Place>,
    /// Sessions established now (all agents, all their sessions).
    sessions_up: AtomicUsize,
    started: AtomicUsize,
    sessions: AtomicU64,
    connect_failures: AtomicU64,
    /// Sessions left on a `GoAway` (another of the agent's sessions being up).
    leaves: AtomicU64,
    log: Mutex<EventLog>,
    handshakes: Option<Arc<Semaphore>>,
    stop: CancellationToken,
    /// Per lean agent: whether it is on ([`Fleet::stop_agent`], [`Fleet::start_agent`]). An
    /// agent switched off closes its sessions (`SHUTDOWN`) and dials again only once on.
    on: Vec<tokio::sync::watch::Sender<bool>>,
}

impl Shared {
    /// Sessions each agent keeps.
    fn per_agent(&self) -> usize {
        self.settings
            .connections
            .clamp(1, self.settings.gateways.len().max(1))
    }

    /// Agent `i`'s sessions (lean fleet).
    fn agent_places(&self, i: usize) -> &[Place] {
        let per = self.per_agent();
        self.places.get(i * per..(i + 1) * per).unwrap_or(&[])
    }

    fn log(&self) -> std::sync::MutexGuard<'_, EventLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    full: Arc<Mutex<Vec<tether_agent::AgentHandle>>>,
    total: usize,
    ramp: Option<tokio::task::JoinHandle<()>>,
    endpoints: Vec<quinn::Endpoint>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// The in-process echo upstream every lean agent serves as its default service.
fn echo_service() -> GrpcService {
    let svc = tether_api::demo::v1::echo_server::EchoServer::new(
        tether_gateway::tools::demo::EchoService::default(),
    );
    GrpcService::new(ServiceExt::<http::Request<tonic::body::Body>>::map_err(
        svc,
        |e: std::convert::Infallible| -> BoxError { match e {} },
    ))
}

/// A UDP socket for lean agents, with buffers as large as the system allows: one socket
/// carries thousands of connections.
fn client_endpoint(gateway: SocketAddr) -> Result<quinn::Endpoint, LoadError> {
    let local: SocketAddr = if gateway.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io = |e: std::io::Error| LoadError::Fleet(format!("fleet UDP socket: {e}"));
    let socket = std::net::UdpSocket::bind(local).map_err(io)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(io)?;
    let _ = state.set_recv_buffer_size((&socket).into(), 8 << 20);
    let _ = state.set_send_buffer_size((&socket).into(), 8 << 20);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io)
}

/// The agent dialer's QUIC transport settings (`tether_agent::dialer`).
fn agent_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        Duration::from_secs(120)
            .try_into()
            .expect("120s is a valid idle timeout"),
    ));
    Arc::new(t)
}

impl Fleet {
    /// Starts the ramp: agents are started at `settings.ramp_rate` per second in the background.
    pub fn start(
        settings: FleetSettings,
        identities: Vec<AgentIdentity>,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Fleet, LoadError> {
        let total = identities.len();
        let endpoints = match settings.mode {
            FleetMode::Lean => (0..settings.sockets.max(1))
                .map(|_| client_endpoint(settings.gateways[0]))
                .collect::<Result<Vec<_>, _>>()?,
            FleetMode::Full => Vec::new(),
        };
        let replicas = settings.gateways.len().max(1);
        let per = settings.connections.clamp(1, replicas);
        // Agent i's k-th session starts on replica i + k: distinct replicas, spread round robin.
        let places = (0..total * per)
            .map(|j| Place {
                replica: AtomicUsize::new((j / per + j % per) % replicas),
                up: Default::default(),
                down_at: Default::default(),
                up_at: Default::default(),
            })
            .collect();
        let on = match settings.mode {
            FleetMode::Lean => (0..total)
                .map(|_| tokio::sync::watch::Sender::new(true))
                .collect(),
            FleetMode::Full => Vec::new(),
        };
        let shared = Arc::new(Shared {
            places,
            handshakes: (settings.max_handshakes > 0)
                .then(|| Arc::new(Semaphore::new(settings.max_handshakes))),
            settings,
            sessions_up: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            sessions: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            log: Mutex::new(EventLog::default()),
            stop: CancellationToken::new(),
            on,
        });
        let full = Arc::new(Mutex::new(Vec::new()));
        let ramp = tokio::spawn(ramp(
            shared.clone(),
            identities,
            roots,
            endpoints.clone(),
            full.clone(),
        ));
        Ok(Fleet {
            shared,
            full,
            total,
            ramp: Some(ramp),
            endpoints,
        })
    }

    /// Agents in the fleet.
    pub fn total(&self) -> usize {
        self.total
    }

    /// A cheap handle for reading the connected count, in all and per replica, from another
    /// task.
    pub fn counter(&self) -> impl Fn() -> crate::procstat::Placement + Send + Sync + 'static {
        let shared = self.shared.clone();
        let full = self.full.clone();
        move || {
            let mut by = vec![0; shared.settings.gateways.len().max(1)];
            for r in holders(&shared, &full).into_iter().flatten() {
                by[r] += 1;
            }
            (by.iter().sum(), by)
        }
    }

    /// The replicas agent `i` holds a session on now (a full agent: those it was given, while
    /// it is connected).
    pub fn held(&self, i: usize) -> Vec<usize> {
        let n = self.shared.settings.gateways.len().max(1);
        match self.shared.settings.mode {
            FleetMode::Lean => self
                .shared
                .agent_places(i)
                .iter()
                .filter(|p| p.up.load(Ordering::Relaxed))
                .map(|p| p.replica.load(Ordering::Relaxed))
                .collect(),
            FleetMode::Full => {
                let full = self.full.lock().unwrap_or_else(|e| e.into_inner());
                match full.get(i) {
                    Some(h) if h.status.connected() => {
                        (0..self.shared.per_agent()).map(|k| (i + k) % n).collect()
                    }
                    _ => Vec::new(),
                }
            }
        }
    }

    /// The replica agent `i` was last placed on, up or not (its home before it first dialed).
    pub fn last_replica(&self, i: usize) -> usize {
        let n = self.shared.settings.gateways.len().max(1);
        match self.shared.settings.mode {
            FleetMode::Lean => self
                .shared
                .agent_places(i)
                .first()
                .map_or(i % n, |p| p.replica.load(Ordering::Relaxed)),
            FleetMode::Full => i % n,
        }
    }

    /// Sessions the fleet keeps when every agent holds all of its own.
    pub fn sessions_wanted(&self) -> usize {
        self.total * self.shared.per_agent()
    }

    /// Sessions left on a `GoAway` so far (lean agents).
    pub fn sessions_left(&self) -> u64 {
        self.shared.leaves.load(Ordering::Relaxed)
    }

    /// Sessions established now.
    pub fn sessions_up(&self) -> usize {
        match self.shared.settings.mode {
            FleetMode::Lean => self.shared.sessions_up.load(Ordering::Relaxed),
            FleetMode::Full => self
                .full
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|h| h.status.sessions().len())
                .sum(),
        }
    }

    /// Agents with an established session now.
    pub fn connected(&self) -> usize {
        connected(&self.shared, &self.full)
    }

    /// Agents started so far.
    pub fn started(&self) -> usize {
        self.shared.started.load(Ordering::Relaxed)
    }

    /// Sessions established so far (reconnects included).
    pub fn sessions_total(&self) -> u64 {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    /// Dials that failed so far.
    pub fn connect_failures(&self) -> u64 {
        self.shared.connect_failures.load(Ordering::Relaxed)
    }

    /// Runs `f` on the event log.
    pub fn with_log<T>(&self, f: impl FnOnce(&EventLog) -> T) -> T {
        f(&self.shared.log())
    }

    /// Reconnect delays chosen by full agents so far (their status keeps the last 1,024 each).
    pub fn full_agent_delays(&self) -> Vec<Vec<Duration>> {
        self.full
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|h| h.status.reconnect_delays())
            .collect()
    }

    /// Switches lean agent `i` off: its sessions close (`SHUTDOWN`, as an agent that stops)
    /// and it does not dial again until [`start_agent`](Self::start_agent). Full agents cannot
    /// be switched (an error).
    pub fn stop_agent(&self, i: usize) -> Result<(), LoadError> {
        self.switch(i, false)
    }

    /// Switches lean agent `i` on again: it dials at once.
    pub fn start_agent(&self, i: usize) -> Result<(), LoadError> {
        self.switch(i, true)
    }

    fn switch(&self, i: usize, on: bool) -> Result<(), LoadError> {
        let s = self.shared.on.get(i).ok_or_else(|| {
            LoadError::Usage(format!(
                "agent {i} cannot be stopped or started: only lean agents can, and there are {}",
                self.shared.on.len()
            ))
        })?;
        s.send_replace(on);
        Ok(())
    }

    /// When lean agent `i`'s latest session was established (the agent read the gateway's
    /// `Welcome`), if ever.
    pub fn last_up(&self, i: usize) -> Option<Instant> {
        self.shared
            .agent_places(i)
            .iter()
            .filter_map(|p| *p.up_at.lock().unwrap_or_else(|e| e.into_inner()))
            .max()
    }

    /// Waits until `n` agents are connected or `timeout` passes; true if reached.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.connected() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Closes every session (`SHUTDOWN`) and waits briefly for the closes to go out.
    pub async fn stop(mut self) {
        self.shared.stop.cancel();
        if let Some(r) = self.ramp.take() {
            let _ = r.await;
        }
        let handles = std::mem::take(&mut *self.full.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h.wait()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.sessions_up.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
    }
}

/// The replica of each lean agent's session (each full agent's first), `None` when it is not
/// up.
fn holders(shared: &Shared, full: &Mutex<Vec<tether_agent::AgentHandle>>) -> Vec<Option<usize>> {
    let n = shared.settings.gateways.len().max(1);
    match shared.settings.mode {
        FleetMode::Lean => shared
            .places
            .iter()
            .map(|p| {
                p.up.load(Ordering::Relaxed)
                    .then(|| p.replica.load(Ordering::Relaxed))
            })
            .collect(),
        FleetMode::Full => full
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
            .map(|(i, h)| h.status.connected().then_some(i % n))
            .collect(),
    }
}

fn connected(shared: &Shared, full: &Mutex<Vec<tether_agent::AgentHandle>>) -> usize {
    match shared.settings.mode {
        FleetMode::Lean => {
            let per = shared.per_agent();
            shared
                .places
                .chunks(per)
                .filter(|c| c.iter().any(|p| p.up.load(Ordering::Relaxed)))
                .count()
        }
        FleetMode::Full => full
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|h| h.status.connected())
            .count(),
    }
}

async fn ramp(
    shared: Arc<Shared>,
    identities: Vec<AgentIdentity>,
    roots: Arc<rustls::RootCertStore>,
    endpoints: Vec<quinn::Endpoint>,
    full: Arc<Mutex<Vec<tether_agent::AgentHandle>>>,
) {
    let handlers = Arc::new(Handlers::with_builtins());
    let echo = echo_service();
    let transport = agent_transport();
    // Full agents need a real upstream to dial.
    let upstream = match shared.settings.mode {
        FleetMode::Full => match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => {
                let addr = l.local_addr().expect("bound address");
                tokio::spawn(tether_gateway::tools::demo::serve(
                    l,
                    tether_gateway::tools::demo::EchoService::default(),
                    shared.stop.clone(),
                ));
                Some(format!("http://{addr}"))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot bind the echo upstream");
                return;
            }
        },
        FleetMode::Lean => None,
    };
    // Full agent i is given replicas i, i + 1, … (`connections` of them): one session to each.
    let (n, per) = (shared.settings.gateways.len(), shared.per_agent());
    let templates: Vec<tether_agent::AgentConfig> = (0..n.max(1))
        .map(|i| {
            let gateways: Vec<SocketAddr> = (0..per)
                .filter_map(|k| shared.settings.gateways.get((i + k) % n.max(1)).copied())
                .collect();
            agent_config(&shared.settings, &gateways, upstream.as_deref())
        })
        .collect();
    let rate = shared.settings.ramp_rate.max(0.001);
    let start = tokio::time::Instant::now();
    for (i, identity) in identities.into_iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep_until(at) => {}
        }
        let started = match shared.settings.mode {
            FleetMode::Lean => start_lean(
                &shared,
                i,
                identity,
                &roots,
                &endpoints[i % endpoints.len()],
                &transport,
                &templates[0],
                &echo,
                &handlers,
            ),
            FleetMode::Full => start_full(
                &shared,
                identity,
                &roots,
                &templates[i % templates.len()],
                &handlers,
                &full,
            ),
        };
        match started {
            Ok(()) => {
                shared.started.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot start a simulated agent"),
        }
    }
}

/// The config every agent of the fleet shares (full agents: their whole config; lean ones:
/// the service map and default service).
fn agent_config(
    s: &FleetSettings,
    gateways: &[SocketAddr],
    upstream: Option<&str>,
) -> tether_agent::AgentConfig {
    let gw = gateways
        .iter()
        .map(|g| format!("\"{g}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "gateways = [{gw}]\nserver_name = \"{name}\"\ndefault_service = \"{default}\"\n\
         [transport]\nmode = \"quic\"\n\
         [reconnect]\ninitial_backoff = \"{ib}\"\nmax_backoff = \"{mb}\"\nconnect_timeout = \"{ct}\"\n",
        name = s.server_name,
        default = if upstream.is_some() {
            "echo"
        } else {
            tether_agent::relay::BUILTIN
        },
        ib = humantime::format_duration(s.initial_backoff),
        mb = humantime::format_duration(s.max_backoff),
        ct = humantime::format_duration(s.connect_timeout),
    );
    let mut cfg: tether_agent::AgentConfig = toml::from_str(&text).expect("fleet agent config");
    if let Some(u) = upstream {
        cfg.services.insert(
            "echo".into(),
            tether_agent::config::ServiceConfig {
                address: u.to_owned(),
                kind: tether_agent::config::ServiceKind::Grpc,
                ca: None,
                server_name: None,
            },
        );
    }
    cfg
}

fn start_full(
    shared: &Arc<Shared>,
    identity: AgentIdentity,
    roots: &rustls::RootCertStore,
    template: &tether_agent::AgentConfig,
    handlers: &Arc<Handlers>,
    full: &Mutex<Vec<tether_agent::AgentHandle>>,
) -> Result<(), LoadError> {
    let mut cfg = template.clone();
    cfg.instance_id = Some(identity.id.to_string());
    let id = tether_agent::Identity {
        agent: identity.id.to_string(),
        certs: identity.certs,
        key: identity.key,
        roots: roots.clone(),
    };
    let h = tether_agent::start_with_identity(
        &cfg,
        id,
        None,
        shared.stop.child_token(),
        handlers.clone(),
    )
    .map_err(|e| LoadError::Fleet(e.to_string()))?;
    full.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    Ok(())
}

/// One lean agent, from its identity.
struct LeanAgent {
    client: quinn::ClientConfig,
    services: Arc<Services>,
    hello: Hello,
}

#[allow(clippy::too_many_arguments)]
fn start_lean(
    shared: &Arc<Shared>,
    index: usize,
    identity: AgentIdentity,
    roots: &Arc<rustls::RootCertStore>,
    endpoint: &quinn::Endpoint,
    transport: &Arc<quinn::TransportConfig>,
    template: &tether_agent::AgentConfig,
    echo: &GrpcService,
    handlers: &Arc<Handlers>,
) -> Result<(), LoadError> {
    let name = identity.id.to_string();
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(identity.certs, identity.key)
        .map_err(|e| LoadError::Fleet(format!("{name}: certificate: {e}")))?;
    tls.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| LoadError::Fleet(format!("{name}: QUIC TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport.clone());
    let executor = Executor::new(handlers.clone(), None)
        .map_err(|e| LoadError::Fleet(format!("{name}: executor: {e}")))?;
    let services = Services::new(template, name.clone(), echo.clone(), Arc::new(executor))
        .map_err(|e| LoadError::Fleet(format!("{name}: services: {e}")))?;
    let agent = LeanAgent {
        client,
        services: Arc::new(services),
        hello: Hello {
            versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
            // The agent's own version, as a real agent of this release announces it (a name
            // that is no semantic version is an unsupported skew: every agent degraded).
            agent_version: tether_agent::VERSION.to_owned(),
            capabilities: vec![
                "relay".into(),
                "commands".into(),
                tunnel_proto::message::LEAVE.into(),
            ],
            labels: Default::default(),
            instance_id: name,
            ..Default::default()
        },
    };
    let agent = Arc::new(agent);
    let per = shared.per_agent();
    for k in 0..per {
        tokio::spawn(run_lean(
            agent.clone(),
            (index, index * per + k),
            endpoint.clone(),
            shared.clone(),
        ));
    }
    Ok(())
}

/// Keeps one lean agent's session up until the fleet stops.
/// One session of lean agent `agent` (place `slot`), dialed again whenever it ends.
async fn run_lean(
    agent: Arc<LeanAgent>,
    (index, slot): (usize, usize),
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
) {
    let s = &shared.settings;
    let place = &shared.places[slot];
    let mut backoff = Backoff::new(s.initial_backoff, s.max_backoff);
    let mut first = true;
    let mut on = shared.on[index].subscribe();
    loop {
        // Switched off: no dial until switched on again.
        if !*on.borrow_and_update() {
            tokio::select! {
                r = on.wait_for(|on| *on) => if r.is_err() { return },
                _ = shared.stop.cancelled() => return,
            }
            backoff.reset();
        }
        if !first && s.gateways.len() > 1 {
            // Redialing: lands on the next replica, as through a load balancer, but never on
            // one where the agent's other sessions are (a real agent names those in its
            // `Hello`, and the gateway turns the dial away).
            let n = s.gateways.len();
            let siblings: Vec<usize> = shared
                .agent_places(index)
                .iter()
                .filter(|p| !std::ptr::eq(*p, place))
                .map(|p| p.replica.load(Ordering::Relaxed))
                .collect();
            let mut next = place.replica.load(Ordering::Relaxed);
            for _ in 0..n {
                next = (next + 1) % n;
                if !siblings.contains(&next) {
                    break;
                }
            }
            place.replica.store(next, Ordering::Relaxed);
        }
        first = false;
        let gateway = s.gateways[place.replica.load(Ordering::Relaxed)];
        if shared.stop.is_cancelled() {
            return;
        }
        let permit = match &shared.handshakes {
            Some(sem) => tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                _ = shared.stop.cancelled() => return,
            },
            None => None,
        };
        let dial = async {
            let connecting = endpoint
                .connect_with(agent.client.clone(), gateway, &s.server_name)
                .map_err(|e| e.to_string())?;
            let conn = connecting
                .await
                .map_err(|e| tether_agent::dialer::describe(&e))?;
            let link = Link::Quic(conn);
            let control = link.open().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((link, control))
        };
        let dialed = tokio::select! {
            r = tokio::time::timeout(s.connect_timeout, dial) => match r {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", s.connect_timeout)),
            },
            _ = shared.stop.cancelled() => return,
        };
        let outcome = match dialed {
            Ok((link, control)) => {
                let established = session(
                    &agent,
                    &shared,
                    (index, place),
                    link,
                    control,
                    permit,
                    on.clone(),
                )
                .await;
                if established {
                    backoff.reset();
                }
                established
            }
            Err(why) => {
                drop(permit);
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                let mut log = shared.log();
                if log.failures.len() >= FAILURES_KEPT {
                    log.failures.pop_front();
                }
                log.failures.push_back((Instant::now(), why));
                false
            }
        };
        let _ = outcome;
        if shared.stop.is_cancelled() {
            return;
        }
        if !*on.borrow() {
            // Switched off: the top of the loop waits to be switched on, then dials at once.
            continue;
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        shared.log().delays.push((Instant::now(), delay));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Runs one session on `link` to its end; true if it was established.
async fn session(
    agent: &LeanAgent,
    shared: &Shared,
    (index, place): (usize, &Place),
    link: Link,
    (mut send, mut recv): (
        tether_runtime::transport::SendStream,
        tether_runtime::transport::RecvStream,
    ),
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
    mut on: tokio::sync::watch::Receiver<bool>,
) -> bool {
    // Streams the gateway opens (relayed calls, commands, probes); ends with the connection.
    let stats = Arc::new(LinkStats::default());
    tokio::spawn(tether_agent::relay::serve(
        link.clone(),
        agent.services.clone(),
        stats.clone(),
    ));
    let mut session = AgentSession::new(
        AgentSessionConfig::new(agent.hello.clone()),
        std::time::Instant::now(),
    );
    let mut established = false;
    let mut stopping = false;
    let mut buf = vec![0u8; 2048];
    let ended = loop {
        let mut write_failed = false;
        while let Some(bytes) = session.poll_transmit() {
            if send.write_all(&bytes).await.is_err() {
                write_failed = true;
                break;
            }
        }
        if write_failed {
            break "control stream write failed".to_owned();
        }
        let mut closed = None;
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Established(_) => {
                    established = true;
                    place.up.store(true, Ordering::Relaxed);
                    permit.take();
                    shared.sessions_up.fetch_add(1, Ordering::Relaxed);
                    shared.sessions.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    *place.up_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                    let down_at = place
                        .down_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let mut log = shared.log();
                    log.ups.push(now);
                    if let Some(d) = down_at {
                        log.gaps.push((d, now - d));
                    }
                }
                AgentEvent::Closed(info) => closed = Some(info),
                // Asked to go (a drain, a rebalance): while another of the agent's sessions is
                // up, leave this one as the agent does once its replacement is up: refuse new
                // streams (the gateway sends them again elsewhere) and let the gateway close it
                // when the streams on it are done; then this slot dials another replica.
                AgentEvent::GoAway(_) => {
                    let other_up = shared
                        .agent_places(index)
                        .iter()
                        .any(|p| !std::ptr::eq(p, place) && p.up.load(Ordering::Relaxed));
                    if other_up && session.leave("moving to another replica") {
                        stats.refuse_new_streams();
                        shared.leaves.fetch_add(1, Ordering::Relaxed);
                    }
                }
                AgentEvent::Rtt(_) | AgentEvent::Renewed(_) | AgentEvent::LiveReplicas(_) => {}
            }
        }
        if let Some(info) = closed {
            if !info.by_peer {
                let _ = send.finish();
            }
            link.close(info.code, info.reason.as_bytes());
            break format!("{} {}", info.code, info.reason);
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => session.handle_input(&buf[..n], std::time::Instant::now()),
                Ok(None) => session.handle_eof(std::time::Instant::now()),
                Err(e) => break e.to_string(),
            },
            _ = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(std::time::Instant::now()),
            _ = shared.stop.cancelled(), if !stopping => {
                stopping = true;
                session.close(ErrorCode::SHUTDOWN, "load test over");
            }
            r = on.wait_for(|on| !*on), if !stopping => {
                drop(r);
                stopping = true;
                session.close(ErrorCode::SHUTDOWN, "agent stopped by the load test");
            }
        }
    };
    tracing::debug!(agent = %agent.hello.instance_id, reason = %ended, "session ended");
    if established {
        place.up.store(false, Ordering::Relaxed);
        shared.sessions_up.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        *place.down_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        shared.log().downs.push(now);
    }
    established
}
