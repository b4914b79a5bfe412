//! Transport + session layers: the listeners agents dial (QUIC on UDP, and TLS + HTTP/2 on TCP,
//! same port, for networks that block UDP), and the driver that runs one
//! `tunnel_proto::GatewaySession` per connection, whatever its transport.
//!
//! The driver owns the control stream: it feeds bytes and time into the sans-IO session, writes
//! what the session wants written, registers the session when `Hello` is accepted, and closes
//! the connection with the session's close code when it ends. Beside it, a probe opens a stream
//! every `probe_interval` and expects the agent's answer within `probe_timeout`: a session whose
//! connection looks alive but whose streams do not work is closed (`UNRESPONSIVE`). A bad peer
//! ends only its own connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use tether_runtime::CancellationToken;
use tether_runtime::accept::Acceptor;
use tether_runtime::logging::LogThrottle;
use tether_runtime::stream::{FramedRecv, StreamError, send_msg};
use tether_runtime::tls;
use tether_runtime::transport::{H2Link, Link, RecvStream, SendStream};
use tunnel_proto::message::{Close, StreamHeader, StreamKind};
use tunnel_proto::session::{GatewayEvent, GatewaySession, GatewaySessionConfig};
use tunnel_proto::{ALPN, ErrorCode, Message, SpiffeId};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::identity::revocation::{CertFacts, RevocationList};
use crate::tunnel::admission::{
    Admission, Admit, AgentSessions, HandshakeSlot, SessionPermit, count_idle_timeout,
    count_rejection,
};
use crate::tunnel::registry::{NewSession, Registry, SessionCommand, SessionInfo};
use crate::tunnel::verifier::{AgentVerifier, count_refusal};

/// The tunnel's TLS config, for QUIC and TCP alike: TLS 1.3, ALPN `tether/1`, mandatory agent
/// client certificates checked by [`AgentVerifier`] (with an empty revocation list).
pub fn tls_config(cfg: &GatewayConfig) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    tls_config_with(cfg, Arc::default())
}

