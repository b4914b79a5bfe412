//! Wiring: binds nothing itself (sockets come in already bound, so tests use port 0), starts the
//! tunnel listener, the northbound API and the ops endpoint, and runs the drain on shutdown:
//! stop accepting → `GoAway` to every agent → wait up to `drain_timeout` for them to move →
//! close what is left with `SHUTDOWN` → wait for QUIC to go idle.

use std::net::SocketAddr;
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
use crate::identity::enrollment::{ENROLL_ALPN, EnrollEndpoint, Enrollment, EnrollmentApi};
use crate::northbound::agents::AgentsApi;
use crate::northbound::auth::{Authenticated, Authenticator};
use crate::northbound::listener::{LiveConnections, MarkAuthenticated};
use crate::relay::grpc::{Relay, RelayService};
use crate::relay::tcp::StreamsApi;
use crate::tunnel::accept::{self as tunnel, TunnelContext};
use crate::tunnel::admission::Admission;
use crate::tunnel::registry::Registry;

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

    let data_dir = cfg.data_dir.clone().ok_or_else(|| {
        GatewayError::Config(tether_runtime::config::ConfigError::invalid(
            "data_dir",
            "must be set",
        ))
    })?;
    // Private to the gateway's user before any store creates a file in it.
    crate::data_dir::prepare(&data_dir).map_err(io(format!("data_dir {}", data_dir.display())))?;
    crate::data_dir::tighten_files(&data_dir, crate::data_dir::Found::AtStart)
        .map_err(io(format!("data_dir {}", data_dir.display())))?;
    // One gateway per data_dir: a second one would find the stores locked, or worse.
    let dir_lock = crate::data_dir::lock(&data_dir).map_err(GatewayError::DataDir)?;
    // Revocations and enrollment tokens, beside the command store.
    let identity = Arc::new(IdentityDb::open(&data_dir).map_err(|e| {
        GatewayError::IdentityStore(format!("data_dir {}: {e}", data_dir.display()))
    })?);
    let tunnel_tls = tunnel::tls_config_with(&cfg, identity.revocations())?;
    let enrollment = Arc::new(Enrollment::new(&cfg, identity.clone())?);
    let enroll_endpoint = Arc::new(EnrollEndpoint::new(&cfg, enrollment.clone())?);
    let server_config = tunnel::server_config(&cfg, tunnel_tls.clone())?;
    let endpoint = tunnel_endpoint(&cfg, sockets.tunnel, server_config)
        .map_err(io(format!("starting QUIC on udp/{tunnel_addr}")))?;

    let store = EmbeddedStore::open(&data_dir)
        .map_err(|e| GatewayError::Store(format!("data_dir {}: {e}", data_dir.display())))?;
    crate::data_dir::tighten_files(&data_dir, crate::data_dir::Found::JustCreated)
        .map_err(io(format!("data_dir {}", data_dir.display())))?;
    let registry = Arc::new(Registry::default());
    let commands_stop = CancellationToken::new();
    let commands = Commands::start(
        Arc::new(store),
        registry.clone(),
        cfg.commands.clone(),
        commands_stop.clone(),
    )
    .map_err(|e| GatewayError::Store(format!("data_dir {}: {e}", data_dir.display())))?;
    commands.set_pending_limit(cfg.limits.pending_commands_per_agent);
    commands.set_watch_limit(cfg.limits.command_watches_per_caller);
    let stop_accepting = CancellationToken::new();
    let close_sessions = CancellationToken::new();
    let mut tunnel_ctx = TunnelContext::new(&cfg, registry.clone(), close_sessions.clone());
    tunnel_ctx.session.limits.max_control_frame = cfg.limits.max_control_message as usize;
    let admission = Admission::new(&cfg.limits);
    let ctx = Arc::new(
        tunnel_ctx
            .with_revocations(identity.revocations())
            .with_renewal(enrollment.clone())
            // Agents enroll on the tunnel's TCP port: the egress rule they already have.
            .with_side_door(
                ENROLL_ALPN,
                Arc::new(move |start, remote| {
                    Box::pin(enroll_endpoint.clone().serve(start, remote))
                }),
            ),
    );
    tokio::spawn(tunnel::accept_loop(
        endpoint.clone(),
        ctx.clone(),
        admission.clone(),
        stop_accepting.clone(),
    ));
    let tunnel_tcp = match sockets.tunnel_tcp {
        Some(l) => {
            l.set_nonblocking(true)
                .map_err(io("tunnel TCP socket".into()))?;
            let l = tokio::net::TcpListener::from_std(l).map_err(io("tunnel TCP socket".into()))?;
            let addr = l.local_addr().map_err(io("tunnel TCP socket".into()))?;
            tokio::spawn(tunnel::accept_tcp_loop(
                l,
                tunnel_tls,
                ctx,
                admission,
                stop_accepting.clone(),
            ));
            Some(addr)
        }
        None => {
            if enrollment.enabled() {
                tracing::warn!(
                    "enrollment is served on the tunnel's TCP port, and tunnel.tcp_fallback is off: agents cannot enroll"
                );
            }
            None
        }
    };

    // Northbound gRPC over TLS: a client certificate, or a bearer token when [auth] names keys.
    let auth = Authenticator::with_revocations(&cfg, identity.caller_revocations())?;
    if !auth.scoping() {
        tracing::warn!(
            "northbound tenant scoping is off: every control-plane caller may act for every tenant (add an [auth] section with [[auth.callers]] to scope callers)"
        );
    }
    tokio::spawn(auth.clone().run_refresh(close_sessions.clone()));
    let tls = northbound_tls(&cfg, auth.accepts_tokens())?;
    sockets
        .northbound
        .set_nonblocking(true)
        .map_err(io("northbound socket".into()))?;
    let nb_listener = tokio::net::TcpListener::from_std(sockets.northbound)
        .map_err(io("northbound socket".into()))?;
    let api =
        AgentsApi::new(registry.clone(), close_sessions.clone()).with_identity(identity.clone());
    let relay = Relay::with_stream_limit(registry.clone(), cfg.limits.streams_per_agent);
    let max_message = usize::try_from(cfg.limits.max_message_size).unwrap_or(usize::MAX);
    let mut routes = tonic::service::Routes::builder();
    routes.add_service(
        api.into_service()
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );
    routes.add_service(CommandsApi::new(commands.clone()).into_service(cfg.commands.max_payload));
    routes.add_service(
        StreamsApi::new(relay.clone())
            .into_service()
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );
    routes.add_service(EnrollmentApi::into_northbound_service(
        enrollment.clone(),
        cfg.trust_domain.clone(),
    ));
    let live_callers = Arc::new(LiveConnections::default());
    routes.add_service(CallersApi::new(identity.clone(), live_callers.clone()).into_service());
    let mut routes = routes.routes();
    // Everything that is not tether.v1.* is relayed to an agent.
    let axum_router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = axum_router.fallback_service(RelayService(relay));
    // Every request, the relay's included, is authenticated before it is routed; one that
    // gets through tells its connection so.
    let northbound = tokio::spawn(crate::northbound::listener::serve(
        nb_listener,
        tls,
        Authenticated::new(auth, MarkAuthenticated(routes.prepare())),
        crate::northbound::listener::ListenerLimits {
            handshake_timeout: cfg.limits.northbound_handshake_timeout,
            idle_timeout: cfg.limits.northbound_idle_timeout,
            unauthenticated_timeout: cfg.limits.northbound_unauthenticated_timeout,
            max_header_list_size: cfg.limits.max_header_list_size,
            max_connections: cfg.limits.northbound_connections,
            max_connections_per_address: cfg.limits.northbound_connections_per_address,
        },
        live_callers,
        close_sessions.clone(),
    ));

    // Ops HTTP.
    sockets
        .ops
        .set_nonblocking(true)
        .map_err(io("ops socket".into()))?;
    let ops_listener =
        tokio::net::TcpListener::from_std(sockets.ops).map_err(io("ops socket".into()))?;
    let ready_registry = registry.clone();
    let ready_stop = stop_accepting.clone();
    let readiness: ops::ReadinessFn = Arc::new(move || Readiness {
        ready: !ready_stop.is_cancelled(),
        detail: serde_json::json!({
            "draining": ready_stop.is_cancelled(),
            "sessions": ready_registry.session_count(),
        }),
    });
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops::serve(ops_listener, readiness, ops_stop.clone()));

    tracing::info!(tunnel = %tunnel_addr, tunnel_tcp = tunnel_tcp.is_some(),
        northbound = %northbound_addr, ops = %ops_addr,
        trust_domain = %cfg.trust_domain, "gateway listening");

    let drain_registry = registry.clone();
    let drain_timeout = cfg.tunnel.drain_timeout;
    let task = tokio::spawn(async move {
        // data_dir stays this process's until the gateway has stopped.
        let _dir_lock = dir_lock;
        shutdown.cancelled().await;
        stop_accepting.cancel();
        drain(&drain_registry, drain_timeout).await;
        commands_stop.cancel();
        close_sessions.cancel();
        let _ = northbound.await;
        endpoint.close(
            tunnel_proto::ErrorCode::SHUTDOWN.0.into(),
            b"gateway shutting down",
        );
        if tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("QUIC endpoint did not go idle within 3s; exiting anyway");
        }
        ops_stop.cancel();
        let _ = ops_task.await;
        tracing::info!("gateway stopped");
    });
    Ok(GatewayHandle {
        registry,
        tunnel_addr,
        northbound_addr,
        ops_addr,
        commands,
        task,
    })
}

