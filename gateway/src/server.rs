//! Wiring: binds nothing itself (sockets come in already bound, so tests use port 0), starts the
//! tunnel listener, the northbound API and the ops endpoint, and runs the drain on shutdown:
//! not ready, new sessions turned away (`BUSY`) and the replica marked draining → `GoAway` to
//! every agent, naming this replica to avoid → wait up to `drain_timeout` for them to move
//! (make-before-break: each agent opens its new session elsewhere, then leaves this one, which
//! closes once the calls on it are done) → stop accepting and delivering commands → release
//! the command leases → close what is left with `SHUTDOWN` → wait for QUIC to go idle → mark
//! this replica's row expired.
//!
//! With `store.dsn` the gateway is one replica of several (see `cluster`): its identity state
//! is in PostgreSQL, its sessions are recorded there (presence), it follows the other
//! replicas' revocations, its `Agents` API answers for the whole fleet, and `/readyz` says
//! whether it reaches PostgreSQL and is live. With `cluster.peer_cert` it also links to the
//! other replicas and forwards calls for agents whose sessions are elsewhere (`peer`). Those
//! steps are the `cluster_*` functions below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_runtime::CancellationToken;
use tether_runtime::ops::{self, Readiness};
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::cluster::identity::PgIdentity;
use crate::cluster::replica::Liveness;
use crate::commands::store::EmbeddedStore;
use crate::commands::{Commands, CommandsApi};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::identity::callers::CallersApi;
use crate::identity::db::IdentityDb;
use crate::identity::endpoint::EnrollEndpoint;
use crate::identity::enrollment::{ENROLL_ALPN, Enrollment, EnrollmentApi, signing_ca};
use crate::identity::follow::Follower;
use crate::identity::store::IdentityStore;
use crate::northbound::agents::{AgentsApi, Fleet, session_proto};
use crate::northbound::auth::{Authenticated, Authenticator};
use crate::northbound::listener::{LiveConnections, MarkAuthenticated};
use crate::peer::Peers;
use crate::peer::forwarder::Forwarder;
use crate::relay::Relay;
use crate::relay::grpc::RelayService;
use crate::relay::tcp::StreamsApi;
use crate::tls::TlsMaterial;
use crate::tunnel::admission::Admission;
use crate::tunnel::balance::{self, Balance, FleetView};
use crate::tunnel::registry::Registry;
use crate::tunnel::{self, TunnelContext};

/// The gateway's listeners, bound before start.
#[derive(Debug)]
pub struct Sockets {
    /// UDP for QUIC.
    pub tunnel: std::net::UdpSocket,
    /// TCP for the fallback (TLS + HTTP/2), on the same address and port as `tunnel`; `None`
    /// when `tunnel.tcp_fallback` is off.
    pub tunnel_tcp: Option<std::net::TcpListener>,
    /// TCP for northbound gRPC.
    pub northbound: std::net::TcpListener,
    /// TCP for ops HTTP.
    pub ops: std::net::TcpListener,
    /// UDP for the peer links (`cluster.peer_listen`), with replicas and `cluster.peer_cert`;
    /// when `None` there, `start` binds `cluster.peer_listen` itself.
    pub peer: Option<std::net::UdpSocket>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> GatewayError {
    move |source| GatewayError::Io { what, source }
}

/// UDP and TCP on one address and port. With port 0 the UDP socket picks the port and TCP
/// follows; if that TCP port is taken, both are tried again on another.
fn bind_tunnel(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), GatewayError> {
    let mut tries = 0;
    loop {
        let udp = std::net::UdpSocket::bind(addr).map_err(io(format!(
            "binding tunnel listener udp/{addr} (tunnel.listen)"
        )))?;
        let bound = udp.local_addr().map_err(io("tunnel socket".into()))?;
        match std::net::TcpListener::bind(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && tries < 32 => {
                tries += 1;
                tracing::debug!(%bound, error = %e, "TCP port taken; picking another tunnel port");
            }
            Err(e) => {
                return Err(io(format!(
                    "binding tunnel fallback listener tcp/{bound} (set tunnel.tcp_fallback = false to run QUIC only)"
                ))(e));
            }
        }
    }
}

impl Sockets {
    /// Binds the addresses in `cfg`.
    pub fn bind(cfg: &GatewayConfig) -> Result<Sockets, GatewayError> {
        let mut s = Sockets::bind_addrs(cfg.tunnel.listen, cfg.northbound.listen, cfg.ops.listen)?;
        if !cfg.tunnel.tcp_fallback {
            s.tunnel_tcp = None;
        }
        if peer_links_on(cfg) {
            s.peer = Some(bind_peer(cfg.cluster.peer_listen)?);
        }
        Ok(s)
    }