/// [`tls_config`] refusing the certificates `revocations` lists.
pub fn tls_config_with(
    cfg: &GatewayConfig,
    revocations: Arc<RevocationList>,
) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let roots = tls::load_roots(&cfg.tls.ca)?;
    let inner = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| GatewayError::Tls(format!("client verifier: {e}")))?;
    let verifier =
        Arc::new(AgentVerifier::new(inner, cfg.trust_domain.clone()).with_revocations(revocations));
    let certs = tls::load_certs("certificate", &cfg.tls.cert)?;
    let key = tls::load_key(&cfg.tls.key)?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(format!("gateway certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // The gateway's suite order (AES-128-GCM first, `tls::crypto_provider`), whatever an agent
    // prefers: the cheaper handshake is the gateway's to choose when thousands reconnect.
    tls.ignore_client_order = true;
    // No session resumption: a resumed handshake skips the client-certificate verifier, so a
    // revoked (or since expired) certificate would get back in on its old session ticket.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(Arc::new(tls))
}

/// What one agent stream may have in flight towards the gateway (QUIC's per-stream receive
/// window): quinn's default, kept so a relayed response streams as fast as before (25 MB/s per
/// call at 50 ms). A gateway-opened stream is read as its caller takes the data, and the
/// control stream as it comes.
pub const STREAM_WINDOW: u32 = 1_250_000;

/// What one agent connection may have in flight towards the gateway across its streams
/// (quinn's default is unbounded): six streams at full speed, 160 MiB/s at 50 ms.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// What the gateway keeps written but not yet acknowledged towards one agent connection
/// (quinn's default is 10 MB): 80 MiB/s at 50 ms, beyond what a control plane sends one data
/// plane, and the bound on what an agent that stops acknowledging can make it hold.
pub const SEND_WINDOW: u64 = 4 << 20;

/// Builds the QUIC server config on [`tls_config`].
pub fn server_config(
    cfg: &GatewayConfig,
    tls: Arc<rustls::ServerConfig>,
) -> Result<quinn::ServerConfig, GatewayError> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| GatewayError::Tls(format!("QUIC TLS config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Agents open exactly one stream, the control stream, and the gateway accepts exactly one:
    // every other stream is gateway-opened. A second agent stream would be one the gateway
    // never reads, buffering up to a stream window each for the connection's life (with 4
    // allowed, 40 sessions of one certificate took the gateway from 22 to 185 MB). With 1,
    // quinn refuses it at the transport (STREAM_LIMIT_ERROR).
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Bounded windows (see the constants): per connection, what an agent can make the gateway
    // buffer is at most CONNECTION_WINDOW received plus SEND_WINDOW unacknowledged, and
    // `limits.sessions_per_agent` bounds the connections.
    transport.stream_receive_window(STREAM_WINDOW.into());
    transport.receive_window(CONNECTION_WINDOW.into());
    transport.send_window(SEND_WINDOW);
    // Many mostly idle connections: no QUIC keep-alive (the session's heartbeats keep the
    // connection alive and QUIC's idle timer is only their backstop), and no unreliable
    // datagrams (the protocol uses none, and with them on a peer could make the gateway buffer
    // up to 1.25 MB of datagrams per connection that nobody reads).
    transport.keep_alive_interval(None);
    transport.datagram_receive_buffer_size(None);
    // Backstop for the heartbeat timeout in the session itself.
    let idle = cfg.tunnel.heartbeat_interval * 3 + Duration::from_secs(2);
    transport.max_idle_timeout(Some(
        idle.try_into()
            .map_err(|_| GatewayError::Tls("idle timeout out of range".into()))?,
    ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Shared by every connection's driver.
#[derive(Debug)]
pub struct TunnelContext {
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Template for each session's config.
    pub session: GatewaySessionConfig,
    /// Cancelled when the gateway shuts down: sessions close with `SHUTDOWN`.
    pub shutdown: CancellationToken,
    /// How often each session is probed, and how long a probe may take.
    pub probe: (Duration, Duration),
    /// Checked again once a session is registered (a revocation may have landed after its
    /// handshake).
    pub revocations: Arc<RevocationList>,
    /// Other protocols on the tunnel's TCP port, chosen by the ClientHello's ALPN (enrollment).
    pub side_doors: Vec<SideDoor>,
    /// Signs renewal requests made on sessions (`RenewRequest`); `None`: not offered.
    pub renewal: Option<Arc<crate::identity::enrollment::Enrollment>>,
    /// Connections per agent identity (`limits.sessions_per_agent`).
    pub sessions: AgentSessions,
    /// Refusals over `sessions_per_agent` are logged at most every 10 s: a hostile agent
    /// retries as fast as its handshake rate allows.
    refusals: std::sync::Mutex<LogThrottle>,
    next_session: AtomicU64,
    instance: String,
}

impl TunnelContext {
    /// A context for sessions announcing `cfg`'s limits.
    pub fn new(cfg: &GatewayConfig, registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        let instance = format!("{:08x}", rand::random::<u32>());
        let mut session = GatewaySessionConfig::new(String::new());
        session.gateway_id = format!("gw-{instance}");
        session.heartbeat_interval = cfg.tunnel.heartbeat_interval;
        session.handshake_timeout = cfg.tunnel.handshake_timeout;
        session.max_concurrent_streams = cfg.tunnel.max_concurrent_streams;
        session.probe_interval = cfg.tunnel.probe_interval;
        TunnelContext {
            registry,
            session,
            shutdown,
            probe: (cfg.tunnel.probe_interval, cfg.tunnel.probe_timeout),
            revocations: Arc::default(),
            side_doors: Vec::new(),
            renewal: None,
            sessions: AgentSessions::new(cfg.limits.sessions_per_agent),
            refusals: std::sync::Mutex::new(LogThrottle::new(Duration::from_secs(10))),
            next_session: AtomicU64::new(1),
            instance,
        }
    }

    /// Uses `revocations` (the list the verifier consults) for the post-registration check.
    pub fn with_revocations(mut self, revocations: Arc<RevocationList>) -> Self {
        self.revocations = revocations;
        self
    }

    /// Offers certificate renewal on every session (`Welcome` lists `renew`) when `enrollment`
    /// can sign.
    pub fn with_renewal(
        mut self,
        enrollment: Arc<crate::identity::enrollment::Enrollment>,
    ) -> Self {
        if enrollment.enabled() {
            self.session
                .capabilities
                .push(tunnel_proto::message::RENEW.to_owned());
            self.renewal = Some(enrollment);
        }
        self
    }

    /// Hands TCP connections offering `alpn` to `serve` instead of the tunnel.
    pub fn with_side_door(mut self, alpn: &[u8], serve: SideDoorFn) -> Self {
        self.side_doors.push(SideDoor {
            alpn: alpn.to_vec(),
            serve,
        });
        self
    }

    fn next_session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// Counts a new connection of `agent`, or says (to log and to the agent) why it is
    /// refused.
    fn admit_session(
        &self,
        agent: &tunnel_proto::AgentId,
        remote: SocketAddr,
    ) -> Result<SessionPermit, String> {
        let held = match self.sessions.acquire(agent) {
            Ok(permit) => return Ok(permit),
            Err(held) => held,
        };
        let throttled = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now());
        if let Some(held_back) = throttled {
            tracing::warn!(%agent, %remote, held, limit = self.sessions.max(),
                refusals_since_last_warning = held_back,
                "refusing a tunnel connection: the agent holds limits.sessions_per_agent already");
        }
        Err(format!(
            "agent {agent} is at limits.sessions_per_agent on this gateway (connections open: \
             {held}): if they are not all its own instances, another \
             process holds its certificate (revoke it); otherwise wait for old sessions to end, \
             run fewer instances, or raise limits.sessions_per_agent on the gateway"
        ))
    }
}

/// Serves one TCP connection whose ClientHello was read (the handler completes the handshake
/// with its own TLS config).
pub type SideDoorFn = Arc<
    dyn Fn(
            tokio_rustls::StartHandshake<tokio::net::TcpStream>,
            SocketAddr,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Another protocol on the tunnel's TCP port, selected by ALPN.
#[derive(Clone)]
pub struct SideDoor {
    alpn: Vec<u8>,
    serve: SideDoorFn,
}

impl std::fmt::Debug for SideDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideDoor")
            .field("alpn", &String::from_utf8_lossy(&self.alpn))
            .finish_non_exhaustive()
    }
}

/// QUIC handshakes in progress at most. Beyond it a new connection is refused at once
/// (`CONNECTION_REFUSED`, before any cryptography) and the agent retries after its jittered
/// backoff. Without a cap, a reconnect storm (every agent after a gateway restart) queues more
/// handshakes than the CPU completes within the agents' connect timeout: they give up and
/// retry, and the work spent on them is lost (measured with `tether-loadtest`: 10,000 agents
/// took 40 s to come back with thousands of timed-out dials; see docs/PERFORMANCE.md).
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// QUIC handshakes in progress from one source address at most: a quarter of
/// [`MAX_CONCURRENT_HANDSHAKES`], so one address cannot take every slot while a fleet behind one
/// NAT still connects many agents at once; all of them when `limits.handshake_burst` is above
/// [`MAX_CONCURRENT_HANDSHAKES`] (one address standing for many hosts, as in a load test).
fn handshakes_per_address(admission: &Admission) -> usize {
    if admission.burst() > MAX_CONCURRENT_HANDSHAKES as f64 {
        MAX_CONCURRENT_HANDSHAKES
    } else {
        MAX_CONCURRENT_HANDSHAKES / 4
    }
}

/// Accepts agent connections until `stop_accepting` is cancelled. Each Initial is first
/// admitted by `admission` (before any cryptography): a stateless Retry while the gateway-wide
/// handshake rate is above `limits.retry_above` and the address is unvalidated, a refusal when
/// its source address is over `limits.handshakes_per_second`.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<TunnelContext>,
    admission: Arc<Admission>,
    stop_accepting: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let per_address = handshakes_per_address(&admission);
    loop {
        let incoming = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        match admission.admit_quic(
            remote.ip(),
            incoming.remote_address_validated(),
            Instant::now(),
        ) {
            Admit::Accept => {}
            Admit::Retry => {
                metrics::counter!("tether_gateway_quic_retries_total").increment(1);
                if let Err(e) = incoming.retry() {
                    // Only an Initial that already carried a token cannot be retried, and
                    // those are validated: not reached.
                    e.into_incoming().ignore();
                }
                continue;
            }
            Admit::Refuse => {
                count_rejection("handshake_rate");
                tracing::debug!(%remote, "too many handshakes from this address; refusing");
                incoming.refuse();
                continue;
            }
        }
        let Some(own_slot) = admission.begin_handshake(remote.ip(), per_address) else {
            count_rejection("handshakes_per_address");
            tracing::debug!(%remote, "too many handshakes in progress from this address; refusing");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            metrics::counter!("tether_gateway_handshakes_refused_total").increment(1);
            tracing::debug!(%remote, "too many handshakes in progress; refusing a connection");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_connection(incoming, ctx, (permit, own_slot)).await {
                tracing::debug!(%remote, error = %e, "agent connection ended with an error");
            }
        });
    }
}

/// TLS alerts that rustls sends for a certificate our verifier refused (and already counted):
/// bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
/// certificate_unknown, unknown_ca, access_denied, decrypt_error (bad signature).
fn counted_by_verifier(e: &quinn::ConnectionError) -> bool {
    const ALERTS: [u64; 8] = [42, 43, 44, 45, 46, 48, 49, 51];
    matches!(e, quinn::ConnectionError::TransportError(t)
        if ALERTS.iter().any(|a| u64::from(t.code) == 0x100 + a))
}

fn handshake_failure_reason(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(t) => match u64::from(t.code) {
            // TLS alert `certificate_required`: the agent sent no certificate.
            0x174 => "no_client_certificate",
            // TLS alert `no_application_protocol`: wrong ALPN.
            0x178 => "alpn_mismatch",
            _ => "tls_error",
        },
        quinn::ConnectionError::TimedOut => "timeout",
        _ => "connection_error",
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    ctx: Arc<TunnelContext>,
    handshake_permit: (tokio::sync::OwnedSemaphorePermit, HandshakeSlot),
) -> Result<(), quinn::ConnectionError> {
    let remote = incoming.remote_address();
    // The first flight is processed in `accept`, so a refusal can surface there or later.
    // Bounded: a peer that sends its Initial and then nothing must not hold a handshake slot
    // until QUIC's idle timeout (dropping `Connecting` abandons the connection).
    let handshake = match incoming.accept() {
        Ok(connecting) => {
            match tokio::time::timeout(ctx.session.handshake_timeout, connecting).await {
                Ok(r) => r,
                Err(_) => {
                    count_idle_timeout("tunnel_quic");
                    count_refusal("timeout", &format!("{remote}: QUIC handshake timed out"));
                    return Ok(());
                }
            }
        }
        Err(e) => Err(e),
    };
    drop(handshake_permit);
    let conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            if !counted_by_verifier(&e) {
                count_refusal(handshake_failure_reason(&e), &format!("{remote}: {e}"));
            }
            return Err(e);
        }
    };
    // The verifier accepted exactly one agent identity of our trust domain.
    let (agent, cert) = match peer_agent(&conn) {
        Some(a) => a,
        None => {
            conn.close(ErrorCode::UNAUTHENTICATED.0.into(), b"no agent identity");
            return Ok(());
        }
    };
    let permit = match ctx.admit_session(&agent, remote) {
        Ok(p) => p,
        Err(why) => {
            conn.close(ErrorCode::TOO_MANY_SESSIONS.0.into(), why.as_bytes());
            return Ok(());
        }
    };
    let link = Link::Quic(conn);
    // Over QUIC the agent opens the control stream.
    let accept = tokio::time::timeout(ctx.session.handshake_timeout, link.accept()).await;
    let (send, recv) = match accept {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(()),
        Err(_) => {
            count_idle_timeout("tunnel_quic");
            link.close(ErrorCode::HANDSHAKE_TIMEOUT, b"no control stream opened");
            return Ok(());
        }
    };
    drive_session(link, send, recv, (agent, cert), remote, ctx, permit).await;
    Ok(())
}

