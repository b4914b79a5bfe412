//! Transport + session layers: the QUIC listener agents dial, and the driver that runs one
//! `tunnel_proto::GatewaySession` per connection.
//!
//! The driver owns the control stream: it feeds bytes and time into the sans-IO session, writes
//! what the session wants written, registers the session when `Hello` is accepted, and closes
//! the connection with the session's close code when it ends. A bad peer ends only its own
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use tether_runtime::CancellationToken;
use tether_runtime::tls;
use tunnel_proto::session::{GatewayEvent, GatewaySession, GatewaySessionConfig};
use tunnel_proto::{ALPN, ErrorCode, SpiffeId};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::registry::{NewSession, Registry, SessionCommand, SessionInfo};
use crate::verifier::{AgentVerifier, count_refusal};

/// Builds the QUIC server config: TLS 1.3, ALPN `tether/1`, mandatory agent client certificates.
pub fn server_config(cfg: &GatewayConfig) -> Result<quinn::ServerConfig, GatewayError> {
    let roots = tls::load_roots(&cfg.tls.ca)?;
    let inner = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| GatewayError::Tls(format!("client verifier: {e}")))?;
    let verifier = Arc::new(AgentVerifier::new(inner, cfg.trust_domain.clone()));
    let certs = tls::load_certs("certificate", &cfg.tls.cert)?;
    let key = tls::load_key(&cfg.tls.key)?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(format!("gateway certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| GatewayError::Tls(format!("QUIC TLS config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Agents open only the control stream; every other stream is gateway-opened.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
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
        TunnelContext {
            registry,
            session,
            shutdown,
            next_session: AtomicU64::new(1),
            instance,
        }
    }

    fn next_session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }
}

/// Accepts agent connections until `stop_accepting` is cancelled.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<TunnelContext>,
    stop_accepting: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = handle_connection(incoming, ctx).await {
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
) -> Result<(), quinn::ConnectionError> {
    let remote = incoming.remote_address();
    // The first flight is processed in `accept`, so a refusal can surface there or later.
    let handshake = match incoming.accept() {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
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
    let agent = match peer_agent(&conn) {
        Some(a) => a,
        None => {
            conn.close(ErrorCode::UNAUTHENTICATED.0.into(), b"no agent identity");
            return Ok(());
        }
    };
    let accept = tokio::time::timeout(ctx.session.handshake_timeout, conn.accept_bi()).await;
    let (send, recv) = match accept {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            conn.close(
                ErrorCode::HANDSHAKE_TIMEOUT.0.into(),
                b"no control stream opened",
            );
            return Ok(());
        }
    };
    drive_session(conn, send, recv, agent, remote, ctx).await;
    Ok(())
}

fn peer_agent(conn: &quinn::Connection) -> Option<tunnel_proto::AgentId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    match tls::spiffe_id(certs.first()?) {
        Ok(SpiffeId::Agent { id, .. }) => Some(id),
        _ => None,
    }
}

async fn drive_session(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    agent: tunnel_proto::AgentId,
    remote: SocketAddr,
    ctx: Arc<TunnelContext>,
) {
    let mut cfg = ctx.session.clone();
    cfg.session_id = ctx.next_session_id();
    let session_id = cfg.session_id.clone();
    let mut session = GatewaySession::new(cfg, Instant::now());
    let mut registered: Option<Arc<SessionInfo>> = None;
    let mut commands = None;
    let mut buf = vec![0u8; 16 * 1024];
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
                        transport: "quic",
                        hello,
                        version,
                        conn: conn.clone(),
                    });
                    tracing::info!(%agent, session = %session_id, %remote,
                        agent_version = %info.hello.agent_version, "agent connected");
                    metrics::counter!("tether_gateway_sessions_total", "transport" => "quic")
                        .increment(1);
                    registered = Some(info);
                    commands = Some(rx);
                }
                GatewayEvent::Rtt(rtt) => {
                    if let Some(s) = &registered {
                        s.set_rtt(rtt);
                    }
                    metrics::histogram!("tether_gateway_heartbeat_rtt_seconds")
                        .record(rtt.as_secs_f64());
                }
                GatewayEvent::Closed(info) => closed = Some(info),
            }
        }
        if let Some(info) = closed {
            metrics::counter!("tether_gateway_session_closes_total", "code" => info.code.name())
                .increment(1);
            close_reason = format!("{}: {}", info.code, info.reason);
            if info.by_peer {
                conn.close(ErrorCode::NO_ERROR.0.into(), b"");
            } else {
                // Let the Close frame go out before the connection close discards it.
                let _ = send.finish();
                conn.close(info.code.0.into(), info.reason.as_bytes());
            }
            break;
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let command = async {
            match commands.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                Ok(None) => session.handle_eof(Instant::now()),
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c))) => {
                    close_reason = format!(
                        "closed by agent: {} {}",
                        ErrorCode::from(u64::from(c.error_code)),
                        String::from_utf8_lossy(&c.reason)
                    );
                    break;
                }
                Err(e) => {
                    close_reason = format!("connection lost: {e}");
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
            Some(cmd) = command => match cmd {
                SessionCommand::GoAway(reason, within) => session.go_away(&reason, within),
            },
            _ = ctx.shutdown.cancelled() => session.close(ErrorCode::SHUTDOWN, "gateway shutting down"),
        }
    }
    if let Some(info) = registered {
        tracing::info!(%agent, session = %session_id, reason = %close_reason, "agent disconnected");
        ctx.registry.unregister(&info, close_reason);
    } else {
        tracing::info!(%agent, %remote, reason = %close_reason, "agent session ended before Hello");
    }
}