    /// Binds explicit addresses (port 0 picks a free port; the tunnel's TCP listener then takes
    /// the same port number as its UDP socket).
    pub fn bind_addrs(
        tunnel: SocketAddr,
        northbound: SocketAddr,
        ops: SocketAddr,
    ) -> Result<Sockets, GatewayError> {
        let (udp, tcp) = bind_tunnel(tunnel)?;
        Ok(Sockets {
            tunnel: udp,
            tunnel_tcp: Some(tcp),
            northbound: std::net::TcpListener::bind(northbound).map_err(io(format!(
                "binding northbound listener tcp/{northbound} (northbound.listen)"
            )))?,
            ops: std::net::TcpListener::bind(ops)
                .map_err(io(format!("binding ops listener tcp/{ops} (ops.listen)")))?,
            peer: None,
        })
    }
}

/// True when this gateway runs peer links: a replica (`store.dsn`) with `cluster.peer_cert`
/// or `cluster.peer_ca_key`.
fn peer_links_on(cfg: &GatewayConfig) -> bool {
    cfg.store.dsn.is_some() && cfg.cluster.peer_links()
}

fn bind_peer(addr: SocketAddr) -> Result<std::net::UdpSocket, GatewayError> {
    std::net::UdpSocket::bind(addr).map_err(io(format!(
        "binding the peer listener udp/{addr} (cluster.peer_listen)"
    )))
}

/// A running gateway.
#[derive(Debug)]
pub struct GatewayHandle {
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Where agents connect (UDP).
    pub tunnel_addr: SocketAddr,
    /// Where the control plane connects (TCP, TLS).
    pub northbound_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub ops_addr: SocketAddr,
    /// Durable commands.
    pub commands: Arc<Commands>,
    /// This replica's place in the cluster (with `store.dsn`).
    pub cluster: Option<Arc<Cluster>>,
    /// Its links to the other replicas (with `cluster.peer_cert`).
    pub peers: Option<Arc<Peers>>,
    task: JoinHandle<()>,
}

impl GatewayHandle {
    /// Waits until the gateway has shut down (after its shutdown token was cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Checks what `--check-config` checks beyond the config's own validation: the TLS material
/// loads, the tunnel's TLS and QUIC configs build on it, the JWKS file (if any) is usable, and
/// the enrollment CA (if any) is one `tls.ca` holds.
pub fn check_config(cfg: &GatewayConfig) -> Result<(), GatewayError> {
    let material = TlsMaterial::load(&cfg.tls)?;
    let tls = tunnel::tls::tls_config(cfg, &material, Arc::default())?;
    tunnel::tls::server_config(cfg, tls)?;
    Authenticator::new(cfg)?;
    signing_ca(cfg, material.ca_pem())?;
    crate::peer::tls::check(cfg, material.roots())?;
    Ok(())
}

/// Starts the gateway on `sockets`; it runs until `shutdown` is cancelled and then drains.
pub async fn start(
    cfg: GatewayConfig,
    sockets: Sockets,
    shutdown: CancellationToken,
) -> Result<GatewayHandle, GatewayError> {
    tether_runtime::tls::install_crypto_provider();
    // Install the metrics recorder before anything can record: metrics recorded earlier are lost.
    tether_runtime::ops::metrics_handle();
    let tunnel_addr = sockets
        .tunnel
        .local_addr()
        .map_err(io("tunnel socket".into()))?;
    let northbound_addr = sockets
        .northbound
        .local_addr()
        .map_err(io("northbound socket".into()))?;
    let ops_addr = sockets.ops.local_addr().map_err(io("ops socket".into()))?;

    // Bound before the cluster is joined: peers dial this replica where its row says.
    let peer_socket = match (peer_links_on(&cfg), sockets.peer) {
        (true, Some(s)) => Some(s),
        (true, None) => Some(bind_peer(cfg.cluster.peer_listen)?),
        (false, _) => None,
    };
    let peer_addr = match &peer_socket {
        Some(s) => Some(s.local_addr().map_err(io("peer socket".into()))?),
        None => None,
    };
    // Stopped last, once the sessions are gone (their ends are recorded).
    let cluster_stop = CancellationToken::new();
    let cluster = cluster_start(&cfg, peer_addr, cluster_stop.clone()).await?;
    let state = State::open(&cfg, cluster.as_deref()).await?;
    let material = TlsMaterial::load(&cfg.tls)?;
    let tunnel_tls = tunnel::tls::tls_config(&cfg, &material, state.identity.revocations())?;
    let enrollment = Arc::new(Enrollment::new(
        &cfg,
        material.ca_pem(),
        state.identity.clone(),
    )?);
    let enroll_endpoint = Arc::new(EnrollEndpoint::new(&cfg, &material, enrollment.clone())?);
    let server_config = tunnel::tls::server_config(&cfg, tunnel_tls.clone())?;
    let endpoint = tunnel::endpoint::quic_endpoint(&cfg, sockets.tunnel, server_config)
        .map_err(io(format!("starting QUIC on udp/{tunnel_addr}")))?;
    let registry = Arc::new(Registry::default());
    let relay = Relay::with_stream_limit(registry.clone(), cfg.limits.streams_per_agent);
    let telemetry = tether_runtime::telemetry::Telemetry::new(
        &cfg.telemetry,
        "tether-gateway",
        cfg.cluster.replica_id.as_deref().unwrap_or("gateway"),
    )?;
    if telemetry.enabled() {
        let (t, stop) = (telemetry.clone(), shutdown.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            t.shutdown();
        });
    }
    relay.set_telemetry(telemetry);
    let peers = match (&cluster, peer_socket) {
        (Some(c), Some(socket)) => Some(cluster_peers(
            &cfg,
            &material,
            c,
            socket,
            &relay,
            cluster_stop.clone(),
        )?),
        _ => None,
    };
    let live_callers = Arc::new(LiveConnections::default());
    if let Some(c) = &cluster {
        cluster_presence(c, &registry, cluster_stop.clone());
        cluster_follow_identity(c, &state.identity, &registry, &live_callers, &cluster_stop);
    }
    let commands_stop = CancellationToken::new();
    let commands = start_commands(
        &cfg,
        &state,
        cluster.as_ref(),
        registry.clone(),
        commands_stop.clone(),
    )?;