/// Kernel buffer asked for the tunnel's UDP socket, each way. One socket carries every agent's
/// connection: a reconnect storm (a burst of Initials) or a broadcast (a burst of responses)
/// overflows the default ~208 KiB and the lost datagrams cost a retransmission timeout each
/// (about a second for a handshake). Linux caps it at `net.core.rmem_max`/`wmem_max`.
const TUNNEL_SOCKET_BUFFER: usize = 8 << 20;

/// The file in `data_dir` holding the QUIC stateless-reset key.
const RESET_KEY_FILE: &str = "quic-reset-key";

/// The QUIC endpoint on the tunnel socket: large socket buffers, and a stateless-reset key that
/// survives a restart. With the key kept, a gateway that crashed and came back answers the
/// agents' next packets on their old connections with a stateless reset they recognise
/// (RFC 9000 §10.3), so they reconnect at their next heartbeat instead of waiting out three
/// heartbeat intervals; with a fresh random key (quinn's default) they cannot tell a reset
/// from noise. Resets are sent for every such packet (quinn limits them to one per 20 ms by
/// default, 50/s, far too few for a fleet): a reset is always smaller than the packet that
/// caused it, so this amplifies nothing.
fn tunnel_endpoint(
    cfg: &GatewayConfig,
    socket: std::net::UdpSocket,
    mut server: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    for (what, r) in [
        (
            "receive",
            state.set_recv_buffer_size((&socket).into(), TUNNEL_SOCKET_BUFFER),
        ),
        (
            "send",
            state.set_send_buffer_size((&socket).into(), TUNNEL_SOCKET_BUFFER),
        ),
    ] {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot enlarge the tunnel socket's {what} buffer");
        }
    }
    tracing::debug!(
        recv = state.recv_buffer_size((&socket).into()).unwrap_or(0),
        send = state.send_buffer_size((&socket).into()).unwrap_or(0),
        "tunnel socket buffers"
    );
    let mut endpoint = match &cfg.data_dir {
        Some(dir) => {
            let key = ResetKey::load_or_create(dir)?;
            // Retry tokens sealed with a key derived from the kept one: a token handed out
            // just before a restart is still good after it (a restart storm is when Retry is
            // on), and so are tokens of replicas sharing data_dir's key.
            server.token_key(Arc::new(key.retry_token_key()));
            quinn::EndpointConfig::new(Arc::new(key))
        }
        None => quinn::EndpointConfig::default(),
    };
    // Connection attempts queued before the accept loop decides on them (each answered at once
    // by a refusal, a Retry or a handshake): bounded, so a flood cannot grow the queue.
    server
        .max_incoming(4096)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(16 << 20);
    endpoint.min_reset_interval(Duration::ZERO);
    // Connection ids the restarted process accepts as its own: quinn's default generator signs
    // its ids with a per-process key and drops packets whose id it did not sign, which would
    // silence the reset above.
    endpoint.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new(
        endpoint,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Random 8-byte connection ids (quinn's own random generator is not exported).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// HMAC-SHA256 key for stateless-reset tokens (from the one crypto provider).
struct ResetKey([u8; 32]);

impl ResetKey {
    /// Reads `dir/quic-reset-key`, or creates it (mode 0600) with a random key.
    fn load_or_create(dir: &std::path::Path) -> std::io::Result<ResetKey> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(RESET_KEY_FILE);
        match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&b);
                return Ok(ResetKey(k));
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a 32-byte key: delete it to make a new one",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&key)?;
        f.sync_all()?;
        Ok(ResetKey(key))
    }

    /// The HKDF key quinn seals Retry tokens with, derived from this key (so it persists with
    /// it) for that one purpose.
    fn retry_token_key(&self) -> aws_lc_rs::hkdf::Prk {
        let derived = self.tag(b"tether quic retry token key v1");
        aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]).extract(derived.as_ref())
    }

    fn tag(&self, data: &[u8]) -> rustls::crypto::hmac::Tag {
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("a TLS 1.3 suite")
        };
        suite
            .hkdf_provider
            .hmac_sign(&rustls::crypto::tls13::OkmBlock::new(&self.0), data)
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        let tag = self.tag(data);
        let n = out.len().min(tag.as_ref().len());
        out[..n].copy_from_slice(&tag.as_ref()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let tag = self.tag(data);
        let t = tag.as_ref();
        // Constant time: no early exit on the first differing byte.
        let diff = t
            .iter()
            .zip(signature)
            .fold(t.len() ^ signature.len(), |d, (a, b)| {
                d | usize::from(a ^ b)
            });
        if diff == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// TLS for the northbound listener: the gateway's certificate, client certificates verified
/// against the CA (which identities may call is decided per request), ALPN h2. Required, unless
/// `tokens_accepted`: a caller with a bearer token may come without one (a certificate it does
/// send is still verified).
fn northbound_tls(
    cfg: &GatewayConfig,
    tokens_accepted: bool,
) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let roots = tether_runtime::tls::load_roots(&cfg.tls.ca)?;
    let mut verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots));
    if tokens_accepted {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| GatewayError::Tls(format!("northbound client verifier: {e}")))?;
    let certs = tether_runtime::tls::load_certs("certificate", &cfg.tls.cert)?;
    let key = tether_runtime::tls::load_key(&cfg.tls.key)?;
    let mut tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(format!("northbound certificate: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption, as on the tunnel: a resumed handshake skips the client-certificate
    // verifier, so an expired caller certificate, or one of a CA a rotation removed, would keep
    // working for as long as its session was cached.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(Arc::new(tls))
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

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::crypto::HmacKey;

    #[test]
    fn reset_key_survives_a_restart_and_signs_the_same_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let a = ResetKey::load_or_create(dir.path()).unwrap();
        let b = ResetKey::load_or_create(dir.path()).unwrap();
        let (mut sa, mut sb) = ([0u8; 32], [0u8; 32]);
        a.sign(b"connection id", &mut sa);
        b.sign(b"connection id", &mut sb);
        assert_eq!(sa, sb);
        assert!(b.verify(b"connection id", &sa).is_ok());
        assert!(b.verify(b"another id", &sa).is_err());
        assert!(b.verify(b"connection id", &sa[..16]).is_err());
        // Retry tokens sealed before a restart open after it.
        use quinn::crypto::HandshakeTokenKey;
        let mut token = b"retry token".to_vec();
        a.retry_token_key()
            .aead_from_hkdf(b"nonce")
            .seal(&mut token, b"ad")
            .unwrap();
        let opened = b
            .retry_token_key()
            .aead_from_hkdf(b"nonce")
            .open(&mut token, b"ad")
            .unwrap();
        assert_eq!(opened, b"retry token");
        let mode = std::fs::metadata(dir.path().join(RESET_KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