/// Accepts agent connections on TCP (the fallback, and the enrollment side door) until
/// `stop_accepting` is cancelled; a source address over `limits.handshakes_per_second` is
/// closed at once, before TLS.
pub async fn accept_tcp_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<TunnelContext>,
    admission: Arc<Admission>,
    stop_accepting: CancellationToken,
) {
    // Out of file descriptors: keep serving the connections we have, paced and quiet.
    let mut listener = Acceptor::new(listener, "tunnel_tcp");
    loop {
        let (sock, remote) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            a = listener.accept() => a,
        };
        if admission.admit_tcp(remote.ip(), Instant::now()) != Admit::Accept {
            count_rejection("handshake_rate");
            tracing::debug!(%remote, "too many TCP handshakes from this address; closing");
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        let (tls, ctx) = (tls.clone(), ctx.clone());
        tokio::spawn(async move {
            handle_tcp(sock, remote, tls, ctx).await;
        });
    }
}

/// Why a TLS-over-TCP handshake failed, as a `handshake_failures_total` reason; `None` when the
/// verifier already counted it.
fn tcp_failure_reason(e: &std::io::Error) -> Option<&'static str> {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Some("connection_error");
    };
    match tls {
        rustls::Error::NoCertificatesPresented => Some("no_client_certificate"),
        rustls::Error::NoApplicationProtocol => Some("alpn_mismatch"),
        rustls::Error::InvalidCertificate(_) => None,
        _ => Some("tls_error"),
    }
}