    let stop_accepting = CancellationToken::new();
    let close_sessions = CancellationToken::new();
    let draining = CancellationToken::new();
    // With replicas, sessions are balanced across the fleet under this replica's cluster id.
    let balance = cluster.as_ref().map(|c| {
        Arc::new(Balance::new(
            c.replica.id().to_string(),
            cfg.tunnel.fair_share_margin,
            cfg.limits.new_sessions_per_second,
        ))
    });
    let (tunnel_tcp, balance) = start_tunnel(
        &cfg,
        Tunnel {
            endpoint: endpoint.clone(),
            tcp: sockets.tunnel_tcp,
            tls: tunnel_tls,
            registry: registry.clone(),
            identity: &state.identity,
            enrollment: enrollment.clone(),
            enroll_endpoint,
            balance,
        },
        stop_accepting.clone(),
        close_sessions.clone(),
    )?;
    if let Some(c) = &cluster {
        cluster_balance(c, &balance, &registry, &cfg, cluster_stop.clone());
    }
    let northbound = start_northbound(
        &cfg,
        &material,
        sockets.northbound,
        Features {
            registry: registry.clone(),
            relay,
            commands: commands.clone(),
            identity: state.identity.clone(),
            enrollment,
            fleet: cluster.as_ref().map(|c| Fleet {
                pool: c.pool.clone(),
                feed: c.feed.clone(),
            }),
            live_callers,
        },
        close_sessions.clone(),
    )?;
    let ops_stop = CancellationToken::new();
    let readiness = cluster_readiness(&registry, &draining, cluster.as_deref(), peers.clone());
    let ops_task = start_ops(sockets.ops, readiness, ops_stop.clone())?;

    tracing::info!(tunnel = %tunnel_addr, tunnel_tcp = tunnel_tcp.is_some(),
        northbound = %northbound_addr, ops = %ops_addr,
        peer = peer_addr.map(|a| a.to_string()).unwrap_or_default(),
        trust_domain = %cfg.trust_domain,
        replica = cluster.as_ref().map(|c| c.replica.id().to_string()).unwrap_or_default(),
        "gateway listening");

