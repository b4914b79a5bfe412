//! Wiring: binds nothing itself (sockets come in already bound, so tests use port 0), starts the
//! tunnel listener, the northbound API and the ops endpoint, and runs the drain on shutdown:
//! stop accepting → `GoAway` to every agent → wait up to `drain_timeout` for them to move →
//! close what is left with `SHUTDOWN` → wait for QUIC to go idle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_runtime::CancellationToken;
use tether_runtime::ops::{self, Readiness};
use tokio::task::JoinHandle;

use crate::commands::store::EmbeddedStore;
use crate::commands::{Commands, CommandsApi};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::identity::callers::CallersApi;
use crate::identity::db::IdentityDb;
use crate::identity::endpoint::EnrollEndpoint;
use crate::identity::enrollment::{ENROLL_ALPN, Enrollment, EnrollmentApi, signing_ca};
use crate::northbound::agents::AgentsApi;
use crate::northbound::auth::{Authenticated, Authenticator};
use crate::northbound::listener::{LiveConnections, MarkAuthenticated};
use crate::relay::Relay;
use crate::relay::grpc::RelayService;
use crate::relay::tcp::StreamsApi;
use crate::tls::TlsMaterial;
use crate::tunnel::admission::Admission;
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
        let udp = std::net::UdpSocket::bind(addr)
            .map_err(io(format!("binding tunnel listener udp/{addr}")))?;
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
            northbound: std::net::TcpListener::bind(northbound)
                .map_err(io(format!("binding northbound listener tcp/{northbound}")))?,
            ops: std::net::TcpListener::bind(ops)
                .map_err(io(format!("binding ops listener tcp/{ops}")))?,
        })
    }
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

    let state = State::open(&cfg)?;
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
    let commands_stop = CancellationToken::new();
    let commands = start_commands(&cfg, &state, registry.clone(), commands_stop.clone())?;

    let stop_accepting = CancellationToken::new();
    let close_sessions = CancellationToken::new();
    let tunnel_tcp = start_tunnel(
        &cfg,
        Tunnel {
            endpoint: endpoint.clone(),
            tcp: sockets.tunnel_tcp,
            tls: tunnel_tls,
            registry: registry.clone(),
            identity: &state.identity,
            enrollment: enrollment.clone(),
            enroll_endpoint,
        },
        stop_accepting.clone(),
        close_sessions.clone(),
    )?;
    let northbound = start_northbound(
        &cfg,
        &material,
        sockets.northbound,
        Features {
            registry: registry.clone(),
            commands: commands.clone(),
            identity: state.identity.clone(),
            enrollment,
        },
        close_sessions.clone(),
    )?;
    let ops_stop = CancellationToken::new();
    let ops_task = start_ops(sockets.ops, &registry, &stop_accepting, ops_stop.clone())?;

    tracing::info!(tunnel = %tunnel_addr, tunnel_tcp = tunnel_tcp.is_some(),
        northbound = %northbound_addr, ops = %ops_addr,
        trust_domain = %cfg.trust_domain, "gateway listening");

    let task = tokio::spawn(stop_on(
        shutdown,
        Running {
            dir_lock: state.dir_lock,
            registry: registry.clone(),
            drain_timeout: cfg.tunnel.drain_timeout,
            stop_accepting,
            commands_stop,
            close_sessions,
            northbound,
            endpoint,
            ops_stop,
            ops_task,
        },
    ));
    Ok(GatewayHandle {
        registry,
        tunnel_addr,
        northbound_addr,
        ops_addr,
        commands,
        task,
    })
}

// === The steps of start ===

/// The gateway's durable state: its `data_dir`, held by this process, and the identity store.
struct State {
    data_dir: PathBuf,
    /// Held until the gateway has stopped.
    dir_lock: crate::data_dir::DirLock,
    identity: Arc<IdentityDb>,
}

impl State {
    /// Prepares `data_dir` (private to the gateway's user before any store creates a file in
    /// it), takes it for this process and opens the identity store.
    fn open(cfg: &GatewayConfig) -> Result<State, GatewayError> {
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
        // Revocations and enrollment tokens, beside the command store.
        let identity =
            IdentityDb::open(&data_dir).map_err(|source| GatewayError::IdentityStore {
                data_dir: data_dir.clone(),
                source,
            })?;
        Ok(State {
            data_dir,
            dir_lock,
            identity: Arc::new(identity),
        })
    }
}