async fn handle_tcp(
    sock: tokio::net::TcpStream,
    remote: SocketAddr,
    tunnel_tls: Arc<rustls::ServerConfig>,
    ctx: Arc<TunnelContext>,
) {
    let deadline = tokio::time::Instant::now() + ctx.session.handshake_timeout;
    // Read the ClientHello first: its ALPN says whether this is the tunnel or a side door.
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), sock);
    let start = match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if let Some(reason) = tcp_failure_reason(&e) {
                count_refusal(reason, &format!("tcp {remote}: {e}"));
            }
            return;
        }
        Err(_) => {
            count_idle_timeout("tunnel_tcp");
            count_refusal("timeout", &format!("tcp {remote}: no TLS ClientHello"));
            return;
        }
    };
    let offered: Vec<Vec<u8>> = start
        .client_hello()
        .alpn()
        .map(|a| a.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    if let Some(door) = ctx
        .side_doors
        .iter()
        .find(|d| !offered.contains(&ALPN.to_vec()) && offered.contains(&d.alpn))
    {
        (door.serve)(start, remote).await;
        return;
    }
    let handshake = tokio::time::timeout_at(deadline, start.into_stream(tunnel_tls));
    let tls = match handshake.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if let Some(reason) = tcp_failure_reason(&e) {
                count_refusal(reason, &format!("tcp {remote}: {e}"));
            }
            return;
        }
        Err(_) => {
            count_idle_timeout("tunnel_tcp");
            count_refusal("timeout", &format!("tcp {remote}: TLS handshake timed out"));
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN) {
        count_refusal("alpn_mismatch", &format!("tcp {remote}: no tether ALPN"));
        return;
    }
    let Some(peer) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(agent_of)
    else {
        return;
    };
    let admitted = ctx.admit_session(&peer.0, remote);
    let link = match H2Link::client(tls, remote).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "HTTP/2 handshake with an agent failed");
            return;
        }
    };
    // Over HTTP/2 the gateway opens the control stream (the agent is the HTTP/2 server).
    let (mut send, recv) = match link.open().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "opening the control stream failed");
            return;
        }
    };
    let permit = match admitted {
        Ok(p) => p,
        Err(why) => {
            // No CONNECTION_CLOSE over TCP: the refusal travels as the session's Close frame.
            let code = ErrorCode::TOO_MANY_SESSIONS;
            let close = Message::Close(Close {
                code: code.0,
                reason: why.clone(),
            });
            let refuse = async {
                if send_msg(&mut send, &close).await.is_ok() {
                    let _ = send.finish();
                }
                link.close(code, why.as_bytes());
                link.linger().await;
            };
            let _ = tokio::time::timeout(ctx.session.handshake_timeout, refuse).await;
            return;
        }
    };
    drive_session(link, send, recv, peer, remote, ctx, permit).await;
}