    let task = tokio::spawn(stop_on(
        shutdown,
        Running {
            dir_lock: state.dir_lock,
            registry: registry.clone(),
            drain_timeout: cfg.tunnel.drain_timeout,
            draining,
            balance,
            stop_accepting,
            commands_stop,
            close_sessions,
            northbound,
            endpoint,
            ops_stop,
            ops_task,
            cluster: cluster.clone(),
            cluster_stop,
        },
    ));
    Ok(GatewayHandle {
        registry,
        tunnel_addr,
        northbound_addr,
        ops_addr,
        commands,
        cluster,
        peers,
        task,
    })
}

// === The steps of start ===

/// The gateway's durable state: its `data_dir`, held by this process, and the identity store
/// (in `data_dir`, or the cluster's PostgreSQL).
struct State {
    data_dir: PathBuf,
    /// Held until the gateway has stopped.
    dir_lock: crate::data_dir::DirLock,
    identity: IdentityStore,
}

impl State {
    /// Prepares `data_dir` (private to the gateway's user before any store creates a file in
    /// it), takes it for this process and opens the identity store: the cluster's when there
    /// is one, else `identity.redb`.
    async fn open(cfg: &GatewayConfig, cluster: Option<&Cluster>) -> Result<State, GatewayError> {
        let data_dir = cfg.data_dir.clone().ok_or_else(|| {
            GatewayError::Config(tether_runtime::config::ConfigError::invalid(
                "data_dir",
                "must be set",
            ))
        })?;
        crate::data_dir::prepare(&data_dir)
            .map_err(io(format!("data_dir {}", data_dir.display())))?;
        crate::data_dir::tighten_files(&data_dir, crate::data_dir::Found::AtStart)
            .map_err(io(format!("data_dir {}", data_dir.display())))?;
        // One gateway per data_dir: a second one would find the stores locked, or worse.
        let dir_lock = crate::data_dir::lock(&data_dir).map_err(GatewayError::DataDir)?;
        let identity =
            match cluster {
                Some(c) => IdentityStore::from(Arc::new(PgIdentity::open(c.pool.clone()).await?)),
                // Revocations and enrollment tokens, beside the command store.
                None => IdentityStore::from(Arc::new(IdentityDb::open(&data_dir).map_err(
                    |source| GatewayError::IdentityStore {
                        data_dir: data_dir.clone(),
                        source,
                    },
                )?)),
            };
        Ok(State {
            data_dir,
            dir_lock,
            identity,
        })
    }
}

/// Starts the commands feature: on PostgreSQL with the other replicas when `cluster` is there,
/// else on the command store in `data_dir` (recovering unfinished commands into their lanes).
fn start_commands(
    cfg: &GatewayConfig,
    state: &State,
    cluster: Option<&Arc<Cluster>>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> Result<Arc<Commands>, GatewayError> {
    if let Some(cluster) = cluster {
        let commands =
            Commands::start_replicated(cluster.clone(), registry, cfg.commands.clone(), stop);
        commands.set_pending_limit(cfg.limits.pending_commands_per_agent);
        commands.set_watch_limit(cfg.limits.command_watches_per_caller);
        return Ok(commands);
    }
    let store_error = |source| GatewayError::Store {
        data_dir: state.data_dir.clone(),
        source,
    };
    let store = EmbeddedStore::open(&state.data_dir).map_err(store_error)?;
    crate::data_dir::tighten_files(&state.data_dir, crate::data_dir::Found::JustCreated)
        .map_err(io(format!("data_dir {}", state.data_dir.display())))?;
    let commands = Commands::start(Arc::new(store), registry, cfg.commands.clone(), stop)
        .map_err(store_error)?;
    commands.set_pending_limit(cfg.limits.pending_commands_per_agent);
    commands.set_watch_limit(cfg.limits.command_watches_per_caller);
    Ok(commands)
}

/// What the tunnel's listeners serve with.
struct Tunnel<'a> {
    endpoint: quinn::Endpoint,
    tcp: Option<std::net::TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    registry: Arc<Registry>,
    identity: &'a IdentityStore,
    enrollment: Arc<Enrollment>,
    enroll_endpoint: Arc<EnrollEndpoint>,
    /// The replica's balance (with replicas); `None`: this process's own.
    balance: Option<Arc<Balance>>,
}

/// Starts accepting agents on QUIC and, when its socket is there, on TCP (where enrollment is
/// served too) until `stop_accepting`; sessions close when `close_sessions` is cancelled.
/// Returns the TCP listener's address and the balance new sessions are decided by.
fn start_tunnel(
    cfg: &GatewayConfig,
    t: Tunnel<'_>,
    stop_accepting: CancellationToken,
    close_sessions: CancellationToken,
) -> Result<(Option<SocketAddr>, Arc<Balance>), GatewayError> {
    let mut ctx = TunnelContext::new(cfg, t.registry, close_sessions);
    if let Some(b) = t.balance {
        ctx = ctx.with_balance(b);
    }
    let balance = ctx.balance.clone();
    ctx.session.limits.max_control_frame = cfg.limits.max_control_message as usize;
    let admission = Admission::new(&cfg.limits);
    let enroll_endpoint = t.enroll_endpoint;
    let ctx = Arc::new(
        ctx.with_revocations(t.identity.revocations())
            .with_renewal(t.enrollment.clone())
            // Agents enroll on the tunnel's TCP port: the egress rule they already have.
            .with_side_door(
                ENROLL_ALPN,
                Arc::new(move |start, remote| {
                    Box::pin(enroll_endpoint.clone().serve(start, remote))
                }),
            ),
    );
    tokio::spawn(tunnel::accept::accept_loop(
        t.endpoint,
        ctx.clone(),
        admission.clone(),
        stop_accepting.clone(),
    ));
    let Some(l) = t.tcp else {
        if t.enrollment.enabled() {
            tracing::warn!(
                "enrollment is served on the tunnel's TCP port, and tunnel.tcp_fallback is off: agents cannot enroll"
            );
        }
        return Ok((None, balance));
    };
    l.set_nonblocking(true)
        .map_err(io("tunnel TCP socket".into()))?;
    let l = tokio::net::TcpListener::from_std(l).map_err(io("tunnel TCP socket".into()))?;
    let addr = l.local_addr().map_err(io("tunnel TCP socket".into()))?;
    tokio::spawn(tunnel::accept::accept_tcp_loop(
        l,
        t.tls,
        ctx,
        admission,
        stop_accepting,
    ));
    Ok((Some(addr), balance))
}

/// What the northbound API serves.
struct Features {
    registry: Arc<Registry>,
    /// Relayed calls and streams (forwarded to other replicas with peer links).
    relay: Arc<Relay>,
    commands: Arc<Commands>,
    identity: IdentityStore,
    enrollment: Arc<Enrollment>,
    /// The whole fleet, with replicas.
    fleet: Option<Fleet>,
    /// Open caller connections (closed when their caller is revoked).
    live_callers: Arc<LiveConnections>,
}

/// Serves the northbound API (TLS with a client certificate, or a bearer token when `[auth]`
/// names keys) on `socket` until `close_sessions`; returns the listener's task.
fn start_northbound(
    cfg: &GatewayConfig,
    material: &TlsMaterial,
    socket: std::net::TcpListener,
    f: Features,
    close_sessions: CancellationToken,
) -> Result<JoinHandle<()>, GatewayError> {
    let auth = Authenticator::with_revocations(cfg, f.identity.caller_revocations())?;
    if !auth.scoping() {
        tracing::warn!(
            "northbound tenant scoping is off: every control-plane caller may act for every tenant (add an [auth] section with [[auth.callers]] to scope callers)"
        );
    }
    tokio::spawn(auth.clone().run_refresh(close_sessions.clone()));
    let tls = crate::northbound::listener::tls_config(material)?;
    socket
        .set_nonblocking(true)
        .map_err(io("northbound socket".into()))?;
    let listener =
        tokio::net::TcpListener::from_std(socket).map_err(io("northbound socket".into()))?;
    let live_callers = f.live_callers.clone();
    let logins = Arc::new(crate::console::login::Logins::new(
        cfg.northbound.console_session_ttl,
    ));
    let relay = f.relay.clone();
    let (routes, agents, commands) = northbound_routes(
        cfg,
        f,
        live_callers.clone(),
        logins.clone(),
        close_sessions.clone(),
    );
    let console = crate::console::router(Arc::new(crate::console::Console {
        agents,
        commands,
        auth: auth.clone(),
        logins,
        relay,
        trust_domain: cfg.trust_domain.clone(),
        shutdown: close_sessions.clone(),
    }));
    // Every API request, the relay's included, is authenticated before it is routed; one that
    // gets through tells its connection so. The console (`/ui/`, not gRPC) resolves its viewer
    // itself, with the same authenticator, and asks the same services.
    Ok(tokio::spawn(crate::northbound::listener::serve(
        listener,
        tls,
        crate::console::WithConsole::new(
            console,
            Authenticated::new(auth, MarkAuthenticated(routes)),
        ),
        crate::northbound::listener::ListenerLimits {
            handshake_timeout: cfg.limits.northbound_handshake_timeout,
            idle_timeout: cfg.limits.northbound_idle_timeout,
            unauthenticated_timeout: cfg.limits.northbound_unauthenticated_timeout,
            max_header_list_size: cfg.limits.max_header_list_size,
            max_connections: cfg.limits.northbound_connections,
            max_connections_per_address: cfg.limits.northbound_connections_per_address,
        },
        live_callers,
        close_sessions,
    )))
}

/// The northbound services by path: `tether.v1.Agents`, `Commands`, `Streams`, `Enrollment`
/// and `Callers`; every other path is relayed to an agent.
fn northbound_routes(
    cfg: &GatewayConfig,
    f: Features,
    live_callers: Arc<LiveConnections>,
    logins: Arc<crate::console::login::Logins>,
    close_sessions: CancellationToken,
) -> (tonic::service::Routes, AgentsApi, CommandsApi) {
    let mut api = AgentsApi::new(f.registry.clone(), close_sessions)
        .with_identity(f.identity.clone())
        .with_watch_limit(cfg.limits.agent_watches_per_caller)
        .with_traffic(f.relay.outcomes().clone());
    if let Some(fleet) = f.fleet {
        api = api.with_fleet(fleet);
    }
    let console_agents = api.clone();
    let console_commands = CommandsApi::new(f.commands.clone());
    let relay = f.relay;
    let max_message = usize::try_from(cfg.limits.max_message_size).unwrap_or(usize::MAX);
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(
        api.into_service()
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );
    routes.add_service(CommandsApi::new(f.commands).into_service(cfg.commands.max_payload));
    routes.add_service(
        StreamsApi::new(relay.clone())
            .into_service()
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );
    routes.add_service(EnrollmentApi::into_northbound_service(
        f.enrollment,
        cfg.trust_domain.clone(),
    ));
    routes.add_service(CallersApi::new(f.identity, live_callers).into_service());
    routes.add_service(crate::console::api::ConsoleApi::new(logins).into_service());
    let mut routes = routes.routes();
    // Everything that is not tether.v1.* is relayed to an agent.
    let axum_router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = axum_router.fallback_service(RelayService(relay));
    (routes.prepare(), console_agents, console_commands)
}

/// Serves ops HTTP (`/metrics`, `/healthz`, `/readyz` as `readiness` says) on `socket` until
/// `stop`.
fn start_ops(
    socket: std::net::TcpListener,
    readiness: ops::ReadinessFn,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, GatewayError> {
    socket
        .set_nonblocking(true)
        .map_err(io("ops socket".into()))?;
    let listener = tokio::net::TcpListener::from_std(socket).map_err(io("ops socket".into()))?;
    Ok(tokio::spawn(ops::serve(listener, readiness, stop)))
}

// === Replicas (`store.dsn`) ===

/// Joins the cluster when `store.dsn` is set: connects (retrying up to
/// `store.connect_timeout`), migrates, registers this replica and starts its heartbeat, the
/// feed reader and the presence writer, all stopped by `stop`. `None` on the embedded store.
async fn cluster_start(
    cfg: &GatewayConfig,
    peer_addr: Option<SocketAddr>,
    stop: CancellationToken,
) -> Result<Option<Arc<Cluster>>, GatewayError> {
    if cfg.store.dsn.is_none() {
        if cfg.cluster.peer_links() {
            tracing::warn!(
                "cluster.peer_cert (or peer_ca_key) is set but store.dsn is not: a single gateway has no peers, the peer links stay off"
            );
        }
        return Ok(None);
    }
    let advertise = match peer_addr {
        Some(bound) => cfg.cluster.advertise_for(bound),
        None => {
            tracing::warn!(
                "peer links are off (neither cluster.peer_cert and cluster.peer_key nor \
                 cluster.peer_ca_key are set): calls that land on this replica reach only the \
                 agents connected to it; issue a peer certificate with `tether-gateway pki \
                 issue-gateway`, or set cluster.peer_ca_key, to forward them"
            );
            cfg.cluster.advertise()
        }
    };
    let cluster = Cluster::start(&cfg.store, &cfg.cluster, &advertise, stop).await?;
    Ok(Some(cluster))
}

/// Starts the peer links on `socket`: links to the other replicas, the holder's side of
/// forwarded streams (opened on `relay`'s local sessions), and the relay forwarding what it
/// has no session for. They stop at `stop`.
fn cluster_peers(
    cfg: &GatewayConfig,
    material: &TlsMaterial,
    cluster: &Arc<Cluster>,
    socket: std::net::UdpSocket,
    relay: &Arc<Relay>,
    stop: CancellationToken,
) -> Result<Arc<Peers>, GatewayError> {
    let peers = Peers::start(
        cfg,
        cluster.replica.id().epoch,
        socket,
        material.roots(),
        cluster.pool.clone(),
        relay.clone(),
        stop.clone(),
    )?;
    relay.set_forwarder(Forwarder::start(
        peers.clone(),
        cluster.pool.clone(),
        &cluster.feed,
        stop,
    ));
    Ok(peers)
}

/// Records this replica's sessions in the cluster's presence as they register and end, and when
/// an agent's pause changes (in batches, nothing per heartbeat). When this replica comes back after its liveness expired
/// (PostgreSQL unreachable for longer than `cluster.liveness_timeout`), its sessions were
/// invisible to the fleet, and may have been collected since: they are written again.
fn cluster_presence(cluster: &Arc<Cluster>, registry: &Arc<Registry>, stop: CancellationToken) {
    let presence = cluster.presence.clone();
    registry.set_observer(Arc::new(move |ev| match ev {
        crate::tunnel::registry::RegistryEvent::Connected(s) => presence.up(session_proto(s)),
        crate::tunnel::registry::RegistryEvent::Disconnected {
            session, reason, ..
        } => presence.down(session_proto(session), reason.clone()),
    }));
    let updates = cluster.presence.clone();
    registry.set_updater(Arc::new(move |s| updates.update(session_proto(s))));
    let (presence, registry) = (cluster.presence.clone(), registry.clone());
    let mut liveness = cluster.replica.watch();
    tokio::spawn(async move {
        let mut was_live = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = liveness.changed() => if r.is_err() { return },
            }
            let live = *liveness.borrow_and_update() == Liveness::Live;
            if live && !was_live {
                let sessions = registry.sessions();
                tracing::info!(
                    sessions = sessions.len(),
                    "live again: recording this replica's sessions in the cluster again"
                );
                for s in &sessions {
                    presence.up(session_proto(s));
                }
            }
            was_live = live;
        }
    });
}