/// Opens the command store in `data_dir` and starts the commands feature on it (recovering
/// unfinished commands into their lanes).
fn start_commands(
    cfg: &GatewayConfig,
    state: &State,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> Result<Arc<Commands>, GatewayError> {
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
    identity: &'a Arc<IdentityDb>,
    enrollment: Arc<Enrollment>,
    enroll_endpoint: Arc<EnrollEndpoint>,
}

/// Starts accepting agents on QUIC and, when its socket is there, on TCP (where enrollment is
/// served too) until `stop_accepting`; sessions close when `close_sessions` is cancelled.
/// Returns the TCP listener's address.
fn start_tunnel(
    cfg: &GatewayConfig,
    t: Tunnel<'_>,
    stop_accepting: CancellationToken,
    close_sessions: CancellationToken,
) -> Result<Option<SocketAddr>, GatewayError> {
    let mut ctx = TunnelContext::new(cfg, t.registry, close_sessions);
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
        return Ok(None);
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
    Ok(Some(addr))
}

/// What the northbound API serves.
struct Features {
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    identity: Arc<IdentityDb>,
    enrollment: Arc<Enrollment>,
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
    let tls = crate::northbound::listener::tls_config(material, auth.accepts_tokens())?;
    socket
        .set_nonblocking(true)
        .map_err(io("northbound socket".into()))?;
    let listener =
        tokio::net::TcpListener::from_std(socket).map_err(io("northbound socket".into()))?;
    let live_callers = Arc::new(LiveConnections::default());
    let routes = northbound_routes(cfg, f, live_callers.clone(), close_sessions.clone());
    // Every request, the relay's included, is authenticated before it is routed; one that
    // gets through tells its connection so.
    Ok(tokio::spawn(crate::northbound::listener::serve(
        listener,
        tls,
        Authenticated::new(auth, MarkAuthenticated(routes)),
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
    close_sessions: CancellationToken,
) -> tonic::service::Routes {
    let api = AgentsApi::new(f.registry.clone(), close_sessions).with_identity(f.identity.clone());
    let relay = Relay::with_stream_limit(f.registry, cfg.limits.streams_per_agent);
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
    let mut routes = routes.routes();
    // Everything that is not tether.v1.* is relayed to an agent.
    let axum_router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = axum_router.fallback_service(RelayService(relay));
    routes.prepare()
}

/// Serves ops HTTP (`/metrics`, `/healthz`, `/readyz`: ready until the gateway stops
/// accepting) on `socket` until `stop`.
fn start_ops(
    socket: std::net::TcpListener,
    registry: &Arc<Registry>,
    stop_accepting: &CancellationToken,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, GatewayError> {
    socket
        .set_nonblocking(true)
        .map_err(io("ops socket".into()))?;
    let listener = tokio::net::TcpListener::from_std(socket).map_err(io("ops socket".into()))?;
    let (registry, draining) = (registry.clone(), stop_accepting.clone());
    let readiness: ops::ReadinessFn = Arc::new(move || Readiness {
        ready: !draining.is_cancelled(),
        detail: serde_json::json!({
            "draining": draining.is_cancelled(),
            "sessions": registry.session_count(),
        }),
    });
    Ok(tokio::spawn(ops::serve(listener, readiness, stop)))
}

/// What a running gateway stops, in order.
struct Running {
    /// `data_dir` stays this process's until the gateway has stopped.
    dir_lock: crate::data_dir::DirLock,
    registry: Arc<Registry>,
    drain_timeout: Duration,
    stop_accepting: CancellationToken,
    commands_stop: CancellationToken,
    close_sessions: CancellationToken,
    northbound: JoinHandle<()>,
    endpoint: quinn::Endpoint,
    ops_stop: CancellationToken,
    ops_task: JoinHandle<()>,
}

/// Waits for `shutdown`, then: stop accepting → `GoAway` to every agent → wait up to
/// `drain_timeout` for them to move → close what is left with `SHUTDOWN` → wait for QUIC to
/// go idle (3 s at most) → stop ops.
async fn stop_on(shutdown: CancellationToken, r: Running) {
    let _dir_lock = r.dir_lock;
    shutdown.cancelled().await;
    r.stop_accepting.cancel();
    drain(&r.registry, r.drain_timeout).await;
    r.commands_stop.cancel();
    r.close_sessions.cancel();
    let _ = r.northbound.await;
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
    tracing::info!("gateway stopped");
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

/// Sends `GoAway` to every session and waits for them to leave, up to `timeout`.
async fn drain(registry: &Registry, timeout: Duration) {
    let (live, mut feed) = registry.subscribe();
    if live.is_empty() || timeout.is_zero() {
        return;
    }
    tracing::info!(
        sessions = live.len(),
        ?timeout,
        "draining: asking agents to reconnect elsewhere"
    );
    registry.go_away_all("gateway shutting down", timeout);
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