fn peer_agent(conn: &quinn::Connection) -> Option<(tunnel_proto::AgentId, CertFacts)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    agent_of(certs.first()?)
}

/// The agent identity and revocation facts of a leaf the verifier accepted.
fn agent_of(
    cert: &rustls_pki_types::CertificateDer<'_>,
) -> Option<(tunnel_proto::AgentId, CertFacts)> {
    match tls::spiffe_id(cert) {
        Ok(SpiffeId::Agent { id, .. }) => Some((id, CertFacts::of(cert).ok()?)),
        _ => None,
    }
}

/// Runs one session until its connection ends; `_permit` counts the connection against its
/// agent until then.
async fn drive_session(
    link: Link,
    mut send: SendStream,
    mut recv: RecvStream,
    (agent, cert): (tunnel_proto::AgentId, CertFacts),
    remote: SocketAddr,
    ctx: Arc<TunnelContext>,
    _permit: SessionPermit,
) {
    let mut cfg = ctx.session.clone();
    cfg.session_id = ctx.next_session_id();
    let session_id = cfg.session_id.clone();
    let mut session = GatewaySession::new(cfg, Instant::now());
    let mut registered: Option<Arc<SessionInfo>> = None;
    let mut commands = None;
    let transport = link.transport();
    // The end-to-end probe runs inside this driver (one task and one timer per session, which
    // matters at 10,000 mostly idle sessions; see docs/PERFORMANCE.md).
    let mut probe = Probe::new(ctx.probe, ctx.session.heartbeat_interval);
    let close_reason;
    loop {
        while let Some(bytes) = session.poll_transmit() {
            if let Err(e) = send.write_all(&bytes).await {
                tracing::debug!(%agent, error = %e, "control stream write failed");
                break;
            }
        }
        let mut closed = None;
        while let Some(ev) = session.poll_event() {
            match ev {
                GatewayEvent::Established { hello, version } => {
                    let (info, rx) = ctx.registry.register(NewSession {
                        session_id: session_id.clone(),
                        agent: agent.clone(),
                        remote,
                        transport: transport.name(),
                        hello,
                        version,
                        link: link.clone(),
                        cert_fingerprint: cert.fingerprint.clone(),
                        cert_serial: cert.serial.clone(),
                        cert_not_after: crate::identity::revocation::from_ms(cert.not_after * 1000),
                    });
                    tracing::info!(%agent, session = %session_id, %remote, %transport,
                        agent_version = %info.hello.agent_version, "agent connected");
                    metrics::counter!("tether_gateway_sessions_total", "transport" => transport.name())
                        .increment(1);
                    probe.start(Instant::now());
                    registered = Some(info);
                    commands = Some(rx);
                    // A revocation that landed between the handshake and the registration
                    // missed this session: catch it here.
                    if let Some(why) = ctx.revocations.refusal(&agent, &cert) {
                        tracing::warn!(%agent, session = %session_id, reason = %why,
                            "closing a session of a revoked certificate");
                        session.close(ErrorCode::REVOKED, "agent revoked");
                    }
                }
                GatewayEvent::Heartbeat { rtt } => {
                    if let Some(rtt) = rtt {
                        if let Some(s) = &registered {
                            s.set_rtt(rtt);
                        }
                        metrics::histogram!("tether_gateway_heartbeat_rtt_seconds")
                            .record(rtt.as_secs_f64());
                    }
                    probe.on_heartbeat(&link, Instant::now());
                }
                // Signing takes well under a millisecond: answered here, in order.
                GatewayEvent::RenewRequested(req) => {
                    if let Some(renewal) = &ctx.renewal {
                        session.renew_response(renewal.renew(&agent, &cert, &req));
                    }
                }
                GatewayEvent::Closed(info) => closed = Some(info),
            }
        }
        if let Some(info) = closed {
            metrics::counter!("tether_gateway_session_closes_total", "code" => info.code.name())
                .increment(1);
            close_reason = format!("{}: {}", info.code, info.reason);
            if info.by_peer {
                link.close(ErrorCode::NO_ERROR, b"");
            } else {
                // A close decided while handling events (a revoked certificate) has its Close
                // frame still queued.
                let flush = async {
                    while let Some(bytes) = session.poll_transmit() {
                        if send.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_millis(250), flush).await;
                // Let the Close frame go out before the connection close discards it.
                let _ = send.finish();
                link.close(info.code, info.reason.as_bytes());
                link.linger().await;
            }
            break;
        }
        let session_deadline = session.poll_timeout();
        let deadline = [session_deadline, probe.deadline()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let command = async {
            match commands.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // `read_chunk` hands over the transport's own buffer: no read buffer per session.
            r = recv.read_chunk(CONTROL_READ_MAX) => match r {
                Ok(Some(bytes)) => session.handle_input(&bytes, Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(StreamError::Closed { code, reason }) => {
                    close_reason = format!("closed by agent: {code} {reason}");
                    break;
                }
                Err(e) => {
                    close_reason = e.to_string();
                    break;
                }
            },
            outcome = probe.answer() => {
                if let Err(why) = outcome {
                    metrics::counter!("tether_gateway_probe_failures_total",
                        "transport" => transport.name())
                    .increment(1);
                    tracing::warn!(%agent, session = %session_id, %remote, %transport,
                        reason = %why, "end-to-end probe failed; closing the session");
                    session.close(ErrorCode::UNRESPONSIVE, "end-to-end probe failed");
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                if session_deadline.is_some_and(|d| d <= now) {
                    session.handle_timeout(now);
                }
                probe.on_timer(&link, now);
            }
            Some(cmd) = command => match cmd {
                SessionCommand::GoAway(reason, within) => session.go_away(&reason, within),
                SessionCommand::Close(code, reason) => session.close(code, &reason),
            },
            _ = ctx.shutdown.cancelled() => session.close(ErrorCode::SHUTDOWN, "gateway shutting down"),
        }
    }
    if let Some(info) = registered {
        tracing::info!(%agent, session = %session_id, %transport, reason = %close_reason, "agent disconnected");
        ctx.registry.unregister(&info, close_reason);
    } else {
        tracing::info!(%agent, %remote, reason = %close_reason, "agent session ended before Hello");
    }
}

/// Most bytes of the control stream taken at once. Control messages are a few dozen bytes.
const CONTROL_READ_MAX: usize = 16 * 1024;

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The end-to-end probe of one session: every `interval` the gateway opens a stream, sends a
/// `Probe` header and expects the agent's `OpenResult` within `timeout`. Driven by the
/// session's own loop: a timer deadline and, while a probe is out, its future.
///
/// A probe goes out with the heartbeat answer nearest its due time (within `slack`, half a
/// heartbeat interval, either side): both are written in one turn of the session's task, so
/// they share a packet, and the agent's answer to the probe carries its acknowledgement of
/// both. At 10,000 idle agents that is a third fewer datagrams than probing on a timer of its
/// own (see docs/PERFORMANCE.md). The timer at `next + slack` covers a session whose
/// heartbeats stopped.
struct Probe {
    interval: Duration,
    timeout: Duration,
    slack: Duration,
    /// When the next probe is due; `None` before the session is established and after a
    /// failure.
    next: Option<Instant>,
    /// The probe in flight, with when it went out.
    in_flight: Option<(Instant, ProbeFuture)>,
}

impl Probe {
    fn new((interval, timeout): (Duration, Duration), heartbeat: Duration) -> Probe {
        Probe {
            interval,
            timeout,
            slack: (heartbeat / 2).min(interval / 2),
            next: None,
            in_flight: None,
        }
    }

    fn start(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }

    /// When the session's timer must wake for the probe.
    fn deadline(&self) -> Option<Instant> {
        match &self.in_flight {
            Some((sent, _)) => Some(*sent + self.timeout),
            None => self.next.map(|n| n + self.slack),
        }
    }

    /// A heartbeat's answer is about to be written: the probe goes with it when due within
    /// `slack`.
    fn on_heartbeat(&mut self, link: &Link, now: Instant) {
        if self.due_with_heartbeat(now) {
            self.send(link, now);
        }
    }

    fn on_timer(&mut self, link: &Link, now: Instant) {
        // A probe in flight is ended by its own timeout, in `answer`.
        if self.due_by_timer(now) {
            self.send(link, now);
        }
    }

    fn due_with_heartbeat(&self, now: Instant) -> bool {
        self.in_flight.is_none() && self.next.is_some_and(|n| n <= now + self.slack)
    }

    fn due_by_timer(&self, now: Instant) -> bool {
        self.in_flight.is_none() && self.next.is_some_and(|n| n + self.slack <= now)
    }

    /// Starts a probe; its first poll (in the same turn of the session's loop, by `answer`)
    /// opens the stream and writes the header.
    fn send(&mut self, link: &Link, now: Instant) {
        self.next = None;
        let link = link.clone();
        let timeout = self.timeout;
        let fut = tokio::time::timeout(timeout, async move { probe_once(&link).await });
        let fut = async move {
            match fut.await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        };
        self.in_flight = Some((now, Box::pin(fut)));
    }

    /// The outcome of the probe in flight (pending while there is none). On success the next
    /// probe is scheduled; on failure none is.
    async fn answer(&mut self) -> Result<(), String> {
        let Some((sent, fut)) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = fut.await;
        let sent = *sent;
        self.in_flight = None;
        match &outcome {
            Ok(()) => {
                metrics::histogram!("tether_gateway_probe_seconds")
                    .record(sent.elapsed().as_secs_f64());
                self.next = Some(Instant::now() + self.interval);
            }
            Err(_) => self.next = None,
        }
        outcome
    }
}

async fn probe_once(link: &Link) -> Result<(), String> {
    let (mut send, recv) = link.open().await.map_err(|e| e.to_string())?;
    let header = StreamHeader {
        kind: StreamKind::Probe as i32,
        ..Default::default()
    };
    send_msg(&mut send, &Message::StreamHeader(header))
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut framed = FramedRecv::new(recv, 1024);
    match framed.next().await {
        Ok(Some(Message::OpenResult(r))) if r.ok => Ok(()),
        Ok(Some(other)) => Err(format!("unexpected answer {}", other.name())),
        Ok(None) => Err("stream ended without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_probe_rides_on_the_heartbeat_nearest_its_due_time() {
        // Probe every 30 s, heartbeat every 10 s: slack 5 s either side.
        let mut p = Probe::new((30 * S, 10 * S), 10 * S);
        let t0 = Instant::now();
        assert!(
            !p.due_with_heartbeat(t0) && !p.due_by_timer(t0 + 3600 * S),
            "not started"
        );
        p.start(t0);
        assert_eq!(
            p.deadline(),
            Some(t0 + 35 * S),
            "the timer waits out the slack"
        );
        assert!(
            !p.due_with_heartbeat(t0 + 20 * S),
            "10 s early: the next heartbeat is nearer"
        );
        assert!(p.due_with_heartbeat(t0 + 26 * S), "4 s early");
        assert!(
            p.due_with_heartbeat(t0 + 34 * S),
            "4 s late (no heartbeat came in between)"
        );
        assert!(
            !p.due_by_timer(t0 + 34 * S),
            "the timer leaves the window to heartbeats"
        );
        assert!(
            p.due_by_timer(t0 + 35 * S),
            "heartbeats stopped: the timer sends it"
        );
    }

    #[test]
    fn the_slack_never_exceeds_half_the_probe_interval() {
        // Probes faster than heartbeats (as tests configure): slack is half the probe interval.
        let mut p = Probe::new((S / 5, S / 5), 10 * S);
        let t0 = Instant::now();
        p.start(t0);
        assert_eq!(p.deadline(), Some(t0 + S / 5 + S / 10));
        assert!(!p.due_with_heartbeat(t0));
        assert!(p.due_by_timer(t0 + S / 5 + S / 10));
    }
}