/// How often a replica writes its count of sessions and reads the others'.
const BALANCE_EVERY: Duration = Duration::from_secs(1);

/// Keeps this replica's share of the fleet's sessions known, until `stop`: about once a second
/// (jittered) it writes its own count when it changed and reads the other live replicas'
/// ([`Balance::set_fleet`]); and every `tunnel.rebalance_interval` it asks agents to move when
/// it holds more than its share ([`balance::rebalance`]).
fn cluster_balance(
    cluster: &Arc<Cluster>,
    balance: &Arc<Balance>,
    registry: &Arc<Registry>,
    cfg: &GatewayConfig,
    stop: CancellationToken,
) {
    let (cluster, b, registry_) = (cluster.clone(), balance.clone(), registry.clone());
    let stop_ = stop.clone();
    tokio::spawn(async move {
        let mut written: Option<u64> = None;
        loop {
            let me = cluster.replica.id();
            let local = registry_.session_count() as u64;
            if written != Some(local) {
                match crate::cluster::balance::record(&cluster.pool, me, local).await {
                    Ok(()) => written = Some(local),
                    Err(e) => {
                        tracing::debug!(error = %e, "writing this replica's session count failed")
                    }
                }
            }
            match crate::cluster::balance::others(&cluster.pool, me).await {
                Ok((others, others_sessions)) => b.set_fleet(
                    FleetView {
                        others,
                        others_sessions,
                    },
                    std::time::Instant::now(),
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the other replicas' sessions failed")
                }
            }
            let wait = BALANCE_EVERY.mul_f64(0.8 + rand::random::<f64>() * 0.4);
            tokio::select! {
                _ = stop_.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    tokio::spawn(balance::rebalance(
        balance.clone(),
        registry.clone(),
        cfg.tunnel.rebalance_interval,
        stop,
    ));
}

/// Applies the revocations every replica makes (read from the cluster feed) to this
/// replica's lists, sessions and caller connections, until `stop`.
fn cluster_follow_identity(
    cluster: &Arc<Cluster>,
    identity: &IdentityStore,
    registry: &Arc<Registry>,
    live_callers: &Arc<LiveConnections>,
    stop: &CancellationToken,
) {
    let IdentityStore::Postgres(pg) = identity else {
        return;
    };
    let follower = Follower {
        identity: pg.clone(),
        registry: registry.clone(),
        callers: live_callers.clone(),
    };
    tokio::spawn(follower.run(cluster.feed.clone(), stop.clone()));
}

/// What `/readyz` answers: ready until the gateway starts draining; with replicas, also only
/// while this replica reaches PostgreSQL, is live (not fenced) and not draining, with the
/// reason when not.
fn cluster_readiness(
    registry: &Arc<Registry>,
    draining: &CancellationToken,
    cluster: Option<&Cluster>,
    peers: Option<Arc<Peers>>,
) -> ops::ReadinessFn {
    let (registry, draining) = (registry.clone(), draining.clone());
    let replica = cluster.map(|c| c.replica.clone());
    // After a start, not ready until the peer links to every live replica are up (a call
    // forwarded before would fail), for at most PEER_WARMUP; from then on the links are
    // informational: a replica cut off from a peer still serves its own agents.
    let started = std::time::Instant::now();
    let warm = Arc::new(std::sync::atomic::AtomicBool::new(peers.is_none()));
    Arc::new(move || {
        let mut detail = serde_json::json!({
            "draining": draining.is_cancelled(),
            "sessions": registry.session_count(),
        });
        let Some(replica) = &replica else {
            return Readiness {
                ready: !draining.is_cancelled(),
                detail,
            };
        };
        let store_error = replica.store_error();
        let reason = if draining.is_cancelled() || replica.is_draining() {
            Some("draining: this replica is shutting down".to_owned())
        } else if replica.liveness() == Liveness::Superseded {
            Some(
                "superseded: another gateway process registered the same cluster.replica_id; \
                 give every replica its own"
                    .to_owned(),
            )
        } else if !replica.is_live() {
            Some(format!(
                "fenced: this replica could not renew its liveness in PostgreSQL within \
                 cluster.liveness_timeout ({}); it delivers no commands until PostgreSQL is back",
                store_error
                    .as_deref()
                    .unwrap_or("no renewal succeeded in time")
            ))
        } else if let Some(e) = &store_error {
            Some(format!("PostgreSQL unreachable: {e}"))
        } else {
            peer_warmup(peers.as_deref(), &warm, started)
        };
        if let Some(d) = detail.as_object_mut() {
            d.insert("replica".into(), replica.id().to_string().into());
            d.insert("live".into(), replica.is_live().into());
            d.insert(
                "postgres".into(),
                if store_error.is_some() {
                    "unreachable"
                } else {
                    "ok"
                }
                .into(),
            );
            if let Some(r) = &reason {
                d.insert("reason".into(), r.clone().into());
            }
            // Informational: a replica without links still serves its own agents.
            if let Some(peers) = &peers {
                let links: Vec<serde_json::Value> = peers
                    .status()
                    .into_iter()
                    .map(|p| {
                        serde_json::json!({
                            "peer": p.peer,
                            "up": p.up,
                            "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1e3),
                        })
                    })
                    .collect();
                d.insert("peers".into(), links.into());
            }
        }
        Readiness {
            ready: reason.is_none(),
            detail,
        }
    })
}

/// The longest a started replica waits for its peer links before it is ready anyway.
const PEER_WARMUP: Duration = Duration::from_secs(10);

/// Why a replica that just started is not ready yet: live peers it has no link to. `None`
/// once every one is linked, or `PEER_WARMUP` after `started`, and from then on.
fn peer_warmup(
    peers: Option<&Peers>,
    warm: &std::sync::atomic::AtomicBool,
    started: std::time::Instant,
) -> Option<String> {
    use std::sync::atomic::Ordering;
    let peers = peers?;
    if warm.load(Ordering::Relaxed) {
        return None;
    }
    let missing = match peers.unlinked() {
        Some(m) if m.is_empty() => {
            warm.store(true, Ordering::Relaxed);
            return None;
        }
        Some(m) => m.join(", "),
        None => "the other replicas (not read from PostgreSQL yet)".to_owned(),
    };
    if started.elapsed() >= PEER_WARMUP {
        tracing::warn!(peers = %missing, "ready without peer links to every replica after {PEER_WARMUP:?}: calls for agents only they hold fail here until the links are up; check cluster.advertise and that peer_listen's UDP port is open between replicas");
        warm.store(true, Ordering::Relaxed);
        return None;
    }
    Some(format!(
        "starting: no peer link yet to {missing}; ready when they are up (at most {}s after start), so that calls landing here can be forwarded",
        PEER_WARMUP.as_secs()
    ))
}

/// What a running gateway stops, in order.
struct Running {
    /// `data_dir` stays this process's until the gateway has stopped.
    dir_lock: crate::data_dir::DirLock,
    registry: Arc<Registry>,
    drain_timeout: Duration,
    /// Cancelled first: not ready.
    draining: CancellationToken,
    /// New sessions turned away while draining; names this replica in `GoAway`.
    balance: Arc<Balance>,
    stop_accepting: CancellationToken,
    commands_stop: CancellationToken,
    close_sessions: CancellationToken,
    northbound: JoinHandle<()>,
    endpoint: quinn::Endpoint,
    ops_stop: CancellationToken,
    ops_task: JoinHandle<()>,
    /// This replica, with `store.dsn`: marked draining first, stopped last.
    cluster: Option<Arc<Cluster>>,
    cluster_stop: CancellationToken,
}

/// Waits for `shutdown`, then drains (see the module docs): not ready and turning new sessions
/// away → marked draining in the cluster → `GoAway` to every agent → wait up to
/// `drain_timeout` for them to move → stop accepting and delivering commands → release the
/// command leases → close what is left with `SHUTDOWN` → let the calls open on the northbound
/// finish (until the drain's deadline, at least [`CALLS_GRACE`]) → wait for QUIC to go idle
/// (3 s at most) → stop ops and the peer links → mark the replica's row expired.
async fn stop_on(shutdown: CancellationToken, r: Running) {
    let _dir_lock = r.dir_lock;
    shutdown.cancelled().await;
    let started = std::time::Instant::now();
    r.draining.cancel();
    r.balance.set_draining();
    if let Some(c) = &r.cluster {
        // Peers stop choosing this replica; PostgreSQL may be gone, so bounded.
        match tokio::time::timeout(Duration::from_secs(2), c.replica.set_draining()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not mark this replica draining"),
            Err(_) => tracing::warn!("marking this replica draining timed out"),
        }
    }
    let drain_deadline = tokio::time::Instant::now() + r.drain_timeout;
    drain(&r.registry, &r.balance, r.drain_timeout).await;
    r.stop_accepting.cancel();
    r.commands_stop.cancel();
    if let Some(c) = &r.cluster {
        // Hand the command leases over now (the replicas holding the agents' sessions take
        // them at once), not when this replica's liveness expires.
        match tokio::time::timeout(Duration::from_secs(3), c.release_leases()).await {
            Ok(Ok(n)) => tracing::info!(leases = n, "released this replica's command leases"),
            Ok(Err(e)) => tracing::warn!(error = %e,
                "releasing the command leases failed; they lapse with this replica's liveness"),
            Err(_) => tracing::warn!(
                "releasing the command leases timed out; they lapse with this replica's liveness"
            ),
        }
    }
    r.close_sessions.cancel();
    // Calls still open on the northbound finish before the peer links and the process go: a
    // call forwarded to another replica holds no session here, so the drain did not wait for
    // it, and closing the links under it would fail it (`connection lost`). Until the drain's
    // deadline, and at least CALLS_GRACE.
    let calls_by = drain_deadline.max(tokio::time::Instant::now() + CALLS_GRACE);
    if tokio::time::timeout_at(calls_by, r.northbound)
        .await
        .is_err()
    {
        tracing::warn!(
            "northbound calls still open at the end of the drain; closing them with the process"
        );
    }
    r.endpoint.close(
        tunnel_proto::ErrorCode::SHUTDOWN.0.into(),
        b"gateway shutting down",
    );
    if tokio::time::timeout(Duration::from_secs(3), r.endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("QUIC endpoint did not go idle within 3s; exiting anyway");
    }
    r.ops_stop.cancel();
    let _ = r.ops_task.await;
    r.cluster_stop.cancel();
    if let Some(c) = &r.cluster
        && let Err(e) = tokio::time::timeout(Duration::from_secs(2), c.expire())
            .await
            .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %e, "could not mark this replica's row expired; it lapses by itself");
    }
    tracing::info!(took = ?started.elapsed(), "gateway stopped");
}

// === File descriptors ===

/// Raises the open-file limit as far as the hard limit allows, and warns when it leaves too
/// few descriptors for the northbound connections allowed plus agents on the TCP fallback.
pub fn check_open_files_limit(cfg: &GatewayConfig) {
    /// Descriptors beside the northbound's: listeners, stores, and agents on TCP.
    const RESERVE: u64 = 1024;
    match raise_open_files_limit() {
        Ok(limit) => {
            let wanted = u64::from(cfg.limits.northbound_connections) + RESERVE;
            if limit < wanted {
                tracing::warn!(
                    limit,
                    wanted,
                    "the open-file limit is below limits.northbound_connections plus {RESERVE} for listeners and agents on TCP: raise it (ulimit -n, systemd LimitNOFILE) or lower limits.northbound_connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// Raises the soft limit on open files to the hard limit (Linux starts most processes at a
/// soft 1,024 whatever the hard limit allows) and returns the limit now in force. Every
/// connection on every listener costs one: with too few, `northbound_connections` cannot be
/// reached before the process runs out and agents on the TCP fallback are shut out.
fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// How long a stopping gateway waits at least, after its drain, for the calls open on its
/// northbound to finish (see [`stop_on`]).
const CALLS_GRACE: Duration = Duration::from_secs(2);

/// Sends `GoAway` to every session, naming this replica to avoid, and waits for them to
/// leave, up to `timeout`. Agents are asked to spread their new sessions over half of it.
async fn drain(registry: &Registry, balance: &Balance, timeout: Duration) {
    let (live, mut feed) = registry.subscribe();
    if live.is_empty() || timeout.is_zero() {
        return;
    }
    tracing::info!(
        sessions = live.len(),
        ?timeout,
        "draining: asking agents to reconnect elsewhere"
    );
    metrics::counter!("tether_gateway_go_aways_total", "kind" => "drain")
        .increment(live.len() as u64);
    registry.send_go_away_all(&tunnel_proto::message::GoAway {
        reason: "gateway shutting down".into(),
        reconnect_within_ms: (timeout / 2).as_millis() as u64,
        avoid_replica: balance.replica_id().to_owned(),
        kind: tunnel_proto::message::GoAwayKind::Drain as i32,
    });
    let deadline = tokio::time::Instant::now() + timeout;
    while registry.session_count() > 0 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(left = registry.session_count(), "drain timeout reached; closing remaining sessions");
                return;
            }
            r = feed.recv() => if r.is_err() && !matches!(r, Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) {
                return;
            }
        }
    }
    tracing::info!("drained: every agent moved away");
}
